//! `kubectl portcullis` end to end: the plugin binary (`kubectl-portcullis`) run against the real API server, with
//! the controller running and a real sidecar (a `portcullis-proxy` at the pod IP stand-in 127.0.0.2, reading its
//! table from the API server, counting in a real Redis) in front of an echo app. Every answer of the plugin is
//! checked against what the sidecar really does: `check`'s verdict against the sidecar's status for the same
//! request, `keys rotate`/`create`/`revoke` by sending the keys right after the command returns (it returns only
//! once every sidecar enforces the change), `usage` against the requests admitted.

use crate::common::sidecar::{request, start_echo, workspace_binary};
use crate::common::*;
use crate::enforced::{Sidecar, app_container, common_free_port, injected_pod, ip, run_pod};
use kube::api::{Api, Patch, PatchParams};
use portcullis_controller::crd::*;
use portcullis_controller::enforcement::Settings;
use portcullis_controller::store::StoreSettings;
use portcullis_controller::webhook::inject::InjectSettings;
use portcullis_testkit::redis::RedisServer;
use portcullis_testkit::wait_for;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Runs `kubectl-portcullis -n <ns> ARGS` with the admin kubeconfig: (exit code, stdout, stderr).
async fn plugin(env: &Env, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(workspace_binary("kubectl-portcullis"))
        .arg("--kubeconfig")
        .arg(env.cp.admin_kubeconfig())
        .args(["-n", &env.ns])
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .expect("running kubectl-portcullis");
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    eprintln!("$ kubectl portcullis {}\n{o}{e}", args.join(" "));
    (out.status.code().unwrap_or(-1), o, e)
}

/// ApiClient acme of both tests: plan `partners`, from 127.0.0.1, one key `k1` the controller generates.
fn acme() -> ApiClientSpec {
    ApiClientSpec {
        usage_plans: vec!["partners".into()],
        source_ranges: vec!["127.0.0.1/32".into()],
        keys: vec![KeySpec { name: Some("k1".into()), generate: Some(GenerateSpec {}), ..Default::default() }],
        ..client_spec(&[], &[], "unused", "unused")
    }
}

/// The sidecar's status for `GET /v1/orders` with `key` from `from`.
async fn status(from: IpAddr, proxy: SocketAddr, key: &str) -> u16 {
    request(from, proxy, key).await.unwrap_or_else(|e| panic!("request through the sidecar: {e}")).status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_portcullis_end_to_end() {
    let env = env("plugin").await;
    let redis = RedisServer::start();
    let ctl = start_controller_with(&env, "plugin-1", &format!("pc-{}", env.ns), None, {
        let url = redis.url();
        move |c| {
            c.enforcement = Settings {
                grace: Duration::from_secs(1),
                max_backoff: Duration::from_millis(500),
                timeout: Duration::from_secs(1),
                ..Settings::default()
            };
            c.store = Some(StoreSettings {
                url,
                username: None,
                password: None,
                timeout: Duration::from_millis(500),
                sidecar_timeout: None,
                credentials_secret: None,
                check_every: Duration::from_secs(1),
                usage_every: Duration::from_secs(1),
            });
            c.own_namespace = SYSTEM_NS.into();
        }
    })
    .await;
    create_plan(
        &env,
        UsagePlan::new(
            "partners",
            UsagePlanSpec {
                services: vec![ServiceGrant {
                    name: "orders".into(),
                    routes: Some(vec![RouteSpec { path_prefix: "/v1".into(), methods: Some(vec!["GET".into()]) }]),
                }],
                throttle: None,
                quota: Some(QuotaSpec { limit: 1000, period: QuotaPeriod::Day }),
                global_limits: None,
                quota_scope: Some(QuotaScopeSpec::Global),
                on_store_unavailable: None,
                network_policy: None,
            },
        ),
    )
    .await;
    create_client(&env, "acme", acme()).await;

    // One "pod" of Service orders at 127.0.0.2 with its sidecar (table from the API server, counts in Redis).
    let pod_ip = ip(2);
    let (proxy_port, admin_port) = (common_free_port(&[pod_ip]), common_free_port(&[pod_ip]));
    let mut settings = InjectSettings::new("ghcr.io/portcullis/portcullis-proxy:test");
    (settings.proxy_port, settings.admin_port) = (proxy_port, admin_port);
    run_pod(&env, &injected_pod("orders-0", "orders", "orders-sc", app_container(), 8080, &[], &settings), pod_ip)
        .await;
    let token = env.cp.service_account_token(&env.ns, "orders-sc").await;
    let upstream = start_echo().await;
    let _sidecar = Sidecar::start(
        env.cp.dir(),
        "plugin-orders-0",
        &[
            format!("--listen={pod_ip}:{proxy_port}"),
            format!("--admin-listen={pod_ip}:{admin_port}"),
            format!("--upstream={upstream}"),
            format!("--tables-from=configmap/{}/portcullis-table-orders", env.ns),
            format!("--store-url={}", redis.url()),
            "--store-timeout=500ms".into(),
            "--replica-id=orders-0".into(),
        ],
        &[
            ("KUBECONFIG", env.cp.kubeconfig_for_token(&token).display().to_string()),
            ("POD_NAME", "orders-0".to_string()),
        ],
    );
    let proxy = SocketAddr::new(pod_ip, proxy_port);
    let (local, elsewhere) = (ip(1), ip(3));
    // Counting in the store from the first request (before it is up, requests count under the Local fallback).
    let admin = SocketAddr::new(pod_ip, admin_port);
    wait_for(T, "the sidecar ready with the store up", || async {
        let (status, body) = http_get(admin, "/readyz").await?;
        (status.contains("200") && body.contains("store: up")).then_some(())
    })
    .await;

    // keys show: the generated key, where it is kept, its fingerprint; --reveal prints the key alone.
    let k1 = wait_for(T, "acme's k1 generated", || async {
        let (code, out, _) = plugin(&env, &["keys", "show", "acme", "--reveal", "k1"]).await;
        (code == 0).then(|| out.trim().to_string())
    })
    .await;
    assert!(k1.starts_with("pcl_") && !k1.contains('\n'), "{k1:?}");
    let (code, out, _) = plugin(&env, &["keys", "show", "acme"]).await;
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with("k1 ")).unwrap_or_else(|| panic!("no k1 row: {out}"));
    assert!(
        row.contains("generated (secret acme-key-k1)") && row.contains("sha256:") && row.ends_with("never"),
        "{row}"
    );
    wait_for(T, "the sidecar admitting k1", || async { (status(local, proxy, &k1).await == 200).then_some(()) }).await;

    // check: the verdict is the sidecar's, for each request.
    let cases: [(IpAddr, &str, &str, u16, &str); 4] = [
        (local, "GET", "/v1/orders", 200, "ALLOWED"),
        (elsewhere, "GET", "/v1/orders", 403, "spec.sourceRanges of ApiClient"),
        (local, "POST", "/v1/orders", 403, "routes of ApiClient"),
        (local, "GET", "/v2/orders", 403, "routes of ApiClient"),
    ];
    for (from, method, path, want, words) in cases {
        let from_s = from.to_string();
        let (code, out, _) = plugin(&env, &["check", "acme", "--from", &from_s, method, path]).await;
        assert_eq!(code, if want == 200 { 0 } else { 3 }, "{method} {path} from {from}: {out}");
        assert!(out.contains(words), "{method} {path} from {from}: {out}");
        if want != 200 {
            assert!(out.contains(&format!("REFUSED: {want} ")), "{out}");
        }
        // What the sidecar does with the same request.
        let key = format!("x-api-key: {k1}");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: orders\r\n{key}\r\nConnection: close\r\n\r\n");
        let got = raw_status(from, proxy, &req).await;
        assert_eq!(got, want, "the sidecar answered {got} to {method} {path} from {from}, check said {want}");
    }

    // keys rotate --remove-old: when it returns, the new key works and the old one is refused, at once.
    let (code, out, err) = plugin(&env, &["keys", "rotate", "acme", "--remove-old"]).await;
    assert_eq!(code, 0, "{err}");
    let k2 = out.trim().to_string();
    assert!(k2.starts_with("pcl_") && k2 != k1, "{out}");
    assert!(err.contains("new key k2 is enforced") && err.contains("removed key(s) k1"), "{err}");
    assert_eq!(status(local, proxy, &k2).await, 200, "the new key, right after rotate returned");
    assert_eq!(status(local, proxy, &k1).await, 401, "the old key, right after rotate returned");

    // keys create: a second key, working when the command returns; revoke: refused when it returns.
    let (code, out, err) = plugin(&env, &["keys", "create", "acme", "--name", "ci"]).await;
    assert_eq!(code, 0, "{err}");
    let ci = out.trim().to_string();
    assert_eq!(status(local, proxy, &ci).await, 200, "the created key, right after create returned");
    let (code, _, err) = plugin(&env, &["keys", "revoke", "acme", "ci"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(status(local, proxy, &ci).await, 401, "the revoked key, right after revoke returned");
    assert_eq!(status(local, proxy, &k2).await, 200);

    // Errors name the object and the fix; nothing changes.
    let (code, _, err) = plugin(&env, &["keys", "revoke", "acme", "k2"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("every key of the client") && err.contains("keys create"), "{err}");
    let (code, _, err) = plugin(&env, &["keys", "revoke", "acme", "k9"]).await;
    assert!(code == 1 && err.contains("no key named \"k9\" (named keys: k2;"), "{err}");
    let (code, _, err) = plugin(&env, &["check", "nobody", "--from", "127.0.0.1", "GET", "/"]).await;
    assert!(code == 1 && err.contains(&format!("ApiClient {}/nobody not found", env.ns)), "{err}");
    let (code, _, err) = plugin(&env, &["status", "web"]).await;
    assert!(code == 1 && err.contains("Service") && err.contains("/web has no table"), "{err}");
    assert_eq!(status(local, proxy, &k2).await, 200);

    // status: the revision the controller wrote, the sidecar pod, Enforced as the controller sees it.
    let revision = read_table(&env, "orders").await.expect("a table").0.revision;
    let (code, out, _) = plugin(&env, &["status"]).await;
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with("orders ")).unwrap_or_else(|| panic!("no orders row: {out}"));
    assert!(line.contains(&revision[..12]) && line.contains("partners"), "{line}");
    assert!(out.contains("orders-0 (Running, 127.0.0.2)"), "{out}");
    assert!(out.contains("usageplan/partners: Enforced=True"), "{out}");

    // usage: what the sidecar admitted, counted in the store (every 200 above: k1 ×2, k2 ×3, ci ×1).
    let admitted = 2 + 3 + 1;
    let want = format!("{admitted} {:>10} {:>10}", 1000, 1000 - admitted);
    let out = wait_for(T, &format!("usage showing {admitted} used"), || async {
        let (_, out, _) = plugin(&env, &["usage", "acme"]).await;
        out.lines().any(|l| l.starts_with("acme") && l.contains(&want)).then_some(out)
    })
    .await;
    assert!(out.contains("partners") && out.contains("Day"), "{out}");

    // A quota used up (the limit lowered to what was used): check says 429 as the sidecar does.
    Api::<UsagePlan>::namespaced(env.admin.clone(), &env.ns)
        .patch("partners", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"quota": {"limit": admitted}}})))
        .await
        .unwrap();
    let out = wait_for(T, "check refusing on the quota", || async {
        let (code, out, _) = plugin(&env, &["check", "acme", "--from", "127.0.0.1", "GET", "/v1/orders"]).await;
        (code == 3).then_some(out)
    })
    .await;
    assert!(out.contains("REFUSED: 429 quota_exceeded") && out.contains("UsagePlan partners"), "{out}");
    wait_for(T, "the sidecar refusing on the quota", || async {
        (status(local, proxy, &k2).await == 429).then_some(())
    })
    .await;
    ctl.stop().await.unwrap();
}

/// The status of the raw request `req` sent from `from`.
async fn raw_status(from: IpAddr, to: SocketAddr, req: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap()
}

/// What the API server and a missing controller can answer the plugin, through the real API server: a user without
/// RBAC is refused before anything is written; with no controller running, `keys create` writes the key entry, then
/// times out saying so and how to get the key (so running it again does not add a second one); the ApiClient deleted
/// while the plugin waits ends the wait at once with "not found" rather than at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_portcullis_when_refused_or_left_waiting() {
    let env = env("plugin-refused").await;
    create_client(&env, "acme", acme()).await;
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let keys_of = |c: &ApiClient| c.spec.keys.iter().filter_map(|k| k.name.clone()).collect::<Vec<_>>();

    // 403: a ServiceAccount with no RBAC at all. Refused on the read, nothing written.
    let token = env.cp.service_account_token(&env.ns, "nobody").await;
    let out = tokio::process::Command::new(workspace_binary("kubectl-portcullis"))
        .arg("--kubeconfig")
        .arg(env.cp.kubeconfig_for_token(&token))
        .args(["-n", &env.ns, "keys", "create", "acme", "--timeout", "5s"])
        .env_remove("KUBECONFIG")
        .output()
        .await
        .expect("running kubectl-portcullis");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("$ kubectl portcullis keys create acme (as nobody)\n{err}");
    assert_ne!(out.status.code(), Some(0), "a user without RBAC must fail");
    assert!(err.contains("forbidden for you"), "the refusal names itself: {err}");
    assert!(out.stdout.is_empty(), "no key on stdout");
    assert_eq!(keys_of(&clients.get("acme").await.unwrap()), ["k1"], "nothing written");

    // No controller: the entry is written, the wait times out, and the error says the key exists and how to get it.
    let started = std::time::Instant::now();
    let (code, out, err) = plugin(&env, &["keys", "create", "acme", "--name", "late", "--timeout", "2s"]).await;
    assert_ne!(code, 0, "not generated, not enforced: a failure");
    assert!(out.is_empty(), "no key on stdout: {out}");
    assert!(err.contains("not within 2 s"), "the timeout is named: {err}");
    assert!(err.contains("late IS written"), "the error says the entry exists: {err}");
    assert!(err.contains("--reveal late") && err.contains("keys revoke acme late"), "and what to do: {err}");
    assert!(started.elapsed() < Duration::from_secs(20), "bounded by --timeout: {:?}", started.elapsed());
    assert_eq!(keys_of(&clients.get("acme").await.unwrap()), ["k1", "late"]);

    // The ApiClient deleted while the plugin waits: the wait ends with "not found", long before its timeout.
    let bin = workspace_binary("kubectl-portcullis");
    let waiting = tokio::process::Command::new(bin)
        .arg("--kubeconfig")
        .arg(env.cp.admin_kubeconfig())
        .args(["-n", &env.ns, "keys", "create", "acme", "--name", "gone", "--timeout", "120s"])
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running kubectl-portcullis");
    wait_for(T, "the plugin's entry written", || async {
        keys_of(&clients.get("acme").await.ok()?).iter().any(|k| k == "gone").then_some(())
    })
    .await;
    let deleted_at = std::time::Instant::now();
    clients.delete("acme", &Default::default()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), waiting.wait_with_output())
        .await
        .expect("the plugin stops waiting once the ApiClient is gone")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("$ kubectl portcullis keys create acme --name gone (deleted while waiting)\n{err}");
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("was deleted while waiting") && err.contains("not found"), "the deletion is named: {err}");
    assert!(!err.contains("IS written"), "a deleted client's key is not said to exist: {err}");
    assert!(deleted_at.elapsed() < Duration::from_secs(10), "ended by the deletion, not the timeout");
}
