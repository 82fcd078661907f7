//! Load generators: `wrk` (closed loop, Debian package) and a small open-loop generator of our own (fixed arrival
//! rate, latency measured from each request's *intended* send time, so queueing behind a slow answer is counted:
//! no coordinated omission). The open-loop generator runs as a child process pinned to the load-generator core.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const LOADGEN_CPU: &str = "0";
pub const SERVER_CPU: &str = "1";

#[derive(Clone, Debug)]
pub struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub non2xx: u64,
    pub seconds: f64,
    /// p50, p75, p90, p99 in ms (wrk's `--latency` table).
    pub lat_ms: [f64; 4],
}

impl Wrk {
    pub fn json(&self) -> Value {
        json!({"rps": round(self.rps, 1), "requests": self.requests, "non_2xx": self.non2xx,
               "seconds": self.seconds, "latency_ms": {"p50": self.lat_ms[0], "p75": self.lat_ms[1],
               "p90": self.lat_ms[2], "p99": self.lat_ms[3]}})
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// `taskset -c 0 wrk -t1 -cC -dDs --latency -H 'x-api-key: KEY' URL`; the exact argv is returned for the report.
pub fn wrk_cmd(url: &str, conns: u32, secs: f64, key: &str) -> Vec<String> {
    wrk_cmd_close(url, conns, secs, key, false)
}

/// With `close`, every request carries `Connection: close`: a new connection (and TLS handshake) per request.
pub fn wrk_cmd_close(url: &str, conns: u32, secs: f64, key: &str, close: bool) -> Vec<String> {
    let d = if secs < 1.0 { "1s".to_string() } else { format!("{}s", secs as u64) };
    let mut argv: Vec<String> =
        ["taskset", "-c", LOADGEN_CPU, "wrk", "-t1", &format!("-c{conns}"), &format!("-d{d}"), "--latency", "-H"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("x-api-key: {key}")])
            .collect();
    if close {
        argv.extend(["-H".to_string(), "Connection: close".to_string()]);
    }
    argv.push(url.to_string());
    argv
}

pub fn wrk(url: &str, conns: u32, secs: f64, key: &str, allow_non2xx: bool) -> Result<Wrk> {
    wrk_argv(wrk_cmd(url, conns, secs, key), url, allow_non2xx)
}

pub fn wrk_argv(argv: Vec<String>, url: &str, allow_non2xx: bool) -> Result<Wrk> {
    let out = Command::new(&argv[0]).args(&argv[1..]).output().context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string())).unwrap_or_default()
    };
    let rps: f64 = field("Requests/sec:").parse().with_context(|| format!("parsing wrk output:\n{text}"))?;
    let non2xx: u64 = field("Non-2xx or 3xx responses:").parse().unwrap_or(0);
    if non2xx > 0 && !allow_non2xx {
        bail!("wrk saw {non2xx} non-2xx answers from {url}:\n{text}");
    }
    // "  123456 requests in 5.00s, 140.00MB read"
    let (requests, seconds) = text
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let n = it.next()?.parse::<u64>().ok()?;
            (it.next()? == "requests").then_some(())?;
            it.next()?;
            let s = it.next()?.trim_end_matches(',');
            Some((n, parse_dur_ms(s)? / 1000.0))
        })
        .with_context(|| format!("no request count in wrk output:\n{text}"))?;
    let lat = |p: &str| parse_dur_ms(&field(p)).unwrap_or(f64::NAN);
    Ok(Wrk { rps, requests, non2xx, seconds, lat_ms: [lat("50%"), lat("75%"), lat("90%"), lat("99%")] })
}

/// "123.45us" / "1.20ms" / "2.00s" / "1.00m" → milliseconds.
fn parse_dur_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    for (suffix, mul) in [("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 60e3)] {
        if let Some(n) = s.strip_suffix(suffix)
            && let Ok(v) = n.parse::<f64>()
        {
            return Some(v * mul);
        }
    }
    None
}

/// Open-loop result: latency percentiles in ms from the intended send time.
#[derive(Clone, Debug)]
pub struct OpenLoop {
    pub sent: u64,
    pub errors: u64,
    pub achieved_rps: f64,
    pub pct_ms: Vec<(String, f64)>,
}

impl OpenLoop {
    pub fn get(&self, p: &str) -> f64 {
        self.pct_ms.iter().find(|(k, _)| k == p).map(|(_, v)| *v).unwrap_or(f64::NAN)
    }
    pub fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.pct_ms {
            m.insert(k.clone(), json!(round(*v, 4)));
        }
        json!({"sent": self.sent, "errors": self.errors, "achieved_rps": round(self.achieved_rps, 1), "latency_ms": m})
    }
}

pub fn openloop_cmd(addr: SocketAddr, rate: u64, secs: f64, conns: u32, key: &str) -> Result<Vec<String>> {
    let exe = super::servers::helper_exe("bench-openloop")?.display().to_string();
    Ok(["taskset", "-c", LOADGEN_CPU, &exe]
        .iter()
        .map(|s| s.to_string())
        .chain([addr.to_string(), rate.to_string(), secs.to_string(), conns.to_string(), key.to_string()])
        .collect())
}

/// Runs the open-loop generator as a pinned child process.
pub fn openloop(addr: SocketAddr, rate: u64, secs: f64, conns: u32, key: &str) -> Result<OpenLoop> {
    let argv = openloop_cmd(addr, rate, secs, conns, key)?;
    let out = Command::new(&argv[0]).args(&argv[1..]).output().context("running the open-loop generator")?;
    if !out.status.success() {
        bail!("open-loop generator failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("open-loop output")?;
    let pct_ms = v["latency_ms"]
        .as_object()
        .context("latency_ms")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
        .collect();
    Ok(OpenLoop {
        sent: v["sent"].as_u64().unwrap_or(0),
        errors: v["errors"].as_u64().unwrap_or(0),
        achieved_rps: v["achieved_rps"].as_f64().unwrap_or(0.0),
        pct_ms,
    })
}

/// `bench-openloop ADDR RATE SECS CONNS KEY`: prints a JSON result on stdout.
pub fn openloop_main(args: &[String]) -> Result<()> {
    let [addr, rate, secs, conns, key] = args else { bail!("usage: bench-openloop ADDR RATE SECS CONNS KEY") };
    let addr: SocketAddr = addr.parse()?;
    let rate: u64 = rate.parse()?;
    let secs: f64 = secs.parse()?;
    let conns: u32 = conns.parse()?;
    let key = key.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let v = rt.block_on(async move {
        let total = (rate as f64 * secs) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let next = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now() + Duration::from_millis(50);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (next, errors, key) = (next.clone(), errors.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::new();
                let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let intended = t0 + interval.mul_f64(i as f64);
                    loop {
                        let now = Instant::now();
                        if now >= intended {
                            break;
                        }
                        if intended - now > Duration::from_millis(2) {
                            tokio::time::sleep_until((intended - Duration::from_millis(1)).into()).await;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                    // A closed or failed connection counts as an error and is reopened for the next request.
                    match one(&mut sender, addr, &key).await {
                        Ok(ok) => {
                            lat.push(intended.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            if !ok {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            sender = None;
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                anyhow::Ok(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let elapsed = t0.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |q: f64| {
            if all.is_empty() {
                return f64::NAN;
            }
            let i = ((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1;
            all[i] as f64 / 1000.0
        };
        anyhow::Ok(json!({
            "sent": all.len(), "errors": errors.load(Ordering::Relaxed),
            "achieved_rps": all.len() as f64 / elapsed,
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p99.9": pct(0.999), "max": pct(1.0)}
        }))
    })?;
    println!("{v}");
    Ok(())
}

async fn one(
    sender: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    key: &str,
) -> Result<bool> {
    if sender.is_none() {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let s = sender.as_mut().context("sender")?;
    s.ready().await?;
    let req =
        Request::get("/v1/items").header("host", "bench").header("x-api-key", key).body(Full::new(Bytes::new()))?;
    let resp = s.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    Ok(ok)
}
