//! Global limits from the controller's side, against a real `redis-server` (testkit, loopback, ACL user): the plans'
//! `GlobalLimits` condition as the store is reachable, stopped, back, refusing the credentials, or not configured;
//! the default quota scope; the sidecars' credential Secret copied into the namespace and kept in sync; and
//! `ApiClient.status.usage` read from the counts in the store. The counts are written with `portcullis-store`'s
//! own `take` script (what the proxy runs per admitted request), not through a proxy process.
//! Same setup as `cluster.rs`: real kube-apiserver (RBAC on), controller in-process with the least-privilege token.

use crate::common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use portcullis_controller::crd::*;
use portcullis_controller::store::StoreSettings;
use portcullis_store::{Store, StoreConfig, Take};
use portcullis_table::store_keys::{quota_key, quota_key_expires_at, throttle_key};
use portcullis_table::{Period, QuotaScope};
use portcullis_testkit::redis::RedisServer;
use portcullis_testkit::wait_for;
use std::collections::BTreeMap;
use std::time::Duration;

const USER: &str = "portcullis";
const PASSWORD: &str = "store-pw-0a1b2c";

fn plan(name: &str, quota_scope: Option<QuotaScopeSpec>, global_limits: Option<bool>) -> UsagePlan {
    UsagePlan::new(
        name,
        UsagePlanSpec {
            services: vec![ServiceGrant { name: "orders".into(), routes: None }],
            throttle: Some(ThrottleSpec { rate: 100, per: "1s".into(), burst: None }),
            quota: Some(QuotaSpec { limit: 1000, period: QuotaPeriod::Day }),
            global_limits,
            quota_scope,
            on_store_unavailable: None,
            network_policy: None,
        },
    )
}

/// Store settings as the flags would give them, checked every second.
fn store(url: String, username: Option<&str>, password: Option<&str>, secret: Option<String>) -> StoreSettings {
    StoreSettings {
        url,
        username: username.map(Into::into),
        password: password.map(Into::into),
        timeout: Duration::from_millis(500),
        sidecar_timeout: None,
        credentials_secret: secret,
        check_every: Duration::from_secs(1),
        usage_every: Duration::from_secs(1),
    }
}

async fn start(env: &Env, id: &str, store: Option<StoreSettings>) -> Running {
    start_controller_with(env, id, &format!("pc-{}", env.ns), None, move |c| {
        c.store = store;
        c.own_namespace = SYSTEM_NS.into();
    })
    .await
}

/// Waits until UsagePlan `name` has condition `t` = `status` with `reason`; returns the condition's message.
async fn wait_plan(env: &Env, name: &str, t: &str, status: &str, reason: &str) -> String {
    let api: Api<UsagePlan> = Api::namespaced(env.admin.clone(), &env.ns);
    wait_for(T, &format!("UsagePlan {name} {t}={status} ({reason})"), || async {
        let p = api.get_opt(name).await.ok()??;
        let c = condition(&p.status?.conditions, t)?.clone();
        (c.status == status && c.reason == reason).then_some(c.message)
    })
    .await
}

/// Waits until the controller's `/metrics` has the line `line`.
async fn wait_metric(ctl: &Running, line: &str) {
    wait_for(T, &format!("/metrics line {line:?}"), || async {
        let (_, body) = http_get(ctl.admin_addr, "/metrics").await?;
        body.lines().any(|l| l == line).then_some(())
    })
    .await
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()
}

/// Waits until the namespace's `portcullis-store-credentials` holds `want` (`None`: until it is gone).
async fn wait_copy(env: &Env, want: Option<&[(&str, &str)]>) {
    let api: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    let want = want.map(data);
    wait_for(T, &format!("portcullis-store-credentials in {} = {:?}", env.ns, want.as_ref().map(|w| w.keys())), || {
        let (api, want) = (api.clone(), want.clone());
        async move {
            let have = api.get_opt("portcullis-store-credentials").await.ok()?;
            match (have, want) {
                (None, None) => Some(()),
                (Some(s), Some(w)) => {
                    let ours = s.metadata.labels.as_ref()?.get("app.kubernetes.io/managed-by")?.as_str()
                        == "portcullis-controller";
                    (ours && s.data.as_ref() == Some(&w)).then_some(())
                }
                _ => None,
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_follow_the_store_and_sidecars_get_its_credentials() {
    let env = env("glob").await;
    let mut redis = RedisServer::start_with_acl(USER, PASSWORD);
    let source = format!("store-creds-{}", env.ns);
    let sys: Api<Secret> = Api::namespaced(env.admin.clone(), SYSTEM_NS);
    let secret = Secret {
        metadata: ObjectMeta { name: Some(source.clone()), ..Default::default() },
        data: Some(data(&[("username", USER), ("password", PASSWORD), ("unrelated", "x")])),
        ..Default::default()
    };
    sys.create(&PostParams::default(), &secret).await.unwrap();
    let ctl = start(&env, "glob-1", Some(store(redis.url(), Some(USER), Some(PASSWORD), Some(source.clone())))).await;

    // Unset quotaScope with a store: Global. A Local plan without globalLimits counts nothing in the store.
    create_plan(&env, plan("shared", None, Some(true))).await;
    create_plan(&env, plan("local", Some(QuotaScopeSpec::Local), None)).await;
    let msg = wait_plan(&env, "shared", "GlobalLimits", "True", "StoreReachable").await;
    assert!(msg.contains("throttle (globalLimits) and the quota"), "{msg}");
    wait_plan(&env, "shared", "Ready", "True", "Ready").await;
    wait_plan(&env, "local", "GlobalLimits", "True", "Local").await;
    wait_metric(&ctl, "portcullis_controller_store_up 1").await;
    let (_, t) = wait_table(&env, "orders", "both plans", |t| t.plans.len() == 2).await;
    assert_eq!((t.plans["shared"].quota_scope, t.plans["shared"].global_limits), (QuotaScope::Global, true));
    assert_eq!((t.plans["local"].quota_scope, t.plans["local"].global_limits), (QuotaScope::Local, false));

    // The sidecars' copy: only username and password, and it follows the source.
    wait_copy(&env, Some(&[("username", USER), ("password", PASSWORD)])).await;
    let patch = serde_json::json!({"stringData": {"password": "rotated-pw"}});
    sys.patch(&source, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_copy(&env, Some(&[("username", USER), ("password", "rotated-pw")])).await;
    // Least privilege: the controller's token may update the copies, not other Secrets (here: the source).
    let as_controller = kube::Client::try_from(controller_kube_config(&env).await).unwrap();
    let other = Api::<Secret>::namespaced(as_controller, SYSTEM_NS)
        .patch(&source, &PatchParams::default(), &Patch::Merge(&serde_json::json!({"stringData": {"x": "y"}})))
        .await;
    assert!(matches!(other, Err(kube::Error::Api(ref s)) if s.code == 403), "{other:?}");

    // Redis down: not Ready, the condition says what the proxies do meanwhile, and a Warning Event.
    redis.stop();
    let stopped = std::time::Instant::now();
    let msg = wait_plan(&env, "shared", "GlobalLimits", "False", "StoreUnreachable").await;
    let down_after = stopped.elapsed();
    assert!(msg.contains("onStoreUnavailable: Local"), "{msg}");
    wait_plan(&env, "shared", "Ready", "False", "StoreUnreachable").await;
    wait_event(&env, "shared", "StoreUnreachable").await;
    wait_metric(&ctl, "portcullis_controller_store_up 0").await;
    wait_plan(&env, "local", "Ready", "True", "Ready").await;
    // Back: reachable again within a check interval or two.
    redis.restart();
    let restarted = std::time::Instant::now();
    wait_plan(&env, "shared", "GlobalLimits", "True", "StoreReachable").await;
    // Bounded by the check interval (1 s here) plus the check's own timeout (500 ms) plus the status write.
    eprintln!(
        "store stopped → StoreUnreachable in {down_after:?}; restarted → StoreReachable in {:?}",
        restarted.elapsed()
    );
    assert!(down_after < Duration::from_secs(10), "{down_after:?}");
    wait_plan(&env, "shared", "Ready", "True", "Ready").await;

    // No protected Service left in the namespace: the copy goes.
    let plans: Api<UsagePlan> = Api::namespaced(env.admin.clone(), &env.ns);
    for p in ["shared", "local"] {
        plans.delete(p, &DeleteParams::default()).await.unwrap();
    }
    wait_copy(&env, None).await;
    ctl.stop().await.unwrap();
    sys.delete(&source, &DeleteParams::default()).await.unwrap();
    assert!(!logs().contains("rotated-pw") && !logs().contains(PASSWORD), "a store password reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_reported_without_the_password() {
    let env = env("globauth").await;
    let redis = RedisServer::start_with_acl(USER, PASSWORD);
    let ctl = start(&env, "globauth-1", Some(store(redis.url(), Some(USER), Some("not-the-pw-9z"), None))).await;
    let mut p = plan("shared", None, None);
    p.spec.on_store_unavailable = Some(StoreFallbackSpec::FailClosed);
    create_plan(&env, p).await;
    let msg = wait_plan(&env, "shared", "GlobalLimits", "False", "StoreAuthFailed").await;
    assert!(msg.contains("FailClosed, refusing (503)"), "{msg}");
    assert!(!msg.contains("not-the-pw-9z"), "{msg}");
    wait_plan(&env, "shared", "Ready", "False", "StoreAuthFailed").await;
    wait_event(&env, "shared", "StoreAuthFailed").await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_quotas_stay_local_and_global_requests_are_not_ready() {
    let env = env("globnone").await;
    let ctl = start(&env, "globnone-1", None).await;
    create_plan(&env, plan("plain", None, None)).await;
    create_plan(&env, plan("explicit", Some(QuotaScopeSpec::Global), None)).await;
    create_plan(&env, plan("throttled", None, Some(true))).await;
    let mut noop = plan("noop", None, Some(true));
    noop.spec.throttle = None;
    noop.spec.quota = None;
    create_plan(&env, noop).await;

    wait_plan(&env, "plain", "GlobalLimits", "True", "Local").await;
    wait_plan(&env, "plain", "Ready", "True", "Ready").await;
    let msg = wait_plan(&env, "explicit", "Ready", "False", "StoreNotConfigured").await;
    assert!(msg.contains("clients keep access: until a store is configured the proxies count it per replica"), "{msg}");
    wait_plan(&env, "throttled", "GlobalLimits", "False", "StoreNotConfigured").await;
    let msg = wait_plan(&env, "noop", "SpecHonoured", "False", "IneffectiveField").await;
    assert!(msg.contains("spec.globalLimits has no effect"), "{msg}");
    wait_plan(&env, "noop", "Ready", "True", "Ready").await;
    wait_event(&env, "explicit", "StoreNotConfigured").await;

    // The table says what the plan asks: the default scope is Local; an explicit Global stays Global (sidecars
    // injected without a store count it per replica).
    let (_, t) = wait_table(&env, "orders", "four plans", |t| t.plans.len() == 4).await;
    assert_eq!(t.plans["plain"].quota_scope, QuotaScope::Local);
    assert_eq!(t.plans["explicit"].quota_scope, QuotaScope::Global);
    assert!(t.plans["throttled"].global_limits);
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_usage_matches_the_counts_in_the_store() {
    let env = env("globuse").await;
    let redis = RedisServer::start();
    let ctl = start(&env, "globuse-1", Some(store(redis.url(), None, None, None))).await;
    create_plan(&env, plan("gold", None, None)).await;
    create_plan(&env, plan("local", Some(QuotaScopeSpec::Local), None)).await;
    create_secret(&env, "acme-key", &[("key", "k-acme-0123456789")]).await;
    create_client(&env, "acme", client_spec(&["gold", "local"], &["127.0.0.1/32"], "acme-key", "key")).await;
    wait_client_condition(&env, "acme", "Ready", "True", None).await;

    // What a proxy does per admitted request: the store's `take` script on the client's quota key.
    // Generous timeout: a loaded test machine can take longer than the default 50 ms to answer.
    let mut config = StoreConfig::new(redis.url());
    (config.timeout, config.connect_timeout) = (Duration::from_secs(2), Duration::from_secs(2));
    let s = Store::connect(&config).await.unwrap();
    let id = format!("{}/acme", env.ns);
    let now = jiff::Timestamp::now().as_second();
    let (tk, qk) = (throttle_key(&id, "gold"), quota_key(&id, "gold", Period::Day, now));
    let take = |units| Take {
        throttle_key: &tk,
        tokens: 0,
        interval_us: 10_000,
        burst: 100,
        quota_key: &qk,
        units,
        limit: 1000,
        expires_at: quota_key_expires_at(Period::Day, now),
    };
    assert_eq!(s.take(&take(7)).await.unwrap().units, 7);
    let api: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let wait_used = |used: u64| {
        let api = api.clone();
        async move {
            wait_for(T, &format!("acme status.usage gold = {used}"), || async {
                let st = api.get("acme").await.ok()?.status?;
                (st.usage.len() == 1 && st.usage[0].used == used).then_some(st)
            })
            .await
        }
    };
    let st = wait_used(7).await;
    let u = &st.usage[0];
    assert_eq!((u.plan.as_str(), u.period, u.limit), ("gold", QuotaPeriod::Day, 1000), "only the global quota");
    let end = portcullis_table::period::period_end(Period::Day, now);
    assert_eq!(u.resets_at.0.as_second(), end);
    assert_eq!(st.used_summary.as_deref(), Some("7/1000"));
    // What `kubectl get apiclients` shows: the API server's table of the CRD's printer columns.
    let req = hyper::http::Request::get(format!("/apis/portcullis.dev/v1alpha1/namespaces/{}/apiclients/acme", env.ns))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: serde_json::Value = serde_json::from_str(&env.admin.request_text(req).await.unwrap()).unwrap();
    let columns: Vec<&str> =
        table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    let used = columns.iter().position(|c| *c == "Used").unwrap_or_else(|| panic!("no Used column: {columns:?}"));
    assert_eq!(table["rows"][0]["cells"][used].as_str(), Some("7/1000"), "{table}");
    assert!(condition(&st.conditions, "Ready").is_some(), "the reconciler's status stays beside the usage");

    s.take(&take(5)).await.unwrap();
    let st = wait_used(12).await;
    assert_eq!(st.used_summary.as_deref(), Some("12/1000"));
    ctl.stop().await.unwrap();
}

/// A real `portcullis-proxy` with the store flags the webhook injects (`--store-url`, `--store-timeout=<n>ms`,
/// `--replica-id`), reading its table as the Service's sidecar ServiceAccount; killed on drop.
async fn proxy(
    env: &Env,
    sa: &str,
    store_url: &str,
) -> (tokio::process::Child, std::net::SocketAddr, std::net::SocketAddr) {
    use crate::common::sidecar::{proxy_binary, start_echo};
    let token = env.cp.service_account_token(&env.ns, sa).await;
    let kubeconfig = env.cp.kubeconfig_for_token(&token);
    let (port, admin) = (free_port(), free_port());
    let log = env.cp.dir().join(format!("proxy-{}-global-{port}.log", env.ns));
    let upstream = start_echo().await;
    let child = tokio::process::Command::new(proxy_binary())
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--admin-listen=127.0.0.1:{admin}"))
        .arg(format!("--upstream={upstream}"))
        .arg(format!("--tables-from=configmap/{}/{}", env.ns, portcullis_table::naming::index_name("orders")))
        .args(["--table-rewatch", "1s", "--log-format", "json"])
        .arg(format!("--store-url={store_url}"))
        .arg("--store-timeout=500ms")
        .arg("--replica-id=orders-0")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning portcullis-proxy");
    (child, format!("127.0.0.1:{port}").parse().unwrap(), format!("127.0.0.1:{admin}").parse().unwrap())
}

/// HTTP status of `GET /v1/orders` with `key` through the proxy at `addr`.
async fn get(addr: std::net::SocketAddr, key: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /v1/orders HTTP/1.1\r\nHost: orders\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.ok()?.ok()?;
    String::from_utf8_lossy(&out[..out.len().min(64)]).split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_usage_counts_what_the_real_proxy_admitted() {
    let env = env("globproxy").await;
    let redis = RedisServer::start();
    let ctl = start(&env, "globproxy-1", Some(store(redis.url(), None, None, None))).await;
    crate::common::sidecar::service_and_pod(&env, "orders", "orders-sc").await;
    let mut gold = plan("gold", None, None);
    gold.spec.throttle = None;
    gold.spec.quota = Some(QuotaSpec { limit: 5, period: QuotaPeriod::Month });
    create_plan(&env, gold).await;
    let key = "k-acme-global-0123456789";
    create_secret(&env, "acme-key", &[("key", key)]).await;
    create_client(&env, "acme", client_spec(&["gold"], &["127.0.0.1/32"], "acme-key", "key")).await;
    wait_client_condition(&env, "acme", "Programmed", "True", None).await;
    wait_plan(&env, "gold", "GlobalLimits", "True", "StoreReachable").await;

    let t0 = std::time::Instant::now();
    let (_child, addr, admin) = proxy(&env, "orders-sc", &redis.url()).await;
    eprintln!("proxy binary ready and spawned in {:?}", t0.elapsed());
    // Serving the table, with the store up (else the first requests would count under the Local fallback).
    wait_for(T, "the proxy ready with the store up", || async {
        let (status, body) = http_get(admin, "/readyz").await?;
        (status.contains("200") && body.contains("store: up")).then_some(())
    })
    .await;
    eprintln!("proxy ready with the store up after {:?}", t0.elapsed());
    let mut admitted = 0;
    let mut refused = 0;
    for _ in 0..8 {
        match get(addr, key).await {
            Some(200) => admitted += 1,
            Some(429) => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((admitted, refused), (5, 3), "the quota of 5 admits exactly 5");
    let api: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let t1 = std::time::Instant::now();
    let st = wait_for(T, "acme status.usage = 5 admitted", || async {
        let st = api.get("acme").await.ok()?.status?;
        (st.usage.first().map(|u| u.used) == Some(admitted)).then_some(st)
    })
    .await;
    eprintln!("status.usage = 5 after {:?} (refresh every 1 s)", t1.elapsed());
    assert_eq!((st.usage[0].plan.as_str(), st.usage[0].limit), ("gold", 5));
    assert_eq!(st.used_summary.as_deref(), Some("5/5"));
    ctl.stop().await.unwrap();
}

/// The binary refuses bad store settings before it touches the cluster: exit status 1 and a message naming the
/// flag and the fix, never the password.
#[test]
fn the_binary_refuses_bad_store_settings_at_start() {
    for (args, says) in [
        (&["--store-url=redis://alice:pw-in-url-77@redis:6379"][..], "store URL embeds credentials"),
        (&["--store-url=http://redis:6379"][..], "scheme \"http\" is not supported"),
        (&["--store-url=redis://redis:6379", "--store-timeout=30s"][..], "store timeout must be between"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis-controller"))
            .args(args)
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .expect("running portcullis-controller");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("error: --store-url / --store-timeout: ") && stderr.contains(says),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("pw-in-url-77"), "{stderr}");
    }
}
