//! Tiny HTTP pieces for the demo and the benchmarks: an echo upstream, a fixed-size upstream, and a client that
//! binds a chosen source address.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpListener, TcpSocket};

/// Serves `200 {"echo": ..., "client": <x-portcullis-client>, "sawKey": bool}` on a loopback port.
pub async fn start_echo(key_header: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let client = req.headers().get("x-portcullis-client").and_then(|v| v.to_str().ok()).unwrap_or("");
                    let body = serde_json::json!({
                        "echo": req.uri().path(),
                        "client": client,
                        "sawKey": req.headers().contains_key(key_header),
                    });
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body.to_string()))))
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

pub struct Reply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
}

/// One GET from source address `from` (a 127.0.0.x address) to `to`, with an optional API key.
pub async fn get(from: IpAddr, to: SocketAddr, path: &str, key: Option<&str>) -> Result<Reply> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0)).with_context(|| format!("binding source address {from}"))?;
    let stream = socket.connect(to).await.with_context(|| format!("connecting to {to}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "echo.demo");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::new()))?).await?;
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    Ok(Reply { status, body, retry_after })
}

/// Serves `200` with a body of `size` bytes on a loopback port (the benchmark upstream).
pub async fn start_sized_upstream(size: usize) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(vec![b'x'; size]);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, hyper::Error>(Response::new(Full::new(body))) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}
