//! Sidecar injection end to end: the chart is `helm install`ed with its webhook pointed at a webhook server running
//! in this process on 127.0.0.1 (serving certificate from the local CA), and the real kube-apiserver calls it
//! while Pods are created. Pods never run (no kubelet); only admission is exercised.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use portcullis_controller::webhook::inject::{
    ANNOTATION_SERVICE, ANNOTATION_TLS_SECRET, ANNOTATION_UPSTREAM_PORT, CONTAINER_NAME, INJECT_KEY, TLS_MOUNT_PATH,
    TLS_VOLUME_NAME,
};
use portcullis_controller::webhook::{Webhook, WebhookArgs};
use portcullis_testkit::{ControlPlane, random_hex, wait_for};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::OnceCell;

const T: Duration = Duration::from_secs(60);

/// The webhook server, on a runtime of its own so it outlives any single test's runtime.
fn webhook_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async move {
                let cp = own_cp();
                let dir = cp.dir().join(format!("webhook-tls-{}", random_hex(3)));
                std::fs::create_dir_all(&dir).unwrap();
                let cert = cp.pki().serving_cert("portcullis-webhook", &[]).expect("serving certificate");
                std::fs::write(dir.join("tls.crt"), &cert.cert_pem).unwrap();
                std::fs::write(dir.join("tls.key"), &cert.key_pem).unwrap();
                let mut args = WebhookArgs::defaults();
                args.webhook_listen = "127.0.0.1:0".parse().unwrap();
                args.webhook_cert_dir = Some(dir);
                args.sidecar_image = "ghcr.io/portcullis/portcullis-proxy:test".into();
                // As when the controller runs with `--store-url` (and `--sidecar-store-timeout=40ms`).
                args.sidecar_store = Some(portcullis_controller::webhook::inject::SidecarStore {
                    url: "redis://redis.store:6379/0".into(),
                    timeout: Some(Duration::from_millis(40)),
                });
                let webhook = Webhook::bind(args, cp.admin_client().await).await.expect("webhook binds");
                tx.send(webhook.local_addr().unwrap()).unwrap();
                webhook.serve(std::future::pending()).await.expect("webhook serves");
            });
        });
        rx.recv_timeout(T).expect("the in-process webhook server did not start within 60s")
    })
}

/// Installs the chart once (release named uniquely: its cluster-scoped objects are named from it) with the
/// webhook URL pointing at [`webhook_server`], and waits until the API server actually calls it.
async fn setup() -> &'static ControlPlane {
    static DONE: OnceCell<()> = OnceCell::const_new();
    let cp = own_cp();
    DONE.get_or_init(|| async {
        let addr = webhook_server();
        let release_ns = cp.namespace("portcullis-system").await;
        let release = format!("wh-{}", random_hex(3));
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/portcullis");
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem());
        let home = cp.dir().join("helm-home");
        let out = Command::new(cp.helm())
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"))
            .arg("install")
            .arg(&release)
            .arg(&chart)
            .args(["-n", &release_ns, "--kubeconfig"])
            .arg(cp.admin_kubeconfig())
            .args(["--set", &format!("webhook.url=https://{addr}/mutate"), "--set", &format!("webhook.caBundle={ca}")])
            .output()
            .expect("running helm");
        assert!(out.status.success(), "helm install failed: {}", String::from_utf8_lossy(&out.stderr));

        // The API server picks webhook configurations up asynchronously: probe with dry-run creates.
        let probe_ns = cp.namespace("wh-probe").await;
        let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &probe_ns);
        let dry = PostParams { dry_run: true, ..Default::default() };
        wait_for(T, "the API server to call the chart's webhook (dry-run pod gets the sidecar)", || {
            let (pods, dry) = (pods.clone(), dry.clone());
            async move {
                let p = pods.create(&dry, &opted_in("probe", "api", "8080")).await.ok()?;
                (sidecars(&p) == 1).then_some(())
            }
        })
        .await;
    })
    .await;
    cp
}

fn pod(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
    let map = |kv: &[(&str, &str)]| Some(kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: map(labels),
            annotations: map(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn opted_in(name: &str, service: &str, port: &str) -> Pod {
    pod(
        name,
        &[(INJECT_KEY, "true")],
        &[(INJECT_KEY, "true"), (ANNOTATION_SERVICE, service), (ANNOTATION_UPSTREAM_PORT, port)],
    )
}

fn sidecars(p: &Pod) -> usize {
    p.spec.as_ref().map(|s| s.containers.iter().filter(|c| c.name == CONTAINER_NAME).count()).unwrap_or(0)
}

fn sidecar(p: &Pod) -> &Container {
    p.spec.as_ref().unwrap().containers.iter().find(|c| c.name == CONTAINER_NAME).expect("sidecar injected")
}

#[tokio::test]
async fn opted_in_pod_gets_the_sidecar_exactly_once() {
    let cp = setup().await;
    let ns = cp.namespace("wh-inject").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);

    let created = pods.create(&PostParams::default(), &opted_in("api-0", "orders", "8080")).await.expect("create");
    assert_eq!(sidecars(&created), 1, "exactly one sidecar: {:?}", created.spec);
    let names: Vec<&str> = created.spec.as_ref().unwrap().containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", CONTAINER_NAME], "the app container stays first");
    let c = sidecar(&created);
    assert_eq!(c.image.as_deref(), Some("ghcr.io/portcullis/portcullis-proxy:test"));
    let args = c.args.clone().unwrap();
    assert!(args.contains(&"--upstream=127.0.0.1:8080".to_string()), "{args:?}");
    assert!(args.contains(&format!("--tables-from=configmap/{ns}/portcullis-table-orders")), "{args:?}");
    assert_eq!(c.security_context.as_ref().unwrap().run_as_non_root, Some(true));

    // What is stored is what was returned.
    assert_eq!(sidecars(&pods.get("api-0").await.unwrap()), 1);

    // Updates do not duplicate it.
    let patch = serde_json::json!({"metadata": {"labels": {"touched": "yes"}}});
    let updated = pods.patch("api-0", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("update");
    assert_eq!(sidecars(&updated), 1);

    // Re-creating from the stored (already injected) object does not duplicate it either.
    let mut again = pods.get("api-0").await.unwrap();
    pods.delete("api-0", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    wait_for(T, "pod api-0 to be deleted", || {
        let pods = pods.clone();
        async move { pods.get_opt("api-0").await.ok().flatten().is_none().then_some(()) }
    })
    .await;
    again.metadata = ObjectMeta {
        name: again.metadata.name.clone(),
        labels: again.metadata.labels.clone(),
        annotations: again.metadata.annotations.clone(),
        ..Default::default()
    };
    again.status = None;
    let recreated = pods.create(&PostParams::default(), &again).await.expect("re-create");
    assert_eq!(sidecars(&recreated), 1, "re-creating an injected pod must not add a second sidecar");

    // And a plain second pod of the same Service gets its own single sidecar.
    let other = pods.create(&PostParams::default(), &opted_in("api-1", "orders", "9000")).await.unwrap();
    assert_eq!(sidecars(&other), 1);
    assert!(sidecar(&other).args.as_ref().unwrap().contains(&"--upstream=127.0.0.1:9000".to_string()));
}

/// With a store configured, the stored Pod's sidecar carries the store flags, its replica id from the downward
/// API, and the credentials from the namespace's `portcullis-store-credentials` Secret (optional: the pod is admitted
/// before the controller's copy exists).
#[tokio::test]
async fn a_configured_store_reaches_the_stored_sidecar() {
    let cp = setup().await;
    let ns = cp.namespace("wh-store").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    pods.create(&PostParams::default(), &opted_in("api-0", "orders", "8080")).await.expect("create");
    let stored = pods.get("api-0").await.unwrap();
    let c = sidecar(&stored);
    let args = c.args.clone().unwrap();
    for want in ["--store-url=redis://redis.store:6379/0", "--store-timeout=40ms", "--replica-id=$(POD_NAME)"] {
        assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
    }
    let env = c.env.clone().unwrap();
    let pod_name = env.iter().find(|e| e.name == "POD_NAME").expect("POD_NAME");
    let field = pod_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "metadata.name");
    for (var, key) in [("PORTCULLIS_STORE_USERNAME", "username"), ("PORTCULLIS_STORE_PASSWORD", "password")] {
        let e = env.iter().find(|e| e.name == var).unwrap_or_else(|| panic!("{var} missing from {env:?}"));
        let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str(), r.optional), ("portcullis-store-credentials", key, Some(true)));
    }
}

#[tokio::test]
async fn pods_without_the_label_are_untouched() {
    let cp = setup().await;
    let ns = cp.namespace("wh-plain").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    let plain = pods.create(&PostParams::default(), &pod("plain", &[("app", "x")], &[])).await.unwrap();
    assert_eq!(sidecars(&plain), 0);
    assert_eq!(plain.spec.unwrap().containers.len(), 1);
    // The annotation alone does not route the pod to the webhook: the objectSelector matches the label only.
    let annotated_only = pod(
        "annotated-only",
        &[],
        &[(INJECT_KEY, "true"), (ANNOTATION_SERVICE, "orders"), (ANNOTATION_UPSTREAM_PORT, "http")],
    );
    let created = pods.create(&PostParams::default(), &annotated_only).await.expect("not sent to the webhook");
    assert_eq!(sidecars(&created), 0);
}

#[tokio::test]
async fn bad_annotations_are_refused_with_a_message_naming_them() {
    let cp = setup().await;
    let ns = cp.namespace("wh-bad").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    for (name, p, annotation, value) in [
        ("bad-port", opted_in("bad-port", "orders", "http"), ANNOTATION_UPSTREAM_PORT, "\"http\""),
        ("proxy-port", opted_in("proxy-port", "orders", "8443"), ANNOTATION_UPSTREAM_PORT, "8443"),
        ("bad-svc", opted_in("bad-svc", "Orders_1", "8080"), ANNOTATION_SERVICE, "\"Orders_1\""),
        (
            "no-svc",
            pod("no-svc", &[(INJECT_KEY, "true")], &[(ANNOTATION_UPSTREAM_PORT, "8080")]),
            ANNOTATION_SERVICE,
            "required",
        ),
    ] {
        match pods.create(&PostParams::default(), &p).await {
            Err(kube::Error::Api(e)) => {
                assert!(
                    e.message.contains(annotation) && e.message.contains(value),
                    "pod {name}: the refusal should name {annotation} and {value}: {}",
                    e.message
                );
                assert!(e.message.contains("inject.portcullis.dev"), "the message says which webhook refused");
            }
            other => panic!("pod {name} should have been refused, got {other:?}"),
        }
        assert!(pods.get_opt(name).await.unwrap().is_none(), "refused pod {name} must not exist");
    }
}

#[tokio::test]
async fn a_tls_secret_annotation_mounts_the_secret_into_the_sidecar_only() {
    let cp = setup().await;
    let ns = cp.namespace("wh-tls").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    let mut p = opted_in("tls-0", "orders", "8080");
    p.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_TLS_SECRET.into(), "orders-tls".into());
    // The API server validates the patched Pod (volume, mount, args) before storing it.
    let created = pods.create(&PostParams::default(), &p).await.expect("create");
    let stored = pods.get("tls-0").await.unwrap();
    for pod in [&created, &stored] {
        let c = sidecar(pod);
        let args = c.args.clone().unwrap();
        assert!(args.contains(&format!("--tls-cert={TLS_MOUNT_PATH}/tls.crt")), "{args:?}");
        assert!(args.contains(&format!("--tls-key={TLS_MOUNT_PATH}/tls.key")), "{args:?}");
        let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == TLS_VOLUME_NAME).expect("mount");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (TLS_MOUNT_PATH, Some(true)));
        let spec = pod.spec.as_ref().unwrap();
        let vol = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == TLS_VOLUME_NAME).expect("volume");
        assert_eq!(vol.secret.as_ref().unwrap().secret_name.as_deref(), Some("orders-tls"));
        let app = spec.containers.iter().find(|c| c.name == "app").unwrap();
        assert!(
            app.volume_mounts.iter().flatten().all(|m| m.name != TLS_VOLUME_NAME),
            "the app container must not see the private key"
        );
    }
    // A pod without the annotation gets no TLS flags.
    let plain = pods.create(&PostParams::default(), &opted_in("plain-0", "orders", "8080")).await.unwrap();
    assert!(!sidecar(&plain).args.as_ref().unwrap().iter().any(|a| a.starts_with("--tls")));
}

/// `portcullis.dev/app-loopback: "true"`: the API server stores the app's httpGet/tcpSocket probes (named and
/// numbered ports) rewritten onto the sidecar's admin port, and the sidecar carries the originals in an
/// environment variable its own parser (`portcullis_table::sidecar`) accepts. Without the annotation they stay.
#[tokio::test]
async fn loopback_app_probes_are_rewritten_onto_the_sidecar_admin_port() {
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction, HTTPHeader, Probe, TCPSocketAction};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use portcullis_controller::webhook::inject::{ANNOTATION_APP_LOOPBACK, DEFAULT_ADMIN_PORT};
    use portcullis_table::sidecar::{APP_PROBES_ENV, ProbeKind, app_health_path, parse_app_probes};

    let cp = setup().await;
    let ns = cp.namespace("wh-probes").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    let http = |port: IntOrString, path: &str| Probe {
        http_get: Some(HTTPGetAction {
            port,
            path: Some(path.into()),
            http_headers: Some(vec![HTTPHeader { name: "X-Probe".into(), value: "kubelet".into() }]),
            ..Default::default()
        }),
        period_seconds: Some(3),
        ..Default::default()
    };
    let tcp =
        |port: IntOrString| Probe { tcp_socket: Some(TCPSocketAction { port, host: None }), ..Default::default() };
    let with_probes = |name: &str, loopback: Option<&str>| {
        let mut p = opted_in(name, "orders", "8080");
        if let Some(v) = loopback {
            p.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_APP_LOOPBACK.into(), v.into());
        }
        let app = &mut p.spec.as_mut().unwrap().containers[0];
        app.ports = Some(vec![
            ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() },
            ContainerPort { name: Some("admin".into()), container_port: 8081, ..Default::default() },
        ]);
        app.liveness_probe = Some(http(IntOrString::String("http".into()), "/livez"));
        app.readiness_probe = Some(http(IntOrString::Int(8081), "/readyz"));
        app.startup_probe = Some(tcp(IntOrString::String("admin".into())));
        p.spec.as_mut().unwrap().containers.push(Container {
            name: "cache".into(),
            image: Some("registry.invalid/cache:1".into()),
            readiness_probe: Some(tcp(IntOrString::Int(6379))),
            ..Default::default()
        });
        p
    };

    pods.create(&PostParams::default(), &with_probes("loop-0", Some("true"))).await.expect("create");
    let stored = pods.get("loop-0").await.unwrap();
    let spec = stored.spec.as_ref().unwrap();
    let admin = IntOrString::Int(i32::from(DEFAULT_ADMIN_PORT));
    for (container, kind) in [
        ("app", ProbeKind::Liveness),
        ("app", ProbeKind::Readiness),
        ("app", ProbeKind::Startup),
        ("cache", ProbeKind::Readiness),
    ] {
        let c = spec.containers.iter().find(|c| c.name == container).unwrap();
        let probe = match kind {
            ProbeKind::Liveness => &c.liveness_probe,
            ProbeKind::Readiness => &c.readiness_probe,
            ProbeKind::Startup => &c.startup_probe,
        };
        let probe = probe.as_ref().unwrap_or_else(|| panic!("{container} {kind:?} probe kept"));
        let h = probe.http_get.as_ref().unwrap_or_else(|| panic!("{container} {kind:?} is an httpGet now"));
        assert_eq!(h.port, admin, "{container} {kind:?}");
        assert_eq!(h.path.as_deref(), Some(app_health_path(container, kind).as_str()));
        assert!(probe.tcp_socket.is_none());
    }
    assert_eq!(spec.containers[0].liveness_probe.as_ref().unwrap().period_seconds, Some(3), "timings kept");
    let env = sidecar(&stored).env.clone().unwrap_or_default();
    let json = env.iter().find(|e| e.name == APP_PROBES_ENV).and_then(|e| e.value.clone()).expect("probes env");
    let probes = parse_app_probes(&json).expect("the sidecar's parser accepts what the webhook wrote");
    let live = probes[&app_health_path("app", ProbeKind::Liveness)].http_get.clone().unwrap();
    assert_eq!((live.port, live.path.as_str(), live.http_headers[0].value.as_str()), (8080, "/livez", "kubelet"));
    let ready = probes[&app_health_path("app", ProbeKind::Readiness)].http_get.clone().unwrap();
    assert_eq!((ready.port, ready.path.as_str()), (8081, "/readyz"));
    assert_eq!(probes[&app_health_path("app", ProbeKind::Startup)].tcp_socket.as_ref().unwrap().port, 8081);
    assert_eq!(probes[&app_health_path("cache", ProbeKind::Readiness)].tcp_socket.as_ref().unwrap().port, 6379);

    // Without the annotation (or with "false") the probes are stored as written and the sidecar gets no probes.
    for (name, v) in [("plain-0", None), ("plain-1", Some("false"))] {
        let want = with_probes(name, v);
        let got = pods.create(&PostParams::default(), &want).await.expect("create");
        // (The API server defaults `scheme: HTTP`; compare what was written.)
        let http_of =
            |p: &Option<Probe>| p.as_ref().and_then(|p| p.http_get.as_ref()).map(|h| (h.port.clone(), h.path.clone()));
        for (g, w) in got.spec.as_ref().unwrap().containers.iter().zip(&want.spec.as_ref().unwrap().containers) {
            assert_eq!(http_of(&g.liveness_probe), http_of(&w.liveness_probe), "{name}");
            assert_eq!(http_of(&g.readiness_probe), http_of(&w.readiness_probe), "{name}");
            assert_eq!(
                g.startup_probe.as_ref().map(|p| &p.tcp_socket),
                w.startup_probe.as_ref().map(|p| &p.tcp_socket)
            );
        }
        assert!(sidecar(&got).env.iter().flatten().all(|e| e.name != APP_PROBES_ENV), "{name}");
    }

    // What cannot be carried through the sidecar is refused, naming container and probe.
    let mut bad = with_probes("bad-0", Some("true"));
    bad.spec.as_mut().unwrap().containers[0].readiness_probe = Some(http(IntOrString::String("nope".into()), "/"));
    match pods.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(e)) => {
            assert!(e.message.contains("\"app\"") && e.message.contains("readinessProbe"), "{}", e.message);
            assert!(e.message.contains("\"nope\""), "{}", e.message);
        }
        other => panic!("a probe on an undeclared port name must be refused, got {other:?}"),
    }
}

/// This module's own control plane (see the binary's docs for why it does not share the common one).
fn own_cp() -> &'static ControlPlane {
    static CP: portcullis_testkit::OnceCell = portcullis_testkit::OnceCell::new();
    ControlPlane::once(&CP)
}

/// Every per-workload annotation, set on one pod: the API server stores (and so validates) a sidecar with each
/// setting as the proxy flag, the resources and the client CA volume; the sidecar contract's unit test parses the
/// same arguments with the proxy's `Cli`.
#[tokio::test]
async fn per_workload_annotations_reach_the_stored_sidecar() {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use portcullis_controller::sidecar_contract::*;
    let cp = setup().await;
    let ns = cp.namespace("wh-settings").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    let mut p = opted_in("set-0", "orders", "8080");
    p.metadata.annotations.as_mut().unwrap().extend(
        [
            (ANNOTATION_TLS_SECRET, "orders-tls"),
            (ANNOTATION_TRUSTED_PROXIES, "10.0.0.0/8, 192.168.7.1"),
            (ANNOTATION_PROXY_PROTOCOL, "true"),
            (ANNOTATION_CLIENT_CA_SECRET, "partners-ca"),
            (ANNOTATION_REQUIRE_TLS, "true"),
            (ANNOTATION_WORKERS, "2"),
            (ANNOTATION_CPU_REQUEST, "50m"),
            (ANNOTATION_MEMORY_REQUEST, "32Mi"),
            (ANNOTATION_CPU_LIMIT, "1"),
            (ANNOTATION_MEMORY_LIMIT, "128Mi"),
            (ANNOTATION_ADMIN_ADDRESS, "::"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    pods.create(&PostParams::default(), &p).await.expect("create");
    let stored = pods.get("set-0").await.unwrap();
    let c = sidecar(&stored);
    let args = c.args.clone().unwrap();
    for want in [
        "--trusted-proxies=10.0.0.0/8,192.168.7.1",
        "--proxy-protocol",
        "--client-ca=/etc/portcullis/client-ca/ca.crt",
        "--require-tls",
        "--workers=2",
        "--admin-listen=[::]:9901",
        "--tls-cert=/etc/portcullis/tls/tls.crt",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
    }
    let r = c.resources.as_ref().expect("resources");
    let q = |m: &Option<std::collections::BTreeMap<String, Quantity>>, k: &str| m.as_ref().unwrap()[k].0.clone();
    assert_eq!((q(&r.requests, "cpu"), q(&r.requests, "memory")), ("50m".into(), "32Mi".into()));
    assert_eq!((q(&r.limits, "cpu"), q(&r.limits, "memory")), ("1".into(), "128Mi".into()));
    let spec = stored.spec.as_ref().unwrap();
    let vol = spec.volumes.iter().flatten().find(|v| v.name == CLIENT_CA_VOLUME_NAME).expect("client CA volume");
    assert_eq!(vol.secret.as_ref().unwrap().secret_name.as_deref(), Some("partners-ca"));
    let keys: Vec<&str> = vol.secret.as_ref().unwrap().items.iter().flatten().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, [CLIENT_CA_KEY]);
    let mount = c.volume_mounts.iter().flatten().find(|m| m.name == CLIENT_CA_VOLUME_NAME).expect("mount");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), (CLIENT_CA_MOUNT_PATH, Some(true)));

    // "false" and "" turn settings off; without annotations nothing of the above is set.
    let mut off = opted_in("set-1", "orders", "8080");
    off.metadata.annotations.as_mut().unwrap().extend(
        [(ANNOTATION_PROXY_PROTOCOL, "false"), (ANNOTATION_TRUSTED_PROXIES, ""), (ANNOTATION_REQUIRE_TLS, "false")]
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    for p in [off, opted_in("set-2", "orders", "8080")] {
        let created = pods.create(&PostParams::default(), &p).await.expect("create");
        let args = sidecar(&created).args.clone().unwrap();
        for flag in ["--trusted-proxies", "--proxy-protocol", "--client-ca", "--require-tls", "--workers"] {
            assert!(!args.iter().any(|a| a.starts_with(flag)), "{flag} in {args:?}");
        }
        assert!(args.contains(&"--admin-listen=0.0.0.0:9901".to_string()), "{args:?}");
        assert!(sidecar(&created).resources.as_ref().is_none_or(|r| r.requests.is_none() && r.limits.is_none()));
    }
}

/// Each per-workload annotation with a bad value (or one that cannot work without another) is refused by the API
/// server with the webhook's message naming the annotation.
#[tokio::test]
async fn bad_per_workload_annotations_are_refused_naming_them() {
    use portcullis_controller::sidecar_contract::*;
    let cp = setup().await;
    let ns = cp.namespace("wh-bad-settings").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, &ns);
    let tls = (ANNOTATION_TLS_SECRET, "orders-tls");
    // (pod name, annotations added, annotation the refusal names, text it contains)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        ("tp", &[(ANNOTATION_TRUSTED_PROXIES, "10.0.0.0/33")], ANNOTATION_TRUSTED_PROXIES, "10.0.0.0/33"),
        ("tp-word", &[(ANNOTATION_TRUSTED_PROXIES, "lb")], ANNOTATION_TRUSTED_PROXIES, "\"lb\""),
        ("pp", &[(ANNOTATION_PROXY_PROTOCOL, "yes")], ANNOTATION_PROXY_PROTOCOL, "\"yes\""),
        ("pp-alone", &[(ANNOTATION_PROXY_PROTOCOL, "true")], ANNOTATION_PROXY_PROTOCOL, ANNOTATION_TRUSTED_PROXIES),
        ("ca-name", &[tls, (ANNOTATION_CLIENT_CA_SECRET, "Partners_CA")], ANNOTATION_CLIENT_CA_SECRET, "Partners_CA"),
        (
            "ca-no-tls",
            &[(ANNOTATION_CLIENT_CA_SECRET, "partners-ca")],
            ANNOTATION_CLIENT_CA_SECRET,
            ANNOTATION_TLS_SECRET,
        ),
        ("rt", &[tls, (ANNOTATION_REQUIRE_TLS, "1")], ANNOTATION_REQUIRE_TLS, "\"1\""),
        ("rt-no-tls", &[(ANNOTATION_REQUIRE_TLS, "true")], ANNOTATION_REQUIRE_TLS, ANNOTATION_TLS_SECRET),
        ("w", &[(ANNOTATION_WORKERS, "-1")], ANNOTATION_WORKERS, "\"-1\""),
        ("w-many", &[(ANNOTATION_WORKERS, "5000")], ANNOTATION_WORKERS, "\"5000\""),
        ("cpu-req", &[(ANNOTATION_CPU_REQUEST, "lots")], ANNOTATION_CPU_REQUEST, "\"lots\""),
        ("mem-req", &[(ANNOTATION_MEMORY_REQUEST, "32mb")], ANNOTATION_MEMORY_REQUEST, "\"32mb\""),
        ("cpu-lim", &[(ANNOTATION_CPU_LIMIT, "1 core")], ANNOTATION_CPU_LIMIT, "\"1 core\""),
        ("mem-lim", &[(ANNOTATION_MEMORY_LIMIT, "-5Mi")], ANNOTATION_MEMORY_LIMIT, "\"-5Mi\""),
        (
            "req-over-lim",
            &[(ANNOTATION_MEMORY_REQUEST, "256Mi"), (ANNOTATION_MEMORY_LIMIT, "128Mi")],
            ANNOTATION_MEMORY_LIMIT,
            "above the memory limit",
        ),
        ("admin", &[(ANNOTATION_ADMIN_ADDRESS, "localhost")], ANNOTATION_ADMIN_ADDRESS, "\"localhost\""),
        ("admin-lo", &[(ANNOTATION_ADMIN_ADDRESS, "127.0.0.1")], ANNOTATION_ADMIN_ADDRESS, "kubelet"),
    ];
    for (name, extra, annotation, value) in cases {
        let mut p = opted_in(name, "orders", "8080");
        p.metadata.annotations.as_mut().unwrap().extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        match pods.create(&PostParams::default(), &p).await {
            Err(kube::Error::Api(e)) => {
                assert!(
                    e.message.contains(annotation) && e.message.contains(value),
                    "pod {name}: the refusal should name {annotation} and {value}: {}",
                    e.message
                );
                assert!(e.message.contains("inject.portcullis.dev"), "{}", e.message);
            }
            other => panic!("pod {name} should have been refused, got {other:?}"),
        }
        assert!(pods.get_opt(name).await.unwrap().is_none(), "refused pod {name} must not exist");
    }
}

/// A self-managed certificate: the webhook writes its CA into the caBundle, is ready while it serves, and writes
/// the caBundle again when someone clears it (as `helm upgrade --force` or a GitOps sync does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_ca_bundle_is_written_again() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::Secret;
    use std::sync::atomic::Ordering;
    let cp = own_cp();
    let client = cp.admin_client().await;
    let ns = cp.namespace("wh-cabundle").await;
    let config_name = format!("wh-repair-{}", random_hex(3));
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    // A configuration no pod matches (objectSelector on a label nobody sets; failurePolicy Ignore).
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": config_name},
        "webhooks": [{"name": "inject.portcullis.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Ignore", "objectSelector": {"matchLabels": {"portcullis.dev/never": "x"}},
                      "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
                      "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                 "resources": ["pods"]}]}]
    }))
    .unwrap();
    configs.create(&PostParams::default(), &mwc).await.unwrap();
    let mut args = WebhookArgs::defaults();
    args.webhook_listen = "127.0.0.1:0".parse().unwrap();
    args.webhook_config_name = config_name.clone();
    args.webhook_namespace = ns.clone();
    args.webhook_ca_bundle_check_seconds = 1;
    let webhook = Webhook::bind(args.clone(), client.clone()).await.expect("webhook binds");
    let ready = webhook.ready_flag();
    assert!(!ready.load(Ordering::SeqCst), "not ready before it serves");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(webhook.serve(async move {
        let _ = stopped.await;
    }));
    wait_for(T, "the webhook ready flag", || async { ready.load(Ordering::SeqCst).then_some(()) }).await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = secrets.get(&args.webhook_cert_secret).await.expect("the certificate Secret");
    let ca = secret.data.as_ref().unwrap()["ca.crt"].0.clone();
    let live = || {
        let configs = configs.clone();
        let name = config_name.clone();
        async move {
            let c = configs.get(&name).await.ok()?;
            Some(c.webhooks?.into_iter().next()?.client_config.ca_bundle.map(|b| b.0).unwrap_or_default())
        }
    };
    assert_eq!(live().await.unwrap(), ca, "written at start");

    let clear = serde_json::json!([{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]);
    let patch: json_patch::Patch = serde_json::from_value(clear).unwrap();
    configs.patch(&config_name, &PatchParams::default(), &Patch::<()>::Json(patch)).await.expect("clear");
    assert!(live().await.unwrap().is_empty(), "cleared");
    let t0 = std::time::Instant::now();
    wait_for(T, "the caBundle written again", || async { (live().await? == ca).then_some(()) }).await;
    eprintln!("caBundle repaired {:?} after it was cleared (check every 1 s)", t0.elapsed());

    let _ = stop.send(());
    task.await.unwrap().expect("serves until stopped");
    assert!(!ready.load(Ordering::SeqCst), "not ready once stopped");
    configs.delete(&config_name, &DeleteParams::default()).await.unwrap();
}
