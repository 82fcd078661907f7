//! Finds (building once if needed) the control-plane binaries from the pinned Go modules in `tools/k8s-bins`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (this crate lives in `tests/testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root exists")
}

/// Directory holding `etcd`, `kube-apiserver`, `kube-controller-manager` and `helm`.
///
/// `PORTCULLIS_K8S_BIN` overrides; otherwise `tools/k8s-bins/build.sh` is run, which returns at once when the
/// binaries are already cached (`~/.cache/portcullis/bin/<key>`) and builds them otherwise.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PORTCULLIS_K8S_BIN") {
        let dir = PathBuf::from(dir);
        check(&dir)?;
        return Ok(dir);
    }
    let script = repo_root().join("tools/k8s-bins/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed (its message is above); the control plane cannot start", script.display());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    check(&dir)?;
    Ok(dir)
}

fn check(dir: &Path) -> Result<()> {
    for b in ["etcd", "kube-apiserver", "kube-controller-manager", "helm"] {
        if !dir.join(b).is_file() {
            bail!("{} is missing from {}; run tools/k8s-bins/build.sh", b, dir.display());
        }
    }
    Ok(())
}
