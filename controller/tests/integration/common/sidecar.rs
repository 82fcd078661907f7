//! A real sidecar for lifecycle tests: the `portcullis-proxy` binary reading its table from the API server with its
//! own ServiceAccount token (bound only by the controller's RoleBinding), in front of a loopback echo upstream;
//! plus the testkit's TCP relay, which takes the API server away from one client and gives it back.

use super::{Env, T, root};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use portcullis_table::naming::index_name;
pub use portcullis_testkit::relay::Relay;
use portcullis_testkit::wait_for;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The `portcullis-proxy` binary of this workspace, built (or found up to date) once per test binary, with the build
/// `cargo xtask test` makes (`cargo build --workspace --bins --tests`, xtask's `build_debug`): after `cargo xtask
/// test` (any `cargo test --workspace`) nothing recompiles. A narrower `cargo build -p portcullis-proxy` resolves
/// other features (the proxy's kube without the controller's) and would rebuild kube and the proxy here, and again
/// for the demo.
pub fn proxy_binary() -> PathBuf {
    workspace_binary("portcullis-proxy")
}

/// The binary `name` of this workspace (`portcullis-proxy`, `kubectl-portcullis`), built as [`proxy_binary`] says.
pub fn workspace_binary(name: &str) -> PathBuf {
    static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();
    BIN_DIR.get_or_init(build_workspace_binaries).join(name)
}

fn build_workspace_binaries() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir");
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root())
        .args(["build", "--quiet", "--locked", "--workspace", "--bins", "--tests", "--target-dir"])
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    // What cargo sets for this test process describes this package; build scripts of the proxy's dependencies
    // track some of it (ring: CARGO_MANIFEST_DIR), so inheriting it would rebuild them, every time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let ours =
            ["CARGO_MANIFEST", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"];
        if ours.iter().any(|p| k.starts_with(p)) || k == "OUT_DIR" {
            cmd.env_remove(k);
        }
    }
    let status = cmd.status().expect("running cargo build --workspace --bins --tests");
    assert!(status.success(), "cargo build --workspace --bins --tests failed");
    profile_dir
}

pub const LO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
pub const LO2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// One answer of a sidecar: its status, its head (status line and headers) and its body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// `GET /v1/orders` with `x-api-key: key`, from source address `from`, on a fresh connection (see [`request_raw`]).
pub async fn request(from: IpAddr, to: SocketAddr, key: &str) -> Result<Answer, String> {
    request_raw(from, to, Some(format!("x-api-key: {key}").as_bytes())).await
}

/// `GET /v1/orders` from source address `from` on a fresh connection (`Connection: close`), with the header line
/// `key_header` as given, byte for byte (or none); the whole answer, or why there was none within 5 s.
pub async fn request_raw(from: IpAddr, to: SocketAddr, key_header: Option<&[u8]>) -> Result<Answer, String> {
    let mut req = b"GET /v1/orders HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n".to_vec();
    if let Some(h) = key_header {
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let exchange = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket.bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
        let mut s = socket.connect(to).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(&req).await.map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
        let split = out.windows(4).position(|w| w == b"\r\n\r\n");
        let split = split.ok_or_else(|| format!("no complete head: {:?}", String::from_utf8_lossy(&out)))?;
        let head = String::from_utf8_lossy(&out[..split]).into_owned();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        let status = status.ok_or_else(|| format!("no status: {:?}", &head[..head.len().min(64)]))?;
        Ok(Answer { status, head, body: out[split + 4..].to_vec() })
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.unwrap_or_else(|_| Err("no answer within 5 s".into()))
}

/// An upstream that answers every request with 200 and closes the connection.
pub async fn start_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            });
        }
    });
    addr
}

/// A Service `name` (selector `app: name`, port 80 → 8443) and an opted-in Pod of it running as ServiceAccount
/// `sa`: the controller binds the sidecar Role to that ServiceAccount.
pub async fn service_and_pod(env: &Env, name: &str, sa: &str) {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8443}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), &svc).await.unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{name}-0"),
            "labels": {"app": name, "portcullis.dev/inject": "true"},
            "annotations": {"portcullis.dev/service": name}
        },
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "example.invalid/app"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), &pod).await.unwrap();
}

/// A running `portcullis-proxy` (killed on drop).
pub struct Sidecar {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Sidecar {
    /// Starts a proxy for `service` with ServiceAccount `sa`'s own token (re-watching every second).
    pub async fn start(env: &Env, service: &str, sa: &str, upstream: SocketAddr) -> Sidecar {
        Self::start_logging(env, service, sa, upstream, "info").await
    }

    /// Like [`Sidecar::start`], with `RUST_LOG` set to `rust_log`.
    pub async fn start_logging(env: &Env, service: &str, sa: &str, upstream: SocketAddr, rust_log: &str) -> Sidecar {
        let token = env.cp.service_account_token(&env.ns, sa).await;
        let kubeconfig = env.cp.kubeconfig_for_token(&token);
        let (port, admin) = (super::free_port(), super::free_port());
        let log = env.cp.dir().join(format!("proxy-{}-{service}-{port}.log", env.ns));
        let child = tokio::process::Command::new(proxy_binary())
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", rust_log)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin}"))
            .arg(format!("--upstream={upstream}"))
            .arg(format!("--tables-from=configmap/{}/{}", env.ns, index_name(service)))
            .args(["--table-rewatch", "1s", "--log-format", "json"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning portcullis-proxy");
        Sidecar {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            log,
        }
    }

    /// HTTP status of `GET /v1/orders` with `key`, from 127.0.0.1; `None` if the proxy does not answer.
    pub async fn status(&self, key: &str) -> Option<u16> {
        request(LO, self.addr, key).await.ok().map(|a| a.status)
    }

    /// Waits (up to 60 s) until `key` gets a status `want` accepts; returns the time it took and the status.
    pub async fn until(&mut self, key: &str, what: &str, want: impl Fn(u16) -> bool) -> (Duration, u16) {
        self.until_within(key, what, T, want).await
    }

    pub async fn until_within(
        &mut self,
        key: &str,
        what: &str,
        timeout: Duration,
        want: impl Fn(u16) -> bool,
    ) -> (Duration, u16) {
        let started = Instant::now();
        let mut last = None;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("portcullis-proxy exited ({exit}); log {}:\n{}", self.log.display(), self.log_tail());
            }
            last = self.status(key).await.or(last);
            if let Some(s) = last.filter(|s| want(*s)) {
                return (started.elapsed(), s);
            }
            if started.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what} (last status {last:?}); proxy log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The value of the unlabelled metric `name` on the admin port (`None` if not exported or no answer).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = super::http_get(self.admin, "/metrics").await?;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until the sidecar's watch on its index is open (`portcullis_proxy_table_watch_open` 1).
    pub async fn until_watching(&self) -> Duration {
        let t = Instant::now();
        wait_for(T, "the sidecar's table watch open", || async {
            (self.metric("portcullis_proxy_table_watch_open").await == Some(1.0)).then_some(())
        })
        .await;
        t.elapsed()
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Latency figures of repeated trials, printed and returned as (p50, p99, max).
pub fn report(what: &str, samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut v = samples.to_vec();
    v.sort();
    let pick = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let (p50, p99, max) = (pick(0.5), pick(0.99), *v.last().unwrap());
    eprintln!("{what}: n={} p50={p50:?} p99={p99:?} max={max:?}", v.len());
    (p50, p99, max)
}
