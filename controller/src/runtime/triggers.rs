//! Triggers: which Services (tables) and which ApiClients (status) does one watch event touch?
//!
//! Pure functions over the caches and the rendered state: no I/O, unit-tested with reflector stores. The rule of
//! thumb is "over-approximate, never miss": a Service enqueued for nothing costs one GET of its index, a Service
//! missed keeps a table the user has changed (or revoked).
//!
//! Only spec changes count for UsagePlans and ApiClients ([`SpecSeen`]): the controller's own status patches come
//! back as watch events and must not re-render every client of a plan.

use super::caches::Change;
use super::caches::in_namespace;
use super::index::Index;
use super::rendered::{Rendered, ServiceKey};
use crate::crd::{ApiClient, UsagePlan};
use crate::model::grants;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use portcullis_table::naming::LABEL_SERVICE;
use std::collections::{BTreeSet, HashMap};

/// What an event asks for: tables to re-render and ApiClients whose status to recompute.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Triggers {
    pub services: BTreeSet<ServiceKey>,
    /// `(namespace, name)` of ApiClients.
    pub clients: BTreeSet<(String, String)>,
}

impl Triggers {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.clients.is_empty()
    }

    fn client(&mut self, c: &ApiClient) {
        self.clients.insert((c.namespace().unwrap_or_default(), c.name_any()));
    }

    pub fn client_refs(&self) -> impl Iterator<Item = ObjectRef<ApiClient>> + '_ {
        self.clients.iter().map(|(ns, n)| ObjectRef::new(n).within(ns))
    }
}

/// The caches and rendered state the triggers read.
pub struct View<'a> {
    pub plans: &'a Store<UsagePlan>,
    pub clients: &'a Store<ApiClient>,
    /// ApiClients by the Secrets they read (never behind `clients`).
    pub secret_readers: &'a Index<ApiClient>,
    pub rendered: &'a Rendered,
}

impl View<'_> {
    /// Whether some UsagePlan in `ns` names Service `name`, or this controller has a table for it.
    fn granted_or_rendered(&self, ns: &str, name: &str) -> bool {
        self.rendered.contains_key(&ServiceKey::new(ns, name))
            || self.plans.find(|p| in_namespace(p, ns) && grants(p, name)).is_some()
    }

    /// Services whose table may change with `client`: those its plans grant now, and those it is in now.
    pub fn services_of_client(&self, client: &ApiClient) -> BTreeSet<ServiceKey> {
        let ns = client.namespace().unwrap_or_default();
        let name = client.name_any();
        let mut out = BTreeSet::new();
        for p in &client.spec.usage_plans {
            if let Some(plan) = self.plans.get(&ObjectRef::new(p).within(&ns)) {
                out.extend(plan.spec.services.iter().map(|s| ServiceKey::new(&ns, &s.name)));
            }
        }
        out.extend(
            self.rendered
                .iter()
                .filter(|(k, st)| k.namespace == ns && (st.clients.contains(&name) || st.excluded.contains_key(&name)))
                .map(|(k, _)| k.clone()),
        );
        out
    }
}

/// A UsagePlan changed: the Services it names, the Services whose table it is in (it may have stopped naming them
/// or become invalid), and the ApiClients that name it.
pub fn plan_changed(v: &View, plan: &UsagePlan) -> Triggers {
    let ns = plan.namespace().unwrap_or_default();
    let name = plan.name_any();
    let mut t = Triggers::default();
    t.services.extend(plan.spec.services.iter().map(|s| ServiceKey::new(&ns, &s.name)));
    t.services.extend(
        v.rendered.iter().filter(|(k, st)| k.namespace == ns && st.plans.contains_key(&name)).map(|(k, _)| k.clone()),
    );
    for c in v.clients.state_filter(|c| in_namespace(c, &ns) && c.spec.usage_plans.contains(&name)) {
        t.client(&c);
    }
    t
}

/// An ApiClient changed: the Services its plans grant or whose table it is in, and itself.
pub fn client_changed(v: &View, client: &ApiClient) -> Triggers {
    let mut t = Triggers { services: v.services_of_client(client), ..Default::default() };
    t.client(client);
    t
}

/// A Secret changed: every ApiClient that reads a key from it, and their Services. The index names them (a walk
/// over every ApiClient per Secret event was quadratic in a namespace of generated keys); each is read from the
/// store and checked again.
pub fn secret_changed(v: &View, secret: &Secret) -> Triggers {
    let ns = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    let mut t = Triggers::default();
    for reader in v.secret_readers.lookup(&ns, &name) {
        if let Some(c) = v.clients.get(&ObjectRef::new(&reader).within(&ns))
            && uses_secret(&c, &name)
        {
            t.services.extend(v.services_of_client(&c));
            t.client(&c);
        }
    }
    t
}

/// Whether `client` reads key material from Secret `secret` (same namespace assumed).
pub fn uses_secret(client: &ApiClient, secret: &str) -> bool {
    crate::keys::uses_secret(client, secret)
}

/// A Service changed (exposure, NetworkPolicy selector, whether a deny-all table is still needed).
pub fn service_changed(v: &View, svc: &Service) -> Triggers {
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    let mut t = Triggers::default();
    if v.granted_or_rendered(&ns, &name) {
        t.services.insert(ServiceKey::new(ns, name));
    }
    t
}

/// An opted-in Pod changed: the sidecar RoleBinding of its Service lists its ServiceAccount.
pub fn pod_changed(v: &View, pod: &Pod) -> Triggers {
    let ns = pod.namespace().unwrap_or_default();
    let mut t = Triggers::default();
    if let Some(name) = pod.annotations().get(crate::webhook::inject::ANNOTATION_SERVICE)
        && v.granted_or_rendered(&ns, name)
    {
        t.services.insert(ServiceKey::new(ns.clone(), name.clone()));
        // Clients that need certificates: whether this pod's sidecar verifies them (`CertificatesVerifiable`).
        let needs = |c: &ApiClient| !c.spec.certificates.is_empty() || c.spec.require_certificate == Some(true);
        for c in v.clients.state_filter(|c| needs(c) && in_namespace(c, &ns)) {
            if v.services_of_client(&c).iter().any(|k| &k.name == name) {
                t.client(&c);
            }
        }
    }
    t
}

/// A NetworkPolicy changed: ours (re-applied if edited or deleted) or someone else's (isolation re-checked for
/// `Exposure`). Every Service of the namespace with a table is looked at again (unchanged ones cost a few GETs).
pub fn network_policy_changed(v: &View, np: &NetworkPolicy) -> Triggers {
    let ns = np.namespace().unwrap_or_default();
    let services = v.rendered.keys().filter(|k| k.namespace == ns).cloned().collect();
    Triggers { services, ..Default::default() }
}

/// A table ConfigMap changed (by us, or by someone else: a deleted or edited shard is repaired).
pub fn configmap_changed(cm: &ConfigMap) -> Triggers {
    labelled_changed(cm)
}

/// An object labelled with a Service changed (a table ConfigMap, sidecar Role or RoleBinding): by us, or by
/// someone else, whose deletion or edit is then repaired.
pub fn labelled_changed<K: ResourceExt>(obj: &K) -> Triggers {
    let mut t = Triggers::default();
    if let (Some(ns), Some(svc)) = (obj.namespace(), obj.labels().get(LABEL_SERVICE)) {
        t.services.insert(ServiceKey::new(ns, svc.clone()));
    }
    t
}

/// Generations of the UsagePlans or ApiClients seen so far, to tell spec changes from status and metadata ones.
#[derive(Debug, Default)]
pub struct SpecSeen {
    seen: HashMap<(String, String, String), i64>,
}

impl SpecSeen {
    /// Whether this event may change what the object asks for: it is new, deleted, or its generation moved.
    /// (The generation of custom resources with a status subresource changes with the spec only.)
    pub fn spec_changed<K: ResourceExt>(&mut self, obj: &K, change: Change) -> bool {
        let key = (obj.namespace().unwrap_or_default(), obj.name_any(), obj.uid().unwrap_or_default());
        match change {
            Change::Deleted => {
                self.seen.remove(&key);
                true
            }
            Change::Applied => {
                let generation = obj.meta().generation.unwrap_or(0);
                self.seen.insert(key, generation) != Some(generation)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ApiClientSpec, KeySpec, SecretKeyRef, ServiceGrant, UsagePlanSpec};
    use crate::runtime::rendered::ServiceState;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    const NS: &str = "shop";

    fn plan(name: &str, services: &[&str]) -> UsagePlan {
        let mut p = UsagePlan::new(
            name,
            UsagePlanSpec {
                services: services.iter().map(|s| ServiceGrant { name: s.to_string(), routes: None }).collect(),
                throttle: None,
                quota: None,
                global_limits: None,
                quota_scope: None,
                on_store_unavailable: None,
                network_policy: None,
            },
        );
        p.metadata.namespace = Some(NS.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.generation = Some(1);
        p
    }

    fn client(name: &str, plans: &[&str], secret: &str) -> ApiClient {
        let mut c = ApiClient::new(
            name,
            ApiClientSpec {
                usage_plans: plans.iter().map(|s| s.to_string()).collect(),
                source_ranges: vec![],
                keys: vec![KeySpec {
                    name: None,
                    secret_ref: Some(SecretKeyRef { name: secret.into(), key: "k".into() }),
                    generate: None,
                    expires_at: None,
                }],
                disabled: None,
                certificates: vec![],
                require_certificate: None,
            },
        );
        c.metadata.namespace = Some(NS.into());
        c.metadata.generation = Some(1);
        c
    }

    /// The index of who reads which Secret, as the watch would have filled it for `clients`.
    fn readers(clients: &Store<ApiClient>) -> Index<ApiClient> {
        let ix = Index::new(crate::keys::secret_names);
        for c in clients.state() {
            ix.observe(&kube::runtime::watcher::Event::Apply((*c).clone()));
        }
        ix
    }

    fn store<K>(objs: Vec<K>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let mut w: Writer<K> = Writer::default();
        w.apply_watcher_event(&Event::Init);
        for o in objs {
            w.apply_watcher_event(&Event::InitApply(o));
        }
        w.apply_watcher_event(&Event::InitDone);
        w.as_reader()
    }

    fn rendered(entries: &[(&str, &[&str], &[&str])]) -> Rendered {
        entries
            .iter()
            .map(|(svc, plans, clients)| {
                let st = ServiceState {
                    plans: plans.iter().map(|p| (p.to_string(), (format!("uid-{p}"), 1))).collect(),
                    clients: clients.iter().map(|c| (c.to_string(), 1)).collect(),
                    ..Default::default()
                };
                (ServiceKey::new(NS, *svc), st)
            })
            .collect()
    }

    fn services(t: &Triggers) -> Vec<&str> {
        t.services.iter().map(|k| k.name.as_str()).collect()
    }

    fn clients(t: &Triggers) -> Vec<&str> {
        t.clients.iter().map(|(_, n)| n.as_str()).collect()
    }

    #[test]
    fn a_plan_that_stops_naming_a_service_still_touches_its_table() {
        let plans = store(vec![plan("gold", &["orders"])]);
        let cls = store(vec![client("acme", &["gold"], "s"), client("other", &["silver"], "s")]);
        let r = rendered(&[("orders", &["gold"], &["acme"]), ("billing", &["gold"], &["acme"]), ("x", &["p"], &[])]);
        let ix = readers(&cls);
        let v = View { plans: &plans, clients: &cls, secret_readers: &ix, rendered: &r };
        let t = plan_changed(&v, &plan("gold", &["orders"]));
        assert_eq!(services(&t), ["billing", "orders"]);
        assert_eq!(clients(&t), ["acme"]);
        // Deleted plan (the event carries its last state): same Services.
        let t = plan_changed(&v, &plan("gold", &[]));
        assert_eq!(services(&t), ["billing", "orders"]);
    }

    #[test]
    fn a_client_touches_the_services_of_its_plans_and_the_tables_it_is_in() {
        let plans = store(vec![plan("gold", &["orders", "billing"]), plan("silver", &["search"])]);
        let cls = store(vec![]);
        let r = rendered(&[("legacy", &["old"], &["acme"]), ("search", &["silver"], &[])]);
        let ix = readers(&cls);
        let v = View { plans: &plans, clients: &cls, secret_readers: &ix, rendered: &r };
        let t = client_changed(&v, &client("acme", &["gold", "missing"], "s"));
        assert_eq!(services(&t), ["billing", "legacy", "orders"]);
        assert_eq!(clients(&t), ["acme"]);
    }

    #[test]
    fn a_secret_touches_only_the_clients_reading_it() {
        let plans = store(vec![plan("gold", &["orders"]), plan("silver", &["search"])]);
        let cls = store(vec![client("acme", &["gold"], "acme-key"), client("beta", &["silver"], "beta-key")]);
        let r = Rendered::new();
        let ix = readers(&cls);
        let v = View { plans: &plans, clients: &cls, secret_readers: &ix, rendered: &r };
        let mut s = Secret::default();
        s.metadata.name = Some("acme-key".into());
        s.metadata.namespace = Some(NS.into());
        let t = secret_changed(&v, &s);
        assert_eq!(services(&t), ["orders"]);
        assert_eq!(clients(&t), ["acme"]);
        s.metadata.namespace = Some("elsewhere".into());
        assert!(secret_changed(&v, &s).is_empty());
        // The index ahead of the store (acme's new spec filed, not yet stored): the stored object decides.
        ix.observe(&kube::runtime::watcher::Event::Apply(client("beta", &["silver"], "acme-key")));
        s.metadata.namespace = Some(NS.into());
        assert_eq!(clients(&secret_changed(&v, &s)), ["acme"], "beta's stored spec reads beta-key");
        let beta_moved = store(vec![client("acme", &["gold"], "acme-key"), client("beta", &["silver"], "acme-key")]);
        let v = View { plans: &plans, clients: &beta_moved, secret_readers: &ix, rendered: &r };
        assert_eq!(clients(&secret_changed(&v, &s)), ["acme", "beta"]);
        assert_eq!(services(&secret_changed(&v, &s)), ["orders", "search"]);
    }

    #[test]
    fn services_and_pods_matter_only_when_granted_or_rendered() {
        let plans = store(vec![plan("gold", &["orders"])]);
        let cls = store(vec![]);
        let r = rendered(&[("revoked", &[], &[])]);
        let ix = readers(&cls);
        let v = View { plans: &plans, clients: &cls, secret_readers: &ix, rendered: &r };
        let svc = |n: &str| {
            let mut s = Service::default();
            s.metadata.name = Some(n.into());
            s.metadata.namespace = Some(NS.into());
            s
        };
        assert_eq!(services(&service_changed(&v, &svc("orders"))), ["orders"]);
        assert_eq!(services(&service_changed(&v, &svc("revoked"))), ["revoked"]);
        assert!(service_changed(&v, &svc("unrelated")).is_empty());
        let mut pod = Pod::default();
        pod.metadata.namespace = Some(NS.into());
        pod.metadata.annotations = Some(
            [(crate::webhook::inject::ANNOTATION_SERVICE.to_string(), "orders".to_string())].into_iter().collect(),
        );
        assert_eq!(services(&pod_changed(&v, &pod)), ["orders"]);
    }

    #[test]
    fn a_table_configmap_touches_its_service() {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some(NS.into());
        cm.metadata.labels = Some([(LABEL_SERVICE.to_string(), "orders".to_string())].into_iter().collect());
        assert_eq!(services(&configmap_changed(&cm)), ["orders"]);
        cm.metadata.labels = None;
        assert!(configmap_changed(&cm).is_empty());
    }

    #[test]
    fn status_patches_are_not_spec_changes() {
        let mut seen = SpecSeen::default();
        let mut p = plan("gold", &["orders"]);
        assert!(seen.spec_changed(&p, Change::Applied), "first sight");
        p.status = Some(Default::default());
        assert!(!seen.spec_changed(&p, Change::Applied), "status only: same generation");
        p.metadata.generation = Some(2);
        assert!(seen.spec_changed(&p, Change::Applied), "spec edit");
        assert!(seen.spec_changed(&p, Change::Deleted));
        assert!(seen.spec_changed(&p, Change::Applied), "re-created under the same name");
    }
}
