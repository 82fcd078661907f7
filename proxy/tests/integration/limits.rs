//! Connection limits: header size, header read timeout, idle timeout, max connections.

use crate::common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn proxy(f: impl FnOnce(&mut portcullis_proxy::Config)) -> (portcullis_proxy::Running, tempfile::TempDir) {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let mut c = config(up, &path);
    f(&mut c);
    let p = start(c).await;
    wait_until("table loaded", || p.tables.is_ready()).await;
    (p, dir)
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let (p, _dir) = proxy(|c| c.max_header_bytes = 8192).await;
    let big = "a".repeat(20_000);
    let r = raw(
        ip(1),
        p.addr,
        format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    let head = String::from_utf8_lossy(&r[..r.len().min(40)]).to_string();
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (p, _dir) = proxy(|c| {
        c.header_read_timeout = Duration::from_millis(300);
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    // Headers never finished: closed after the header read timeout, without a response to a request.
    let mut s = tcp_from(ip(1), p.addr).await;
    s.write_all(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    within("slow headers closed", s.read_to_end(&mut buf)).await.ok();
    assert!(t.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", t.elapsed());
    assert!(!String::from_utf8_lossy(&buf).contains("200"), "{}", String::from_utf8_lossy(&buf));
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (p, _dir) = proxy(|c| {
        c.header_read_timeout = Duration::from_secs(60);
        c.idle_timeout = Duration::from_millis(400);
    })
    .await;
    // Idle keep-alive connection: closed after the idle timeout, after serving its request.
    let mut s = tcp_from(ip(1), p.addr).await;
    s.write_all(b"GET /v1/x HTTP/1.1\r\nHost: x\r\nx-api-key: k-reader\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let t = Instant::now();
    within("idle connection closed", s.read_to_end(&mut buf)).await.ok();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(t.elapsed() >= Duration::from_millis(350), "closed too early: {:?}", t.elapsed());
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let (p, _dir) = proxy(|c| c.max_connections = 1).await;
    let mut first = Conn::open(ip(1), p.addr).await;
    assert_eq!(first.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await.status, 200);
    // The second connection is accepted by the kernel but not served while the first is open.
    let second = tokio::spawn({
        let addr = p.addr;
        async move { get(ip(1), addr, "/v1/b", &[("x-api-key", "k-reader")]).await.status }
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // negative check: give it a chance to (wrongly) finish
    assert!(!second.is_finished(), "second connection served while the limit was reached");
    drop(first);
    assert_eq!(within("second served", second).await.unwrap(), 200);
    p.shutdown();
    within("shutdown", p.wait()).await;
}
