//! Many ApiClients on one Service: several shards, each under the size limit, index consistent, and the burst
//! coalesced into a handful of renders (not one per client). 8 000 clients by default (2 shards, as in CI);
//! `PORTCULLIS_SCALE_CLIENTS=20000` for the figure docs/controller.md reports. Runs alone (`env_exclusive`), so its
//! load does not slow the other cluster tests.

use crate::common::*;
use futures::StreamExt;
use kube::api::{Api, PostParams};
use portcullis_controller::crd::*;
use portcullis_table::key_digest;
use portcullis_table::shard::MAX_SHARD_BYTES;
use portcullis_testkit::wait_for;
use std::time::{Duration, Instant};

const PER_SECRET: usize = 5_000;

/// How many ApiClients: `PORTCULLIS_SCALE_CLIENTS`, 8 000 unless set (at ≈ 172 bytes a client, two shards).
fn clients() -> usize {
    std::env::var("PORTCULLIS_SCALE_CLIENTS").map_or(8_000, |v| v.parse().expect("PORTCULLIS_SCALE_CLIENTS: a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_clients_are_sharded_consistently() {
    let n = clients();
    let env = env_exclusive("scale").await;
    let ctl = start_controller(&env, "scale-1").await;
    let salt = portcullis_testkit::random_hex(8);
    let key_of = |i: usize| format!("scale-{salt}-{i:05}");
    for s in 0..n.div_ceil(PER_SECRET) {
        let data: Vec<(String, String)> =
            (s * PER_SECRET..((s + 1) * PER_SECRET).min(n)).map(|i| (format!("k{i}"), key_of(i))).collect();
        let refs: Vec<(&str, &str)> = data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        create_secret(&env, &format!("keys-{s}"), &refs).await;
    }
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns)
        .create(
            &PostParams::default(),
            &UsagePlan::new(
                "bulk",
                UsagePlanSpec {
                    services: vec![ServiceGrant { name: "bulk-api".into(), routes: None }],
                    throttle: Some(ThrottleSpec { rate: 100, per: "1s".into(), burst: None }),
                    quota: None,
                    global_limits: None,
                    quota_scope: None,
                    on_store_unavailable: None,
                    network_policy: None,
                },
            ),
        )
        .await
        .unwrap();

    let started = Instant::now();
    let api: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let spec = client_spec(
                    &["bulk"],
                    &[&format!("10.{}.{}.0/24", i / 256 % 256, i % 256)],
                    &format!("keys-{}", i / PER_SECRET),
                    &format!("k{i}"),
                );
                let name = format!("client-{i:05}");
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &ApiClient::new(&name, spec.clone())).await {
                        Ok(_) => return,
                        Err(kube::Error::Api(e)) if e.code == 409 => return,
                        Err(e) if attempt < 4 => {
                            eprintln!("creating {name}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("creating {name}: {e}"),
                    }
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let created = started.elapsed();

    let (doc, table, shards) = wait_for(Duration::from_secs(900), &format!("table with {n} clients"), || async {
        let (doc, t, shards) = read_table(&env, "bulk-api").await?;
        (t.clients.len() == n && t.clients.iter().all(|c| c.keys.len() == 1)).then_some((doc, t, shards))
    })
    .await;
    let complete = started.elapsed();
    assert!(doc.shards.len() > 1, "{n} clients should need several shards, got {}", doc.shards.len());
    for cm in &shards {
        let data = &cm.data.as_ref().unwrap()["shard.json"];
        assert!(data.len() <= MAX_SHARD_BYTES, "shard {:?} is {} bytes", cm.metadata.name, data.len());
    }
    assert_eq!(doc.clients, n);
    assert_eq!(doc.shards.iter().map(|s| s.clients).sum::<usize>(), n);
    let probe = n * 5 / 8 - 1; // 12 344 of 20 000, 4 999 of 8 000
    let c = table.clients.iter().find(|c| c.id.ends_with(&format!("/client-{probe:05}"))).unwrap();
    assert_eq!(c.keys[0].sha256, key_digest(key_of(probe).as_bytes()));
    assert_eq!(c.source_ranges[0].to_string(), format!("10.{}.{}.0/24", probe / 256 % 256, probe % 256));

    let (_, metrics) = http_get(ctl.admin_addr, "/metrics").await.expect("metrics");
    let writes: f64 = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_controller_table_writes_total") && l.contains("bulk-api"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("table_writes metric");
    eprintln!(
        "{n} clients: created in {created:?}, complete table after {complete:?}, {} shards, {} bytes, {writes} table writes",
        doc.shards.len(),
        shards.iter().map(|c| c.data.as_ref().unwrap()["shard.json"].len()).sum::<usize>()
    );
    assert!(writes < 500.0, "burst not coalesced: {writes} table writes for {n} clients");
    ctl.stop().await.unwrap();
}
