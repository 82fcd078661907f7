//! End-to-end decisions through real sockets: each outcome's status, headers and body, and what the upstream sees.

use crate::common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn every_decision_end_to_end() {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let proxy = start(config(up, &path)).await;
    let a = proxy.addr;

    // Allowed: forwarded, key stripped, identity added, spoofed identity replaced, hop-by-hop headers removed.
    let r = get(
        ip(1),
        a,
        "/v1/orders?x=1",
        &[("x-api-key", "k-reader"), ("x-portcullis-client", "evil/spoof"), ("x-custom", "kept")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "upstream saw GET /v1/orders");
    assert!(!r.headers.contains_key("x-hop"), "headers named by Connection are hop-by-hop");
    assert!(!r.headers.contains_key("connection"));
    let h = seen.last();
    assert!(!h.contains_key("x-api-key"), "upstream must never see the key");
    assert_eq!(h.get_all("x-portcullis-client").iter().collect::<Vec<_>>(), vec!["t/reader"]);
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["host"], "svc.test");

    let deny = |r: &Reply, status: u16, reason: &str| {
        assert_eq!(r.status.as_u16(), status, "{}", r.body);
        assert_eq!(r.reason(), reason);
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(!r.body.contains("k-"), "the body never echoes a key: {}", r.body);
    };
    let before = seen.count();

    // No key / unknown key: 401, byte-identical bodies.
    let none = get(ip(1), a, "/v1/x", &[]).await;
    let unknown = get(ip(1), a, "/v1/x", &[("x-api-key", "k-nope")]).await;
    deny(&none, 401, "invalid_key");
    deny(&unknown, 401, "invalid_key");
    assert_eq!(none.body, unknown.body);
    // The key is never taken from the query string.
    deny(&get(ip(1), a, "/v1/x?x-api-key=k-reader&api_key=k-reader", &[]).await, 401, "invalid_key");
    // Twice the key header: ambiguous, refused.
    deny(&get(ip(1), a, "/v1/x", &[("x-api-key", "k-reader"), ("x-api-key", "k-reader")]).await, 401, "invalid_key");

    // Wrong address, expired, disabled, wrong route (method and path).
    deny(&get(ip(2), a, "/v1/x", &[("x-api-key", "k-reader")]).await, 403, "source_not_allowed");
    deny(&get(ip(1), a, "/v1/x", &[("x-api-key", "k-other")]).await, 403, "source_not_allowed");
    assert_eq!(get(ip(2), a, "/anything", &[("x-api-key", "k-other")]).await.status, 200);
    deny(&get(ip(1), a, "/", &[("x-api-key", "k-expired")]).await, 403, "key_expired");
    deny(&get(ip(1), a, "/", &[("x-api-key", "k-disabled")]).await, 403, "client_disabled");
    deny(&get(ip(1), a, "/v2/x", &[("x-api-key", "k-reader")]).await, 403, "route_not_allowed");
    deny(&get(ip(1), a, "/v10", &[("x-api-key", "k-reader")]).await, 403, "route_not_allowed");
    let mut c = Conn::open(ip(1), a).await;
    deny(&c.send("DELETE", "/v1/x", &[("x-api-key", "k-reader")]).await, 403, "route_not_allowed");

    // Over the rate: burst 3, then 429 with Retry-After and RateLimit headers.
    let mut c = Conn::open(ip(5), a).await;
    for _ in 0..3 {
        assert_eq!(c.send("GET", "/", &[("x-api-key", "k-throttled")]).await.status, 200);
    }
    let r = c.send("GET", "/", &[("x-api-key", "k-throttled")]).await;
    deny(&r, 429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((59..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(r.headers["ratelimit-policy"], "\"burst\";q=3;w=180");
    assert_eq!(r.headers["ratelimit"].to_str().unwrap(), format!("\"burst\";r=0;t={retry}"));

    // Over quota: 2 a day.
    for _ in 0..2 {
        assert_eq!(get(ip(6), a, "/", &[("x-api-key", "k-quota")]).await.status, 200);
    }
    let r = get(ip(6), a, "/", &[("x-api-key", "k-quota")]).await;
    deny(&r, 429, "quota_exceeded");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert_eq!(r.headers["ratelimit-policy"], "\"quota\";q=2;w=86400");

    // Only the 4 allowed requests (1 other + 3 throttled + 2 quota = 6) reached the upstream.
    assert_eq!(seen.count() - before, 6);

    // Metrics count decisions by reason.
    let m = get(ip(1), proxy.admin_addr.unwrap(), "/metrics", &[]).await.body;
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="deny",reason="invalid_key"} 4"#), "{m}");
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="deny",reason="rate_limited"} 1"#), "{m}");
    assert!(m.contains("portcullis_proxy_clients 6"), "{m}");
    assert!(m.contains("portcullis_proxy_table_info{"), "{m}");
    assert!(m.contains("portcullis_proxy_request_duration_seconds_bucket"), "{m}");
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn fail_closed_until_a_table_loads_and_bad_files_are_rejected() {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let proxy = start(config(up, &path)).await;
    let admin = proxy.admin_addr.unwrap();

    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.reason(), "no_table");
    assert_eq!(get(ip(1), admin, "/readyz", &[]).await.status, 503);
    assert_eq!(get(ip(1), admin, "/healthz", &[]).await.status, 200);

    // A missing file is not a rejected table; /readyz says what is missing.
    assert!(get(ip(1), admin, "/readyz", &[]).await.body.contains("file_missing"));
    assert!(!proxy.metrics.encode().contains("tables_rejected_total{"), "{}", proxy.metrics.encode());
    // A bad file is rejected and counted; still no table.
    write_atomic(&path, b"{ not json");
    wait_until("rejection counted", || {
        proxy.metrics.encode().contains("portcullis_proxy_tables_rejected_total{source=\"file\"} 1")
    })
    .await;
    assert_eq!(get(ip(1), proxy.addr, "/", &[("x-api-key", "k-reader")]).await.status, 503);

    write_table(&path, &standard_table());
    wait_until("table loaded", || proxy.tables.is_ready()).await;
    assert_eq!(get(ip(1), admin, "/readyz", &[]).await.status, 200);
    assert_eq!(get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);

    // A table that parses but fails validation (unknown plan) is rejected; the good one stays.
    let mut bad = standard_table();
    std::sync::Arc::make_mut(&mut bad.clients[0]).plans = vec!["nope".into()];
    bad.revision = bad.compute_revision();
    let good_rev = proxy.tables.revision().unwrap();
    write_table(&path, &bad);
    wait_until("second rejection", || {
        proxy.metrics.encode().contains("portcullis_proxy_tables_rejected_total{source=\"file\"} 2")
    })
    .await;
    assert_eq!(proxy.tables.revision().unwrap(), good_rev);
    assert_eq!(get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);

    // Deleting the file does not: the table is revoked (tests/integration/hot_swap.rs has the details).
    std::fs::remove_file(&path).unwrap();
    wait_until("table revoked", || !proxy.tables.is_ready()).await;
    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!((r.status.as_u16(), r.reason().as_str()), (503, "table_revoked"));
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn upstream_down_is_502_json() {
    // Reserve a port and close it so nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let proxy = start(config(dead, &path)).await;
    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.reason(), "upstream_unavailable");
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn h2c_prior_knowledge_and_streamed_bodies() {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let proxy = start(config(up, &path)).await;

    let stream = tcp_from(ip(1), proxy.addr).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let body = bytes::Bytes::from(vec![b'x'; 300_000]);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://svc.test/v1/upload")
        .header("x-api-key", "k-reader")
        .body(http_body_util::Full::new(body))
        .unwrap();
    let resp = within("h2 response", send.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-body-len"], "300000");
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&b[..], b"upstream saw POST /v1/upload");
    let h = seen.last();
    assert_eq!(h["host"], "svc.test");
    assert!(!h.contains_key("x-api-key"));
    assert_eq!(h["x-portcullis-client"], "t/reader");

    // h2 requests are decided too.
    let req = http::Request::builder()
        .uri("http://svc.test/v1/x")
        .header("x-api-key", "k-nope")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(within("h2 response", send.send_request(req)).await.unwrap().status(), 401);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn upgrades_pass_through_after_the_checks() {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let proxy = start(config(up, &path)).await;

    let handshake = |key: &str| {
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: svc.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-api-key: {key}\r\n\r\n"
        )
    };
    // Refused before any upgrade.
    let mut s = tcp_from(ip(1), proxy.addr).await;
    s.write_all(handshake("k-nope").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("refusal", s.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"), "{}", String::from_utf8_lossy(&buf[..n]));

    let mut s = tcp_from(ip(1), proxy.addr).await;
    s.write_all(handshake("k-reader").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(within("101 head", s.read(&mut b)).await.unwrap(), 1, "connection closed early");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    let h = seen.last();
    assert_eq!(h["upgrade"], "websocket");
    assert!(!h.contains_key("x-api-key"));
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut echo = vec![0u8; 23];
    within("echo", s.read_exact(&mut echo)).await.unwrap();
    assert_eq!(&echo, b"ping through the tunnel");
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_and_stops_accepting() {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let proxy = start(config(up, &path)).await;
    let addr = proxy.addr;
    let mut c = Conn::open(ip(1), addr).await;
    assert_eq!(c.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await.status, 200);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "listener closed after shutdown");
}
