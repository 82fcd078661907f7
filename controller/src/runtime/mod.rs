//! The running controller: caches (reflectors), trigger mapping, the table writer, the ApiClient `Controller`,
//! leader election and the admin server. [`run`] is what the binary (and the cluster tests) call.

pub mod access;
pub mod clients;
pub mod enforcement;
pub mod leader;
pub mod metrics;
pub mod tables;

use crate::conditions::transitions;
use crate::crd::{ApiClient, UsagePlan};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, applier};
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use leader::{LeaderLease, LeaseConfig};
use metrics::{Health, Metrics};
use portcullis_table::naming::LABEL_SERVICE;
use serde::de::DeserializeOwned;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tables::{Debounce, ServiceKey, ServiceState};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "portcullis-controller";
/// `app.kubernetes.io/managed-by` value on objects this controller creates.
pub const MANAGED_BY: &str = "portcullis-controller";

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("rendering the table of {service}: {source}")]
    Table { service: String, source: portcullis_table::TableError },
    #[error(
        "CustomResourceDefinition {0} is not installed; install the CRDs first (kubectl apply -f crds/ or the Helm chart)"
    )]
    CrdMissing(String),
    #[error("CustomResourceDefinition {0} exists but is not Established yet")]
    CrdNotEstablished(String),
    #[error("lost the leader Lease {0}; stopping so that only one replica writes")]
    LostLease(String),
    #[error("admin listener on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("a controller task stopped unexpectedly: {0}")]
    TaskEnded(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Watch only this namespace (default: all namespaces).
    pub namespace: Option<String>,
    pub leader_elect: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// This replica's identity in the Lease and in Events.
    pub identity: String,
    /// Admin HTTP (`/metrics`, `/healthz`, `/readyz`); `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    pub debounce: Debounce,
    /// The per-Service NetworkPolicy: default on, who may reach the sidecars' admin port.
    pub network_policy: crate::network_policy::Settings,
    /// The sidecar ports the webhook injects (`--sidecar-proxy-port`, `--sidecar-admin-port`), for pods that do
    /// not declare theirs.
    pub sidecar_ports: crate::network_policy::SidecarPorts,
    /// How the sidecars are asked for the `Enforced` condition.
    pub enforcement: crate::enforcement::Settings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            leader_elect: true,
            lease_namespace: "default".into(),
            lease_name: "portcullis-controller".into(),
            lease_duration: Duration::from_secs(15),
            identity: format!("portcullis-controller-{}", std::process::id()),
            metrics_listen: None,
            debounce: Debounce { quiet: Duration::from_millis(100), max_wait: Duration::from_secs(2) },
            network_policy: crate::network_policy::Settings::default(),
            sidecar_ports: crate::network_policy::SidecarPorts::default(),
            enforcement: crate::enforcement::Settings::default(),
        }
    }
}

/// Shared by the table writer and the ApiClient reconciler.
pub struct Ctx {
    pub client: kube::Client,
    pub plans: Store<UsagePlan>,
    pub clients: Store<ApiClient>,
    pub secrets: Store<Secret>,
    /// Services (trimmed), for the exposure check and the NetworkPolicy's pod selector.
    pub services: Store<Service>,
    /// Pods opted in to injection (trimmed), for the sidecar RoleBinding's subjects.
    pub pods: Store<Pod>,
    /// NetworkPolicies (ours and others'), for the isolation check of `Exposure`.
    pub network_policies: Store<NetworkPolicy>,
    pub network_policy: crate::network_policy::Settings,
    pub sidecar_ports: crate::network_policy::SidecarPorts,
    /// What the sidecars say they serve (`Enforced`).
    pub enforcement: enforcement::Enforcement,
    pub state: RwLock<HashMap<ServiceKey, ServiceState>>,
    /// The last error of each Service whose table could not be written (cleared on success).
    pub render_errors: RwLock<HashMap<ServiceKey, String>>,
    pub table_tx: mpsc::UnboundedSender<ServiceKey>,
    pub client_tx: mpsc::UnboundedSender<ObjectRef<ApiClient>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

/// Publishes an Event per condition transition: Warning when a condition turns False, Normal when Ready turns True.
/// Messages come from conditions, which never contain key material.
pub(crate) async fn publish_transitions(ctx: &Ctx, obj: &ObjectReference, old: &[Condition], new: &[Condition]) {
    for c in transitions(old, new) {
        let (type_, note) = match (c.status.as_str(), c.type_.as_str()) {
            ("False", _) if c.reason != crate::conditions::reason::PENDING => {
                (EventType::Warning, format!("{}: {}", c.type_, c.message))
            }
            ("True", "Ready") => (EventType::Normal, c.message.clone()),
            _ => continue,
        };
        let ev =
            KEvent { type_, reason: c.reason.clone(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(e) = ctx.recorder.publish(&ev, obj).await {
            tracing::debug!(error = %e, "publishing an Event failed");
        }
    }
}

fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fails with a clear message unless both CRDs are installed and Established.
pub async fn check_crds(client: &kube::Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["apiclients.portcullis.dev", "usageplans.portcullis.dev"] {
        let crd = crds.get_opt(name).await?.ok_or_else(|| Error::CrdMissing(name.into()))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if !established {
            return Err(Error::CrdNotEstablished(name.into()));
        }
    }
    Ok(())
}

/// A reflected watch; `trim` shrinks each object before it is cached (and handed to the trigger mapping).
fn reflect<K>(
    api: Api<K>,
    wc: watcher::Config,
    trim: fn(&mut K),
) -> (Store<K>, impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, wc).default_backoff().modify(trim));
    (reader, stream)
}

fn trim_meta<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Secret types that never hold API keys: their data is dropped from the cache (Helm releases can be large), and
/// so are annotations (`kubectl apply` copies the whole Secret into `last-applied-configuration`).
const NON_KEY_SECRET_TYPES: &[&str] = &[
    "helm.sh/release.v1",
    "kubernetes.io/service-account-token",
    "kubernetes.io/dockerconfigjson",
    "kubernetes.io/dockercfg",
    "kubernetes.io/tls",
    "bootstrap.kubernetes.io/token",
];

fn trim_secret(s: &mut Secret) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
    s.string_data = None;
    if s.type_.as_deref().is_some_and(|t| NON_KEY_SECRET_TYPES.contains(&t)) {
        s.data = None;
    }
}

/// The table ConfigMaps are cached for their events only; the current index is always read fresh.
fn trim_configmap(cm: &mut ConfigMap) {
    cm.metadata.managed_fields = None;
    cm.data = None;
    cm.binary_data = None;
}

/// Services are cached for the exposure check: spec, and only the internal-load-balancer annotations.
fn trim_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| crate::exposure::INTERNAL_LB_ANNOTATIONS.iter().any(|(key, _)| key == k));
    }
    s.status = None;
}

fn objects<K>(ev: &watcher::Event<K>) -> Option<&K> {
    match ev {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) => Some(o),
        _ => None,
    }
}

fn enqueue(ctx: &Ctx, keys: impl IntoIterator<Item = ServiceKey>) {
    for k in keys {
        let _ = ctx.table_tx.send(k);
    }
}

fn on_plan(ctx: &Ctx, plan: &UsagePlan) {
    let ns = plan.namespace().unwrap_or_default();
    let mut keys: BTreeSet<ServiceKey> =
        plan.spec.services.iter().map(|s| ServiceKey { namespace: ns.clone(), name: s.name.clone() }).collect();
    // Services it no longer names: every table in the namespace is re-checked (unchanged ones cost one GET).
    keys.extend(ctx.state.read().expect("state lock").keys().filter(|k| k.namespace == ns).cloned());
    enqueue(ctx, keys);
    let name = plan.name_any();
    for c in ctx.clients.state() {
        if c.namespace().as_deref() == Some(ns.as_str()) && c.spec.usage_plans.contains(&name) {
            let _ = ctx.client_tx.send(ObjectRef::from_obj(&*c));
        }
    }
}

fn on_client(ctx: &Ctx, client: &ApiClient) {
    enqueue(ctx, tables::services_of_client(ctx, client));
    let _ = ctx.client_tx.send(ObjectRef::from_obj(client));
}

fn on_secret(ctx: &Ctx, secret: &Secret) {
    let ns = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    for c in ctx.clients.state() {
        if c.namespace().as_deref() == Some(ns.as_str()) && tables::uses_secret(&c, &name) {
            enqueue(ctx, tables::services_of_client(ctx, &c));
            let _ = ctx.client_tx.send(ObjectRef::from_obj(&*c));
        }
    }
}

/// Whether some UsagePlan in `ns` grants Service `name`.
fn granted(ctx: &Ctx, ns: &str, name: &str) -> bool {
    ctx.plans.state().iter().any(|p| p.namespace().as_deref() == Some(ns) && crate::model::grants(p, name))
        || ctx.state.read().expect("state lock").contains_key(&ServiceKey { namespace: ns.into(), name: name.into() })
}

fn on_service(ctx: &Ctx, svc: &Service) {
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    if granted(ctx, &ns, &name) {
        enqueue(ctx, [ServiceKey { namespace: ns, name }]);
    }
}

fn on_pod(ctx: &Ctx, pod: &Pod) {
    let ns = pod.namespace().unwrap_or_default();
    if let Some(name) = pod.annotations().get(crate::webhook::inject::ANNOTATION_SERVICE)
        && granted(ctx, &ns, name)
    {
        enqueue(ctx, [ServiceKey { namespace: ns, name: name.clone() }]);
    }
}

/// Our own policy changed (re-apply it) or someone else's (re-check isolation): every protected Service of the
/// namespace is looked at again (unchanged ones cost a few GETs).
fn on_network_policy(ctx: &Ctx, np: &NetworkPolicy) {
    let ns = np.namespace().unwrap_or_default();
    let keys: Vec<ServiceKey> =
        ctx.state.read().expect("state lock").keys().filter(|k| k.namespace == ns).cloned().collect();
    enqueue(ctx, keys);
}

fn on_configmap(ctx: &Ctx, cm: &ConfigMap) {
    if let (Some(ns), Some(svc)) = (cm.namespace(), cm.labels().get(LABEL_SERVICE)) {
        enqueue(ctx, [ServiceKey { namespace: ns, name: svc.clone() }]);
    }
}

async fn drive<K>(
    what: &'static str,
    ctx: Arc<Ctx>,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    handler: fn(&Ctx, &K),
) {
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                if let Some(o) = objects(&ev) {
                    handler(&ctx, o);
                }
            }
            Err(e) => tracing::warn!(watch = what, error = %e, "watch error (retrying with backoff)"),
        }
    }
}

/// Runs the controller until `shutdown` resolves (then `Ok`) or a fatal error (missing CRDs, lost Lease).
pub async fn run(client: kube::Client, config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    check_crds(&client).await?;
    let admin = match config.metrics_listen {
        Some(addr) => {
            let (bound, task) = metrics::serve_admin(addr, metrics.clone(), health.clone())
                .await
                .map_err(|source| Error::Admin { addr, source })?;
            tracing::info!(%bound, "admin server listening (/metrics, /healthz, /readyz)");
            Some(task)
        }
        None => None,
    };
    let _admin_guard = AbortOnDrop(admin);
    tokio::pin!(shutdown);

    let lease = config.leader_elect.then(|| {
        LeaderLease::new(
            client.clone(),
            LeaseConfig {
                namespace: config.lease_namespace.clone(),
                name: config.lease_name.clone(),
                identity: config.identity.clone(),
                duration: config.lease_duration,
            },
        )
    });
    if let Some(lease) = &lease {
        health.set_ready(true); // a standby replica is healthy and ready; it simply does not write
        tokio::select! {
            _ = lease.acquire() => {}
            _ = &mut shutdown => return Ok(()),
        }
        metrics.leader.set(1);
    }
    health.set_ready(false);

    let result = run_leader(&client, &config, metrics.clone(), health.clone(), lease.as_ref(), &mut shutdown).await;
    metrics.leader.set(0);
    if let Some(lease) = &lease
        && !matches!(result, Err(Error::LostLease(_)))
    {
        lease.release().await;
    }
    result
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

async fn run_leader(
    client: &kube::Client,
    config: &Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    lease: Option<&LeaderLease>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<(), Error> {
    let ns = &config.namespace;
    let (plans, plan_stream) = reflect(api::<UsagePlan>(client, ns), watcher::Config::default(), trim_meta);
    let (clients, client_stream) = reflect(api::<ApiClient>(client, ns), watcher::Config::default(), trim_meta);
    let (secrets, secret_stream) = reflect(api::<Secret>(client, ns), watcher::Config::default(), trim_secret);
    let cm_wc =
        watcher::Config::default().labels(&format!("{LABEL_SERVICE},app.kubernetes.io/managed-by={MANAGED_BY}"));
    let (cms, cm_stream) = reflect(api::<ConfigMap>(client, ns), cm_wc, trim_configmap);
    let (services, service_stream) = reflect(api::<Service>(client, ns), watcher::Config::default(), trim_service);
    let pod_wc = watcher::Config::default().labels(&format!("{}=true", crate::webhook::inject::INJECT_KEY));
    let (pods, pod_stream) = reflect(api::<Pod>(client, ns), pod_wc, access::trim_pod);
    let (network_policies, np_stream) =
        reflect(api::<NetworkPolicy>(client, ns), watcher::Config::default(), trim_meta);
    let (table_tx, table_rx) = mpsc::unbounded_channel();
    let (client_tx, client_rx) = mpsc::unbounded_channel();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: FIELD_MANAGER.into(), instance: Some(config.identity.clone()) },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        plans: plans.clone(),
        clients: clients.clone(),
        secrets: secrets.clone(),
        services: services.clone(),
        pods: pods.clone(),
        network_policies: network_policies.clone(),
        network_policy: config.network_policy.clone(),
        sidecar_ports: config.sidecar_ports.clone(),
        enforcement: enforcement::Enforcement::new(config.enforcement.clone()),
        state: RwLock::new(HashMap::new()),
        render_errors: RwLock::new(HashMap::new()),
        table_tx,
        client_tx,
        recorder,
        metrics,
    });

    let mut tasks: JoinSet<&'static str> = JoinSet::new();
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("usageplans", ctx, plan_stream, on_plan).await;
            "usageplans watch"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("apiclients", ctx, client_stream, on_client).await;
            "apiclients watch"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("secrets", ctx, secret_stream, on_secret).await;
            "secrets watch"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("configmaps", ctx, cm_stream, on_configmap).await;
            "configmaps watch"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("services", ctx, service_stream, on_service).await;
            "services watch"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("pods", ctx, pod_stream, on_pod).await;
            "pods watch"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            drive("networkpolicies", ctx, np_stream, on_network_policy).await;
            "networkpolicies watch"
        }
    });

    // Nothing is written before every cache is complete: an empty cache must never render an empty table.
    let synced = async {
        let _ = plans.wait_until_ready().await;
        let _ = clients.wait_until_ready().await;
        let _ = secrets.wait_until_ready().await;
        let _ = cms.wait_until_ready().await;
        let _ = services.wait_until_ready().await;
        let _ = pods.wait_until_ready().await;
        let _ = network_policies.wait_until_ready().await;
    };
    tokio::select! {
        _ = synced => {}
        _ = &mut *shutdown => { tasks.abort_all(); return Ok(()); }
    }
    tracing::info!("caches synced; reconciling");
    health.set_ready(true);

    tasks.spawn({
        let ctx = ctx.clone();
        let debounce = config.debounce;
        async move {
            tables::run_table_worker(ctx, table_rx, debounce).await;
            "table worker"
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            enforcement::run(ctx).await;
            "sidecar prober"
        }
    });
    // The ApiClient reconciler runs on kube-runtime's applier (the engine of `Controller`: dedup, debounce,
    // concurrency, requeue), fed from the shared ApiClient cache and our trigger channel, so nothing is watched twice.
    let queue = tokio_stream_from(client_rx).map(Ok::<_, std::convert::Infallible>);
    let controller = applier(
        |obj, ctx| {
            Box::pin(async move {
                tokio::spawn(clients::reconcile(obj, ctx))
                    .await
                    .unwrap_or_else(|e| Err(Error::TaskEnded(e.to_string())))
            })
        },
        clients::error_policy,
        ctx.clone(),
        clients.clone(),
        queue,
        ControllerConfig::default().debounce(Duration::from_millis(500)).concurrency(16),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "ApiClient reconciler");
        }
    });
    tasks.spawn(async move {
        controller.await;
        "apiclient controller"
    });

    let lost = async {
        match lease {
            Some(l) => l.hold().await,
            None => futures::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = &mut *shutdown => Ok(()),
        _ = lost => Err(Error::LostLease(config.lease_name.clone())),
        ended = tasks.join_next() => Err(Error::TaskEnded(match ended {
            Some(Ok(name)) => name.to_string(),
            Some(Err(e)) => e.to_string(),
            None => "none".into(),
        })),
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::info!("controller stopped");
    result
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(type_: &str) -> Secret {
        let mut s = Secret {
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([("k".to_string(), ByteString(b"v".to_vec()))])),
            ..Default::default()
        };
        s.metadata.annotations = Some(BTreeMap::from([("last-applied".to_string(), "{...}".to_string())]));
        s
    }

    #[test]
    fn cached_secrets_keep_data_only_where_keys_can_live() {
        let mut opaque = secret("Opaque");
        trim_secret(&mut opaque);
        assert!(opaque.data.is_some());
        assert!(opaque.metadata.annotations.is_none());
        let mut helm = secret("helm.sh/release.v1");
        trim_secret(&mut helm);
        assert!(helm.data.is_none());
    }

    #[test]
    fn cached_configmaps_drop_table_data() {
        let mut cm = ConfigMap {
            data: Some(BTreeMap::from([("shard.json".to_string(), "{}".to_string())])),
            ..Default::default()
        };
        trim_configmap(&mut cm);
        assert!(cm.data.is_none());
    }
}
