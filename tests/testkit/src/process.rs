//! Child processes of the control plane: spawned with logs to files, stopped on drop, and reaped by a watchdog
//! if the test process dies without running destructors (statics are never dropped; panics may abort).

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, bin: &Path, args: &[String], log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { name, child, log })
    }

    /// Fails with the tail of the log when the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 25)
            );
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free loopback port (bound, then released: the child binds it a moment later).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Starts a detached shell that waits for this process to end, then kills `pids` and removes `dir`.
pub fn spawn_watchdog(pids: &[u32], dir: &Path, keep_dir: bool) -> Result<()> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let rm = if keep_dir { String::new() } else { format!("rm -rf '{}'", dir.display()) };
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; kill {p} 2>/dev/null; sleep 1; kill -9 {p} 2>/dev/null; {rm}",
        parent = std::process::id(),
        p = pids.join(" "),
    );
    Command::new("setsid")
        .args(["bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the cleanup watchdog (setsid bash)")?;
    Ok(())
}
