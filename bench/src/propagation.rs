//! `propagation`: time from an API write to the first request through the proxy that reflects it, against the local
//! control plane (etcd + kube-apiserver built from source), with the chart installed by helm, the controller as the
//! chart's ServiceAccount and a proxy in API mode (`--tables-from configmap/...`), as in `cargo xtask demo`.

use super::Ctx;
use super::load::round;
use anyhow::{Context, Result, bail};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use portcullis_testkit::ControlPlane;
use portcullis_testkit::chart::{controller_token, helm_install};
use portcullis_testkit::http::{get, start_echo};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const NS: &str = "bench";
const RELEASE_NS: &str = "portcullis-system";

struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Clients in the table for the large run: `PORTCULLIS_PROPAGATION_CLIENTS`, 100 000 unless set (300 in smoke runs).
fn large_clients(smoke: bool) -> usize {
    match std::env::var("PORTCULLIS_PROPAGATION_CLIENTS") {
        Ok(v) => v.parse().expect("PORTCULLIS_PROPAGATION_CLIENTS: a count"),
        Err(_) if smoke => 300,
        Err(_) => 100_000,
    }
}

pub fn propagation(ctx: &Ctx) -> Result<(Value, String, Option<String>)> {
    let (trials, large_trials) = if ctx.smoke { (2, 2) } else { (100, 30) };
    let large = large_clients(ctx.smoke);
    let bins = portcullis_testkit::bins::bin_dir()?;
    // The smoke run is a debug build already: `cargo xtask bench --smoke` built these next to it.
    if !ctx.smoke {
        let st = Command::new("cargo")
            .current_dir(&ctx.root)
            .args([
                "build",
                "--release",
                "--locked",
                "--quiet",
                "-p",
                "portcullis-controller",
                "-p",
                "portcullis-proxy",
            ])
            .status()?;
        if !st.success() {
            bail!("cargo build --release -p portcullis-controller -p portcullis-proxy failed");
        }
    }
    let cp = ControlPlane::start_with_bins(&bins, true)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let r = rt.block_on(run(ctx, &cp, trials, large, large_trials));
    // The control plane's directory goes with it: keep the controller's and the proxy's logs for a look afterwards.
    let logs = ctx.root.join("target/bench-logs/propagation");
    if std::fs::create_dir_all(&logs).is_ok() {
        for f in ["controller.log", "controller.err", "proxy.log", "proxy.err"] {
            let _ = std::fs::copy(cp.dir().join(f), logs.join(f));
        }
    }
    drop(cp);
    let r = r?;
    let pct = |v: &[f64], q: f64| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    };
    let build = if ctx.smoke { "debug" } else { "release" };
    let mut md = format!(
        "Two runs on a fresh local control plane (kube-apiserver v1.37.2, etcd) with the chart installed by helm, the \
         controller ({build} build, as the chart's ServiceAccount) and one portcullis-proxy ({build} build, admin \
         kubeconfig, `--tables-from configmap/{NS}/...`): first {trials} trials per change with a handful of clients \
         in the table, then {} more ApiClients are created (keys in Secrets of {BULK_PER_SECRET}) and {large_trials} \
         trials per change run with {} clients in the table. Trials run one after another. Each trial: the API \
         write, then a request every 5 ms (new connection each) until the answer reflects the change. A watch on the \
         proxy's index ConfigMap, opened by this harness, splits each trial: *controller* = API write → the index \
         ConfigMap write seen by that watch (the controller's watch event, its debounce, key resolution, render, shard \
         + index writes, and the harness's own watch delivery); *proxy* = the rest (the proxy's watch delivery, its \
         shard reads, parse, swap, and up to one 5 ms poll).\n\n\
         | clients | change | what is polled | p50 s | p99 s | min s | max s | controller p50 s | proxy p50 s |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|\n",
        large - 1,
        r.large_clients,
    );
    let section = |series: &Series, clients: usize, md: &mut String| {
        let mut data = serde_json::Map::new();
        for (name, what, v, c) in series {
            let proxy: Vec<f64> = v.iter().zip(c).map(|(t, c)| t - c).filter(|x| x.is_finite()).collect();
            let c: Vec<f64> = c.iter().copied().filter(|x| x.is_finite()).collect();
            let p50 = |v: &[f64]| if v.is_empty() { f64::NAN } else { pct(v, 0.5) };
            data.insert(
                name.to_string(),
                json!({"p50": round(pct(v, 0.5), 4), "p99": round(pct(v, 0.99), 4), "trials": v.len(),
                       "controller_p50": round(p50(&c), 4), "proxy_p50": round(p50(&proxy), 4),
                       "samples_s": v.iter().map(|x| round(*x, 4)).collect::<Vec<_>>()}),
            );
            md.push_str(&format!(
                "| {clients} | {name} | {what} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                pct(v, 0.5),
                pct(v, 0.99),
                pct(v, 0.0),
                pct(v, 1.0),
                p50(&c),
                p50(&proxy)
            ));
        }
        data
    };
    let mut data = section(&r.small, r.small_clients, &mut md);
    let large_data = section(&r.large, r.large_clients, &mut md);
    data.insert("clients_large".into(), json!(r.large_clients));
    data.insert("large".into(), Value::Object(large_data));
    let (swap_mean, swap_p99, swaps) = r.large_swap;
    let (steady, peak) = r.large_rss;
    data.insert(
        "swap_large".into(),
        json!({"mean_ms": round(swap_mean * 1000.0, 1), "p99_ms_at_most": round(swap_p99 * 1000.0, 1), "swaps": swaps,
               "rss_steady_mib": round(steady, 1), "rss_peak_mib": round(peak, 1),
               "peak_rss_ratio": round(peak / steady, 3),
               "longest_request_ms": round(r.large_longest_request_s * 1000.0, 1)}),
    );
    data.insert(
        "bulk_load_s".into(),
        json!({"created": round(r.bulk_created_s, 1), "enforced": round(r.bulk_enforced_s, 1),
               "statuses": round(r.bulk_statuses_s, 1)}),
    );
    md.push_str(&format!(
        "\nLoading the large table: {} ApiClients created in {:.0} s ({BULK_CONCURRENCY} requests at a time), all \
         enforced by the proxy {:.0} s after the first create; every ApiClient Ready (its status written by the \
         controller for its generation), with no ApiClient changing for 5 s, {:.0} s after it. The large run's \
         trials start after that, once the controller is idle (a steady state, not the status writes of a bulk \
         load).\n",
        large - 1,
        r.bulk_created_s,
        r.bulk_enforced_s,
        r.bulk_statuses_s
    ));
    md.push_str(&format!(
        "\nThe proxy during the {} run's trials ({swaps:.0} revisions applied): table load (shard reads, parse, \
         compile, swap; `portcullis_proxy_table_load_seconds`) **{:.1} ms** mean, p99 ≤ {:.0} ms (histogram bucket); \
         RSS {steady:.1} MiB before the trials, peak {peak:.1} MiB during them (**{:.2} ×**; VmHWM reset just \
         before); the longest of the harness's polling requests (each a new connection) {:.1} ms.\n",
        r.large_clients,
        swap_mean * 1000.0,
        swap_p99 * 1000.0,
        peak / steady,
        r.large_longest_request_s * 1000.0,
    ));
    md.push_str(&format!(
        "\nAPI server requests (`apiserver_request_total`, every client: the controller, the proxy, this harness, the \
         API server's own controllers and kube-controller-manager) while the statuses of the bulk load were written: \
         {}. Per trial of the {}-client run:\n\n",
        top_requests(&r.status_requests, 1.0, 8),
        r.large_clients
    ));
    for (change, req) in &r.large_requests {
        md.push_str(&format!("- {change}: {}\n", top_requests(req, large_trials as f64, 8)));
    }
    data.insert(
        "api_requests".into(),
        json!({"statuses": r.status_requests, "large_trials": r.large_requests.iter().map(|(c, q)| (c.to_string(), json!(q))).collect::<serde_json::Map<_, _>>()}),
    );
    md.push_str(
        "\nGoal: p50 ≤ 0.3 s, p99 ≤ 1 s, also with 100 000 clients. What bounds it: on the controller side its table \
         debounce (quiet 100 ms, at most 2 s: `controller/src/runtime/mod.rs`) is the largest fixed part; then the \
         build and render of the table and the shard writes; on the proxy side the watch delivery, the fetch of the \
         changed shards and the compile of the new table.\n",
    );
    let groups: Vec<(String, Vec<f64>)> = r
        .small
        .iter()
        .map(|(n, _, v, _)| (n.to_string(), vec![pct(v, 0.5), pct(v, 0.99)]))
        .chain(
            r.large.iter().map(|(n, _, v, _)| (format!("{n} ({})", r.large_clients), vec![pct(v, 0.5), pct(v, 0.99)])),
        )
        .collect();
    let svg = super::bar_svg("API write → enforced by the proxy", "seconds", &["p50", "p99"], &groups);
    Ok((Value::Object(data), md, Some(svg)))
}

fn apiclients(client: kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("portcullis.dev", "v1alpha1", "ApiClient"));
    Api::namespaced_with(client, NS, &ar)
}

/// Polls until the answer for `key` satisfies `want`; returns the longest a request took meanwhile (seconds).
async fn until(proxy: SocketAddr, from: IpAddr, key: &str, want: impl Fn(u16) -> bool, kids: &mut Kids) -> Result<f64> {
    until_for(proxy, from, key, want, kids, Duration::from_secs(30)).await
}

async fn until_for(
    proxy: SocketAddr,
    from: IpAddr,
    key: &str,
    want: impl Fn(u16) -> bool,
    kids: &mut Kids,
    timeout: Duration,
) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    let mut longest: f64 = 0.0;
    loop {
        // Connection errors (the proxy not listening yet) count as "not yet".
        let sent = Instant::now();
        let answer = get(from, proxy, "/v1/items", Some(key)).await;
        longest = longest.max(sent.elapsed().as_secs_f64());
        let last = match answer {
            Ok(r) if want(r.status) => return Ok(longest),
            Ok(r) => format!("{} {}", r.status, r.body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("change not reflected within {timeout:?} (last answer {last})");
        }
        for c in &mut kids.0 {
            if let Some(s) = c.try_wait()? {
                bail!("a child process exited ({s})");
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The proxy's `portcullis_proxy_table_load_seconds` histogram: (sum, count, cumulative buckets by upper bound).
async fn table_loads(admin: SocketAddr) -> Result<(f64, f64, Vec<(f64, f64)>)> {
    let r = get(Ipv4Addr::LOCALHOST.into(), admin, "/metrics", None).await?;
    let (mut sum, mut count, mut buckets) = (0.0, 0.0, Vec::new());
    for line in r.body.lines() {
        let Some(rest) = line.strip_prefix("portcullis_proxy_table_load_seconds_") else { continue };
        let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        if rest.starts_with("sum") {
            sum = value(rest);
        } else if rest.starts_with("count") {
            count = value(rest);
        } else if let Some(le) = rest.strip_prefix("bucket{le=\"").and_then(|b| b.split('"').next()) {
            buckets.push((le.parse().unwrap_or(f64::INFINITY), value(rest)));
        }
    }
    Ok((sum, count, buckets))
}

/// (change, what is polled, API write → enforced, API write → index ConfigMap written) per trial, seconds.
type Series = Vec<(&'static str, &'static str, Vec<f64>, Vec<f64>)>;

/// Watches the proxy's index ConfigMap and records when each write of it is seen: the controller's share of a trial
/// is the time from the API write to the first index write after it (the index is written last, after its shards).
/// Aborts the task when dropped, on every way out of [`run`].
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn watch_index(client: kube::Client) -> (std::sync::Arc<std::sync::Mutex<Vec<Instant>>>, AbortOnDrop) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, NS);
    let name = portcullis_table::naming::index_name("echo");
    let task = tokio::spawn(async move {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        // Backoff: without it a watch on a stopped API server retries without ever yielding.
        let mut events = watcher(cms, cfg).default_backoff().applied_objects().boxed();
        while let Some(e) = events.next().await {
            if e.is_ok() {
                s.lock().expect("lock").push(Instant::now());
            }
        }
    });
    (seen, AbortOnDrop(task))
}

fn written_after(seen: &std::sync::Mutex<Vec<Instant>>, t: Instant) -> f64 {
    seen.lock().expect("lock").iter().find(|e| **e >= t).map_or(f64::NAN, |e| (*e - t).as_secs_f64())
}

/// Keys per Secret of the large run's clients.
const BULK_PER_SECRET: usize = 5_000;
/// Concurrent create requests while loading the large table.
const BULK_CONCURRENCY: usize = 32;
/// First client number of the large run's trials (the small run's are 1..=its trials).
const LARGE_BASE: usize = 10_000;

struct Runs {
    small: Series,
    small_clients: usize,
    large: Series,
    large_clients: usize,
    bulk_created_s: f64,
    bulk_enforced_s: f64,
    /// First create → every ApiClient's status written for its generation (the trials start after that).
    bulk_statuses_s: f64,
    /// Over the large run's trials: the proxy's table loads (mean s, upper bound of p99 s, how many), its RSS
    /// before them and its peak during them (MiB), the longest request of the polls (s).
    large_swap: (f64, f64, f64),
    large_rss: (f64, f64),
    large_longest_request_s: f64,
    /// API server requests from the end of the bulk creates until every status was written.
    status_requests: Requests,
    /// API server requests during each change's trials of the large run (every client of the API server).
    large_requests: Vec<(&'static str, Requests)>,
}

/// `verb resource[/subresource]` → requests served (`apiserver_request_total`).
type Requests = std::collections::BTreeMap<String, f64>;

/// The API server's request counters (its `/metrics`, read with the admin client).
async fn api_requests(admin: &kube::Client) -> Result<Requests> {
    let req = hyper::Request::get("/metrics").body(Vec::new())?;
    let text = admin.request_text(req).await.context("GET /metrics of the API server")?;
    let mut out = Requests::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = |k: &str| {
            let at = labels.find(&format!("{k}=\""))? + k.len() + 2;
            labels[at..].split('"').next()
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else { continue };
        let key = match label("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

fn diff(after: &Requests, before: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// The `n` most frequent requests of `r`, divided by `per`: "`GET configmaps` 2.0, …".
fn top_requests(r: &Requests, per: f64, n: usize) -> String {
    let mut v: Vec<(&String, &f64)> = r.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    let total: f64 = r.values().sum();
    let shown: Vec<String> = v.iter().take(n).map(|(k, c)| format!("`{k}` {:.1}", *c / per)).collect();
    format!("{:.1} in all: {}", total / per, shown.join(", "))
}

/// What every trial needs.
struct Bench<'a> {
    cp: &'a ControlPlane,
    /// For the API server's request counters ([`api_requests`]).
    admin: kube::Client,
    api: Api<DynamicObject>,
    proxy: SocketAddr,
    index_writes: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

async fn run(ctx: &Ctx, cp: &ControlPlane, trials: usize, large: usize, large_trials: usize) -> Result<Runs> {
    let mut kids = Kids(Vec::new());
    let logs = cp.dir().to_path_buf();
    let admin = cp.admin_client().await;
    let webhook_port = super::servers::free_port()?;
    helm_install(cp, &ctx.root, webhook_port)?;
    let (_, token) = controller_token(cp, &admin).await?;
    let target = ctx.root.join(if ctx.smoke { "target/debug" } else { "target/release" });
    let metrics_port = super::servers::free_port()?;
    kids.0.push(
        Command::new(target.join("portcullis-controller"))
            .env("KUBECONFIG", cp.kubeconfig_for_token(&token))
            .args(["--log-format", "json", "--lease-namespace", RELEASE_NS, "--webhook-namespace", RELEASE_NS])
            // `PORTCULLIS_BENCH_CONTROLLER_LOG`: another filter, to look into a run (say, kube_runtime=debug).
            .env(
                "RUST_LOG",
                std::env::var("PORTCULLIS_BENCH_CONTROLLER_LOG")
                    .unwrap_or_else(|_| "info,portcullis_controller::runtime::tables=debug".into()),
            )
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .arg(format!("--webhook-listen=127.0.0.1:{webhook_port}"))
            .stdout(std::fs::File::create(logs.join("controller.log"))?)
            .stderr(std::fs::File::create(logs.join("controller.err"))?)
            .spawn()?,
    );
    cp.apply_yaml(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"), None).await?;
    cp.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec: {selector: {app: echo}, ports: [{port: 80, targetPort: 8443}]}\n",
        Some(NS),
    )
    .await?;
    cp.apply_yaml(
        "apiVersion: portcullis.dev/v1alpha1\nkind: UsagePlan\nmetadata: {name: bench}\nspec:\n  services: [{name: echo, routes: [{pathPrefix: /v1, methods: [GET]}]}]\n  throttle: {rate: 100000, per: 1s, burst: 100000}\n",
        Some(NS),
    )
    .await?;
    // Client 0 exists before the proxy starts, so its first table is not empty.
    cp.apply_yaml(&secret(0), Some(NS)).await?;
    let api = apiclients(admin.clone());
    api.create(&PostParams::default(), &client_obj(0, &["127.0.0.1/32"])?).await?;
    let echo = start_echo("x-api-key").await?;
    let (pp, ap) = (super::servers::free_port()?, super::servers::free_port()?);
    kids.0.push(
        Command::new(target.join("portcullis-proxy"))
            .env("KUBECONFIG", cp.admin_kubeconfig())
            .arg(format!("--listen=127.0.0.1:{pp}"))
            .arg(format!("--admin-listen=127.0.0.1:{ap}"))
            .arg(format!("--upstream={echo}"))
            .arg(format!("--tables-from=configmap/{NS}/{}", portcullis_table::naming::index_name("echo")))
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(logs.join("proxy.log"))?)
            .stderr(std::fs::File::create(logs.join("proxy.err"))?)
            .spawn()?,
    );
    let proxy = SocketAddr::from(([127, 0, 0, 1], pp));
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    if let Err(e) = until_for(proxy, lo, &key(0), |s| s == 200, &mut kids, Duration::from_secs(120)).await {
        let tail = |f: &str| {
            let t = std::fs::read_to_string(logs.join(f)).unwrap_or_default();
            t.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        bail!(
            "client 0 never served: {e:#}\n--- controller.log\n{}\n--- proxy.log\n{}",
            tail("controller.log"),
            tail("proxy.log")
        );
    }
    eprintln!("  propagation: control plane, controller and proxy up");
    let (index_writes, _index_watch) = watch_index(admin.clone());
    let bench = Bench { cp, admin: admin.clone(), api: api.clone(), proxy, index_writes };
    let (small, small_longest, _) = bench.trials(1, trials, &mut kids).await?;
    let small = (small, small_longest);
    let small_clients = 1 + trials;

    // The large table: `large` clients in all when its trials start.
    let bulk = large.saturating_sub(small_clients);
    eprintln!("  propagation: creating {bulk} more ApiClients");
    let started = Instant::now();
    bulk_create(&admin, bulk).await?;
    let bulk_created_s = started.elapsed().as_secs_f64();
    let after_creates = api_requests(&admin).await?;
    eprintln!("  propagation: {bulk} created in {bulk_created_s:.0} s; waiting for the proxy to enforce them all");
    wait_index_clients(&admin, small_clients + bulk, &mut kids).await?;
    if bulk > 0 {
        until_for(proxy, lo, &bulk_key(bulk - 1), |s| s == 200, &mut kids, Duration::from_secs(600))
            .await
            .context("the last bulk client")?;
    }
    let bulk_enforced_s = started.elapsed().as_secs_f64();
    eprintln!("  propagation: {} clients enforced after {bulk_enforced_s:.0} s", small_clients + bulk);
    // The controller then writes each new ApiClient's status (twice each, minutes for 100 000); the trials measure a
    // steady state, after that: every ApiClient Ready, then the controller idle.
    let statuses_started = Instant::now();
    wait_statuses(&api, small_clients + bulk, &mut kids).await?;
    let statuses_s = statuses_started.elapsed().as_secs_f64() + bulk_enforced_s;
    let status_requests = diff(&api_requests(&admin).await?, &after_creates);
    eprintln!("  propagation: every ApiClient's status written {statuses_s:.0} s after the first create");
    wait_idle(kids.0[0].id(), &mut kids).await?;
    let proxy_pid = kids.0[1].id();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], ap));
    let steady = super::servers::rss_mib(proxy_pid)?;
    super::servers::reset_hwm(proxy_pid);
    let loads_before = table_loads(admin_addr).await?;
    let (large, longest, large_requests) = bench.trials(LARGE_BASE, large_trials, &mut kids).await?;
    let peak = super::servers::hwm_mib(proxy_pid)?;
    let loads_after = table_loads(admin_addr).await?;
    let swaps = loads_after.1 - loads_before.1;
    let mean = if swaps > 0.0 { (loads_after.0 - loads_before.0) / swaps } else { f64::NAN };
    let p99 = loads_after
        .2
        .iter()
        .zip(loads_before.2.iter().map(|b| b.1).chain(std::iter::repeat(0.0)))
        .find(|((_, after), before)| after - before >= 0.99 * swaps)
        .map_or(f64::NAN, |((le, _), _)| *le);
    Ok(Runs {
        small: small.0,
        small_clients,
        large,
        large_clients: small_clients + bulk,
        bulk_created_s,
        bulk_enforced_s,
        bulk_statuses_s: statuses_s,
        large_swap: (mean, p99, swaps),
        large_rss: (steady, peak),
        large_longest_request_s: longest,
        status_requests,
        large_requests,
    })
}

impl Bench<'_> {
    /// `n` trials of each change: clients `base + 1 ..= base + n` created, then client 0's CIDRs changed `n` times,
    /// then the clients created revoked.
    /// Returns the series and the longest request of the polls (seconds).
    async fn trials(
        &self,
        base: usize,
        n: usize,
        kids: &mut Kids,
    ) -> Result<(Series, f64, Vec<(&'static str, Requests)>)> {
        let (cp, api, proxy, index_writes) = (self.cp, &self.api, self.proxy, &self.index_writes);
        let mut requests = Vec::new();
        let mut mark = api_requests(&self.admin).await?;
        let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
        let lo2: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let (mut create_c, mut cidr_c, mut revoke_c) = (Vec::new(), Vec::new(), Vec::new());
        let mut create = Vec::new();
        let mut longest: f64 = 0.0;
        for i in base + 1..=base + n {
            cp.apply_yaml(&secret(i), Some(NS)).await?;
            let t = Instant::now();
            api.create(&PostParams::default(), &client_obj(i, &["127.0.0.1/32"])?).await?;
            longest = longest.max(until(proxy, lo, &key(i), |s| s == 200, kids).await.context("create")?);
            create.push(t.elapsed().as_secs_f64());
            create_c.push(written_after(index_writes, t));
        }
        let now = api_requests(&self.admin).await?;
        requests.push(("create", diff(&now, &mark)));
        mark = now;
        let mut cidr = Vec::new();
        for i in 0..n {
            // Alternately allow and remove 127.0.0.2 for client 0; time until a request from 127.0.0.2 reflects it.
            let add = i % 2 == 0;
            let ranges: &[&str] = if add { &["127.0.0.1/32", "127.0.0.2/32"] } else { &["127.0.0.1/32"] };
            let t = Instant::now();
            api.patch("c0", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sourceRanges": ranges}}))).await?;
            let polled = until(proxy, lo2, &key(0), |s| if add { s == 200 } else { s == 403 }, kids).await;
            longest = longest.max(polled.context("cidr")?);
            cidr.push(t.elapsed().as_secs_f64());
            cidr_c.push(written_after(index_writes, t));
        }
        if n % 2 == 1 {
            // Leave client 0 as it was (127.0.0.1 only) for the next run.
            api.patch(
                "c0",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"sourceRanges": ["127.0.0.1/32"]}})),
            )
            .await?;
            until(proxy, lo2, &key(0), |s| s == 403, kids).await.context("cidr reset")?;
        }
        let now = api_requests(&self.admin).await?;
        requests.push(("cidr_change", diff(&now, &mark)));
        mark = now;
        let mut revoke = Vec::new();
        for i in base + 1..=base + n {
            // Revoke = remove the key's entry: the client's keys now list only a new Secret (created before the clock).
            cp.apply_yaml(
                &format!(
                    "apiVersion: v1\nkind: Secret\nmetadata: {{name: r{i}, labels: {{portcullis.dev/api-key: \"true\"}}}}\ntype: Opaque\nstringData: {{api-key: rotated-{}}}\n",
                    key(i)
                ),
                Some(NS),
            )
            .await?;
            let t = Instant::now();
            let patch = json!({"spec": {"keys": [{"secretRef": {"name": format!("r{i}"), "key": "api-key"}}]}});
            api.patch(&format!("c{i}"), &PatchParams::default(), &Patch::Merge(patch)).await?;
            longest = longest.max(until(proxy, lo, &key(i), |s| s == 401 || s == 403, kids).await.context("revoke")?);
            revoke.push(t.elapsed().as_secs_f64());
            revoke_c.push(written_after(index_writes, t));
        }
        requests.push(("revoke", diff(&api_requests(&self.admin).await?, &mark)));
        let series = vec![
            ("create", "new ApiClient (Secret created before) → its key gets 200", create, create_c),
            ("cidr_change", "sourceRanges ± 127.0.0.2/32 → 200 / 403 from 127.0.0.2", cidr, cidr_c),
            ("revoke", "key entry replaced by a new key (Secret created before) → old key 401", revoke, revoke_c),
        ];
        Ok((series, longest, requests))
    }
}

fn secret(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: k{i}, labels: {{portcullis.dev/api-key: \"true\"}}}}\ntype: Opaque\nstringData: {{api-key: {}}}\n",
        key(i)
    )
}

fn bulk_key(i: usize) -> String {
    format!("bench-bulk-key-{i:06}-0123456789abcdef")
}

/// Creates `n` ApiClients `b<i>` (keys in Secrets `bulk-<s>` of [`BULK_PER_SECRET`] keys each), each allowed from
/// its own 10.x.y.0/24 — the last one from 127.0.0.1 too, so the harness can see when it is enforced.
async fn bulk_create(admin: &kube::Client, n: usize) -> Result<()> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    for s in 0..n.div_ceil(BULK_PER_SECRET) {
        let data: std::collections::BTreeMap<String, String> =
            (s * BULK_PER_SECRET..((s + 1) * BULK_PER_SECRET).min(n)).map(|i| (format!("k{i}"), bulk_key(i))).collect();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("bulk-{s}"), "namespace": NS, "labels": {"portcullis.dev/api-key": "true"}},
            "type": "Opaque", "stringData": data,
        }))?;
        secrets.create(&PostParams::default(), &secret).await.with_context(|| format!("Secret bulk-{s}"))?;
    }
    let api = apiclients(admin.clone());
    let results: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut ranges = vec![format!("10.{}.{}.0/24", i / 256 % 256, i % 256)];
                if i + 1 == n {
                    ranges.push("127.0.0.1/32".into());
                }
                let obj: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiClient",
                    "metadata": {"name": format!("b{i}"), "namespace": NS},
                    "spec": {"usagePlans": ["bench"], "sourceRanges": ranges,
                             "keys": [{"secretRef": {"name": format!("bulk-{}", i / BULK_PER_SECRET), "key": format!("k{i}")}}]}
                }))?;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match api.create(&PostParams::default(), &obj).await {
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
                        Err(e) if attempt < 5 => {
                            eprintln!("  propagation: creating b{i}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(anyhow::anyhow!("creating b{i}: {e}")),
                    }
                }
            }
        })
        .buffer_unordered(BULK_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Waits until at least `want` ApiClients are Ready for their current generation (condition `Ready` true with
/// `observedGeneration` = `metadata.generation`) and no ApiClient has changed for 5 s: the status writes of a bulk
/// load are over (each new client is written twice: when seen, and once the table holds it). Follows a watch (one
/// list, then events) rather than listing 100 000 objects again and again (up to 30 minutes).
async fn wait_statuses(api: &Api<DynamicObject>, want: usize, kids: &mut Kids) -> Result<()> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let ready = |o: &DynamicObject| {
        o.data.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Ready"
                    && c["status"] == "True"
                    && o.metadata.generation.is_some()
                    && c["observedGeneration"].as_i64() == o.metadata.generation
            })
        })
    };
    let mut states: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut events = watcher(api.clone(), watcher::Config::default()).default_backoff().applied_objects().boxed();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let quiet = Duration::from_secs(5);
    loop {
        match tokio::time::timeout(quiet, events.next()).await {
            Ok(Some(Ok(o))) => {
                let name = o.metadata.name.clone().unwrap_or_default();
                states.insert(name, ready(&o));
                continue;
            }
            Ok(Some(Err(e))) => eprintln!("  propagation: ApiClient watch: {e}; retrying"),
            Ok(None) => bail!("the ApiClient watch ended"),
            // Quiet for 5 s: done if every client is Ready.
            Err(_) => {
                let n = states.values().filter(|r| **r).count();
                if n >= want {
                    return Ok(());
                }
                eprintln!("  propagation: {n} of {want} ApiClients Ready");
            }
        }
        if Instant::now() > deadline {
            let n = states.values().filter(|r| **r).count();
            bail!("{n} of {want} ApiClients Ready after 60 minutes");
        }
        for c in &mut kids.0 {
            if let Some(s) = c.try_wait()? {
                bail!("a child process exited ({s})");
            }
        }
    }
}

/// Waits until process `pid` (the controller) has used under 10 % of a core for 3 s in a row (up to 30 minutes): at
/// 100 000 clients its steady state is not idle (each ApiClient is re-checked every ≈ 10 minutes, ≈ 170/s).
async fn wait_idle(pid: u32, kids: &mut Kids) -> Result<()> {
    let cpu = || -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
        let ticks: u64 = fields
            .get(11)
            .zip(fields.get(12))
            .map_or(Ok(0), |(u, s)| Ok::<_, anyhow::Error>(u.parse::<u64>()? + s.parse::<u64>()?))?;
        Ok(ticks as f64 / 100.0)
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last = cpu()?;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = cpu()?;
        if now - last < 0.3 {
            return Ok(());
        }
        last = now;
        if Instant::now() > deadline {
            bail!("the controller is still busy after 30 minutes");
        }
        for c in &mut kids.0 {
            if let Some(s) = c.try_wait()? {
                bail!("a child process exited ({s})");
            }
        }
    }
}

/// Waits until the proxy's index ConfigMap lists `want` clients (the controller has published them all).
async fn wait_index_clients(admin: &kube::Client, want: usize, kids: &mut Kids) -> Result<()> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(admin.clone(), NS);
    let name = portcullis_table::naming::index_name("echo");
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let listed = cms
            .get_opt(&name)
            .await?
            .and_then(|cm| cm.data?.remove(portcullis_table::naming::INDEX_DATA_KEY))
            .and_then(|json| portcullis_table::shard::IndexDoc::parse(&json, "index").ok())
            .map_or(0, |d| d.clients);
        if listed >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the index lists {listed} clients, not {want}, after 30 minutes");
        }
        for c in &mut kids.0 {
            if let Some(s) = c.try_wait()? {
                bail!("a child process exited ({s})");
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn key(i: usize) -> String {
    format!("bench-prop-key-{i:04}-0123456789abcdef")
}

fn keys_patch(i: usize) -> Value {
    json!({"spec": {"keys": [{"secretRef": {"name": format!("k{i}"), "key": "api-key"}}]}})
}

fn client_obj(i: usize, ranges: &[&str]) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiClient",
        "metadata": {"name": format!("c{i}"), "namespace": NS},
        "spec": {"usagePlans": ["bench"], "sourceRanges": ranges,
                 "keys": keys_patch(i)["spec"]["keys"]}
    }))?)
}
