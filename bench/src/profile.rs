//! `cargo xtask bench profile`: what one request costs each arm's server process in user-space instructions, counted
//! by `valgrind --tool=callgrind` (issue 18: "profile P0 against N0 and H0 instruction by instruction"). Unlike req/s
//! on a shared VM, instruction counts repeat to a fraction of a percent, so a change to the forwarding leg can be
//! judged by them run against run; the kernel's share (socket work, which every arm pays alike per syscall) is not
//! counted here, the syscalls per request are (`strace -c -f`, on a separate run of the same requests).
//!
//! Per arm (N0, H0, P0, N1, H1, P1, configured as in the throughput suite): the server starts under callgrind on the
//! server CPU; a warm-up of [`WARMUP`] requests; the counters are zeroed (`callgrind_control -z`); the open-loop
//! generator sends exactly `requests` requests on 32 connections at a rate the slowed-down server keeps up with
//! (every answer must be a 200); the counters are dumped (`callgrind_control -d`). Instructions per request = the
//! dump's total / `requests` (everything the process did meanwhile: the event loop, timers, other threads).
//! For P0 and P1 the top functions by inclusive cost are listed (`callgrind_annotate --inclusive=yes`).

use super::Ctx;
use super::load::{self, round};
use super::servers::{self, LIMIT_FREE, Proc};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

type Out = (Value, String, Option<String>);

/// Requests before the counters are zeroed (connections opened, caches warm).
const WARMUP: u64 = 200;
/// Open-loop rate under callgrind (≈ 50× slower than native): every arm keeps up with it.
const RATE: u64 = 400;
const CONNS: u32 = 32;
/// Functions listed per profiled arm.
const TOP: usize = 25;

fn callgrind_control(flag: &str, pid: u32) -> Result<()> {
    let out = Command::new("callgrind_control").args([flag, &pid.to_string()]).output()?;
    if !out.status.success() {
        bail!("callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The `totals:` of a callgrind dump (instructions, the only event collected).
fn totals(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text.lines().find_map(|l| l.strip_prefix("totals:")).context("no totals: line")?;
    let digits: String = line.trim().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().with_context(|| format!("totals: {line:?}"))
}

/// Sends `n` requests with the open-loop generator and checks they were all answered 200.
fn send(p: &Proc, n: u64) -> Result<()> {
    let secs = n as f64 / RATE as f64;
    let r = load::openloop(p.addr, RATE, secs, CONNS, &servers::key(0))?;
    if r.errors > 0 || r.sent < n {
        bail!("{} of {} requests failed or were not sent (sent {})", r.errors, n, r.sent);
    }
    Ok(())
}

/// One arm under callgrind: instructions per request, and the dump (for the annotation).
fn measure(
    dir: &Path,
    name: &str,
    start: impl FnOnce() -> Result<Proc>,
    requests: u64,
) -> Result<(f64, std::path::PathBuf)> {
    let out = dir.join(format!("{name}.callgrind"));
    let out_arg = format!("--callgrind-out-file={}", out.display());
    servers::set_wrapper(&["valgrind", "--tool=callgrind", "--dump-instr=no", &out_arg]);
    let started = start();
    servers::set_wrapper(&[]);
    let p = started?;
    send(&p, WARMUP)?;
    callgrind_control("-z", p.pid())?;
    send(&p, requests)?;
    callgrind_control("-d", p.pid())?;
    drop(p);
    // The dump is `<out>.<n>` (n = 1: the only dump before the process was killed).
    let dump = dir.join(format!("{name}.callgrind.1"));
    let ir = totals(&dump)?;
    Ok((ir as f64 / requests as f64, dump))
}

/// Syscalls per request of one arm run natively: `strace -c -f` attached after the warm-up, for `requests`
/// requests. `(syscall, calls per request)`, most frequent first, with `total` first of all.
fn syscalls(dir: &Path, name: &str, start: impl FnOnce() -> Result<Proc>, requests: u64) -> Result<Vec<(String, f64)>> {
    use std::io::{BufRead, BufReader};
    let p = start()?;
    send(&p, WARMUP)?;
    let out = dir.join(format!("{name}.strace"));
    let mut st = Command::new("strace")
        .args(["-c", "-f", "-o"])
        .arg(&out)
        .args(["-p", &p.pid().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("strace (apt-get install -y strace)")?;
    // Attached once strace says so ("Process N attached", with `-f` once per thread group).
    let mut lines = BufReader::new(st.stderr.take().context("strace stderr")?).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("attached") => break,
            Some(Ok(_)) => {}
            _ => bail!("strace did not attach to {name}"),
        }
    }
    send(&p, requests)?;
    Command::new("kill").args(["-INT", &st.id().to_string()]).status()?;
    st.wait()?;
    drop(p);
    // "% time     seconds  usecs/call     calls    errors syscall"
    let text = std::fs::read_to_string(&out)?;
    let mut rows: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (syscall, calls) = (f.last()?, f.get(3)?.parse::<u64>().ok()?);
            (f.len() >= 5).then(|| (syscall.to_string(), calls as f64 / requests as f64))
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(rows)
}

/// The top functions of a dump by inclusive (or by their own) instructions, per request: `(instructions, function)`.
fn top_functions(dump: &Path, requests: u64, inclusive: bool) -> Result<Vec<(f64, String)>> {
    let out = Command::new("callgrind_annotate")
        .arg(format!("--inclusive={}", if inclusive { "yes" } else { "no" }))
        .arg("--threshold=100")
        .arg(dump)
        .output()?;
    if !out.status.success() {
        bail!("callgrind_annotate: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines() {
        // "1,234,567 (12.34%)  file:function [binary]"
        let line = line.trim();
        let Some((count, rest)) = line.split_once(' ') else { continue };
        let Ok(n) = count.replace(',', "").parse::<u64>() else { continue };
        let func = rest.trim_start().trim_start_matches(|c: char| c != ')').trim_start_matches(')').trim();
        // "???:name [/path/binary]" → "name"
        let func = func.rsplit_once(" [").map_or(func, |(f, _)| f);
        let func = func.strip_prefix("???:").unwrap_or(func);
        if func.is_empty() || func.starts_with("PROGRAM TOTALS") {
            continue;
        }
        rows.push((n as f64 / requests as f64, func.to_string()));
        if rows.len() == TOP {
            break;
        }
    }
    Ok(rows)
}

pub fn profile(ctx: &Ctx, bin: &Path) -> Result<Out> {
    for tool in ["valgrind", "callgrind_control", "callgrind_annotate"] {
        let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.status.success();
        if !ok {
            bail!("{tool} not found (apt-get install -y valgrind)");
        }
    }
    let (requests, clients) = if ctx.smoke { (200, 100) } else { (4_000, 10_000) };
    let (p0t, p1t) = (ctx.tmp.join("p0.json"), ctx.tmp.join("p1.json"));
    std::fs::write(&p0t, servers::table(1, None, false).to_json())?;
    std::fs::write(&p1t, servers::table(clients, Some(LIMIT_FREE), true).to_json())?;
    let up = servers::start_upstream()?;
    // Kept after the run for a closer look (`callgrind_annotate target/bench-logs/profile/P0.callgrind.1`).
    let dir = ctx.root.join("target/bench-logs/profile");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut arms = Vec::new();
    let mut md = format!(
        "User-space instructions per request of each arm's server process (`valgrind --tool=callgrind`, counters \
         zeroed after {WARMUP} warm-up requests, then {requests} requests from the open-loop generator at {RATE} req/s \
         on {CONNS} connections, all answered 200), {clients} clients for the policy arms. Kernel work is not \
         counted.\n\n| arm | instructions / request | vs N0 |\n|---|---:|---:|\n"
    );
    type Start<'a> = Box<dyn FnOnce() -> Result<Proc> + 'a>;
    let plan: Vec<(&str, Start)> = vec![
        ("N0", Box::new(|| servers::start_nginx(&ctx.tmp, up.addr, false, 0))),
        ("H0", Box::new(|| servers::start_haproxy(&ctx.tmp, up.addr, false, 0))),
        ("P0", Box::new(|| servers::start_proxy_with(bin, up.addr, &p0t, &["--workers=1".into()]))),
        ("N1", Box::new(|| servers::start_nginx(&ctx.tmp, up.addr, true, clients))),
        ("H1", Box::new(|| servers::start_haproxy(&ctx.tmp, up.addr, true, clients))),
        ("P1", Box::new(|| servers::start_proxy_with(bin, up.addr, &p1t, &["--workers=1".into()]))),
    ];
    let mut dumps = Vec::new();
    for (name, start) in plan {
        eprintln!("  {name} under callgrind");
        let (per, dump) = measure(&dir, name, start, requests)?;
        arms.push((name, per));
        dumps.push((name, dump));
    }
    let native: Vec<(&str, Start)> = vec![
        ("N0", Box::new(|| servers::start_nginx(&ctx.tmp, up.addr, false, 0))),
        ("H0", Box::new(|| servers::start_haproxy(&ctx.tmp, up.addr, false, 0))),
        ("P0", Box::new(|| servers::start_proxy_with(bin, up.addr, &p0t, &["--workers=1".into()]))),
    ];
    let mut calls = Vec::new();
    for (name, start) in native {
        eprintln!("  {name} under strace");
        calls.push((name, syscalls(&dir, name, start, requests)?));
    }
    let n0 = arms.iter().find(|(n, _)| *n == "N0").map(|(_, v)| *v).unwrap_or(f64::NAN);
    for (name, per) in &arms {
        md.push_str(&format!("| {name} | {per:.0} | {:.2} |\n", per / n0));
    }
    md.push_str(&format!(
        "\nSyscalls per request (the pass-through arms run natively, `strace -c -f` attached for the same {requests} \
         requests; `total` is every syscall of the process, the rest the most frequent):\n\n| arm | syscalls / request |\n|---|---|\n"
    ));
    for (name, rows) in &calls {
        let shown: Vec<String> = rows.iter().take(7).map(|(s, n)| format!("{s} {n:.2}")).collect();
        md.push_str(&format!("| {name} | {} |\n", shown.join(", ")));
    }
    let mut tops = serde_json::Map::new();
    for (name, dump) in dumps.iter().filter(|(n, _)| n.starts_with('P')) {
        let mut both = serde_json::Map::new();
        for (inclusive, label) in [(false, "own"), (true, "inclusive")] {
            let top = top_functions(dump, requests, inclusive)?;
            md.push_str(&format!(
                "\n**{name}**, top {TOP} functions by {label} instructions per request:\n\n| instructions / request | function |\n|---:|---|\n"
            ));
            for (n, f) in &top {
                md.push_str(&format!("| {n:.0} | `{}` |\n", f.replace('|', "\\|")));
            }
            let rows = top.iter().map(|(n, f)| json!({"per_request": round(*n, 0), "function": f})).collect::<Vec<_>>();
            both.insert(label.to_string(), json!(rows));
        }
        tops.insert(name.to_string(), Value::Object(both));
    }
    let per = |a: &str| arms.iter().find(|(n, _)| *n == a).map(|(_, v)| *v).unwrap_or(f64::NAN);
    let ratios = json!({"P0/N0": round(per("P0") / per("N0"), 3), "P0/H0": round(per("P0") / per("H0"), 3),
                        "P1/N1": round(per("P1") / per("N1"), 3), "P1/H1": round(per("P1") / per("H1"), 3)});
    md.push_str(&format!(
        "\nInstruction ratios (lower is cheaper for the proxy): P0/N0 = {}, P0/H0 = {}, P1/N1 = {}, P1/H1 = {}.\n",
        ratios["P0/N0"], ratios["P0/H0"], ratios["P1/N1"], ratios["P1/H1"]
    ));
    let data = json!({
        "requests": requests, "warmup": WARMUP, "rate_rps": RATE, "connections": CONNS, "clients": clients,
        "instructions_per_request": arms.iter().map(|(n, v)| (n.to_string(), json!(round(*v, 0)))).collect::<serde_json::Map<_, _>>(),
        "ratios": ratios, "top_functions": tops,
        "syscalls_per_request": calls.iter().map(|(n, rows)| (n.to_string(), json!(rows.iter().map(|(s, v)| (s.clone(), json!(round(*v, 3)))).collect::<serde_json::Map<_, _>>()))).collect::<serde_json::Map<_, _>>(),
    });
    Ok((data, md, None))
}
