//! The client-facing listeners and each connection's lifecycle: the per-source cap, PROXY protocol sniffing, TLS (on
//! a TLS listener), the protocol sniff (HTTP/1.1, or h2 by its preface: h2c on plain listeners, ALPN `h2` on TLS),
//! serving, the idle timeout, an upgraded tunnel, graceful shutdown. Each request is handed to [`crate::handle`].
//!
//! Bounds, per connection:
//! - from accept, `--header-read-timeout` to get through the PROXY header, the TLS handshake and the first bytes
//!   that tell the protocol (one byte of an HTTP/1.1 request, the 24-byte HTTP/2 preface); then, for HTTP/1.1,
//!   hyper's header read timeout for each request head (and the wait for the next one);
//! - no request in progress (HTTP/2: no open stream) for `--idle-timeout`: graceful close (HTTP/2: GOAWAY); a peer
//!   that does not complete the close (an h2 client not acknowledging the GOAWAY's PING) is dropped
//!   `--header-read-timeout` later, if still idle;
//! - an upgraded tunnel runs in the connection's task (so it keeps its `--max-connections` slot and its per-source
//!   count) until a side closes, `--tunnel-idle-timeout` passes with no byte either way, or shutdown begins.

use crate::access_log::AccessLog;
use crate::body::Counted;
use crate::config::Config;
use crate::decision::{CidrSet, PeerCert};
use crate::handle::{ConnFacts, Handler};
use crate::io::{self, Activity, ConnIo, HasSocket, InFlight, Protocol, Rehome, Sniffed};
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Parsed};
use crate::source_limit::{SourceLimit, SourceSlot};
use crate::tables::TableStore;
use crate::tunnel;
use crate::upstream::{ConnSlot, Upstream};
use crate::workers::Workers;
use bytes::{Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

pub struct Shared {
    /// The request path: decision, rewrite, forwarding.
    pub handler: Handler,
    pub metrics: Arc<Metrics>,
    pub upstream: Arc<Upstream>,
    /// Peers whose PROXY headers are believed.
    pub trusted: CidrSet,
    pub proxy_protocol: bool,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    /// `--max-connections-per-source`.
    pub sources: Arc<SourceLimit>,
}

impl Shared {
    pub fn new(
        config: &Config,
        tables: Arc<TableStore>,
        metrics: Arc<Metrics>,
        access_log: Option<Arc<AccessLog>>,
    ) -> Result<Self, http::Error> {
        let authority: http::uri::Authority = config.upstream.parse().map_err(http::Error::from)?;
        let upstream = Arc::new(Upstream::new(authority.as_str(), config.max_side_pool_requests));
        let handler = Handler::new(config, tables, metrics.clone(), upstream.clone(), access_log)?;
        Ok(Self {
            handler,
            metrics,
            upstream,
            trusted: config.trusted_proxies.clone(),
            proxy_protocol: config.proxy_protocol,
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            tunnel_idle_timeout: config.tunnel_idle_timeout,
            sources: SourceLimit::new(config.max_connections_per_source),
        })
    }
}

/// Decrements a gauge when dropped (also when the task holding it is aborted).
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn inc(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts connections until `stop` flips, then lets connections finish (graceful shutdown of each) for up to
/// `grace` and aborts what is left.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    max_connections: usize,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let deadline = Instant::now() + shared.header_read_timeout;
        let Some(source) = count_peer(&shared, peer) else {
            continue; // dropping the stream closes it, and the permit goes back
        };
        let _ = stream.set_nodelay(true);
        // The socket moves to the worker's I/O driver: deregistered here, registered there.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "handing a connection to a worker failed");
                continue;
            }
        };
        let shared = shared.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        let worker = workers.pick();
        let serve_on = worker.serve.clone();
        conns.spawn_on(
            async move {
                let _open = GaugeGuard::inc(&shared.metrics.open_connections);
                match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        let conn = Conn { peer, deadline, tls, serve_on, shared: shared.clone(), stop };
                        serve_connection(Rehome::new(stream), source, conn).await
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "registering a connection on a worker failed"),
                }
                drop(permit);
            },
            worker.probation,
        );
    }
    drop(listener);
    tracing::info!(connections = conns.len(), "listener closed; draining connections");
    let drained = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(connections = conns.len(), "shutdown grace period over; closing remaining connections");
        conns.abort_all();
    }
}

/// The per-source count for a new connection: by the TCP peer, except for a `--trusted-proxies` peer, which
/// carries many clients (with `--proxy-protocol` its connections are counted by the PROXY source instead, in
/// [`serve_connection`]). `None`: over the cap, refused.
fn count_peer(shared: &Shared, peer: SocketAddr) -> Option<SourceSlot> {
    if !shared.sources.enabled() {
        return Some(SourceSlot::uncounted());
    }
    let ip = peer.ip().to_canonical();
    if shared.trusted.contains(ip) {
        return Some(SourceSlot::uncounted());
    }
    count_source(shared, ip, peer)
}

fn count_source(shared: &Shared, ip: IpAddr, peer: SocketAddr) -> Option<SourceSlot> {
    match shared.sources.acquire(ip) {
        Ok(s) => Some(s),
        Err(e) => {
            shared.metrics.connection_closed("source_limit");
            tracing::debug!(%peer, error = %e, "connection refused");
            None
        }
    }
}

/// Reads just enough of the stream to tell a PROXY header from anything else.
async fn sniff_proxy_header(stream: &mut Rehome) -> std::io::Result<(Parsed, BytesMut)> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match proxy_protocol::parse(&buf) {
            Ok(Parsed::Incomplete) => {}
            Ok(p) => return Ok((p, buf)),
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok((Parsed::NotProxy, buf));
        }
    }
}

/// A new connection, on its probation thread ([`crate::workers`]).
struct Conn {
    peer: SocketAddr,
    /// Accept + `--header-read-timeout`: for everything up to the end of the first request head.
    deadline: Instant,
    tls: Option<TlsAcceptor>,
    /// The worker that serves the connection once its first request head is in.
    serve_on: Handle,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

/// Runs on the connection's probation thread: the PROXY header, the TLS handshake and the first request head, all
/// before `conn.deadline`; then moves the connection to its worker and serves it there. `source` is held for the
/// connection's life (tunnel included).
async fn serve_connection(mut stream: Rehome, mut source: SourceSlot, conn: Conn) {
    let Conn { peer, deadline, tls, serve_on, shared, stop } = conn;
    let peer_ip = peer.ip().to_canonical();
    let mut addr = peer_ip;
    let mut prefix = Bytes::new();
    if shared.proxy_protocol {
        match tokio::time::timeout_at(deadline, sniff_proxy_header(&mut stream)).await {
            Ok(Ok((Parsed::Header(h), mut buf))) => {
                if !shared.trusted.contains(peer_ip) {
                    shared.metrics.proxy_protocol_refused.inc();
                    tracing::warn!(%peer, "PROXY header from an untrusted peer; connection refused");
                    return;
                }
                if let Some(src) = h.source {
                    addr = src.ip().to_canonical();
                    if shared.sources.enabled() {
                        match count_source(&shared, addr, peer) {
                            Some(s) => source = s,
                            None => return,
                        }
                    }
                }
                prefix = buf.split_off(h.len).freeze();
            }
            Ok(Ok((_, buf))) => prefix = buf.freeze(),
            Ok(Err(e)) => {
                shared.metrics.proxy_protocol_refused.inc();
                tracing::warn!(%peer, error = %e, "malformed PROXY header; connection refused");
                return;
            }
            Err(_) => {
                shared.metrics.connection_closed("preface_timeout");
                tracing::debug!(%peer, "no PROXY header or request in time; closed");
                return;
            }
        }
    }
    // The bytes read past a PROXY header (the start of a ClientHello, or of an HTTP request) are replayed first.
    let io = ConnIo::new(prefix, stream);
    let conn = Served { peer, addr, source, shared, stop };
    let Some(acceptor) = tls else {
        let Some((protocol, io)) = first_request(io, deadline, &conn.shared, peer).await else { return };
        return hand_off(io, protocol, false, None, &serve_on, conn).await;
    };
    let shared = &conn.shared;
    let tls_stream = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
        Ok(Ok(s)) => {
            shared.metrics.tls_handshake("ok");
            s
        }
        Ok(Err(e)) => {
            shared.metrics.tls_handshake("error");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.tls_handshake("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // The leaf was verified against --client-ca by rustls; its identities are parsed once, for every request.
    let cert = tls_stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|der| {
        match PeerCert::from_der(der) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "client certificate does not parse; treated as absent");
                None
            }
        }
    });
    let Some((protocol, io)) = first_request(tls_stream, deadline, shared, peer).await else { return };
    hand_off(io, protocol, true, cert, &serve_on, conn).await;
}

/// What a connection keeps for serving: its addresses, its per-source slot, and the server's state.
struct Served {
    peer: SocketAddr,
    /// The client address the decision uses (the PROXY header's source, or the peer).
    addr: IpAddr,
    source: SourceSlot,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

/// Waits, until `deadline`, for the first bytes to tell HTTP/1.1 from HTTP/2 and, for HTTP/1.1, for the rest of the
/// first request head; `None` (close) when they do not come in time or the peer closes first. Everything read is
/// replayed to the HTTP server (hyper-util's auto builder reads the first bytes again to pick the protocol, without
/// a deadline of its own); ALPN is not enforced against them.
async fn first_request<S: AsyncRead + Unpin>(
    io: S,
    deadline: Instant,
    shared: &Shared,
    peer: SocketAddr,
) -> Option<(Protocol, ConnIo<Sniffed<S>>)> {
    let (protocol, mut io) = match tokio::time::timeout_at(deadline, io::sniff(io)).await {
        Ok(Ok(sniffed)) => sniffed,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended before its first request");
            return None;
        }
        Err(_) => {
            shared.metrics.connection_closed("preface_timeout");
            tracing::debug!(%peer, "no request or HTTP/2 preface in time; closed");
            return None;
        }
    };
    if protocol == Protocol::Http2 {
        return Some((protocol, ConnIo::new(Bytes::new(), io)));
    }
    match tokio::time::timeout_at(deadline, io::read_head(&mut io, shared.max_header_bytes)).await {
        Ok(Ok(head)) => Some((protocol, ConnIo::new(head, io))),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended before its first request head");
            None
        }
        Err(_) => {
            shared.metrics.connection_closed("head_timeout");
            tracing::debug!(%peer, "first request head not complete in time; closed");
            None
        }
    }
}

/// Moves the connection's socket from this (probation) thread to its worker and serves it there; returns when the
/// connection ends. Dropping this future (shutdown's abort) aborts the serving task too.
async fn hand_off<S>(mut io: S, protocol: Protocol, tls: bool, cert: Option<Arc<PeerCert>>, to: &Handle, c: Served)
where
    S: HasSocket + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = c.peer;
    if let Err(e) = io.socket().detach() {
        tracing::warn!(%peer, error = %e, "moving a connection to its worker failed");
        return;
    }
    let task = to.spawn(async move {
        if let Err(e) = io.socket().attach() {
            tracing::warn!(%peer, error = %e, "registering a connection on its worker failed");
            return;
        }
        let _source = c.source;
        serve_http(io, c.peer, c.addr, protocol, tls, cert, c.shared, c.stop).await;
    });
    let _abort = AbortOnDrop(task.abort_handle());
    let _ = task.await;
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<S>(
    io: S,
    peer: SocketAddr,
    addr: IpAddr,
    protocol: Protocol,
    tls: bool,
    cert: Option<Arc<PeerCert>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let facts = Arc::new(ConnFacts::new(addr, tls, cert));
    let activity = Arc::new(Activity::default());
    let svc_shared = shared.clone();
    let svc_activity = activity.clone();
    let slot = Arc::new(ConnSlot::new(shared.upstream.clone()));
    let svc_slot = slot.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        // In progress from here until its response body has been sent.
        let in_flight = InFlight::new(svc_activity.clone());
        let facts = facts.clone();
        let slot = svc_slot.clone();
        async move {
            let resp = shared.handler.handle(&slot, &facts, req).await;
            Ok::<_, Infallible>(resp.map(|body| Counted::new(body, in_flight)))
        }
    });
    tracing::trace!(%peer, ?protocol, "serving");
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.header_read_timeout)
        .max_buf_size(shared.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(shared.max_header_bytes.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut idle_check = tokio::time::interval((shared.idle_timeout / 4).max(Duration::from_millis(10)));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = *stop.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    // Set when the connection is being closed for being idle.
    let mut idle_close_at: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle_check.tick() => {
                if !closing && activity.idle_for(shared.idle_timeout) {
                    closing = true;
                    idle_close_at = Some(Instant::now());
                    shared.metrics.connection_closed("idle");
                    conn.as_mut().graceful_shutdown();
                } else if let Some(at) = idle_close_at
                    && at.elapsed() >= shared.header_read_timeout
                    && activity.in_flight() == 0
                {
                    tracing::debug!(%peer, "idle connection did not finish closing; dropped");
                    return;
                }
            }
        }
    }
    if let Some((client, upstream)) = slot.take_tunnel() {
        let _open = GaugeGuard::inc(&shared.metrics.open_tunnels);
        match tunnel::run(client, upstream, shared.tunnel_idle_timeout, stop).await {
            tunnel::End::Idle => {
                shared.metrics.connection_closed("tunnel_idle");
                tracing::debug!(%peer, "tunnel idle; closed");
            }
            tunnel::End::Shutdown => tracing::debug!(%peer, "tunnel closed for shutdown"),
            tunnel::End::Closed(Ok((up, down))) => tracing::debug!(%peer, up, down, "tunnel closed"),
            tunnel::End::Closed(Err(e)) => tracing::debug!(%peer, error = %e, "tunnel ended with an error"),
            tunnel::End::Failed(e) => tracing::debug!(%peer, error = %e, "upgrade did not complete"),
        }
    }
}
