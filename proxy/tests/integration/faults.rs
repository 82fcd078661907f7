//! Faults with a running proxy under load (issue 13, part 2): a bounded load loop on loopback counts every answer
//! while tables are swapped 100 times through the real local API server, while corrupt, partial, oversized and
//! future-schema revisions arrive (API mode and file mode), while the process gets SIGTERM, and while the app
//! restarts. Figures are printed (`--nocapture`) and recorded in docs/reliability.md.

use crate::common::cluster::*;
use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis_proxy::tables::TableStore;
use portcullis_table::naming::{INDEX_DATA_KEY, SHARD_DATA_KEY, Slot, index_name, shard_name};
use portcullis_table::{SCHEMA_VERSION, Table};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

// === The load loop ===

/// One answer as the load loop saw it: status and `reason` (empty for a 2xx), or the transport error.
type Answer = Result<(u16, String), String>;

/// Sends one GET on a keep-alive connection (opened on demand from `src`); a transport error drops the connection.
async fn send(
    conn: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    src: IpAddr,
    to: SocketAddr,
    key: &str,
) -> Answer {
    let attempt = async {
        if conn.is_none() {
            let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            sock.bind(SocketAddr::new(src, 0)).map_err(|e| e.to_string())?;
            let stream = sock.connect(to).await.map_err(|e| format!("connect: {e}"))?;
            let (s, c) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            tokio::spawn(c);
            *conn = Some(s);
        }
        let s = conn.as_mut().unwrap();
        s.ready().await.map_err(|e| format!("connection unusable: {e}"))?;
        let req = http::Request::get("/v1/load")
            .header("host", "svc.test")
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = s.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_string))
            .unwrap_or_default();
        Ok((status, reason))
    };
    let r = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r,
        Err(_) => Err("no answer within 10 s".into()),
    };
    if r.is_err() {
        *conn = None;
    }
    r
}

/// What one load task counted.
#[derive(Debug, Default, Clone)]
struct Tally {
    sent: usize,
    /// Transport errors and timeouts.
    failed: usize,
    /// Answers other than the expected one.
    misdecided: usize,
    /// Answers by (key, status, reason).
    answers: BTreeMap<(String, u16, String), usize>,
    /// The first few unexpected answers, for the assertion message.
    examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.misdecided += other.misdecided;
        for (k, v) in &other.answers {
            *self.answers.entry(k.clone()).or_default() += v;
        }
        self.examples.extend(other.examples.iter().take(5).cloned());
    }

    fn count(&mut self, key: &str, answer: &Answer, expected: bool) {
        self.sent += 1;
        let label = match answer {
            Ok((s, r)) => (key.to_string(), *s, r.clone()),
            Err(e) => (key.to_string(), 0, e.clone()),
        };
        *self.answers.entry(label).or_default() += 1;
        match answer {
            Err(e) => {
                self.failed += 1;
                if self.examples.len() < 5 {
                    self.examples.push(format!("{key}: {e}"));
                }
            }
            Ok((s, r)) if !expected => {
                self.misdecided += 1;
                if self.examples.len() < 5 {
                    self.examples.push(format!("{key}: {s} {r}"));
                }
            }
            Ok(_) => {}
        }
    }

    /// Answers with `status` for `key`.
    fn of(&self, key: &str, status: u16) -> usize {
        self.answers.iter().filter(|((k, s, _), _)| k == key && *s == status).map(|(_, n)| n).sum()
    }
}

/// A request the load loop sends over and over, and the one answer it must get.
#[derive(Clone)]
struct Probe {
    key: &'static str,
    status: u16,
    reason: &'static str,
}

const fn probe(key: &'static str, status: u16, reason: &'static str) -> Probe {
    Probe { key, status, reason }
}

/// One load task per source address (each its own keep-alive connection) cycling through `probes` until `stop`
/// flips; each round is paced by `pause`.
fn spawn_load(
    to: SocketAddr,
    sources: &[IpAddr],
    probes: Vec<Probe>,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    sources
        .iter()
        .map(|&src| {
            let (probes, stop) = (probes.clone(), stop.clone());
            tokio::spawn(async move {
                let mut conn = None;
                let mut t = Tally::default();
                while !stop.load(Ordering::Acquire) {
                    for p in &probes {
                        let a = send(&mut conn, src, to, p.key).await;
                        let ok = matches!(&a, Ok((s, r)) if *s == p.status && (p.reason.is_empty() || r == p.reason));
                        t.count(p.key, &a, ok);
                        assert!(t.sent < 2_000_000, "the load loop is bounded");
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                t
            })
        })
        .collect()
}

async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    stop.store(true, Ordering::Release);
    let mut sum = Tally::default();
    for t in tasks {
        sum.add(&within("load task", t).await.expect("load task"));
    }
    sum
}

pub(crate) fn counter(metrics: &str, line_prefix: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

const REJECTED: &str = r#"portcullis_proxy_tables_rejected_total{source="configmap"} "#;
const REJECTED_FILE: &str = r#"portcullis_proxy_tables_rejected_total{source="file"} "#;

// === 100 swaps under load (API mode) ===

const SWAPS: u64 = 100;

/// Revision `i`: the standard clients, a steady load client, padding over several shards, a client that exists in
/// even revisions only (`k-toggle`), and one that makes every revision distinct.
fn swap_table(i: u64) -> Table {
    let mut clients = standard_clients();
    clients.push(client("t/steady", "k-steady", &["127.0.0.0/8"], &["open"]));
    for p in 0..30 {
        clients.push(client(&format!("t/pad-{p:03}"), &format!("k-pad-{p}"), &["10.0.0.0/8"], &["open"]));
    }
    if i.is_multiple_of(2) {
        clients.push(client("t/toggle", "k-toggle", &["127.0.0.0/8"], &["open"]));
    }
    clients.push(client(&format!("t/churn-{i:03}"), &format!("k-churn-{i}"), &["10.0.0.0/8"], &["open"]));
    Table::new(format!("shop/{SERVICE}"), plans(), clients)
}

/// The load of the swap test: steady answers, plus `k-toggle` judged against the revisions in force just before
/// and just after each request (a request is decided by one of the tables in force while it was in flight).
/// `numbers`: revision → its number `i` in [`swap_table`].
fn spawn_swap_load(
    to: SocketAddr,
    store: Arc<TableStore>,
    numbers: Arc<BTreeMap<String, u64>>,
    tasks: u8,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let steady = [
        probe("k-steady", 200, ""),
        probe("k-never-issued", 401, "invalid_key"),
        // t/other is allowed from 127.0.0.2 only.
        probe("k-other", 403, "source_not_allowed"),
    ];
    (0..tasks)
        .map(|i| {
            let (store, numbers, stop, steady) = (store.clone(), numbers.clone(), stop.clone(), steady.clone());
            tokio::spawn(async move {
                let src = ip(10 + i);
                let mut conn = None;
                let mut t = Tally::default();
                let number = || numbers[&store.revision().expect("a table in force")];
                while !stop.load(Ordering::Acquire) {
                    for p in &steady {
                        let a = send(&mut conn, src, to, p.key).await;
                        let ok = matches!(&a, Ok((s, r)) if *s == p.status && (p.reason.is_empty() || r == p.reason));
                        t.count(p.key, &a, ok);
                    }
                    let before = number();
                    let a = send(&mut conn, src, to, "k-toggle").await;
                    let after = number();
                    let ok = match &a {
                        Ok((200, _)) => (before..=after).any(|n| n.is_multiple_of(2)),
                        Ok((401, r)) => r == "invalid_key" && (before..=after).any(|n| !n.is_multiple_of(2)),
                        _ => false,
                    };
                    t.count("k-toggle", &a, ok);
                    assert!(t.sent < 2_000_000, "the load loop is bounded");
                }
                t
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_load_fail_and_misdecide_nothing() {
    let k = Cluster::new("faults-swaps").await;
    let (up, seen) = upstream().await;
    let p = start(k.proxy_config(up, None)).await;
    let tables: Vec<Table> = (0..=SWAPS).map(swap_table).collect();
    let numbers: Arc<BTreeMap<String, u64>> =
        Arc::new(tables.iter().zip(0..).map(|(t, i)| (t.revision.clone(), i)).collect());
    assert_eq!(numbers.len(), tables.len(), "every revision is distinct");
    k.publish(&tables[0], Slot::A, 1, None).await;
    wait_until("revision 0 applied", || p.tables.revision().as_deref() == Some(tables[0].revision.as_str())).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_swap_load(p.addr, p.tables.clone(), numbers, 3, stop.clone());
    let mut next = Conn::open(ip(2), p.addr).await;
    let mut took = Vec::new();
    let started = Instant::now();
    for i in 1..=SWAPS {
        let t = &tables[i as usize];
        let slot = if i % 2 == 1 { Slot::B } else { Slot::A };
        let t0 = Instant::now();
        k.publish(t, slot, i + 1, None).await;
        wait_until("revision applied", || p.tables.revision().as_deref() == Some(t.revision.as_str())).await;
        took.push(t0.elapsed());
        // The very next request on a kept-alive connection is decided by the new table.
        let want = if i % 2 == 0 { 200 } else { 401 };
        assert_eq!(next.send("GET", "/x", &[("x-api-key", "k-toggle")]).await.status, want, "after swap {i}");
    }
    let swapping = started.elapsed();
    let tally = finish(&stop, load).await;
    took.sort();
    println!(
        "{SWAPS} swaps (API mode, 3 load connections) in {swapping:.1?}: publish→applied p50 {:.0?} max {:.0?}; \
         {} requests, {} failed, {} mis-decided; k-toggle 200 × {}, 401 × {}",
        took[took.len() / 2],
        took.last().unwrap(),
        tally.sent,
        tally.failed,
        tally.misdecided,
        tally.of("k-toggle", 200),
        tally.of("k-toggle", 401),
    );
    assert_eq!((tally.failed, tally.misdecided), (0, 0), "{:?}", tally.examples);
    assert!(tally.sent >= 400, "the load ran throughout: {} requests", tally.sent);
    assert!(tally.of("k-toggle", 200) > 0 && tally.of("k-toggle", 401) > 0, "both toggle states were seen");
    // Every admitted request reached the app, and nothing else did (+ the SWAPS/2 admitted checks above).
    let admitted = tally.of("k-steady", 200) + tally.of("k-toggle", 200) + (SWAPS / 2) as usize;
    assert_eq!(seen.count(), admitted);
    let m = p.metrics.encode();
    assert!(counter(&m, "portcullis_proxy_table_swaps_total ") > SWAPS, "{m}");
    assert_eq!(counter(&m, REJECTED), 0, "{m}");
    assert_eq!(counter(&m, "portcullis_proxy_tables_out_of_order_total "), 0, "{m}");
    p.shutdown();
    within("shutdown", p.wait()).await;
}

// === Bad revisions under load ===

/// The steady probes of the bad-revision tests: `k-live` admitted, `k-reader` (removed by the good revision in
/// force) refused, an unknown key refused.
fn steady_probes() -> Vec<Probe> {
    vec![probe("k-live", 200, ""), probe("k-reader", 401, "invalid_key"), probe("k-never-issued", 401, "invalid_key")]
}

/// The index of `table` in `slot` at `sequence` as JSON, edited by `edit`.
fn index_json(table: &Table, slot: Slot, sequence: u64, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let r = render_in(table, slot, sequence);
    let mut v: serde_json::Value = serde_json::from_str(&r.index_json).unwrap();
    edit(&mut v);
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_revisions_from_the_api_are_refused_counted_and_the_last_good_table_serves() {
    let k = Cluster::new("faults-bad").await;
    let (up, seen) = upstream().await;
    let p = start(k.proxy_config(up, None)).await;
    let good = sharded_table(&["k-live"], true);
    k.publish(&good, Slot::A, 1, None).await;
    wait_until("good revision applied", || p.tables.revision().as_deref() == Some(good.revision.as_str())).await;

    let stop = Arc::new(AtomicBool::new(false));
    // k-live is allowed from 127.0.0.1 only (sharded_table).
    let load = spawn_load(p.addr, &[ip(1); 3], steady_probes(), Duration::from_millis(1), stop.clone());
    // Each bad revision would re-admit k-reader and admit k-bad, were it applied.
    let bad = sharded_table(&["k-live", "k-bad"], false);
    let index = index_name(SERVICE);
    let mut rejected = 0;
    let mut refuse = async |what: &str| {
        rejected += 1;
        let t0 = Instant::now();
        wait_until(what, || counter(&p.metrics.encode(), REJECTED) >= rejected).await;
        println!("{what}: refused and counted {:.0?} after it was written", t0.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(counter(&p.metrics.encode(), REJECTED), rejected, "{what}: counted once");
        assert_eq!(p.tables.revision().as_deref(), Some(good.revision.as_str()), "{what}: the good table stays");
        assert!(p.tables.is_ready());
        assert_eq!(get(ip(1), p.addr, "/v1/x", &[("x-api-key", "k-bad")]).await.status, 401, "{what}");
    };

    // Partial: the index of a new revision whose shards were not all written (only the first one).
    let r = render_in(&bad, Slot::B, 2);
    assert!(r.shards.len() >= 2, "the table spans several shards: {}", r.shards.len());
    k.put(&r.shards[0].0, SHARD_DATA_KEY, &r.shards[0].1).await;
    k.put(&index, INDEX_DATA_KEY, &r.index_json).await;
    refuse("partial revision (1 of its shards written)").await;

    // Corrupt: every shard written, one of them not matching the index digest.
    // (A shard the proxy must read: one whose content differs from the table in force. It never re-reads a shard
    // whose digest it has.)
    let changed = portcullis_table::shard::shard_of("t/k-bad", render_in(&bad, Slot::B, 3).index.shards.len());
    k.publish(&bad, Slot::B, 3, Some(changed)).await;
    refuse("corrupt revision (a shard not matching its digest)").await;

    // Corrupt index: not JSON at all.
    k.put(&index, INDEX_DATA_KEY, "{\"schemaVersion\":1,\"service\":").await;
    refuse("corrupt index (truncated JSON)").await;

    // Future schema: an index written by a newer controller.
    let future =
        index_json(&bad, Slot::B, 4, |v| v["schemaVersion"] = (portcullis_table::shard::STABLE_LAYOUT + 1).into());
    k.put(&index, INDEX_DATA_KEY, &future).await;
    refuse("future-schema index").await;

    // Oversized: an index naming more shards than a table may have (65 > 64).
    let oversized = index_json(&bad, Slot::B, 5, |v| {
        let refs: Vec<serde_json::Value> = (0..65)
            .map(
                |i| serde_json::json!({"name": shard_name(&index, Slot::B, i), "clients": 1, "sha256": "0".repeat(64)}),
            )
            .collect();
        v["shards"] = refs.into();
    });
    k.put(&index, INDEX_DATA_KEY, &oversized).await;
    refuse("oversized index (65 shards)").await;

    // Oversized shard: the API server itself refuses a ConfigMap over 1 MiB; the proxy never sees it.
    let huge = "x".repeat(1024 * 1024 + 1);
    let cm = k8s_openapi::api::core::v1::ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(shard_name(&index, Slot::B, 0)),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(SHARD_DATA_KEY.to_string(), huge)])),
        ..Default::default()
    };
    let refused = k.cms.replace(&shard_name(&index, Slot::B, 0), &Default::default(), &cm).await;
    assert!(refused.is_err(), "the API server accepted a ConfigMap over 1 MiB");

    let tally = finish(&stop, load).await;
    println!(
        "5 bad revisions under load: {} requests, {} failed, {} mis-decided; {} rejected",
        tally.sent, tally.failed, tally.misdecided, rejected
    );
    assert_eq!((tally.failed, tally.misdecided), (0, 0), "{:?}", tally.examples);
    assert!(tally.sent >= 300, "the load ran throughout: {} requests", tally.sent);
    assert_eq!(seen.count(), tally.of("k-live", 200));
    let m = p.metrics.encode();
    assert_eq!(counter(&m, "portcullis_proxy_table_revocations_total{"), 0, "{m}");

    // A good revision after all that is applied (the proxy is not stuck on the bad ones).
    let next = sharded_table(&["k-live", "k-next"], true);
    k.publish(&next, Slot::B, 10, None).await;
    wait_until("next good revision applied", || p.tables.revision().as_deref() == Some(next.revision.as_str())).await;
    assert_eq!(get(ip(1), p.addr, "/x", &[("x-api-key", "k-next")]).await.status, 200);
    assert_eq!(counter(&p.metrics.encode(), REJECTED), rejected);
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_table_files_are_refused_counted_and_the_last_good_table_serves() {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let mut clients = standard_clients();
    clients.retain(|c| c.id != "t/reader");
    clients.push(client("t/live", "k-live", &["127.0.0.0/8"], &["open"]));
    let good = Table::new("t/svc", plans(), clients.clone());
    write_table(&path, &good);
    let p = start(config(up, &path)).await;
    wait_until("good table applied", || p.tables.revision().as_deref() == Some(good.revision.as_str())).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(p.addr, &[ip(10), ip(11), ip(12)], steady_probes(), Duration::from_millis(1), stop.clone());
    let mut bad_clients = standard_clients();
    bad_clients.push(client("t/live", "k-live", &["127.0.0.0/8"], &["open"]));
    bad_clients.push(client("t/bad", "k-bad", &["127.0.0.0/8"], &["open"]));
    let bad = Table::new("t/svc", plans(), bad_clients);
    let bad_json = bad.to_json_pretty();
    let mut rejected = 0;
    let mut refuse = async |what: &str| {
        rejected += 1;
        let t0 = Instant::now();
        wait_until(what, || counter(&p.metrics.encode(), REJECTED_FILE) >= rejected).await;
        println!("{what}: refused and counted {:.0?} after it was written", t0.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(counter(&p.metrics.encode(), REJECTED_FILE), rejected, "{what}: counted once");
        assert_eq!(p.tables.revision().as_deref(), Some(good.revision.as_str()), "{what}: the good table stays");
        assert_eq!(get(ip(1), p.addr, "/v1/x", &[("x-api-key", "k-bad")]).await.status, 401, "{what}");
    };

    // Partial: a writer that replaced the file without rename stopped half-way.
    write_atomic(&path, &bad_json.as_bytes()[..bad_json.len() / 2]);
    refuse("partial table file (first half)").await;
    // Corrupt: a byte flipped, so the revision no longer matches the content.
    write_atomic(&path, bad_json.replacen("t/bad", "t/bax", 1).as_bytes());
    refuse("corrupt table file (revision does not match the content)").await;
    // Corrupt: not UTF-8.
    write_atomic(&path, b"{\"schemaVersion\":1,\xff\xfe}");
    refuse("corrupt table file (not UTF-8)").await;
    // Future schema.
    let mut v: serde_json::Value = serde_json::from_str(&bad_json).unwrap();
    v["schemaVersion"] = (SCHEMA_VERSION + 1).into();
    write_atomic(&path, v.to_string().as_bytes());
    refuse("future-schema table file").await;
    // Oversized: a valid table padded past what a table may be (64 shards' worth), so it is refused unread.
    let limit = portcullis_table::naming::MAX_SHARDS * portcullis_table::shard::MAX_SHARD_BYTES;
    let mut padded = bad_json.clone().into_bytes();
    padded.resize(limit + 1, b' ');
    write_atomic(&path, &padded);
    drop(padded);
    refuse("oversized table file (valid JSON, 1 byte over the limit)").await;

    let tally = finish(&stop, load).await;
    println!(
        "5 bad table files under load: {} requests, {} failed, {} mis-decided; {} rejected",
        tally.sent, tally.failed, tally.misdecided, rejected
    );
    assert_eq!((tally.failed, tally.misdecided), (0, 0), "{:?}", tally.examples);
    assert!(tally.sent >= 300, "the load ran throughout: {} requests", tally.sent);
    assert_eq!(seen.count(), tally.of("k-live", 200));
    assert_eq!(counter(&p.metrics.encode(), "portcullis_proxy_table_revocations_total{"), 0);

    // A good file after all that is applied.
    clients.push(client("t/next", "k-next", &["127.0.0.0/8"], &["open"]));
    let next = Table::new("t/svc", plans(), clients);
    write_table(&path, &next);
    wait_until("next good table applied", || p.tables.revision().as_deref() == Some(next.revision.as_str())).await;
    assert_eq!(counter(&p.metrics.encode(), REJECTED_FILE), rejected);
    p.shutdown();
    within("shutdown", p.wait()).await;
}

// === SIGTERM under load ===

/// An upstream that answers each request `hold` after it arrives, counting arrivals.
async fn slow_upstream(hold: Duration) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = arrived.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let a = a.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    a.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(hold).await;
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"finished"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, arrived)
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Waits until `addr` refuses connections; returns when it did.
async fn until_refusing(addr: SocketAddr) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Instant::now(),
            _ => {}
        }
        assert!(Instant::now() < deadline, "listener still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_closes_the_listener_first_and_completes_every_request_in_flight() {
    const IN_FLIGHT: usize = 16;
    const HOLD: Duration = Duration::from_millis(1500);
    const GRACE: Duration = Duration::from_secs(5);
    let (up, arrived) = slow_upstream(HOLD).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let mut clients = standard_clients();
    clients.push(client("t/live", "k-live", &["127.0.0.0/8"], &["open"]));
    write_table(&path, &Table::new("t/svc", plans(), clients));
    let (listen, admin) = (free_addr(), free_addr());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"))
        .env("PORTCULLIS_LISTEN", listen.to_string())
        .env("PORTCULLIS_ADMIN_LISTEN", admin.to_string())
        .env("PORTCULLIS_UPSTREAM", up.to_string())
        .env("PORTCULLIS_TABLES", &path)
        .env("PORTCULLIS_SHUTDOWN_GRACE", format!("{}s", GRACE.as_secs()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(admin).await.is_err() || get(ip(1), admin, "/readyz", &[]).await.status != 200
    {
        assert!(child.try_wait().unwrap().is_none(), "proxy exited early");
        assert!(Instant::now() < deadline, "proxy never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // IN_FLIGHT admitted requests on their own connections, all held by the app when SIGTERM arrives, and as
    // many refused ones on kept-alive connections that are idle by then.
    let mut tasks = Vec::new();
    for i in 0..IN_FLIGHT {
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            let a = send(&mut conn, ip(20 + i as u8), listen, "k-live").await;
            (a, Instant::now())
        }));
    }
    let mut idle = Vec::new();
    for i in 0..IN_FLIGHT {
        let mut conn = None;
        let a = send(&mut conn, ip(60 + i as u8), listen, "k-unknown").await;
        assert!(matches!(&a, Ok((401, _))), "{a:?}");
        idle.push(conn);
    }
    wait_until("every admitted request reached the app", || arrived.load(Ordering::SeqCst) == IN_FLIGHT).await;
    let term = Instant::now();
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let closed = until_refusing(listen).await;
    let mut done = Vec::new();
    for t in tasks {
        done.push(within("request in flight", t).await.unwrap());
    }
    let status = within("proxy exit", child.wait()).await.unwrap();
    let exited = term.elapsed();
    let mut admitted = 0;
    for (a, at) in &done {
        match a {
            Ok((200, _)) => {
                admitted += 1;
                assert!(*at > closed, "a request finished before the listener closed");
            }
            other => panic!("a request in flight at SIGTERM did not complete: {other:?}"),
        }
    }
    drop(idle);
    println!(
        "SIGTERM with {IN_FLIGHT} requests in flight (held {HOLD:?} by the app) and {IN_FLIGHT} idle kept-alive \
         connections: listener refusing {:.0?} after SIGTERM, {admitted}/{IN_FLIGHT} completed 200, exit {status} \
         {exited:.0?} after SIGTERM (grace {GRACE:?})",
        closed - term,
    );
    assert_eq!(admitted, IN_FLIGHT);
    assert!(status.success(), "exit status {status}");
    assert!(closed - term < HOLD, "the listener closed before the requests in flight finished");
    assert!(exited < GRACE, "drained within the grace period: {exited:?}");
}

// === The app restarting under load ===

/// An app on a fixed address that can be stopped (listener and every connection closed) and started again.
struct App {
    addr: SocketAddr,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl App {
    async fn start() -> App {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App { addr: l.local_addr().unwrap(), task: Mutex::new(None) };
        app.serve(l);
        app
    }

    fn serve(&self, l: TcpListener) {
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    async fn stop(&self) {
        let t = self.task.lock().unwrap().take();
        if let Some(t) = t {
            t.abort();
            let _ = t.await;
        }
    }

    async fn restart(&self) {
        self.serve(TcpListener::bind(self.addr).await.expect("rebinding the app's address"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_restarting_under_load_gets_clear_errors_only_while_it_is_down() {
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let mut clients = standard_clients();
    clients.push(client("t/live", "k-live", &["127.0.0.0/8"], &["open"]));
    write_table(&path, &Table::new("t/svc", plans(), clients));
    let p = start(config(app.addr, &path)).await;
    wait_until("table loaded", || p.tables.is_ready()).await;

    // Every answer with the time it arrived, from 3 keep-alive connections.
    let log: Arc<Mutex<Vec<(Instant, Answer)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..3u8 {
        let (log, stop, to) = (log.clone(), stop.clone(), p.addr);
        load.push(tokio::spawn(async move {
            let mut conn = None;
            while !stop.load(Ordering::Acquire) {
                let a = send(&mut conn, ip(30 + i), to, "k-live").await;
                log.lock().unwrap().push((Instant::now(), a));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let count_since =
        |t: Instant, f: &dyn Fn(&Answer) -> bool| log.lock().unwrap().iter().filter(|(at, a)| *at > t && f(a)).count();
    let t_up = Instant::now();
    wait_until("served before the restart", || count_since(t_up, &|a| matches!(a, Ok((200, _)))) >= 50).await;

    const DOWN: Duration = Duration::from_secs(2);
    let down_at = Instant::now();
    app.stop().await;
    tokio::time::sleep(DOWN).await;
    let up_at = Instant::now();
    app.restart().await;
    wait_until("served again after the restart", || count_since(up_at, &|a| matches!(a, Ok((200, _)))) >= 50).await;
    stop.store(true, Ordering::Release);
    for l in load {
        within("load task", l).await.unwrap();
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    let mut first_ok_after = None;
    let (mut ok, mut errors_while_down, mut unclear) = (0usize, 0usize, Vec::new());
    for (at, a) in log.iter() {
        match a {
            Ok((200, _)) => {
                ok += 1;
                if *at > up_at && first_ok_after.is_none() {
                    first_ok_after = Some(*at - up_at);
                }
            }
            Ok((502, r)) if r == "upstream_unavailable" => {
                errors_while_down += 1;
                // An answer that arrived after the restart may have been decided just before it.
                assert!(*at > down_at, "an upstream error before the app went down");
                assert!(
                    first_ok_after.is_none() || *at < up_at + Duration::from_millis(500),
                    "a 502 after the app was serving again"
                );
            }
            other => unclear.push(format!("{other:?}")),
        }
    }
    println!(
        "app down {DOWN:?} under load: {} requests, {ok} × 200, {errors_while_down} × 502 upstream_unavailable while \
         it was down, {} other; first 200 {:.0?} after the app listened again (no proxy restart)",
        log.len(),
        unclear.len(),
        first_ok_after.unwrap(),
    );
    assert!(unclear.is_empty(), "answers other than 200 and a clear 502: {unclear:?}");
    assert!(errors_while_down > 0, "the outage was seen");
    assert!(first_ok_after.unwrap() < Duration::from_secs(1));
    p.shutdown();
    within("shutdown", p.wait()).await;
}
