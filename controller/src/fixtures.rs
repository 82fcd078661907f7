//! Synthetic input for benchmarks (`cargo bench -p portcullis-controller --bench render`, `cargo xtask bench
//! scale`): one plan granting one Service and `n` clients with a key each, and the build + render the controller
//! does for them.

use crate::crd::*;
use crate::keys::{LABEL_API_KEY, resolve_keys};
use crate::memo::TableMemo;
use crate::model::build_table;
use crate::runtime::tables::{Desired, decide};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portcullis_table::naming::index_name;
use portcullis_table::shard::{IndexDoc, MAX_SHARD_BYTES, Previous, Rendered, render};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One plan, `n` clients, and the (opted-in) Secret `keys` their keys live in (data key `k<i>`).
pub fn fixture(n: usize) -> (Vec<UsagePlan>, Vec<ApiClient>, Secret) {
    let mut plan = UsagePlan::new(
        "gold",
        UsagePlanSpec {
            services: vec![ServiceGrant {
                name: "orders".into(),
                routes: Some(vec![RouteSpec { path_prefix: "/v1".into(), methods: Some(vec!["GET".into()]) }]),
            }],
            throttle: Some(ThrottleSpec { rate: 100, per: "1s".into(), burst: Some(200) }),
            quota: Some(QuotaSpec { limit: 100_000, period: QuotaPeriod::Month }),
            global_limits: None,
            quota_scope: None,
            on_store_unavailable: None,
            network_policy: None,
        },
    );
    plan.metadata.namespace = Some("shop".into());
    plan.metadata.uid = Some("uid".into());
    let mut keys = BTreeMap::new();
    let clients = (0..n)
        .map(|i| {
            let name = format!("client-{i:06}");
            let mut c = ApiClient::new(
                &name,
                ApiClientSpec {
                    usage_plans: vec!["gold".into()],
                    source_ranges: vec![format!("10.{}.{}.0/24", i / 65536 % 256, i / 256 % 256)],
                    keys: vec![KeySpec {
                        secret_ref: Some(SecretKeyRef { name: "keys".into(), key: format!("k{i}") }),
                        ..Default::default()
                    }],
                    disabled: None,
                    certificates: vec![],
                    require_certificate: None,
                },
            );
            c.metadata.namespace = Some("shop".into());
            c.metadata.generation = Some(1);
            c.metadata.uid = Some(format!("uid-{i}"));
            keys.insert(format!("k{i}"), ByteString(format!("pcl_bench_key_{i:08}").into_bytes()));
            c
        })
        .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("keys".into()),
            namespace: Some("shop".into()),
            labels: Some(BTreeMap::from([(LABEL_API_KEY.to_string(), "true".to_string())])),
            ..Default::default()
        },
        data: Some(keys),
        ..Default::default()
    };
    (vec![plan], clients, secret)
}

/// What the controller does per reconcile of the Service: resolve keys (lookup + SHA-256), build the table, render
/// the sharded ConfigMap data.
pub fn build_and_render(plans: &[UsagePlan], clients: &[ApiClient], keys: &Secret) -> Rendered {
    let built = build_table("shop", "orders", plans, clients, |c| {
        resolve_keys(c, |name| (name == "keys").then_some(keys)).entries
    });
    render(&built.table, &index_name("orders"), Previous::NONE, 1, MAX_SHARD_BYTES).expect("renders")
}

/// One change to one client of `n`, as the controller reconciles it: the table in force was rendered (and is
/// remembered, with what its build keeps: [`crate::memo`]); client 0's `sourceRanges` then changed.
/// [`Change::reconcile`] is the controller's work for it.
pub struct Change {
    plans: Vec<Arc<UsagePlan>>,
    clients: Vec<Arc<ApiClient>>,
    keys: Arc<Secret>,
    index: IndexDoc,
    memo: Arc<TableMemo>,
}

impl Change {
    pub fn new(n: usize) -> Self {
        let (plans, clients, keys) = fixture(n);
        let plans: Vec<Arc<UsagePlan>> = plans.into_iter().map(Arc::new).collect();
        let mut clients: Vec<Arc<ApiClient>> = clients.into_iter().map(Arc::new).collect();
        let keys = Arc::new(keys);
        let before = Self::decide_with(&plans, &clients, &keys, None);
        let memo = before.memo.expect("a granted table keeps a memo");
        let index =
            render(&memo.table, &index_name("orders"), Previous::NONE, 1, MAX_SHARD_BYTES).expect("renders").index;
        // The reflector hands out a new object for the changed client; the others stay the same objects.
        let mut changed = (*clients[0]).clone();
        changed.spec.source_ranges = vec!["192.0.2.0/24".into()];
        changed.metadata.generation = Some(2);
        clients[0] = Arc::new(changed);
        Self { plans, clients, keys, index, memo }
    }

    fn decide_with(
        plans: &[Arc<UsagePlan>],
        clients: &[Arc<ApiClient>],
        keys: &Arc<Secret>,
        memo: Option<&TableMemo>,
    ) -> Desired {
        let lookup = |name: &str| (name == "keys").then(|| keys.clone());
        decide("shop", "orders", plans, clients, lookup, memo, None, false, MAX_SHARD_BYTES, false).expect("granted")
    }

    /// Resolve keys, build the table and check each client's size (`decide`, reusing the previous build's memo),
    /// render against the table in force: what a reconcile of the Service costs before its API writes. Returns the
    /// shards to write and the new table (the controller keeps it for the next change, and drops the previous
    /// one only after its writes).
    pub fn reconcile(&self) -> (Rendered, Desired) {
        let desired = Self::decide_with(&self.plans, &self.clients, &self.keys, Some(&self.memo));
        let previous =
            Previous { changed: desired.changed.as_deref(), ..Previous::of(Some(&self.index), Some(&self.memo.table)) };
        let rendered = render(&desired.table, &index_name("orders"), previous, 2, MAX_SHARD_BYTES).expect("renders");
        (rendered, desired)
    }
}

/// The controller's caches as the propagation bench fills them: `n` ApiClients `b<i>` deserialised one by one (as
/// the watcher does, so they lie scattered in memory) into a reflector store whose iteration order is its hash
/// order, keys in Secrets of 5 000 keys each, looked up by `ObjectRef` as `reconcile_service` does.
/// [`Cached::decide`] is `reconcile_service`'s build of the table; [`Cached::change`] replaces one client.
pub struct Cached {
    plans: kube::runtime::reflector::store::Writer<UsagePlan>,
    clients: kube::runtime::reflector::store::Writer<ApiClient>,
    secrets: kube::runtime::reflector::store::Writer<Secret>,
}

impl Cached {
    const PER_SECRET: usize = 5_000;

    pub fn new(n: usize) -> Self {
        use kube::runtime::watcher::Event;
        let (plans, _, _) = fixture(0);
        let mut me = Self { plans: Default::default(), clients: Default::default(), secrets: Default::default() };
        for p in plans {
            me.plans.apply_watcher_event(&Event::Apply(p));
        }
        for s in 0..n.div_ceil(Self::PER_SECRET) {
            let data: BTreeMap<String, String> = (s * Self::PER_SECRET..((s + 1) * Self::PER_SECRET).min(n))
                .map(|i| (format!("k{i}"), base64_of(&format!("pcl_bench_key_{i:08}"))))
                .collect();
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("bulk-{s}"), "namespace": "shop", "uid": format!("s{s}"),
                             "labels": {LABEL_API_KEY: "true"}},
                "type": "Opaque", "data": data,
            }))
            .expect("a Secret");
            me.secrets.apply_watcher_event(&Event::Apply(secret));
        }
        for i in 0..n {
            me.change(i, 1);
        }
        me
    }

    /// Client `b<i>` as the API server would send it at `generation`.
    pub fn change(&mut self, i: usize, generation: i64) {
        let c: ApiClient = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiClient",
            "metadata": {"name": format!("b{i}"), "namespace": "shop", "uid": format!("00000000-0000-0000-0000-{i:012}"),
                         "generation": generation, "resourceVersion": format!("{}", 1000 + i),
                         "creationTimestamp": "2026-12-03T10:00:00Z"},
            "spec": {"usagePlans": ["gold"],
                     "sourceRanges": [format!("10.{}.{}.0/24", i / 256 % 256, (i + generation as usize) % 256)],
                     "keys": [{"secretRef": {"name": format!("bulk-{}", i / Self::PER_SECRET), "key": format!("k{i}")}}]}
        }))
        .expect("an ApiClient");
        self.clients.apply_watcher_event(&kube::runtime::watcher::Event::Apply(c));
    }

    /// Client objects scattered as the running controller's lie after 20 minutes of a bulk load: every client
    /// replaced in a shuffled order (a fixed permutation), each followed by an allocation of 1–8 KiB that stays alive
    /// (returned: the caller keeps it), so consecutive clients of the table lie on different pages.
    pub fn scatter(&mut self) -> Vec<Vec<u8>> {
        let reader = self.clients.as_reader();
        let mut all = reader.state();
        // A fixed permutation (multiplicative, n-independent stride) rather than a seeded RNG: repeatable.
        let n = all.len();
        let stride = (0..).map(|k| 7919 + k).find(|s| gcd(*s, n.max(1)) == 1).expect("a stride");
        let mut filler = Vec::with_capacity(n);
        for k in 0..n {
            let c = (*all[(k * stride) % n]).clone();
            self.clients.apply_watcher_event(&kube::runtime::watcher::Event::Apply(c));
            filler.push(vec![k as u8; 1024 + (k * 2654435761) % 7168]);
        }
        all.clear();
        filler
    }

    /// Every client's status written, as the controller does after a bulk load: each object replaced by a new one
    /// of the same spec and generation (allocated now, scattered among what was allocated before).
    pub fn write_statuses(&mut self) {
        let reader = self.clients.as_reader();
        for c in reader.state() {
            let mut c = (*c).clone();
            c.status = Some(
                serde_json::from_value(serde_json::json!({"observedGeneration": c.metadata.generation,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Enforced", "message": "enforced",
                                "lastTransitionTime": "2026-12-03T10:00:01Z"}]}))
                .expect("a status"),
            );
            self.clients.apply_watcher_event(&kube::runtime::watcher::Event::Apply(c));
        }
    }

    /// What `reconcile_service` decides for Service `shop/orders` from the caches, given the previous build's memo.
    pub fn decide(&self, memo: Option<&TableMemo>) -> Desired {
        use kube::runtime::reflector::ObjectRef;
        let (plans, clients, secrets) = (self.plans.as_reader(), self.clients.as_reader(), self.secrets.as_reader());
        let plans = plans.state_filter(|p| crate::runtime::caches::in_namespace(p, "shop"));
        let clients = clients.state_filter(|c| crate::runtime::caches::in_namespace(c, "shop"));
        let lookup = |name: &str| secrets.get(&ObjectRef::new(name).within("shop"));
        decide("shop", "orders", &plans, &clients, lookup, memo, None, false, MAX_SHARD_BYTES, false).expect("granted")
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_to_one_client_writes_one_shard() {
        let c = Change::new(20_000);
        let (r, desired) = c.reconcile();
        assert!(r.index.shards.len() > 1);
        // What the memo reused is what a build from scratch gives.
        let fresh = Change::decide_with(&c.plans, &c.clients, &c.keys, None);
        assert_eq!(desired.table, fresh.table);
        assert_eq!(r.shards.len(), 1, "one shard written");
        assert!(r.shards[0].1.contains("192.0.2.0/24"));
    }

    #[test]
    fn renders_every_client() {
        let (plans, clients, keys) = fixture(50);
        let r = build_and_render(&plans, &clients, &keys);
        let shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
        let table = portcullis_table::shard::assemble(&r.index, &shards).expect("assembles");
        assert_eq!(table.clients.len(), 50);
    }
}
