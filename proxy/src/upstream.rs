//! The upstream leg. Each client connection owns one upstream HTTP/1.1 connection, taken on its first admitted
//! request and reused for the requests after it (HTTP/1.1 is sequential on a connection, so one is always enough):
//! no shared pool touched per request, no task spawned per request to return a connection to a pool. When the client
//! connection closes, its upstream connection is parked (up to [`MAX_PARKED`], for at most [`PARK_TIMEOUT`]) for
//! the next client connection, so short-lived clients do not cost a TCP connect each. Requests that arrive while the
//! connection's own upstream connection is busy (h2 streams multiplexed on one client connection) go through a
//! shared pooled client.

use crate::body::{RequestBody, ResponseBody};
use crate::tunnel::Pending;
use http::{Request, Response, StatusCode};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;

/// The side pool is at `--max-side-pool-requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared upstream pool is at its limit of {0} requests (--max-side-pool-requests)")]
pub struct Busy(pub usize);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle upstream connections kept for the next client connection.
pub const MAX_PARKED: usize = 64;
/// How long a parked upstream connection is kept.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Upstream {
    /// `host:port`, as configured.
    addr: String,
    pooled: Client<HttpConnector, RequestBody>,
    /// Permits for side-pool requests in progress.
    side: Arc<Semaphore>,
    side_max: usize,
    parked: Mutex<Vec<(Instant, SendRequest<RequestBody>)>>,
}

/// The upstream connection owned by one client connection; after an accepted upgrade, the tunnel's two halves,
/// waiting for the client connection to hand its socket over ([`crate::tunnel`]).
pub struct ConnSlot {
    state: Mutex<SlotState>,
    upstream: Arc<Upstream>,
    tunnel: Pending,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Empty,
    Idle(SendRequest<RequestBody>),
    Busy,
}

/// A slot marked busy; dropping it without [`Lease::put_back`] (error, cancelled request, upgrade) empties it, so the
/// next request opens a fresh connection.
struct Lease<'a> {
    slot: &'a ConnSlot,
    sender: Option<SendRequest<RequestBody>>,
}

impl Lease<'_> {
    fn put_back(mut self, sender: SendRequest<RequestBody>) {
        self.sender = Some(sender);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let state = match self.sender.take() {
            Some(s) if !s.is_closed() => SlotState::Idle(s),
            _ => SlotState::Empty,
        };
        *self.slot.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let state = std::mem::take(self.state.get_mut().unwrap_or_else(|p| p.into_inner()));
        if let SlotState::Idle(s) = state {
            self.upstream.park(s);
        }
    }
}

impl ConnSlot {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Self { state: Mutex::new(SlotState::Empty), upstream, tunnel: Pending::default() }
    }

    /// Keeps the halves of an upgrade the application accepted, for the connection to run once HTTP/1.1 is done.
    pub fn set_tunnel(&self, client: OnUpgrade, upstream: OnUpgrade) {
        self.tunnel.set(client, upstream);
    }

    pub fn take_tunnel(&self) -> Option<(OnUpgrade, OnUpgrade)> {
        self.tunnel.take()
    }

    /// `None` when the slot is busy with another request.
    fn lease(&self) -> Option<(Lease<'_>, Option<SendRequest<RequestBody>>)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *state, SlotState::Busy) {
            SlotState::Busy => None,
            SlotState::Empty => Some((Lease { slot: self, sender: None }, None)),
            SlotState::Idle(s) => Some((Lease { slot: self, sender: None }, Some(s))),
        }
    }
}

impl Upstream {
    /// `side_max`: requests in progress at once on the side pool (at least 1).
    pub fn new(addr: &str, side_max: usize) -> Self {
        let side_max = side_max.max(1);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let pooled = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            addr: addr.to_owned(),
            pooled,
            side: Arc::new(Semaphore::new(side_max)),
            side_max,
            parked: Mutex::new(Vec::new()),
        }
    }

    /// Keeps an idle connection (one with no response in progress) for the next client connection.
    fn park(&self, sender: SendRequest<RequestBody>) {
        if !sender.is_ready() {
            return;
        }
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        parked.retain(|(at, s)| !s.is_closed() && at.elapsed() < PARK_TIMEOUT);
        if parked.len() < MAX_PARKED {
            parked.push((Instant::now(), sender));
        }
    }

    /// The most recently parked connection still open.
    fn unpark(&self) -> Option<SendRequest<RequestBody>> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((at, s)) = parked.pop() {
            if !s.is_closed() && at.elapsed() < PARK_TIMEOUT {
                return Some(s);
            }
        }
        None
    }

    /// Parked connections (for tests and metrics).
    pub fn parked(&self) -> usize {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Side-pool requests in progress (for tests and metrics).
    pub fn side_in_use(&self) -> usize {
        self.side_max - self.side.available_permits()
    }

    /// Sends `req` (URI in origin form, `Host` set) on the slot's connection, or on the shared pool when the slot is
    /// busy ([`Busy`] when that is full).
    pub async fn send(
        &self,
        slot: &ConnSlot,
        req: Request<RequestBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let Some((lease, idle)) = slot.lease() else {
            return self.send_pooled(req).await;
        };
        let (mut sender, reused) = match idle.or_else(|| self.unpark()) {
            Some(mut s) => match s.ready().await {
                Ok(()) => (s, true),
                Err(_) => (self.connect().await?, false),
            },
            None => (self.connect().await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            // A reused connection the upstream closed while idle, before the request was written: retry once on a
            // fresh one, as a pooled client would.
            Err(mut e) if reused => match e.take_message() {
                Some(req) => {
                    sender = self.connect().await?;
                    sender.send_request(req).await?
                }
                None => return Err(e.into_error().into()),
            },
            Err(e) => return Err(e.into_error().into()),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            lease.put_back(sender);
        }
        Ok(resp.map(|b| ResponseBody::new(b, None)))
    }

    async fn send_pooled(&self, mut req: Request<RequestBody>) -> Result<Response<ResponseBody>, UpstreamError> {
        let permit = self.side.clone().try_acquire_owned().map_err(|_| Busy(self.side_max))?;
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        *req.uri_mut() = format!("http://{}{pq}", self.addr).parse()?;
        let resp = self.pooled.request(req).await?;
        Ok(resp.map(|b| ResponseBody::new(b, Some(permit))))
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr.as_str()))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.addr))??;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}
