//! API mode against a real kube-apiserver (portcullis-testkit): the sidecar reads its index + shard ConfigMaps
//! with its own ServiceAccount token, limited by RBAC `resourceNames`.

use crate::common::cluster::*;
use crate::common::*;
use crate::faults::counter;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use portcullis_table::key_digest;
use portcullis_table::naming::Slot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_from_configmaps_with_least_privilege() {
    let k = Cluster::new("proxy-api").await;

    // The ServiceAccount cannot read any other ConfigMap.
    k.put("not-yours", "secret.txt", "nope").await;
    let sa_cms: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(k.sidecar.clone()).unwrap(), &k.ns);
    match sa_cms.get("not-yours").await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("reading another ConfigMap should be forbidden, got {other:?}"),
    }

    let (up, seen) = upstream().await;
    let proxy = start(k.proxy_config(up, None)).await;
    let admin = proxy.admin_addr.unwrap();

    // Fail closed before any table; /readyz says why.
    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.reason(), "no_table");
    let ready = get(ip(1), admin, "/readyz", &[]).await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.starts_with("no table loaded yet"), "{}", ready.body);

    // Revision 1.
    let t1 = sharded_table(&[], false);
    k.publish(&t1, Slot::A, 1, None).await;
    wait_until("revision 1 applied", || proxy.tables.revision().as_deref() == Some(t1.revision.as_str())).await;
    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(seen.last()["x-portcullis-client"], "t/reader");
    let ready = get(ip(1), admin, "/readyz", &[]).await;
    // The first line; a second one notes that the table's quota plan (scope Global by default) is counted per
    // replica, this proxy having no --store-url.
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body.lines().next(), Some(format!("ok revision {} sequence 1", t1.revision).as_str()));
    assert!(ready.body.contains("store: not configured"), "{}", ready.body);

    // Revision 2 in the other slot: reader revoked, a new client added.
    let t2 = sharded_table(&["k-fresh"], true);
    k.publish(&t2, Slot::B, 2, None).await;
    wait_until("revision 2 applied", || proxy.tables.revision().as_deref() == Some(t2.revision.as_str())).await;
    assert_eq!(get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 401);
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-fresh")]).await.status, 200);
    // Only the shards whose content changed were read (the index names each shard's digest); the rest were kept.
    let (r1, r2) = (render_in(&t1, Slot::A, 1), render_in(&t2, Slot::B, 2));
    let n = r1.index.shards.len();
    assert!(n >= 4, "the table spans several shards: {n}");
    let changed = r1.index.shards.iter().zip(&r2.index.shards).filter(|(a, b)| a.sha256 != b.sha256).count();
    assert!((1..=2).contains(&changed), "{changed} of {n} shards changed");
    let m = proxy.metrics.encode();
    assert_eq!(counter(&m, "portcullis_proxy_table_shards_total{shards=\"read\"} "), (n + changed) as u64, "{m}");
    assert_eq!(counter(&m, "portcullis_proxy_table_shards_total{shards=\"reused\"} "), (n - changed) as u64, "{m}");

    // Revision 3 with a shard that does not match its digest: rejected, revision 2 keeps serving.
    let t3 = sharded_table(&["k-third"], true);
    // (Corrupt a shard the proxy must read: the one that changed.)
    let changed = portcullis_table::shard::shard_of("t/k-third", n);
    k.publish(&t3, Slot::A, 3, Some(changed)).await;
    wait_until("corrupt revision rejected", || {
        proxy.metrics.encode().contains("portcullis_proxy_tables_rejected_total{source=\"configmap\"} 1")
    })
    .await;
    assert_eq!(proxy.tables.revision().as_deref(), Some(t2.revision.as_str()));
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-fresh")]).await.status, 200);
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-third")]).await.status, 401);
    assert!(t3.clients.iter().any(|c| c.keys[0].sha256 == key_digest(b"k-third")));
    assert!(proxy.tables.is_ready());

    // Repairing the shard (the index is unchanged, so no watch event) applies revision 3 on the periodic retry.
    k.publish(&t3, Slot::A, 3, None).await;
    wait_until("revision 3 applied", || proxy.tables.revision().as_deref() == Some(t3.revision.as_str())).await;
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-third")]).await.status, 200);

    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}
