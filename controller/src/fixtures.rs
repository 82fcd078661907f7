//! Synthetic input for benchmarks (`cargo bench -p portcullis-controller --bench render`, `cargo xtask bench
//! scale`): one plan granting one Service and `n` clients with a key each, and the build + render the controller
//! does for them.

use crate::crd::*;
use crate::keys::{LABEL_API_KEY, resolve_keys};
use crate::model::build_table;
use crate::runtime::tables::decide;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portcullis_table::Table;
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
/// remembered); client 0's `sourceRanges` then changed. [`Change::reconcile`] is the controller's work for it.
pub struct Change {
    plans: Vec<Arc<UsagePlan>>,
    clients: Vec<Arc<ApiClient>>,
    keys: Secret,
    index: IndexDoc,
    table: Table,
}

impl Change {
    pub fn new(n: usize) -> Self {
        let (plans, mut clients, keys) = fixture(n);
        let plans: Vec<Arc<UsagePlan>> = plans.into_iter().map(Arc::new).collect();
        let before: Vec<Arc<ApiClient>> = clients.iter().cloned().map(Arc::new).collect();
        let built = Self::decide_with(&plans, &before, &keys);
        let index = render(&built, &index_name("orders"), Previous::NONE, 1, MAX_SHARD_BYTES).expect("renders").index;
        clients[0].spec.source_ranges = vec!["192.0.2.0/24".into()];
        clients[0].metadata.generation = Some(2);
        Self { plans, clients: clients.into_iter().map(Arc::new).collect(), keys, index, table: built }
    }

    fn decide_with(plans: &[Arc<UsagePlan>], clients: &[Arc<ApiClient>], keys: &Secret) -> Table {
        let keys_of = |c: &ApiClient| resolve_keys(c, |name| (name == "keys").then_some(keys)).entries;
        decide("shop", "orders", plans, clients, keys_of, None, false, MAX_SHARD_BYTES, false).expect("granted").table
    }

    /// Resolve keys, build the table and check each client's size (`decide`), render against the table in force:
    /// what a reconcile of the Service costs before its API writes. Returns the shards to write.
    pub fn reconcile(&self) -> Rendered {
        let table = Self::decide_with(&self.plans, &self.clients, &self.keys);
        let previous = Previous::of(Some(&self.index), Some(&self.table));
        render(&table, &index_name("orders"), previous, 2, MAX_SHARD_BYTES).expect("renders")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_to_one_client_writes_one_shard() {
        let c = Change::new(20_000);
        let r = c.reconcile();
        assert!(r.index.shards.len() > 1);
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
