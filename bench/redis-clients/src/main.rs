//! Issue 14: the proxies' `TAKE` call through `redis` (redis-rs, what the store crate uses) and through `fred`,
//! against a `redis-server` this program starts on 127.0.0.1 (and stops, also on error).
//!
//! Per client and run: (a) sequential, one call after another; (b) concurrent, 64 tokio tasks sharing the one
//! connection / client. Three runs per client, alternating. Prints a markdown report and writes it to
//! `docs/benchmarks/redis-clients.md`. Run with `cd bench/redis-clients && cargo run --release`.

// The project's own script text, compiled in from the store crate's source (no copy): the file has no imports.
#[allow(dead_code)]
#[path = "../../../store/src/scripts.rs"]
mod scripts;

use anyhow::{Context, Result, bail};
use fred::interfaces::ClientLike;
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const RUNS: usize = 3;
const SEQ_WARMUP: usize = 2_000;
const SEQ_CALLS: usize = 20_000;
const TASKS: usize = 64;
const CONC_WARMUP_PER_TASK: usize = 100;
const CONC_CALLS_PER_TASK: usize = 2_000;
/// Both clients get the same per-command response timeout (the store sets one too: `--store-timeout`, 50 ms); 1 s
/// here so a busy machine shows up as latency, not as failed calls.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
const COMMAND: &str = "cd bench/redis-clients && cargo run --release";

/// The redis-server child; killed when dropped (normal end, error, panic).
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Result<Self> {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (is it on PATH?)")?;
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match raw_command(port, "PING") {
                Ok(r) if r == "+PONG" => return Ok(server),
                _ if Instant::now() > deadline => bail!("redis-server on port {port} did not answer PING within 10 s"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One inline command on a fresh connection; the first line of the answer.
fn raw_command(port: u16, cmd: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string())
}

/// One `Store::take` (store/src/client.rs): KEYS throttle key, quota key; ARGV tokens, interval (µs), burst, units,
/// limit, quota key expiry (Unix s). Keys shaped as `portcullis_table::store_keys` makes them (daily quota).
struct TakeArgs {
    throttle_key: String,
    quota_key: String,
    tokens: u64,
    interval_us: u64,
    burst: u64,
    units: u64,
    limit: u64,
    expires_at: i64,
}

impl TakeArgs {
    /// Client `bench/client-{i}` on plan `gold`: 100 000 req/s (interval 10 µs), burst 1 000, a daily quota of
    /// 10^9; one token and one unit per call (a lease refill asks for more of each: the same call, other numbers).
    /// Never refused at the rates reached here, so every call runs the whole script (throttle and quota).
    fn new(i: usize) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs() as i64;
        let day = now / 86_400;
        let client = format!("bench/client-{i}");
        TakeArgs {
            throttle_key: format!("portcullis:{{{client}}}:gold:t"),
            quota_key: format!("portcullis:{{{client}}}:gold:q:d{day}"),
            tokens: 1,
            interval_us: 10,
            burst: 1_000,
            units: 1,
            limit: 1_000_000_000,
            // period end + QUOTA_KEY_GRACE_SECS (one day)
            expires_at: (day + 1) * 86_400 + 86_400,
        }
    }
}

type Granted = (u64, u64, u64, u64);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Redis,
    Fred,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Fred => "fred",
        }
    }
}

enum Arm {
    /// As the store crate: one `ConnectionManager`, cloned per call, `redis::Script::invoke_async` (EVALSHA, reload
    /// on NOSCRIPT).
    Redis(redis::aio::ConnectionManager, redis::Script),
    /// One `fred::clients::Client` (`init()`), `Script::evalsha_with_reload` (EVALSHA, reload on NOSCRIPT); the
    /// script loaded once at start.
    Fred(fred::clients::Client, fred::types::scripts::Script),
}

impl Arm {
    async fn connect(kind: Kind, port: u16) -> Result<Self> {
        let url = format!("redis://127.0.0.1:{port}");
        Ok(match kind {
            Kind::Redis => {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1);
                let mgr = redis::aio::ConnectionManager::new_with_config(redis::Client::open(url)?, cfg).await?;
                Arm::Redis(mgr, redis::Script::new(scripts::TAKE))
            }
            Kind::Fred => {
                let config = fred::types::config::Config::from_url(&url)?;
                let client = fred::types::Builder::from_config(config)
                    .with_performance_config(|p| p.default_command_timeout = RESPONSE_TIMEOUT)
                    .build()?;
                client.init().await?;
                let script = fred::types::scripts::Script::from_lua(scripts::TAKE);
                script.load(&client).await?;
                Arm::Fred(client, script)
            }
        })
    }

    async fn take(&self, a: &TakeArgs) -> Result<Granted> {
        match self {
            Arm::Redis(mgr, script) => {
                let mut c = mgr.clone();
                let mut inv = script.key(&a.throttle_key);
                inv.key(&a.quota_key)
                    .arg(a.tokens)
                    .arg(a.interval_us.max(1))
                    .arg(a.burst.max(1))
                    .arg(a.units)
                    .arg(a.limit)
                    .arg(a.expires_at);
                Ok(inv.invoke_async(&mut c).await?)
            }
            Arm::Fred(client, script) => {
                let keys = vec![a.throttle_key.as_str(), a.quota_key.as_str()];
                let args = vec![
                    a.tokens as i64,
                    a.interval_us.max(1) as i64,
                    a.burst.max(1) as i64,
                    a.units as i64,
                    a.limit as i64,
                    a.expires_at,
                ];
                Ok(script.evalsha_with_reload(client, keys, args).await?)
            }
        }
    }

    async fn close(self) {
        if let Arm::Fred(client, _) = self {
            let _ = client.quit().await;
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_nanos() as u64).max(1));
}

#[derive(Clone, Copy, Debug)]
struct Stats {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    calls_per_s: f64,
    refused: u64,
}

impl Stats {
    fn of(h: &Histogram<u64>, calls: usize, wall: Duration, refused: u64) -> Self {
        let us = |ns: u64| ns as f64 / 1_000.0;
        Stats {
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            calls_per_s: calls as f64 / wall.as_secs_f64(),
            refused,
        }
    }
}

fn check(g: Granted, refused: &mut u64) {
    if g.0 == 0 || g.2 == 0 {
        *refused += 1;
    }
}

async fn sequential(arm: &Arm) -> Result<Stats> {
    let a = TakeArgs::new(0);
    for _ in 0..SEQ_WARMUP {
        arm.take(&a).await?;
    }
    let mut h = histogram();
    let mut refused = 0;
    let start = Instant::now();
    for _ in 0..SEQ_CALLS {
        let t = Instant::now();
        let g = arm.take(&a).await?;
        record(&mut h, t.elapsed());
        check(g, &mut refused);
    }
    Ok(Stats::of(&h, SEQ_CALLS, start.elapsed(), refused))
}

async fn concurrent(arm: Arc<Arm>) -> Result<Stats> {
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS + 1));
    let mut tasks = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        let (arm, barrier) = (arm.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let a = TakeArgs::new(i + 1);
            let warm = async {
                for _ in 0..CONC_WARMUP_PER_TASK {
                    arm.take(&a).await?;
                }
                anyhow::Ok(())
            }
            .await;
            // Always reach the barrier, so a failing task does not leave the others waiting.
            barrier.wait().await;
            warm?;
            let mut h = histogram();
            let mut refused = 0;
            for _ in 0..CONC_CALLS_PER_TASK {
                let t = Instant::now();
                let g = arm.take(&a).await?;
                record(&mut h, t.elapsed());
                check(g, &mut refused);
            }
            anyhow::Ok((h, refused))
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut all = histogram();
    let mut refused = 0;
    for t in tasks {
        let (h, r) = t.await??;
        all.add(&h)?;
        refused += r;
    }
    Ok(Stats::of(&all, TASKS * CONC_CALLS_PER_TASK, start.elapsed(), refused))
}

struct RunResult {
    kind: Kind,
    run: usize,
    seq: Stats,
    conc: Stats,
}

fn median_and_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt_us(x: f64) -> String {
    if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.1}") }
}

fn fmt_rate(x: f64) -> String {
    // Thousands separated by a thin space, as the project's docs write numbers.
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn shell(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("({cmd} failed)"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_else(|_| "(unknown)".into())
}

/// `name version` of each package from this package's Cargo.lock.
fn locked_versions(names: &[&str]) -> Vec<String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap_or_default();
    let mut out = Vec::new();
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if let Some(name) = l.strip_prefix("name = \"").and_then(|s| s.strip_suffix('"'))
            && names.contains(&name)
            && let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = \"")).and_then(|v| v.strip_suffix('"'))
        {
            out.push(format!("`{name}` {v}"));
        }
    }
    out
}

fn report(results: &[RunResult], started: &str, ended: &str, load_before: &str, load_after: &str) -> String {
    let mut md = String::new();
    let w = &mut md;
    use std::fmt::Write as _;
    let _ = writeln!(w, "# Redis clients: `redis` (redis-rs) vs `fred`, the `TAKE` call (issue 14)\n");
    let _ = writeln!(
        w,
        "Written by `bench/redis-clients` (`{COMMAND}`); rerunning it overwrites this file. The interpretation and the \
         decision are in [../global-limits.md](../global-limits.md#client-library).\n"
    );
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| run | {started} – {ended} |");
    let _ = writeln!(w, "| command | `{COMMAND}` (release build) |");
    let _ = writeln!(w, "| repository commit | {} |", shell("git", &["rev-parse", "--short", "HEAD"]));
    let _ = writeln!(w, "| redis-server | `{}` |", shell("redis-server", &["--version"]));
    let _ = writeln!(
        w,
        "| crates (bench/redis-clients/Cargo.lock) | {} |",
        locked_versions(&["redis", "fred", "tokio", "hdrhistogram"]).join(", ")
    );
    let _ = writeln!(w, "| rustc | `{}` |", shell("rustc", &["--version"]));
    let _ = writeln!(w, "| nproc | {} |", shell("nproc", &[]));
    let _ = writeln!(w, "| /proc/loadavg before | `{load_before}` |");
    let _ = writeln!(w, "| /proc/loadavg after | `{load_after}` |");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "**What is measured.** The project's `TAKE` script (`store/src/scripts.rs`, compiled in from that file) called \
         exactly as `Store::take` calls it: KEYS throttle key, quota key (`portcullis:{{bench/client-N}}:gold:t`, \
         `…:gold:q:dDAY`), ARGV tokens 1, interval 10 µs, burst 1 000, units 1, limit 10^9, expiry; every call is \
         granted (a refused call would be counted in the `refused` column), so each runs the whole script. \
         `redis`: one `ConnectionManager` (cloned per call, as the store does), `redis::Script::invoke_async`. \
         `fred`: one `Client` (`init()`), `Script::evalsha_with_reload` after one `SCRIPT LOAD`. Both: EVALSHA with \
         a reload on NOSCRIPT, one multiplexed TCP connection, RESP2, a {} s response timeout, default settings \
         otherwise. Tokio multi-thread runtime with 2 workers; `redis-server` (same machine, sharing the 2 cores) on 127.0.0.1 started by the bench \
         (`--save '' --appendonly no`), `FLUSHALL` before each arm. Order: {} runs alternating redis, fred. \
         (a) sequential: {} warm-up calls, then {} calls one after another, latency of each; (b) concurrent: {} \
         tasks share the one connection / client, {} warm-up calls each, then {} calls each, latency of each and \
         total calls / wall time. Latencies in µs (hdrhistogram, 3 significant digits).\n",
        RESPONSE_TIMEOUT.as_secs(),
        RUNS,
        fmt_rate(SEQ_WARMUP as f64),
        fmt_rate(SEQ_CALLS as f64),
        TASKS,
        CONC_WARMUP_PER_TASK,
        fmt_rate(CONC_CALLS_PER_TASK as f64),
    );

    let _ = writeln!(w, "## Summary: median of {RUNS} runs (range)\n");
    let _ = writeln!(w, "| figure | redis | fred | fred / redis (medians) |\n|---|---|---|---|");
    type Pick = fn(&RunResult) -> f64;
    let rows: [(&str, Pick, bool); 9] = [
        ("sequential p50 (µs)", |r| r.seq.p50_us, false),
        ("sequential p99 (µs)", |r| r.seq.p99_us, false),
        ("sequential p99.9 (µs)", |r| r.seq.p999_us, false),
        ("sequential max (µs)", |r| r.seq.max_us, false),
        ("sequential calls/s", |r| r.seq.calls_per_s, true),
        ("concurrent (64 tasks) p50 (µs)", |r| r.conc.p50_us, false),
        ("concurrent p99 (µs)", |r| r.conc.p99_us, false),
        ("concurrent p99.9 (µs)", |r| r.conc.p999_us, false),
        ("concurrent calls/s", |r| r.conc.calls_per_s, true),
    ];
    for (label, pick, rate) in rows {
        let f = if rate { fmt_rate } else { fmt_us };
        let mut med = [0.0; 2];
        let mut cells = Vec::new();
        for (i, kind) in [Kind::Redis, Kind::Fred].into_iter().enumerate() {
            let v: Vec<f64> = results.iter().filter(|r| r.kind == kind).map(pick).collect();
            let (m, lo, hi) = median_and_range(v);
            med[i] = m;
            cells.push(format!("**{}** ({} – {})", f(m), f(lo), f(hi)));
        }
        let _ = writeln!(w, "| {label} | {} | {} | {:.2} |", cells[0], cells[1], med[1] / med[0]);
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "## Each run\n");
    let _ = writeln!(
        w,
        "| # | client | seq p50 | seq p99 | seq p99.9 | seq max | seq calls/s | conc p50 | conc p99 | conc p99.9 | \
         conc max | conc calls/s | refused |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.run,
            r.kind.name(),
            fmt_us(r.seq.p50_us),
            fmt_us(r.seq.p99_us),
            fmt_us(r.seq.p999_us),
            fmt_us(r.seq.max_us),
            fmt_rate(r.seq.calls_per_s),
            fmt_us(r.conc.p50_us),
            fmt_us(r.conc.p99_us),
            fmt_us(r.conc.p999_us),
            fmt_us(r.conc.max_us),
            fmt_rate(r.conc.calls_per_s),
            r.seq.refused + r.conc.refused,
        );
    }
    md
}

fn utc_now() -> String {
    shell("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
}

async fn bench(server: &Server) -> Result<Vec<RunResult>> {
    let mut results = Vec::new();
    for run in 1..=RUNS {
        for kind in [Kind::Redis, Kind::Fred] {
            let flushed = raw_command(server.port, "FLUSHALL")?;
            if flushed != "+OK" {
                bail!("FLUSHALL answered {flushed:?}");
            }
            let arm = Arm::connect(kind, server.port).await.with_context(|| format!("connecting {}", kind.name()))?;
            let seq = sequential(&arm).await.with_context(|| format!("{} sequential", kind.name()))?;
            let arm = Arc::new(arm);
            let conc = concurrent(arm.clone()).await.with_context(|| format!("{} concurrent", kind.name()))?;
            if let Ok(arm) = Arc::try_unwrap(arm) {
                arm.close().await;
            }
            eprintln!(
                "run {run} {:5}: sequential p50 {} µs p99 {} µs {} calls/s; concurrent p50 {} µs p99 {} µs {} calls/s",
                kind.name(),
                fmt_us(seq.p50_us),
                fmt_us(seq.p99_us),
                fmt_rate(seq.calls_per_s),
                fmt_us(conc.p50_us),
                fmt_us(conc.p99_us),
                fmt_rate(conc.calls_per_s)
            );
            results.push(RunResult { kind, run, seq, conc });
        }
    }
    Ok(results)
}

fn main() -> Result<()> {
    let load_before = loadavg();
    let started = utc_now();
    let server = Server::start()?;
    eprintln!("redis-server on 127.0.0.1:{}; load before: {load_before}", server.port);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let results = rt.block_on(bench(&server));
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(server);
    let results = results?;
    let load_after = loadavg();
    let md = report(&results, &started, &utc_now(), &load_before, &load_after);
    println!("{md}");
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/benchmarks/redis-clients.md");
    std::fs::write(out, &md).with_context(|| format!("writing {out}"))?;
    eprintln!("written: docs/benchmarks/redis-clients.md");
    Ok(())
}
