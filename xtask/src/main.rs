//! Developer tasks: `cargo xtask <task>`.
//!
//! - `test`   — builds (or reuses) the local control plane, then runs every test of the workspace.
//! - `k8s-bins` — only builds (or finds) the control-plane binaries and prints their directory.
//! - `demo`   — builds the workspace's debug binaries and runs `portcullis-demo` (tests/testkit): the product end
//!   to end on this machine (control plane, chart, controller, proxy, requests).
//! - `bench`  — builds the `portcullis-bench` crate (release) and runs its driver with the arguments given.
//! - `crdgen` — regenerates `crds/` and the chart's copy from the Rust types, in one step.
//! - `image [--check]` — builds both container images with podman, no Docker engine (`image.rs`); `--check` runs
//!   each image's entry point. `test` runs the check too when podman is installed.

mod image;
mod lanes;
mod playground;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = repo_root();
    match args.first().map(String::as_str) {
        Some("test") => test(&root, &args[1..]),
        Some("k8s-bins") => {
            println!("{}", k8s_bins(&root)?.display());
            Ok(())
        }
        Some("crdgen") => crdgen(&root),
        Some("bench") => bench(&root, &args[1..]),
        Some("demo") => demo(&root),
        Some("image") => image::image(&root, &args[1..]),
        Some("up") => playground::up(&root),
        Some("down") => playground::down(&root),
        _ => {
            eprintln!(
                "usage: cargo xtask <test [cargo test args]|demo|bench <suite> [--smoke]|k8s-bins|crdgen|image [--check]|up|down>"
            );
            std::process::exit(2);
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the repo").to_path_buf()
}

/// A command without what `cargo run` set for this process about the xtask package (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`, …): build scripts track some of it (ring: `CARGO_MANIFEST_DIR`), so a `cargo` run from here
/// with it would see ring changed against a build made from a shell (or from a test, which strips the same) and
/// recompile ring and everything above it (rustls, kube, the controller, the proxy), every time the two alternate.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let cargos =
            ["CARGO_MANIFEST", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"];
        if cargos.iter().any(|p| k.starts_with(p)) || k == "OUT_DIR" {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let t = Instant::now();
    let status = cmd.status().with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    eprintln!("xtask: {what} took {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Builds or finds the control-plane binaries (cached outside the clone) and returns their directory.
fn k8s_bins(root: &Path) -> Result<PathBuf> {
    let t = Instant::now();
    let out = command("bash")
        .arg(root.join("tools/k8s-bins/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running tools/k8s-bins/build.sh")?;
    if !out.status.success() {
        bail!("building the local control plane failed (see the message above)");
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim());
    eprintln!("xtask: control-plane binaries ready in {} ({:.1}s)", dir.display(), t.elapsed().as_secs_f64());
    Ok(dir)
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    let bins = k8s_bins(root)?;
    ensure_redis_server()?;
    if extra.is_empty() {
        // Every test binary, as `cargo test --workspace` runs them, in two lanes at once (lanes.rs).
        lanes::run_all(root, &bins)?;
    } else {
        run(
            command("cargo")
                .current_dir(root)
                .env("PORTCULLIS_K8S_BIN", &bins)
                .args(["test", "--workspace", "--locked"])
                .args(extra),
            "cargo test --workspace",
        )?;
    }
    // The image test: both images built and their entry points run (`cargo xtask image --check`), where podman is
    // installed (`.ci/run` installs it). Only for a full run: not when cargo test arguments select tests.
    if !extra.is_empty() {
        return Ok(());
    }
    if std::env::var_os("PORTCULLIS_SKIP_IMAGE_TEST").is_some() {
        eprintln!("xtask: image test skipped (PORTCULLIS_SKIP_IMAGE_TEST is set)");
        return Ok(());
    }
    if !image::podman_available() {
        eprintln!(
            "xtask: image test SKIPPED: podman not found (Debian: apt-get install podman); see README, section Images"
        );
        return Ok(());
    }
    image::image(root, &["--check".to_string()])
}

/// The tests of global limits run a real `redis-server` (tests/testkit/src/redis.rs). On a machine without one,
/// installs Debian's package when it can (root with apt-get), else says what to install.
fn ensure_redis_server() -> Result<()> {
    let on_path = |name: &str| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(name).is_file())
    };
    if std::env::var_os("PORTCULLIS_REDIS_SERVER").is_some() || on_path("redis-server") {
        return Ok(());
    }
    let root_user = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !(root_user && on_path("apt-get")) {
        bail!(
            "redis-server not found: install it (Debian: `apt-get install redis-server`) or set PORTCULLIS_REDIS_SERVER"
        );
    }
    eprintln!("xtask: installing redis-server (apt-get) for the global-limits tests");
    run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
    run(
        Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-qq", "redis-server"]),
        "apt-get install redis-server",
    )
}

/// `cargo xtask demo`: the demo runs the binaries of the workspace's debug build, next to its own.
fn demo(root: &Path) -> Result<()> {
    let bins = k8s_bins(root)?;
    build_debug(root)?;
    let demo = root.join("target/debug/portcullis-demo");
    run(command(demo).current_dir(root).env("PORTCULLIS_K8S_BIN", bins), "portcullis-demo")
}

/// `cargo xtask bench …`: the benchmarks live in `bench/` (`portcullis-bench`); this only builds and runs them.
/// Real runs use the release build; `--smoke` (no figures) the debug build of [`build_debug`].
fn bench(root: &Path, args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--smoke") {
        build_debug(root)?;
        let driver = root.join("target/debug/portcullis-bench");
        return run(command(driver).current_dir(root).args(args), "portcullis-bench (debug, smoke)");
    }
    // The very build the driver asks for before it measures (`servers::build_proxy`: the proxy and the bench crate
    // together, `png` for the plots' PNG copies), so nothing compiles twice with other features between the two.
    let build = ["build", "--release", "--quiet", "--locked", "-p", "portcullis-proxy", "-p", "portcullis-bench"];
    let features = ["--features", "portcullis-bench/png"];
    run(command("cargo").current_dir(root).args(build).args(features), "cargo build --release (bench)")?;
    run(command(root.join("target/release/portcullis-bench")).current_dir(root).args(args), "portcullis-bench")
}

/// The workspace's debug binaries, built with the feature set of `cargo xtask test` (every package, test targets
/// included, so dev-dependency features unify the same way): after the tests nothing recompiles, and the demo and
/// the benchmark smoke run reuse the test run's build.
fn build_debug(root: &Path) -> Result<()> {
    let args = ["build", "--quiet", "--locked", "--workspace", "--bins", "--tests"];
    run(command("cargo").current_dir(root).args(args), "cargo build --workspace --bins --tests")
}

/// Regenerates every checked-in copy of the CRDs (`crds/` and `charts/portcullis/files/crds/`) from the Rust types.
fn crdgen(root: &Path) -> Result<()> {
    run(
        command("cargo").current_dir(root).args([
            "run",
            "--quiet",
            "-p",
            "portcullis-controller",
            "--bin",
            "crdgen",
            "--",
            "--write",
        ]),
        "crdgen",
    )
}
