//! Per-Service objects beside the tables: the sidecar's read access (Role + RoleBinding `portcullis-sidecar-<svc>`)
//! and the NetworkPolicy `portcullis-<svc>` (rendered by [`crate::network_policy`]). Written with server-side apply only when they differ from
//! what is in the cluster; owned by the granting UsagePlans; deleted when no plan grants the Service.

use super::caches::in_namespace;
use super::{Ctx, Error, FIELD_MANAGER, MANAGED_BY};
use crate::crd::UsagePlan;
use crate::network_policy;
use crate::sidecar_contract::proxy_flag;
use crate::webhook::inject::{ANNOTATION_APP_LOOPBACK, ANNOTATION_SERVICE, CONTAINER_NAME, INJECT_KEY};
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use portcullis_table::naming::{LABEL_SERVICE, all_names};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Debug;

/// Name of the sidecar Role and RoleBinding of a Service.
pub fn sidecar_rbac_name(service: &str) -> String {
    format!("portcullis-sidecar-{service}")
}

fn meta(name: String, service: &str, owners: &[OwnerReference]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        labels: Some(BTreeMap::from([
            (LABEL_SERVICE.to_string(), service.to_string()),
            ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        ])),
        owner_references: Some(owners.to_vec()),
        ..Default::default()
    }
}

/// Read access to exactly the table ConfigMaps of `service`.
pub fn sidecar_role(service: &str, owners: &[OwnerReference]) -> Role {
    Role {
        metadata: meta(sidecar_rbac_name(service), service, owners),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(all_names(service)),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    }
}

/// Binds the sidecar Role to `service_accounts` of namespace `ns` (sorted, deduplicated; may be empty).
pub fn sidecar_binding(ns: &str, service: &str, service_accounts: &[String], owners: &[OwnerReference]) -> RoleBinding {
    RoleBinding {
        metadata: meta(sidecar_rbac_name(service), service, owners),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: sidecar_rbac_name(service),
        },
        subjects: Some(
            service_accounts
                .iter()
                .map(|sa| Subject {
                    kind: "ServiceAccount".into(),
                    name: sa.clone(),
                    namespace: Some(ns.to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// ServiceAccounts of the sidecars reading `service`'s tables, from the (opted-in) Pods in `pods`.
pub fn sidecar_service_accounts<'a>(pods: impl IntoIterator<Item = &'a Pod>, service: &str) -> Vec<String> {
    let mut v: Vec<String> = pods
        .into_iter()
        .filter(|p| p.labels().get(INJECT_KEY).map(String::as_str) == Some("true"))
        .filter(|p| p.annotations().get(ANNOTATION_SERVICE).map(String::as_str) == Some(service))
        .map(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether every field set in `want` has the same value in `have` (empty lists/maps in `want` match absent ones;
/// fields the API server defaults or other managers own are ignored).
pub fn json_covers(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, wv)| match h.get(k) {
            Some(hv) => json_covers(hv, wv),
            None => is_empty(wv),
        }),
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(h, w)| json_covers(h, w)),
        (Value::Null, w) => is_empty(w),
        (h, w) => h == w,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Server-side applies `obj` unless the live object already has every field of it. `Ok(true)` if written.
pub(crate) async fn apply_if_changed<K>(api: &Api<K>, obj: &K) -> Result<bool, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let want = serde_json::to_value(obj).expect("serializable");
    if let Some(live) = api.get_opt(&name).await? {
        let have = serde_json::to_value(&live).expect("serializable");
        if json_covers(&have, &want) {
            return Ok(false);
        }
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await?;
    Ok(true)
}

/// Deletes `name` if it exists and carries this controller's `managed-by` label.
async fn delete_if_ours<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(live) = api.get_opt(name).await? else { return Ok(()) };
    if live.labels().get("app.kubernetes.io/managed-by").map(String::as_str) != Some(MANAGED_BY) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes the sidecar Role/RoleBinding (and, when a granting plan asks, the NetworkPolicy) of `service`.
/// `granting` are the plans that grant it; `owners` their owner references.
pub async fn reconcile_access(
    ctx: &Ctx,
    ns: &str,
    service: &str,
    granting: &[&UsagePlan],
    owners: &[OwnerReference],
) -> Result<(), Error> {
    let sas = sidecar_service_accounts(ctx.pods.state_filter(|p| in_namespace(p, ns)).iter().map(|p| &**p), service);
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), ns);
    if apply_if_changed(&roles, &sidecar_role(service, owners)).await? {
        tracing::info!(namespace = ns, service, "sidecar Role written");
    }
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), ns);
    if apply_if_changed(&bindings, &sidecar_binding(ns, service, &sas, owners)).await? {
        tracing::info!(namespace = ns, service, service_accounts = ?sas, "sidecar RoleBinding written");
    }
    // The sidecars' store credentials (when a store and a credentials Secret are configured).
    super::store::ensure_credentials(ctx, ns).await?;

    reconcile_network_policy(ctx, ns, service, granting, owners).await
}

/// The desired NetworkPolicy of `service` (`None`: none is wanted, or the Service has no selector to take the pods
/// from). Owned by the granting plans that want it.
fn desired_network_policy(
    ctx: &Ctx,
    ns: &str,
    service: &str,
    granting: &[&UsagePlan],
    owners: &[OwnerReference],
) -> Option<NetworkPolicy> {
    let settings = &ctx.network_policy;
    let np_owners: Vec<OwnerReference> = owners
        .iter()
        .filter(|o| {
            granting
                .iter()
                .any(|p| p.uid().as_deref() == Some(o.uid.as_str()) && network_policy::wanted_by(p, settings))
        })
        .cloned()
        .collect();
    let selector = service_selector(ctx, ns, service)?;
    (!np_owners.is_empty())
        .then(|| network_policy::render(meta(network_policy::name(service), service, &np_owners), &selector, settings))
}

fn service_selector(ctx: &Ctx, ns: &str, service: &str) -> Option<BTreeMap<String, String>> {
    ctx.services
        .get(&kube::runtime::reflector::ObjectRef::new(service).within(ns))
        .and_then(|s| s.spec.as_ref()?.selector.clone())
        .filter(|s| !s.is_empty())
}

async fn reconcile_network_policy(
    ctx: &Ctx,
    ns: &str,
    service: &str,
    granting: &[&UsagePlan],
    owners: &[OwnerReference],
) -> Result<(), Error> {
    let nps: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    match desired_network_policy(ctx, ns, service, granting, owners) {
        Some(np) => {
            if apply_if_changed(&nps, &np).await? {
                tracing::info!(namespace = ns, service, "NetworkPolicy written");
            }
        }
        // Nobody wants it, or no Service selector to take the pods from (nothing safe to select): the Exposure
        // condition says which.
        None => delete_if_ours(&nps, &network_policy::name(service)).await?,
    }
    Ok(())
}

/// Every way Service `service` can be reached past the proxy: the Service itself ([`crate::exposure`]) and the
/// isolation of its pods ([`crate::network_policy`]). Our own policy counts as written when the Service's last
/// reconcile succeeded (`reconciled`; so a status written right after it does not race the NetworkPolicy watch).
pub(crate) fn exposure_findings(
    ctx: &Ctx,
    ns: &str,
    service: &str,
    svc: Option<&Service>,
    reconciled: bool,
) -> Vec<crate::exposure::Finding> {
    let mut findings = crate::exposure::check_service(service, svc, ctx.sidecar_ports.proxy);
    if svc.is_none() {
        return findings;
    }
    let ours = network_policy::name(service);
    let cached = ctx.network_policies.state_filter(|np| in_namespace(np, ns));
    let mut policies: Vec<NetworkPolicy> = cached
        .iter()
        .filter(|np| !(reconciled && np.name_any() == ours && is_ours(&np.metadata)))
        .map(|np| (**np).clone())
        .collect();
    if reconciled {
        let plans = ctx.plans.state_filter(|p| in_namespace(p, ns) && crate::model::grants(p, service));
        let granting: Vec<&UsagePlan> = plans.iter().map(|p| &**p).collect();
        let owners: Vec<OwnerReference> =
            plans.iter().map(|p| OwnerReference { uid: p.uid().unwrap_or_default(), ..Default::default() }).collect();
        policies.extend(desired_network_policy(ctx, ns, service, &granting, &owners));
    }
    let pods: Vec<std::sync::Arc<Pod>> = ctx.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(ns)
            && p.annotations().get(ANNOTATION_SERVICE).map(String::as_str) == Some(service)
            && p.metadata.deletion_timestamp.is_none()
    });
    let pods: Vec<&Pod> = pods.iter().map(|p| &**p).collect();
    let selector = svc.and_then(|s| s.spec.as_ref()?.selector.clone());
    findings.extend(network_policy::isolation_findings(
        service,
        selector.as_ref(),
        &pods,
        policies.iter(),
        &ctx.sidecar_ports,
    ));
    findings
}

fn is_ours(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/managed-by")).map(String::as_str) == Some(MANAGED_BY)
}

/// Whether the sidecars of Service `service` verify client certificates: every sidecar pod of it has `--client-ca`
/// (what the webhook injected, whatever the annotation says now). `None`: no sidecar pod exists yet.
pub(crate) fn sidecars_verify_certificates(ctx: &Ctx, ns: &str, service: &str) -> Option<bool> {
    let pods: Vec<std::sync::Arc<Pod>> = ctx.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(ns)
            && p.annotations().get(ANNOTATION_SERVICE).map(String::as_str) == Some(service)
            && p.metadata.deletion_timestamp.is_none()
    });
    let sidecars: Vec<&Container> =
        pods.iter().filter_map(|p| p.spec.as_ref()?.containers.iter().find(|c| c.name == CONTAINER_NAME)).collect();
    if sidecars.is_empty() {
        return None;
    }
    Some(sidecars.iter().all(|c| {
        crate::sidecar_contract::arg_value(c.args.as_deref().unwrap_or_default(), proxy_flag::CLIENT_CA)
            .is_some_and(|v| !v.is_empty())
    }))
}

/// Removes the Role, RoleBinding and NetworkPolicy of a Service no plan grants any more.
pub async fn delete_access(ctx: &Ctx, ns: &str, service: &str) -> Result<(), Error> {
    delete_if_ours(&Api::<RoleBinding>::namespaced(ctx.client.clone(), ns), &sidecar_rbac_name(service)).await?;
    delete_if_ours(&Api::<Role>::namespaced(ctx.client.clone(), ns), &sidecar_rbac_name(service)).await?;
    delete_if_ours(&Api::<NetworkPolicy>::namespaced(ctx.client.clone(), ns), &network_policy::name(service)).await?;
    Ok(())
}

/// Trims a cached Pod to what is read from it: labels, the service and app-loopback annotations and the
/// ServiceAccount (sidecar RBAC, isolation check), the sidecar container's name, ports and `--client-ca` argument
/// (`CertificatesVerifiable`), phase and pod IP (`Enforced`: which sidecar to ask, where).
pub fn trim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    if let Some(a) = p.metadata.annotations.as_mut() {
        a.retain(|k, _| k == ANNOTATION_SERVICE || k == ANNOTATION_APP_LOOPBACK);
    }
    let spec = p.spec.take().unwrap_or_default();
    let sidecar = spec.containers.into_iter().find(|c| c.name == CONTAINER_NAME).map(|c| Container {
        name: c.name,
        ports: c.ports,
        // Whether it verifies client certificates (`CertificatesVerifiable`).
        args: c.args.map(|a| a.into_iter().filter(|a| a.starts_with(proxy_flag::CLIENT_CA)).collect()),
        ..Default::default()
    });
    p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
        service_account_name: spec.service_account_name,
        containers: sidecar.into_iter().collect(),
        ..Default::default()
    });
    p.status = p.status.take().map(|s| PodStatus { phase: s.phase, pod_ip: s.pod_ip, ..Default::default() });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use serde_json::json;

    fn pod(service: &str, sa: Option<&str>, inject: bool) -> Pod {
        let mut p = Pod {
            spec: Some(PodSpec { service_account_name: sa.map(Into::into), ..Default::default() }),
            ..Default::default()
        };
        if inject {
            p.metadata.labels = Some(BTreeMap::from([(INJECT_KEY.to_string(), "true".to_string())]));
        }
        p.metadata.annotations = Some(BTreeMap::from([(ANNOTATION_SERVICE.to_string(), service.to_string())]));
        p
    }

    #[test]
    fn service_accounts_of_opted_in_pods_of_the_service() {
        let pods = [
            pod("orders", Some("sc"), true),
            pod("orders", Some("sc"), true),
            pod("orders", None, true),
            pod("orders", Some("x"), false),
            pod("billing", Some("y"), true),
        ];
        assert_eq!(sidecar_service_accounts(pods.iter(), "orders"), ["default", "sc"]);
        assert!(sidecar_service_accounts(pods.iter(), "none").is_empty());
    }

    #[test]
    fn trimmed_pods_keep_what_isolation_and_enforced_read() {
        use k8s_openapi::api::core::v1::{ContainerPort, PodStatus};
        let mut p = pod("orders", Some("sc"), true);
        p.metadata.annotations.as_mut().unwrap().extend([
            (ANNOTATION_APP_LOOPBACK.to_string(), "true".to_string()),
            ("kubectl.kubernetes.io/last-applied-configuration".to_string(), "{...}".to_string()),
        ]);
        let port = ContainerPort { name: Some("portcullis-adm".into()), container_port: 9901, ..Default::default() };
        p.spec.as_mut().unwrap().containers = vec![
            Container { name: "app".into(), image: Some("app:1".into()), ..Default::default() },
            Container {
                name: CONTAINER_NAME.into(),
                image: Some("proxy:1".into()),
                ports: Some(vec![port.clone()]),
                ..Default::default()
            },
        ];
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.1.2.3".into()),
            message: Some("long".into()),
            ..Default::default()
        });
        trim_pod(&mut p);
        let a = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(a.len(), 2, "{a:?}");
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("sc"));
        assert_eq!(spec.containers.len(), 1);
        assert_eq!((spec.containers[0].name.as_str(), spec.containers[0].image.as_deref()), (CONTAINER_NAME, None));
        assert_eq!(spec.containers[0].ports.as_deref(), Some(&[port][..]));
        let st = p.status.unwrap();
        assert_eq!((st.phase.as_deref(), st.pod_ip.as_deref(), st.message), (Some("Running"), Some("10.1.2.3"), None));
    }

    #[test]
    fn role_names_exactly_the_tables() {
        let r = sidecar_role("orders", &[]);
        assert_eq!(r.metadata.name.as_deref(), Some("portcullis-sidecar-orders"));
        let rule = &r.rules.unwrap()[0];
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        assert_eq!(rule.resource_names.as_ref().unwrap(), &all_names("orders"));
        let b = sidecar_binding("shop", "orders", &["sc".into()], &[]);
        assert_eq!(b.role_ref.name, "portcullis-sidecar-orders");
        assert_eq!(b.subjects.unwrap()[0].name, "sc");
    }

    #[test]
    fn covers_ignores_defaults_but_sees_changes() {
        let have = json!({"metadata": {"name": "a", "uid": "u"}, "subjects": [{"kind": "ServiceAccount", "name": "sc", "apiGroup": ""}]});
        assert!(json_covers(
            &have,
            &json!({"metadata": {"name": "a"}, "subjects": [{"kind": "ServiceAccount", "name": "sc"}]})
        ));
        assert!(!json_covers(&have, &json!({"subjects": []})));
        assert!(!json_covers(&have, &json!({"subjects": [{"name": "other"}]})));
        assert!(json_covers(&json!({"metadata": {}}), &json!({"subjects": []})));
    }
}
