//! Synthetic input for benchmarks (`cargo bench -p portcullis-controller --bench render`, `cargo xtask bench
//! scale`): one plan granting one Service and `n` clients with a key each, and the build + render the controller
//! does for them.

use crate::crd::*;
use crate::keys::{LABEL_API_KEY, resolve_keys};
use crate::model::build_table;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portcullis_table::naming::index_name;
use portcullis_table::shard::{MAX_SHARD_BYTES, Previous, Rendered, render};
use std::collections::BTreeMap;

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
