//! Synthetic input for benchmarks (`cargo bench -p portcullis-controller --bench render`, `cargo xtask bench
//! scale`): one plan granting one Service and `n` clients with a key each, and the build + render the controller
//! does for them.

use crate::crd::*;
use crate::model::{SecretLookup, build_table, resolve_keys};
use portcullis_table::naming::{Slot, index_name};
use portcullis_table::shard::{MAX_SHARD_BYTES, Rendered, render};
use std::collections::HashMap;

/// One plan, `n` clients, and the Secret data (data key → key bytes) their keys live in.
pub fn fixture(n: usize) -> (Vec<UsagePlan>, Vec<ApiClient>, HashMap<String, Vec<u8>>) {
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
            network_policy: None,
        },
    );
    plan.metadata.namespace = Some("shop".into());
    plan.metadata.uid = Some("uid".into());
    let mut keys = HashMap::new();
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
                        generate: None,
                        expires_at: None,
                    }],
                    disabled: None,
                    certificates: vec![],
                    require_certificate: None,
                },
            );
            c.metadata.namespace = Some("shop".into());
            c.metadata.generation = Some(1);
            keys.insert(format!("k{i}"), format!("pcl_bench_key_{i:08}").into_bytes());
            c
        })
        .collect();
    (vec![plan], clients, keys)
}

/// What the controller does per reconcile of the Service: resolve keys (lookup + SHA-256), build the table, render
/// the sharded ConfigMap data.
pub fn build_and_render(plans: &[UsagePlan], clients: &[ApiClient], keys: &HashMap<String, Vec<u8>>) -> Rendered {
    let built = build_table("shop", "orders", plans, clients, |c| {
        resolve_keys(c, |_, k| keys.get(k).map_or(SecretLookup::KeyMissing, |v| SecretLookup::Found(v.clone()))).entries
    });
    render(&built.table, &index_name("orders"), Slot::A, 1, MAX_SHARD_BYTES).expect("renders")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_client() {
        let (plans, clients, keys) = fixture(50);
        let r = build_and_render(&plans, &clients, &keys);
        let shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
        let table = portcullis_table::shard::assemble(&r.index, &shards).expect("assembles");
        assert_eq!(table.clients.len(), 50);
    }
}
