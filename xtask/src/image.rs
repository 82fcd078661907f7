//! `cargo xtask image [--check]`: the two container images, built without a Docker engine.
//!
//! 1. Static binaries for the host's architecture: `cargo build --release --target <arch>-unknown-linux-gnu` with
//!    `-C target-feature=+crt-static` (glibc, linked statically: no musl toolchain needed), in
//!    `target/<triple>/release/` (its own directory: the debug build is untouched).
//! 2. A build context `target/image/context/` holding the binaries and `images/Containerfile` (`FROM scratch`, one
//!    binary, `USER 65532:65532`), built by `podman build --timestamp <commit time>` into the images the chart
//!    names by default (`ghcr.io/portcullis/portcullis-{controller,proxy}:<appVersion>`), and saved as
//!    `target/image/portcullis-{controller,proxy}-<arch>.tar` (docker-archive: `kind load image-archive`,
//!    `minikube image load`).
//! 3. `--check` runs each image's entry point as the image would (its `Entrypoint` and `User`), without a container
//!    runtime: `podman create` + `podman export` unpack the root filesystem, `chroot --userspec` runs it. Each binary
//!    prints its `--version`; the proxy serves `examples/tables.json` on loopback and answers a request without a
//!    key with 401, and its admin `/healthz` with 200.
//!
//! podman runs with `--storage-driver vfs` (no overlay mounts needed, so it works in containers and CI runners).

use crate::{command, run};
use anyhow::{Context, Result, bail, ensure};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARIES: [(&str, &str); 2] = [("controller", "portcullis-controller"), ("proxy", "portcullis-proxy")];
const REGISTRY: &str = "ghcr.io/portcullis";

pub fn image(root: &Path, args: &[String]) -> Result<()> {
    let check = args.iter().any(|a| a == "--check");
    if let Some(bad) = args.iter().find(|a| *a != "--check") {
        bail!("cargo xtask image: unknown argument {bad:?} (usage: cargo xtask image [--check])");
    }
    let t = Instant::now();
    let version = app_version(root)?;
    let (triple, platform) = host_target()?;
    // `PORTCULLIS_IMAGE_TARGET_DIR`: where the static release build goes (CI keeps it in its cache, outside the
    // clone, so a run from a fresh clone rebuilds only what changed); default `target/`.
    let target_dir = std::env::var_os("PORTCULLIS_IMAGE_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    build_static(root, &triple, &target_dir)?;
    let out = root.join("target/image");
    let context = out.join("context");
    std::fs::create_dir_all(&context)?;
    for (_, bin) in BINARIES {
        let from = target_dir.join(&triple).join("release").join(bin);
        std::fs::copy(&from, context.join(bin)).with_context(|| format!("copying {}", from.display()))?;
    }
    std::fs::copy(root.join("images/Containerfile"), context.join("Containerfile"))?;
    let epoch = source_date_epoch(root)?;
    for (target, bin) in BINARIES {
        let tag = format!("{REGISTRY}/{bin}:{version}");
        run(
            podman()
                .args(["build", "--quiet", "--timestamp", &epoch, "--platform", &platform, "--target", target])
                .args(["-t", &tag, "-f"])
                .arg(context.join("Containerfile"))
                .arg(&context)
                .stdout(Stdio::null()),
            &format!("podman build {tag}"),
        )?;
        let archive = out.join(format!("{bin}-{}.tar", platform.trim_start_matches("linux/")));
        let _ = std::fs::remove_file(&archive);
        run(podman().args(["save", "--quiet", "-o"]).arg(&archive).arg(&tag), &format!("podman save {tag}"))?;
        let id = capture(podman().args(["image", "inspect", "--format", "{{.Id}}", &tag]))?;
        let size = std::fs::metadata(&archive)?.len();
        eprintln!("xtask: image {tag} ({platform}) id sha256:{id}, {:.1} MiB: {}", mib(size), archive.display());
        if check {
            check_image(root, &out, bin, &tag, &version)?;
        }
    }
    eprintln!("xtask: images built{} in {:.1}s", if check { " and checked" } else { "" }, t.elapsed().as_secs_f64());
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Whether `cargo xtask test` can run the image check here: podman on PATH.
pub fn podman_available() -> bool {
    Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--storage-driver", "vfs"]);
    cmd
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("could not start {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The chart's `appVersion`: the tag its default image references use, so the images built here are the ones a
/// default `helm install` pulls (or finds loaded into kind/minikube).
fn app_version(root: &Path) -> Result<String> {
    let chart = std::fs::read_to_string(root.join("charts/portcullis/Chart.yaml"))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("charts/portcullis/Chart.yaml has no appVersion")
}

fn host_target() -> Result<(String, String)> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(("x86_64-unknown-linux-gnu".into(), "linux/amd64".into())),
        "aarch64" => Ok(("aarch64-unknown-linux-gnu".into(), "linux/arm64".into())),
        other => bail!("no image build for architecture {other} (x86_64 and aarch64 are supported)"),
    }
}

/// Layer and config timestamps: `SOURCE_DATE_EPOCH` if set, else the time of the checked-out commit.
fn source_date_epoch(root: &Path) -> Result<String> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return Ok(v);
    }
    capture(Command::new("git").current_dir(root).args(["log", "-1", "--format=%ct"]))
}

fn build_static(root: &Path, triple: &str, target_dir: &Path) -> Result<()> {
    let var = format!("CARGO_TARGET_{}_RUSTFLAGS", triple.to_uppercase().replace('-', "_"));
    run(
        command("cargo")
            .current_dir(root)
            .env(var, "-C target-feature=+crt-static")
            .arg("--config")
            .arg(format!("build.target-dir={:?}", target_dir.display().to_string()))
            .args(["build", "--quiet", "--release", "--locked", "--target", triple])
            .args(["-p", "portcullis-controller", "-p", "portcullis-proxy"])
            .args(["--bin", "portcullis-controller", "--bin", "portcullis-proxy"]),
        &format!("cargo build --release --target {triple} (static)"),
    )
}

/// Unpacks the image's root filesystem and runs its entry point there as its user.
fn check_image(root: &Path, out: &Path, bin: &str, tag: &str, version: &str) -> Result<()> {
    let t = Instant::now();
    let config =
        capture(podman().args(["image", "inspect", "--format", "{{.Config.User}}|{{json .Config.Entrypoint}}", tag]))?;
    let (user, entrypoint) = config.split_once('|').context("image inspect output")?;
    let entrypoint = entrypoint.trim_matches(|c| c == '[' || c == ']').trim_matches('"').to_string();
    ensure!(entrypoint == format!("/{bin}"), "{tag}: entry point {entrypoint:?}, expected /{bin}");
    ensure!(user == "65532:65532", "{tag}: runs as {user:?}, expected 65532:65532");

    let rootfs = out.join(format!("rootfs-{bin}"));
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs)?;
    let ctr = capture(podman().args(["create", tag]))?;
    let export = podman().args(["export", &ctr]).stdout(Stdio::piped()).spawn()?;
    let untar =
        Command::new("tar").arg("-x").arg("-C").arg(&rootfs).stdin(export.stdout.context("export stdout")?).status()?;
    run(podman().args(["rm", &ctr]).stdout(Stdio::null()), "podman rm")?;
    ensure!(untar.success(), "unpacking {tag} failed");
    let files: Vec<_> = std::fs::read_dir(&rootfs)?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    eprintln!("xtask: {tag}: root filesystem {files:?}");

    let chroot = || {
        let mut cmd = Command::new("chroot");
        // A clean environment (no PORTCULLIS_* from the caller); PATH only to find chroot itself.
        cmd.arg(format!("--userspec={user}")).arg(&rootfs).arg(&entrypoint).env_clear();
        cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd
    };
    let printed = capture(chroot().arg("--version"))?;
    ensure!(printed == format!("{bin} {version}"), "{tag} --version printed {printed:?}");
    eprintln!("xtask: {tag}: `{entrypoint} --version` as {user} without a runtime: {printed}");

    if bin == "portcullis-proxy" {
        std::fs::copy(root.join("examples/tables.json"), rootfs.join("tables.json"))?;
        let (listen, admin, upstream) = (free_port()?, free_port()?, free_port()?);
        let mut proxy = Kill(
            chroot()
                .args(["--tables", "/tables.json", "--listen", &listen.to_string(), "--admin-listen"])
                .arg(admin.to_string())
                .args(["--upstream", &upstream.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .context("starting the proxy in the unpacked image")?,
        );
        let health = get_when_up(admin, "/healthz", &mut proxy.0)?;
        ensure!(health.starts_with("HTTP/1.1 200"), "admin /healthz: {health:?}");
        let refused = get_when_up(listen, "/v1/orders", &mut proxy.0)?;
        ensure!(refused.starts_with("HTTP/1.1 401"), "a request without a key must get 401: {refused:?}");
        eprintln!(
            "xtask: {tag}: serving examples/tables.json on {listen}: /healthz 200, a request without a key {}",
            refused.lines().next().unwrap_or_default()
        );
    }
    std::fs::remove_dir_all(&rootfs)?;
    eprintln!("xtask: {tag} checked in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `GET path` on loopback once the port accepts connections (the process is checked for an early exit each try).
fn get_when_up(addr: SocketAddr, path: &str, child: &mut Child) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the proxy exited ({status}) before answering on {addr}");
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
                let mut response = String::new();
                s.read_to_string(&mut response)?;
                return Ok(response);
            }
            Err(e) if Instant::now() > deadline => return Err(e).context(format!("connecting to {addr} for 30s")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
