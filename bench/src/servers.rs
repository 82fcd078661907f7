//! The server side of a bench: the upstream (a small hyper server, 1 KiB body), portcullis-proxy and nginx, each a
//! child process pinned to the server core; tables; /proc readings (RSS, CPU time).

use super::load::SERVER_CPU;
use anyhow::{Context, Result, bail};
use portcullis_table::{Client, Period, Plan, Quota, RouteScope, Table, Throttle};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (by its own pid) when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command before the proxy, nginx and HAProxy started from now on (after `taskset`): the profile suite runs them
/// under `valgrind --tool=callgrind`. Empty: none.
static WRAPPER: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn set_wrapper(argv: &[&str]) {
    *WRAPPER.lock().unwrap_or_else(|p| p.into_inner()) = argv.iter().map(|s| s.to_string()).collect();
}

/// `taskset -c SERVER_CPU [wrapper…] program`.
fn server_command(program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", SERVER_CPU]).args(WRAPPER.lock().unwrap_or_else(|p| p.into_inner()).iter()).arg(program);
    c
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `bench-upstream`: serves 200 with a 1 KiB body; prints its address on the first stdout line.
pub fn upstream_main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let addr = portcullis_testkit::http::start_sized_upstream(1024).await?;
        println!("{addr}");
        std::future::pending::<()>().await;
        anyhow::Ok(())
    })
}

pub fn start_upstream() -> Result<Proc> {
    let exe = helper_exe("bench-upstream")?;
    let mut child = Command::new("taskset")
        .args(["-c", SERVER_CPU])
        .arg(exe)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the upstream")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line.trim().parse().with_context(|| format!("upstream said {line:?}"))?;
    Ok(Proc { child, addr, admin: None })
}

pub fn start_proxy(bin: &Path, upstream: SocketAddr, tables: &Path) -> Result<Proc> {
    start_proxy_with(bin, upstream, tables, &[])
}

/// [`start_proxy`] with extra arguments (e.g. `--tls-cert=…`). No access log (like nginx's `access_log off`
/// here), unless `extra` turns it on.
pub fn start_proxy_with(bin: &Path, upstream: SocketAddr, tables: &Path, extra: &[String]) -> Result<Proc> {
    start_proxy_to(bin, upstream, tables, extra, Stdio::null())
}

/// P1 with its access log on (JSON, every request), written to `log` as a container runtime would store it.
pub fn start_proxy_logging(bin: &Path, upstream: SocketAddr, tables: &Path, log: &Path) -> Result<Proc> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    start_proxy_to(bin, upstream, tables, &["--access-log=json".to_string()], Stdio::from(file))
}

fn start_proxy_to(bin: &Path, upstream: SocketAddr, tables: &Path, extra: &[String], stdout: Stdio) -> Result<Proc> {
    let (port, admin) = (free_port()?, free_port()?);
    let child = server_command(&bin.display().to_string())
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--admin-listen=127.0.0.1:{admin}"))
        .arg(format!("--upstream={upstream}"))
        .arg(format!("--tables={}", tables.display()))
        .args((!extra.iter().any(|a| a.starts_with("--access-log"))).then_some("--access-log=off"))
        .args(extra)
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn")
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .context("starting portcullis-proxy")?;
    let p = Proc { child, addr: ([127, 0, 0, 1], port).into(), admin: Some(([127, 0, 0, 1], admin).into()) };
    wait_url(&format!("http://127.0.0.1:{admin}/readyz"), Duration::from_secs(120))?;
    Ok(p)
}

pub fn wait_url(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !curl_ok(url) {
        if Instant::now() > deadline {
            bail!("{url} not ready within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn curl_ok(url: &str) -> bool {
    Command::new("curl")
        .args(["-fsS", "-o", "/dev/null", url])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The status of `GET url` with `x-api-key: key` (none when `key` is empty).
pub fn curl_status(url: &str, key: &str) -> Result<u16> {
    let mut c = Command::new("curl");
    c.args(["-sSk", "-o", "/dev/null", "-w", "%{http_code}"]);
    if !key.is_empty() {
        c.args(["-H", &format!("x-api-key: {key}")]);
    }
    let out = c.arg(url).output().context("running curl")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("curl {url}: no status"))
}

/// An arm doing the policy job (N1, H1, P1) really refuses: an unknown key 401, a route outside the plan 403, and
/// lets the bench key through.
pub fn check_policy(name: &str, addr: SocketAddr) -> Result<()> {
    check_policy_at(name, &format!("http://{addr}"))
}

/// [`check_policy`] at `base` (`http://…` or `https://…`; the benchmarks' certificate is self-signed, so curl
/// does not verify it).
pub fn check_policy_at(name: &str, base: &str) -> Result<()> {
    let cases = [("/v1/items", key(0), 200), ("/v1/items", "not-a-key".to_string(), 401), ("/v2/items", key(0), 403)];
    for (path, k, want) in cases {
        let got = curl_status(&format!("{base}{path}"), &k)?;
        if got != want {
            bail!("arm {name}: GET {path} with key {k:?} answered {got}, not {want}: it does not do the policy's job");
        }
    }
    Ok(())
}

/// The proxy binary the suites run: the release build (built here, with this crate's helpers), or for `--smoke`
/// the debug build next to the running driver (`cargo xtask bench --smoke` builds the workspace's debug binaries,
/// the same ones `cargo xtask test` builds, so CI compiles nothing for the smoke run).
pub fn build_proxy(root: &Path, smoke: bool) -> Result<PathBuf> {
    if smoke {
        return helper_exe("portcullis-proxy");
    }
    eprintln!("bench: cargo build --release -p portcullis-proxy -p portcullis-bench --features portcullis-bench/png");
    let st = Command::new("cargo")
        .current_dir(root)
        .args(["build", "--release", "-q", "--locked", "-p", "portcullis-proxy", "-p", "portcullis-bench"])
        .args(["--features", "portcullis-bench/png"])
        .status()?;
    if !st.success() {
        bail!("cargo build --release -p portcullis-proxy -p portcullis-bench failed");
    }
    Ok(root.join("target/release/portcullis-proxy"))
}

pub const LIMIT_FREE: Throttle = Throttle { rate: 1_000_000_000, per_millis: 1000, burst: 1_000_000 };

/// N clients on one plan; client 0 holds `bench-key-0` and is allowed from 127.0.0.1/32, every other client from
/// its own 10.x.y.0/24. `throttle: None` and `quota: None` = P0's allow-all-ish policy.
pub fn table(n: usize, throttle: Option<Throttle>, quota: bool) -> Table {
    let mut plans = BTreeMap::new();
    plans.insert(
        "bench".to_string(),
        Plan {
            throttle,
            quota: quota.then_some(Quota { limit: 1_000_000_000_000, period: Period::Month }),
            routes: vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] }],
            ..Default::default()
        },
    );
    let clients = (0..n.max(1))
        .map(|i| {
            Client::builder(format!("bench/client-{i:06}")).key(key(i)).source(&client_cidr(i)).plan("bench").build()
        })
        .collect();
    Table::new("bench/upstream", plans, clients)
}

pub fn key(i: usize) -> String {
    format!("bench-key-{i}")
}

pub fn client_cidr(i: usize) -> String {
    if i == 0 { "127.0.0.1/32".into() } else { format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255) }
}

/// nginx config. `policy = false`: N0, plain pass-through with upstream keepalive. `policy = true`: N1, the same
/// job as Portcullis with nginx's own modules: `map` of API key (raw keys: nginx has no SHA-256 without njs) →
/// client, `geo` of source address → client (each client's own CIDR), a per-client check that both agree, a
/// route/method check, and `limit_req` per client with burst (limits far above the load, as for P1).
/// A certificate and its key, PEM files.
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed ECDSA P-256 certificate for `127.0.0.1` (rcgen's default key type), shared by nginx and the proxy.
pub fn write_cert(dir: &Path) -> Result<TlsPair> {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let pair = TlsPair { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    std::fs::write(&pair.cert, ck.cert.pem())?;
    std::fs::write(&pair.key, ck.signing_key.serialize_pem())?;
    Ok(pair)
}

/// nginx + Redis (the `global` suite's N1R): N1's checks, then, per request instead of `limit_req`, this project's
/// own `TAKE` script (`portcullis_store::scripts::TAKE`: the throttle's GCRA and the quota, atomically) in Redis, by
/// EVALSHA through lua-resty-redis (Debian: `lua-nginx-redis`) from an `access_by_lua_block`
/// (`libnginx-mod-http-lua`), connections pooled with `set_keepalive`. A per-request round trip without leases, as
/// Kong's `redis` rate-limiting policy does.
pub struct NginxRedis {
    pub port: u16,
    /// SHA-1 of the loaded script (`SCRIPT LOAD`).
    pub sha: String,
    pub throttle: Throttle,
    pub quota_limit: u64,
    /// The store keys of client `X`, split around `X` ([`portcullis_table::store_keys`]).
    pub throttle_key: (String, String),
    pub quota_key: (String, String),
    pub expires_at: i64,
}

/// The Debian files nginx + Redis needs (`apt-get install libnginx-mod-http-lua lua-nginx-redis`).
pub const NGINX_LUA_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_lua_module.so";
pub const NGINX_NDK_MODULE: &str = "/usr/lib/nginx/modules/ndk_http_module.so";
pub const LUA_NGINX_REDIS: &str = "/usr/share/lua/5.1/nginx/redis.lua";

fn lua_access(r: &NginxRedis) -> String {
    let t = &r.throttle;
    let interval_us = (t.per_millis * 1000).div_ceil(u64::from(t.rate).max(1)).max(1);
    format!(
        "      access_by_lua_block {{\n        local red = require(\"nginx.redis\"):new()\n        \
         red:set_timeouts(500, 500, 500)\n        local ok, err = red:connect(\"127.0.0.1\", {port})\n        \
         if not ok then ngx.log(ngx.ERR, \"redis: \", err) return ngx.exit(503) end\n        \
         local c = ngx.var.client\n        \
         local res, err = red:evalsha(\"{sha}\", 2, \"{tp}\" .. c .. \"{ts}\", \"{qp}\" .. c .. \"{qs}\", \
         1, {interval_us}, {burst}, 1, {limit}, {exp})\n        \
         if not res then ngx.log(ngx.ERR, \"redis: \", err) red:close() return ngx.exit(503) end\n        \
         red:set_keepalive(60000, 64)\n        \
         if res[1] == 0 or res[3] == 0 then return ngx.exit(429) end\n      }}\n",
        port = r.port,
        sha = r.sha,
        tp = r.throttle_key.0,
        ts = r.throttle_key.1,
        qp = r.quota_key.0,
        qs = r.quota_key.1,
        burst = t.burst.max(1),
        limit = r.quota_limit,
        exp = r.expires_at,
    )
}

pub fn nginx_conf(
    dir: &Path,
    upstream: SocketAddr,
    port: u16,
    policy: bool,
    clients: usize,
    tls: Option<&TlsPair>,
    redis: Option<&NginxRedis>,
) -> String {
    let mut s = String::new();
    if redis.is_some() {
        s.push_str(&format!("load_module {NGINX_NDK_MODULE};\nload_module {NGINX_LUA_MODULE};\n"));
    }
    s.push_str(&format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  upstream app {{ server {upstream}; keepalive 64; }}\n",
        d = dir.display()
    ));
    if policy {
        s.push_str("  map_hash_bucket_size 128;\n  map_hash_max_size 262144;\n");
        s.push_str("  map $http_x_api_key $client {\n    default \"\";\n");
        for i in 0..clients.max(1) {
            s.push_str(&format!("    \"{}\" c{i};\n", key(i)));
        }
        s.push_str("  }\n  geo $src_client {\n    default \"-\";\n");
        for i in 0..clients.max(1) {
            s.push_str(&format!("    {} c{i};\n", client_cidr(i)));
        }
        s.push_str(
            "  }\n  map \"$client:$src_client\" $source_ok {\n    \"~^(?<c>[^:]+):\\k<c>$\" 1;\n    default 0;\n  }\n",
        );
        s.push_str("  limit_req_zone $client zone=perclient:32m rate=1000000r/s;\n  limit_req_status 429;\n");
    }
    if redis.is_some() {
        s.push_str("  lua_package_path \"/usr/share/lua/5.1/?.lua;;\";\n");
    }
    match tls {
        Some(t) => s.push_str(&format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    \
             ssl_protocols TLSv1.2 TLSv1.3;\n",
            t.cert.display(),
            t.key.display()
        )),
        None => s.push_str(&format!("  server {{\n    listen 127.0.0.1:{port};\n")),
    }
    if policy {
        s.push_str(
            "    location /v1 {\n      if ($client = \"\") { return 401; }\n      if ($source_ok = 0) { return 403; }\n      \
             if ($request_method != GET) { return 403; }\n",
        );
        match redis {
            Some(r) => s.push_str(&lua_access(r)),
            None => s.push_str("      limit_req zone=perclient burst=1000 nodelay;\n"),
        }
        s.push_str("      proxy_set_header x-api-key \"\";\n      proxy_set_header x-portcullis-client $client;\n");
    } else {
        s.push_str("    location / {\n");
    }
    s.push_str(
        "      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }\n",
    );
    if policy {
        s.push_str("    location / { return 403; }\n");
    }
    s.push_str("  }\n}\n");
    s
}

pub fn start_nginx(dir: &Path, upstream: SocketAddr, policy: bool, clients: usize) -> Result<Proc> {
    start_nginx_with(dir, upstream, policy, clients, None)
}

pub fn start_nginx_with(
    dir: &Path,
    upstream: SocketAddr,
    policy: bool,
    clients: usize,
    tls: Option<&TlsPair>,
) -> Result<Proc> {
    start_nginx_conf(dir, upstream, policy, clients, tls, None)
}

/// N1 with its per-client throttle and quota counted in Redis ([`NginxRedis`]).
pub fn start_nginx_redis(dir: &Path, upstream: SocketAddr, clients: usize, redis: &NginxRedis) -> Result<Proc> {
    for f in [NGINX_LUA_MODULE, NGINX_NDK_MODULE, LUA_NGINX_REDIS] {
        if !Path::new(f).exists() {
            bail!("{f} is missing: apt-get install -y libnginx-mod-http-lua lua-nginx-redis (the nginx + Redis arm)");
        }
    }
    start_nginx_conf(dir, upstream, true, clients, None, Some(redis))
}

fn start_nginx_conf(
    dir: &Path,
    upstream: SocketAddr,
    policy: bool,
    clients: usize,
    tls: Option<&TlsPair>,
    redis: Option<&NginxRedis>,
) -> Result<Proc> {
    let name = format!(
        "nginx-{}{}{}",
        if policy { "n1" } else { "n0" },
        if tls.is_some() { "-tls" } else { "" },
        if redis.is_some() { "-redis" } else { "" }
    );
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub)?;
    let port = free_port()?;
    let conf = sub.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&sub, upstream, port, policy, clients, tls, redis))?;
    let child = server_command("nginx")
        .arg("-p")
        .arg(&sub)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nginx (apt-get install -y nginx)")?;
    let p = Proc { child, addr: ([127, 0, 0, 1], port).into(), admin: None };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(p.addr).is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not listen within 60 s; see {}", sub.join("error.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

/// HAProxy config (Debian's 2.6, one thread, pinned like nginx). `policy = false`: H0, plain pass-through with
/// connection reuse to the upstream. `policy = true`: H1, the same job as N1 and P1 with HAProxy's own tools: a `map`
/// file of API key → client, a `map_ip` file of source range → client and a check that both name the same client
/// (each client's own CIDR), a route/method check, and a per-client request rate from a stick table (limit far
/// above the load, as for N1 and P1); the key header is removed and the client named to the upstream.
///
/// With `tls`, the frontend terminates TLS with that certificate (`bind … ssl crt`, HAProxy's PEM of certificate
/// and key together; TLS 1.2 and 1.3, ALPN http/1.1), like nginx's and the proxy's TLS arms.
pub fn haproxy_conf(
    dir: &Path,
    upstream: SocketAddr,
    port: u16,
    policy: bool,
    clients: usize,
    tls: Option<&TlsPair>,
) -> Result<String> {
    let ssl = match tls {
        Some(pair) => {
            let pem = dir.join("haproxy.pem");
            let mut both = std::fs::read_to_string(&pair.cert)?;
            both.push_str(&std::fs::read_to_string(&pair.key)?);
            std::fs::write(&pem, both)?;
            format!(" ssl crt {} alpn http/1.1 ssl-min-ver TLSv1.2", pem.display())
        }
        None => String::new(),
    };
    let mut s = format!(
        "global\n  nbthread 1\n  maxconn 4096\n  tune.bufsize 16384\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
         option http-keep-alive\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{port}{ssl}\n"
    );
    if policy {
        let (keys, sources) = (dir.join("keys.map"), dir.join("sources.map"));
        let mut k = String::new();
        let mut src = String::new();
        for i in 0..clients.max(1) {
            k.push_str(&format!("{} c{i}\n", key(i)));
            src.push_str(&format!("{} c{i}\n", client_cidr(i)));
        }
        std::fs::write(&keys, k)?;
        std::fs::write(&sources, src)?;
        s.push_str(&format!(
            "  http-request set-var(txn.client) req.hdr(x-api-key),map({keys})\n  \
             http-request deny deny_status 401 unless {{ var(txn.client) -m found }}\n  \
             http-request set-var(txn.src_client) src,map_ip({sources})\n  \
             http-request deny deny_status 403 unless {{ var(txn.client),strcmp(txn.src_client) eq 0 }}\n  \
             http-request deny deny_status 403 unless {{ path_beg /v1 }} METH_GET\n  \
             http-request track-sc0 var(txn.client) table per_client\n  \
             http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 1000000000 }}\n  \
             http-request del-header x-api-key\n  \
             http-request set-header x-portcullis-client %[var(txn.client)]\n",
            keys = keys.display(),
            sources = sources.display()
        ));
    }
    s.push_str(&format!("  default_backend app\nbackend app\n  server app {upstream}\n"));
    if policy {
        s.push_str(
            "backend per_client\n  stick-table type string len 32 size 64k expire 60s store http_req_rate(1s)\n",
        );
    }
    Ok(s)
}

/// Starts HAProxy (`apt-get install haproxy`) in the foreground (`-db`), pinned to the server CPU.
pub fn start_haproxy(dir: &Path, upstream: SocketAddr, policy: bool, clients: usize) -> Result<Proc> {
    start_haproxy_with(dir, upstream, policy, clients, None)
}

/// [`start_haproxy`], terminating TLS with `tls` when given.
pub fn start_haproxy_with(
    dir: &Path,
    upstream: SocketAddr,
    policy: bool,
    clients: usize,
    tls: Option<&TlsPair>,
) -> Result<Proc> {
    let name = format!("haproxy-h{}{}", u8::from(policy), if tls.is_some() { "-tls" } else { "" });
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub)?;
    let port = free_port()?;
    let conf = sub.join("haproxy.cfg");
    std::fs::write(&conf, haproxy_conf(&sub, upstream, port, policy, clients, tls)?)?;
    let log = std::fs::File::create(sub.join("haproxy.log"))?;
    let child = server_command("haproxy")
        .args(["-db", "-f"])
        .arg(&conf)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting haproxy (apt-get install -y haproxy)")?;
    let mut p = Proc { child, addr: ([127, 0, 0, 1], port).into(), admin: None };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(p.addr).is_err() {
        if let Some(st) = p.child.try_wait()? {
            let log = std::fs::read_to_string(sub.join("haproxy.log")).unwrap_or_default();
            bail!("haproxy exited ({st}) before listening:\n{log}");
        }
        if Instant::now() > deadline {
            bail!("haproxy did not listen within 60 s; see {}", sub.join("haproxy.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
        .with_context(|| format!("{field} not in /proc/{pid}/status"))
}

pub fn rss_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmRSS:")? as f64 / 1024.0)
}

pub fn hwm_mib(pid: u32) -> Result<f64> {
    Ok(status_kib(pid, "VmHWM:")? as f64 / 1024.0)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/PID/clear_refs`).
pub fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// utime + stime of a process in seconds (clock ticks of 1/100 s, the Linux USER_HZ).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let (user, sys) = cpu_split(pid)?;
    Ok(user + sys)
}

/// A process's CPU seconds so far, (user, kernel): `utime` and `stime` of `/proc/PID/stat` (clock ticks of 1/100 s).
pub fn cpu_split(pid: u32) -> Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (u, st): (u64, u64) = (f[11].parse()?, f[12].parse()?);
    Ok((u as f64 / 100.0, st as f64 / 100.0))
}

/// A binary next to the running driver: this crate's helpers (`bench-upstream`, `bench-openloop`, `bench-render`)
/// and, for `--smoke`, `portcullis-proxy`. The real runs are release builds (a debug generator would be the
/// bottleneck); the smoke run is a debug build (no figures).
pub fn helper_exe(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?.with_file_name(name);
    if !exe.exists() {
        bail!("{} not found: run the benchmarks with `cargo xtask bench`, which builds it", exe.display());
    }
    Ok(exe)
}
