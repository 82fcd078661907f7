//! Table build + render for one Service with 1 000 / 10 000 / 100 000 clients.
//! Run: `cargo bench -p portcullis-controller --bench render`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use portcullis_controller::crd::*;
use portcullis_controller::model::{SecretLookup, build_table, resolve_keys};
use portcullis_table::naming::{Slot, index_name};
use portcullis_table::shard::{MAX_SHARD_BYTES, render};
use std::collections::HashMap;
use std::hint::black_box;

/// One plan, `n` clients, and the Secret data (data key → key bytes) their keys live in.
fn fixture(n: usize) -> (Vec<UsagePlan>, Vec<ApiClient>, HashMap<String, Vec<u8>>) {
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

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("build_and_render");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        let (plans, clients, keys) = fixture(n);
        let run = || {
            // Keys are resolved (looked up + SHA-256) on every render, as the controller does from its Secret cache.
            let built = build_table("shop", "orders", &plans, &clients, |c| {
                resolve_keys(c, |_, k| keys.get(k).map_or(SecretLookup::KeyMissing, |v| SecretLookup::Found(v.clone())))
                    .entries
            });
            render(&built.table, &index_name("orders"), Slot::A, MAX_SHARD_BYTES).expect("renders")
        };
        let r = run();
        let bytes: usize = r.shards.iter().map(|(_, s)| s.len()).sum::<usize>() + r.index_json.len();
        eprintln!("{n} clients: {} shards, {bytes} bytes, {:.1} bytes/client", r.shards.len(), bytes as f64 / n as f64);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| b.iter(|| black_box(run())));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
