//! Cluster tests of the controller against a real kube-apiserver + kube-controller-manager (RBAC on). The
//! controller runs in-process with a ServiceAccount token bound only to `config/rbac`. Each test has its own
//! namespace (and Lease); the control plane is shared by all tests of this binary.

use crate::common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use portcullis_controller::crd::*;
use portcullis_controller::keygen::validate_key_format;
use portcullis_table::naming::index_name;
use portcullis_table::{CertIdentity, Period, Quota, Throttle, key_digest};
use portcullis_testkit::wait_for;
use serde_json::json;
use std::time::Duration;

fn plan(name: &str, services: &[&str]) -> UsagePlan {
    UsagePlan::new(
        name,
        UsagePlanSpec {
            services: services.iter().map(|s| ServiceGrant { name: s.to_string(), routes: None }).collect(),
            throttle: Some(ThrottleSpec { rate: 10, per: "1s".into(), burst: Some(20) }),
            quota: Some(QuotaSpec { limit: 1000, period: QuotaPeriod::Day }),
            global_limits: None,
            quota_scope: None,
            on_store_unavailable: None,
            network_policy: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_client_render_table_edits_and_deletes() {
    let env = env("render").await;
    let ctl = start_controller(&env, "render-1").await;
    let key = "pcl_render_test_key_0123456789abcdef";
    create_secret(&env, "orders-key", &[("key", key)]).await;
    let mut p = plan("gold", &["orders"]);
    p.spec.services[0].routes =
        Some(vec![RouteSpec { path_prefix: "/v1".into(), methods: Some(vec!["GET".into(), "POST".into()]) }]);
    create_plan(&env, p).await;
    create_client(&env, "shop", client_spec(&["gold"], &["10.0.0.0/8", "2001:db8::/32"], "orders-key", "key")).await;

    let (doc1, t) = wait_table(&env, "orders", "client shop present", |t| t.clients.len() == 1).await;
    let c = &t.clients[0];
    assert_eq!(c.id, format!("{}/shop", env.ns));
    assert_eq!(c.keys[0].sha256, key_digest(key.as_bytes()));
    assert_eq!(c.source_ranges.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["10.0.0.0/8", "2001:db8::/32"]);
    assert_eq!(c.plans, ["gold"]);
    let gold = &t.plans["gold"];
    assert_eq!(gold.throttle, Some(Throttle { rate: 10, per_millis: 1000, burst: 20 }));
    assert_eq!(gold.quota, Some(Quota { limit: 1000, period: Period::Day }));
    assert_eq!(gold.routes[0].methods, ["GET", "POST"]);

    let ready = wait_client_condition(&env, "shop", "Ready", "True", Some("Ready")).await;
    let st = ready.status.unwrap();
    assert_eq!(st.keys, 1);
    assert_eq!(st.key_fingerprints, [portcullis_table::fingerprint(&key_digest(key.as_bytes()))]);
    wait_for(T, "UsagePlan gold Ready with 1 client and its table", || async {
        let p = Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).get("gold").await.ok()?;
        let st = p.status?;
        (condition(&st.conditions, "Ready")?.status == "True" && st.clients == 1 && st.tables.len() == 1).then_some(())
    })
    .await;

    // Ownership: the table ConfigMaps are owned by the plan and labelled with the Service.
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let index = cms.get(&index_name("orders")).await.unwrap();
    assert_eq!(index.metadata.owner_references.as_ref().unwrap()[0].kind, "UsagePlan");
    assert_eq!(index.metadata.labels.as_ref().unwrap()["portcullis.dev/service"], "orders");
    let rv = index.metadata.resource_version.clone();

    // CIDR edit → new revision in the other slot.
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    clients
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sourceRanges": ["192.168.0.0/16"]}})))
        .await
        .unwrap();
    let (doc2, t2) = wait_table(&env, "orders", "new CIDR", |t| {
        t.clients.first().is_some_and(|c| c.source_ranges.iter().map(|n| n.to_string()).eq(["192.168.0.0/16"]))
    })
    .await;
    assert_ne!(doc1.revision, doc2.revision);
    assert_ne!(doc1.slot, doc2.slot);
    assert_ne!(t.revision, t2.revision);

    // Limit edit → new revision.
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns)
        .patch("gold", &PatchParams::default(), &Patch::Merge(json!({"spec": {"throttle": {"rate": 50, "burst": 60}}})))
        .await
        .unwrap();
    wait_table(&env, "orders", "new limits", |t| {
        t.plans["gold"].throttle == Some(Throttle { rate: 50, per_millis: 1000, burst: 60 })
    })
    .await;

    // An unchanged revision is not rewritten: nudge with a no-op (annotation) and check the index stays.
    clients
        .patch("shop", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})))
        .await
        .unwrap();
    let rv_now = cms.get(&index_name("orders")).await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_millis(1500)).await; // give a (wrong) rewrite the chance to happen
    assert_eq!(cms.get(&index_name("orders")).await.unwrap().metadata.resource_version, rv_now);
    assert_ne!(rv_now, rv);

    // Client deleted → gone from the table.
    clients.delete("shop", &DeleteParams::default()).await.unwrap();
    wait_table(&env, "orders", "client removed", |t| t.clients.is_empty()).await;

    // Only the current and previous slot's shards remain.
    assert!(table_configmaps(&env, "orders").await.len() <= 3);
    let (status, body) = http_get(ctl.admin_addr, "/metrics").await.expect("metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("portcullis_controller_reconciles_total"), "{body}");
    assert!(body.contains("portcullis_controller_table_clients"), "{body}");
    assert!(http_get(ctl.admin_addr, "/readyz").await.unwrap().0.contains("200"));
    assert!(http_get(ctl.admin_addr, "/healthz").await.unwrap().0.contains("200"));

    assert_no_key_material(&env, &[key.to_string()]).await;
    ctl.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_only_client_is_rendered_and_ready() {
    let env = env("certs").await;
    let ctl = start_controller(&env, "certs-1").await;
    create_plan(&env, plan("gold", &["orders"])).await;
    let mut spec = client_spec(&["gold"], &["10.0.0.0/8"], "unused", "key");
    spec.keys.clear();
    spec.certificates = vec![
        CertificateSpec { san_dns: Some("Batch.Example".into()), ..Default::default() },
        CertificateSpec { sha256: Some("AB".repeat(32)), ..Default::default() },
    ];
    spec.require_certificate = Some(true);
    create_client(&env, "batch", spec).await;
    let (_, t) = wait_table(&env, "orders", "certificate-only client present", |t| t.clients.len() == 1).await;
    let c = &t.clients[0];
    assert!(c.keys.is_empty());
    assert_eq!(c.certificates, [CertIdentity::SanDns("batch.example".into()), CertIdentity::Sha256("ab".repeat(32))]);
    assert!(c.require_certificate);
    let ready = wait_client_condition(&env, "batch", "Ready", "True", Some("Ready")).await;
    assert_eq!(ready.status.unwrap().keys, 0);
    ctl.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_is_reported_then_resolved() {
    let env = env("secret").await;
    let ctl = start_controller(&env, "secret-1").await;
    create_plan(&env, plan("basic", &["api"])).await;
    create_client(&env, "late", client_spec(&["basic"], &["0.0.0.0/0"], "late-key", "token")).await;
    let c = wait_client_condition(&env, "late", "KeysResolved", "False", Some("SecretNotFound")).await;
    let msg = &condition(&c.status.as_ref().unwrap().conditions, "KeysResolved").unwrap().message;
    assert!(msg.contains("late-key"), "{msg}");
    wait_client_condition(&env, "late", "Ready", "False", Some("SecretNotFound")).await;
    wait_event(&env, "late", "SecretNotFound").await;

    // Secret without the data key → SecretKeyMissing; then with it → Ready.
    create_secret(&env, "late-key", &[("other", "x")]).await;
    wait_client_condition(&env, "late", "KeysResolved", "False", Some("SecretKeyMissing")).await;
    let key = "late-key-material-ABCDEFGHIJKLMNOP";
    Api::<Secret>::namespaced(env.admin.clone(), &env.ns)
        .patch("late-key", &PatchParams::default(), &Patch::Merge(json!({"stringData": {"token": key}})))
        .await
        .unwrap();
    wait_client_condition(&env, "late", "Ready", "True", None).await;
    wait_table(&env, "api", "key digest present", |t| {
        t.clients.first().is_some_and(|c| c.keys.first().is_some_and(|k| k.sha256 == key_digest(key.as_bytes())))
    })
    .await;
    wait_event(&env, "late", "Ready").await;
    assert_no_key_material(&env, &[key.to_string()]).await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_reported() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let env = env("expiry").await;
    let ctl = start_controller(&env, "expiry-1").await;
    create_secret(&env, "k", &[("old", "expired-key-0123456789abcdef"), ("soon", "soon-key-0123456789abcdef")]).await;
    create_plan(&env, plan("basic", &["api"])).await;
    let mut spec = client_spec(&["basic"], &["10.0.0.0/8"], "k", "old");
    spec.keys[0].expires_at = Some(Time("2020-01-01T00:00:00Z".parse().unwrap()));
    create_client(&env, "stale", spec).await;
    wait_client_condition(&env, "stale", "KeysResolved", "False", Some("KeyExpired")).await;
    // Still in the table with its expiry, so the proxy answers 403 (expired) rather than 401 (unknown).
    wait_table(&env, "api", "expired key listed", |t| {
        t.clients.first().is_some_and(|c| c.keys[0].expires_at.is_some())
    })
    .await;
    // A key expiring in a few seconds flips the condition when it expires (requeue at expiry).
    let soon = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(8);
    let mut spec = client_spec(&["basic"], &["10.0.0.0/8"], "k", "soon");
    spec.keys[0].expires_at = Some(Time(soon));
    create_client(&env, "ticking", spec).await;
    wait_client_condition(&env, "ticking", "Ready", "True", None).await;
    wait_client_condition(&env, "ticking", "KeysResolved", "False", Some("KeyExpired")).await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_key_is_created_once_and_survives_restart() {
    let env = env("gen").await;
    let ctl = start_controller(&env, "gen-1").await;
    create_plan(&env, plan("basic", &["api"])).await;
    let mut spec = client_spec(&["basic"], &["127.0.0.1/32"], "unused", "unused");
    spec.keys = vec![KeySpec { name: Some("main".into()), generate: Some(GenerateSpec {}), ..Default::default() }];
    create_client(&env, "robot", spec).await;
    wait_client_condition(&env, "robot", "Ready", "True", None).await;
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    let s1 = secrets.get("robot-key-main").await.unwrap();
    let key = String::from_utf8(s1.data.as_ref().unwrap()["key"].0.clone()).unwrap();
    validate_key_format(&key).expect("generated key has the pcl_ format");
    assert_eq!(s1.metadata.owner_references.as_ref().unwrap()[0].kind, "ApiClient");
    assert_eq!(s1.metadata.labels.as_ref().unwrap()["portcullis.dev/api-key"], "true");
    assert_eq!(s1.metadata.labels.as_ref().unwrap()["portcullis.dev/key-name"], "main");
    wait_event(&env, "robot", "KeyGenerated").await;
    wait_table(&env, "api", "generated key digest", |t| {
        t.clients.first().is_some_and(|c| c.keys.first().is_some_and(|k| k.sha256 == key_digest(key.as_bytes())))
    })
    .await;
    ctl.stop().await.unwrap();

    // A new controller (new Lease holder) must not regenerate it.
    let ctl = start_controller(&env, "gen-2").await;
    Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns)
        .patch("robot", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sourceRanges": ["127.0.0.2/32"]}})))
        .await
        .unwrap();
    wait_client_condition(&env, "robot", "Ready", "True", None).await;
    wait_table(&env, "api", "new range, same key", |t| {
        t.clients.first().is_some_and(|c| {
            c.source_ranges[0].to_string() == "127.0.0.2/32" && c.keys[0].sha256 == key_digest(key.as_bytes())
        })
    })
    .await;
    let s2 = secrets.get("robot-key-main").await.unwrap();
    assert_eq!(s1.metadata.resource_version, s2.metadata.resource_version);
    assert_eq!(s1.data, s2.data);
    assert_no_key_material(&env, &[key]).await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_plan_reports_plan_not_found_and_removes_its_tables() {
    let env = env("plandel").await;
    let ctl = start_controller(&env, "plandel-1").await;
    create_secret(&env, "keys", &[("a", "key-a-0123456789abcdef"), ("b", "key-b-0123456789abcdef")]).await;
    create_plan(&env, plan("p1", &["solo", "shared"])).await;
    create_plan(&env, plan("p2", &["shared"])).await;
    create_client(&env, "c1", client_spec(&["p1"], &["10.0.0.0/8"], "keys", "a")).await;
    create_client(&env, "c2", client_spec(&["p2"], &["10.0.0.0/8"], "keys", "b")).await;
    wait_table(&env, "shared", "both clients", |t| t.clients.len() == 2).await;
    wait_table(&env, "solo", "c1", |t| t.clients.len() == 1).await;
    wait_client_condition(&env, "c1", "Ready", "True", None).await;

    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).delete("p1", &DeleteParams::default()).await.unwrap();
    let c1 = wait_client_condition(&env, "c1", "PlanResolved", "False", Some("PlanNotFound")).await;
    let msg = &condition(&c1.status.as_ref().unwrap().conditions, "PlanResolved").unwrap().message;
    assert!(msg.contains("p1"), "{msg}");
    wait_client_condition(&env, "c1", "Ready", "False", None).await;
    wait_for(T, "tables of solo deleted", || async { table_configmaps(&env, "solo").await.is_empty().then_some(()) })
        .await;
    let (_, t) = wait_table(&env, "shared", "only c2 left", |t| t.clients.len() == 1).await;
    assert_eq!(t.clients[0].id, format!("{}/c2", env.ns));
    assert!(!t.plans.contains_key("p1"));
    let index = Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns).get(&index_name("shared")).await.unwrap();
    let owners: Vec<String> = index.metadata.owner_references.unwrap().iter().map(|o| o.name.clone()).collect();
    assert_eq!(owners, ["p2"]);
    wait_client_condition(&env, "c2", "Ready", "True", None).await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_rejects_invalid_objects() {
    let env = env("schema").await;
    let reject = |kind: &'static str, plural: &'static str, body: serde_json::Value, expect: &'static str| {
        let env = &env;
        async move {
            let ar = ApiResource {
                group: "portcullis.dev".into(),
                version: "v1alpha1".into(),
                api_version: "portcullis.dev/v1alpha1".into(),
                kind: kind.into(),
                plural: plural.into(),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(env.admin.clone(), &env.ns, &ar);
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "portcullis.dev/v1alpha1", "kind": kind,
                "metadata": {"name": "bad"}, "spec": body
            }))
            .unwrap();
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => panic!("{kind} {body} was accepted"),
                Err(kube::Error::Api(e)) => {
                    assert_eq!(e.code, 422, "{e:?}");
                    assert!(e.message.contains(expect), "{kind}: {:?} does not mention {expect:?}", e.message);
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let key = json!([{"secretRef": {"name": "s", "key": "k"}}]);
    reject(
        "ApiClient",
        "apiclients",
        json!({"usagePlans": ["p"], "sourceRanges": ["10.0.0.0/33"], "keys": key}),
        "CIDR",
    )
    .await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "sourceRanges": ["not-an-ip"], "keys": key}), "CIDR")
        .await;
    reject(
        "ApiClient",
        "apiclients",
        json!({"usagePlans": ["p"], "keys": [{"secretRef": {"name": "s", "key": "k"}, "generate": {}}]}),
        "exactly one of secretRef or generate",
    )
    .await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "keys": [{}]}), "exactly one").await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "keys": [{"generate": {}}]}), "needs a name").await;
    reject(
        "ApiClient",
        "apiclients",
        json!({"usagePlans": ["p"], "keys": [{"name": "k1", "generate": {}}, {"name": "k1", "secretRef": {"name": "s", "key": "k"}}]}),
        "key names must be unique",
    )
    .await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "keys": [{"name": "K_1", "generate": {}}]}), "name")
        .await;
    reject("ApiClient", "apiclients", json!({"usagePlans": [], "keys": key}), "usagePlans").await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"]}), "at least one of keys or certificates").await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "keys": [], "certificates": []}), "at least one")
        .await;
    reject(
        "ApiClient",
        "apiclients",
        json!({"usagePlans": ["p"], "certificates": [{"subject": "a", "sanDNS": "a.example"}]}),
        "exactly one of subject, sanDNS, sanURI or sha256",
    )
    .await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "certificates": [{}]}), "exactly one of subject")
        .await;
    reject("ApiClient", "apiclients", json!({"usagePlans": ["p"], "certificates": [{"sha256": "abc"}]}), "sha256")
        .await;
    reject("UsagePlan", "usageplans", json!({"services": [{"name": "a"}], "throttle": {"rate": -5}}), "rate").await;
    reject("UsagePlan", "usageplans", json!({"services": [{"name": "a"}], "throttle": {"rate": 0}}), "rate").await;
    reject(
        "UsagePlan",
        "usageplans",
        json!({"services": [{"name": "a"}], "quota": {"limit": 5, "period": "Fortnight"}}),
        "period",
    )
    .await;
    reject(
        "UsagePlan",
        "usageplans",
        json!({"services": [{"name": "a"}], "throttle": {"rate": 1, "per": "1d"}}),
        "per",
    )
    .await;
    reject(
        "UsagePlan",
        "usageplans",
        json!({"services": [{"name": "a"}], "throttle": {"rate": 1, "burst": -1}}),
        "burst",
    )
    .await;
    // A valid object is accepted (so the rejections above are about the fields named).
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let mut by_cert = ApiClient::new("by-cert", client_spec(&["p"], &[], "s", "k"));
    by_cert.spec.keys.clear();
    by_cert.spec.certificates = vec![CertificateSpec { sha256: Some("AB".repeat(32)), ..Default::default() }];
    by_cert.spec.require_certificate = Some(true);
    let created = clients.create(&PostParams::default(), &by_cert).await.expect("certificate-only ApiClient accepted");
    assert_eq!(created.spec.certificates.len(), 1);
    let api: Api<UsagePlan> = Api::namespaced(env.admin.clone(), &env.ns);
    let created = api.create(&PostParams::default(), &plan("ok", &["a"])).await.unwrap();
    assert_eq!(created.spec.throttle.unwrap().per, "1s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_edits_converge_to_the_latest_generation() {
    let env = env("rapid").await;
    let ctl = start_controller(&env, "rapid-1").await;
    create_secret(&env, "k", &[("k", "rapid-key-0123456789abcdef")]).await;
    create_plan(&env, plan("basic", &["api"])).await;
    create_client(&env, "fast", client_spec(&["basic"], &["10.0.0.0/8"], "k", "k")).await;
    let api: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    for i in 0..25 {
        let patch = json!({"spec": {"sourceRanges": [format!("10.{i}.0.0/16")]}});
        api.patch("fast", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    }
    let c = wait_client_condition(&env, "fast", "Ready", "True", None).await;
    assert_eq!(c.status.as_ref().unwrap().observed_generation, c.metadata.generation);
    assert!(c.metadata.generation.unwrap() >= 26);
    wait_table(&env, "api", "last CIDR", |t| t.clients[0].source_ranges[0].to_string() == "10.24.0.0/16").await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_a_standby_takes_over() {
    let env = env("lease").await;
    let lease = format!("pc-{}", env.ns);
    let a = start_controller_with_lease(&env, "lease-a", &lease).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.admin.clone(), SYSTEM_NS);
    wait_for(T, "lease-a holds the Lease", || async {
        let l = leases.get_opt(&lease).await.ok()??;
        (l.spec?.holder_identity.as_deref() == Some("lease-a")).then_some(())
    })
    .await;
    let b = start_controller_with_lease(&env, "lease-b", &lease).await;
    create_secret(&env, "k", &[("k", "lease-key-0123456789abcdef")]).await;
    create_plan(&env, plan("basic", &["api"])).await;
    create_client(&env, "one", client_spec(&["basic"], &["10.0.0.0/8"], "k", "k")).await;
    wait_client_condition(&env, "one", "Ready", "True", None).await;
    // b is a ready standby.
    let (_, metrics) = http_get(b.admin_addr, "/metrics").await.unwrap();
    assert!(metrics.contains("portcullis_controller_leader 0"), "{metrics}");
    a.stop().await.unwrap();
    wait_for(T, "lease-b takes the Lease", || async {
        let l = leases.get_opt(&lease).await.ok()??;
        (l.spec?.holder_identity.as_deref() == Some("lease-b")).then_some(())
    })
    .await;
    create_client(&env, "two", client_spec(&["basic"], &["10.0.0.0/8"], "k", "missing")).await;
    wait_client_condition(&env, "two", "KeysResolved", "False", Some("SecretKeyMissing")).await;
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_with_a_kubeconfig_serves_admin_and_stops_on_sigterm() {
    use tokio::io::AsyncReadExt;
    let env = env("bin").await;
    let token = env.cp.service_account_token(SYSTEM_NS, SA).await;
    let kubeconfig = env.cp.kubeconfig_for_token(&token);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-controller"))
        .args(["--namespace", &env.ns, "--lease-namespace", SYSTEM_NS, "--lease-name", &format!("bin-{}", env.ns)])
        .args(["--metrics-listen", &addr, "--log-format", "json", "--webhook=false"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,portcullis_controller=debug")
        .env_remove("POD_NAMESPACE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning portcullis-controller");
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    wait_for(T, "binary /readyz 200", || async {
        http_get(addr, "/readyz").await.filter(|(s, _)| s.contains("200")).map(|_| ())
    })
    .await;
    let key = "binary-key-0123456789abcdefghij";
    create_secret(&env, "k", &[("k", key)]).await;
    create_plan(&env, plan("basic", &["api"])).await;
    create_client(&env, "viabin", client_spec(&["basic"], &["10.0.0.0/8"], "k", "k")).await;
    wait_client_condition(&env, "viabin", "Ready", "True", None).await;
    wait_table(&env, "api", "client present", |t| t.clients.len() == 1).await;

    let pid = child.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(T, child.wait()).await.expect("exits within 60 s after SIGTERM").unwrap();
    assert!(status.success(), "exit status {status:?}");
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    assert!(out.contains("table revision written"), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("shutting down"), "{out}");
    assert!(!out.contains(key) && !err.contains(key), "key material in the binary's output");
    // The Lease was released on graceful shutdown.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.admin.clone(), SYSTEM_NS);
    let l = leases.get(&format!("bin-{}", env.ns)).await.unwrap();
    assert_eq!(l.spec.unwrap().holder_identity, None);
}
