//! Shared helpers of the controller's cluster tests: CRDs + RBAC installed once, the controller run in-process with
//! a ServiceAccount token bound only to `config/rbac`, its tracing output captured for key scans.
#![allow(dead_code)]

pub mod sidecar;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use portcullis_controller::crd::{
    ApiClient, ApiClientSpec, KeySpec, SecretKeyRef, ServiceGrant, UsagePlan, UsagePlanSpec,
};
use portcullis_controller::keys::LABEL_API_KEY;
use portcullis_controller::runtime::tables::Debounce;
use portcullis_controller::{Config, Error};
use portcullis_table::Table;
use portcullis_table::naming::{INDEX_DATA_KEY, SHARD_DATA_KEY, index_name};
use portcullis_table::shard::{IndexDoc, assemble};
use portcullis_testkit::{ControlPlane, wait_for};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{OnceCell, oneshot};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

pub const SYSTEM_NS: &str = "portcullis-system";
pub const SA: &str = "portcullis-controller";
pub const T: Duration = Duration::from_secs(60);

static SETUP: OnceCell<()> = OnceCell::const_new();
static LOGS: OnceLock<Logs> = OnceLock::new();

/// What the binary's log capture keeps: the controller at debug, everything else at info; every crate at debug
/// while a test holds [`capture_all_levels`].
const USUAL: &str = "info,portcullis_controller=debug";
const ALL_LEVELS: &str = "debug";

/// The binary's one log capture: every in-process controller's tracing output, as JSON lines, with its filter
/// reloadable.
struct Logs {
    buf: Arc<Mutex<Vec<u8>>>,
    filter: reload::Handle<EnvFilter, Registry>,
    /// Tests currently holding [`capture_all_levels`].
    all_levels: Mutex<usize>,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything the controllers logged so far (all tests of this binary).
pub fn logs() -> String {
    String::from_utf8_lossy(&install_logging().buf.lock().unwrap()).into_owned()
}

/// How many bytes the capture holds: [`logs_since`] that offset reads what was logged after it.
pub fn logs_len() -> usize {
    install_logging().buf.lock().unwrap().len()
}

/// Log lines of the in-process controller `identity` (see [`start_controller_with`]) that contain `what`.
pub fn controller_log_lines(identity: &str, what: &str) -> usize {
    let tag = format!(r#"{{"identity":"{identity}","name":"controller"}}"#);
    logs().lines().filter(|l| l.contains(&tag) && l.contains(what)).count()
}

pub fn logs_since(offset: usize) -> String {
    String::from_utf8_lossy(&install_logging().buf.lock().unwrap()[offset..]).into_owned()
}

fn install_logging() -> &'static Logs {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Capture(buf.clone());
        let (filter, handle) = reload::Layer::new(EnvFilter::new(USUAL));
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().json().with_writer(move || w.clone()))
            .try_init()
            .expect("the integration binary's only tracing subscriber");
        Logs { buf, filter: handle, all_levels: Mutex::new(0) }
    })
}

/// While the guard lives, the capture keeps every crate's debug lines (kube, hyper, rustls, ... as well as the
/// controller's), for a test that asserts what never appears in any log line. Other tests meanwhile log more, not
/// less.
pub fn capture_all_levels() -> AllLevels {
    let logs = install_logging();
    let mut n = logs.all_levels.lock().unwrap();
    if *n == 0 {
        logs.filter.reload(EnvFilter::new(ALL_LEVELS)).expect("reloading the log filter");
    }
    *n += 1;
    AllLevels(())
}

pub struct AllLevels(());

impl Drop for AllLevels {
    fn drop(&mut self) {
        let logs = install_logging();
        let mut n = logs.all_levels.lock().unwrap();
        *n -= 1;
        if *n == 0 {
            let _ = logs.filter.reload(EnvFilter::new(USUAL));
        }
    }
}

pub struct Env {
    pub cp: &'static ControlPlane,
    pub admin: Client,
    pub ns: String,
    /// Held for the test: shared with the other tests, or exclusive ([`env_exclusive`]).
    _turn: Turn,
}

/// Tests that load the machine heavily (`scale`) run alone; every other [`env`] test shares its turn.
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

enum Turn {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// Control plane, CRDs (Established), RBAC for the controller's ServiceAccount, and a fresh namespace.
pub async fn env(prefix: &str) -> Env {
    let turn = Turn::Shared(TURNS.read().await);
    env_with(prefix, turn).await
}

/// Like [`env`], with no other `env` test running meanwhile (for a test whose load would slow the others).
pub async fn env_exclusive(prefix: &str) -> Env {
    let turn = Turn::Exclusive(TURNS.write().await);
    env_with(prefix, turn).await
}

async fn env_with(prefix: &str, turn: Turn) -> Env {
    install_logging();
    let cp = ControlPlane::shared();
    SETUP.get_or_init(|| install(cp)).await;
    let admin = cp.admin_client().await;
    let ns = cp.namespace(prefix).await;
    Env { cp, admin, ns, _turn: turn }
}

/// Like [`env`], on a control plane of the caller's (e.g. one whose API server the test restarts).
pub async fn env_on(cp: &'static ControlPlane, prefix: &str) -> Env {
    let turn = Turn::Shared(TURNS.read().await);
    env_on_with(cp, prefix, turn).await
}

async fn env_on_with(cp: &'static ControlPlane, prefix: &str, turn: Turn) -> Env {
    install_logging();
    install(cp).await;
    let admin = cp.admin_client().await;
    let ns = cp.namespace(prefix).await;
    Env { cp, admin, ns, _turn: turn }
}

/// CRDs (Established) and the controller's RBAC on `cp`.
pub async fn install(cp: &'static ControlPlane) {
    let admin = cp.admin_client().await;
    for f in ["crds/portcullis.dev_apiclients.yaml", "crds/portcullis.dev_usageplans.yaml"] {
        cp.apply_yaml_file(root().join(f), None).await.expect("installing CRDs");
    }
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in ["apiclients.portcullis.dev", "usageplans.portcullis.dev"] {
        wait_for(T, &format!("CRD {name} Established"), || async {
            let crd = crds.get_opt(name).await.ok()??;
            crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        })
        .await;
    }
    cp.apply_yaml(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SYSTEM_NS}\n"), None)
        .await
        .expect("system namespace");
    cp.apply_yaml_file(root().join("config/rbac/controller-clusterrole.yaml"), None).await.expect("ClusterRole");
    cp.apply_yaml_file(root().join("config/rbac/controller-role-leader-election.yaml"), Some(SYSTEM_NS))
        .await
        .expect("leader Role");
    let bindings = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: portcullis-controller\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: portcullis-controller\n\
         subjects:\n- kind: ServiceAccount\n  name: {SA}\n  namespace: {SYSTEM_NS}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: portcullis-controller-leader-election\n  namespace: {SYSTEM_NS}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: portcullis-controller-leader-election\n\
         subjects:\n- kind: ServiceAccount\n  name: {SA}\n  namespace: {SYSTEM_NS}\n"
    );
    cp.apply_yaml(&bindings, None).await.expect("RBAC bindings");
}

pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
    pub admin_addr: SocketAddr,
    pub identity: String,
}

impl Running {
    pub async fn stop(mut self) -> Result<(), Error> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(T, &mut self.task).await.expect("controller stops within 60 s").expect("task")
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs the controller in-process, as the least-privilege ServiceAccount, watching only `env.ns`.
pub async fn start_controller(env: &Env, identity: &str) -> Running {
    start_controller_with_lease(env, identity, &format!("pc-{}", env.ns)).await
}

pub async fn start_controller_with_lease(env: &Env, identity: &str, lease: &str) -> Running {
    start_controller_with(env, identity, lease, None, |_| {}).await
}

/// The controller's own kube config (its ServiceAccount token), e.g. to point it at a relay.
pub async fn controller_kube_config(env: &Env) -> kube::Config {
    let token = env.cp.service_account_token(SYSTEM_NS, SA).await;
    let kc = kube::config::Kubeconfig::read_from(env.cp.kubeconfig_for_token(&token)).unwrap();
    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap()
}

/// Runs the controller with `kube` (default: its own token, direct) and `tune` applied to its configuration.
pub async fn start_controller_with(
    env: &Env,
    identity: &str,
    lease: &str,
    kube: Option<kube::Config>,
    tune: impl FnOnce(&mut Config),
) -> Running {
    let kube = match kube {
        Some(k) => k,
        None => controller_kube_config(env).await,
    };
    let client = Client::try_from(kube).unwrap();
    let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = Config {
        namespace: Some(env.ns.clone()),
        leader_elect: true,
        lease_namespace: SYSTEM_NS.into(),
        lease_name: lease.into(),
        // The production timings: shorter ones lose the Lease on a loaded 2-core machine (renewals time out while a
        // test floods the API server), and a deposed in-process controller stops writing for good. Failover tests
        // stop the holder gracefully (it releases the Lease) or set their own.
        lease_duration: Duration::from_secs(15),
        identity: identity.into(),
        metrics_listen: Some(admin_addr),
        debounce: Debounce { quiet: Duration::from_millis(100), max_wait: Duration::from_secs(2) },
        lease_renew_deadline: Duration::from_secs(10),
        lease_retry_period: Duration::from_secs(2),
        ..Config::default()
    };
    let mut config = config;
    tune(&mut config);
    let (tx, rx) = oneshot::channel::<()>();
    // A span naming the controller: its log lines (the watches' too) say which in-process controller wrote them.
    let span = tracing::info_span!("controller", identity = %identity);
    let run = portcullis_controller::run(client, config, async move {
        let _ = rx.await;
    });
    let task = tokio::spawn(run.instrument(span));
    Running { stop: Some(tx), task, admin_addr, identity: identity.into() }
}

/// `GET path` on the controller's admin port: (status line, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// Creates a Secret opted in as a key holder (`portcullis.dev/api-key: "true"`).
pub async fn create_secret(env: &Env, name: &str, data: &[(&str, &str)]) {
    create_secret_labelled(env, name, data, true).await
}

/// Creates a Secret, opted in as a key holder or not.
pub async fn create_secret_labelled(env: &Env, name: &str, data: &[(&str, &str)], opted_in: bool) {
    let labels = opted_in.then(|| BTreeMap::from([(LABEL_API_KEY.to_string(), "true".to_string())]));
    let s = Secret {
        metadata: ObjectMeta { name: Some(name.into()), labels, ..Default::default() },
        string_data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), &s).await.unwrap();
}

pub fn client_spec(plans: &[&str], ranges: &[&str], secret: &str, key: &str) -> ApiClientSpec {
    ApiClientSpec {
        usage_plans: plans.iter().map(|s| s.to_string()).collect(),
        source_ranges: ranges.iter().map(|s| s.to_string()).collect(),
        keys: vec![KeySpec {
            secret_ref: Some(SecretKeyRef { name: secret.into(), key: key.into() }),
            ..Default::default()
        }],
        disabled: None,
        certificates: vec![],
        require_certificate: None,
    }
}

pub async fn create_client(env: &Env, name: &str, spec: ApiClientSpec) {
    Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &ApiClient::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("creating ApiClient {name}: {e}"));
}

/// Plan `name` granting every route of `service`, with no limits.
pub fn open_plan(name: &str, service: &str) -> UsagePlan {
    UsagePlan::new(
        name,
        UsagePlanSpec {
            services: vec![ServiceGrant { name: service.into(), routes: None }],
            throttle: None,
            quota: None,
            global_limits: None,
            quota_scope: None,
            on_store_unavailable: None,
            network_policy: None,
        },
    )
}

/// Waits for the generated key Secret `name`; returns it and its key (checked to be in the `pcl_` format).
pub async fn wait_generated(env: &Env, name: &str) -> (Secret, String) {
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    let s = wait_for(T, &format!("Secret {name}"), || async { secrets.get_opt(name).await.ok()? }).await;
    let key = String::from_utf8(s.data.as_ref().expect("a generated Secret has data")["key"].0.clone()).unwrap();
    portcullis_controller::keygen::validate_key_format(&key).expect("generated keys have the pcl_ format");
    (s, key)
}

pub async fn create_plan(env: &Env, plan: UsagePlan) {
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &plan)
        .await
        .unwrap_or_else(|e| panic!("creating UsagePlan: {e}"));
}

pub fn condition<'a>(conds: &'a [Condition], t: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == t)
}

/// Waits until ApiClient `name` has condition `t` with `status` (and `reason`, if given); returns the client.
pub async fn wait_client_condition(env: &Env, name: &str, t: &str, status: &str, reason: Option<&str>) -> ApiClient {
    let api: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let what = format!("ApiClient {}/{name} condition {t}={status} ({reason:?})", env.ns);
    wait_for(T, &what, || async {
        let c = api.get_opt(name).await.ok()??;
        let st = c.status.as_ref()?;
        let cond = condition(&st.conditions, t)?;
        (cond.status == status
            && reason.is_none_or(|r| cond.reason == r)
            && st.observed_generation == c.metadata.generation)
            .then_some(c.clone())
    })
    .await
}

/// The current table of `service`, read as a proxy would (index, then the shards it names, digests checked).
pub async fn read_table(env: &Env, service: &str) -> Option<(IndexDoc, Table, Vec<ConfigMap>)> {
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let index = cms.get_opt(&index_name(service)).await.ok()??;
    let doc = IndexDoc::parse(index.data.as_ref()?.get(INDEX_DATA_KEY)?, "index").ok()?;
    let mut shards = Vec::new();
    for s in &doc.shards {
        shards.push(cms.get_opt(&s.name).await.ok()??);
    }
    let datas: Vec<Option<&str>> =
        shards.iter().map(|cm| cm.data.as_ref().and_then(|d| d.get(SHARD_DATA_KEY)).map(String::as_str)).collect();
    let table = assemble(&doc, &datas).ok()?;
    Some((doc, table, shards))
}

/// Waits until the table of `service` satisfies `pred`.
pub async fn wait_table(env: &Env, service: &str, what: &str, pred: impl Fn(&Table) -> bool) -> (IndexDoc, Table) {
    wait_for(T, &format!("table {}/{service}: {what}", env.ns), || async {
        let (doc, t, _) = read_table(env, service).await?;
        pred(&t).then_some((doc, t))
    })
    .await
}

/// Table ConfigMaps (index and shards) of `service` currently in the namespace.
pub async fn table_configmaps(env: &Env, service: &str) -> Vec<String> {
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let lp = ListParams::default().labels(&format!("portcullis.dev/service={service}"));
    cms.list_metadata(&lp).await.unwrap().items.iter().map(|c| c.name_any()).collect()
}

/// No key (nor its base64) in any ConfigMap, ApiClient/UsagePlan (incl. status), Event of the namespace, or the
/// controller's log output.
pub async fn assert_no_key_material(env: &Env, keys: &[String]) {
    use base64::Engine as _;
    let mut haystacks: BTreeMap<String, String> = BTreeMap::new();
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    for cm in cms.list(&ListParams::default()).await.unwrap() {
        haystacks.insert(format!("ConfigMap {}", cm.name_any()), serde_json::to_string(&cm).unwrap());
    }
    for c in Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns).list(&ListParams::default()).await.unwrap() {
        haystacks.insert(format!("ApiClient {}", c.name_any()), serde_json::to_string(&c).unwrap());
    }
    for p in Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).list(&ListParams::default()).await.unwrap() {
        haystacks.insert(format!("UsagePlan {}", p.name_any()), serde_json::to_string(&p).unwrap());
    }
    let evs: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.admin.clone(), &env.ns);
    for e in evs.list(&ListParams::default()).await.unwrap() {
        haystacks.insert(format!("Event {}", e.name_any()), serde_json::to_string(&e).unwrap());
    }
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.admin.clone(), &env.ns);
    for e in core.list(&ListParams::default()).await.unwrap() {
        haystacks.insert(format!("core Event {}", e.name_any()), serde_json::to_string(&e).unwrap());
    }
    haystacks.insert("controller log".into(), logs());
    for k in keys {
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.as_bytes());
        for (what, text) in &haystacks {
            assert!(!text.contains(k.as_str()), "key material found in {what}");
            assert!(!text.contains(&b64), "base64 key material found in {what}");
        }
    }
}

/// `Events` (events.k8s.io/v1) about `name` in the namespace with `reason`.
pub async fn wait_event(env: &Env, name: &str, reason: &str) {
    let evs: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.admin.clone(), &env.ns);
    wait_for(T, &format!("Event {reason} about {name}"), || async {
        let list = evs.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .then_some(())
    })
    .await
}
