//! `cargo xtask up` / `cargo xtask down`: a local playground left running — the control plane, the chart installed,
//! the controller, the demo's echo app behind its sidecar proxy, the demo's ApiClients — with a kubeconfig and a
//! kubectl built from the same pinned Kubernetes modules, so every README command can be tried by hand.
//!
//! `up` starts `portcullis-demo --up target/playground` in its own session (process group) and waits for it to
//! write `target/playground/ready`; `down` sends it SIGTERM (it stops everything it started and removes the
//! control plane's data), waits for the whole process group to be gone, and removes `target/playground`.

use crate::{build_debug, command, k8s_bins};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn state_dir(root: &Path) -> PathBuf {
    root.join("target/playground")
}

/// The pid of a running playground, if any.
fn running(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("pid")).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

pub fn up(root: &Path) -> Result<()> {
    let dir = state_dir(root);
    if let Some(pid) = running(&dir) {
        bail!("a playground is already running (pid {pid}); `cargo xtask down` stops it");
    }
    let bins = k8s_bins(root)?;
    let kubectl = kubectl(root)?;
    build_debug(root)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("up.log"))?;
    let child = Command::new("setsid")
        .arg(root.join("target/debug/portcullis-demo"))
        .arg("--up")
        .arg(&dir)
        .current_dir(root)
        .env("PORTCULLIS_K8S_BIN", &bins)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting portcullis-demo --up")?;
    let pid = child.id();
    std::fs::write(dir.join("pid"), pid.to_string())?;
    eprintln!("xtask: starting the playground (pid {pid}, log {})", dir.join("up.log").display());
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut child = child;
    while !dir.join("ready").exists() {
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("up.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("the playground exited while starting ({st}):\n{}", tail.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("the playground was not ready within 300 s; see {}", dir.join("up.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let env_file = dir.join("playground.env");
    let mut env = std::fs::read_to_string(&env_file)?;
    // `kubectl portcullis`: kubectl runs `kubectl-portcullis` from PATH (the workspace's debug build, linked here).
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(root.join("target/debug/kubectl-portcullis"), bin.join("kubectl-portcullis"))?;
    env.push_str(&format!("export PATH={}:{}:$PATH\n", kubectl.display(), bin.display()));
    std::fs::write(&env_file, &env)?;
    println!("{env}");
    println!("The playground is up. In a shell:\n");
    println!("  source {}", env_file.display());
    println!("  kubectl get usageplans,apiclients -n demo");
    println!("  kubectl portcullis status -n demo");
    println!("  kubectl portcullis check acme --from 127.0.0.2 GET /v1/orders -n demo");
    println!("  curl -s -H \"x-api-key: $ACME_KEY\" $PORTCULLIS_PROXY/v1/orders");
    println!("  curl -s $PORTCULLIS_PROXY_ADMIN/metrics | grep portcullis_proxy_client_requests_total");
    println!("\nStop it with `cargo xtask down`.");
    Ok(())
}

pub fn down(root: &Path) -> Result<()> {
    let dir = state_dir(root);
    let Some(pid) = running(&dir) else {
        let _ = std::fs::remove_dir_all(&dir);
        println!("no playground running");
        return Ok(());
    };
    eprintln!("xtask: stopping the playground (pid {pid})");
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let group_left = |pgid: u32| -> Vec<u32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                // /proc/PID/stat: `pid (comm) state ppid pgrp …`; comm may hold spaces, so split after the last ')'.
                std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                }) == Some(pgid)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = group_left(pid);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-KILL", &format!("-{pid}")]).status();
            bail!("processes {left:?} of the playground did not stop within 60 s; killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("the playground is stopped: no process of its group is left, {} removed", dir.display());
    Ok(())
}

/// kubectl from the control plane's pinned modules (`tools/k8s-bins/kubectl.sh`, cached).
fn kubectl(root: &Path) -> Result<PathBuf> {
    let out = command("bash")
        .current_dir(root)
        .arg("tools/k8s-bins/kubectl.sh")
        .stderr(Stdio::inherit())
        .output()
        .context("running tools/k8s-bins/kubectl.sh")?;
    if !out.status.success() {
        bail!("building kubectl failed ({})", out.status);
    }
    let dir = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    Ok(PathBuf::from(dir))
}
