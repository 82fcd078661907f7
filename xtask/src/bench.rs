//! `cargo xtask bench proxy-load`: a bounded loopback load run of the release proxy binary against a direct
//! upstream, with the proxy's memory (RSS) idle and under load. Uses `wrk` (Debian package `wrk`).
//!
//! Arms: D = wrk → upstream directly; P = wrk → portcullis-proxy → upstream, with a table of N clients, every
//! request carrying a valid key from an allowed address (full pipeline: digest, lookup, CIDR, route, throttle,
//! quota). Arms are interleaved (D P D P …) and the median of the runs is reported.

use anyhow::{Context, Result, bail};
use portcullis_table::{Client, KeyEntry, Period, Plan, Quota, RouteScope, Table, Throttle, key_digest};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 3;
const SECONDS: u32 = 5;
const CONNECTIONS: u32 = 16;

pub fn proxy_load(root: &Path, clients: usize) -> Result<()> {
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk not found: apt-get install wrk");
    }
    eprintln!("xtask bench: building the release proxy");
    let st = Command::new("cargo")
        .current_dir(root)
        .args(["build", "--release", "-q", "-p", "portcullis-proxy"])
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    let dir = tempdir()?;
    let table = dir.join("tables.json");
    std::fs::write(&table, load_table(clients).to_json())?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let upstream = rt.block_on(crate::http::start_sized_upstream(1024))?;
    let rt_thread = std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    let _ = rt_thread; // the upstream runs until the process ends

    let port = free_port()?;
    let admin = free_port()?;
    let mut proxy = Command::new(root.join("target/release/portcullis-proxy"))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--admin-listen=127.0.0.1:{admin}"))
        .arg(format!("--upstream={upstream}"))
        .arg(format!("--tables={}", table.display()))
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting portcullis-proxy")?;
    let pid = proxy.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !curl_ok(&format!("http://127.0.0.1:{admin}/readyz")) {
        if Instant::now() > deadline {
            let _ = proxy.kill();
            bail!("proxy not ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle_rss = rss_kib(pid)?;
    let (mut d, mut p) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        d.push(wrk(&format!("http://{upstream}/v1/items"))?);
        p.push(wrk(&format!("http://127.0.0.1:{port}/v1/items"))?);
    }
    let loaded_rss = rss_kib(pid)?;
    let hwm = hwm_kib(pid)?;
    let _ = proxy.kill();
    let _ = proxy.wait();
    let med = |v: &mut Vec<Run>| {
        v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        v[v.len() / 2].clone()
    };
    let (d, p) = (med(&mut d), med(&mut p));
    println!(
        "proxy load ({clients} clients in the table, wrk -t1 -c{CONNECTIONS} -d{SECONDS}s, median of {RUNS}, interleaved):"
    );
    println!("| arm | req/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    println!("| D direct | {:.0} | {} | {} |", d.rps, d.p50, d.p99);
    println!("| P portcullis-proxy | {:.0} | {} | {} |", p.rps, p.p50, p.p99);
    println!("P/D throughput ratio: {:.2}", p.rps / d.rps);
    println!(
        "proxy RSS: idle with table {:.1} MiB, after load {:.1} MiB, peak {:.1} MiB",
        idle_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[derive(Clone)]
struct Run {
    rps: f64,
    p50: String,
    p99: String,
}

fn wrk(url: &str) -> Result<Run> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{SECONDS}s"), "--latency"])
        .args(["-H", "x-api-key: bench-key-0"])
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw non-2xx answers from {url}:\n{text}");
    }
    let field = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string())).unwrap_or_default()
    };
    let rps: f64 = field("Requests/sec:").parse().with_context(|| format!("parsing wrk output:\n{text}"))?;
    Ok(Run { rps, p50: field("50%"), p99: field("99%") })
}

/// N clients; client 0 holds `bench-key-0` and is allowed from 127.0.0.1; limits are set far above the load.
fn load_table(n: usize) -> Table {
    let mut plans = BTreeMap::new();
    plans.insert(
        "bench".to_string(),
        Plan {
            throttle: Some(Throttle { rate: 1_000_000_000, per_millis: 1000, burst: 1_000_000 }),
            quota: Some(Quota { limit: 1_000_000_000_000, period: Period::Month }),
            global_limits: false,
            routes: vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] }],
        },
    );
    let clients = (0..n.max(1))
        .map(|i| Client {
            id: format!("bench/client-{i:06}"),
            keys: vec![KeyEntry { sha256: key_digest(format!("bench-key-{i}").as_bytes()), expires_at: None }],
            source_ranges: vec![if i == 0 {
                "127.0.0.1/32".parse().expect("cidr")
            } else {
                format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255).parse().expect("cidr")
            }],
            disabled: false,
            plans: vec!["bench".into()],
        })
        .collect();
    Table::new("bench/upstream", plans, clients)
}

fn status_field_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
        .with_context(|| format!("{field} not in /proc/{pid}/status"))
}

fn rss_kib(pid: u32) -> Result<u64> {
    status_field_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> Result<u64> {
    status_field_kib(pid, "VmHWM:")
}

fn curl_ok(url: &str) -> bool {
    Command::new("curl").args(["-fsS", "-o", "/dev/null", url]).status().is_ok_and(|s| s.success())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("portcullis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
