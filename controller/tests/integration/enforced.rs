//! `Enforced`, confirmed by real sidecars, and the loopback-only app end to end.
//!
//! Pods never run here (no kubelet), so each "pod" is a Pod object — built by the webhook's own injection code,
//! its `status.podIP` set through the status subresource to a loopback address (127.0.0.2, .3, .4) — and a real
//! `portcullis-proxy` process listening on that address, reading its table from the API server with the pod's
//! ServiceAccount token (or, to play a stuck sidecar, from a file). The controller asks each one
//! `GET /revision` on `podIP:adminPort`, exactly as in a cluster.

use crate::common::sidecar::proxy_binary;
use crate::common::*;
use k8s_openapi::api::core::v1::{Container, ContainerPort, HTTPGetAction, Pod, PodSpec, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use portcullis_controller::crd::*;
use portcullis_controller::enforcement::Settings;
use portcullis_controller::webhook::inject::{
    ANNOTATION_APP_LOOPBACK, ANNOTATION_SERVICE, ANNOTATION_UPSTREAM_PORT, CONTAINER_NAME, Decision, INJECT_KEY,
    InjectSettings, decide,
};
use portcullis_testkit::wait_for;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

/// A running `portcullis-proxy` process, killed when dropped.
pub(crate) struct Sidecar {
    child: Child,
}

impl Sidecar {
    /// Starts the proxy with `args` and `env`, logging to `<log_dir>/<name>-<random>.log`.
    pub(crate) fn start(log_dir: &Path, name: &str, args: &[String], env: &[(&str, String)]) -> Sidecar {
        let log = std::fs::File::create(log_dir.join(format!("{name}-{}.log", portcullis_testkit::random_hex(3))))
            .expect("proxy log file");
        let mut cmd = Command::new(proxy_binary());
        cmd.args(args).args(["--log-format", "pretty"]).stdout(log.try_clone().unwrap()).stderr(log);
        cmd.env_remove("KUBECONFIG").env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Sidecar { child: cmd.spawn().unwrap_or_else(|e| panic!("starting portcullis-proxy for {name}: {e}")) }
    }

    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A port free on every one of `ips` (the sidecars' admin port is one number for all pods, as in a cluster).
pub(crate) fn common_free_port(ips: &[IpAddr]) -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind(SocketAddr::new(ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if ips[1..].iter().all(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, port)).is_ok()) {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// An opted-in Pod of `service` (app on `upstream`) as the webhook would store it (sidecar injected with `s`).
pub(crate) fn injected_pod(
    name: &str,
    service: &str,
    sa: &str,
    app: Container,
    upstream: u16,
    annotations: &[(&str, &str)],
    s: &InjectSettings,
) -> Pod {
    let mut a: std::collections::BTreeMap<String, String> = [
        (INJECT_KEY.to_string(), "true".to_string()),
        (ANNOTATION_SERVICE.to_string(), service.to_string()),
        (ANNOTATION_UPSTREAM_PORT.to_string(), upstream.to_string()),
    ]
    .into();
    a.extend(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [(INJECT_KEY.to_string(), "true".to_string()), ("app".to_string(), service.to_string())].into(),
            ),
            annotations: Some(a),
            ..Default::default()
        },
        spec: Some(PodSpec { service_account_name: Some(sa.into()), containers: vec![app], ..Default::default() }),
        ..Default::default()
    };
    let Decision::Inject(patch) = decide(&pod, "ignored", s) else { panic!("the webhook would not inject {name}") };
    let mut v = serde_json::to_value(&pod).unwrap();
    json_patch::patch(&mut v, &patch).unwrap();
    serde_json::from_value(v).unwrap()
}

pub(crate) fn app_container() -> Container {
    Container { name: "app".into(), image: Some("registry.invalid/app:1".into()), ..Default::default() }
}

/// Creates `pod` and marks it Running at `pod_ip` through the status subresource.
pub(crate) async fn run_pod(env: &Env, pod: &Pod, pod_ip: IpAddr) {
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &env.ns);
    let name = pod.metadata.name.clone().unwrap();
    pods.create(&PostParams::default(), pod).await.unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
    let status =
        json!({"status": {"phase": "Running", "podIP": pod_ip.to_string(), "podIPs": [{"ip": pod_ip.to_string()}]}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("setting the status of pod {name}: {e}"));
}

/// Waits until `kind/name` has `Enforced` = `status` (with `reason`) for its current generation; returns the message.
async fn wait_enforced(env: &Env, kind: &str, name: &str, status: &str, reason: &str) -> String {
    wait_enforced_with(env, kind, name, status, reason, "").await
}

/// Like [`wait_enforced`], also waiting for a message starting with `prefix`.
async fn wait_enforced_with(env: &Env, kind: &str, name: &str, status: &str, reason: &str, prefix: &str) -> String {
    let started = std::time::Instant::now();
    let what = format!("{kind} {name} Enforced={status} ({reason}) {prefix:?}");
    let msg = wait_for(Duration::from_secs(90), &what, || async {
        let (conds, gen_ok) = match kind {
            "ApiClient" => {
                let c = Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns).get_opt(name).await.ok()??;
                let st = c.status?;
                (st.conditions, st.observed_generation == c.metadata.generation)
            }
            _ => {
                let p = Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns).get_opt(name).await.ok()??;
                let st = p.status?;
                (st.conditions, st.observed_generation == p.metadata.generation)
            }
        };
        let c = condition(&conds, "Enforced")?;
        (gen_ok && c.status == status && c.reason == reason && c.message.starts_with(prefix)).then(|| c.message.clone())
    })
    .await;
    eprintln!("{what}: {:?}", started.elapsed());
    msg
}

async fn set_source_ranges(env: &Env, client: &str, ranges: &[&str]) {
    let patch = json!({"spec": {"sourceRanges": ranges}});
    Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns)
        .patch(client, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn current_revision(env: &Env, service: &str) -> String {
    read_table(env, service).await.expect("a table").1.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforced_follows_what_the_sidecars_serve() {
    let env = env("enforced").await;
    let ctl = start_controller_with(&env, "enforced-1", &format!("pc-{}", env.ns), None, |c| {
        c.enforcement = Settings {
            grace: Duration::from_secs(1),
            max_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            ..Settings::default()
        };
    })
    .await;
    let admin_port = common_free_port(&[ip(2), ip(3), ip(4)]);
    let mut settings = InjectSettings::new("ghcr.io/portcullis/portcullis-proxy:test");
    settings.admin_port = admin_port;
    let token = env.cp.service_account_token(&env.ns, "orders-sc").await;
    let kubeconfig = env.cp.kubeconfig_for_token(&token);
    let index = format!("configmap/{}/portcullis-table-orders", env.ns);

    create_secret(&env, "keys", &[("k", "enforced-key-0123456789abcdef"), ("k2", "enforced-key-2-0123456789abcdef")])
        .await;
    create_plan(
        &env,
        UsagePlan::new(
            "partners",
            UsagePlanSpec {
                services: vec![ServiceGrant { name: "orders".into(), routes: None }],
                throttle: None,
                quota: None,
                global_limits: None,
                quota_scope: None,
                on_store_unavailable: None,
                network_policy: None,
            },
        ),
    )
    .await;
    create_client(&env, "acme", client_spec(&["partners"], &["10.0.0.0/8"], "keys", "k")).await;
    // No sidecar runs yet: written, not enforced.
    wait_client_condition(&env, "acme", "Programmed", "True", None).await;
    let msg = wait_enforced(&env, "ApiClient", "acme", "False", "NoSidecars").await;
    assert!(msg.contains("no running pod"), "{msg}");

    let logs = env.cp.dir().to_path_buf();
    let api_sidecar = |pod: &str, addr: IpAddr| {
        Sidecar::start(
            &logs,
            pod,
            &[
                format!("--listen={addr}:0"),
                format!("--admin-listen={addr}:{admin_port}"),
                "--upstream=127.0.0.1:9".into(),
                format!("--tables-from={index}"),
            ],
            &[("KUBECONFIG", kubeconfig.display().to_string()), ("POD_NAME", pod.to_string())],
        )
    };
    for (pod, addr) in [("orders-0", ip(2)), ("orders-1", ip(3))] {
        run_pod(&env, &injected_pod(pod, "orders", "orders-sc", app_container(), 8080, &[], &settings), addr).await;
    }
    let _a = api_sidecar("orders-0", ip(2));
    let mut b = api_sidecar("orders-1", ip(3));

    // 1. Both sidecars serve the revision: True, counted, on the client and its plan.
    let r1 = current_revision(&env, "orders").await;
    let msg = wait_enforced(&env, "ApiClient", "acme", "True", "Enforced").await;
    assert_eq!(msg, format!("2/2 sidecars serve revision {} or newer", &r1[..12]));
    let msg = wait_enforced(&env, "UsagePlan", "partners", "True", "Enforced").await;
    assert_eq!(msg, format!("2/2 sidecars serve revision {}", &r1[..12]));
    // Enforced is not part of Ready.
    wait_client_condition(&env, "acme", "Ready", "True", None).await;

    // 2. One sidecar stopped, a new revision: False, naming the pod; back when it is.
    b.stop();
    set_source_ranges(&env, "acme", &["10.1.0.0/16"]).await;
    let msg = wait_enforced(&env, "ApiClient", "acme", "False", "SidecarsUnreachable").await;
    let r2 = current_revision(&env, "orders").await;
    assert_ne!(r1, r2);
    assert!(msg.starts_with(&format!("1/2 sidecars serve revision {} or newer", &r2[..12])), "{msg}");
    assert!(msg.contains("pod orders-1 unreachable") && !msg.contains("orders-0"), "{msg}");
    let _b = api_sidecar("orders-1", ip(3));
    let msg = wait_enforced(&env, "ApiClient", "acme", "True", "Enforced").await;
    assert_eq!(msg, format!("2/2 sidecars serve revision {} or newer", &r2[..12]));

    // 3. A third pod whose sidecar is stuck on a table file: a new revision stays False until it serves it too.
    let file = env.cp.dir().join(format!("stuck-{}.json", env.ns));
    let write_table_file = |t: &portcullis_table::Table| std::fs::write(&file, t.to_json_pretty()).unwrap();
    write_table_file(&read_table(&env, "orders").await.unwrap().1);
    run_pod(&env, &injected_pod("orders-2", "orders", "orders-sc", app_container(), 8080, &[], &settings), ip(4)).await;
    let _c = Sidecar::start(
        &logs,
        "orders-2",
        &[
            format!("--listen={}:0", ip(4)),
            format!("--admin-listen={}:{admin_port}", ip(4)),
            "--upstream=127.0.0.1:9".into(),
            format!("--tables={}", file.display()),
        ],
        &[("POD_NAME", "orders-2".to_string())],
    );
    let msg = wait_enforced_with(&env, "ApiClient", "acme", "True", "Enforced", "3/3").await;
    assert_eq!(msg, format!("3/3 sidecars serve revision {} or newer", &r2[..12]));
    set_source_ranges(&env, "acme", &["10.2.0.0/16"]).await;
    let msg = wait_enforced(&env, "ApiClient", "acme", "False", "SidecarsBehind").await;
    let r3 = current_revision(&env, "orders").await;
    assert!(msg.starts_with(&format!("2/3 sidecars serve revision {} or newer", &r3[..12])), "{msg}");
    assert!(msg.contains(&format!("pod orders-2 serves revision {}", &r2[..12])), "{msg}");
    let msg = wait_enforced(&env, "UsagePlan", "partners", "False", "SidecarsBehind").await;
    assert!(msg.contains("orders-2"), "{msg}");
    write_table_file(&read_table(&env, "orders").await.unwrap().1);
    let msg = wait_enforced(&env, "ApiClient", "acme", "True", "Enforced").await;
    assert_eq!(msg, format!("3/3 sidecars serve revision {} or newer", &r3[..12]));

    // A pod that goes away stops counting.
    Api::<Pod>::namespaced(env.admin.clone(), &env.ns)
        .delete("orders-2", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .unwrap();
    set_source_ranges(&env, "acme", &["10.3.0.0/16"]).await;
    let r4 = wait_for(T, "revision r4", || async {
        let r = current_revision(&env, "orders").await;
        (r != r3).then_some(r)
    })
    .await;
    let msg = wait_enforced_with(&env, "ApiClient", "acme", "True", "Enforced", "2/2").await;
    assert_eq!(msg, format!("2/2 sidecars serve revision {} or newer", &r4[..12]));

    // Another client's change makes a new revision; acme's own condition (and status) stays as it was.
    let acme_before = Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns).get("acme").await.unwrap();
    create_client(&env, "beta", client_spec(&["partners"], &["10.9.0.0/16"], "keys", "k2")).await;
    let r5 = wait_for(T, "revision r5", || async {
        let r = current_revision(&env, "orders").await;
        (r != r4).then_some(r)
    })
    .await;
    // The plan follows the current revision.
    let want = format!("2/2 sidecars serve revision {}", &r5[..12]);
    let msg = wait_enforced_with(&env, "UsagePlan", "partners", "True", "Enforced", &want).await;
    assert_eq!(msg, want);
    wait_enforced_with(&env, "ApiClient", "beta", "True", "Enforced", "2/2").await;
    let acme_after = Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns).get("acme").await.unwrap();
    assert_eq!(
        condition(&acme_after.status.unwrap().conditions, "Enforced"),
        condition(&acme_before.status.unwrap().conditions, "Enforced"),
        "another client's revision must not rewrite acme's Enforced"
    );

    // `kubectl get` shows it: the printer columns of both CRDs.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(env.admin.clone());
    for crd in ["apiclients.portcullis.dev", "usageplans.portcullis.dev"] {
        let c = crds.get(crd).await.unwrap();
        let cols = c.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
        let col = cols.iter().find(|c| c.name == "Enforced").unwrap_or_else(|| panic!("{crd}: no Enforced column"));
        assert_eq!(col.json_path, ".status.conditions[?(@.type==\"Enforced\")].status");
    }
    ctl.stop().await.unwrap();
}

/// An app listening on 127.0.0.1 only: a peer dialling the pod IP on the app's port is refused, the same peer
/// through the sidecar gets in (with a key), and the kubelet's view — the probes as the webhook rewrote them —
/// reports the app's health through the sidecar's admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_only_app_is_reachable_only_through_the_sidecar_and_probed_through_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The app: 127.0.0.1 only; /healthz answers 200 or 500.
    let healthy = Arc::new(AtomicBool::new(true));
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    let app_task = tokio::spawn({
        let healthy = healthy.clone();
        async move {
            while let Ok((mut s, _)) = app.accept().await {
                let healthy = healthy.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let Ok(n) = s.read(&mut buf).await else { return };
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if head.starts_with("GET /healthz") && !healthy.load(Ordering::SeqCst) {
                        "500 Internal Server Error"
                    } else {
                        "200 OK"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 3\r\nconnection: close\r\n\r\napp")
                                .as_bytes(),
                        )
                        .await;
                });
            }
        }
    });

    // The Pod as the webhook stores it: loopback annotation, readiness httpGet on a named port, liveness tcpSocket.
    let pod_ip = ip(2);
    let (proxy_port, admin_port) = (common_free_port(&[pod_ip]), common_free_port(&[pod_ip]));
    assert_ne!(proxy_port, admin_port);
    let mut settings = InjectSettings::new("ghcr.io/portcullis/portcullis-proxy:test");
    (settings.proxy_port, settings.admin_port) = (proxy_port, admin_port);
    let app_c = Container {
        name: "app".into(),
        image: Some("registry.invalid/app:1".into()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(app_port),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("/healthz".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(i32::from(app_port)), host: None }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = injected_pod("api-0", "api", "default", app_c, app_port, &[(ANNOTATION_APP_LOOPBACK, "true")], &settings);
    let spec = pod.spec.as_ref().unwrap();
    let sidecar = spec.containers.iter().find(|c| c.name == CONTAINER_NAME).unwrap();
    let app_spec = spec.containers.iter().find(|c| c.name == "app").unwrap();

    // The sidecar, with the webhook's arguments and environment, its listeners moved from 0.0.0.0 to the pod IP
    // stand-in and its table from a file (this test needs no API server).
    let dir = std::env::temp_dir().join(format!("portcullis-loopback-{}", portcullis_testkit::random_hex(4)));
    std::fs::create_dir_all(&dir).unwrap();
    let tables = dir.join("tables.json");
    let key = "loopback-key-0123456789abcdef";
    let table = portcullis_table::Table::new(
        "shop/api",
        [("open".to_string(), portcullis_table::Plan::default())].into(),
        vec![portcullis_table::Client::builder("shop/acme").key(key).source("127.0.0.0/8").plan("open").build()],
    );
    std::fs::write(&tables, table.to_json_pretty()).unwrap();
    let args: Vec<String> = sidecar
        .args
        .clone()
        .unwrap()
        .into_iter()
        .filter(|a| !a.starts_with("--log-format"))
        .map(|a| {
            if a.starts_with("--tables-from=") {
                format!("--tables={}", tables.display())
            } else {
                // Servers listen on loopback only: the pod IP stand-in instead of 0.0.0.0.
                a.replace("=0.0.0.0:", &format!("={pod_ip}:"))
            }
        })
        .collect();
    assert!(args.contains(&format!("--upstream=127.0.0.1:{app_port}")), "{args:?}");
    let env: Vec<(&str, String)> =
        sidecar.env.iter().flatten().filter_map(|e| Some((e.name.as_str(), e.value.clone()?))).collect();
    assert!(env.iter().any(|(k, _)| *k == "PORTCULLIS_APP_PROBES"), "{env:?}");
    let _proxy = Sidecar::start(&dir, "api-0", &args, &env);
    let admin = SocketAddr::new(pod_ip, admin_port);

    // The kubelet's view: the rewritten probes, requested on the pod IP.
    let probe = |p: &Option<Probe>| p.as_ref().unwrap().http_get.clone().unwrap();
    let (ready, live) = (probe(&app_spec.readiness_probe), probe(&app_spec.liveness_probe));
    assert_eq!(
        (ready.port.clone(), live.port.clone()),
        (IntOrString::Int(i32::from(admin_port)), IntOrString::Int(i32::from(admin_port)))
    );
    let (ready, live) = (ready.path.unwrap(), live.path.unwrap());
    let kubelet = |path: String| async move { http_get(admin, &path).await };
    let (status, body) = wait_for(T, "the sidecar's admin port", || kubelet(ready.clone())).await;
    assert!(status.contains(" 200 "), "{status} {body}");
    assert!(kubelet(live.clone()).await.unwrap().0.contains(" 200 "));
    healthy.store(false, Ordering::SeqCst);
    let (status, body) = kubelet(ready.clone()).await.unwrap();
    assert!(status.contains(" 503 ") && body.contains("answered 500"), "{status} {body}");
    healthy.store(true, Ordering::SeqCst);
    assert!(kubelet(ready.clone()).await.unwrap().0.contains(" 200 "));

    // Another "pod" (127.0.0.3) dialling the pod IP on the app's port: refused. Through the sidecar: in.
    let connect_from = |src: IpAddr, to: SocketAddr| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        sock.connect(to).await
    };
    let direct = connect_from(ip(3), SocketAddr::new(pod_ip, app_port)).await;
    assert_eq!(
        direct.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the app's port must not answer on the pod IP"
    );
    let proxy_addr = SocketAddr::new(pod_ip, proxy_port);
    let request = |key: Option<&'static str>| async move {
        let mut s = connect_from(ip(3), proxy_addr).await.expect("the sidecar accepts");
        let key = key.map(|k| format!("x-api-key: {k}\r\n")).unwrap_or_default();
        let req = format!("GET /v1/x HTTP/1.1\r\nhost: api\r\n{key}connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let with_key = request(Some(key)).await;
    assert!(with_key.starts_with("HTTP/1.1 200") && with_key.ends_with("app"), "{with_key}");
    assert!(request(None).await.starts_with("HTTP/1.1 401"));

    // The app stops: the liveness probe through the sidecar says so.
    app_task.abort();
    let _ = app_task.await;
    wait_for(T, "liveness fails once the app is gone", || async {
        kubelet(live.clone()).await.filter(|(s, _)| s.contains(" 503 ")).map(|_| ())
    })
    .await;
    drop(_proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cost of `Enforced` at 1 000 pods: 1 000 Pod objects Running at 127.0.{1..4}.x, each answered by a minimal
/// `/revision` responder (the real admin handler is measured in the proxy's tests; this measures the controller
/// side: pod cache, 1 000 requests, bounded concurrency, status). Run with
/// `cargo test -p portcullis-controller --test integration -- enforced:: --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: 1 000 Pods and 1 000 loopback listeners"]
async fn enforced_at_1000_pods() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PODS: usize = 1000;
    let env = env("enforced-1k").await;
    let addrs: Vec<IpAddr> =
        (0..PODS).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8))).collect();
    let port = common_free_port(&addrs[..4]);
    let revision = Arc::new(std::sync::RwLock::new(String::new()));
    let requests = Arc::new(AtomicU64::new(0));
    let service = format!("{}/orders", env.ns);
    for (i, addr) in addrs.iter().enumerate() {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(*addr, port)).await.expect("loopback listener");
        let (revision, requests, service) = (revision.clone(), requests.clone(), service.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                requests.fetch_add(1, Ordering::Relaxed);
                let body =
                    json!({"service": service, "revision": *revision.read().unwrap(), "pod": format!("orders-{i}")})
                        .to_string();
                let resp =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
    }
    let ctl = start_controller(&env, "enforced-1k").await;
    create_secret(&env, "keys", &[("k", "enforced-1k-key-0123456789abcdef")]).await;
    create_plan(
        &env,
        UsagePlan::new(
            "partners",
            UsagePlanSpec {
                services: vec![ServiceGrant { name: "orders".into(), routes: None }],
                throttle: None,
                quota: None,
                global_limits: None,
                quota_scope: None,
                on_store_unavailable: None,
                network_policy: Some(false),
            },
        ),
    )
    .await;
    create_client(&env, "acme", client_spec(&["partners"], &["10.0.0.0/8"], "keys", "k")).await;
    let mut settings = InjectSettings::new("ghcr.io/portcullis/portcullis-proxy:test");
    settings.admin_port = port;
    let started = std::time::Instant::now();
    for chunk in addrs.chunks(50).enumerate() {
        let (c, chunk) = chunk;
        futures::future::join_all(chunk.iter().enumerate().map(|(j, addr)| {
            let pod = injected_pod(
                &format!("orders-{}", c * 50 + j),
                "orders",
                "default",
                app_container(),
                8080,
                &[],
                &settings,
            );
            let env = &env;
            async move { run_pod(env, &pod, *addr).await }
        }))
        .await;
    }
    eprintln!("created {PODS} running Pods in {:?}", started.elapsed());
    for round in 1..=2 {
        if round == 2 {
            set_source_ranges(&env, "acme", &["10.1.0.0/16"]).await;
        }
        let (old, before) = (revision.read().unwrap().clone(), requests.load(Ordering::Relaxed));
        let rev = wait_for(T, "a new revision", || async {
            let r = read_table(&env, "orders").await?.1.revision;
            (r != old).then_some(r)
        })
        .await;
        let t0 = std::time::Instant::now();
        *revision.write().unwrap() = rev.clone();
        let msg = wait_enforced_with(
            &env,
            "UsagePlan",
            "partners",
            "True",
            "Enforced",
            &format!("{PODS}/{PODS} sidecars serve revision {}", &rev[..12]),
        )
        .await;
        eprintln!(
            "revision {round}: {msg} — {:?} after the sidecars serve it, {} requests",
            t0.elapsed(),
            requests.load(Ordering::Relaxed) - before
        );
    }
    ctl.stop().await.unwrap();
}
