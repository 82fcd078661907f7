//! The upstream leg: one upstream connection per client connection, reused across its requests, parked for the
//! next client connection when it closes, replaced when the application closes it; concurrent h2 streams still all get through.

use crate::common::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Connections the upstream has accepted, and how many are open now.
#[derive(Clone, Default)]
struct ConnCount {
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

/// A raw HTTP/1.1 upstream answering every request `200 ok` with Content-Length; with `close_after_each`, it closes
/// the connection after each response without saying so (as an application's idle timeout would, in a race).
async fn counting_upstream(close_after_each: bool) -> (SocketAddr, ConnCount) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = ConnCount::default();
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            c.accepted.fetch_add(1, Ordering::SeqCst);
            c.open.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    // GET requests without bodies: a request ends at the blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                            break;
                        }
                        if close_after_each {
                            let _ = s.shutdown().await;
                            c.open.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, count)
}

fn table_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    path
}

#[tokio::test]
async fn one_upstream_connection_per_client_connection_reused_then_parked() {
    let (up, count) = counting_upstream(false).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(config(up, &table_path(&dir))).await;

    let mut a = Conn::open(ip(1), proxy.addr).await;
    for _ in 0..5 {
        let r = a.send("GET", "/v1/x", &[("x-api-key", "k-reader")]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    }
    assert_eq!(count.accepted.load(Ordering::SeqCst), 1, "five requests on one client connection share one");

    // A denied request never opens an upstream connection.
    let mut b = Conn::open(ip(1), proxy.addr).await;
    assert_eq!(b.send("GET", "/v1/x", &[("x-api-key", "k-nope")]).await.status, 401);
    assert_eq!(count.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(b.send("GET", "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);
    assert_eq!(count.accepted.load(Ordering::SeqCst), 2, "a second client connection gets its own");
    assert_eq!(count.open.load(Ordering::SeqCst), 2);

    // A closed client connection parks its upstream connection; the next client connection takes it.
    drop(a);
    wait_until("the proxy to see the first client connection close", || proxy.metrics.open_connections.get() == 1)
        .await;
    let mut c = Conn::open(ip(1), proxy.addr).await;
    assert_eq!(c.send("GET", "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);
    assert_eq!(count.accepted.load(Ordering::SeqCst), 2, "the parked upstream connection was reused");
    assert_eq!(count.open.load(Ordering::SeqCst), 2);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn an_upstream_closing_its_connection_is_replaced_transparently() {
    let (up, count) = counting_upstream(true).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(config(up, &table_path(&dir))).await;

    let mut c = Conn::open(ip(1), proxy.addr).await;
    for i in 1..=4 {
        let r = c.send("GET", "/v1/x", &[("x-api-key", "k-reader")]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert_eq!(r.body, "ok");
    }
    assert_eq!(
        count.accepted.load(Ordering::SeqCst),
        4,
        "one upstream connection per request, as the upstream closes each"
    );
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn concurrent_h2_streams_on_one_connection_all_reach_the_upstream() {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(config(up, &table_path(&dir))).await;

    let stream = tcp_from(ip(1), proxy.addr).await;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut send = send.clone();
        tasks.spawn(async move {
            let req = http::Request::builder()
                .uri(format!("http://svc.test/v1/item/{i}"))
                .header("x-api-key", "k-reader")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned(), i)
        });
    }
    let results = within("20 concurrent h2 requests", tasks.join_all()).await;
    for (status, body, i) in results {
        assert_eq!(status, 200);
        assert_eq!(body, format!("upstream saw GET /v1/item/{i}"));
    }
    assert_eq!(seen.count(), 20);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}
