//! Secret hygiene (issue 13, part 4): a full scenario — the controller (every crate's log lines captured at debug
//! meanwhile: `common::capture_all_levels`), a real sidecar
//! (`portcullis-proxy`, `RUST_LOG=debug`), a generated and a Secret-backed key, a rotation of each, revocations —
//! then every log line, both `/metrics` outputs, the sidecar's `/readyz` and `/revision`, every Event, status and
//! ConfigMap is scanned for key material (the key, its base64, its hex), and none is found. The 401 answers for a
//! missing, unknown, malformed and revoked key are byte-identical.
//!
//! The sidecar binary is the workspace's debug build, made on first use (`common::sidecar::proxy_binary`).

use crate::common::sidecar::{LO, Sidecar, request_raw, service_and_pod, start_echo};
use crate::common::*;
use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use portcullis_controller::crd::*;
use serde_json::json;

const SERVICE: &str = "orders";
const SA_SIDECAR: &str = "orders-sidecar";
const BROUGHT: &str = "hygiene-brought-key-0123456789abcdef";
const BROUGHT_2: &str = "hygiene-brought-key-2-fedcba9876543210";
const UNKNOWN: &str = "pcl_2b7f0c1d9e8a4f6b3c5d7e9f1a2b3c4d5e6f7a8b_00000000";

/// A raw request to the sidecar with `key_header` (the whole header line, or none); returns (head, body).
async fn raw(sidecar: &Sidecar, key_header: Option<&[u8]>) -> (String, Vec<u8>) {
    let a =
        request_raw(LO, sidecar.addr, key_header).await.unwrap_or_else(|e| panic!("no answer from the sidecar: {e}"));
    (a.head, a.body)
}

/// The status line and every header but `date`, sorted.
fn head_without_date(head: &str) -> Vec<String> {
    let mut lines: Vec<String> =
        head.lines().filter(|l| !l.to_ascii_lowercase().starts_with("date:")).map(str::to_string).collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_anywhere_and_one_401_for_every_bad_key() {
    // Every crate's debug lines are captured from here on (the binary's capture is usually narrower).
    let _all_levels = capture_all_levels();
    let since = logs_len();
    let env = env("hygiene").await;
    let ctl = start_controller(&env, "hygiene-1").await;
    create_plan(&env, open_plan("gold", SERVICE)).await;
    // A Secret-backed key and a generated one.
    create_secret(&env, "globex-key", &[("key", BROUGHT)]).await;
    create_client(&env, "globex", client_spec(&["gold"], &["127.0.0.1/32"], "globex-key", "key")).await;
    let mut acme = client_spec(&["gold"], &["127.0.0.1/32"], "unused", "unused");
    acme.keys = vec![KeySpec { name: Some("k1".into()), generate: Some(GenerateSpec {}), ..Default::default() }];
    create_client(&env, "acme", acme).await;
    let (_, k1) = wait_generated(&env, "acme-key-k1").await;
    service_and_pod(&env, SERVICE, SA_SIDECAR).await;
    let mut sidecar = Sidecar::start_logging(&env, SERVICE, SA_SIDECAR, start_echo().await, "debug").await;
    sidecar.until(&k1, "generated key admitted", |s| s == 200).await;
    sidecar.until(BROUGHT, "Secret-backed key admitted", |s| s == 200).await;

    // Rotation of the generated key (README recipe): add k2, then remove k1.
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let add = json!([{"op": "add", "path": "/spec/keys/-", "value": {"name": "k2", "generate": {}}}]);
    clients
        .patch("acme", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(add).unwrap()))
        .await
        .unwrap();
    let (_, k2) = wait_generated(&env, "acme-key-k2").await;
    sidecar.until(&k2, "new generated key admitted", |s| s == 200).await;
    let remove =
        json!([{"op": "test", "path": "/spec/keys/0/name", "value": "k1"}, {"op": "remove", "path": "/spec/keys/0"}]);
    clients
        .patch("acme", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(remove).unwrap()))
        .await
        .unwrap();
    sidecar.until(&k1, "old generated key revoked", |s| s == 401).await;
    sidecar.until(&k2, "new generated key still admitted", |s| s == 200).await;

    // Rotation of the Secret-backed key: the Secret's value changes.
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    let data = json!({"stringData": {"key": BROUGHT_2}});
    secrets.patch("globex-key", &PatchParams::default(), &Patch::Merge(data)).await.unwrap();
    sidecar.until(BROUGHT, "old Secret-backed key revoked", |s| s == 401).await;
    sidecar.until(BROUGHT_2, "new Secret-backed key admitted", |s| s == 200).await;

    // 401 for a missing, unknown, malformed and revoked key: one body, one head (but the date).
    let long = format!("x-api-key: {}", "A".repeat(4096));
    let cases: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("missing", None),
        ("unknown", Some(format!("x-api-key: {UNKNOWN}").into_bytes())),
        ("malformed: short", Some(b"x-api-key: x".to_vec())),
        ("malformed: spaces and punctuation", Some(b"x-api-key: not a key; at all!".to_vec())),
        ("malformed: not ASCII", Some(b"x-api-key: pcl_\xff\xfe\xfd-key".to_vec())),
        ("malformed: 4 KiB", Some(long.into_bytes())),
        ("malformed: empty", Some(b"x-api-key: ".to_vec())),
        ("revoked: generated key removed by rotation", Some(format!("x-api-key: {k1}").into_bytes())),
        ("revoked: Secret-backed key replaced", Some(format!("x-api-key: {BROUGHT}").into_bytes())),
    ];
    let mut first: Option<(Vec<String>, Vec<u8>)> = None;
    for (what, header) in &cases {
        let (head, body) = raw(&sidecar, header.as_deref()).await;
        assert!(head.starts_with("HTTP/1.1 401 "), "{what}: {head}");
        let got = (head_without_date(&head), body);
        match &first {
            None => first = Some(got),
            Some(f) => {
                assert_eq!(f.1, got.1, "{what}: the 401 body differs from the missing key's");
                assert_eq!(f.0, got.0, "{what}: the 401 head differs from the missing key's");
            }
        }
    }
    let body = String::from_utf8(first.unwrap().1).unwrap();
    eprintln!("{} kinds of bad key, one 401: {body}", cases.len());

    // Revocation of the whole client.
    clients.patch("globex", &PatchParams::default(), &Patch::Merge(json!({"spec": {"disabled": true}}))).await.unwrap();
    sidecar.until(BROUGHT_2, "disabled client refused", |s| s == 403).await;

    // The scan. Everything a key could leak into, besides the Secrets that hold keys by design.
    let keys = [k1.as_str(), k2.as_str(), BROUGHT, BROUGHT_2, UNKNOWN, "not a key; at all!"];
    let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_no_key_material(&env, &keys).await;
    let proxy_log = std::fs::read_to_string(&sidecar.log).unwrap()
        + &std::fs::read_to_string(sidecar.log.with_extension("err")).unwrap_or_default();
    // Everything this binary's controllers logged (a superset of this test's), and the lines since this test began.
    let controller_log = logs();
    let window = logs_since(since);
    let mut sources =
        vec![("sidecar log (RUST_LOG=debug)", proxy_log.clone()), ("controller log", controller_log.clone())];
    for path in ["/metrics", "/readyz", "/revision"] {
        let (_, body) = http_get(sidecar.admin, path).await.expect("sidecar admin port");
        sources.push((path, body));
    }
    let (_, controller_metrics) = http_get(ctl.admin_addr, "/metrics").await.expect("controller /metrics");
    sources.push(("controller /metrics", controller_metrics));
    for k in &keys {
        let forms = [
            k.clone(),
            base64::engine::general_purpose::STANDARD.encode(k),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k),
            hex::encode(k),
        ];
        for (what, text) in &sources {
            for f in &forms {
                assert!(!text.contains(f.as_str()), "key material ({} chars) found in {what}", f.len());
            }
        }
    }
    let debug_lines = proxy_log.lines().filter(|l| l.contains(r#""level":"DEBUG""#)).count();
    assert!(debug_lines > 0, "the sidecar logged at debug level");
    let controller_debug = window.lines().filter(|l| l.contains(r#""level":"DEBUG""#)).count();
    let controller_own = window.lines().filter(|l| l.contains(r#""target":"portcullis_controller"#)).count();
    let others_debug = window
        .lines()
        .filter(|l| l.contains(r#""level":"DEBUG""#) && !l.contains(r#""target":"portcullis_controller"#))
        .count();
    assert!(controller_own > 0 && controller_debug > 0, "the controller logged, at debug level");
    assert!(others_debug > 0, "other crates' debug lines were captured too (kube, hyper, ...)");
    eprintln!(
        "scanned: sidecar log {} lines ({debug_lines} debug), controller process log {} lines (during this test \
         {controller_debug} debug, {others_debug} of them not the controller's, {controller_own} from \
         portcullis_controller), {} other sources (metrics, readyz, revision) + \
         ConfigMaps, ApiClients, UsagePlans, Events: {} keys × 4 encodings, none found",
        proxy_log.lines().count(),
        controller_log.lines().count(),
        sources.len() - 2,
        keys.len()
    );
    ctl.stop().await.unwrap();
}
