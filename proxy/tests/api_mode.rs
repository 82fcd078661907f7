//! API mode against a real kube-apiserver (portcullis-testkit): the sidecar reads its index + shard ConfigMaps
//! with its own ServiceAccount token, limited by RBAC `resourceNames`.

mod common;

use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use portcullis_proxy::{Config, TableSource};
use portcullis_table::naming::{INDEX_DATA_KEY, SHARD_DATA_KEY, Slot, all_names, index_name};
use portcullis_table::shard::render;
use portcullis_table::{Table, key_digest};
use portcullis_testkit::ControlPlane;
use std::collections::BTreeMap;

const SERVICE: &str = "orders";
const SA: &str = "orders-sidecar";

async fn put(api: &Api<ConfigMap>, name: &str, key: &str, data: &str) {
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(BTreeMap::from([(key.to_string(), data.to_string())])),
        ..Default::default()
    };
    within("apply ConfigMap", api.patch(name, &PatchParams::apply("portcullis-test").force(), &Patch::Apply(&cm)))
        .await
        .unwrap_or_else(|e| panic!("applying ConfigMap {name}: {e}"));
}

/// Writes a revision the way the controller does: shards first, then the index. `corrupt_shard` overwrites one
/// shard with content that does not match the index digest.
async fn publish(api: &Api<ConfigMap>, table: &Table, slot: Slot, corrupt_shard: Option<usize>) {
    let r = render(table, &index_name(SERVICE), slot, 0, 4096).expect("render");
    assert!(r.shards.len() > 1, "the test table should need several shards");
    for (i, (name, data)) in r.shards.iter().enumerate() {
        let data = if corrupt_shard == Some(i) { data.replacen("\"t/", "\"x/", 1) } else { data.clone() };
        put(api, name, SHARD_DATA_KEY, &data).await;
    }
    put(api, &index_name(SERVICE), INDEX_DATA_KEY, &r.index_json).await;
}

fn table(extra: &[&str], without_reader: bool) -> Table {
    let mut clients = standard_clients();
    if without_reader {
        clients.retain(|c| c.id != "t/reader");
    }
    // Padding clients so the table spans several shards.
    for i in 0..40 {
        clients.push(client(&format!("t/pad-{i:03}"), &format!("k-pad-{i}"), &["10.0.0.0/8"], &["open"]));
    }
    for k in extra {
        clients.push(client(&format!("t/{k}"), k, &["127.0.0.1/32"], &["open"]));
    }
    Table::new(format!("shop/{SERVICE}"), plans(), clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_from_configmaps_with_least_privilege() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await;
    let ns = cp.namespace("proxy-api").await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);

    // RBAC: get/list/watch on exactly the table's ConfigMap names.
    let role = Role {
        metadata: ObjectMeta { name: Some("orders-tables".into()), ..Default::default() },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            resource_names: Some(all_names(SERVICE)),
            ..Default::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some("orders-tables".into()), ..Default::default() },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: "orders-tables".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: SA.into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    let pp = PatchParams::apply("portcullis-test").force();
    Api::<Role>::namespaced(admin.clone(), &ns).patch("orders-tables", &pp, &Patch::Apply(&role)).await.unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .patch("orders-tables", &pp, &Patch::Apply(&binding))
        .await
        .unwrap();

    let token = cp.service_account_token(&ns, SA).await;
    let kubeconfig = cp.kubeconfig_for_token(&token);
    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let kube_config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();

    // The ServiceAccount cannot read any other ConfigMap.
    put(&cms, "not-yours", "secret.txt", "nope").await;
    let sa_cms: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(kube_config.clone()).unwrap(), &ns);
    let denied = wait_rbac(&sa_cms).await;
    match denied {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("reading another ConfigMap should be forbidden, got {other:?}"),
    }

    let (up, seen) = upstream().await;
    let mut c = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        up.to_string(),
        TableSource::ConfigMap { namespace: ns.clone(), name: index_name(SERVICE), kube: Some(Box::new(kube_config)) },
    );
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(c).await;

    // Fail closed before any table.
    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.reason(), "no_table");
    assert_eq!(get(ip(1), proxy.admin_addr.unwrap(), "/readyz", &[]).await.status, 503);

    // Revision 1.
    let t1 = table(&[], false);
    publish(&cms, &t1, Slot::A, None).await;
    wait_until("revision 1 applied", || proxy.tables.revision().as_deref() == Some(t1.revision.as_str())).await;
    let r = get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(seen.last()["x-portcullis-client"], "t/reader");
    assert_eq!(get(ip(1), proxy.admin_addr.unwrap(), "/readyz", &[]).await.status, 200);

    // Revision 2 in the other slot: reader revoked, a new client added.
    let t2 = table(&["k-fresh"], true);
    publish(&cms, &t2, Slot::B, None).await;
    wait_until("revision 2 applied", || proxy.tables.revision().as_deref() == Some(t2.revision.as_str())).await;
    assert_eq!(get(ip(1), proxy.addr, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 401);
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-fresh")]).await.status, 200);

    // Revision 3 with a shard that does not match its digest: rejected, revision 2 keeps serving.
    let t3 = table(&["k-third"], true);
    publish(&cms, &t3, Slot::A, Some(1)).await;
    wait_until("corrupt revision rejected", || {
        proxy.metrics.encode().contains("portcullis_proxy_tables_rejected_total{source=\"configmap\"} 1")
    })
    .await;
    assert_eq!(proxy.tables.revision().as_deref(), Some(t2.revision.as_str()));
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-fresh")]).await.status, 200);
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-third")]).await.status, 401);
    assert!(t3.clients.iter().any(|c| c.keys[0].sha256 == key_digest(b"k-third")));

    // Repairing the shard (the index is unchanged, so no watch event) applies revision 3 on the periodic retry.
    publish(&cms, &t3, Slot::A, None).await;
    wait_until("revision 3 applied", || proxy.tables.revision().as_deref() == Some(t3.revision.as_str())).await;
    assert_eq!(get(ip(1), proxy.addr, "/x", &[("x-api-key", "k-third")]).await.status, 200);

    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

/// RBAC bindings take a moment to reach the authorizer cache; wait until the allowed read works, then try the
/// forbidden one.
async fn wait_rbac(sa_cms: &Api<ConfigMap>) -> Result<ConfigMap, kube::Error> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match sa_cms.get_opt(&index_name(SERVICE)).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "allowed read never worked: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sa_cms.get("not-yours").await
}
