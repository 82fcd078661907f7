//! A real local Kubernetes control plane for Portcullis tests and the demo: etcd, kube-apiserver (RBAC on) and
//! kube-controller-manager (garbage collector, namespace controller, service accounts) on 127.0.0.1, built from
//! the pinned Go modules in `tools/k8s-bins`. This is envtest's pattern, done from source.
//!
//! ```no_run
//! # async fn t() {
//! let cp = portcullis_testkit::ControlPlane::shared();
//! let ns = cp.namespace("demo").await;
//! let token = cp.service_account_token(&ns, "sidecar").await;
//! let as_sidecar = cp.client_for_token(&token).await;
//! # }
//! ```

pub mod bins;
pub mod chart;
pub mod http;
pub mod pki;
mod process;
pub mod redis;
pub mod relay;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Discovery;
use kube::{Client, Config};
use process::{Proc, free_port, spawn_watchdog};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use pki::{Pki, ServingCert};

const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";

pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    server_url: String,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    ca_path: PathBuf,
    pki: Pki,
    procs: Mutex<Vec<Proc>>,
    etcd_url: String,
    etcd_args: Vec<String>,
    apiserver_args: Vec<String>,
    watchdog: bool,
}

/// Where [`ControlPlane::once`] keeps a control plane: `static CP: OnceCell = OnceCell::new();`.
pub type OnceCell = OnceLock<Result<ControlPlane, String>>;

static SHARED: OnceCell = OnceCell::new();

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use. Panics (the test fails,
    /// it is not skipped) with the reason when it cannot start.
    pub fn shared() -> &'static ControlPlane {
        Self::once(&SHARED)
    }

    /// A control plane started on first use and kept in `cell` (a `static` of the caller), for a group of tests
    /// that must not share the binary's [`ControlPlane::shared`] one (they install conflicting cluster-wide
    /// objects, or need the CRDs absent). Panics like [`ControlPlane::shared`].
    pub fn once(cell: &'static OnceCell) -> &'static ControlPlane {
        let r = cell.get_or_init(|| {
            // Start on a thread of its own: callers are usually inside a tokio runtime.
            std::thread::spawn(|| ControlPlane::start(true).map_err(|e| format!("{e:#}")))
                .join()
                .unwrap_or_else(|_| Err("control-plane start panicked".into()))
        });
        match r {
            Ok(cp) => cp,
            Err(e) => panic!("local Kubernetes control plane could not start: {e}"),
        }
    }

    /// Starts a control plane owned by the caller (stopped on drop). `watchdog`: also stop it if this process dies.
    pub fn start(watchdog: bool) -> Result<ControlPlane> {
        Self::start_with_bins(&bins::bin_dir()?, watchdog)
    }

    /// Like [`ControlPlane::start`], with the control-plane binaries taken from `bin_dir`.
    pub fn start_with_bins(bin_dir: &Path, watchdog: bool) -> Result<ControlPlane> {
        let bin_dir = bin_dir.to_path_buf();
        let keep = std::env::var_os("PORTCULLIS_KEEP_CONTROL_PLANE").is_some();
        let dir = tempfile::Builder::new().prefix("portcullis-cp-").tempdir()?.keep();
        let pki = Pki::generate()?;
        let serving = pki.serving_cert("kube-apiserver", &["kubernetes", "kubernetes.default"])?;
        let write = |name: &str, content: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca_path = write("ca.crt", &pki.ca_pem)?;
        let apiserver_crt = write("apiserver.crt", &serving.cert_pem)?;
        let apiserver_key = write("apiserver.key", &serving.key_pem)?;
        let sa_key = write("sa.key", &pki.sa_private_pem)?;
        let sa_pub = write("sa.pub", &pki.sa_public_pem)?;
        let admin_token = random_hex(24);
        let tokens = write("tokens.csv", &format!("{admin_token},portcullis-admin,admin-uid,\"system:masters\"\n"))?;

        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let p = |p: &Path| p.display().to_string();
        let mut procs = Vec::new();
        let etcd_args: Vec<String> = vec![
            format!("--data-dir={}", p(&dir.join("etcd"))),
            "--unsafe-no-fsync".into(),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--listen-metrics-urls=".into(),
            "--log-level=warn".into(),
        ];
        let etcd = Proc::spawn("etcd", &bin_dir.join("etcd"), &etcd_args, &dir)?;
        procs.push(etcd);
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", p(&dir.join("certs"))),
            format!("--tls-cert-file={}", p(&apiserver_crt)),
            format!("--tls-private-key-file={}", p(&apiserver_key)),
            format!("--client-ca-file={}", p(&ca_path)),
            format!("--token-auth-file={}", p(&tokens)),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&sa_pub)),
            format!("--service-account-signing-key-file={}", p(&sa_key)),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--endpoint-reconciler-type=none".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let apiserver = Proc::spawn("kube-apiserver", &bin_dir.join("kube-apiserver"), &apiserver_args, &dir)?;
        procs.push(apiserver);
        let server_url = format!("https://127.0.0.1:{api_port}");
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(&admin_kubeconfig, kubeconfig_yaml(&server_url, &ca_path, &admin_token, "portcullis-admin"))?;

        let mut cp = ControlPlane {
            dir: dir.clone(),
            bin_dir: bin_dir.clone(),
            server_url,
            admin_token,
            admin_kubeconfig: admin_kubeconfig.clone(),
            ca_path: ca_path.clone(),
            pki,
            procs: Mutex::new(procs),
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            etcd_args,
            apiserver_args,
            watchdog,
        };
        if watchdog {
            let pids: Vec<u32> = cp.procs.lock().unwrap().iter().map(|p| p.child.id()).collect();
            spawn_watchdog(&pids, &dir, keep)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(cp.wait_apiserver_ready(Duration::from_secs(120)))?;

        let kcm = Proc::spawn(
            "kube-controller-manager",
            &bin_dir.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", p(&admin_kubeconfig)),
                "--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,root-ca-cert-publisher"
                    .into(),
                format!("--service-account-private-key-file={}", p(&sa_key)),
                format!("--root-ca-file={}", p(&ca_path)),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                format!("--cluster-signing-cert-file={}", p(&ca_path)),
                "--concurrent-gc-syncs=5".into(),
                "--v=1".into(),
            ],
            &dir,
        )?;
        if watchdog {
            spawn_watchdog(&[kcm.child.id()], &dir, keep)?;
        }
        cp.procs.get_mut().unwrap().push(kcm);
        rt.block_on(cp.wait_controller_manager_ready(Duration::from_secs(90)))?;
        Ok(cp)
    }

    async fn wait_apiserver_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let client = self.admin_client_result().await?;
        loop {
            {
                let mut procs = self.procs.lock().unwrap();
                for p in procs.iter_mut() {
                    p.check_alive()?;
                }
            }
            let req = ::http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!(
                        "kube-apiserver at {} was not ready within {timeout:?}; logs in {}",
                        self.server_url,
                        self.dir.display()
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The service-account controller creates `default` in every namespace: seeing it proves the manager runs.
    async fn wait_controller_manager_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin_client_result().await?, "default");
        loop {
            for p in self.procs.lock().unwrap().iter_mut() {
                p.check_alive()?;
            }
            if sas.get_opt("default").await.ok().flatten().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kube-controller-manager did not create the default ServiceAccount within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn server_url(&self) -> &str {
        &self.server_url
    }
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }
    /// The CA that signs the API server's certificate; use it for webhook serving certificates too.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }
    pub fn helm(&self) -> PathBuf {
        self.bin_dir.join("helm")
    }
    /// Scratch directory of this control plane (removed when it stops).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client authenticated as a cluster admin (`system:masters`).
    pub async fn admin_client(&self) -> Client {
        self.admin_client_result().await.expect("admin client")
    }

    async fn admin_client_result(&self) -> Result<Client> {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// A fresh namespace named `<prefix>-<random>`.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{}", random_hex(3));
        let ns =
            Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
        Api::<Namespace>::all(self.admin_client().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        name
    }

    /// A token for ServiceAccount `ns/name` (created if missing) from the TokenRequest API, as a kubelet would
    /// project it.
    pub async fn service_account_token(&self, ns: &str, name: &str) -> String {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin_client().await, ns);
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("creating ServiceAccount {ns}/{name}: {e}"),
        }
        let req = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
            ..Default::default()
        };
        let tr = sas
            .create_token_request(name, &PostParams::default(), &req)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{name}: {e}"));
        tr.status.and_then(|s| s.token).expect("TokenRequest returned no token")
    }

    /// A kubeconfig file authenticating with `token`.
    pub fn kubeconfig_for_token(&self, token: &str) -> PathBuf {
        let path = self.dir.join(format!("token-{}.kubeconfig", random_hex(4)));
        std::fs::write(&path, kubeconfig_yaml(&self.server_url, &self.ca_path, token, "token-user"))
            .expect("writing kubeconfig");
        path
    }

    pub async fn client_for_token(&self, token: &str) -> Client {
        client_from_kubeconfig(&self.kubeconfig_for_token(token)).await.expect("client for token")
    }

    /// Server-side applies every document of a multi-document YAML string as admin.
    pub async fn apply_yaml(&self, yaml: &str, default_namespace: Option<&str>) -> Result<()> {
        let client = self.admin_client_result().await?;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize_any(doc)?;
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_yaml::from_value(value).context("parsing a YAML document")?;
            let tm = obj.types.clone().context("YAML document without apiVersion/kind")?;
            let gvk = GroupVersionKind::try_from(&tm)?;
            let (ar, caps) = kube::discovery::pinned_kind(&client, &gvk).await?;
            let name = obj.metadata.name.clone().context("object without metadata.name")?;
            let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
                let ns = obj.metadata.namespace.as_deref().or(default_namespace).unwrap_or("default");
                Api::namespaced_with(client.clone(), ns, &ar)
            } else {
                Api::all_with(client.clone(), &ar)
            };
            api.patch(&name, &PatchParams::apply("portcullis-testkit").force(), &Patch::Apply(&obj))
                .await
                .with_context(|| format!("applying {} {name}", gvk.kind))?;
        }
        Ok(())
    }

    pub async fn apply_yaml_file(&self, path: impl AsRef<Path>, default_namespace: Option<&str>) -> Result<()> {
        let path = path.as_ref();
        let yaml = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        self.apply_yaml(&yaml, default_namespace).await.with_context(|| format!("applying {}", path.display()))
    }

    /// Runs discovery (for tests that need it).
    pub async fn discovery(&self) -> Result<Discovery> {
        Ok(Discovery::new(self.admin_client_result().await?).run().await?)
    }

    /// Stops kube-apiserver (etcd and the controller manager keep running): clients see connections refused.
    pub fn stop_apiserver(&self) {
        let mut procs = self.procs.lock().unwrap();
        if let Some(i) = procs.iter().position(|p| p.name == "kube-apiserver") {
            procs.remove(i).stop();
        }
    }

    /// Starts kube-apiserver again on the same address with the same flags, and waits until it is ready. Its watch
    /// cache starts afresh: watches resuming from a resourceVersion older than etcd's compaction get 410 Gone.
    pub async fn start_apiserver(&self) -> Result<()> {
        let p = Proc::spawn("kube-apiserver", &self.bin_dir.join("kube-apiserver"), &self.apiserver_args, &self.dir)?;
        if self.watchdog {
            spawn_watchdog(&[p.child.id()], &self.dir, true)?;
        }
        self.procs.lock().unwrap().push(p);
        self.wait_apiserver_ready(Duration::from_secs(120)).await
    }

    /// Stops etcd (stop the API server first, or it logs errors until etcd is back). Its data stays on disk.
    pub fn stop_etcd(&self) {
        let mut procs = self.procs.lock().unwrap();
        if let Some(i) = procs.iter().position(|p| p.name == "etcd") {
            procs.remove(i).stop();
        }
    }

    /// Starts etcd again on the same addresses and data directory, and waits until it answers a read.
    pub async fn start_etcd(&self) -> Result<()> {
        let p = Proc::spawn("etcd", &self.bin_dir.join("etcd"), &self.etcd_args, &self.dir)?;
        if self.watchdog {
            spawn_watchdog(&[p.child.id()], &self.dir, true)?;
        }
        self.procs.lock().unwrap().push(p);
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = etcd_post(&self.etcd_url, "/v3/kv/range", r#"{"key":"AA=="}"#).await {
            if Instant::now() > deadline {
                bail!("etcd did not answer within 60 s after its restart: {e:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Compacts etcd's history up to its current revision (through etcd's JSON gateway), as the API server does
    /// every few minutes: older resourceVersions can no longer be watched from.
    pub async fn compact_etcd(&self) -> Result<()> {
        let range = etcd_post(&self.etcd_url, "/v3/kv/range", r#"{"key":"AA=="}"#).await?;
        let v: serde_json::Value = serde_json::from_str(&range).context("etcd range response")?;
        let revision = v["header"]["revision"].as_str().context("etcd range response without header.revision")?;
        etcd_post(&self.etcd_url, "/v3/kv/compaction", &format!(r#"{{"revision":"{revision}","physical":true}}"#))
            .await?;
        Ok(())
    }

    /// Stops every process and removes the data directory (unless `PORTCULLIS_KEEP_CONTROL_PLANE` is set).
    pub fn stop(&self) {
        let mut procs = self.procs.lock().unwrap();
        while let Some(mut p) = procs.pop() {
            p.stop();
        }
        if std::env::var_os("PORTCULLIS_KEEP_CONTROL_PLANE").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

trait DeserializeAny: Sized {
    fn deserialize_any<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}
impl DeserializeAny for serde_yaml::Value {
    fn deserialize_any<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <serde_yaml::Value as serde::Deserialize>::deserialize(d)
    }
}

/// POST `body` to etcd's JSON gateway at `base` + `path`; returns the response body.
async fn etcd_post(base: &str, path: &str, body: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.with_context(|| format!("connecting to etcd at {host}"))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let (head, rest) = out.split_once("\r\n\r\n").context("etcd answered without a header")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path}: {head}\n{rest}");
    }
    // The gateway may answer chunked: the JSON object is between the first '{' and the last '}'.
    let json = rest.find('{').and_then(|a| rest.rfind('}').map(|b| &rest[a..=b])).unwrap_or(rest);
    Ok(json.to_string())
}

pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: {user}\n\
         current-context: local\n",
        ca = ca.display()
    )
}

pub fn random_hex(bytes: usize) -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
