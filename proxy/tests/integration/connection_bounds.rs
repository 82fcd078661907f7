//! Bounded connections (issue 12): connections that never finish their preface, h2 connections kept open only by
//! PINGs, the per-source cap, upgraded tunnels (counted, idle-closed, allow-listed), the side-pool cap, slow request
//! bodies and the admin listener cap. Real sockets on 127.0.0.x; timeouts are short, waits are on conditions.

use crate::common::*;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_proxy::{Config, Running};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

async fn proxy_to(up: SocketAddr, f: impl FnOnce(&mut Config)) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let mut c = config(up, &path);
    f(&mut c);
    let p = start(c).await;
    wait_until("table loaded", || p.tables.is_ready()).await;
    (p, dir)
}

async fn proxy(f: impl FnOnce(&mut Config)) -> (Running, tempfile::TempDir) {
    let (up, _) = upstream().await;
    proxy_to(up, f).await
}

async fn stop(p: Running) {
    p.shutdown();
    within("shutdown", p.wait()).await;
}

/// The value of a metric line (`name{labels}`) in the admin encoding, 0 when absent.
fn metric(p: &Running, line: &str) -> f64 {
    p.metrics.encode().lines().find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// Reads until the peer closes (EOF or reset), returning what was read and when it ended.
async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    within("the proxy closes the connection", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (out, Instant::now())
}

/// Reads an HTTP/1.1 response head (up to the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    within("response head", async {
        while !out.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
            out.push(b[0]);
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

// === HTTP/2 frames, by hand (the misbehaving clients) ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// What a preface-only client saw before the proxy closed its connection.
struct PingerEnd {
    goaway: bool,
    pings_answered: usize,
    lasted: Duration,
}

/// Sends the h2 preface and SETTINGS, then never opens a stream. With `answer`, acknowledges the server's SETTINGS
/// and PINGs and sends a PING of its own every 50 ms; without, sends nothing more. Until the proxy closes the
/// connection.
async fn preface_and_pings(mut s: TcpStream, answer: bool) -> PingerEnd {
    let start = Instant::now();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, &[])).await.unwrap();
    let (mut goaway, mut pings_answered) = (false, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        tokio::select! {
            _ = tick.tick(), if answer => {
                let _ = s.write_all(&frame(PING, 0, b"clientpg")).await;
            }
            r = s.read(&mut chunk) => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= 9 {
                    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, flags) = (buf[3], buf[4]);
                    let payload = buf[9..9 + len].to_vec();
                    buf.drain(..9 + len);
                    match kind {
                        SETTINGS if answer && flags & ACK == 0 => {
                            let _ = s.write_all(&frame(SETTINGS, ACK, &[])).await;
                        }
                        PING if answer && flags & ACK == 0 => {
                            pings_answered += 1;
                            let _ = s.write_all(&frame(PING, ACK, &payload)).await;
                        }
                        GOAWAY => goaway = true,
                        _ => {}
                    }
                }
            }
        }
    }
    PingerEnd { goaway, pings_answered, lasted: start.elapsed() }
}

// === 1. Protocol sniff / preface deadline ===

#[tokio::test]
async fn connections_that_never_finish_their_preface_are_closed_after_the_header_read_timeout() {
    let header_read = Duration::from_millis(300);
    let (p, _dir) = proxy(|c| {
        c.max_connections = 3;
        c.header_read_timeout = header_read;
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let opened = Instant::now();
    let mut silent = tcp_from(ip(1), p.addr).await;
    let mut pri = tcp_from(ip(1), p.addr).await;
    pri.write_all(b"PRI * HTTP/2.0").await.unwrap();
    let mut most = tcp_from(ip(1), p.addr).await;
    most.write_all(&PREFACE[..23]).await.unwrap();
    wait_until("three connections held", || p.metrics.open_connections.get() == 3).await;

    // The slots are full: a real client waits in the backlog until the deadline frees them.
    let r = get(ip(1), p.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for (name, s) in [("nothing", &mut silent), ("PRI * HTTP/2.0", &mut pri), ("23 of 24 bytes", &mut most)] {
        let (bytes, at) = read_until_closed(s).await;
        let after = at - opened;
        assert!(bytes.is_empty(), "{name}: nothing is answered, got {bytes:?}");
        assert!(after >= header_read - Duration::from_millis(50), "{name}: closed too early ({after:?})");
        assert!(after < Duration::from_secs(5), "{name}: closed after {after:?}");
    }
    assert!(metric(&p, "portcullis_proxy_connections_closed_total{reason=\"preface_timeout\"}") >= 3.0);
    stop(p).await;
}

#[tokio::test]
async fn a_first_head_must_be_complete_one_header_read_timeout_after_accept() {
    let header_read = Duration::from_secs(2);
    let (p, _dir) = proxy(|c| {
        c.header_read_timeout = header_read;
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let opened = Instant::now();
    let mut slow = tcp_from(ip(1), p.addr).await;
    // The first byte late (1.5 s), then a byte every 100 ms: the deadline is the accept's, not the first byte's
    // (hyper's own head timeout, started at the first byte, would have closed it 3.5 s after the accept).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let head = b"GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let (mut rd, mut wr) = slow.split();
    let dribble = async {
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::future::pending::<()>().await
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let closed_at = within("the proxy closes the dribbling connection", async {
        tokio::select! {
            _ = dribble => unreachable!(),
            _ = async { while let Ok(n) = rd.read(&mut buf).await { if n == 0 { break } got.extend_from_slice(&buf[..n]) } } => {}
        }
        Instant::now()
    })
    .await;
    let after = closed_at - opened;
    assert!(got.is_empty(), "nothing is answered, got {:?}", String::from_utf8_lossy(&got));
    assert!(after >= header_read - Duration::from_millis(50), "closed too early ({after:?})");
    assert!(
        after < Duration::from_millis(3200),
        "closed {after:?} after accept: the deadline did not count from accept"
    );
    assert_eq!(metric(&p, "portcullis_proxy_connections_closed_total{reason=\"head_timeout\"}"), 1.0);

    // A request line that is not HTTP (a TLS ClientHello on the plain port) is answered at once, not held.
    let mut tls_hello = tcp_from(ip(1), p.addr).await;
    let t = Instant::now();
    tls_hello.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").await.unwrap();
    let (bytes, at) = read_until_closed(&mut tls_hello).await;
    assert!(bytes.starts_with(b"HTTP/1.1 400"), "got {:?}", String::from_utf8_lossy(&bytes));
    assert!(at - t < header_read, "held for {:?}", at - t);
    // A complete head gets through as always.
    let r = get(ip(1), p.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    stop(p).await;
}

// === 2. h2 idle timeout counts streams, not PINGs (the reproduction) ===

#[tokio::test]
async fn preface_only_h2_connections_answering_pings_do_not_keep_clients_out() {
    let idle = Duration::from_millis(500);
    let (p, _dir) = proxy(|c| {
        c.max_connections = 3;
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = idle;
    })
    .await;
    let mut pingers = tokio::task::JoinSet::new();
    // Two answer every PING (and send their own); one says nothing after its preface, not even to the GOAWAY.
    for answer in [true, true, false] {
        let s = tcp_from(ip(1), p.addr).await;
        pingers.spawn(preface_and_pings(s, answer));
    }
    wait_until("three h2 connections held", || p.metrics.open_connections.get() == 3).await;
    let t = Instant::now();
    let r = get(ip(1), p.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(5), "a real client waited {:?}", t.elapsed());
    let ends = within("pingers closed", pingers.join_all()).await;
    assert!(ends.iter().any(|e| e.pings_answered > 0), "the server's PINGs were answered");
    for end in ends {
        assert!(end.goaway, "closed with a GOAWAY");
        assert!(end.lasted >= idle - Duration::from_millis(50), "closed before the idle timeout: {:?}", end.lasted);
        assert!(end.lasted < Duration::from_secs(5), "kept open {:?} by PINGs", end.lasted);
    }
    assert!(metric(&p, "portcullis_proxy_connections_closed_total{reason=\"idle\"}") >= 3.0);
    stop(p).await;
}

/// An upstream whose responses wait for `release`, counting the requests that reached it.
async fn gated_upstream() -> (SocketAddr, Arc<AtomicUsize>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let a = arrived.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (a, released) = (a.clone(), released.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    a.fetch_add(1, Ordering::SeqCst);
                    let mut released = released.clone();
                    async move {
                        let _ = released.wait_for(|r| *r).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"released"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, arrived, release)
}

async fn h2_connect(src: std::net::IpAddr, to: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tcp_from(src, to).await;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    send
}

fn h2_get(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(format!("http://svc.test{path}"))
        .header("x-api-key", "k-reader")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn an_open_h2_stream_keeps_its_connection_past_the_idle_timeout() {
    let (up, arrived, release) = gated_upstream().await;
    let idle = Duration::from_millis(300);
    let (p, _dir) = proxy_to(up, |c| c.idle_timeout = idle).await;
    let mut send = h2_connect(ip(1), p.addr).await;
    let pending = tokio::spawn({
        let mut send = send.clone();
        async move { send.send_request(h2_get("/v1/slow")).await }
    });
    wait_until("request at the upstream", || arrived.load(Ordering::SeqCst) == 1).await;
    // Three idle timeouts with the stream open: the connection stays.
    let t = Instant::now();
    wait_until("three idle timeouts", || t.elapsed() >= idle * 3).await;
    release.send(true).unwrap();
    let resp = within("slow response", pending).await.unwrap().expect("the stream survived");
    assert_eq!(resp.status(), 200);
    // The same connection still takes a request, then goes idle and is closed.
    within("ready", send.ready()).await.unwrap();
    assert_eq!(within("second", send.send_request(h2_get("/v1/x"))).await.unwrap().status(), 200);
    wait_until("idle h2 connection closed", || send.is_closed()).await;
    stop(p).await;
}

// === 3. Per-source cap ===

#[tokio::test]
async fn one_source_cannot_hold_more_than_its_share() {
    let (p, _dir) = proxy(|c| c.max_connections_per_source = 2).await;
    let mut a = Conn::open(ip(1), p.addr).await;
    let mut b = Conn::open(ip(1), p.addr).await;
    assert_eq!(a.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await.status, 200);
    assert_eq!(b.send("GET", "/v1/b", &[("x-api-key", "k-reader")]).await.status, 200);
    // A third from the same source is closed without an answer.
    let r = raw(ip(1), p.addr, b"GET /v1/c HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\n\r\n").await;
    assert!(r.is_empty(), "{}", String::from_utf8_lossy(&r));
    assert_eq!(metric(&p, "portcullis_proxy_connections_closed_total{reason=\"source_limit\"}"), 1.0);
    // Another source is not affected.
    assert_eq!(get(ip(2), p.addr, "/x", &[("x-api-key", "k-other")]).await.status, 200);
    // A closed connection gives its slot back.
    drop(a);
    wait_until("first connection gone", || p.metrics.open_connections.get() == 1).await;
    assert_eq!(b.send("GET", "/v1/b", &[("x-api-key", "k-reader")]).await.status, 200);
    assert_eq!(get(ip(1), p.addr, "/v1/d", &[("x-api-key", "k-reader")]).await.status, 200);
    stop(p).await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_proxy_protocol_source_is_counted() {
    let (p, _dir) = proxy(|c| {
        c.max_connections_per_source = 1;
        c.proxy_protocol = true;
        c.trusted_proxies = portcullis_proxy::decision::CidrSet::parse_list("127.0.0.1/32").unwrap();
    })
    .await;
    let addr = p.addr;
    let via_lb = |src: &'static str| async move {
        let mut s = tcp_from(ip(1), addr).await;
        s.write_all(format!("PROXY TCP4 {src} 127.0.0.1 40000 8443\r\n").as_bytes()).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        Conn(send)
    };
    // The load balancer's own address is not capped: two clients behind it, one connection each.
    let mut first = via_lb("203.0.113.7").await;
    assert_eq!(first.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await.status, 200);
    let mut other = via_lb("203.0.113.8").await;
    assert_eq!(other.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await.status, 403, "served (wrong source)");
    // A second connection for 203.0.113.7 is closed.
    let mut s = tcp_from(ip(1), p.addr).await;
    s.write_all(
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 8443\r\nGET /v1/b HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\n\r\n",
    )
    .await
    .unwrap();
    let (bytes, _) = read_until_closed(&mut s).await;
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(metric(&p, "portcullis_proxy_connections_closed_total{reason=\"source_limit\"}"), 1.0);
    stop(p).await;
}

// === 4. Upgraded tunnels ===

const WS_REQUEST: &[u8] =
    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
/// The same, refused: the proxy's answer closes the connection (hyper sees `Connection: close` from the client).
const WS_REQUEST_CLOSE: &[u8] = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n";

#[tokio::test]
async fn a_tunnel_holds_a_connection_slot_and_is_closed_when_idle() {
    // Generous, so that the negative check below cannot outlast it on a loaded machine.
    let tunnel_idle = Duration::from_millis(1500);
    let (p, _dir) = proxy(|c| {
        c.max_connections = 1;
        c.tunnel_idle_timeout = tunnel_idle;
        c.idle_timeout = Duration::from_millis(100);
    })
    .await;
    let mut ws = tcp_from(ip(1), p.addr).await;
    ws.write_all(WS_REQUEST).await.unwrap();
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_until("tunnel open", || p.metrics.open_tunnels.get() == 1).await;

    // Traffic keeps it open well past both idle timeouts.
    let t = Instant::now();
    let mut buf = [0u8; 4];
    while t.elapsed() < tunnel_idle + Duration::from_millis(300) {
        ws.write_all(b"ping").await.unwrap();
        within("echo", ws.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"ping");
        tokio::time::sleep(Duration::from_millis(100)).await; // pacing the traffic, not synchronisation
    }
    let quiet = Instant::now();
    assert_eq!(p.metrics.open_connections.get(), 1, "the tunnel is still counted");

    // The tunnel holds the only connection slot: another client waits.
    let second = tokio::spawn({
        let addr = p.addr;
        async move { get(ip(1), addr, "/v1/b", &[("x-api-key", "k-reader")]).await.status }
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // negative check: give it a chance to (wrongly) finish
    assert!(!second.is_finished(), "served while the tunnel held the only slot");
    // Then, with no byte either way, it is closed after the tunnel idle timeout, and the slot goes to the waiter.
    let (_, closed) = read_until_closed(&mut ws).await;
    let after = closed - quiet;
    assert!(after >= tunnel_idle - Duration::from_millis(120), "closed too early: {after:?}");
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    assert_eq!(within("second served", second).await.unwrap(), 200);
    assert_eq!(metric(&p, "portcullis_proxy_connections_closed_total{reason=\"tunnel_idle\"}"), 1.0);
    wait_until("tunnel gauge back to 0", || p.metrics.open_tunnels.get() == 0).await;
    stop(p).await;
}

#[tokio::test]
async fn only_allow_listed_upgrades_reach_the_application() {
    let (up, seen) = upstream().await;
    let (p, _dir) = proxy_to(up, |_| {}).await;
    let refused = raw(
        ip(1),
        p.addr,
        b"GET /v1/x HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nConnection: upgrade, close\r\nUpgrade: x-tunnel\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&refused);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"reason\":\"upgrade_not_allowed\""), "{text}");
    assert_eq!(seen.count(), 0, "the application never saw it");
    // websocket next to h2c: refused as a whole.
    let mixed = raw(
        ip(1),
        p.addr,
        b"GET /v1/x HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nConnection: upgrade, close\r\nUpgrade: websocket, h2c\r\n\r\n",
    )
    .await;
    assert!(String::from_utf8_lossy(&mixed).starts_with("HTTP/1.1 400"));
    // The decision comes first: without a key, 401 whatever the upgrade.
    let r = get(ip(1), p.addr, "/v1/x", &[("connection", "upgrade"), ("upgrade", "x-tunnel")]).await;
    assert_eq!(r.status, 401);

    // h2c alone is ignored: served as the plain HTTP/1.1 request it also is (the test upstream would answer 101 to
    // anything carrying Upgrade).
    let r = get(
        ip(1),
        p.addr,
        "/v1/h2c",
        &[
            ("x-api-key", "k-reader"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "upstream saw GET /v1/h2c");
    let h = seen.last();
    assert!(!h.contains_key("upgrade") && !h.contains_key("http2-settings"), "{h:?}");
    assert_eq!(seen.count(), 1);
    stop(p).await;
}

#[tokio::test]
async fn with_no_upgrade_protocols_websocket_is_refused_too() {
    let (p, _dir) = proxy(|c| c.upgrade_protocols = portcullis_proxy::tunnel::UpgradeProtocols::none()).await;
    let r = raw(ip(1), p.addr, WS_REQUEST_CLOSE).await;
    assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&r));
    stop(p).await;
}

// === 5. Side-pool cap ===

#[tokio::test]
async fn streams_beyond_the_side_pool_cap_get_503_upstream_busy() {
    let (up, arrived, release) = gated_upstream().await;
    let (p, _dir) = proxy_to(up, |c| c.max_side_pool_requests = 1).await;
    let send = h2_connect(ip(1), p.addr).await;
    let spawn_get = |path: &'static str| {
        let mut send = send.clone();
        tokio::spawn(async move {
            let resp = send.send_request(h2_get(path)).await.unwrap();
            let status = resp.status();
            let retry = resp.headers().get("retry-after").cloned();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, retry, String::from_utf8_lossy(&body).into_owned())
        })
    };
    // The connection's own upstream connection, then the one side-pool slot.
    let first = spawn_get("/v1/1");
    wait_until("first at the upstream", || arrived.load(Ordering::SeqCst) == 1).await;
    let second = spawn_get("/v1/2");
    wait_until("second at the upstream", || arrived.load(Ordering::SeqCst) == 2).await;
    // A third concurrent stream: answered at once, without reaching the application.
    let (status, retry, body) = within("third", spawn_get("/v1/3")).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"reason\":\"upstream_busy\""), "{body}");
    assert_eq!(retry.as_ref().map(|v| v.to_str().unwrap()), Some("1"));
    assert_eq!(arrived.load(Ordering::SeqCst), 2);
    release.send(true).unwrap();
    assert_eq!(within("first", first).await.unwrap().0, 200);
    assert_eq!(within("second", second).await.unwrap().0, 200);
    // The permit is back once the response has been sent.
    let a = spawn_get("/v1/4");
    let b = spawn_get("/v1/5");
    assert_eq!(within("a", a).await.unwrap().0, 200);
    assert_eq!(within("b", b).await.unwrap().0, 200);
    stop(p).await;
}

// === 6. Request-body progress timeout ===

/// An upstream reading each request body to its end, reporting its length or the error that ended it.
async fn body_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Result<usize, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let r = req.into_body().collect().await.map(|b| b.to_bytes().len()).map_err(|e| e.to_string());
                        let ok = r.is_ok();
                        let _ = tx.send(r);
                        if ok {
                            Ok(Response::new(Full::new(Bytes::from_static(b"got it"))))
                        } else {
                            Err("body failed")
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, rx)
}

const UPLOAD_HEAD: &[u8] = b"POST /v1/up HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nContent-Length: 100000\r\n\r\n";

#[tokio::test]
async fn a_stalled_request_body_is_aborted_on_both_sides() {
    let (up, mut bodies) = body_upstream().await;
    let limit = Duration::from_millis(300);
    let (p, _dir) = proxy_to(up, |c| c.body_read_timeout = limit).await;
    let mut s = tcp_from(ip(1), p.addr).await;
    s.write_all(UPLOAD_HEAD).await.unwrap();
    s.write_all(&[b'x'; 10]).await.unwrap();
    let t = Instant::now();
    let (bytes, at) = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"reason\":\"body_timeout\""), "{text}");
    let after = at - t;
    assert!(after >= limit - Duration::from_millis(50), "aborted too early: {after:?}");
    // The application saw its request end (not left waiting for 99 990 more bytes).
    let seen = within("the application's body read ends", bodies.recv()).await.unwrap();
    assert!(seen.is_err(), "{seen:?}");
    assert!(metric(&p, "portcullis_proxy_requests_total{decision=\"deny\",reason=\"body_timeout\"}") >= 1.0);
    stop(p).await;
}

#[tokio::test]
async fn a_body_trickling_in_below_the_floor_is_aborted_a_steady_one_is_not() {
    let (up, mut bodies) = body_upstream().await;
    let limit = Duration::from_millis(600);
    let (p, _dir) = proxy_to(up, |c| c.body_read_timeout = limit).await;

    // One byte every 40 ms: never a 600 ms gap, but far below 1 KiB per 600 ms.
    let s = tcp_from(ip(1), p.addr).await;
    let (mut r, mut w) = s.into_split();
    w.write_all(UPLOAD_HEAD).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..500 {
            if w.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await; // the client's pace, not synchronisation
        }
    });
    let mut out = Vec::new();
    let _ = within("trickle answered", r.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    trickle.abort();
    assert!(within("app side ends", bodies.recv()).await.unwrap().is_err());

    // 4 KiB every 150 ms for 1.2 s: slower than the whole body's timeout, but steady: delivered.
    let s = tcp_from(ip(1), p.addr).await;
    let (mut r, mut w) = s.into_split();
    w.write_all(b"POST /v1/up HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nContent-Length: 32768\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..8 {
        w.write_all(&[b'y'; 4096]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await; // the client's pace
    }
    let head = {
        let mut buf = vec![0u8; 1024];
        let n = within("steady answered", r.read(&mut buf)).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(within("app side", bodies.recv()).await.unwrap(), Ok(32768));
    stop(p).await;
}

#[tokio::test]
async fn a_stalled_h2_request_body_gets_408() {
    let (up, mut bodies) = body_upstream().await;
    let (p, _dir) = proxy_to(up, |c| c.body_read_timeout = Duration::from_millis(300)).await;
    let stream = tcp_from(ip(1), p.addr).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake::<_, _, StreamBody<_>>(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tx.try_send(Ok(Frame::data(Bytes::from_static(b"first bytes")))).unwrap();
    let req = Request::builder()
        .method("POST")
        .uri("http://svc.test/v1/up")
        .header("x-api-key", "k-reader")
        .body(StreamBody::new(rx))
        .unwrap();
    let resp = within("h2 response", send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 408);
    assert!(within("app side ends", bodies.recv()).await.unwrap().is_err());
    drop(tx);
    stop(p).await;
}

// === 7. Admin listener cap ===

#[tokio::test]
async fn the_admin_listener_serves_a_bounded_number_of_connections() {
    let (p, _dir) = proxy(|c| c.admin_max_connections = 2).await;
    let admin = p.admin_addr.unwrap();
    let held1 = tcp_from(ip(1), admin).await;
    let held2 = tcp_from(ip(1), admin).await;
    let third = tokio::spawn(async move {
        raw(ip(1), admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // negative check: give it a chance to (wrongly) finish
    assert!(!third.is_finished(), "a third admin connection was served while two were open");
    drop(held1);
    let r = within("third served", third).await.unwrap();
    assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&r));
    drop(held2);
    stop(p).await;
}
