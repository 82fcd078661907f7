//! The suites. Each returns (results JSON, Markdown body, optional SVG).

use super::load::{self, Wrk, openloop, round, wrk};
use super::servers::{self, LIMIT_FREE, Proc, cpu_seconds, cpu_split, hwm_mib, reset_hwm, rss_mib};
use super::{Ctx, bar_svg};
use anyhow::{Context, Result};
use portcullis_table::Throttle;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

type Out = (Value, String, Option<String>);

const CONNS: u32 = 32;

struct Knobs {
    secs: f64,
    reps: usize,
    clients: usize,
}

fn knobs(ctx: &Ctx) -> Knobs {
    if ctx.smoke { Knobs { secs: 1.0, reps: 1, clients: 100 } } else { Knobs { secs: 5.0, reps: 5, clients: 10_000 } }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn write_table(path: &Path, t: &portcullis_table::Table) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, t.to_json())?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/v1/items")
}

/// CPU spent by the server side of one closed-loop run.
#[derive(Clone, Copy, Debug)]
struct RunCpu {
    /// The arm's process plus the upstream (D: the upstream only): CPU-s per 1 000 requests.
    server_per_1k: f64,
    /// The arm's own process alone, per request: user-space and kernel CPU in µs.
    user_us: f64,
    sys_us: f64,
}

/// One wrk run with the server's CPU time (`pids`: processes whose utime+stime count as the server side, the arm's own
/// process first).
fn wrk_cpu(addr: SocketAddr, k: &Knobs, pids: &[u32]) -> Result<(Wrk, RunCpu)> {
    let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let (u0, s0) = cpu_split(pids[0])?;
    let w = wrk(&url(addr), CONNS, k.secs, &servers::key(0), false)?;
    let (u1, s1) = cpu_split(pids[0])?;
    let after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let n = w.requests.max(1) as f64;
    let cpu = RunCpu {
        server_per_1k: (after - before) / n * 1000.0,
        user_us: (u1 - u0) / n * 1e6,
        sys_us: (s1 - s0) / n * 1e6,
    };
    Ok((w.clone(), cpu))
}

pub fn throughput(ctx: &Ctx, bin: &Path) -> Result<Out> {
    let k = knobs(ctx);
    let (p0t, p1t) = (ctx.tmp.join("p0.json"), ctx.tmp.join("p1.json"));
    write_table(&p0t, &servers::table(1, None, false))?;
    write_table(&p1t, &servers::table(k.clients, Some(LIMIT_FREE), true))?;
    let up = servers::start_upstream()?;
    let n0 = servers::start_nginx(&ctx.tmp, up.addr, false, 0)?;
    let n1 = servers::start_nginx(&ctx.tmp, up.addr, true, k.clients)?;
    let h0 = servers::start_haproxy(&ctx.tmp, up.addr, false, 0)?;
    let h1 = servers::start_haproxy(&ctx.tmp, up.addr, true, k.clients)?;
    let p0 = servers::start_proxy(bin, up.addr, &p0t)?;
    let p1 = servers::start_proxy(bin, up.addr, &p1t)?;
    let access_log = ctx.tmp.join("p1l-access.log");
    let p1l = servers::start_proxy_logging(bin, up.addr, &p1t, &access_log)?;
    let arms: [(&str, &Proc); 8] =
        [("D", &up), ("N0", &n0), ("N1", &n1), ("H0", &h0), ("H1", &h1), ("P0", &p0), ("P1", &p1), ("P1L", &p1l)];
    let pids = |name: &str, p: &Proc| if name == "D" { vec![p.pid()] } else { vec![p.pid(), up.pid()] };
    for (name, p) in arms.iter().filter(|(n, _)| ["N1", "H1", "P1", "P1L"].contains(n)) {
        servers::check_policy(name, p.addr)?;
    }
    // The smoke run (no figures) skips the warm-ups: its one measured second exercises every arm already.
    for (name, p) in arms.iter().filter(|_| !ctx.smoke) {
        let w = wrk(&url(p.addr), CONNS, 1.0, &servers::key(0), false).with_context(|| format!("warm-up {name}"))?;
        eprintln!("  warm-up {name}: {:.0} req/s", w.rps);
    }
    let mut runs: Vec<Vec<(Wrk, RunCpu)>> = vec![Vec::new(); arms.len()];
    for r in 0..k.reps {
        for (i, (name, p)) in arms.iter().enumerate() {
            let (w, cpu) = wrk_cpu(p.addr, &k, &pids(name, p))?;
            eprintln!("  run {r} {name}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms", w.rps, w.lat_ms[0], w.lat_ms[3]);
            runs[i].push((w, cpu));
        }
    }
    let med_run = |i: usize| {
        let mut v = runs[i].clone();
        v.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
        v[v.len() / 2].clone()
    };
    let meds: Vec<(Wrk, RunCpu)> = (0..arms.len()).map(med_run).collect();
    let rps = |n: &str| meds[arms.iter().position(|(a, _)| *a == n).expect("arm")].0.rps;
    let ratios = json!({
        "P1/N1": round(rps("P1") / rps("N1"), 3), "P1/P0": round(rps("P1") / rps("P0"), 3),
        "P0/D": round(rps("P0") / rps("D"), 3), "N1/N0": round(rps("N1") / rps("N0"), 3),
        "N0/D": round(rps("N0") / rps("D"), 3), "P1L/P1": round(rps("P1L") / rps("P1"), 3),
        "P0/N0": round(rps("P0") / rps("N0"), 3), "P1/H1": round(rps("P1") / rps("H1"), 3),
        "H1/H0": round(rps("H1") / rps("H0"), 3), "P0/H0": round(rps("P0") / rps("H0"), 3),
    });
    let log_lines = std::fs::read(&access_log).map(|b| b.iter().filter(|c| **c == b'\n').count()).unwrap_or(0);
    // Open loop at half of N1's peak: latency from the intended send time.
    let rate = ((rps("N1") / 2.0) as u64).max(100);
    // Repeated so that the spread of p99 is a figure of its own (`PORTCULLIS_OPENLOOP_REPS` overrides 10).
    let ol_reps = if ctx.smoke {
        1
    } else {
        std::env::var("PORTCULLIS_OPENLOOP_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10usize).max(1)
    };
    let mut ol: Vec<Vec<load::OpenLoop>> = vec![Vec::new(); arms.len()];
    for _ in 0..ol_reps {
        for (i, (name, p)) in arms.iter().enumerate() {
            let o = openloop(p.addr, rate, k.secs, 16, &servers::key(0))?;
            eprintln!("  open loop {name} at {rate}/s: p50 {:.3} p99 {:.3} ms", o.get("p50"), o.get("p99"));
            ol[i].push(o);
        }
    }
    let pcts = ["p50", "p90", "p99", "p99.9"];
    let ol_med = |i: usize, p: &str| median(ol[i].iter().map(|o| o.get(p)).collect());
    let mut added = serde_json::Map::new();
    let mut ol_abs = serde_json::Map::new();
    for (i, (name, _)) in arms.iter().enumerate() {
        let mut a = serde_json::Map::new();
        let mut b = serde_json::Map::new();
        for p in pcts {
            b.insert(p.into(), json!(round(ol_med(i, p), 4)));
            if i > 0 {
                a.insert(p.into(), json!(round(ol_med(i, p) - ol_med(0, p), 4)));
            }
        }
        ol_abs.insert(name.to_string(), b.into());
        if i > 0 {
            added.insert(name.to_string(), a.into());
        }
    }
    let added = Value::Object(added);
    // The spread of p99 over the repetitions, per arm: min, median, max.
    let p99_spread = |i: usize| {
        let mut v: Vec<f64> = ol[i].iter().map(|o| o.get("p99")).filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let (min, max) = (v.first().copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN));
        (min, median(v.clone()), max, v)
    };
    let spread_json: serde_json::Map<String, Value> = arms
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let (min, med, max, v) = p99_spread(i);
            let runs: Vec<f64> = v.iter().map(|x| round(*x, 3)).collect();
            (
                name.to_string(),
                json!({"min": round(min, 4), "median": round(med, 4), "max": round(max, 4), "runs": runs}),
            )
        })
        .collect();
    let med_p99 = |n: &str| p99_spread(arms.iter().position(|(a, _)| *a == n).expect("arm")).1;
    let p99_goal = med_p99("P1") <= med_p99("N1") && med_p99("P1") <= med_p99("H1");
    let arms_json: Vec<Value> = arms
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            json!({"arm": name, "median": meds[i].0.json(), "server_cpu_s_per_1k_req": round(meds[i].1.server_per_1k, 5),
                   "arm_cpu_us_per_req": {"user": round(meds[i].1.user_us, 2), "kernel": round(meds[i].1.sys_us, 2)},
                   "rps_runs": runs[i].iter().map(|r| round(r.0.rps, 0)).collect::<Vec<_>>(),
                   "open_loop_runs": ol[i].iter().map(|o| o.json()).collect::<Vec<_>>()})
        })
        .collect();
    let data = json!({
        "clients_p1_n1": k.clients, "runs": k.reps, "seconds_per_run": k.secs, "wrk_connections": CONNS,
        "wrk_command": load::wrk_cmd("URL", CONNS, k.secs, "bench-key-0").join(" "),
        "open_loop": {"rate_rps": rate, "connections": 16, "seconds": k.secs, "runs": ol_reps,
                      "command": load::openloop_cmd(up.addr, rate, k.secs, 16, "bench-key-0")?.join(" "),
                      "latency_ms": Value::Object(ol_abs), "p99_spread_ms": Value::Object(spread_json),
                      "p1_median_p99_at_most_n1_and_h1": p99_goal},
        "arms": arms_json, "ratios": ratios, "added_latency_ms": added, "access_log_lines": log_lines,
    });
    let desc = [
        "D: direct to the upstream (hyper, 1 KiB body)",
        "N0: nginx pass-through, upstream keepalive",
        "N1: nginx with map(key→client) + geo(CIDR→client) + route + limit_req per client",
        "H0: HAProxy 2.6 pass-through, connection reuse",
        "H1: HAProxy with map(key→client) + map_ip(CIDR→client) + route + stick-table rate per client",
        "P0: portcullis, 1 client, no throttle/quota",
        "P1: portcullis, full policy, all clients loaded",
        "P1L: P1 with its access log on (JSON, every request, stdout to a file)",
    ];
    let mut md = format!(
        "Closed loop: `{}` against each arm, arms interleaved (D N0 N1 H0 H1 P0 P1 P1L, D N0 …), {} runs of {} s after a \
         1 s warm-up each; the run with the median req/s is shown. N1, H1 and P1 hold {} clients. Server CPU counts the arm's \
         process plus the upstream (D: upstream only); the arm's own process (D: the upstream) is also split into user-space \
         and kernel CPU per request, from `utime` and `stime` in `/proc/PID/stat` around the same run.\n\n\
         | arm | req/s (median) | wrk p50 ms | p90 ms | p99 ms | server CPU s / 1 000 req | arm user µs / req | arm kernel µs / req | runs (req/s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        load::wrk_cmd("URL", CONNS, k.secs, "bench-key-0").join(" "),
        k.reps,
        k.secs,
        k.clients
    );
    for (i, d) in desc.iter().enumerate() {
        let (w, cpu) = &meds[i];
        md.push_str(&format!(
            "| {d} | {:.0} | {:.3} | {:.3} | {:.3} | {:.4} | {:.2} | {:.2} | {} |\n",
            w.rps,
            w.lat_ms[0],
            w.lat_ms[2],
            w.lat_ms[3],
            cpu.server_per_1k,
            cpu.user_us,
            cpu.sys_us,
            runs[i].iter().map(|r| format!("{:.0}", r.0.rps)).collect::<Vec<_>>().join(", ")
        ));
    }
    md.push_str(&format!(
        "\n**Ratios** (goal in brackets): P1/N1 = {} (≥ 1.5), P0/N0 = {} (≥ 1.1), P1/H1 = {} (≥ 1.3), P1/P0 = {} \
         (≥ 0.95); P0/H0 = {}, H1/H0 = {}, N1/N0 = {}, N0/D = {}, P0/D = {}; access log on vs off P1L/P1 = {} (≥ 0.9; \
         {log_lines} lines written).\n\n",
        ratios["P1/N1"],
        ratios["P0/N0"],
        ratios["P1/H1"],
        ratios["P1/P0"],
        ratios["P0/H0"],
        ratios["H1/H0"],
        ratios["N1/N0"],
        ratios["N0/D"],
        ratios["P0/D"],
        ratios["P1L/P1"]
    ));
    md.push_str(&format!(
        "**Open loop** at a fixed {rate} req/s (half of N1's median peak), 16 connections, {} s, {ol_reps} run(s) per \
         arm interleaved, median per percentile. Generator: `bench-openloop` (tokio + hyper client pinned to \
         CPU 0); each request has an intended send time on a fixed schedule and its latency is measured from that \
         time, so waiting behind a slow answer counts (no coordinated omission). Added latency = arm − D at the \
         same percentile.\n\n| arm | p50 ms | p90 ms | p99 ms | p99.9 ms | added p50 | added p90 | added p99 | added p99.9 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        k.secs
    ));
    for (i, (name, _)) in arms.iter().enumerate() {
        let a = |p: &str| if i == 0 { "—".to_string() } else { format!("{:.3}", ol_med(i, p) - ol_med(0, p)) };
        md.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
            ol_med(i, "p50"),
            ol_med(i, "p90"),
            ol_med(i, "p99"),
            ol_med(i, "p99.9"),
            a("p50"),
            a("p90"),
            a("p99"),
            a("p99.9")
        ));
    }
    md.push_str(&format!(
        "\n**p99 over the {ol_reps} open-loop runs** (min / median / max, ms; goal: P1's median ≤ N1's and ≤ H1's — \
         {}):\n\n| arm | min | median | max | runs |\n|---|---:|---:|---:|---|\n",
        if p99_goal { "met" } else { "**not met**" }
    ));
    for (i, (name, _)) in arms.iter().enumerate() {
        let (min, med, max, v) = p99_spread(i);
        let runs = v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ");
        md.push_str(&format!("| {name} | {min:.3} | {med:.3} | {max:.3} | {runs} |\n"));
    }
    let groups: Vec<(String, Vec<f64>)> = arms.iter().map(|(n, _)| (n.to_string(), vec![rps(n)])).collect();
    let svg1 = bar_svg("Throughput, median req/s (wrk, closed loop)", "req/s", &["req/s"], &groups);
    let ai = |n: &str| arms.iter().position(|(a, _)| *a == n).expect("arm");
    let groups2: Vec<(String, Vec<f64>)> = pcts
        .iter()
        .map(|p| {
            (
                p.to_string(),
                ["N1", "H1", "P0", "P1"].iter().map(|n| ol_med(ai(n), p) - ol_med(0, p)).collect::<Vec<f64>>(),
            )
        })
        .collect();
    let svg2 = bar_svg(
        &format!("Added latency vs direct at {rate} req/s (open loop)"),
        "ms",
        &["N1", "H1", "P0", "P1"],
        &groups2,
    );
    md.push_str(&super::write_plot(&ctx.out, "throughput-latency", &svg2)?);
    Ok((data, md, Some(svg1)))
}

pub fn memory(ctx: &Ctx, bin: &Path) -> Result<Out> {
    let k = knobs(ctx);
    let secs = if ctx.smoke { 1.0 } else { 10.0 };
    let up = servers::start_upstream()?;
    // No table: the file does not exist; the proxy stays up, answers 503 no_table.
    let missing = ctx.tmp.join("missing.json");
    let idle = |p: &Proc| -> Result<f64> {
        std::thread::sleep(Duration::from_secs(1));
        rss_mib(p.pid())
    };
    let none = {
        let (port, admin) = (servers::free_port()?, servers::free_port()?);
        let child = std::process::Command::new("taskset")
            .args(["-c", load::SERVER_CPU])
            .arg(bin)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin}"))
            .arg(format!("--upstream={}", up.addr))
            .arg(format!("--tables={}", missing.display()))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut p = Proc { child, addr: ([127, 0, 0, 1], port).into(), admin: None };
        std::thread::sleep(Duration::from_millis(500));
        if p.child.try_wait()?.is_some() { None } else { Some(idle(&p)?) }
    };
    let small = ctx.tmp.join("small.json");
    write_table(&small, &servers::table(1, None, false))?;
    let ps = servers::start_proxy(bin, up.addr, &small)?;
    let small_idle = idle(&ps)?;
    drop(ps);
    let big = ctx.tmp.join("big.json");
    write_table(&big, &servers::table(k.clients, Some(LIMIT_FREE), true))?;
    let pb = servers::start_proxy(bin, up.addr, &big)?;
    let big_idle = idle(&pb)?;
    wrk(&url(pb.addr), CONNS, 1.0, &servers::key(0), false)?;
    reset_hwm(pb.pid());
    let c0 = cpu_seconds(pb.pid())?;
    let w = wrk(&url(pb.addr), CONNS, secs, &servers::key(0), false)?;
    let c1 = cpu_seconds(pb.pid())?;
    let load_peak = hwm_mib(pb.pid())?;
    let after = rss_mib(pb.pid())?;
    let cpu_per_1k = (c1 - c0) / w.requests as f64 * 1000.0;
    let vcpu_per_1k_rps = cpu_per_1k; // CPU-s per 1 000 requests == vCPU per 1 000 req/s
    let data = json!({
        "clients": k.clients,
        "rss_mib": {"idle_no_table": none.map(|v| round(v, 2)), "idle_1_client": round(small_idle, 2),
                    "idle_clients": round(big_idle, 2), "under_load_peak": round(load_peak, 2),
                    "after_load": round(after, 2)},
        "load": w.json(),
        "proxy_cpu_s": round(c1 - c0, 2),
        "proxy_cpu_s_per_1k_req": round(cpu_per_1k, 5),
        "wrk_command": load::wrk_cmd("URL", CONNS, secs, "bench-key-0").join(" "),
    });
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "(proxy exits without a table)".into());
    let md = format!(
        "portcullis-proxy (release) pinned to CPU 1, RSS from `/proc/PID/status` (VmRSS; peak = VmHWM after resetting \
         it with `clear_refs` just before the load), CPU = utime+stime from `/proc/PID/stat` around one wrk run.\n\n\
         | state | RSS MiB | goal |\n|---|---:|---|\n\
         | idle, no table (file missing, serving 503) | {} | ≤ 8 MB idle |\n| idle, 1 client | {small_idle:.1} | ≤ 8 MB idle |\n\
         | idle, {c} clients | {big_idle:.1} | |\n| {c} clients, peak during {secs} s of wrk -c{CONNS} ({:.0} req/s) | {load_peak:.1} | ≤ 20 MB |\n\
         | {c} clients, right after the load | {after:.1} | |\n\n\
         CPU: {:.2} CPU-s for {} requests = **{cpu_per_1k:.4} CPU-s per 1 000 requests**, i.e. {vcpu_per_1k_rps:.4} vCPU \
         per 1 000 req/s (goal ≤ 0.04; the proxy only, not the upstream). Measured at saturation on one core, so it \
         includes wrk's per-connection contention and the proxy's own upstream client.\n",
        opt(none),
        w.rps,
        c1 - c0,
        w.requests,
        c = k.clients,
    );
    let groups = vec![
        ("no table".to_string(), vec![none.unwrap_or(f64::NAN)]),
        ("1 client".to_string(), vec![small_idle]),
        (format!("{} idle", k.clients), vec![big_idle]),
        (format!("{} load peak", k.clients), vec![load_peak]),
    ];
    Ok((data, md, Some(bar_svg("portcullis-proxy RSS", "MiB", &["RSS"], &groups))))
}

/// GET /metrics over a plain socket (fast enough to poll every few ms).
fn metrics(admin: SocketAddr) -> Result<String> {
    let mut s = std::net::TcpStream::connect(admin)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn serving_revision(admin: SocketAddr, rev: &str) -> bool {
    metrics(admin).is_ok_and(|m| {
        m.lines().any(|l| {
            l.starts_with("portcullis_proxy_table_info")
                && l.contains(&format!("revision=\"{rev}\""))
                && l.ends_with(" 1")
        })
    })
}

pub fn scale(ctx: &Ctx, bin: &Path) -> Result<Out> {
    let k = knobs(ctx);
    let sizes: &[usize] = if ctx.smoke { &[10, 1000] } else { &[10, 1000, 10_000, 100_000] };
    let up = servers::start_upstream()?;
    let mut proxies = Vec::new();
    for &n in sizes {
        let path = ctx.tmp.join(format!("scale-{n}.json"));
        write_table(&path, &servers::table(n, Some(LIMIT_FREE), true))?;
        let t = Instant::now();
        let p = servers::start_proxy(bin, up.addr, &path)?;
        eprintln!("  proxy with {n} clients ready in {:.2} s", t.elapsed().as_secs_f64());
        proxies.push((n, path, p, t.elapsed().as_secs_f64()));
    }
    for (_, _, p, _) in &proxies {
        wrk(&url(p.addr), CONNS, 1.0, &servers::key(0), false)?;
    }
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for _ in 0..k.reps {
        for (i, (n, _, p, _)) in proxies.iter().enumerate() {
            let w = wrk(&url(p.addr), CONNS, k.secs, &servers::key(0), false)?;
            eprintln!("  {n} clients: {:.0} req/s", w.rps);
            rps[i].push(w.rps);
        }
    }
    // Swaps: rewrite the file (write + rename) with a table of the same size but a new revision; time until
    // /metrics shows it in force; peak RSS (VmHWM reset just before) during the swap.
    let swaps = if ctx.smoke { 1 } else { 3 };
    let mut rows = Vec::new();
    let mut md = format!(
        "P1 (full policy: key, CIDR, route, throttle, quota; limits far above the load) with N clients loaded, one \
         proxy per size, all started up front; `{}` interleaved across sizes, {} runs of {} s, median.\n\n\
         | clients | startup to ready s | req/s (median) | vs 10 clients | swap s (median) | RSS before swap MiB | peak RSS during swap MiB | controller build + render s | controller per change s | runs (req/s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        load::wrk_cmd("URL", CONNS, k.secs, "bench-key-0").join(" "),
        k.reps,
        k.secs
    );
    let base = median(rps[0].clone());
    let renders: Vec<(f64, f64)> = sizes.iter().map(|&n| render_seconds(n)).collect::<Result<_>>()?;
    for (i, (n, path, p, startup)) in proxies.iter().enumerate() {
        let admin = p.admin.context("admin")?;
        let mut times = Vec::new();
        let before = rss_mib(p.pid())?;
        reset_hwm(p.pid());
        for s in 0..swaps {
            let t = servers::table(*n, Some(Throttle { rate: 1_000_000_000 - 1 - s as u32, ..LIMIT_FREE }), true);
            let t0 = Instant::now();
            write_table(path, &t)?;
            while !serving_revision(admin, &t.revision) {
                if t0.elapsed() > Duration::from_secs(60) {
                    anyhow::bail!("proxy with {n} clients did not serve revision {} within 60 s", t.revision);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        let peak = hwm_mib(p.pid())?;
        let m = median(rps[i].clone());
        let swap = median(times.clone());
        md.push_str(&format!(
            "| {n} | {startup:.2} | {m:.0} | {:.3} | {swap:.3} | {before:.1} | {peak:.1} | {:.4} | {:.4} | {} |\n",
            m / base,
            renders[i].0,
            renders[i].1,
            rps[i].iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
        ));
        rows.push(json!({"clients": n, "startup_s": round(*startup, 3), "rps_median": round(m, 0),
                         "rps_vs_10": round(m / base, 3), "rps_runs": rps[i], "swap_s": times.iter().map(|t| round(*t, 4)).collect::<Vec<_>>(),
                         "swap_s_median": round(swap, 4), "controller_render_s": round(renders[i].0, 5), "controller_change_s": round(renders[i].1, 5), "rss_before_swap_mib": round(before, 2), "peak_rss_during_swaps_mib": round(peak, 2)}));
    }
    md.push_str(
        "\nSwap time is from the rename of the new tables file to the first `/metrics` answer showing \
         `portcullis_proxy_table_info{revision=\"<new>\"} 1` (polled every ~2 ms). It includes the proxy's 250 ms \
         file poll interval (docs/proxy.md), so it is bounded below by detection, not by parsing. Goal: throughput \
         within 3 % of the 10-client run at every size. Controller render = what the controller does per reconcile \
         of a Service with that many clients, from nothing (resolve each key from the Secret cache and hash it, build the \
         table, render every shard: `portcullis_controller::fixtures::build_and_render`) and for a change to one \
         client (the same, plus each client's size check, rendered against the table in force so that only the \
         changed shard is serialised: `fixtures::Change::reconcile`); medians of 3, timed by the release build of \
         `bench-render` between the load runs; `cargo bench -p portcullis-controller --bench render` measures both \
         with criterion.\n",
    );
    let groups: Vec<(String, Vec<f64>)> =
        sizes.iter().enumerate().map(|(i, n)| (format!("{n} clients"), vec![median(rps[i].clone())])).collect();
    Ok((
        json!({"sizes": rows, "runs": k.reps, "seconds_per_run": k.secs}),
        md,
        Some(bar_svg("P1 throughput by table size", "req/s", &["req/s"], &groups)),
    ))
}

/// Median of 3 controller build + render runs for `n` clients, and of 3 reconciles of a one-client change
/// (`fixtures::Change`), in seconds, measured by the release build of `bench-render`.
fn render_seconds(n: usize) -> Result<(f64, f64)> {
    let out = std::process::Command::new(servers::helper_exe("bench-render")?)
        .arg(n.to_string())
        .output()
        .context("running bench-render")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed: Vec<f64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let [full, change] = parsed[..] else { anyhow::bail!("bench-render printed {text:?}") };
    eprintln!("  controller, {n} clients: build + render {full:.4} s, one change {change:.4} s");
    Ok((full, change))
}

pub fn render_main(args: &[String]) -> Result<()> {
    use portcullis_controller::fixtures::{Change, build_and_render, fixture};
    let n: usize = args.first().context("usage: bench-render N")?.parse()?;
    let (plans, clients, keys) = fixture(n);
    let times = (0..3)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(build_and_render(&plans, &clients, &keys));
            t.elapsed().as_secs_f64()
        })
        .collect();
    let change = Change::new(n);
    let change_times = (0..3)
        .map(|_| {
            let t = Instant::now();
            let out = std::hint::black_box(change.reconcile());
            let took = t.elapsed().as_secs_f64();
            // The controller drops the table it replaces after its writes, off the change's path.
            drop(out);
            took
        })
        .collect();
    println!("{} {}", median(times), median(change_times));
    Ok(())
}

pub fn limiter(ctx: &Ctx, bin: &Path) -> Result<Out> {
    let secs = if ctx.smoke { 1.0 } else { 20.0 };
    let up = servers::start_upstream()?;
    let mut rows = Vec::new();
    let mut md = format!(
        "One client, plan throttle `rate` per 1 s with burst `b`, no quota; `{}` from the allowed address (offered load \
         far above the rate), counting 2xx vs 429 over the run. Expected admitted = b + rate × duration (duration as \
         wrk reports it). Error = (admitted − expected) / (rate × duration).\n\n\
         | configured rate/s | burst | duration s | offered req/s | admitted | rejected (429) | admitted rate/s (minus burst) | error |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        load::wrk_cmd("URL", 8, secs, "bench-key-0").join(" ")
    );
    let mut groups = Vec::new();
    for rate in [1u32, 100, 10_000] {
        let burst = (rate / 100).max(1);
        let path = ctx.tmp.join(format!("limit-{rate}.json"));
        write_table(&path, &servers::table(1, Some(Throttle { rate, per_millis: 1000, burst }), false))?;
        let p = servers::start_proxy(bin, up.addr, &path)?;
        let w = wrk(&url(p.addr), 8, secs, &servers::key(0), true)?;
        let admitted = w.requests - w.non2xx;
        let expected = burst as f64 + rate as f64 * w.seconds;
        let err = (admitted as f64 - expected) / (rate as f64 * w.seconds);
        let adm_rate = (admitted as f64 - burst as f64) / w.seconds;
        eprintln!("  rate {rate}: admitted {admitted} of {} (expected {expected:.0})", w.requests);
        md.push_str(&format!(
            "| {rate} | {burst} | {:.2} | {:.0} | {admitted} | {} | {adm_rate:.2} | {:+.2} % |\n",
            w.seconds,
            w.rps,
            w.non2xx,
            err * 100.0
        ));
        groups.push((format!("{rate}/s"), vec![adm_rate / rate as f64 * 100.0]));
        rows.push(json!({"rate": rate, "burst": burst, "seconds": w.seconds, "offered_rps": round(w.rps, 0),
                         "requests": w.requests, "admitted": admitted, "rejected": w.non2xx,
                         "admitted_rate": round(adm_rate, 3), "error": round(err, 5)}));
    }
    md.push_str(&format!(
        "\nGoal: error ≤ 1 %. At 1 rps over {secs} s one request is {:.1} % of the expected count, so that row's \
         resolution is limited by the run length, not the limiter.\n",
        100.0 / secs
    ));
    Ok((json!({"rates": rows}), md, Some(bar_svg("Admitted as % of configured rate", "%", &["admitted %"], &groups))))
}

/// TLS termination: P1 with `--tls-cert` against nginx doing N1's job with `listen … ssl`, the same certificate
/// (ECDSA P-256, generated here) and key. Two measures, arms interleaved: HTTPS requests/s on kept-alive
/// connections, and handshakes/s (every request with `Connection: close`, so one full handshake per request; wrk
/// does not resume sessions).
pub fn tls(ctx: &Ctx, bin: &Path) -> Result<Out> {
    let k = knobs(ctx);
    let pair = servers::write_cert(&ctx.tmp)?;
    let table = ctx.tmp.join("tls-p1.json");
    write_table(&table, &servers::table(k.clients, Some(LIMIT_FREE), true))?;
    let up = servers::start_upstream()?;
    let nt = servers::start_nginx_with(&ctx.tmp, up.addr, true, k.clients, Some(&pair))?;
    let tls_args = [format!("--tls-cert={}", pair.cert.display()), format!("--tls-key={}", pair.key.display())];
    let pt = servers::start_proxy_with(bin, up.addr, &table, &tls_args)?;
    let ht = servers::start_haproxy_with(&ctx.tmp, up.addr, true, k.clients, Some(&pair))?;
    let arms: [(&str, &Proc); 3] = [("N1+TLS", &nt), ("H1+TLS", &ht), ("P1+TLS", &pt)];
    let https = |a: SocketAddr| format!("https://{a}/v1/items");
    for (name, p) in arms {
        servers::check_policy_at(name, &format!("https://{}", p.addr))?;
    }
    let run = |p: &Proc, close: bool, secs: f64| -> Result<(Wrk, f64)> {
        let pids = [p.pid(), up.pid()];
        let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
        let argv = load::wrk_cmd_close(&https(p.addr), CONNS, secs, &servers::key(0), close);
        let w = load::wrk_argv(argv, &https(p.addr), false)?;
        let after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
        Ok((w.clone(), (after - before) / w.requests.max(1) as f64 * 1000.0))
    };
    for (name, p) in arms.iter().filter(|_| !ctx.smoke) {
        for close in [false, true] {
            let (w, _) = run(p, close, 1.0).with_context(|| format!("warm-up {name}"))?;
            eprintln!("  warm-up {name}{}: {:.0} req/s", if close { " (close)" } else { "" }, w.rps);
        }
    }
    // [arm][keepalive=0 / close=1] → runs
    let mut runs: Vec<[Vec<(Wrk, f64)>; 2]> = vec![[Vec::new(), Vec::new()]; arms.len()];
    for r in 0..k.reps {
        for (i, (name, p)) in arms.iter().enumerate() {
            for (j, close) in [false, true].into_iter().enumerate() {
                let (w, cpu) = run(p, close, k.secs)?;
                eprintln!("  run {r} {name} {}: {:.0} req/s", if close { "handshakes" } else { "keep-alive" }, w.rps);
                runs[i][j].push((w, cpu));
            }
        }
    }
    let med = |i: usize, j: usize| {
        let mut v = runs[i][j].clone();
        v.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
        v[v.len() / 2].clone()
    };
    let mut rows = Vec::new();
    let mut md = format!(
        "Every arm terminates TLS with the same self-signed ECDSA P-256 certificate (rcgen), TLS 1.2 + 1.3 enabled \
         (wrk's OpenSSL negotiates TLS 1.3), holds {} clients and enforces the same policy as N1 / H1 / P1 \
         (throughput suite). Keep-alive: `{}`. Handshakes: the same with `-H 'Connection: close'`, so every request is a new TCP \
         connection and a full handshake (wrk does not resume sessions); req/s = handshakes/s. Arms interleaved, {} \
         runs of {} s, median. Server CPU counts the arm's process plus the upstream.\n\n\
         | arm | HTTPS keep-alive req/s | p50 ms | p99 ms | CPU s / 1 000 req | handshakes/s | p50 ms | p99 ms | CPU s / 1 000 handshakes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        k.clients,
        load::wrk_cmd("https://ADDR/v1/items", CONNS, k.secs, "bench-key-0").join(" "),
        k.reps,
        k.secs
    );
    for (i, (name, _)) in arms.iter().enumerate() {
        let (ka, hs) = (med(i, 0), med(i, 1));
        md.push_str(&format!(
            "| {name} | {:.0} | {:.3} | {:.3} | {:.4} | {:.0} | {:.3} | {:.3} | {:.4} |\n",
            ka.0.rps, ka.0.lat_ms[0], ka.0.lat_ms[3], ka.1, hs.0.rps, hs.0.lat_ms[0], hs.0.lat_ms[3], hs.1
        ));
        rows.push(json!({"arm": name, "keepalive": ka.0.json(), "keepalive_cpu_s_per_1k": round(ka.1, 5),
                         "handshakes": hs.0.json(), "handshake_cpu_s_per_1k": round(hs.1, 5),
                         "keepalive_runs": runs[i][0].iter().map(|r| round(r.0.rps, 0)).collect::<Vec<_>>(),
                         "handshake_runs": runs[i][1].iter().map(|r| round(r.0.rps, 0)).collect::<Vec<_>>()}));
    }
    // Arms: 0 nginx, 1 HAProxy, 2 Portcullis.
    let ratio = |a: usize, b: usize, j: usize| round(med(a, j).0.rps / med(b, j).0.rps, 3);
    let ratios = json!({"keepalive P1+TLS/N1+TLS": ratio(2, 0, 0), "handshakes P1+TLS/N1+TLS": ratio(2, 0, 1),
                        "keepalive P1+TLS/H1+TLS": ratio(2, 1, 0), "handshakes P1+TLS/H1+TLS": ratio(2, 1, 1)});
    md.push_str(&format!(
        "\n**Ratios**: HTTPS keep-alive P1+TLS / N1+TLS = {}, P1+TLS / H1+TLS = {}; handshakes/s P1+TLS / N1+TLS = {}, \
         P1+TLS / H1+TLS = {}.\n",
        ratio(2, 0, 0),
        ratio(2, 1, 0),
        ratio(2, 0, 1),
        ratio(2, 1, 1)
    ));
    let per_arm = |j: usize| (0..arms.len()).map(|i| med(i, j).0.rps).collect::<Vec<_>>();
    let groups = vec![("keep-alive req/s".to_string(), per_arm(0)), ("handshakes/s".to_string(), per_arm(1))];
    let svg = bar_svg(
        "TLS termination: nginx, HAProxy, Portcullis (same cert)",
        "per second",
        &["N1+TLS", "H1+TLS", "P1+TLS"],
        &groups,
    );
    let data = json!({"clients": k.clients, "runs": k.reps, "seconds_per_run": k.secs, "wrk_connections": CONNS,
                      "certificate": "self-signed ECDSA P-256 (rcgen)", "arms": rows, "ratios": ratios});
    Ok((data, md, Some(svg)))
}

/// The `latest.json` fields a suite contributes.
pub fn summary(suite: &str, r: &Value) -> Value {
    match suite {
        "throughput" => json!({"throughput": {"ratios": r["ratios"], "added_latency_ms": r["added_latency_ms"],
                                              "open_loop_rate_rps": r["open_loop"]["rate_rps"],
                                              "open_loop_p99_spread_ms": r["open_loop"]["p99_spread_ms"],
                                              "rps": r["arms"].as_array().map(|a| a.iter().map(|x| (x["arm"].as_str().unwrap_or("").to_string(), x["median"]["rps"].clone())).collect::<serde_json::Map<_, _>>())}}),
        "memory" => {
            json!({"rss_mb": {"idle": r["rss_mib"]["idle_1_client"], "idle_no_table": r["rss_mib"]["idle_no_table"],
                                      "clients_10k_idle": r["rss_mib"]["idle_clients"],
                                      "clients_10k_under_load": r["rss_mib"]["under_load_peak"]},
                           "cpu_s_per_1k_requests": r["proxy_cpu_s_per_1k_req"]})
        }
        "scale" => json!({"scale": r["sizes"]}),
        "limiter" => json!({"limiter": r["rates"]}),
        "profile" => {
            json!({"profile": {"instructions_per_request": r["instructions_per_request"], "ratios": r["ratios"],
                                        "syscalls_per_request_total": r["syscalls_per_request"].as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), v["total"].clone())).collect::<serde_json::Map<_, _>>())}})
        }
        "global" => json!({"global": {"added_p50_ms": r["added_p50_ms"], "added_p99_ms": r["added_p99_ms"],
                                      "throughput_ratio_vs_local": r["throughput_ratio_vs_local"],
                                      "accuracy_error_3_replicas": r["accuracy_error_3_replicas"]}}),
        "propagation" => {
            let pick = |v: &Value| {
                ["create", "cidr_change", "revoke"]
                    .iter()
                    .map(|c| (c.to_string(), json!({"p50": v[c]["p50"], "p99": v[c]["p99"]})))
                    .collect::<serde_json::Map<_, _>>()
            };
            let mut large = pick(&r["large"]);
            large.insert("clients".into(), r["clients_large"].clone());
            let swap = &r["swap_large"];
            json!({"propagation_s": pick(r), "propagation_s_100k": large,
                   "swap_100k": {"ms": swap["mean_ms"], "p99_ms_at_most": swap["p99_ms_at_most"],
                                 "peak_rss_ratio": swap["peak_rss_ratio"], "clients": r["clients_large"]}})
        }
        "tls" => {
            json!({"tls": {"ratios": r["ratios"], "arms": r["arms"].as_array().map(|a| a.iter().map(|x| (x["arm"].as_str().unwrap_or("").to_string(), json!({"keepalive_rps": x["keepalive"]["rps"], "handshakes_per_s": x["handshakes"]["rps"]}))).collect::<serde_json::Map<_, _>>())}})
        }
        _ => json!({}),
    }
}
