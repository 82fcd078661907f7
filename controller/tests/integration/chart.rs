//! The Helm chart: lint, schema, CRD copies, RBAC identical to `config/rbac`, every rendered object accepted by a
//! real kube-apiserver (server-side dry-run: stronger than offline schema validation, and needs no internet), and a
//! real `helm install` whose RBAC is enough for the webhook's self-managed certificate.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use portcullis_controller::webhook::certs;
use portcullis_testkit::{ControlPlane, random_hex};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn chart() -> PathBuf {
    root().join("charts/portcullis")
}

/// Runs helm (the harness's pinned v3 build) with its state kept in the control plane's scratch directory.
fn helm(cp: &ControlPlane, args: &[&str]) -> Result<String, String> {
    let home = cp.dir().join("helm-home");
    let out = Command::new(cp.helm())
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .map_err(|e| format!("running {}: {e}", cp.helm().display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("helm {}: {}\n{stdout}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

/// `helm template` of the chart (offline, kube version pinned to the local control plane's).
fn template(cp: &ControlPlane, release: &str, namespace: &str, set: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec!["template", release, chart.to_str().unwrap(), "-n", namespace, "--kube-version", "1.37.2"];
    for s in set {
        args.extend(["--set", s]);
    }
    helm(cp, &args)
}

fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML parses"))
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
}

/// Rules as a set of sorted tuples, so order of rules and of list items does not matter.
fn normalize(rules: &[PolicyRule]) -> BTreeSet<String> {
    let sorted = |v: &Option<Vec<String>>| {
        let mut v = v.clone().unwrap_or_default();
        v.sort();
        v.join(",")
    };
    rules
        .iter()
        .map(|r| {
            format!(
                "apiGroups=[{}] resources=[{}] resourceNames=[{}] verbs=[{}] nonResourceURLs=[{}]",
                sorted(&r.api_groups),
                sorted(&r.resources),
                sorted(&r.resource_names),
                {
                    let mut v = r.verbs.clone();
                    v.sort();
                    v.join(",")
                },
                sorted(&r.non_resource_urls)
            )
        })
        .collect()
}

#[test]
fn chart_crds_are_exact_copies_of_generated_crds() {
    let fix = "regenerate every copy with `cargo xtask crdgen`";
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect()
    };
    let (generated, copied) = (root().join("crds"), chart().join("files/crds"));
    assert_eq!(names(&generated), names(&copied), "charts/portcullis/files/crds/ holds other files than crds/: {fix}");
    for name in names(&generated) {
        let a = std::fs::read(generated.join(&name)).unwrap();
        let b = std::fs::read(copied.join(&name)).unwrap();
        assert!(a == b, "charts/portcullis/files/crds/{name} differs from crds/{name}: {fix}");
    }
    assert!(!chart().join("crds").exists(), "CRDs in the chart's crds/ would bypass crds.enabled and crds.keep");
}

#[test]
fn chart_lints_and_its_schema_rejects_wrong_types() {
    let cp = own_cp();
    let chart = chart();
    helm(cp, &["lint", "--strict", "--kube-version", "1.37.2", chart.to_str().unwrap()]).expect("helm lint");
    template(cp, "portcullis", "portcullis-system", &[]).expect("default values render");
    template(
        cp,
        "portcullis",
        "portcullis-system",
        &[
            "serviceMonitor.enabled=true",
            "webhook.url=https://127.0.0.1:9443/mutate",
            "webhook.existingCertSecret=my-cert",
            "webhook.failurePolicy=Ignore",
            "sidecar.proxyPort=7000",
            "crds.enabled=false",
            "replicaCount=1",
            "podDisruptionBudget.enabled=false",
            "controllerNetworkPolicy.enabled=false",
            "podMonitor.enabled=true",
            "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "extraEnv[0].name=HTTPS_PROXY",
            "extraEnv[0].value=http://proxy:3128",
            "strategy.type=Recreate",
            "strategy.rollingUpdate=null",
        ],
    )
    .expect("non-default values render");
    template(
        cp,
        "portcullis",
        "portcullis-system",
        &[
            "webhook.certManager.enabled=true",
            "webhook.certManager.issuerRef.name=ca",
            "podDisruptionBudget.maxUnavailable=50%",
        ],
    )
    .expect("cert-manager values render");
    for bad in [
        "webhook.timeoutSeconds=abc",
        "webhook.failurePolicy=Sometimes",
        "replicaCount=many",
        "sidecar.proxyPort=70000",
        "serviceMonitor.enabled=maybe",
        "networkPolicy.enabled=maybe",
        "networkPolicy.adminFrom[0].everyone=true",
        "webhook.url=http://insecure/mutate",
        "store.url=redis://user:pw@redis:6379",
        "store.url=http://redis",
        "store.timeout=2",
        "store.usageRefreshSeconds=0",
        "crds.enabled=yes",
        "image.digest=latest",
        "webhook.certManager.enabled=maybe",
        "webhook.certManager.issuerRef.kind=Vault",
        "podMonitor.scrapeFrom[0].everyone=true",
        "extraVolumeMounts[0].name=no-mount-path",
        "topologySpreadConstraints[0].maxSkew=1",
        "podDisruptionBudget.maxUnavailable=one",
        "unknownValue=1",
    ] {
        let err = template(cp, "portcullis", "portcullis-system", &[bad]).expect_err(bad);
        assert!(err.contains("values don't meet the specifications of the schema"), "{bad}: {err}");
    }
}

#[test]
fn chart_rendering_is_hardened_and_scoped() {
    let cp = own_cp();
    let docs = documents(&template(cp, "portcullis", "portcullis-system", &[]).unwrap());
    let deploy = find(&docs, "Deployment", "portcullis-controller");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"].as_str(), Some("ghcr.io/portcullis/portcullis-controller:0.1.0"));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(sc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    for want in ["--metrics-listen=0.0.0.0:9090", "--webhook-listen=0.0.0.0:9443", "--leader-elect=true"] {
        assert!(args.contains(&want), "{want} missing from {args:?}");
    }
    assert!(args.contains(&"--sidecar-image=ghcr.io/portcullis/portcullis-proxy:0.1.0"), "{args:?}");

    let mwc = find(&docs, "MutatingWebhookConfiguration", "portcullis");
    let wh = &mwc["webhooks"][0];
    assert_eq!(wh["failurePolicy"].as_str(), Some("Fail"));
    assert_eq!(wh["sideEffects"].as_str(), Some("None"));
    assert_eq!(wh["timeoutSeconds"].as_i64(), Some(5));
    assert_eq!(wh["reinvocationPolicy"].as_str(), Some("Never"));
    assert_eq!(wh["objectSelector"]["matchLabels"]["portcullis.dev/inject"].as_str(), Some("true"));
    let excluded: Vec<&str> = wh["namespaceSelector"]["matchExpressions"][0]["values"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for ns in ["kube-system", "kube-public", "kube-node-lease", "portcullis-system"] {
        assert!(excluded.contains(&ns), "{ns} must never be sent to the webhook: {excluded:?}");
    }
    assert_eq!(wh["clientConfig"]["service"]["name"].as_str(), Some("portcullis-webhook"));
    assert!(wh["clientConfig"]["caBundle"].is_null(), "an empty caBundle value leaves the field to the controller");

    let docs = documents(
        &template(cp, "other", "ns", &["webhook.url=https://127.0.0.1:1/mutate", "webhook.caBundle=Zm9v"]).unwrap(),
    );
    let wh = &find(&docs, "MutatingWebhookConfiguration", "other-portcullis")["webhooks"][0];
    assert_eq!(wh["clientConfig"]["url"].as_str(), Some("https://127.0.0.1:1/mutate"));
    assert!(wh["clientConfig"]["service"].is_null());
    assert_eq!(wh["clientConfig"]["caBundle"].as_str(), Some("Zm9v"));
}

/// `v` with every integral float as an integer: Helm's `fromYaml | toYaml` writes the generated `minimum: 0.0` as
/// `minimum: 0`, the same number to the API server.
fn integral(v: &serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 => Value::Number((f as i64).into()),
            _ => v.clone(),
        },
        Value::Sequence(items) => Value::Sequence(items.iter().map(integral).collect()),
        Value::Mapping(m) => Value::Mapping(m.iter().map(|(k, v)| (k.clone(), integral(v))).collect()),
        _ => v.clone(),
    }
}

/// The chart conventions of docs/chart.md: templated CRDs kept on uninstall, an HA controller (two replicas spread
/// across nodes, a PDB, a rolling update that never drops below the replica count), overridable security contexts
/// and probes, the cert-manager path, the extra* hooks, and the PodMonitor's peers admitted by the sidecars' policy.
#[test]
fn chart_conventions_render_as_documented() {
    let cp = own_cp();
    let render = |set: &[&str]| documents(&template(cp, "portcullis", "portcullis-system", set).unwrap());
    let pod_spec = |docs: &[serde_yaml::Value]| find(docs, "Deployment", "portcullis-controller")["spec"].clone();
    let kinds =
        |docs: &[serde_yaml::Value], kind: &str| docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).count();

    let docs = render(&[]);
    assert_eq!(kinds(&docs, "CustomResourceDefinition"), 2);
    for name in ["apiclients.portcullis.dev", "usageplans.portcullis.dev"] {
        let crd = find(&docs, "CustomResourceDefinition", name);
        assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(), Some("keep"), "{name}");
        // The rendered CRD is the generated one (labels and the annotation aside).
        let file = std::fs::read_to_string(
            root().join("crds").join(format!("portcullis.dev_{}.yaml", name.split('.').next().unwrap())),
        )
        .unwrap();
        let generated: serde_yaml::Value = serde_yaml::from_str(&file).unwrap();
        assert_eq!(integral(&crd["spec"]), integral(&generated["spec"]), "{name}: the template changed the CRD's spec");
    }
    let spec = pod_spec(&docs);
    assert_eq!(spec["replicas"].as_i64(), Some(2));
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_i64(), Some(0));
    let pod = &spec["template"]["spec"];
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"].as_str(), Some("kubernetes.io/hostname"));
    assert_eq!(anti["labelSelector"]["matchLabels"], spec["selector"]["matchLabels"]);
    let pdb = find(&docs, "PodDisruptionBudget", "portcullis-controller");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], spec["selector"]["matchLabels"]);
    let np = find(&docs, "NetworkPolicy", "portcullis-controller");
    assert_eq!(np["spec"]["podSelector"]["matchLabels"], spec["selector"]["matchLabels"]);
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"].as_str(), Some("webhook"));
    assert!(np["spec"]["ingress"][0]["from"].is_null(), "the API server must reach the webhook from anywhere");
    assert_eq!(pod["securityContext"]["runAsUser"].as_i64(), Some(65532));
    assert_eq!(kinds(&docs, "PodMonitor") + kinds(&docs, "Certificate") + kinds(&docs, "Issuer"), 0);
    assert_eq!(
        kinds(&docs, "ClusterRole"),
        2,
        "the webhook's caBundle ClusterRole is there for the self-managed certificate"
    );

    // crds.keep=false / crds.enabled=false.
    let docs = render(&["crds.keep=false"]);
    assert!(find(&docs, "CustomResourceDefinition", "apiclients.portcullis.dev")["metadata"]["annotations"].is_null());
    assert_eq!(kinds(&render(&["crds.enabled=false"]), "CustomResourceDefinition"), 0);

    // OpenShift-style UID ranges: the UID/GID can be removed, the rest of the hardening stays; probes overridable.
    let docs = render(&[
        "podSecurityContext.runAsUser=null",
        "podSecurityContext.runAsGroup=null",
        "readinessProbe.periodSeconds=2",
        "livenessProbe=null",
        "extraEnv[0].name=HTTPS_PROXY",
        "extraEnv[0].value=http://proxy:3128",
        "extraVolumes[0].name=ca",
        "extraVolumes[0].configMap.name=corp-ca",
        "extraVolumeMounts[0].name=ca",
        "extraVolumeMounts[0].mountPath=/etc/ssl/corp",
        "topologySpreadConstraints[0].maxSkew=1",
        "topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
        "topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    ]);
    let spec = pod_spec(&docs);
    let pod = &spec["template"]["spec"];
    let psc = &pod["securityContext"];
    assert!(psc["runAsUser"].is_null() && psc["runAsGroup"].is_null(), "{psc:?}");
    assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["periodSeconds"].as_i64(), Some(2));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"), "an override merges with the default");
    assert!(c["livenessProbe"].is_null());
    assert!(c["env"].as_sequence().unwrap().iter().any(|e| e["name"].as_str() == Some("HTTPS_PROXY")));
    assert!(c["volumeMounts"].as_sequence().unwrap().iter().any(|m| m["mountPath"].as_str() == Some("/etc/ssl/corp")));
    assert!(pod["volumes"].as_sequence().unwrap().iter().any(|v| v["configMap"]["name"].as_str() == Some("corp-ca")));
    let tsc = &pod["topologySpreadConstraints"][0];
    assert_eq!(
        tsc["labelSelector"]["matchLabels"], spec["selector"]["matchLabels"],
        "labelSelector defaults to the pods"
    );
    assert!(pod["affinity"]["podAntiAffinity"].is_null(), "a given affinity replaces the default");
    assert!(pod["affinity"]["nodeAffinity"].is_mapping());

    // cert-manager: Issuer + Certificate into the Secret the controller mounts, the CA injected by annotation, and no
    // RBAC for a self-managed certificate.
    let docs = render(&["webhook.certManager.enabled=true"]);
    let cert = find(&docs, "Certificate", "portcullis-webhook");
    assert_eq!(cert["spec"]["secretName"].as_str(), Some("portcullis-webhook-tls"));
    assert_eq!(cert["spec"]["dnsNames"][0].as_str(), Some("portcullis-webhook.portcullis-system.svc"));
    assert_eq!(cert["spec"]["issuerRef"]["name"].as_str(), Some("portcullis-webhook-selfsigned"));
    find(&docs, "Issuer", "portcullis-webhook-selfsigned");
    let mwc = find(&docs, "MutatingWebhookConfiguration", "portcullis");
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str(),
        Some("portcullis-system/portcullis-webhook")
    );
    let pod = &pod_spec(&docs)["template"]["spec"];
    let args: Vec<&str> =
        pod["containers"][0]["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--webhook-cert-dir=/etc/portcullis/webhook-tls"), "{args:?}");
    assert!(
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"].as_str() == Some("portcullis-webhook-tls"))
    );
    assert_eq!(kinds(&docs, "ClusterRole"), 1, "no caBundle-writing ClusterRole with cert-manager");
    assert!(
        !docs.iter().any(|d| d["kind"].as_str() == Some("Role")
            && d["metadata"]["name"].as_str() == Some("portcullis-webhook-certs"))
    );
    let docs = render(&[
        "webhook.certManager.enabled=true",
        "webhook.certManager.issuerRef.name=corp",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    assert_eq!(kinds(&docs, "Issuer"), 0);
    assert_eq!(
        find(&docs, "Certificate", "portcullis-webhook")["spec"]["issuerRef"]["kind"].as_str(),
        Some("ClusterIssuer")
    );

    // PodMonitor: every sidecar's admin port, and Prometheus admitted there by the policies the controller writes.
    let docs = render(&["podMonitor.enabled=true"]);
    let pm = find(&docs, "PodMonitor", "portcullis-sidecars");
    assert_eq!(pm["spec"]["selector"]["matchLabels"]["portcullis.dev/inject"].as_str(), Some("true"));
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"].as_str(), Some("portcullis-adm"));
    assert_eq!(pm["spec"]["namespaceSelector"]["any"].as_bool(), Some(true));
    let args = pod_spec(&docs)["template"]["spec"]["containers"][0]["args"].clone();
    let admin_from = args
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().unwrap().strip_prefix("--network-policy-admin-from="))
        .unwrap()
        .to_string();
    let peers: serde_json::Value = serde_json::from_str(&admin_from).unwrap();
    assert_eq!(peers[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "monitoring", "{peers}");
}

#[test]
fn chart_rbac_is_identical_to_config_rbac() {
    let cp = own_cp();
    let docs = documents(&template(cp, "portcullis", "portcullis-system", &[]).unwrap());
    for (file, kind, chart_name) in [
        ("config/rbac/controller-clusterrole.yaml", "ClusterRole", "portcullis-controller"),
        ("config/rbac/controller-role-leader-election.yaml", "Role", "portcullis-leader-election"),
    ] {
        let path = root().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is the source of truth for the chart's {kind}: {e}", path.display()));
        let rendered = serde_yaml::to_string(find(&docs, kind, chart_name)).unwrap();
        let (want, got) = if kind == "ClusterRole" {
            (
                serde_yaml::from_str::<ClusterRole>(&text).unwrap().rules.unwrap_or_default(),
                serde_yaml::from_str::<ClusterRole>(&rendered).unwrap().rules.unwrap_or_default(),
            )
        } else {
            (
                serde_yaml::from_str::<Role>(&text).unwrap().rules.unwrap_or_default(),
                serde_yaml::from_str::<Role>(&rendered).unwrap().rules.unwrap_or_default(),
            )
        };
        let (want, got) = (normalize(&want), normalize(&got));
        assert!(
            want == got,
            "the chart's {kind} {chart_name} drifted from {file}; make charts/portcullis/templates match it.\n\
             only in {file}: {:#?}\nonly in the chart: {:#?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        );
    }
}

/// Every rendered object is sent to the real kube-apiserver with `dryRun=All`: schema, defaulting and validation
/// run exactly as for a real install, without persisting anything.
#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() {
    let cp = own_cp();
    let ns = cp.namespace("chart-dry").await;
    let release = format!("dry-{}", random_hex(3));
    let store =
        ["store.url=redis://redis.store:6379/0", "store.existingSecret=redis-auth", "store.sidecarTimeout=50ms"];
    let mut yaml =
        template(cp, &release, &ns, &[&["webhook.url=https://127.0.0.1:1/mutate"][..], &store].concat()).unwrap();
    // The one-replica Redis example of docs/global-limits-controller.md is checked the same way.
    yaml.push_str("\n---\n");
    yaml.push_str(&std::fs::read_to_string(root().join("examples/redis/redis.yaml")).unwrap());
    let client = cp.admin_client().await;
    let mut kinds = BTreeSet::new();
    for doc in documents(&yaml) {
        let obj: DynamicObject = serde_yaml::from_value(doc).unwrap();
        let tm = obj.types.clone().expect("apiVersion/kind");
        let gvk = GroupVersionKind::try_from(&tm).unwrap();
        let (ar, caps) = kube::discovery::pinned_kind(&client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("the API server does not serve {}: {e}", tm.kind));
        let name = obj.metadata.name.clone().expect("metadata.name");
        let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            Api::namespaced_with(client.clone(), obj.metadata.namespace.as_deref().unwrap_or(&ns), &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        // Forced: the CRDs may exist already, installed by `helm install` in the test next to this one (same
        // control plane), whose field manager owns their labels.
        api.patch(&name, &PatchParams::apply("portcullis-chart-test").dry_run().force(), &Patch::Apply(&obj))
            .await
            .unwrap_or_else(|e| panic!("the API server rejects rendered {} {name}: {e}", tm.kind));
        kinds.insert(tm.kind);
    }
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "MutatingWebhookConfiguration",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(kind), "no {kind} was rendered and checked: {kinds:?}");
    }
}

/// A real `helm install` (no `--wait`: no pods run here) creates everything; then, authenticated as the chart's
/// ServiceAccount, the webhook's self-managed certificate code creates its Secret, reuses it, and writes the
/// caBundle of its own webhook entry — proving the chart's RBAC is enough and nothing else is touched. Then
/// `helm upgrade` (the caBundle survives), `helm upgrade --force` (it does not: the controller must repair it) and
/// `helm uninstall`, listing what is left behind.
#[tokio::test]
async fn helm_install_creates_everything_and_its_rbac_suffices_for_webhook_certs() {
    let cp = own_cp();
    let ns = cp.namespace("chart-install").await;
    let release = format!("inst-{}", random_hex(3));
    let fullname = format!("{release}-portcullis");
    let chart = chart();
    let kubeconfig = cp.admin_kubeconfig().to_str().unwrap().to_string();
    helm(
        cp,
        &[
            "install",
            &release,
            chart.to_str().unwrap(),
            "-n",
            &ns,
            "--kubeconfig",
            &kubeconfig,
            "--set",
            "webhook.url=https://127.0.0.1:1/mutate",
        ],
    )
    .expect("helm install");
    let client = cp.admin_client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ["apiclients.portcullis.dev", "usageplans.portcullis.dev"] {
        assert!(crds.get_opt(crd).await.unwrap().is_some(), "helm install did not create CRD {crd}");
    }
    let roles: Api<ClusterRole> = Api::all(client.clone());
    assert!(roles.get_opt(&format!("{fullname}-controller")).await.unwrap().is_some(), "no controller ClusterRole");
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let before = mwcs.get(&fullname).await.expect("helm install created the MutatingWebhookConfiguration");
    assert!(before.webhooks.as_ref().unwrap()[0].client_config.ca_bundle.is_none());

    let token = cp.service_account_token(&ns, &fullname).await;
    let as_controller = cp.client_for_token(&token).await;
    let secret_name = format!("{fullname}-webhook-tls");
    let service = format!("{fullname}-webhook");
    let first = certs::ensure_secret(&as_controller, &ns, &secret_name, &service)
        .await
        .expect("the chart's RBAC lets the webhook create its certificate Secret");
    let second = certs::ensure_secret(&as_controller, &ns, &secret_name, &service).await.unwrap();
    assert_eq!(first, second, "a valid certificate is reused, not re-issued");
    let info = certs::inspect(&first.cert_pem).unwrap();
    assert!(info.dns_names.contains(&format!("{service}.{ns}.svc")), "{info:?}");
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get(&secret_name).await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));

    certs::patch_ca_bundle(&as_controller, &fullname, "inject.portcullis.dev", &first.ca_pem)
        .await
        .expect("the chart's RBAC lets the webhook write its own caBundle");
    let after = mwcs.get(&fullname).await.unwrap();
    let wh = &after.webhooks.as_ref().unwrap()[0];
    assert_eq!(wh.client_config.ca_bundle.as_ref().map(|b| b.0.clone()), Some(first.ca_pem.as_bytes().to_vec()));
    let mut expected = before.webhooks.unwrap()[0].clone();
    expected.client_config.ca_bundle = wh.client_config.ca_bundle.clone();
    assert_eq!(wh, &expected, "only the caBundle changed");

    // Least privilege: no other webhook configuration may be touched.
    let other = certs::patch_ca_bundle(&as_controller, "someone-elses-webhooks", "x.example.com", &first.ca_pem).await;
    assert!(format!("{:?}", other.expect_err("must be forbidden")).contains("403"), "forbidden by RBAC");

    // Leader election as the chart's ServiceAccount: the Lease a running controller leaves behind.
    let leases: Api<Lease> = Api::namespaced(as_controller.clone(), &ns);
    let lease = Lease { metadata: ObjectMeta { name: Some(LEASE.into()), ..Default::default() }, ..Default::default() };
    leases.create(&PostParams::default(), &lease).await.expect("the chart's Role lets the controller create its Lease");

    // `helm upgrade` with a changed value: the caBundle the controller wrote survives (the chart never renders the
    // field, so Helm's three-way merge leaves it alone).
    let ca = wh.client_config.ca_bundle.clone();
    let upgrade = |force: bool, timeout: &str| {
        let mut args = vec!["upgrade", &release, chart.to_str().unwrap(), "-n", &ns, "--kubeconfig", &kubeconfig];
        args.extend(["--set", "webhook.url=https://127.0.0.1:1/mutate", "--set"]);
        let timeout = format!("webhook.timeoutSeconds={timeout}");
        args.push(&timeout);
        if force {
            args.push("--force");
        }
        helm(cp, &args).map(|_| ())
    };
    upgrade(false, "7").expect("helm upgrade");
    let upgraded = mwcs.get(&fullname).await.unwrap().webhooks.unwrap().remove(0);
    assert_eq!(upgraded.timeout_seconds, Some(7), "the upgrade applied");
    assert_eq!(upgraded.client_config.ca_bundle, ca, "helm upgrade must keep the caBundle the controller wrote");

    // `helm upgrade --force` replaces each object with the rendered one (PUT), so a field only the controller sets
    // is cleared: the chart cannot keep it, the controller's caBundle repair has to put it back (its own test). A
    // caBundle the chart renders (`webhook.caBundle`) or cert-manager injects is not affected this way.
    upgrade(true, "8").expect("helm upgrade --force");
    let forced = mwcs.get(&fullname).await.unwrap().webhooks.unwrap().remove(0);
    assert_eq!(forced.timeout_seconds, Some(8), "the forced upgrade applied");
    assert_eq!(
        forced.client_config.ca_bundle, None,
        "helm upgrade --force is documented (docs/chart.md) to clear the caBundle"
    );

    helm(cp, &["uninstall", &release, "-n", &ns, "--kubeconfig", &kubeconfig]).expect("helm uninstall");

    // What `helm uninstall` leaves behind, as docs/chart.md ("Uninstall") lists it: the CRDs (crds.keep) and the two
    // objects the controller created at run time, the webhook certificate Secret and the leader Lease. Everything
    // the chart rendered otherwise is gone.
    for crd in ["apiclients.portcullis.dev", "usageplans.portcullis.dev"] {
        assert!(crds.get_opt(crd).await.unwrap().is_some(), "crds.keep: CRD {crd} must survive helm uninstall");
    }
    let admin_secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    assert!(
        admin_secrets.get_opt(&secret_name).await.unwrap().is_some(),
        "the webhook Secret is left (controller-made)"
    );
    let admin_leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    assert!(admin_leases.get_opt(LEASE).await.unwrap().is_some(), "the Lease is left (controller-made)");
    assert!(mwcs.get_opt(&fullname).await.unwrap().is_none(), "the webhook configuration is removed");
    let selector = ListParams::default().labels(&format!("app.kubernetes.io/instance={release}"));
    let mut left: Vec<String> = Vec::new();
    for (kind, names) in [
        (
            "ClusterRole",
            Api::<ClusterRole>::all(client.clone())
                .list(&selector)
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect::<Vec<_>>(),
        ),
        (
            "CustomResourceDefinition",
            crds.list(&selector).await.unwrap().items.into_iter().filter_map(|o| o.metadata.name).collect(),
        ),
        (
            "Deployment",
            Api::<Deployment>::namespaced(client.clone(), &ns)
                .list(&selector)
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect(),
        ),
        (
            "Service",
            Api::<Service>::namespaced(client.clone(), &ns)
                .list(&selector)
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect(),
        ),
        (
            "ServiceAccount",
            Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                .list(&selector)
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect(),
        ),
        (
            "PodDisruptionBudget",
            Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
                .list(&selector)
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect(),
        ),
        (
            "NetworkPolicy",
            Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
                .list(&selector)
                .await
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect(),
        ),
    ] {
        left.extend(names.into_iter().map(|n| format!("{kind}/{n}")));
    }
    assert_eq!(
        left,
        ["CustomResourceDefinition/apiclients.portcullis.dev", "CustomResourceDefinition/usageplans.portcullis.dev"],
        "of the chart's own objects only the kept CRDs may outlive helm uninstall"
    );
}

/// The leader-election Lease name (the controller's `--lease-name` default).
const LEASE: &str = "portcullis-controller";

/// The webhook/sidecar flags the chart passes are exactly what `WebhookArgs` (flattened into the controller's
/// command line) accepts, with the values the chart means.
#[test]
fn chart_webhook_flags_parse_as_webhook_args() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        webhook: portcullis_controller::webhook::WebhookArgs,
    }
    let cp = own_cp();
    let defaults = [
        "webhook.existingCertSecret=my-cert",
        "sidecar.proxyPort=7000",
        "sidecar.trustedProxies={10.0.0.0/8,192.168.0.7}",
        "sidecar.proxyProtocol=true",
        "sidecar.clientCASecret=partners-ca",
        "sidecar.requireTLS=true",
        "sidecar.workers=3",
        "sidecar.adminAddress=::",
        "sidecar.image.pullPolicy=Always",
    ];
    for set in [&[][..], &defaults[..]] {
        let docs = documents(&template(cp, "portcullis", "portcullis-system", set).unwrap());
        let c = &find(&docs, "Deployment", "portcullis-controller")["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .filter(|a| a.starts_with("--webhook-") || a.starts_with("--sidecar-"))
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("portcullis-controller").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("the chart passes flags WebhookArgs rejects: {e}\n{args:?}"));
        let w = cli.webhook;
        assert_eq!(w.webhook_listen.port(), 9443);
        assert_eq!(w.webhook_config_name, "portcullis");
        assert_eq!(w.webhook_service, "portcullis-webhook");
        assert_eq!(w.webhook_namespace, "portcullis-system");
        assert_eq!(w.webhook_cert_secret, if set.is_empty() { "portcullis-webhook-tls" } else { "my-cert" });
        assert_eq!(w.webhook_cert_dir.is_some(), !set.is_empty(), "an existing Secret is mounted and used as cert dir");
        assert_eq!(w.sidecar_image, "ghcr.io/portcullis/portcullis-proxy:0.1.0");
        let s = w.inject_settings().expect("valid sidecar settings");
        assert_eq!(s.proxy_port, if set.is_empty() { 8443 } else { 7000 });
        // The chart-wide defaults of the per-workload settings reach the webhook's settings.
        let d = &s.defaults;
        if set.is_empty() {
            assert_eq!(d, &Default::default());
            assert_eq!(s.image_pull_policy, None);
        } else {
            assert_eq!(d.trusted_proxies, ["10.0.0.0/8", "192.168.0.7"]);
            assert!(d.proxy_protocol && d.require_tls);
            assert_eq!(d.client_ca_secret.as_deref(), Some("partners-ca"));
            assert_eq!(d.workers, Some(3));
            assert_eq!(d.admin_address, Some("::".parse().unwrap()));
            assert_eq!(s.image_pull_policy.as_deref(), Some("Always"));
        }
        let r = s.resources.expect("the chart's sidecar resources are passed on");
        assert_eq!(r.requests.unwrap()["memory"].0, "32Mi");
        assert_eq!(r.limits.unwrap()["memory"].0, "128Mi");
    }
}

/// The NetworkPolicy flags the chart passes parse as `NetworkPolicyArgs`: on by default, the controller's own pods
/// always admitted to the sidecars' admin port (it reads `/revision`), plus `networkPolicy.adminFrom`.
#[test]
fn chart_network_policy_flags_parse_and_admit_the_controller() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        np: portcullis_controller::network_policy::NetworkPolicyArgs,
    }
    let cp = own_cp();
    let monitoring =
        "networkPolicy.adminFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring";
    for set in [&[][..], &["networkPolicy.enabled=false", monitoring][..]] {
        let docs = documents(&template(cp, "portcullis", "portcullis-system", set).unwrap());
        let c = &find(&docs, "Deployment", "portcullis-controller")["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .filter(|a| a.starts_with("--network-policy-"))
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("portcullis-controller").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("the chart passes flags NetworkPolicyArgs rejects: {e}\n{args:?}"));
        let s = cli.np.settings("unused").expect("valid peers");
        assert_eq!(s.default_on, set.is_empty(), "{args:?}");
        let controller = &s.admin_from[0];
        let ns = controller.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(ns["kubernetes.io/metadata.name"], "portcullis-system");
        let pods = controller.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(pods["app.kubernetes.io/component"], "controller");
        assert_eq!(pods["app.kubernetes.io/instance"], "portcullis");
        // The pod selector matches the controller Deployment's pod labels.
        let deploy = find(&docs, "Deployment", "portcullis-controller");
        let labels = &deploy["spec"]["template"]["metadata"]["labels"];
        for (k, v) in pods {
            assert_eq!(labels[k.as_str()].as_str(), Some(v.as_str()), "controller pods lack {k}={v}");
        }
        assert_eq!(s.admin_from.len(), if set.is_empty() { 1 } else { 2 });
        if !set.is_empty() {
            let m = s.admin_from[1].namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
            assert_eq!(m["kubernetes.io/metadata.name"], "monitoring");
        }
    }
}

/// The store values become the controller's `--store-*` flags (parsed here as `StoreArgs`) and its credential
/// environment from `store.existingSecret`; without `store.url` none of it is rendered.
#[test]
fn chart_store_values_become_store_flags_and_credential_env() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        store: portcullis_controller::store::StoreArgs,
    }
    let cp = own_cp();
    let container = |set: &[&str]| {
        let docs = documents(&template(cp, "portcullis", "portcullis-system", set).unwrap());
        find(&docs, "Deployment", "portcullis-controller")["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let store_flags = |c: &serde_yaml::Value| -> Vec<String> {
        c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .filter(|a| a.starts_with("--store-") || a.starts_with("--usage-") || a.starts_with("--sidecar-store"))
            .collect()
    };
    let env_names = |c: &serde_yaml::Value| -> Vec<String> {
        c["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()
    };
    let plain = container(&[]);
    assert!(store_flags(&plain).is_empty(), "{:?}", store_flags(&plain));
    assert!(!env_names(&plain).iter().any(|n| n.starts_with("PORTCULLIS_STORE")));

    let c = container(&[
        "store.url=rediss://redis.store:6380/2",
        "store.existingSecret=redis-auth",
        "store.sidecarTimeout=40ms",
        "store.usageRefreshSeconds=30",
    ]);
    let flags = store_flags(&c);
    let cli = Cli::try_parse_from(std::iter::once("portcullis-controller").chain(flags.iter().map(String::as_str)))
        .unwrap_or_else(|e| {
            panic!(
                "the chart passes store flags StoreArgs rejects: {e}
{flags:?}"
            )
        });
    let env = |k: &str| (k == "PORTCULLIS_STORE_USERNAME").then(|| "portcullis".to_string());
    let s = cli.store.settings(env).expect("valid").expect("a store is configured");
    assert_eq!(s.url, "rediss://redis.store:6380/2");
    assert_eq!(s.timeout, std::time::Duration::from_secs(2));
    assert_eq!(s.sidecar_timeout, Some(std::time::Duration::from_millis(40)));
    assert_eq!(s.usage_every, std::time::Duration::from_secs(30));
    assert_eq!(s.credentials_secret.as_deref(), Some("redis-auth"));
    for (var, key) in [("PORTCULLIS_STORE_USERNAME", "username"), ("PORTCULLIS_STORE_PASSWORD", "password")] {
        let e = c["env"].as_sequence().unwrap().iter().find(|e| e["name"].as_str() == Some(var)).expect(var);
        let r = &e["valueFrom"]["secretKeyRef"];
        assert_eq!((r["name"].as_str(), r["key"].as_str()), (Some("redis-auth"), Some(key)));
    }
}

/// This module's own control plane (see the binary's docs for why it does not share the common one).
fn own_cp() -> &'static ControlPlane {
    static CP: portcullis_testkit::OnceCell = portcullis_testkit::OnceCell::new();
    ControlPlane::once(&CP)
}
