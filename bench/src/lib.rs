//! `portcullis-bench` (run as `cargo xtask bench <suite> [--smoke]`): side-by-side benchmarks on this machine, written to `docs/benchmarks/`
//! (`<suite>.json`, `<suite>.md`, `<suite>.png` + `.svg` plots, and the merged `latest.json`). See `docs/benchmarks/README.md`.
//!
//! Suites: `throughput` (D / N0 / N1 / P0 / P1 arms, closed-loop wrk + open-loop added latency), `tls` (HTTPS
//! req/s and handshakes/s, P1 vs nginx with the same certificate), `memory` (RSS
//! idle / 10 000 clients / under load, CPU seconds per 1 000 requests), `scale` (P1 at 10 … 100 000 clients, table
//! swap time and peak RSS), `limiter` (admitted vs configured rate), `propagation` (API write → enforced, on the
//! local control plane), `abuse` (a legitimate client measured while the proxy is abused), `global` (the shared store's added latency,
//! throughput and accuracy across 3 replicas: docs/global-limits.md), `all`; `profile` (instructions and syscalls per
//! request of the pass-through and policy arms under callgrind and strace; run only when named). `--smoke`: 1 s runs, one repetition,
//! small tables, written to `target/bench-smoke/` instead (proves the code still works; no figures to publish).
//!
//! The load generator is pinned to CPU 0 and every server process (upstream, proxy, nginx) to CPU 1 (`taskset`).
//!
//! Binaries (release builds, next to each other in `target/release/`): `portcullis-bench` (this driver),
//! `bench-upstream` (the 1 KiB upstream), `bench-openloop` (the open-loop generator) and `bench-render` (the
//! controller's build + render timed for the scale suite), `bench-abuse` (the abuse generator). A suite is a module here with one `pub fn` returning
//! `(json, markdown, svg)`, registered in [`ALL`] and the `match` of [`main`].

pub mod abuse;
pub mod global;
pub mod load;
mod profile;
mod propagation;
pub mod sched;
pub mod servers;
pub mod suites;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Ctx {
    pub root: PathBuf,
    pub smoke: bool,
    pub out: PathBuf,
    pub tmp: PathBuf,
    pub command: String,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Every suite, in the order `all` runs them.
pub const ALL: [&str; 8] = ["throughput", "tls", "memory", "scale", "limiter", "propagation", "abuse", "global"];

/// Suites run only when named (not by `all`).
pub const EXTRA: [&str; 1] = ["profile"];

const USAGE: &str =
    "usage: cargo xtask bench <throughput|tls|memory|scale|limiter|propagation|abuse|global|all|profile> [--smoke]";

pub fn main(root: &Path, args: &[String]) -> Result<()> {
    let smoke = args.iter().any(|a| a == "--smoke");
    let suites: Vec<&str> = args.iter().map(String::as_str).filter(|a| !a.starts_with("--")).collect();
    let [suite] = suites.as_slice() else { bail!(USAGE) };
    for tool in ["wrk", "taskset", "curl", "nginx", "haproxy"] {
        let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.status.success();
        if !ok {
            bail!("{tool} not found (apt-get install -y wrk util-linux curl nginx haproxy)");
        }
    }
    let out = if smoke { root.join("target/bench-smoke") } else { root.join("docs/benchmarks") };
    std::fs::create_dir_all(&out)?;
    let tmp = std::env::temp_dir().join(format!("portcullis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let ctx =
        Ctx { root: root.to_path_buf(), smoke, out, tmp, command: format!("cargo xtask bench {}", args.join(" ")) };
    let list: Vec<&str> = match *suite {
        "all" => ALL.to_vec(),
        s if ALL.contains(&s) || EXTRA.contains(&s) => vec![s],
        _ => bail!(USAGE),
    };
    let bin = servers::build_proxy(root, smoke)?;
    for s in &list {
        eprintln!("bench: suite {s}{}", if smoke { " (smoke)" } else { "" });
        let t = std::time::Instant::now();
        let (data, md, svg) = match *s {
            "throughput" => suites::throughput(&ctx, &bin)?,
            "tls" => suites::tls(&ctx, &bin)?,
            "memory" => suites::memory(&ctx, &bin)?,
            "scale" => suites::scale(&ctx, &bin)?,
            "propagation" => propagation::propagation(&ctx)?,
            "abuse" => abuse::abuse(&ctx, &bin)?,
            "global" => global::global(&ctx, &bin)?,
            "profile" => profile::profile(&ctx, &bin)?,
            _ => suites::limiter(&ctx, &bin)?,
        };
        write_report(&ctx, s, data, &md, svg.as_deref(), t.elapsed().as_secs_f64())?;
    }
    Ok(())
}

/// CPU model and count, kernel, tool versions, commit.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|r| r.trim().to_string()))
        .unwrap_or_default();
    json!({"cpu_model": model, "cores": cores, "mem_total": mem, "kernel": sh("uname -r")})
}

pub fn versions(root: &Path) -> Value {
    let dirty = !sh(&format!("git -C {} status --porcelain -- proxy table", root.display())).is_empty();
    json!({
        "rustc": sh("rustc -V"),
        "wrk": sh("wrk -v 2>&1 | head -1"),
        "nginx": sh("nginx -v 2>&1"),
        "commit": sh(&format!("git -C {} rev-parse --short HEAD", root.display())),
        "proxy_or_table_sources_dirty": dirty,
    })
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn write_report(ctx: &Ctx, suite: &str, data: Value, md: &str, svg: Option<&str>, secs: f64) -> Result<()> {
    let now = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
    let machine = machine();
    let versions = versions(&ctx.root);
    let full = json!({"suite": suite, "date": now, "command": ctx.command, "smoke": ctx.smoke,
                      "wall_seconds": load::round(secs, 1), "machine": machine, "versions": versions, "results": data});
    std::fs::write(ctx.out.join(format!("{suite}.json")), serde_json::to_string_pretty(&full)? + "\n")?;
    let mut text = format!(
        "# Benchmark: {suite}\n\n- command: `{}`\n- date: {now}, {:.0} s wall\n- machine: {} × {} ({}), kernel {}\n\
         - versions: {}, {}, {}; commit {}{}\n- load generator pinned to CPU {}, every server process to CPU {} (`taskset`)\n\n",
        ctx.command,
        secs,
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or(""),
        machine["mem_total"].as_str().unwrap_or(""),
        machine["kernel"].as_str().unwrap_or(""),
        versions["rustc"].as_str().unwrap_or(""),
        versions["wrk"].as_str().unwrap_or(""),
        versions["nginx"].as_str().unwrap_or(""),
        versions["commit"].as_str().unwrap_or(""),
        if versions["proxy_or_table_sources_dirty"] == true {
            " (proxy/ or table/ had uncommitted changes)"
        } else {
            ""
        },
        load::LOADGEN_CPU,
        load::SERVER_CPU,
    );
    text.push_str(md);
    if let Some(svg) = svg {
        text.push_str(&write_plot(&ctx.out, suite, svg)?);
    }
    std::fs::write(ctx.out.join(format!("{suite}.md")), text)?;
    // latest.json: merged, one key per suite, plus the machine.
    let latest_path = ctx.out.join("latest.json");
    let mut latest: Value = std::fs::read_to_string(&latest_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}));
    latest["machine"] = machine;
    latest["versions"] = versions;
    let summary = suites::summary(suite, &full["results"]);
    for (k, v) in summary.as_object().context("summary")? {
        latest[k] = v.clone();
    }
    latest["runs"][suite] = json!({"date": now, "command": ctx.command});
    std::fs::write(&latest_path, serde_json::to_string_pretty(&latest)? + "\n")?;
    eprintln!("bench: wrote {}/{suite}.{{json,md}} and latest.json", ctx.out.display());
    Ok(())
}

/// Writes `NAME.svg` and, with feature `png` (real runs), `NAME.png` rendered with resvg (system fonts); returns the
/// Markdown image line.
pub fn write_plot(dir: &Path, name: &str, svg: &str) -> Result<String> {
    std::fs::write(dir.join(format!("{name}.svg")), svg)?;
    #[cfg(feature = "png")]
    {
        write_png(dir, name, svg)?;
        Ok(format!("\n![{name}]({name}.png) ([SVG]({name}.svg))\n"))
    }
    #[cfg(not(feature = "png"))]
    Ok(format!("\n![{name}]({name}.svg)\n"))
}

#[cfg(feature = "png")]
fn write_png(dir: &Path, name: &str, svg: &str) -> Result<()> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    // The SVG asks for the generic `sans-serif`; map it to a face that is installed (DejaVu Sans on Debian).
    let families: Vec<String> =
        opt.fontdb.faces().filter_map(|f| f.families.first().map(|(name, _)| name.clone())).collect();
    if let Some(family) = families.iter().find(|f| *f == "DejaVu Sans").or(families.first()).cloned() {
        opt.fontdb_mut().set_sans_serif_family(family.clone());
        opt.font_family = family;
    }
    let tree = usvg::Tree::from_str(svg, &opt).with_context(|| format!("parsing the {name} plot"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).context("allocating the plot image")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.save_png(dir.join(format!("{name}.png"))).with_context(|| format!("writing {name}.png"))?;
    Ok(())
}

/// A plain SVG bar chart (no plotting dependency): one group of bars per label, one bar per series.
pub fn bar_svg(title: &str, unit: &str, series: &[&str], groups: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top) = (760.0, 360.0, 70.0, 60.0, 40.0);
    let max = groups.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let max = if max <= 0.0 { 1.0 } else { max * 1.1 };
    let colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"];
    let plot_h = h - bottom - top;
    let gw = (w - left - 20.0) / groups.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{}</text>\n",
        w / 2.0,
        esc(title),
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        esc(unit)
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            w - 20.0,
            left - 4.0,
            y + 4.0,
            fmt_num(v)
        ));
    }
    for (gi, (label, vals)) in groups.iter().enumerate() {
        let gx = left + gw * gi as f64 + gw * 0.1;
        for (si, v) in vals.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let bh = plot_h * v.max(0.0) / max;
            let x = gx + bw * si as f64;
            s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
                top + plot_h - bh,
                bw * 0.95,
                colors[si % colors.len()],
                x + bw / 2.0,
                top + plot_h - bh - 3.0,
                fmt_num(*v)
            ));
        }
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            gx + gw * 0.4,
            h - bottom + 18.0,
            esc(label)
        ));
    }
    if series.len() > 1 {
        for (si, name) in series.iter().enumerate() {
            let x = left + 10.0 + 120.0 * si as f64;
            s.push_str(&format!(
                "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
                h - 24.0,
                colors[si % colors.len()],
                x + 16.0,
                h - 14.0,
                esc(name)
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
