//! The client-facing listeners: PROXY protocol sniffing, then TLS (on a TLS listener), HTTP/1.1 + h2 (h2c on plain
//! listeners, ALPN `h2` on TLS), the decision, and forwarding.

use crate::config::Config;
use crate::decision::client_addr::client_addr;
use crate::decision::{CidrSet, Decision, Denial, PeerCert, Reason, RequestFacts, decide};
use crate::io::{Activity, ConnIo, InFlight};
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Parsed};
use crate::tables::TableStore;
use crate::upstream::{ConnSlot, Upstream};
use crate::workers::Workers;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("x-portcullis-client");

pub struct Shared {
    pub tables: Arc<TableStore>,
    pub metrics: Arc<Metrics>,
    pub upstream: Arc<Upstream>,
    pub upstream_authority: HeaderValue,
    pub key_header: HeaderName,
    pub trusted: CidrSet,
    pub proxy_protocol: bool,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub require_tls: bool,
}

impl Shared {
    pub fn new(config: &Config, tables: Arc<TableStore>, metrics: Arc<Metrics>) -> Result<Self, http::Error> {
        let authority: http::uri::Authority = config.upstream.parse().map_err(http::Error::from)?;
        let upstream_authority = HeaderValue::from_str(authority.as_str()).map_err(http::Error::from)?;
        let upstream = Arc::new(Upstream::new(authority.as_str()));
        Ok(Self {
            tables,
            metrics,
            upstream,
            upstream_authority,
            key_header: config.key_header.clone(),
            trusted: config.trusted_proxies.clone(),
            proxy_protocol: config.proxy_protocol,
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            require_tls: config.require_tls,
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
    let io = ConnIo::new(prefix, stream, activity.clone());
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
    let tls = alpn != Alpn::None;
    let svc_shared = shared.clone();
    let svc_activity = activity.clone();
    let slot = Arc::new(ConnSlot::new(shared.upstream.clone()));
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let guard = InFlight::new(svc_activity.clone());
        let cert = cert.clone();
        let slot = slot.clone();
        async move {
            let resp = handle(&shared, &slot, addr, tls, cert.as_deref(), req).await;
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

pub fn json_response(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn denial_response(d: &Denial) -> Response<Body> {
    let status = StatusCode::from_u16(d.reason.status()).expect("valid status");
    let mut r = json_response(status, d.reason.body());
    let h = r.headers_mut();
    if let Some(s) = d.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(rl) = &d.rate_limit {
        if let Ok(v) = HeaderValue::from_str(&rl.policy) {
            h.insert(HeaderName::from_static("ratelimit-policy"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&rl.state) {
            h.insert(HeaderName::from_static("ratelimit"), v);
        }
    }
    r
}

/// The key header's value when sent exactly once.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut it = headers.get_all(name).iter();
    match (it.next(), it.next()) {
        (Some(v), None) => Some(v.as_bytes()),
        _ => None,
    }
}

async fn handle(
    shared: &Shared,
    slot: &ConnSlot,
    conn_addr: IpAddr,
    tls: bool,
    cert: Option<&PeerCert>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    if shared.require_tls && !tls && req.headers().contains_key(&shared.key_header) {
        // The key has crossed the network in clear already; refusing keeps callers from relying on it working.
        shared.metrics.count(Some(Reason::TlsRequired), start.elapsed().as_secs_f64());
        return denial_response(&Reason::TlsRequired.into());
    }
    let verdict: Result<HeaderValue, Denial> = {
        let addr = client_addr(conn_addr, req.headers(), &shared.trusted);
        let facts = RequestFacts {
            addr,
            method: req.method().as_str(),
            path: req.uri().path(),
            key: single_header(req.headers(), &shared.key_header),
            cert,
            now: jiff::Timestamp::now(),
        };
        let table = shared.tables.current.load();
        let decision = match table.as_deref() {
            Some(t) => decide(Some(t), &facts),
            None => Decision::Deny(shared.tables.missing_reason().into()),
        };
        match decision {
            Decision::Allow { client, .. } => Ok(client.header.clone()),
            Decision::Deny(d) => {
                tracing::debug!(client_addr = %addr, reason = d.reason.code(), "denied");
                Err(d)
            }
        }
    };
    let client_header = match verdict {
        Ok(v) => v,
        Err(d) => {
            shared.metrics.count(Some(d.reason), start.elapsed().as_secs_f64());
            return denial_response(&d);
        }
    };

    // Only HTTP/1.1 has Upgrade; on h2 the header is connection-specific and simply stripped.
    let upgrade = req.version() == Version::HTTP_11 && is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(&shared.key_header);
    parts.headers.remove(&CLIENT_HEADER);
    parts.headers.insert(CLIENT_HEADER, client_header);
    if !parts.headers.contains_key(header::HOST) {
        let host = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        parts.headers.insert(header::HOST, host.unwrap_or_else(|| shared.upstream_authority.clone()));
    }
    // Origin form (`/path?query`) for the upstream, whatever form the client used.
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = match Uri::builder().path_and_query(pq).build() {
        Ok(u) => u,
        Err(_) => {
            return json_response(StatusCode::BAD_REQUEST, r#"{"error":"bad request target","reason":"bad_request"}"#);
        }
    };
    parts.version = Version::HTTP_11;

    let result = shared.upstream.send(slot, Request::from_parts(parts, body)).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            shared.metrics.count(Some(Reason::UpstreamUnavailable), start.elapsed().as_secs_f64());
            return denial_response(&Reason::UpstreamUnavailable.into());
        }
    };
    shared.metrics.count(None, start.elapsed().as_secs_f64());

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((c, u)) => {
                    let mut c = TokioIo::new(c);
                    let mut u = TokioIo::new(u);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, http_body_util::Empty::new().map_err(|never| match never {}).boxed());
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    resp.map(|b| b.boxed())
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, and `Proxy-*`. For an upgrade being passed through, `Upgrade` and
/// `Connection: upgrade` are kept.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade: Vec<HeaderValue> =
        if keep_upgrade { h.get_all(header::UPGRADE).iter().cloned().collect() } else { Vec::new() };
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [header::CONNECTION, header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE] {
        h.remove(n);
    }
    h.remove("keep-alive");
    let proxy: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for n in proxy {
        h.remove(n);
    }
    if !upgrade.is_empty() {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for v in upgrade {
            h.append(header::UPGRADE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut a = h.clone();
        strip_hop_by_hop(&mut a, false);
        assert_eq!(a.len(), 1);
        assert_eq!(a["x-kept"], "yes");
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 3);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
