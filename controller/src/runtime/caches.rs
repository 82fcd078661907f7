//! The caches: one reflector per watched kind, each object trimmed to what the controller reads before it is
//! stored, and the loop that hands every watch event to a handler.
//!
//! Invariants:
//! - Nothing is written before every cache has listed once ([`Caches::wait_until_ready`]): an empty cache must never
//!   render an empty table.
//! - A relist (`Init` … `InitDone`, after a 410 Gone or an API server restart) is a diff, not a stream of updates:
//!   objects that vanished during the gap are handed to the handler as deletions, the others as updates, and only
//!   once the store holds the new list (see [`drive`]).

use crate::crd::{ApiClient, UsagePlan};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use portcullis_table::naming::LABEL_SERVICE;
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;

use super::MANAGED_BY;
use super::index::Index;

/// The stores every reconcile reads. Cheap to clone (shared stores).
#[derive(Clone)]
pub struct Caches {
    pub plans: Store<UsagePlan>,
    pub clients: Store<ApiClient>,
    pub secrets: Store<Secret>,
    /// Table ConfigMaps (index and shards), without their data (see [`trim_configmap`]).
    pub configmaps: Store<ConfigMap>,
    /// Services (trimmed), for the exposure check, the NetworkPolicy's pod selector and deny-all tables.
    pub services: Store<Service>,
    /// Pods opted in to injection (trimmed), for the sidecar RoleBinding's subjects.
    pub pods: Store<Pod>,
    /// The sidecar Roles and RoleBindings this controller wrote, watched so that a deleted or edited one is
    /// restored at once.
    pub roles: Store<Role>,
    pub bindings: Store<RoleBinding>,
    /// NetworkPolicies (ours and others'), for the isolation check of `Exposure`.
    pub network_policies: Store<NetworkPolicy>,
    /// ApiClients by the Secrets they read keys from (for Secret events).
    pub secret_readers: Arc<Index<ApiClient>>,
    /// Generated key Secrets by the uid of the ApiClient owning them (for the orphan check of a reconcile).
    pub key_secret_owners: Arc<Index<Secret>>,
}

pub type WatchStream<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// The event streams behind [`Caches`]; each must be polled (by [`drive`]) for its store to fill.
pub struct Watches {
    pub plans: WatchStream<UsagePlan>,
    pub clients: WatchStream<ApiClient>,
    pub secrets: WatchStream<Secret>,
    pub configmaps: WatchStream<ConfigMap>,
    pub services: WatchStream<Service>,
    pub pods: WatchStream<Pod>,
    pub roles: WatchStream<Role>,
    pub bindings: WatchStream<RoleBinding>,
    pub network_policies: WatchStream<NetworkPolicy>,
}

/// Label selector of the per-Service objects this controller writes (table ConfigMaps, sidecar Roles and
/// RoleBindings).
pub fn table_selector() -> String {
    format!("{LABEL_SERVICE},app.kubernetes.io/managed-by={MANAGED_BY}")
}

/// Sets up every watch of `namespace` (or of all namespaces).
pub fn start(client: &kube::Client, namespace: &Option<String>) -> (Caches, Watches) {
    let all = watcher::Config::default;
    let (plans, plan_stream) = reflect(api::<UsagePlan>(client, namespace), all(), trim_meta);
    let secret_readers = Arc::new(Index::new(crate::keys::secret_names));
    let key_secret_owners = Arc::new(Index::new(crate::keys::generated_secret_owners));
    let (clients, client_stream) =
        reflect_indexed(api::<ApiClient>(client, namespace), all(), trim_meta, secret_readers.clone());
    let (secrets, secret_stream) =
        reflect_indexed(api::<Secret>(client, namespace), all(), trim_secret, key_secret_owners.clone());
    let cm_wc = all().labels(&table_selector());
    let (configmaps, cm_stream) = reflect(api::<ConfigMap>(client, namespace), cm_wc, trim_configmap);
    let (services, service_stream) = reflect(api::<Service>(client, namespace), all(), trim_service);
    let pod_wc = all().labels(&format!("{}=true", crate::webhook::inject::INJECT_KEY));
    let (pods, pod_stream) = reflect(api::<Pod>(client, namespace), pod_wc, super::access::trim_pod);
    let (roles, role_stream) = reflect(api::<Role>(client, namespace), all().labels(&table_selector()), trim_meta);
    let (bindings, binding_stream) =
        reflect(api::<RoleBinding>(client, namespace), all().labels(&table_selector()), trim_meta);
    let (network_policies, np_stream) = reflect(api::<NetworkPolicy>(client, namespace), all(), trim_meta);
    (
        Caches {
            plans,
            clients,
            secrets,
            configmaps,
            services,
            pods,
            roles,
            bindings,
            network_policies,
            secret_readers,
            key_secret_owners,
        },
        Watches {
            plans: plan_stream,
            clients: client_stream,
            secrets: secret_stream,
            configmaps: cm_stream,
            services: service_stream,
            pods: pod_stream,
            roles: role_stream,
            bindings: binding_stream,
            network_policies: np_stream,
        },
    )
}

impl Caches {
    /// Resolves once every store has completed its first list.
    pub async fn wait_until_ready(&self) {
        let _ = self.plans.wait_until_ready().await;
        let _ = self.clients.wait_until_ready().await;
        let _ = self.secrets.wait_until_ready().await;
        let _ = self.configmaps.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.roles.wait_until_ready().await;
        let _ = self.bindings.wait_until_ready().await;
        let _ = self.network_policies.wait_until_ready().await;
    }
}

pub(crate) fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflected watch; `trim` shrinks each object before it is cached (and handed to the handler).
fn reflect<K>(api: Api<K>, wc: watcher::Config, trim: fn(&mut K)) -> (Store<K>, WatchStream<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, retrying(watcher(api, wc)).modify(trim)).boxed();
    (reader, stream)
}

/// [`reflect`], with `index` taking in each event before the store does (so the index is never behind the store).
fn reflect_indexed<K>(
    api: Api<K>,
    wc: watcher::Config,
    trim: fn(&mut K),
    index: Arc<Index<K>>,
) -> (Store<K>, WatchStream<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let events = retrying(watcher(api, wc)).modify(trim).inspect(move |ev| {
        if let Ok(ev) = ev {
            index.observe(ev);
        }
    });
    (reader, reflector::reflector(writer, events).boxed())
}

/// Retry delays of a failing watch: 100 ms, then 200 ms, then every 250 ms, back to 100 ms after an event. kube's
/// default grows to 30 s, which would hold back the first re-render after an API server outage (and the revocations
/// made during it) by up to half a minute; nine watches retrying four times a second against an API server that is
/// down cost nothing worth saving. See [`retrying`] for the 410 Gone.
#[derive(Debug)]
struct WatchBackoff {
    next: std::time::Duration,
}

const WATCH_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const WATCH_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: WATCH_RETRY_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let d = self.next;
        self.next = (d * 2).min(WATCH_RETRY_MAX);
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_RETRY_MIN;
    }
}

/// kube's `.backoff()`, except after a 410 Gone: that error is the API server asking for a relist, and the watcher
/// has already moved to listing, so the relist starts at once instead of after one more retry delay (after an
/// outage, the delay that would otherwise stand between reconnection and the relist that finds what changed).
fn retrying<S, T>(stream: S) -> impl Stream<Item = Result<T, watcher::Error>> + Send
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    T: Send + 'static,
{
    use kube::runtime::utils::Backoff;
    let state: (BoxStream<'static, Result<T, watcher::Error>>, WatchBackoff, Option<std::time::Duration>) =
        (stream.boxed(), WatchBackoff::default(), None);
    futures::stream::unfold(state, |(mut stream, mut backoff, delay)| async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let item = stream.next().await?;
        let delay = match &item {
            Ok(_) => {
                backoff.reset();
                None
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => None,
            Err(_) => backoff.next(),
        };
        Some((item, (stream, backoff, delay)))
    })
}

fn trim_meta<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Secret types that never hold API keys: their data is dropped from the cache (Helm releases can be large), as is
/// the data of every Secret not opted in as a key (`portcullis.dev/api-key: "true"`), and so are annotations
/// (`kubectl apply` copies the whole Secret into `last-applied-configuration`).
const NON_KEY_SECRET_TYPES: &[&str] = &[
    "helm.sh/release.v1",
    "kubernetes.io/service-account-token",
    "kubernetes.io/dockerconfigjson",
    "kubernetes.io/dockercfg",
    "kubernetes.io/tls",
    "bootstrap.kubernetes.io/token",
];

pub(crate) fn trim_secret(s: &mut Secret) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
    s.string_data = None;
    if s.type_.as_deref().is_some_and(|t| NON_KEY_SECRET_TYPES.contains(&t)) || !crate::keys::opted_in(s) {
        s.data = None;
    }
}

/// Annotation set on *cached* table ConfigMaps only (never written): the hex SHA-256 of the shard (or index) data
/// the cache dropped, so that drift (a deleted or edited shard) is found without reading every shard, and our own
/// writes are told from others' ([`super::echoes`]).
pub const CACHED_DATA_SHA256: &str = "portcullis.dev/cached-data-sha256";

/// The table ConfigMaps are cached for their events and their shard's content hash; the current index is always
/// read fresh.
pub(crate) fn trim_configmap(cm: &mut ConfigMap) {
    cm.metadata.managed_fields = None;
    let sha = cm
        .data
        .as_ref()
        .and_then(|d| {
            d.get(portcullis_table::naming::SHARD_DATA_KEY).or_else(|| d.get(portcullis_table::naming::INDEX_DATA_KEY))
        })
        .map(|d| super::publish::data_sha256(d));
    cm.metadata.annotations.get_or_insert_with(Default::default).remove(CACHED_DATA_SHA256);
    if let Some(sha) = sha {
        cm.metadata.annotations.get_or_insert_with(Default::default).insert(CACHED_DATA_SHA256.into(), sha);
    }
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

/// What a watch event means for the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Applied,
    Deleted,
}

/// Objects of `before` (the store's content when a relist began) that the relist no longer has.
pub fn vanished<K>(before: &[Arc<K>], after: &Store<K>) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let now: HashSet<ObjectRef<K>> = after.state().iter().map(|o| ObjectRef::from_obj(&**o)).collect();
    before.iter().filter(|o| !now.contains(&ObjectRef::from_obj(&***o))).cloned().collect()
}

/// Hands every event of `stream` to `handler`. During a relist the store keeps its old content until `InitDone`,
/// so `InitApply` events are not handed out one by one: at `InitDone` every listed object is handed over as
/// applied and every object that vanished during the gap as deleted, against the new store.
pub async fn drive<K>(
    what: &'static str,
    store: Store<K>,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    mut handler: impl FnMut(&K, Change) + Send,
) where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    futures::pin_mut!(stream);
    let mut before: Vec<Arc<K>> = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(o)) => handler(&o, Change::Applied),
            Ok(watcher::Event::Delete(o)) => handler(&o, Change::Deleted),
            Ok(watcher::Event::Init) => before = store.state(),
            Ok(watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                let gone = vanished(&before, &store);
                if !before.is_empty() {
                    tracing::info!(
                        watch = what,
                        vanished = gone.len(),
                        "relisted; re-checking what changed in the gap"
                    );
                }
                for o in &gone {
                    handler(o, Change::Deleted);
                }
                for o in store.state() {
                    handler(&o, Change::Applied);
                }
                before = Vec::new();
            }
            Err(e) => tracing::warn!(watch = what, error = %e, "watch error (retrying with backoff)"),
        }
    }
}

/// Whether `o` lies in namespace `ns` (without copying its namespace, as `ResourceExt::namespace` does: that copy
/// per cached object was a seventh of a table decision among 100 000 clients).
pub fn in_namespace<K: Resource>(o: &K, ns: &str) -> bool {
    o.meta().namespace.as_deref() == Some(ns)
}

/// How many objects of `store` match `pred`, without copying the matching objects' handles out of it.
pub fn count<K>(store: &Store<K>, pred: impl Fn(&K) -> bool) -> usize
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let n = std::cell::Cell::new(0);
    // The store only lends its objects to a predicate: count there, keep nothing.
    let _ = store.find(|o| {
        if pred(o) {
            n.set(n.get() + 1);
        }
        false
    });
    n.get()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    #[test]
    fn counts_and_namespaces_without_copies() {
        let mut w: reflector::store::Writer<Secret> = Default::default();
        for (ns, name) in [("a", "x"), ("a", "y"), ("b", "x"), ("ab", "z")] {
            let mut s = Secret::default();
            s.metadata.namespace = Some(ns.into());
            s.metadata.name = Some(name.into());
            w.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let store = w.as_reader();
        assert_eq!(count(&store, |s| in_namespace(s, "a")), 2);
        assert_eq!(count(&store, |s| in_namespace(s, "b")), 1);
        assert_eq!(count(&store, |s| in_namespace(s, "")), 0);
        assert_eq!(count(&store, |s| s.metadata.name.as_deref() == Some("x")), 2);
        assert!(!in_namespace(&Secret::default(), ""), "no namespace is not the empty namespace");
    }

    fn secret(type_: &str) -> Secret {
        let mut s = Secret {
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([("k".to_string(), ByteString(b"v".to_vec()))])),
            ..Default::default()
        };
        s.metadata.labels = Some(BTreeMap::from([(crate::keys::LABEL_API_KEY.to_string(), "true".to_string())]));
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
        let mut not_opted_in = secret("Opaque");
        not_opted_in.metadata.labels = None;
        trim_secret(&mut not_opted_in);
        assert!(not_opted_in.data.is_none());
    }

    #[test]
    fn watch_retries_are_capped_and_reset() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let delays: Vec<u128> = (0..6).map(|_| b.next().unwrap().as_millis()).collect();
        assert_eq!(delays, [100, 200, 250, 250, 250, 250]);
        b.reset();
        assert_eq!(b.next().unwrap().as_millis(), 100);
    }

    /// Errors wait their retry delay, a 410 Gone does not, an event resets the delays.
    #[tokio::test(start_paused = true)]
    async fn a_gone_relists_at_once_and_other_errors_wait() {
        let status = |code| {
            let mut s = kube::core::Status::failure("x", "y");
            s.code = code;
            watcher::Error::WatchError(Box::new(s))
        };
        let items = vec![Err(status(500)), Err(status(500)), Err(status(410)), Ok(1), Err(status(500)), Ok(2)];
        let mut s = std::pin::pin!(retrying(futures::stream::iter(items)));
        let t = tokio::time::Instant::now();
        let mut at = Vec::new();
        while let Some(item) = s.next().await {
            at.push((item.is_ok(), t.elapsed().as_millis()));
        }
        // 500 at 0, waits 100; 500 at 100, waits 200; 410 at 300, no wait; event at 300, reset; 500, waits 100.
        assert_eq!(at, [(false, 0), (false, 100), (false, 300), (true, 300), (false, 300), (true, 400)]);
    }

    #[test]
    fn cached_configmaps_drop_table_data() {
        let mut cm = ConfigMap {
            data: Some(BTreeMap::from([("shard.json".to_string(), "{}".to_string())])),
            ..Default::default()
        };
        trim_configmap(&mut cm);
        assert!(cm.data.is_none());
        assert_eq!(cm.metadata.annotations.unwrap()[CACHED_DATA_SHA256], super::super::publish::data_sha256("{}"));
    }

    fn named(name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("ns".into());
        cm
    }

    /// A relist that no longer has `b`: `b` is reported as deleted, `a` and `c` as applied, once the store is new.
    #[tokio::test]
    async fn relist_reports_objects_deleted_in_the_gap() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(named("a")),
            watcher::Event::InitApply(named("b")),
            watcher::Event::InitDone,
            // The gap: the watch broke, b was deleted and c created; the watcher relists.
            watcher::Event::Init,
            watcher::Event::InitApply(named("a")),
            watcher::Event::InitApply(named("c")),
            watcher::Event::InitDone,
        ];
        let stream = futures::stream::iter(events.into_iter().map(Ok)).map(move |ev| {
            if let Ok(ev) = &ev {
                writer.apply_watcher_event(ev);
            }
            ev
        });
        let mut seen = Vec::new();
        drive("test", store, stream, |cm: &ConfigMap, change| seen.push((cm.metadata.name.clone().unwrap(), change)))
            .await;
        seen[..2].sort();
        seen[2..].sort();
        let seen: Vec<(&str, Change)> = seen.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(
            seen,
            [
                ("a", Change::Applied),
                ("b", Change::Applied),
                ("a", Change::Applied),
                ("b", Change::Deleted),
                ("c", Change::Applied),
            ]
        );
    }
}
