//! `cargo xtask test` without arguments: every test of the workspace, as `cargo test --workspace` runs them, but in
//! two lanes at once. `cargo test` runs its test binaries one after another; here the controller's integration
//! binary (the longest: it mostly waits on its control plane) runs in one lane while every other binary, then the
//! doc-tests, run in the other.
//!
//! The binaries come from cargo itself (`cargo test --no-run --message-format=json`: every test executable of the
//! build `cargo test --workspace` makes) and are run as cargo runs them: working directory the package's root,
//! `CARGO`, `CARGO_MANIFEST_DIR` and `CARGO_PKG_NAME` set. The long lane's output streams; the other lane prints each
//! binary's output whole when it ends, so the two never interleave within a binary. Every binary runs even when one
//! fails (cargo's `--no-fail-fast`); the failures are listed at the end.

use super::command;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// One test executable of the workspace's test build.
#[derive(Debug, Clone)]
struct TestBinary {
    package: String,
    /// `lib`, `bin`, `test`, …
    kind: String,
    target: String,
    executable: PathBuf,
    manifest_dir: PathBuf,
}

impl TestBinary {
    fn label(&self) -> String {
        format!("{} ({} {})", self.package, self.kind, self.target)
    }

    /// The controller's integration binary: the long lane.
    fn is_long(&self) -> bool {
        self.package == "portcullis-controller" && self.kind == "test" && self.target == "integration"
    }
}

/// What one binary did.
struct Ran {
    label: String,
    secs: f64,
    ok: bool,
}

pub fn run_all(root: &Path, k8s_bins: &Path) -> Result<()> {
    let t = Instant::now();
    let binaries = list(root)?;
    eprintln!("xtask: {} test binaries built and listed in {:.1}s", binaries.len(), t.elapsed().as_secs_f64());
    let (long, rest): (Vec<_>, Vec<_>) = binaries.into_iter().partition(TestBinary::is_long);
    let t = Instant::now();
    let (long_ran, rest_ran) = std::thread::scope(|s| {
        let long_lane = s.spawn(|| long.iter().map(|b| run_binary(b, k8s_bins, true)).collect::<Result<Vec<_>>>());
        let rest_lane = s.spawn(|| -> Result<Vec<Ran>> {
            let mut ran = rest.iter().map(|b| run_binary(b, k8s_bins, false)).collect::<Result<Vec<_>>>()?;
            ran.push(doc_tests(root, k8s_bins)?);
            Ok(ran)
        });
        (long_lane.join(), rest_lane.join())
    });
    let mut all = Vec::new();
    for lane in [long_ran, rest_ran] {
        all.extend(lane.map_err(|_| anyhow::anyhow!("a test lane panicked"))??);
    }
    eprintln!("xtask: test binaries, two lanes, {:.1}s:", t.elapsed().as_secs_f64());
    for r in &all {
        eprintln!("  {:>7.1}s  {}  {}", r.secs, if r.ok { "ok    " } else { "FAILED" }, r.label);
    }
    let failed: Vec<&str> = all.iter().filter(|r| !r.ok).map(|r| r.label.as_str()).collect();
    if !failed.is_empty() {
        bail!("tests failed in: {}", failed.join(", "));
    }
    Ok(())
}

/// Builds the test binaries (a no-op after `cargo test --workspace --all-targets --no-run`) and lists them.
fn list(root: &Path) -> Result<Vec<TestBinary>> {
    let out = command("cargo")
        .current_dir(root)
        .args(["test", "--workspace", "--locked", "--no-run", "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --workspace --no-run failed ({})", out.status);
    }
    let binaries = parse_artifacts(&String::from_utf8_lossy(&out.stdout))?;
    if binaries.is_empty() {
        bail!("cargo test --no-run listed no test executable");
    }
    Ok(binaries)
}

/// The test executables among cargo's JSON messages, in cargo's order.
fn parse_artifacts(messages: &str) -> Result<Vec<TestBinary>> {
    let mut out = Vec::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("cargo message: {line}"))?;
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let Some(executable) = v["executable"].as_str() else { continue };
        let manifest = v["manifest_path"].as_str().context("artifact without manifest_path")?;
        let manifest_dir = Path::new(manifest).parent().context("manifest_path without a directory")?.to_path_buf();
        let package = manifest_dir_package(&v, &manifest_dir);
        out.push(TestBinary {
            package,
            kind: v["target"]["kind"][0].as_str().unwrap_or("?").to_string(),
            target: v["target"]["name"].as_str().unwrap_or("?").to_string(),
            executable: PathBuf::from(executable),
            manifest_dir,
        });
    }
    Ok(out)
}

/// The package's name: `package_id` is `path+file:///…/dir#name@version` (or `…#version` when the name is the
/// directory's).
fn manifest_dir_package(v: &Value, manifest_dir: &Path) -> String {
    let id = v["package_id"].as_str().unwrap_or_default();
    let fragment = id.rsplit_once('#').map_or("", |(_, f)| f);
    match fragment.split_once('@') {
        Some((name, _)) => name.to_string(),
        None => manifest_dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    }
}

fn run_binary(b: &TestBinary, k8s_bins: &Path, stream: bool) -> Result<Ran> {
    let mut cmd = command(&b.executable);
    cmd.current_dir(&b.manifest_dir)
        .env("CARGO", std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .env("CARGO_MANIFEST_DIR", &b.manifest_dir)
        .env("CARGO_PKG_NAME", &b.package)
        .env("PORTCULLIS_K8S_BIN", k8s_bins);
    run_captured(cmd, b.label(), stream)
}

/// `cargo test --workspace --doc`: the doc-tests (compiled here; the libraries they use are already built).
fn doc_tests(root: &Path, k8s_bins: &Path) -> Result<Ran> {
    let mut cmd = command("cargo");
    cmd.current_dir(root).args(["test", "--workspace", "--locked", "--doc"]).env("PORTCULLIS_K8S_BIN", k8s_bins);
    run_captured(cmd, "doc-tests (cargo test --workspace --doc)".to_string(), false)
}

fn run_captured(mut cmd: Command, label: String, stream: bool) -> Result<Ran> {
    let t = Instant::now();
    let ok = if stream {
        eprintln!("xtask: running {label} (streamed)");
        cmd.status().with_context(|| format!("starting {label}"))?.success()
    } else {
        let out = cmd.output().with_context(|| format!("starting {label}"))?;
        // One write per stream, so the other lane's lines do not land inside this binary's report.
        let mut text = format!("\n==== {label} ====\n").into_bytes();
        text.extend_from_slice(&out.stdout);
        text.extend_from_slice(&out.stderr);
        std::io::stdout().lock().write_all(&text)?;
        out.status.success()
    };
    let secs = t.elapsed().as_secs_f64();
    eprintln!("xtask: {label}: {} in {secs:.1}s", if ok { "ok" } else { "FAILED" });
    Ok(Ran { label, secs, ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_are_picked_from_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/controller#portcullis-controller@0.1.0","manifest_path":"/w/controller/Cargo.toml","target":{"kind":["test"],"name":"integration"},"profile":{"test":true},"executable":"/w/target/debug/deps/integration-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/table#portcullis-table@0.1.0","manifest_path":"/w/table/Cargo.toml","target":{"kind":["lib"],"name":"portcullis_table"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-2"}
{"reason":"build-finished","success":true}"#;
        let b = parse_artifacts(messages).unwrap();
        assert_eq!(b.len(), 2);
        assert!(b[0].is_long());
        assert_eq!(b[0].manifest_dir, Path::new("/w/controller"));
        assert_eq!((b[1].package.as_str(), b[1].kind.as_str()), ("xtask", "bin"));
        assert!(!b[1].is_long());
    }
}
