//! Proves the local control plane is the real thing: RBAC enforced, CRDs established, garbage collection and
//! namespace deletion done by a real kube-controller-manager, and a version string Helm will accept.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use portcullis_testkit::{ControlPlane, wait_for};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn admin_lists_namespaces_and_server_is_1_37() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await;
    let names: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("listing namespaces as admin")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for want in ["default", "kube-system"] {
        assert!(names.iter().any(|n| n == want), "namespace {want} missing from {names:?}");
    }
    let v = client.apiserver_version().await.expect("version");
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "37"), "{v:?}");
    assert!(v.git_version.starts_with("v1.37."), "{}", v.git_version);
}

#[tokio::test]
async fn service_account_needs_a_role_binding_to_read_configmaps() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("rbac").await;
    let token = cp.service_account_token(&ns, "reader").await;
    let as_sa: Api<ConfigMap> = Api::namespaced(cp.client_for_token(&token).await, &ns);

    match as_sa.list(&Default::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "expected Forbidden, got {e:?}"),
        other => panic!("a ServiceAccount without RoleBinding listed ConfigMaps: {other:?}"),
    }

    cp.apply_yaml(
        &format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: cm-reader, namespace: {ns}}}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: cm-reader, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}}
subjects:
- {{kind: ServiceAccount, name: reader, namespace: {ns}}}
"#
        ),
        None,
    )
    .await
    .expect("applying Role and RoleBinding");

    // RBAC is served from an informer cache: await the grant instead of assuming it is instant.
    wait_for(T, "the RoleBinding to take effect", || async { as_sa.list(&Default::default()).await.ok() }).await;
    // Still least privilege: writing stays forbidden.
    let cm = ConfigMap { metadata: ObjectMeta { name: Some("x".into()), ..Default::default() }, ..Default::default() };
    match as_sa.create(&PostParams::default(), &cm).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403),
        other => panic!("read-only ServiceAccount created a ConfigMap: {other:?}"),
    }
}

#[tokio::test]
async fn applied_crd_becomes_established() {
    let cp = ControlPlane::shared();
    cp.apply_yaml(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.harness.example.com}
spec:
  group: harness.example.com
  names: {kind: Widget, plural: widgets, singular: widget, listKind: WidgetList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer, minimum: 1}}}
"#,
        None,
    )
    .await
    .expect("applying a CRD");
    let crds: Api<CustomResourceDefinition> = Api::all(cp.admin_client().await);
    wait_for(T, "CRD widgets.harness.example.com to be Established", || async {
        let crd = crds.get("widgets.harness.example.com").await.ok()?;
        let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}

#[tokio::test]
async fn owner_references_are_garbage_collected_and_namespaces_delete() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await;
    let ns = cp.namespace("gc").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta { name: Some("owner".into()), ..Default::default() },
                ..Default::default()
            },
        )
        .await
        .expect("create owner");
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            name: Some("dependent".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().expect("uid"),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &dependent).await.expect("create dependent");
    cms.delete("owner", &DeleteParams::background()).await.expect("delete owner");
    wait_for(T, "the garbage collector to delete the dependent ConfigMap", || async {
        matches!(cms.get_opt("dependent").await, Ok(None)).then_some(())
    })
    .await;

    let nss: Api<Namespace> = Api::all(client);
    nss.delete(&ns, &DeleteParams::default()).await.expect("delete namespace");
    wait_for(T, "the namespace controller to finish deleting the namespace", || async {
        matches!(nss.get_opt(&ns).await, Ok(None)).then_some(())
    })
    .await;
}
