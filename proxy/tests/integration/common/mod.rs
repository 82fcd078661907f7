//! Shared test support: an upstream that records what it saw, table builders, clients bound to 127.0.0.x.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis_proxy::{Config, Running, TableSource};
use portcullis_table::{Client, Period, Plan, Quota, RouteScope, Table, Throttle};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub mod cluster;

pub const WAIT: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// Polls `cond` every 10 ms until it holds, failing after `WAIT`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<HeaderMap>>>);

impl Seen {
    pub fn last(&self) -> HeaderMap {
        self.0.lock().unwrap().last().cloned().expect("upstream saw a request")
    }
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1 answering `200 upstream saw <method> <path>`, recording request headers;
/// requests with `Upgrade` get a 101 and an echo of whatever is sent on the upgraded connection.
pub async fn upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    s.0.lock().unwrap().push(req.headers().clone());
                    async move {
                        if req.headers().contains_key("upgrade") {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let up = on.await.expect("upstream upgrade");
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 1024];
                                loop {
                                    let n = io.read(&mut buf).await.unwrap_or(0);
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            let r = Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, hyper::Error>(r);
                        }
                        let body = format!("upstream saw {} {}", req.method(), req.uri().path());
                        // Drain the request body (streams through the proxy).
                        let n = req.into_body().collect().await?.to_bytes().len();
                        let r = Response::builder()
                            .header("x-body-len", n)
                            .header("connection", "keep-alive, x-hop")
                            .header("x-hop", "drop-me")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap();
                        Ok(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, seen)
}

pub fn client(id: &str, key: &str, cidrs: &[&str], plans: &[&str]) -> Client {
    let mut c = Client::builder(id).key(key).plans(plans);
    for cidr in cidrs {
        c = c.source(cidr);
    }
    c.build()
}

pub fn plans() -> BTreeMap<String, Plan> {
    let mut plans = BTreeMap::new();
    plans.insert("open".to_string(), Plan::default());
    plans.insert(
        "read".to_string(),
        Plan {
            routes: vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into(), "POST".into()] }],
            ..Default::default()
        },
    );
    plans.insert(
        "tight".to_string(),
        Plan { throttle: Some(Throttle { rate: 1, per_millis: 60_000, burst: 3 }), ..Default::default() },
    );
    plans.insert(
        "daily".to_string(),
        Plan { quota: Some(Quota { limit: 2, period: Period::Day }), ..Default::default() },
    );
    plans
}

/// The standard test table.
pub fn standard_clients() -> Vec<Client> {
    let mut expired = client("t/expired", "k-expired", &["127.0.0.0/8"], &["open"]);
    expired.keys[0].expires_at = Some("2020-01-01T00:00:00Z".parse().unwrap());
    let mut disabled = client("t/disabled", "k-disabled", &["127.0.0.0/8"], &["open"]);
    disabled.disabled = true;
    vec![
        client("t/reader", "k-reader", &["127.0.0.1/32", "203.0.113.7/32"], &["read"]),
        client("t/other", "k-other", &["127.0.0.2/32"], &["open"]),
        client("t/throttled", "k-throttled", &["127.0.0.0/8"], &["tight"]),
        client("t/quota", "k-quota", &["127.0.0.0/8"], &["daily"]),
        expired,
        disabled,
    ]
}

pub fn standard_table() -> Table {
    Table::new("t/svc", plans(), standard_clients())
}

/// Writes atomically (temp file + rename), as editors and Kubernetes volume updates do.
pub fn write_table(path: &Path, table: &Table) {
    write_atomic(path, table.to_json_pretty().as_bytes());
}

pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn config(upstream: SocketAddr, tables: &Path) -> Config {
    let mut c = Config::new("127.0.0.1:0".parse().unwrap(), upstream.to_string(), TableSource::File(tables.into()));
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    c.file_poll_interval = Duration::from_millis(20);
    c
}

pub async fn start(c: Config) -> Running {
    within("proxy start", portcullis_proxy::start(c)).await.expect("proxy starts")
}

pub fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

pub async fn tcp_from(src: IpAddr, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    within("connect", sock.connect(to)).await.expect("connect")
}

/// An HTTP/1.1 keep-alive connection from `src`.
pub struct Conn(pub hyper::client::conn::http1::SendRequest<Full<Bytes>>);

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }
    pub fn reason(&self) -> String {
        self.json()["reason"].as_str().unwrap().to_string()
    }
}

impl Conn {
    pub async fn open(src: IpAddr, to: SocketAddr) -> Self {
        let stream = tcp_from(src, to).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        Conn(send)
    }

    pub async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::builder().method(method).uri(path).header("host", "svc.test");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        within("ready", self.0.ready()).await.expect("connection usable");
        let resp = within("response", self.0.send_request(req)).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = within("body", resp.into_body().collect()).await.unwrap().to_bytes();
        Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
    }
}

/// One request on a fresh connection from `src`.
pub async fn get(src: IpAddr, to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    Conn::open(src, to).await.send("GET", path, headers).await
}

/// Raw bytes on a fresh connection; returns everything read until the peer closes.
pub async fn raw(src: IpAddr, to: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tcp_from(src, to).await;
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = within("raw read", s.read_to_end(&mut out)).await;
    out
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}
