//! Graceful shutdown: stop accepting, finish in-flight requests within the grace period, exit (also on SIGTERM).

use crate::common::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// An upstream that announces each request on `arrived` and answers only when `release` is notified.
async fn held_upstream() -> (SocketAddr, Arc<Notify>, Arc<Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (a, r) = (a.clone(), r.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let (a, r) = (a.clone(), r.clone());
                    async move {
                        a.notify_one();
                        r.notified().await;
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"finished"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, arrived, release)
}

async fn listener_closed(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn in_flight_requests_finish_after_shutdown_begins() {
    let (up, arrived, release) = held_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let proxy = start(config(up, &path)).await;
    let addr = proxy.addr;
    let inflight = tokio::spawn(async move { get(ip(1), addr, "/v1/slow", &[("x-api-key", "k-reader")]).await });
    within("request reached the upstream", arrived.notified()).await;
    proxy.shutdown();
    listener_closed(addr).await;
    release.notify_one();
    let r = within("in-flight request", inflight).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "finished");
    within("proxy drained", proxy.wait()).await;
}

#[tokio::test]
async fn the_grace_period_bounds_shutdown() {
    let (up, arrived, _release) = held_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let mut c = config(up, &path);
    c.shutdown_grace = Duration::from_millis(300);
    let proxy = start(c).await;
    let addr = proxy.addr;
    let stuck = tokio::spawn(async move {
        let mut conn = Conn::open(ip(1), addr).await;
        let req =
            http::Request::get("/v1/stuck").header("x-api-key", "k-reader").body(Full::new(Bytes::new())).unwrap();
        conn.0.send_request(req).await.map(|r| r.status())
    });
    within("request reached the upstream", arrived.notified()).await;
    let t = Instant::now();
    proxy.shutdown();
    within("shutdown after the grace period", proxy.wait()).await;
    assert!(t.elapsed() >= Duration::from_millis(250), "gave up before the grace period: {:?}", t.elapsed());
    assert!(within("stuck request ended", stuck).await.unwrap().is_err(), "the stuck request was cut off");
}

#[tokio::test]
async fn the_binary_exits_cleanly_on_sigterm() {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (listen, admin) = (free(), free());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"))
        .env("PORTCULLIS_LISTEN", listen.to_string())
        .env("PORTCULLIS_ADMIN_LISTEN", admin.to_string())
        .env("PORTCULLIS_UPSTREAM", up.to_string())
        .env("PORTCULLIS_TABLES", &path)
        .env("PORTCULLIS_SHUTDOWN_GRACE", "5s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = tokio::net::TcpStream::connect(admin).await {
            drop(s);
            if get(ip(1), admin, "/readyz", &[]).await.status == 200 {
                break;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "proxy exited early");
        assert!(Instant::now() < deadline, "proxy never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(ip(1), listen, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "proxy did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
}
