//! Cluster tests of the per-Service objects beside the tables: the `Exposure` condition (bypass guard), the
//! sidecar's least-privilege read access (Role + RoleBinding by `resourceNames`), and the optional NetworkPolicy.
//! Same setup as `cluster.rs`: real kube-apiserver (RBAC on), controller in-process with the least-privilege token.

mod common;

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use portcullis_controller::crd::*;
use portcullis_table::naming::{all_names, index_name};
use portcullis_testkit::wait_for;
use serde_json::json;

fn plan(name: &str, services: &[&str], network_policy: bool) -> UsagePlan {
    UsagePlan::new(
        name,
        UsagePlanSpec {
            services: services.iter().map(|s| ServiceGrant { name: s.to_string(), routes: None }).collect(),
            throttle: Some(ThrottleSpec { rate: 10, per: "1s".into(), burst: None }),
            quota: None,
            global_limits: None,
            network_policy: network_policy.then_some(true),
        },
    )
}

async fn create<K>(env: &Env, obj: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).unwrap();
    Api::<K>::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), &obj).await.unwrap()
}

/// Waits until UsagePlan `name` has condition `t` = `status` with `reason`; returns the condition's message.
async fn wait_plan_condition(env: &Env, name: &str, t: &str, status: &str, reason: &str) -> String {
    let api: Api<UsagePlan> = Api::namespaced(env.admin.clone(), &env.ns);
    wait_for(T, &format!("UsagePlan {name} {t}={status} ({reason})"), || async {
        let p = api.get_opt(name).await.ok()??;
        let c = condition(&p.status?.conditions, t)?.clone();
        (c.status == status && c.reason == reason).then_some(c.message)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposure_follows_the_service() {
    let env = env("expo").await;
    let ctl = start_controller(&env, "expo-1").await;
    create_plan(&env, plan("p", &["web"], false)).await;
    let msg = wait_plan_condition(&env, "p", "Exposure", "False", "ServiceNotFound").await;
    assert!(msg.contains("\"web\""), "{msg}");

    let _: Service = create(
        &env,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"type": "NodePort", "selector": {"app": "web"},
                        "ports": [{"name": "https", "port": 443, "targetPort": 8443}]}}),
    )
    .await;
    let msg = wait_plan_condition(&env, "p", "Exposure", "False", "NodePort").await;
    assert!(msg.contains("\"web\"") && msg.contains("ClusterIP"), "{msg}");
    // Exposure is a warning: the plan is still Ready (its table is written), and a Warning Event says why.
    wait_plan_condition(&env, "p", "Ready", "True", "Ready").await;
    wait_event(&env, "p", "NodePort").await;

    let svcs: Api<Service> = Api::namespaced(env.admin.clone(), &env.ns);
    let patch = json!({"spec": {"type": "ClusterIP", "ports": [{"name": "https", "port": 443, "targetPort": 8443}]}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let msg = wait_plan_condition(&env, "p", "Exposure", "True", "Internal").await;
    assert!(msg.contains("web"), "{msg}");

    let patch = json!({"spec": {"ports": [{"name": "https", "port": 443, "targetPort": 8080}]}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let msg = wait_plan_condition(&env, "p", "Exposure", "False", "TargetPortBypassesProxy").await;
    assert!(msg.contains("port 443 (https)") && msg.contains("8080") && msg.contains("8443"), "{msg}");
    wait_plan_condition(&env, "p", "Ready", "True", "Ready").await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_service_account_reads_only_its_tables() {
    let env = env("sidecar").await;
    let ctl = start_controller(&env, "sidecar-1").await;
    let _: ServiceAccount =
        create(&env, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sc"}})).await;
    create_secret(&env, "keys", &[("k", "sidecar-key-0123456789abcdef")]).await;
    let _: ConfigMap = create(
        &env,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {"a": "b"}}),
    )
    .await;
    create_plan(&env, plan("p", &["orders", "billing"], false)).await;
    create_client(&env, "c", client_spec(&["p"], &["10.0.0.0/8"], "keys", "k")).await;
    // Pods never run here; the Pod object is what the controller reads (no webhook in this namespace).
    let _: Pod = create(
        &env,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "orders-0", "labels": {"portcullis.dev/inject": "true", "app": "orders"},
                            "annotations": {"portcullis.dev/service": "orders"}},
               "spec": {"serviceAccountName": "sc", "containers": [{"name": "app", "image": "example.invalid/app"}]}}),
    )
    .await;

    let roles: Api<Role> = Api::namespaced(env.admin.clone(), &env.ns);
    let bindings: Api<RoleBinding> = Api::namespaced(env.admin.clone(), &env.ns);
    let binding = wait_for(T, "RoleBinding portcullis-sidecar-orders binds sc", || async {
        let b = bindings.get_opt("portcullis-sidecar-orders").await.ok()??;
        b.subjects.as_ref()?.iter().any(|s| s.kind == "ServiceAccount" && s.name == "sc").then_some(b)
    })
    .await;
    assert_eq!(binding.role_ref.name, "portcullis-sidecar-orders");
    assert_eq!(binding.subjects.as_ref().unwrap()[0].namespace.as_deref(), Some(env.ns.as_str()));
    assert_eq!(binding.metadata.owner_references.as_ref().unwrap()[0].kind, "UsagePlan");
    let role = roles.get("portcullis-sidecar-orders").await.unwrap();
    let rule = &role.rules.as_ref().unwrap()[0];
    assert_eq!(rule.resources.as_deref(), Some(&["configmaps".to_string()][..]));
    assert_eq!(rule.verbs, ["get", "list", "watch"]);
    assert_eq!(rule.resource_names.as_ref().unwrap(), &all_names("orders"));
    assert_eq!(role.metadata.owner_references.as_ref().unwrap()[0].name, "p");
    // No pod of billing yet: its Role exists and its RoleBinding has no subjects.
    wait_for(T, "billing Role and empty RoleBinding", || async {
        roles.get_opt("portcullis-sidecar-billing").await.ok()??;
        let b = bindings.get_opt("portcullis-sidecar-billing").await.ok()??;
        b.subjects.unwrap_or_default().is_empty().then_some(())
    })
    .await;
    wait_table(&env, "orders", "client present", |t| t.clients.len() == 1).await;
    // No write when unchanged: several reconciles of orders happened (plan, client, pod), the Role was applied once.
    let ns_field = format!("\"namespace\":\"{}\"", env.ns);
    let role_writes = logs()
        .lines()
        .filter(|l| l.contains("sidecar Role written") && l.contains(&ns_field) && l.contains("\"service\":\"orders\""))
        .count();
    assert_eq!(role_writes, 1, "the sidecar Role of orders was rewritten without a change");

    // The sidecar's own token: its index ConfigMap yes; another ConfigMap, billing's table, Secrets no.
    let token = env.cp.service_account_token(&env.ns, "sc").await;
    let sc = env.cp.client_for_token(&token).await;
    let cms: Api<ConfigMap> = Api::namespaced(sc.clone(), &env.ns);
    let index =
        wait_for(T, "sidecar token can GET its index", || async { cms.get(&index_name("orders")).await.ok() }).await;
    assert!(index.data.unwrap().contains_key("index.json"));
    let forbidden = |r: Result<ConfigMap, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    assert!(forbidden(cms.get("other").await), "other ConfigMap readable");
    assert!(forbidden(cms.get(&index_name("billing")).await), "billing's table readable");
    let secrets: Api<Secret> = Api::namespaced(sc.clone(), &env.ns);
    match secrets.get("keys").await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403),
        other => panic!("Secret GET by the sidecar: {other:?}"),
    }
    match secrets.list(&Default::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403),
        other => panic!("Secret LIST by the sidecar: {other:?}"),
    }

    // Pod gone → no subjects; plan gone → Role and RoleBinding gone.
    Api::<Pod>::namespaced(env.admin.clone(), &env.ns)
        .delete("orders-0", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .unwrap();
    wait_for(T, "RoleBinding without subjects after the pod is deleted", || async {
        let b = bindings.get_opt("portcullis-sidecar-orders").await.ok()??;
        b.subjects.unwrap_or_default().is_empty().then_some(())
    })
    .await;
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).delete("p", &DeleteParams::default()).await.unwrap();
    wait_for(T, "sidecar Role and RoleBinding deleted", || async {
        let r = roles.get_opt("portcullis-sidecar-orders").await.ok()?;
        let b = bindings.get_opt("portcullis-sidecar-orders").await.ok()?;
        (r.is_none() && b.is_none()).then_some(())
    })
    .await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_admits_only_the_proxy_port() {
    let env = env("netpol").await;
    let ctl = start_controller(&env, "netpol-1").await;
    let _: Service = create(
        &env,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
               "spec": {"selector": {"app": "api"}, "ports": [{"port": 443, "targetPort": "portcullis"}]}}),
    )
    .await;
    create_plan(&env, plan("plain", &["api"], false)).await;
    wait_plan_condition(&env, "plain", "Exposure", "True", "Internal").await;
    let nps: Api<NetworkPolicy> = Api::namespaced(env.admin.clone(), &env.ns);
    assert!(nps.get_opt("portcullis-api").await.unwrap().is_none(), "networkPolicy defaults to false");

    create_plan(&env, plan("fenced", &["api"], true)).await;
    let np = wait_for(T, "NetworkPolicy portcullis-api", || async { nps.get_opt("portcullis-api").await.ok()? }).await;
    let spec = np.spec.unwrap();
    assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()["app"], "api");
    assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
    let rules = spec.ingress.unwrap();
    assert_eq!(rules.len(), 1);
    assert!(rules[0].from.as_ref().is_none_or(|f| f.is_empty()));
    let ports = rules[0].ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8443)));
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    let owners: Vec<String> = np.metadata.owner_references.unwrap().iter().map(|o| o.name.clone()).collect();
    assert_eq!(owners, ["fenced"]);

    // The plan asking for it goes away → the NetworkPolicy goes too (the other plan still grants the Service).
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).delete("fenced", &DeleteParams::default()).await.unwrap();
    wait_for(T, "NetworkPolicy removed", || async {
        nps.get_opt("portcullis-api").await.ok()?.is_none().then_some(())
    })
    .await;
    ctl.stop().await.unwrap();
}
