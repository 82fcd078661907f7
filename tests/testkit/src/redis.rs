//! A real `redis-server` (Debian's package) on 127.0.0.1 for tests: no persistence, a free port, logs in a temp
//! dir, killed on drop (and by a watchdog if the test process dies). `stop()` then `start()` brings it back on the
//! same port, empty, as after a crash of a store without persistence.
//!
//! ```no_run
//! let redis = portcullis_testkit::redis::RedisServer::start();
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! ```

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

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    acl: Option<(String, String)>,
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
        let dir = tempfile::Builder::new().prefix("portcullis-redis-").tempdir()?;
        let mut s = Self { port: free_port()?, dir, acl, proc: None, starts: 0 };
        s.spawn()?;
        Ok(s)
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
        let log_dir = self.dir.path().join(format!("run-{}", self.starts));
        std::fs::create_dir_all(&log_dir)?;
        let mut proc = Proc::spawn("redis-server", &bin, &args, &log_dir)?;
        spawn_watchdog(&[proc.child.id()], &log_dir, true)?;
        wait_listening(&mut proc, self.port, &log_dir)?;
        self.proc = Some(proc);
        Ok(())
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
