//! Global limits on a real `redis-server` (tests/testkit) shared by real proxy processes (the binary, file tables):
//! one throttle and one quota across three replicas, a restart, Redis stopped mid-run under each
//! `onStoreUnavailable` policy, a bad URL and bad credentials.

use crate::common::*;
use portcullis_store::{Store, StoreConfig};
use portcullis_table::store_keys::quota_key;
use portcullis_table::{Period, Plan, Quota, StoreFallback, Table, Throttle};
use portcullis_testkit::redis::{RedisCluster, RedisServer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A proxy process with `--store-url`.
struct Proxy {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

struct Opts<'a> {
    store_url: &'a str,
    replica: &'a str,
    username: Option<&'a str>,
    password: Option<&'a str>,
}

fn free() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

impl Proxy {
    fn spawn(up: SocketAddr, tables: &Path, dir: &Path, o: &Opts<'_>) -> Self {
        let (listen, admin) = (free(), free());
        let log = dir.join(format!("proxy-{}-{}.log", o.replica, listen.port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"));
        cmd.env("PORTCULLIS_LISTEN", listen.to_string())
            .env("PORTCULLIS_ADMIN_LISTEN", admin.to_string())
            .env("PORTCULLIS_UPSTREAM", up.to_string())
            .env("PORTCULLIS_TABLES", tables)
            .env("PORTCULLIS_SHUTDOWN_GRACE", "2s")
            .env("PORTCULLIS_STORE_URL", o.store_url)
            .env("PORTCULLIS_STORE_TIMEOUT", "50ms")
            .env("PORTCULLIS_REPLICA_ID", o.replica)
            .env("PORTCULLIS_WORKERS", "1")
            .env("RUST_LOG", "info")
            .env_remove("PORTCULLIS_STORE_USERNAME")
            .env_remove("PORTCULLIS_STORE_PASSWORD")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(u) = o.username {
            cmd.env("PORTCULLIS_STORE_USERNAME", u);
        }
        if let Some(p) = o.password {
            cmd.env("PORTCULLIS_STORE_PASSWORD", p);
        }
        Self { child: cmd.spawn().unwrap(), listen, admin, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn readyz(&self) -> Option<Reply> {
        tokio::net::TcpStream::connect(self.admin).await.ok()?;
        Some(get(ip(1), self.admin, "/readyz", &[]).await)
    }

    /// Waits until `/readyz` is 200 and its body contains `needle`.
    async fn ready_with(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.readyz().await
                && r.status == 200
                && r.body.contains(needle)
            {
                return r.body;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("proxy exited ({s}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in /readyz; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (the proxy gives its leases back) and wait for the exit.
    async fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "proxy did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn table(plans: &[(&str, Plan)], clients: &[(&str, &str, &str)]) -> Table {
    let plans: BTreeMap<String, Plan> = plans.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    let clients = clients.iter().map(|(id, key, plan)| client(id, key, &["127.0.0.0/8"], &[plan])).collect();
    Table::new("t/svc", plans, clients)
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    tables: PathBuf,
    up: SocketAddr,
}

async fn setup(t: &Table) -> Setup {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("tables.json");
    write_table(&tables, t);
    Setup { dir: dir.path().to_path_buf(), _dir: dir, tables, up }
}

impl Setup {
    fn proxy(&self, store_url: &str, replica: &str) -> Proxy {
        Proxy::spawn(self.up, &self.tables, &self.dir, &Opts { store_url, replica, username: None, password: None })
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Sends `GET /x` with key `k-a` on four connections per proxy until `run` has passed: (admitted, sent, seconds
/// elapsed). Four per proxy: on a loaded machine one connection per proxy may not offer three times the limit (CI
/// once sent 103 requests in 1.5 s that way). Every answer is a 200 or a 429 `rate_limited`.
async fn offer_load(proxies: &[Proxy], run: Duration) -> (u64, u64, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = proxies
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.listen, 4))
        .map(|listen| {
            tokio::spawn(async move {
                let mut c = Conn::open(ip(1), listen).await;
                let (mut admitted, mut sent) = (0u64, 0u64);
                while started.elapsed() < run {
                    let r = c.send("GET", "/x", &[("x-api-key", "k-a")]).await;
                    sent += 1;
                    match r.status.as_u16() {
                        200 => admitted += 1,
                        429 => assert_eq!(r.reason(), "rate_limited"),
                        s => panic!("unexpected {s}: {}", r.body),
                    }
                }
                (admitted, sent)
            })
        })
        .collect();
    let (mut admitted, mut sent) = (0, 0);
    for t in tasks {
        let (a, n) = t.await.unwrap();
        admitted += a;
        sent += n;
    }
    (admitted, sent, started.elapsed().as_secs_f64())
}

#[tokio::test]
async fn three_proxies_share_one_throttle() {
    let redis = RedisServer::start();
    let throttle = Throttle { rate: 20, per_millis: 1000, burst: 10 };
    let plan = Plan { throttle: Some(throttle), global_limits: true, ..Default::default() };
    let s = setup(&table(&[("shared", plan)], &[("t/a", "k-a", "shared")])).await;
    let mut proxies: Vec<Proxy> = (0..3).map(|i| s.proxy(&redis.url(), &format!("r{i}"))).collect();
    for p in &mut proxies {
        p.ready_with("store: up").await;
    }
    let (admitted, sent, elapsed) = offer_load(&proxies, Duration::from_millis(1500)).await;
    let allowed = 10.0 + 20.0 * elapsed;
    eprintln!("sent {sent}, admitted {admitted} in {elapsed:.2}s; one shared limit allows {allowed:.1}");
    assert!(sent > 3 * admitted, "the run must push well past the limit: sent {sent}");
    // The store's GCRA is authoritative and leases only hold back: never more than burst + rate × elapsed (+1 for
    // the token whose interval started inside the window).
    assert!((admitted as f64) <= allowed + 1.0, "admitted {admitted} > {allowed:.1}: counted per replica?");
    // Leases cost at most (replicas − 1) × chunk (burst / 4 = 2) held back at a time.
    assert!((admitted as f64) >= allowed * 0.75, "admitted only {admitted} of {allowed:.1}");
}

/// Burst 1 banks nothing: plain GCRA loses the time between a token falling due and the next claim reaching Redis
/// (−8.9 % at 100 req/s across 3 replicas in the `global` bench before the store script's carry). With the carry
/// the schedule keeps its phase and at most one token more than burst + rate × elapsed is admitted (asserted). The
/// lower bound is generous: on a loaded machine claims come later than the carry (5 ms), and that capacity is lost
/// (−3 % and −25 % in two runs at load 13 on 2 cores); the figure belongs to the `global` bench.
#[tokio::test]
async fn three_proxies_at_100_per_second_burst_1_keep_the_schedule() {
    let redis = RedisServer::start();
    let throttle = Throttle { rate: 100, per_millis: 1000, burst: 1 };
    let plan = Plan { throttle: Some(throttle), global_limits: true, ..Default::default() };
    let s = setup(&table(&[("shared", plan)], &[("t/a", "k-a", "shared")])).await;
    let mut proxies: Vec<Proxy> = (0..3).map(|i| s.proxy(&redis.url(), &format!("r{i}"))).collect();
    for p in &mut proxies {
        p.ready_with("store: up").await;
    }
    let (admitted, sent, elapsed) = offer_load(&proxies, Duration::from_millis(2000)).await;
    let allowed = 1.0 + 100.0 * elapsed;
    eprintln!(
        "100/s burst 1, 3 proxies: sent {sent}, admitted {admitted} in {elapsed:.2}s; allowed {allowed:.1} ({:+.1} %)",
        (admitted as f64 - allowed) / (100.0 * elapsed) * 100.0
    );
    assert!(sent > 3 * admitted, "the run must push well past the limit: sent {sent}");
    assert!((admitted as f64) <= allowed + 1.0, "admitted {admitted} > {allowed:.1}");
    assert!((admitted as f64) >= allowed * 0.5, "admitted only {admitted} of {allowed:.1}");
}

#[tokio::test]
async fn a_quota_is_exact_across_three_proxies_and_survives_a_restart() {
    let redis = RedisServer::start();
    let quota = Quota { limit: 30, period: Period::Day };
    let plan = Plan { quota: Some(quota), ..Default::default() }; // quotaScope Global is the default
    let s = setup(&table(&[("monthly", plan)], &[("t/q", "k-q", "monthly")])).await;
    let mut proxies: Vec<Proxy> = (0..3).map(|i| s.proxy(&redis.url(), &format!("q{i}"))).collect();
    for p in &mut proxies {
        p.ready_with("store: up").await;
    }
    let send_round_robin = async |proxies: &[Proxy], n: usize| {
        let mut ok = 0;
        for i in 0..n {
            let r = get(ip(1), proxies[i % proxies.len()].listen, "/x", &[("x-api-key", "k-q")]).await;
            match r.status.as_u16() {
                200 => ok += 1,
                429 => assert_eq!(r.reason(), "quota_exceeded"),
                s => panic!("unexpected {s}: {}", r.body),
            }
        }
        ok
    };
    assert_eq!(send_round_robin(&proxies, 20).await, 20);
    // A restart of one replica loses nothing: the count is in the store.
    proxies[0].stop().await;
    proxies[0] = s.proxy(&redis.url(), "q0");
    proxies[0].ready_with("store: up").await;
    assert_eq!(send_round_robin(&proxies, 20).await, 10, "30 in all across the three and the restart");
    // Generous timeout: a loaded test machine can take longer than the default 50 ms to answer.
    let mut config = StoreConfig::new(redis.url());
    (config.timeout, config.connect_timeout) = (Duration::from_secs(2), Duration::from_secs(2));
    let store = Store::connect(&config).await.unwrap();
    let key = quota_key("t/q", "monthly", Period::Day, unix_now());
    assert_eq!(store.quota_used(&[key]).await.unwrap(), vec![30]);
    proxies[1].ready_with("store: up; 3 replicas known").await;
}

/// The same counts on a Redis Cluster (`redis+cluster://`): the throttle and the quota of one client in one script
/// (one slot: the client's hash tag), the replica set, and the controller-side read of the count.
#[tokio::test]
async fn three_proxies_share_a_throttle_and_quota_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let plan = Plan {
        throttle: Some(Throttle { rate: 1_000_000, per_millis: 1000, burst: 1000 }),
        global_limits: true,
        quota: Some(Quota { limit: 30, period: Period::Day }),
        on_store_unavailable: StoreFallback::FailClosed,
        ..Default::default()
    };
    let s = setup(&table(&[("gold", plan)], &[("t/c", "k-c", "gold")])).await;
    let mut proxies: Vec<Proxy> = (0..3).map(|i| s.proxy(&cluster.url(), &format!("c{i}"))).collect();
    for p in &mut proxies {
        p.ready_with("store: up").await;
    }
    let (mut ok, mut unavailable) = (0, 0);
    for i in 0..45 {
        let r = get(ip(1), proxies[i % 3].listen, "/x", &[("x-api-key", "k-c")]).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => assert_eq!(r.reason(), "quota_exceeded"),
            // A store call past the 50 ms timeout on a loaded machine: refused (FailClosed), not counted here.
            503 => unavailable += 1,
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    eprintln!("cluster: {ok} admitted, {unavailable} store timeouts");
    // A timed-out call may still have counted in Redis: then fewer than 30 are admitted, never more.
    if unavailable == 0 {
        assert_eq!(ok, 30, "the quota is exact across the three proxies");
    } else {
        assert!(ok <= 30 && ok >= 30 - unavailable, "{ok} admitted with {unavailable} timeouts");
    }
    let mut config = StoreConfig::new(cluster.url());
    config.timeout = Duration::from_secs(2);
    let store = Store::connect(&config).await.unwrap();
    let key = quota_key("t/c", "gold", Period::Day, unix_now());
    assert_eq!(store.quota_used(&[key]).await.unwrap()[0], 30);
    proxies[2].ready_with("store: up; 3 replicas known").await;
}

#[tokio::test]
async fn redis_stopped_mid_run_each_policy_then_recovery() {
    let mut redis = RedisServer::start();
    let q = |limit| Some(Quota { limit, period: Period::Day });
    let with = |policy, limit| Plan { quota: q(limit), on_store_unavailable: policy, ..Default::default() };
    let t = table(
        &[
            ("local", with(StoreFallback::Local, 10)),
            ("open", with(StoreFallback::FailOpen, 5)),
            ("closed", with(StoreFallback::FailClosed, 100)),
        ],
        &[("t/local", "k-local", "local"), ("t/open", "k-open", "open"), ("t/closed", "k-closed", "closed")],
    );
    let s = setup(&t).await;
    let mut p = s.proxy(&redis.url(), "solo");
    p.ready_with("store: up").await;
    let listen = p.listen;
    let status = async |key: &str| {
        let started = Instant::now();
        let r = get(ip(1), listen, "/x", &[("x-api-key", key)]).await;
        (r.status.as_u16(), started.elapsed(), r)
    };
    // Before the outage: 4 of local's 10, all 5 of open's 5.
    for _ in 0..4 {
        assert_eq!(status("k-local").await.0, 200);
    }
    for _ in 0..5 {
        assert_eq!(status("k-open").await.0, 200);
    }
    assert_eq!(status("k-open").await.0, 429);
    assert_eq!(status("k-closed").await.0, 200);

    redis.stop();
    let mut slowest = Duration::ZERO;
    // FailClosed: 503 store_unavailable.
    for _ in 0..5 {
        let (code, took, r) = status("k-closed").await;
        assert_eq!((code, r.reason().as_str()), (503, "store_unavailable"), "{}", r.body);
        slowest = slowest.max(took);
    }
    // FailOpen: admitted beyond the exhausted quota.
    for _ in 0..5 {
        let (code, took, _) = status("k-open").await;
        assert_eq!(code, 200);
        slowest = slowest.max(took);
    }
    // Local: this replica's share of what was left (10 − 4, one replica known), then 429.
    let mut local_ok = 0;
    for _ in 0..10 {
        let (code, took, _) = status("k-local").await;
        local_ok += u32::from(code == 200);
        slowest = slowest.max(took);
    }
    assert_eq!(local_ok, 6, "the local share of the 6 left");
    // --store-timeout is 50 ms; the circuit opens on the first failure. A generous bound for a loaded machine:
    assert!(slowest < Duration::from_millis(750), "a request waited {slowest:?} during the outage");
    let r = p.readyz().await.unwrap();
    assert_eq!(r.status, 200, "an unreachable store does not take the pod out of the Service");
    assert!(r.body.contains("store: unavailable"), "{}", r.body);
    let metrics = get(ip(1), p.admin, "/metrics", &[]).await.body;
    assert!(metrics.contains("portcullis_proxy_store_up 0"), "{metrics}");
    assert!(metrics.contains("portcullis_proxy_store_fallbacks_total{policy=\"FailClosed\"}"), "{metrics}");

    // Back (empty: no persistence): enforcement resumes in the store.
    redis.restart();
    p.ready_with("store: up").await;
    assert_eq!(status("k-closed").await.0, 200);
    let mut open_ok = 0;
    for _ in 0..8 {
        open_ok += u32::from(status("k-open").await.0 == 200);
    }
    assert_eq!(open_ok, 5, "FailOpen's quota counted in the store again");
}

#[tokio::test]
async fn a_bad_url_stops_the_start_and_bad_credentials_show_in_readyz() {
    let t = table(
        &[("q", Plan { quota: Some(Quota { limit: 5, period: Period::Day }), ..Default::default() })],
        &[("t/a", "k-a", "q")],
    );
    let s = setup(&t).await;
    let mut bad = s.proxy("redis://proxy:hunter2@127.0.0.1:6379", "bad");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = bad.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "a URL with a password must stop the start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success());
    let log = bad.log();
    assert!(log.contains("embeds credentials") && !log.contains("hunter2"), "{log}");

    let redis = RedisServer::start_with_acl("proxy", "s3cret");
    let o = Opts { store_url: &redis.url(), replica: "wrong", username: Some("proxy"), password: Some("wrong-pw") };
    let mut p = Proxy::spawn(s.up, &s.tables, &s.dir, &o);
    let body = p.ready_with("(auth:").await;
    assert!(body.contains("store: unavailable"), "{body}");
    // Requests follow the plan's policy (Local) meanwhile.
    assert_eq!(get(ip(1), p.listen, "/x", &[("x-api-key", "k-a")]).await.status, 200);
    let log = p.log();
    assert!(log.contains("refused the credentials"), "{log}");
    assert!(!log.contains("wrong-pw") && !body.contains("wrong-pw"), "the password never shows");

    let o = Opts { store_url: &redis.url(), replica: "right", username: Some("proxy"), password: Some("s3cret") };
    let mut good = Proxy::spawn(s.up, &s.tables, &s.dir, &o);
    good.ready_with("store: up").await;
}
