//! Cluster tests of the per-Service objects beside the tables: the `Protected` condition (bypass guard; also
//! written under its deprecated name `Exposure`), the sidecar's least-privilege read access (Role + RoleBinding by
//! `resourceNames`), and the NetworkPolicy (on by default) with the isolation findings of `Protected`.
//! Same setup as `cluster.rs`: real kube-apiserver (RBAC on), controller in-process with the least-privilege token.

use crate::common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use portcullis_controller::crd::*;
use portcullis_table::naming::{all_names, index_name};
use portcullis_testkit::wait_for;
use serde_json::json;

fn plan(name: &str, services: &[&str], network_policy: bool) -> UsagePlan {
    plan_np(name, services, network_policy.then_some(true))
}

fn plan_np(name: &str, services: &[&str], network_policy: Option<bool>) -> UsagePlan {
    UsagePlan::new(
        name,
        UsagePlanSpec {
            services: services.iter().map(|s| ServiceGrant { name: s.to_string(), routes: None }).collect(),
            throttle: Some(ThrottleSpec { rate: 10, per: "1s".into(), burst: None }),
            quota: None,
            global_limits: None,
            quota_scope: None,
            on_store_unavailable: None,
            network_policy,
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
    let msg = wait_plan_condition(&env, "p", "Protected", "True", "Internal").await;
    assert!(msg.contains("web"), "{msg}");
    assert_eq!(wait_plan_condition(&env, "p", "Exposure", "True", "Internal").await, msg, "the old name, alike");

    // An internal load balancer with the default externalTrafficPolicy (Cluster): nodes SNAT, sourceRanges see
    // node addresses — flagged with what to set; `Local` clears it.
    let patch = json!({"metadata": {"annotations": {"networking.gke.io/load-balancer-type": "Internal"}},
                       "spec": {"type": "LoadBalancer"}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let msg = wait_plan_condition(&env, "p", "Protected", "False", "ClientAddressHidden").await;
    assert!(msg.contains("externalTrafficPolicy: Local") && msg.contains("sourceRanges"), "{msg}");
    let patch = json!({"spec": {"externalTrafficPolicy": "Local"}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    wait_plan_condition(&env, "p", "Protected", "True", "Internal").await;

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
async fn network_policy_is_on_by_default_and_follows_the_service() {
    let env = env("netpol").await;
    let admin_peer = portcullis_controller::network_policy::namespace_peer("monitoring");
    let ctl = start_controller_with(&env, "netpol-1", &format!("pc-{}", env.ns), None, |c| {
        c.network_policy.admin_from = vec![admin_peer.clone()];
    })
    .await;
    let _: Service = create(
        &env,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
               "spec": {"selector": {"app": "api"}, "ports": [{"port": 443, "targetPort": "portcullis"}]}}),
    )
    .await;
    let nps: Api<NetworkPolicy> = Api::namespaced(env.admin.clone(), &env.ns);

    // Opted out, and nobody else isolates the pods: the Service is internal, but its pods are not closed.
    create_plan(&env, plan_np("optout", &["api"], Some(false))).await;
    let msg = wait_plan_condition(&env, "optout", "Exposure", "False", "NotIsolated").await;
    assert!(msg.contains("\"portcullis-api\"") && msg.contains("spec.networkPolicy"), "the fix is named: {msg}");
    wait_plan_condition(&env, "optout", "Ready", "True", "Ready").await;
    assert!(nps.get_opt("portcullis-api").await.unwrap().is_none(), "an opted-out plan gets no NetworkPolicy");

    // A plan leaving spec.networkPolicy unset gets it: the controller's default is on.
    create_plan(&env, plan_np("default", &["api"], None)).await;
    let np = wait_for(T, "NetworkPolicy portcullis-api", || async { nps.get_opt("portcullis-api").await.ok()? }).await;
    let spec = np.spec.unwrap();
    assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()["app"], "api");
    assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
    let rules = spec.ingress.unwrap();
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(rules[0].from.as_ref().is_none_or(|f| f.is_empty()), "the proxy port is open to the Service's clients");
    let port = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        let p = &r.ports.as_ref().unwrap()[0];
        (p.port.clone(), p.protocol.clone())
    };
    assert_eq!(port(&rules[0]), (Some(IntOrString::String("portcullis".into())), Some("TCP".into())));
    assert_eq!(port(&rules[1]), (Some(IntOrString::String("portcullis-adm".into())), Some("TCP".into())));
    assert_eq!(rules[1].from.as_deref(), Some(&[admin_peer][..]), "the admin port only from the configured peers");
    let owners: Vec<String> = np.metadata.owner_references.unwrap().iter().map(|o| o.name.clone()).collect();
    assert_eq!(owners, ["default"], "owned by the plans that want it");
    let msg = wait_plan_condition(&env, "optout", "Exposure", "True", "Internal").await;
    assert!(msg.contains("NetworkPolicy") && msg.contains("where the network plugin enforces"), "{msg}");

    // The policy follows the Service's selector.
    let svcs: Api<Service> = Api::namespaced(env.admin.clone(), &env.ns);
    let patch = json!({"spec": {"selector": {"app": "api-v2"}}});
    svcs.patch("api", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    wait_for(T, "NetworkPolicy selecting app=api-v2", || async {
        let np = nps.get_opt("portcullis-api").await.ok()??;
        let sel = np.spec?.pod_selector?.match_labels?;
        (sel.get("app").map(String::as_str) == Some("api-v2") && sel.len() == 1).then_some(())
    })
    .await;

    // Someone else's policy opening every port to the same pods is a hole, named; removing it closes it.
    let _: NetworkPolicy = create(
        &env,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-all"},
               "spec": {"podSelector": {"matchLabels": {"app": "api-v2"}}, "ingress": [{}]}}),
    )
    .await;
    let msg = wait_plan_condition(&env, "default", "Exposure", "False", "PolicyAdmitsOtherPorts").await;
    assert!(msg.contains("\"allow-all\"") && msg.contains("every port"), "{msg}");
    nps.delete("allow-all", &DeleteParams::default()).await.unwrap();
    wait_plan_condition(&env, "default", "Exposure", "True", "Internal").await;

    // Deleted by hand: written again.
    let uid = nps.get("portcullis-api").await.unwrap().metadata.uid;
    nps.delete("portcullis-api", &DeleteParams::default()).await.unwrap();
    wait_for(T, "NetworkPolicy re-created", || async {
        let np = nps.get_opt("portcullis-api").await.ok()??;
        (np.metadata.uid != uid).then_some(())
    })
    .await;

    // The plan wanting it goes → the policy goes (the other plan opted out) and Exposure says so.
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).delete("default", &DeleteParams::default()).await.unwrap();
    wait_for(T, "NetworkPolicy removed", || async {
        nps.get_opt("portcullis-api").await.ok()?.is_none().then_some(())
    })
    .await;
    wait_plan_condition(&env, "optout", "Exposure", "False", "NotIsolated").await;

    // An equivalent policy of the user's own (numbered sidecar ports) counts.
    let _: NetworkPolicy = create(
        &env,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "theirs"},
               "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["api-v2"]}]},
                        "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 8443}, {"port": 9901}]}]}}),
    )
    .await;
    wait_plan_condition(&env, "optout", "Exposure", "True", "Internal").await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_off_plans_opt_in() {
    let env = env("netpol-off").await;
    let ctl = start_controller_with(&env, "netpol-off-1", &format!("pc-{}", env.ns), None, |c| {
        c.network_policy.default_on = false;
    })
    .await;
    let _: Service = create(
        &env,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
               "spec": {"selector": {"app": "api"}, "ports": [{"port": 443, "targetPort": 8443}]}}),
    )
    .await;
    create_plan(&env, plan_np("unset", &["api"], None)).await;
    wait_plan_condition(&env, "unset", "Exposure", "False", "NotIsolated").await;
    let nps: Api<NetworkPolicy> = Api::namespaced(env.admin.clone(), &env.ns);
    assert!(nps.get_opt("portcullis-api").await.unwrap().is_none());
    create_plan(&env, plan_np("fenced", &["api"], Some(true))).await;
    wait_for(T, "NetworkPolicy portcullis-api", || async { nps.get_opt("portcullis-api").await.ok()? }).await;
    wait_plan_condition(&env, "unset", "Exposure", "True", "Internal").await;
    ctl.stop().await.unwrap();
}

/// An ApiClient identified by a certificate on a Service whose sidecars verify none (no `--client-ca`): the
/// condition `CertificatesVerifiable` says so (and `Ready` is False: every request of the client would be 403);
/// it follows what the webhook injected into the Service's pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_client_needs_sidecars_with_a_client_ca() {
    let env = env("certca").await;
    let ctl = start_controller(&env, "certca-1").await;
    create_plan(&env, plan("p", &["api"], false)).await;
    let spec = ApiClientSpec {
        usage_plans: vec!["p".into()],
        source_ranges: vec![],
        keys: vec![],
        certificates: vec![CertificateSpec { subject: Some("partner".into()), ..Default::default() }],
        require_certificate: None,
        disabled: None,
    };
    create_client(&env, "partner", spec).await;
    // No sidecar runs yet and the controller has no chart-wide client CA: said, but not (yet) part of `Ready`.
    let c = wait_client_condition(&env, "partner", "CertificatesVerifiable", "False", Some("ClientCAMissing")).await;
    let msg = condition(&c.status.unwrap().conditions, "CertificatesVerifiable").unwrap().message.clone();
    assert!(msg.contains("api") && msg.contains("portcullis.dev/client-ca-secret"), "{msg}");
    wait_client_condition(&env, "partner", "Ready", "True", Some("Ready")).await;

    let sidecar_pod = |name: &str, args: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": {"portcullis.dev/inject": "true", "app": "api"},
                            "annotations": {"portcullis.dev/service": "api"}},
               "spec": {"containers": [{"name": "app", "image": "example.invalid/app"},
                                       {"name": "portcullis-proxy", "image": "example.invalid/proxy", "args": args}]}})
    };
    let _: Pod = create(&env, sidecar_pod("api-0", json!(["--client-ca=/etc/portcullis/client-ca/ca.crt"]))).await;
    wait_client_condition(&env, "partner", "CertificatesVerifiable", "True", Some("ClientCAConfigured")).await;
    // One sidecar of the Service without a client CA is enough to refuse the client there.
    let _: Pod = create(&env, sidecar_pod("api-1", json!(["--listen=0.0.0.0:8443"]))).await;
    wait_client_condition(&env, "partner", "CertificatesVerifiable", "False", Some("ClientCAMissing")).await;
    // A running sidecar refuses the certificate-only client: not Ready.
    wait_client_condition(&env, "partner", "Ready", "False", Some("ClientCAMissing")).await;
    ctl.stop().await.unwrap();
}

/// `--sidecar-proxy-port` other than 8443 (chart `sidecar.proxyPort`): `Protected` takes that port as the proxy's
/// and 8443 as the app's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_proxy_port_is_the_proxy() {
    let env = env("port").await;
    let lease = format!("pc-{}", env.ns);
    let ctl = start_controller_with(&env, "port-1", &lease, None, |c| {
        c.sidecar_ports = portcullis_controller::network_policy::SidecarPorts { proxy: 7443, admin: 7901 };
    })
    .await;
    create_plan(&env, plan("p", &["web"], false)).await;
    let _: Service = create(
        &env,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "https", "port": 443, "targetPort": 7443}]}}),
    )
    .await;
    wait_plan_condition(&env, "p", "Protected", "True", "Internal").await;
    let svcs: Api<Service> = Api::namespaced(env.admin.clone(), &env.ns);
    let patch = json!({"spec": {"ports": [{"name": "https", "port": 443, "targetPort": 8443}]}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let msg = wait_plan_condition(&env, "p", "Protected", "False", "TargetPortBypassesProxy").await;
    assert!(msg.contains("targets 8443") && msg.contains("set its targetPort to 7443"), "{msg}");
    ctl.stop().await.unwrap();
}
