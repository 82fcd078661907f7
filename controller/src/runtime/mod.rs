//! The running controller. Read top to bottom:
//!
//! 1. [`caches`]: one reflector per watched kind (UsagePlans, ApiClients, Secrets, Services, opted-in Pods, and the
//!    table ConfigMaps, Roles and RoleBindings this controller writes), objects trimmed before they are stored;
//!    relists handed over as diffs.
//! 2. [`triggers`]: which Services (tables) and ApiClients (status) one watch event touches; pure functions over
//!    the caches and [`rendered`] (what this controller last wrote).
//! 3. [`tables`]: the table writer: a debounced queue of Services, each decided from the caches (pure) and
//!    published ([`publish`], fenced against a second writer), plus the sidecar's RBAC ([`access`]).
//! 4. [`status`]: UsagePlan status and the Events of condition transitions; [`clients`] is the ApiClient reconciler.
//! 5. [`leader`]: the Lease that makes one replica the writer; [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//!
//! [`run`] wires them together; it is what the binary (and the cluster tests) call.

pub mod access;
pub mod caches;
pub mod clients;
pub mod echoes;
pub mod enforcement;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod publish;
pub mod rendered;
pub mod status;
pub mod store;
pub mod store_client;
pub mod tables;
pub mod thread_time;
pub mod triggers;
pub mod usage;

use crate::crd::{ApiClient, UsagePlan};
use caches::{Caches, Change};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, applier};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use leader::{LeaderLease, LeaseConfig};
use metrics::{Health, Metrics};
use portcullis_table::Chain;
use rendered::{Rendered, ServiceKey};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tables::Debounce;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument as _;
use triggers::{SpecSeen, Triggers, View};

pub(crate) use status::publish_transitions;

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "portcullis-controller";
/// `app.kubernetes.io/managed-by` value on objects this controller creates.
pub const MANAGED_BY: &str = "portcullis-controller";

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API")]
    Kube(#[from] kube::Error),
    #[error("rendering the table of {service}")]
    Table { service: String, source: portcullis_table::TableError },
    #[error(
        "CustomResourceDefinition {0} is not installed; install the CRDs first (kubectl apply -f crds/ or the Helm chart)"
    )]
    CrdMissing(String),
    #[error("CustomResourceDefinition {0} exists but is not Established yet")]
    CrdNotEstablished(String),
    #[error("lost the leader Lease {0}; stopping so that only one replica writes")]
    LostLease(String),
    #[error("admin listener on {addr}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("a controller task stopped unexpectedly: {0}")]
    TaskEnded(String),
    #[error("table index {0} changed or vanished since it was read (another writer?)")]
    Conflict(String),
    #[error(
        "the table index of {service} would be {bytes} bytes, more than a ConfigMap may safely hold ({max}); the last table stays in force: reduce the plans' routes"
    )]
    IndexTooLarge { service: String, bytes: usize, max: usize },
    #[error("leader election")]
    LeaseConfig(#[from] leader::LeaseConfigError),
}

impl Error {
    /// The API server's connection closed before it answered (a pooled keep-alive connection the server had just
    /// closed, or a server restarting): nothing was decided, so the request may be tried again at once on a new
    /// connection rather than after a retry delay.
    pub fn is_unanswered(&self) -> bool {
        let Error::Kube(e) = self else { return false };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if err.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_incomplete_message() || h.is_canceled()) {
                return true;
            }
            source = err.source();
        }
        false
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Watch only this namespace (default: all namespaces).
    pub namespace: Option<String>,
    pub leader_elect: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// How long the holder keeps writing after the start of its last successful renewal (below `lease_duration`).
    pub lease_renew_deadline: Duration,
    /// Interval between Lease renewals (and the timeout of each Lease API call); below `lease_renew_deadline`.
    pub lease_retry_period: Duration,
    /// Every Service is re-rendered and its shards checked this often (repairs drift no event reported).
    pub resync_interval: Duration,
    /// Budget of one shard's data string (tests lower it to exercise per-client render errors).
    pub max_shard_bytes: usize,
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
    /// Whether the webhook injects a client CA by default (`--sidecar-client-ca-secret`, into pods with a TLS
    /// Secret): what `CertificatesVerifiable` assumes of a Service none of whose sidecars runs yet.
    pub sidecar_client_ca_default: bool,
    /// Set once the admission webhook serves (`None`: no webhook in this process); `/readyz` waits for it and for
    /// nothing else, so every replica serves admission whether or not it leads or its caches have synced.
    pub webhook_ready: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// How the sidecars are asked for the `Enforced` condition.
    pub enforcement: crate::enforcement::Settings,
    /// The shared store (Redis) of global limits, if configured (`--store-url`).
    pub store: Option<crate::store::StoreSettings>,
    /// The controller's own namespace (where `--store-credentials-secret` lives).
    pub own_namespace: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            leader_elect: true,
            lease_namespace: "default".into(),
            lease_name: "portcullis-controller".into(),
            lease_duration: Duration::from_secs(15),
            lease_renew_deadline: Duration::from_secs(10),
            lease_retry_period: Duration::from_secs(2),
            resync_interval: Duration::from_secs(300),
            max_shard_bytes: portcullis_table::shard::MAX_SHARD_BYTES,
            identity: format!("portcullis-controller-{}", std::process::id()),
            metrics_listen: None,
            debounce: Debounce { quiet: Duration::from_millis(100), max_wait: Duration::from_secs(2) },
            network_policy: crate::network_policy::Settings::default(),
            sidecar_ports: crate::network_policy::SidecarPorts::default(),
            sidecar_client_ca_default: false,
            webhook_ready: None,
            enforcement: crate::enforcement::Settings::default(),
            store: None,
            own_namespace: "default".into(),
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
    pub sidecar_client_ca_default: bool,
    /// What the sidecars say they serve (`Enforced`).
    pub enforcement: enforcement::Enforcement,
    pub caches: Caches,
    /// What this controller last wrote, per Service.
    pub state: RwLock<Rendered>,
    /// The last error of each Service whose table could not be written (cleared on success).
    pub render_errors: RwLock<HashMap<ServiceKey, String>>,
    pub table_tx: mpsc::UnboundedSender<ServiceKey>,
    /// Services whose granting UsagePlans need their status rewritten, table unchanged (what the sidecars serve
    /// changed): handled by the table worker between batches, never holding a batch open.
    pub plan_status_tx: mpsc::UnboundedSender<ServiceKey>,
    /// This controller's own table writes, whose watch events trigger nothing.
    pub echoes: echoes::Echoes,
    pub client_tx: mpsc::UnboundedSender<ObjectRef<ApiClient>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The Lease this replica writes under (`None` without leader election).
    pub lease: Option<Arc<LeaderLease>>,
    pub lease_name: String,
    pub max_shard_bytes: usize,
    /// The shared store's settings (`None`: not configured) and what its last check found.
    pub store: Option<crate::store::StoreSettings>,
    pub store_health: RwLock<crate::store::StoreHealth>,
    pub own_namespace: String,
}

impl Ctx {
    fn new(
        client: kube::Client,
        config: &Config,
        caches: Caches,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        lease: Option<Arc<LeaderLease>>,
    ) -> (Self, Queues) {
        let (table_tx, table_rx) = mpsc::unbounded_channel();
        let (client_tx, client_rx) = mpsc::unbounded_channel();
        let (plan_status_tx, plan_status_rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            client,
            plans: caches.plans.clone(),
            clients: caches.clients.clone(),
            secrets: caches.secrets.clone(),
            services: caches.services.clone(),
            pods: caches.pods.clone(),
            network_policies: caches.network_policies.clone(),
            network_policy: config.network_policy.clone(),
            sidecar_ports: config.sidecar_ports.clone(),
            sidecar_client_ca_default: config.sidecar_client_ca_default,
            enforcement: enforcement::Enforcement::new(config.enforcement.clone()),
            caches,
            state: RwLock::new(HashMap::new()),
            render_errors: RwLock::new(HashMap::new()),
            table_tx,
            plan_status_tx,
            echoes: echoes::Echoes::default(),
            client_tx,
            recorder,
            metrics,
            lease,
            lease_name: config.lease_name.clone(),
            max_shard_bytes: config.max_shard_bytes,
            store: config.store.clone(),
            store_health: RwLock::new(match config.store {
                Some(_) => crate::store::StoreHealth::Unknown,
                None => crate::store::StoreHealth::NotConfigured,
            }),
            own_namespace: config.own_namespace.clone(),
        };
        (ctx, Queues { tables: table_rx, plan_status: plan_status_rx, clients: client_rx })
    }

    /// Computes the triggers of an event over the caches and the rendered state.
    pub(crate) fn triggers(&self, f: impl FnOnce(&View) -> Triggers) -> Triggers {
        let rendered = self.state.read().expect("state lock");
        f(&View {
            plans: &self.plans,
            clients: &self.clients,
            secret_readers: &self.caches.secret_readers,
            rendered: &rendered,
        })
    }

    /// The fence of this replica's writes: its Lease.
    pub(crate) fn fence(&self) -> publish::Fence<'_> {
        publish::Fence { lease: self.lease.as_deref(), lease_name: &self.lease_name }
    }

    /// Every Service this controller should look at: those it has rendered, those plans name, and those with table
    /// ConfigMaps in the cache.
    fn all_services(&self) -> Vec<ServiceKey> {
        let mut all: std::collections::BTreeSet<ServiceKey> =
            self.state.read().expect("state lock").keys().cloned().collect();
        for p in self.plans.state() {
            let ns = kube::ResourceExt::namespace(&*p).unwrap_or_default();
            all.extend(p.spec.services.iter().map(|s| ServiceKey::new(&ns, &s.name)));
        }
        for cm in self.caches.configmaps.state() {
            all.extend(triggers::configmap_changed(&cm).services);
        }
        all.into_iter().collect()
    }

    /// Whether a shared store is configured.
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// Queues what `t` asks for (`source`: the event kind, in the debug log).
    pub(crate) fn dispatch(&self, source: &'static str, t: Triggers) {
        if !t.services.is_empty() {
            tracing::debug!(source, services = t.services.len(), "table trigger");
            let labels = metrics::SourceLabels { source: source.to_string() };
            self.metrics.table_triggers.get_or_create(&labels).inc_by(t.services.len() as u64);
        }
        for k in &t.services {
            let _ = self.table_tx.send(k.clone());
        }
        for r in t.client_refs() {
            let _ = self.client_tx.send(r);
        }
    }
}

/// The receiving ends of the table queue, the UsagePlan status queue and the ApiClient queue.
struct Queues {
    tables: mpsc::UnboundedReceiver<ServiceKey>,
    plan_status: mpsc::UnboundedReceiver<ServiceKey>,
    clients: mpsc::UnboundedReceiver<ObjectRef<ApiClient>>,
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

/// Runs the controller until `shutdown` resolves (then `Ok`) or a fatal error (missing CRDs, lost Lease).
pub async fn run(client: kube::Client, config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::new());
    // Ready as soon as the admin server (and the webhook, if any) serves: a replica that waits for the Lease or for
    // its caches still answers admission requests, so `failurePolicy: Fail` never waits on a leader change.
    let health = Arc::new(Health { ready: true.into(), gate: config.webhook_ready.clone() });
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

    let lease_config = LeaseConfig {
        namespace: config.lease_namespace.clone(),
        name: config.lease_name.clone(),
        identity: config.identity.clone(),
        duration: config.lease_duration,
        renew_deadline: config.lease_renew_deadline,
        retry_period: config.lease_retry_period,
    };
    if config.leader_elect {
        lease_config.check()?;
    }
    let lease = config.leader_elect.then(|| Arc::new(LeaderLease::new(client.clone(), lease_config)));
    if let Some(lease) = &lease {
        tokio::select! {
            _ = lease.acquire() => {}
            _ = &mut shutdown => return Ok(()),
        }
        metrics.leader.set(1);
    }

    // Renewal runs from the moment we lead, not only once the caches are synced.
    let lost = async {
        match &lease {
            Some(l) => l.hold().await,
            None => futures::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = run_leader(&client, &config, metrics.clone(), lease.clone(), &mut shutdown) => r,
        _ = lost => Err(Error::LostLease(config.lease_name.clone())),
    };
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
    lease: Option<Arc<LeaderLease>>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<(), Error> {
    let (caches, watches) = caches::start(client, &config.namespace);
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: FIELD_MANAGER.into(), instance: Some(config.identity.clone()) },
    );
    let (ctx, queues) = Ctx::new(client.clone(), config, caches.clone(), recorder, metrics, lease);
    let ctx = Arc::new(ctx);

    let mut tasks: JoinSet<Result<&'static str, Error>> = JoinSet::new();
    // Each watch feeds its trigger function; UsagePlans and ApiClients only on spec changes.
    let (c, mut seen) = (ctx.clone(), SpecSeen::default());
    spawn_watch(&mut tasks, "usageplans", ctx.plans.clone(), watches.plans, move |p: &UsagePlan, change| {
        if seen.spec_changed(p, change) {
            c.dispatch("usageplan", c.triggers(|v| triggers::plan_changed(v, p)));
        }
    });
    let (c, mut seen) = (ctx.clone(), SpecSeen::default());
    spawn_watch(&mut tasks, "apiclients", ctx.clients.clone(), watches.clients, move |o: &ApiClient, change| {
        if seen.spec_changed(o, change) {
            c.dispatch("apiclient", c.triggers(|v| triggers::client_changed(v, o)));
        }
    });
    let c = ctx.clone();
    spawn_watch(&mut tasks, "secrets", ctx.secrets.clone(), watches.secrets, move |o: &Secret, _| {
        c.dispatch("secret", c.triggers(|v| triggers::secret_changed(v, o)));
    });
    let c = ctx.clone();
    spawn_watch(&mut tasks, "services", ctx.services.clone(), watches.services, move |o: &Service, _| {
        c.dispatch("service", c.triggers(|v| triggers::service_changed(v, o)));
    });
    let c = ctx.clone();
    spawn_watch(&mut tasks, "pods", ctx.pods.clone(), watches.pods, move |o: &Pod, _| {
        c.dispatch("pod", c.triggers(|v| triggers::pod_changed(v, o)));
    });
    let c = ctx.clone();
    spawn_watch(&mut tasks, "configmaps", caches.configmaps.clone(), watches.configmaps, move |o, change| {
        if !c.echoes.is_echo(o, change) {
            c.dispatch("configmap", triggers::labelled_changed(o));
        }
    });
    let c = ctx.clone();
    spawn_watch(&mut tasks, "roles", caches.roles.clone(), watches.roles, move |o, _| {
        c.dispatch("role", triggers::labelled_changed(o));
    });
    let c = ctx.clone();
    spawn_watch(&mut tasks, "rolebindings", caches.bindings.clone(), watches.bindings, move |o, _| {
        c.dispatch("rolebinding", triggers::labelled_changed(o));
    });
    let c = ctx.clone();
    spawn_watch(
        &mut tasks,
        "networkpolicies",
        caches.network_policies.clone(),
        watches.network_policies,
        move |o, _| {
            c.dispatch("networkpolicy", c.triggers(|v| triggers::network_policy_changed(v, o)));
        },
    );

    // Nothing is written before every cache is complete: an empty cache must never render an empty table.
    tokio::select! {
        _ = caches.wait_until_ready() => {}
        _ = &mut *shutdown => { tasks.abort_all(); return Ok(()); }
    }
    tracing::info!("caches synced; reconciling");

    tasks.spawn({
        let ctx = ctx.clone();
        let debounce = config.debounce;
        async move {
            tables::run_table_worker(ctx, queues.tables, queues.plan_status, debounce).await?;
            Ok("table worker")
        }
    });
    tasks.spawn({
        let ctx = ctx.clone();
        async move {
            enforcement::run(ctx).await;
            Ok("sidecar prober")
        }
    });
    // The ApiClient reconciler runs on kube-runtime's applier (the engine of `Controller`: dedup, debounce,
    // concurrency, requeue), fed from the shared ApiClient cache and our trigger channel, so nothing is watched twice.
    let queue = tokio_stream_from(queues.clients).map(Ok::<_, std::convert::Infallible>);
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
        caches.clients.clone(),
        queue,
        ControllerConfig::default().debounce(Duration::from_millis(500)).concurrency(16),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %Chain(&e), "ApiClient reconciler");
        }
    });
    tasks.spawn(async move {
        controller.await;
        Ok("apiclient controller")
    });

    // The shared store: its checks (the plans' `GlobalLimits`), the sidecars' credential copies, `status.usage`.
    if ctx.store.is_some() {
        tasks.spawn({
            let ctx = ctx.clone();
            async move {
                store::run(ctx).await;
                Ok("store checker")
            }
        });
        tasks.spawn({
            let ctx = ctx.clone();
            async move {
                usage::run(ctx).await;
                Ok("usage refresher")
            }
        });
    }

    // Periodic full resync: every Service is re-rendered (an unchanged one costs a GET of its index and a look at
    // the cached shard hashes), so drift no event reported is repaired within one interval.
    tasks.spawn({
        let ctx = ctx.clone();
        let every = config.resync_interval;
        async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let all = ctx.all_services();
                tracing::debug!(services = all.len(), "periodic resync");
                ctx.dispatch("resync", Triggers { services: all.into_iter().collect(), ..Default::default() });
            }
        }
    });

    let result = tokio::select! {
        _ = &mut *shutdown => Ok(()),
        ended = tasks.join_next() => match ended {
            Some(Ok(Err(e))) => Err(e),
            Some(Ok(Ok(name))) => Err(Error::TaskEnded(name.to_string())),
            Some(Err(e)) => Err(Error::TaskEnded(e.to_string())),
            None => Err(Error::TaskEnded("none".into())),
        },
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::info!("controller stopped");
    result
}

/// Drives one watch (see [`caches::drive`]) as a task of `tasks`, in the caller's tracing span (so a span around
/// [`run`] labels the watches' log lines too).
fn spawn_watch<K>(
    tasks: &mut JoinSet<Result<&'static str, Error>>,
    what: &'static str,
    store: Store<K>,
    stream: caches::WatchStream<K>,
    handler: impl FnMut(&K, Change) + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    tasks.spawn(
        async move {
            caches::drive(what, store, stream, handler).await;
            Ok(what)
        }
        .in_current_span(),
    );
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::Error;
    use k8s_openapi::api::core::v1::ConfigMap;
    use tokio::io::AsyncReadExt;

    /// A server that reads each request and closes the connection without answering: the error the table worker
    /// sees from kube's client is recognised as unanswered; an answered error (a 403) is not.
    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_unanswered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                if buf.starts_with(b"GET /api/v1/namespaces/answered") {
                    use tokio::io::AsyncWriteExt;
                    let body =
                        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403}"#;
                    let head = format!(
                        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
                }
                drop(s);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let dropped = kube::Api::<ConfigMap>::namespaced(client.clone(), "dropped").get("x").await.unwrap_err();
        assert!(Error::Kube(dropped).is_unanswered());
        let answered = kube::Api::<ConfigMap>::namespaced(client, "answered").get("x").await.unwrap_err();
        assert!(!Error::Kube(answered).is_unanswered(), "a 403 was answered");
        assert!(!Error::Conflict("i".into()).is_unanswered());
    }
}
