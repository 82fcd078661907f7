//! A real `redis-server` (Debian's package) on 127.0.0.1 for tests: no persistence, a free port, logs in a temp
//! dir, killed on drop (and by a watchdog if the test process dies). `stop()` then `start()` brings it back on the
//! same port, empty, as after a crash of a store without persistence.
//!
//! ```no_run
//! let redis = portcullis_testkit::redis::RedisServer::start();
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! ```
//!
//! Also [`RedisSentinel`] (a master, a replica and a Sentinel: `redis+sentinel://` URLs, a forced failover) and
//! [`RedisCluster`] (three masters with every slot assigned: `redis+cluster://` URLs), from the same package.

use crate::process::{Proc, free_port, spawn_watchdog, tail};
use anyhow::{Context, Result, bail};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The binary: `PORTCULLIS_REDIS_SERVER` if set, else `redis-server` on `PATH`.
pub fn redis_server_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PORTCULLIS_REDIS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file()).context(
        "redis-server not found on PATH: install it (`apt-get install redis-server`; .ci/run and `cargo xtask test` \
         do this) or set PORTCULLIS_REDIS_SERVER",
    )
}

/// `redis-cli`: next to `redis-server`, else on `PATH`.
pub fn redis_cli_bin() -> Result<PathBuf> {
    let beside = redis_server_bin()?.with_file_name("redis-cli");
    if beside.is_file() {
        return Ok(beside);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("redis-cli"))
        .find(|p| p.is_file())
        .context("redis-cli not found (Debian's redis-tools, a dependency of redis-server)")
}

/// Runs `redis-cli -p port args…` on 127.0.0.1 and returns its output (an error when it fails or answers `ERR`).
pub fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(redis_cli_bin()?)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || text.starts_with("ERR") || text.starts_with("NOGOODSLAVE") {
        bail!("redis-cli -p {port} {}: {text}", args.join(" "));
    }
    Ok(text)
}

/// Polls `f` every 50 ms until it is `Some` or `within` passes.
fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    acl: Option<(String, String)>,
    extra: Vec<String>,
    proc: Option<Proc>,
    starts: u32,
}

impl RedisServer {
    /// Starts a server with no authentication. Panics (the test fails) with the reason when it cannot.
    pub fn start() -> Self {
        Self::try_start(None).unwrap_or_else(|e| panic!("starting redis-server: {e:#}"))
    }

    /// Starts a server whose only usable account is `user`/`password` (the `default` user is disabled).
    pub fn start_with_acl(user: &str, password: &str) -> Self {
        Self::try_start(Some((user.to_string(), password.to_string())))
            .unwrap_or_else(|e| panic!("starting redis-server: {e:#}"))
    }

    pub fn try_start(acl: Option<(String, String)>) -> Result<Self> {
        Self::try_start_with(acl, Vec::new())
    }

    /// A server with `extra` arguments after the defaults (a later option wins).
    pub fn try_start_with(acl: Option<(String, String)>, extra: Vec<String>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("portcullis-redis-").tempdir()?;
        let mut s = Self { port: free_port()?, dir, acl, extra, proc: None, starts: 0 };
        s.spawn()?;
        Ok(s)
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://127.0.0.1:PORT` (no credentials: they go in `PORTCULLIS_STORE_USERNAME` / `_PASSWORD`).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Kills the server (SIGKILL: the store vanishes as in a crash). Its port stays reserved for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Starts the server again on the same port (empty: no persistence). Panics when it cannot.
    pub fn restart(&mut self) {
        if self.proc.is_none() {
            self.spawn().unwrap_or_else(|e| panic!("restarting redis-server: {e:#}"));
        }
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| tail(&p.log, 40)).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = redis_server_bin()?;
        self.starts += 1;
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.path().display().to_string(),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some((user, password)) = &self.acl {
            let acl = self.dir.path().join("users.acl");
            std::fs::write(&acl, format!("user default off\nuser {user} on >{password} ~* &* +@all\n"))?;
            args.extend(["--aclfile".to_string(), acl.display().to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        let log_dir = self.dir.path().join(format!("run-{}", self.starts));
        std::fs::create_dir_all(&log_dir)?;
        let mut proc = Proc::spawn("redis-server", &bin, &args, &log_dir)?;
        spawn_watchdog(&[proc.child.id()], &log_dir, true)?;
        wait_listening(&mut proc, self.port, &log_dir)?;
        self.proc = Some(proc);
        Ok(())
    }
}

/// A master, one replica of it and one Sentinel monitoring them as [`RedisSentinel::MASTER`] (quorum 1), on
/// loopback. The Sentinel runs `redis-server sentinel.conf --sentinel`.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    port: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl RedisSentinel {
    /// The master's name in the Sentinel.
    pub const MASTER: &'static str = "portcullis";

    /// Starts the three and waits until the Sentinel knows the replica (so a failover can promote it). Panics
    /// with the reason when it cannot.
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("starting a Redis Sentinel setup: {e:#}"))
    }

    pub fn try_start() -> Result<Self> {
        let master = RedisServer::try_start(None)?;
        let replica = RedisServer::try_start_with(
            None,
            vec!["--replicaof".into(), "127.0.0.1".into(), master.port().to_string()],
        )?;
        let dir = tempfile::Builder::new().prefix("portcullis-sentinel-").tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {m} 127.0.0.1 {mp} 1\n\
                 sentinel down-after-milliseconds {m} 1000\nsentinel failover-timeout {m} 5000\n",
                dir.path().display(),
                m = Self::MASTER,
                mp = master.port()
            ),
        )?;
        let args = vec![conf.display().to_string(), "--sentinel".to_string()];
        let mut proc = Proc::spawn("redis-sentinel", &redis_server_bin()?, &args, dir.path())?;
        spawn_watchdog(&[proc.child.id()], dir.path(), true)?;
        wait_listening(&mut proc, port, dir.path())?;
        let s = Self { master, replica, port, dir, proc: Some(proc) };
        let m = Self::MASTER;
        wait_for("the Sentinel to see the replica", Duration::from_secs(30), || {
            let out = cli(port, &["SENTINEL", "REPLICAS", m]).ok()?;
            out.contains(&s.replica.port().to_string()).then_some(())
        })?;
        Ok(s)
    }

    /// `redis+sentinel://127.0.0.1:PORT/portcullis`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/{}", self.port, Self::MASTER)
    }

    /// The port of the master the Sentinel names now.
    pub fn master_port(&self) -> Result<u16> {
        let out = cli(self.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER])?;
        out.lines().nth(1).and_then(|p| p.trim().parse().ok()).context(format!("no master port in {out:?}"))
    }

    /// Forces a failover (`SENTINEL FAILOVER`) and waits until the replica is the master, answers writes, and the
    /// former master is its replica (it answers writes with `READONLY`). Returns the new master's port.
    pub fn failover(&self) -> Result<u16> {
        let (old, new) = (self.master.port(), self.replica.port());
        wait_for("SENTINEL FAILOVER to be accepted", Duration::from_secs(30), || {
            cli(self.port, &["SENTINEL", "FAILOVER", Self::MASTER]).ok().filter(|o| o.trim() == "OK")
        })?;
        wait_for("the replica to be promoted", Duration::from_secs(30), || {
            let named = self.master_port().ok()? == new;
            let role = cli(new, &["ROLE"]).ok()?;
            (named && role.starts_with("master")).then_some(())
        })?;
        wait_for("the former master to follow", Duration::from_secs(30), || {
            cli(old, &["ROLE"]).ok()?.starts_with("slave").then_some(())
        })?;
        Ok(new)
    }

    /// The Sentinel's log.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| tail(&p.log, 40)).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}

/// A Redis Cluster of three masters on loopback (no replicas), every slot assigned by
/// `redis-cli --cluster create`; each node's cluster bus on its own free port (`--cluster-port`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node reports `cluster_state:ok`. Panics with
    /// the reason when it cannot.
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("starting a Redis Cluster: {e:#}"))
    }

    pub fn try_start() -> Result<Self> {
        let nodes = (0..3)
            .map(|_| {
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &free_port()?.to_string(),
                ];
                RedisServer::try_start_with(None, extra.iter().map(|s| s.to_string()).collect())
            })
            .collect::<Result<Vec<_>>>()?;
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        cli(nodes[0].port(), &args)?;
        for n in &nodes {
            wait_for("cluster_state:ok", Duration::from_secs(30), || {
                cli(n.port(), &["CLUSTER", "INFO"]).ok()?.contains("cluster_state:ok").then_some(())
            })?;
        }
        Ok(Self { nodes })
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The port of the node serving `key`'s slot (`CLUSTER KEYSLOT`, then the slot ranges of `CLUSTER SLOTS`).
    pub fn node_of(&self, key: &str) -> Result<u16> {
        let port = self.nodes[0].port();
        let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])?.trim().parse()?;
        for n in &self.nodes {
            let myself = cli(n.port(), &["CLUSTER", "MYID"])?;
            let shards = cli(port, &["CLUSTER", "NODES"])?;
            for line in shards.lines().filter(|l| l.starts_with(myself.trim())) {
                for range in line.split_whitespace().skip(8) {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    if (a.parse::<u16>()?..=b.parse::<u16>()?).contains(&slot) {
                        return Ok(n.port());
                    }
                }
            }
        }
        bail!("no node serves slot {slot}")
    }
}

fn wait_listening(proc: &mut Proc, port: u16, dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        proc.check_alive()?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis-server did not listen on 127.0.0.1:{port} within 10 s; log in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
