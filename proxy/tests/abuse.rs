//! Abuse at small scale against the real binary (its own process, so its memory can be read): a legitimate client
//! keeps being served while slowloris connections and random keys hit the proxy, and the proxy's memory does not
//! grow with the number of distinct keys or forwarded addresses it has seen. Timing goals (p99 under abuse) are in
//! `cargo xtask bench abuse`.

mod common;

use bytes::Bytes;
use common::{WAIT, client, get, ip, upstream, write_table};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_table::{Plan, Table};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const LEGIT_KEY: &str = "k-legit";
const TRUSTED: &str = "127.0.0.3";

/// The proxy binary on free ports; killed (by its pid) when dropped.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// One legitimate client (from 127.0.0.1 only) and 1 000 others, an upstream, 1 s to send a request head,
    /// 8 connections per source, 127.0.0.3 trusted as a forwarding proxy.
    async fn start() -> Self {
        let (up, _seen) = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tables.json");
        let mut plans = BTreeMap::new();
        plans.insert("open".to_string(), Plan::default());
        let mut clients = vec![client("t/legit", LEGIT_KEY, &["127.0.0.1/32"], &["open"])];
        clients.extend((1..=1000).map(|i| {
            let cidr = format!("10.1.{}.0/24", i % 250);
            client(&format!("t/c{i}"), &format!("k-{i}"), &[cidr.as_str()], &["open"])
        }));
        write_table(&path, &Table::new("t/svc", plans, clients));
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (listen, admin) = (free(), free());
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"))
            .arg(format!("--listen={listen}"))
            .arg(format!("--admin-listen={admin}"))
            .arg(format!("--upstream={up}"))
            .arg(format!("--tables={}", path.display()))
            .args(["--header-read-timeout=1s", "--max-connections-per-source=8"])
            .arg(format!("--trusted-proxies={TRUSTED}/32"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(admin).await.is_ok() && get(ip(1), admin, "/readyz", &[]).await.status == 200 {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "proxy exited early");
            assert!(Instant::now() < deadline, "proxy never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Proxy { child, addr: listen, _dir: dir }
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

async fn connect(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(to).await
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn open(from: IpAddr, to: SocketAddr) -> Option<Sender> {
    let s = connect(from, to).await.ok()?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.ok()?;
    tokio::spawn(conn);
    Some(send)
}

/// One GET on a kept-alive connection (reopened when needed); the status, or `None` when the connection failed.
async fn send(conn: &mut Option<Sender>, from: IpAddr, to: SocketAddr, headers: &[(&str, &str)]) -> Option<u16> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = open(from, to).await;
    }
    let c = conn.as_mut()?;
    let mut b = http::Request::get("/v1/items").header("host", "svc.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = async {
        c.ready().await.ok()?;
        let resp = c.send_request(b.body(Full::new(Bytes::new())).unwrap()).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    }
    .await;
    if r.is_none() {
        *conn = None;
    }
    r
}

/// `n` requests over `conns` connections from 127.0.`base`.x, each with a new key (or, with `xff`, from the trusted
/// peer with a new forwarded address and another client's key); returns how many were answered 401 / 403.
async fn flood(to: SocketAddr, n: u64, conns: u64, offset: u64, xff: bool) -> u64 {
    let next = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..conns {
        let (next, refused) = (next.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let from: IpAddr =
                if xff { TRUSTED.parse().unwrap() } else { IpAddr::V4(Ipv4Addr::new(127, 0, 20, w as u8 + 1)) };
            let mut conn = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let i = i + offset;
                let status = if xff {
                    let a = Ipv4Addr::from(0x0b00_0000u32 + i as u32).to_string();
                    let key = format!("k-{}", 1 + i % 1000);
                    send(&mut conn, from, to, &[("x-forwarded-for", &a), ("x-api-key", &key)]).await
                } else {
                    send(
                        &mut conn,
                        from,
                        to,
                        &[("x-api-key", &format!("random-{i}-{:x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))],
                    )
                    .await
                };
                if matches!(status, Some(401 | 403)) {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    refused.load(Ordering::Relaxed)
}

/// Holds a connection from `from` that dribbles a request head a byte every 100 ms, reopening it whenever the proxy
/// closes it (counted in `closed`), until `stop`.
async fn slowloris(from: IpAddr, to: SocketAddr, closed: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let head = b"GET /v1/items HTTP/1.1\r\nHost: svc.test\r\nX-Slow: ";
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = connect(from, to).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut rd, mut wr) = s.split();
        let mut buf = [0u8; 256];
        let mut sent = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stop.load(Ordering::Relaxed) { return }
                    if wr.write_all(&[head.get(sent).copied().unwrap_or(b'a')]).await.is_err() { break }
                    sent += 1;
                }
                r = rd.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legitimate_client_is_served_during_slowloris_and_random_keys() {
    let proxy = Proxy::start().await;
    let to = proxy.addr;
    // 300 slowloris connections, one source address each (the per-source cap does not shield the proxy).
    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicU64::new(0));
    let loris: Vec<_> = (0..300u32)
        .map(|i| {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 50 + (i / 250) as u8, 1 + (i % 250) as u8));
            tokio::spawn(slowloris(from, to, closed.clone(), stop.clone()))
        })
        .collect();
    let keys = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                refused += flood(to, 500, 4, round * 500, false).await;
                round += 1;
            }
            (refused, round * 500)
        })
    };
    // The legitimate client: 4 keep-alive connections, at least 500 requests each, and on until the proxy has also
    // closed every slowloris connection at least once (their heads take longer than --header-read-timeout).
    let deadline = Instant::now() + WAIT;
    let mut legit = Vec::new();
    for _ in 0..4 {
        let closed = closed.clone();
        legit.push(tokio::spawn(async move {
            let (mut ok, mut sent, mut conn) = (0u64, 0u64, None);
            while sent < 500 || closed.load(Ordering::Relaxed) < 300 {
                assert!(Instant::now() < deadline, "slowloris connections not closed within {WAIT:?}");
                if send(&mut conn, ip(1), to, &[("x-api-key", LEGIT_KEY)]).await == Some(200) {
                    ok += 1;
                }
                sent += 1;
            }
            (ok, sent)
        }));
    }
    let (mut ok, mut sent) = (0, 0);
    for t in legit {
        let (o, s) = t.await.unwrap();
        (ok, sent) = (ok + o, sent + s);
    }
    stop.store(true, Ordering::Relaxed);
    let (refused, keys_sent) = keys.await.unwrap();
    for l in loris {
        l.await.unwrap();
    }
    eprintln!(
        "legitimate client: {ok} of {sent} answered 200; {} slowloris connections closed",
        closed.load(Ordering::Relaxed)
    );
    assert!(ok * 1000 >= sent * 999, "legitimate client: {ok} of {sent} answered 200 (goal ≥ 99.9 %)");
    assert!(keys_sent >= 500 && refused == keys_sent, "random keys: {refused} of {keys_sent} refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_does_not_grow_with_distinct_keys_or_addresses() {
    let proxy = Proxy::start().await;
    for xff in [false, true] {
        // Warm up (connections, buffers, allocator arenas), then 5 × as many new keys / addresses.
        assert_eq!(flood(proxy.addr, 5_000, 8, 0, xff).await, 5_000);
        let before = proxy.rss_kib();
        assert_eq!(flood(proxy.addr, 25_000, 8, 5_000, xff).await, 25_000);
        let after = proxy.rss_kib();
        let what = if xff { "forwarded addresses" } else { "keys" };
        eprintln!("RSS after 5 000 distinct {what}: {before} KiB; after 30 000: {after} KiB");
        // Any per-key or per-address state (≥ ~40 bytes each) would add ≥ 1 MiB over 25 000 new ones.
        assert!(after < before + 1024, "RSS grew from {before} KiB to {after} KiB with 25 000 new distinct {what}");
    }
}
