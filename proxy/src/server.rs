//! The client-facing listeners and each connection's lifecycle: PROXY protocol sniffing, then TLS (on a TLS
//! listener), HTTP/1.1 + h2 (h2c on plain listeners, ALPN `h2` on TLS), idle timeout and graceful shutdown. Each
//! request is handed to [`crate::handle`].

use crate::config::Config;
use crate::decision::{CidrSet, PeerCert};
use crate::handle::{ConnFacts, Handler};
use crate::io::{Activity, ConnIo, InFlight};
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Parsed};
use crate::tables::TableStore;
use crate::upstream::{ConnSlot, Upstream};
use crate::workers::Workers;
use bytes::{Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
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
}

impl Shared {
    pub fn new(config: &Config, tables: Arc<TableStore>, metrics: Arc<Metrics>) -> Result<Self, http::Error> {
        let authority: http::uri::Authority = config.upstream.parse().map_err(http::Error::from)?;
        let upstream = Arc::new(Upstream::new(authority.as_str(), config.max_side_pool_requests));
        let handler = Handler::new(config, tables, metrics.clone(), upstream.clone())?;
        Ok(Self {
            handler,
            metrics,
            upstream,
            trusted: config.trusted_proxies.clone(),
            proxy_protocol: config.proxy_protocol,
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        })
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
        conns.spawn_on(
            async move {
                shared.metrics.open_connections.inc();
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve_connection(stream, peer, tls, shared.clone(), stop).await,
                    Err(e) => tracing::warn!(%peer, error = %e, "registering a connection on a worker failed"),
                }
                shared.metrics.open_connections.dec();
                drop(permit);
            },
            workers.pick(),
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

/// Reads just enough of the stream to tell a PROXY header from anything else.
async fn sniff_proxy_header(stream: &mut TcpStream) -> std::io::Result<(Parsed, BytesMut)> {
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

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let peer_ip = peer.ip().to_canonical();
    let mut addr = peer_ip;
    let mut prefix = Bytes::new();
    if shared.proxy_protocol {
        match tokio::time::timeout(shared.header_read_timeout, sniff_proxy_header(&mut stream)).await {
            Ok(Ok((Parsed::Header(h), mut buf))) => {
                if !shared.trusted.contains(peer_ip) {
                    shared.metrics.proxy_protocol_refused.inc();
                    tracing::warn!(%peer, "PROXY header from an untrusted peer; connection refused");
                    return;
                }
                if let Some(src) = h.source {
                    addr = src.ip().to_canonical();
                }
                prefix = buf.split_off(h.len).freeze();
            }
            Ok(Ok((_, buf))) => prefix = buf.freeze(),
            Ok(Err(e)) => {
                shared.metrics.proxy_protocol_refused.inc();
                tracing::warn!(%peer, error = %e, "malformed PROXY header; connection refused");
                return;
            }
            Err(_) => return,
        }
    }
    let activity = Arc::new(Activity::default());
    // The bytes read past a PROXY header (the start of a ClientHello, or of an HTTP request) are replayed first.
    let io = ConnIo::new(prefix, stream);
    let Some(acceptor) = tls else {
        return serve_http(TokioIo::new(io), peer, addr, Alpn::None, None, activity, shared, stop).await;
    };
    let tls_stream = match tokio::time::timeout(shared.header_read_timeout, acceptor.accept(io)).await {
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
    let alpn = match tls_stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Alpn::H2,
        Some(b"http/1.1") => Alpn::Http1,
        _ => Alpn::Tls,
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
    serve_http(TokioIo::new(tls_stream), peer, addr, alpn, cert, activity, shared, stop).await;
}

/// What the transport says about the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpn {
    /// Plain TCP: HTTP/1.1 or h2c prior knowledge, told apart by the preface.
    None,
    /// TLS without ALPN: either, told apart by the preface.
    Tls,
    Http1,
    H2,
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    addr: IpAddr,
    alpn: Alpn,
    cert: Option<Arc<PeerCert>>,
    activity: Arc<Activity>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let facts = Arc::new(ConnFacts { addr, tls: alpn != Alpn::None, cert });
    let svc_shared = shared.clone();
    let svc_activity = activity.clone();
    let slot = Arc::new(ConnSlot::new(shared.upstream.clone()));
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let guard = InFlight::new(svc_activity.clone());
        let facts = facts.clone();
        let slot = slot.clone();
        async move {
            let resp = shared.handler.handle(&slot, &facts, req).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder = match alpn {
        Alpn::H2 => builder.http2_only(),
        Alpn::Http1 => builder.http1_only(),
        Alpn::None | Alpn::Tls => builder,
    };
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
    let conn = builder.serve_connection_with_upgrades(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut idle_check = tokio::time::interval((shared.idle_timeout / 4).max(Duration::from_millis(10)));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = *stop.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle_check.tick(), if !closing => {
                if activity.idle_for(shared.idle_timeout) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
