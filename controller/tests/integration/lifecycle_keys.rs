//! Key identity through its lifecycle, against the real local API server (and garbage collector): the README
//! rotation recipe step by step, reordering keys, another client's key Secret, an unlabelled Secret, a deleted
//! generated Secret, a foreign Secret at the generated name, orphaned generated Secrets, a failed creation.
//!
//! Where it matters what a client gets, the answer comes from a running `portcullis-proxy` binary reading its table
//! with its own ServiceAccount token (bound by the controller's sidecar RoleBinding, as in a cluster): the
//! workspace's debug build, made on first use (`common::sidecar::proxy_binary`).

use crate::common::sidecar::{LO, LO2, proxy_binary, request};
use crate::common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use portcullis_controller::crd::*;
use portcullis_controller::keys::{LABEL_API_CLIENT, LABEL_API_KEY};
use portcullis_table::{Table, fingerprint, key_digest};
use portcullis_testkit::wait_for;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SERVICE: &str = "echo";
const PLAN: &str = "partners";

fn plan() -> UsagePlan {
    open_plan(PLAN, SERVICE)
}

fn generated(names: &[&str]) -> Vec<KeySpec> {
    names
        .iter()
        .map(|n| KeySpec { name: Some(n.to_string()), generate: Some(GenerateSpec {}), ..Default::default() })
        .collect()
}

fn client_with_keys(ranges: &[&str], keys: Vec<KeySpec>) -> ApiClientSpec {
    let mut spec = client_spec(&[PLAN], ranges, "unused", "unused");
    spec.keys = keys;
    spec
}

fn clients(env: &Env) -> Api<ApiClient> {
    Api::namespaced(env.admin.clone(), &env.ns)
}

fn secrets(env: &Env) -> Api<Secret> {
    Api::namespaced(env.admin.clone(), &env.ns)
}

fn fp(key: &str) -> String {
    fingerprint(&key_digest(key.as_bytes()))
}

/// Events (events.k8s.io/v1) about ApiClient `name` with `reason`, once at least one exists.
async fn wait_events(env: &Env, name: &str, reason: &str, note_contains: &str) -> Vec<Event> {
    let evs: Api<Event> = Api::namespaced(env.admin.clone(), &env.ns);
    wait_for(T, &format!("Event {reason} about {name} mentioning {note_contains:?}"), || async {
        let list: Vec<Event> = evs
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.note.as_deref().is_some_and(|n| n.contains(note_contains))
            })
            .collect();
        (!list.is_empty()).then_some(list)
    })
    .await
}

/// Waits until the ApiClient has processed its current generation with `KeysResolved` = `status`/`reason`.
async fn wait_keys(env: &Env, name: &str, status: &str, reason: &str) -> ApiClientStatus {
    wait_client_condition(env, name, "KeysResolved", status, Some(reason)).await.status.unwrap()
}

fn client_in<'a>(t: &'a Table, env: &Env, name: &str) -> Option<&'a portcullis_table::Client> {
    t.clients.iter().find(|c| c.id == format!("{}/{name}", env.ns)).map(|c| &**c)
}

// === The sidecar: a real proxy with its own ServiceAccount token ===

/// A `portcullis-proxy` process in API mode for `SERVICE`, reading its tables as ServiceAccount `sidecar`, in
/// front of an echo upstream that reports which client the proxy identified. Killed on drop.
struct Sidecar {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    /// Declares an opted-in Pod of `SERVICE` running as ServiceAccount `sidecar` (the controller binds it to the
    /// Service's table Role), waits for that binding, and starts the proxy with the ServiceAccount's token.
    async fn start(env: &Env) -> Sidecar {
        let token = env.cp.service_account_token(&env.ns, "sidecar").await;
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "echo-0", "labels": {"portcullis.dev/inject": "true", "app": "echo"},
                         "annotations": {"portcullis.dev/service": SERVICE}},
            "spec": {"serviceAccountName": "sidecar", "containers": [{"name": "app", "image": "example.invalid/app"}]}
        }))
        .unwrap();
        Api::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), &pod).await.unwrap();
        let sa_cms: Api<ConfigMap> = Api::namespaced(env.cp.client_for_token(&token).await, &env.ns);
        let index = portcullis_table::naming::index_name(SERVICE);
        wait_for(T, "the sidecar's token reads its index", || async { sa_cms.get(&index).await.ok() }).await;

        let upstream = start_echo().await;
        let (port, admin_port) = (free_port(), free_port());
        let log = std::fs::File::create(env.cp.dir().join(format!("proxy-{}.log", env.ns))).unwrap();
        let child = std::process::Command::new(proxy_binary())
            .env("KUBECONFIG", env.cp.kubeconfig_for_token(&token))
            .env("RUST_LOG", "info")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin_port}"))
            .arg(format!("--upstream={upstream}"))
            .arg(format!("--tables-from=configmap/{}/{index}", env.ns))
            .arg("--workers=1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning portcullis-proxy");
        let sidecar = Sidecar {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        };
        wait_for(T, "proxy /readyz 200", || async {
            http_get(sidecar.admin, "/readyz").await.filter(|(s, _)| s.contains("200")).map(|_| ())
        })
        .await;
        sidecar
    }

    /// Waits until the proxy enforces table revision `revision`.
    async fn wait_revision(&self, revision: &str) {
        wait_for(T, &format!("proxy on revision {revision}"), || async {
            http_get(self.admin, "/readyz").await.filter(|(_, body)| body.contains(revision)).map(|_| ())
        })
        .await;
    }

    /// What a client gets: (status, the client id the proxy passed upstream, if any).
    async fn ask(&self, from: IpAddr, key: &str) -> (u16, String) {
        request(from, self.addr, key)
            .await
            .map_or((0, String::new()), |a| (a.status, String::from_utf8_lossy(&a.body).into_owned()))
    }

    /// Waits until asking with `key` from `from` gets `status` (and, for 200, was identified as `client`).
    async fn wait_answer(&self, env: &Env, from: IpAddr, key: &str, status: u16, client: Option<&str>) {
        let want_client = client.map(|c| format!("{}/{c}", env.ns));
        wait_for(T, &format!("{status} for key {} from {from}", fp(key)), || async {
            let (s, c) = self.ask(from, key).await;
            (s == status && want_client.as_ref().is_none_or(|w| *w == c)).then_some(())
        })
        .await;
    }
}

/// Asks continuously (every 20 ms) with one key until stopped; records every answer with its time.
struct Prober {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(Instant, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    fn start(proxy: SocketAddr, key: String) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), answers.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let status = request(LO, proxy, &key).await.map_or(0, |a| a.status);
                a.lock().unwrap().push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Prober { stop, answers, task }
    }

    fn answers_since(&self, t: Instant) -> Vec<u16> {
        self.answers.lock().unwrap().iter().filter(|(at, _)| *at >= t).map(|(_, s)| *s).collect()
    }

    async fn stop(self) -> Vec<(Instant, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.answers).unwrap().into_inner().unwrap()
    }
}

/// An HTTP/1.1 upstream on loopback answering 200 with the `x-portcullis-client` header the proxy set.
async fn start_echo() -> SocketAddr {
    use http_body_util::Full;
    use hyper::{Request, Response, body::Bytes};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let client = req.headers().get("x-portcullis-client").and_then(|v| v.to_str().ok()).unwrap_or("");
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(client.to_string()))))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}

// === Scenarios ===

/// README "Rotate a key", literally: add `{name: k2, generate: {}}`, hand the new key out, remove the first entry.
/// Both keys work during the overlap (the old one without a single refusal), only the new one after (it never
/// stops working), and the old key's Secret is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_rotation_keeps_both_keys_during_the_overlap_and_only_the_new_one_after() {
    let env = env("rotate").await;
    let ctl = start_controller(&env, "rotate-1").await;
    create_plan(&env, plan()).await;
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1"]))).await;
    let (_, k1) = wait_generated(&env, "acme-key-k1").await;
    let proxy = Sidecar::start(&env).await;
    proxy.wait_answer(&env, LO, &k1, 200, Some("acme")).await;
    let old_prober = Prober::start(proxy.addr, k1.clone());

    // 1. Add a second entry.
    let t_add = Instant::now();
    let add = json!([{"op": "add", "path": "/spec/keys/-", "value": {"name": "k2", "generate": {}}}]);
    clients(&env)
        .patch("acme", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(add).unwrap()))
        .await
        .unwrap();
    // 2. Hand the new key out (kubectl get secret acme-key-k2 -o jsonpath='{.data.key}' | base64 -d).
    let (s2, k2) = wait_generated(&env, "acme-key-k2").await;
    assert_ne!(k1, k2);
    proxy.wait_answer(&env, LO, &k2, 200, Some("acme")).await;
    let new_prober = Prober::start(proxy.addr, k2.clone());
    let st = wait_keys(&env, "acme", "True", "Resolved").await;
    assert_eq!(st.keys, 2);
    let names: Vec<&str> = st.generated_keys.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["k1", "k2"]);
    wait_events(&env, "acme", "KeyGenerated", &fp(&k2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // some overlap traffic for the probers
    let overlap = old_prober.answers_since(t_add);
    assert!(overlap.len() >= 5 && overlap.iter().all(|s| *s == 200), "old key during the overlap: {overlap:?}");

    // 3. Remove the first entry (guarded: only if it is still k1).
    let t_remove = Instant::now();
    let remove =
        json!([{"op": "test", "path": "/spec/keys/0/name", "value": "k1"}, {"op": "remove", "path": "/spec/keys/0"}]);
    clients(&env)
        .patch("acme", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(remove).unwrap()))
        .await
        .unwrap();
    proxy.wait_answer(&env, LO, &k1, 401, None).await;
    let revoked_after = t_remove.elapsed();
    let st = wait_keys(&env, "acme", "True", "Resolved").await;
    assert_eq!((st.keys, st.key_fingerprints.clone()), (1, vec![fp(&k2)]));
    assert_eq!(st.generated_keys.len(), 1);
    assert_eq!((st.generated_keys[0].name.as_str(), st.generated_keys[0].secret.as_str()), ("k2", "acme-key-k2"));
    // The old key's Secret is deleted (so no later entry can bring it back); the new one is untouched.
    wait_for(T, "acme-key-k1 deleted", || async {
        matches!(secrets(&env).get_opt("acme-key-k1").await, Ok(None)).then_some(())
    })
    .await;
    wait_events(&env, "acme", "KeyDeleted", "acme-key-k1").await;
    let s2_now = secrets(&env).get("acme-key-k2").await.unwrap();
    assert_eq!((s2_now.metadata.resource_version, s2_now.data), (s2.metadata.resource_version, s2.data));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = old_prober.stop().await;
    let new = new_prober.stop().await;
    assert!(new.iter().all(|(_, s)| *s == 200), "the new key was refused at some point: {new:?}");
    assert!(old.last().is_some_and(|(_, s)| *s == 401), "old key still admitted: {:?}", old.last());
    assert!(revoked_after < Duration::from_secs(10), "old key revoked after {revoked_after:?}");
    eprintln!("rotation: old key refused {:.0} ms after its entry was removed", revoked_after.as_secs_f64() * 1e3);
    assert_no_key_material(&env, &[k1, k2]).await;
    drop(proxy);
    ctl.stop().await.unwrap();
}

/// Reordering `spec.keys` keeps every key on its Secret: no Secret is created or touched, the table revision stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_keys_changes_nothing() {
    let env = env("reorder").await;
    let ctl = start_controller(&env, "reorder-1").await;
    create_plan(&env, plan()).await;
    create_secret(&env, "byo", &[("token", "reorder-byo-key-0123456789abcdef")]).await;
    let mut keys = generated(&["k1", "k2"]);
    keys.insert(
        1,
        KeySpec { secret_ref: Some(SecretKeyRef { name: "byo".into(), key: "token".into() }), ..Default::default() },
    );
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], keys.clone())).await;
    let (s1, k1) = wait_generated(&env, "acme-key-k1").await;
    let (s2, k2) = wait_generated(&env, "acme-key-k2").await;
    wait_keys(&env, "acme", "True", "Resolved").await;
    let (doc, t) =
        wait_table(&env, SERVICE, "three keys", |t| t.clients.first().is_some_and(|c| c.keys.len() == 3)).await;
    let digests = |t: &Table| client_in(t, &env, "acme").unwrap().keys.iter().map(|k| k.sha256).collect::<Vec<_>>();
    let before = digests(&t);
    for k in [&k1, &k2, "reorder-byo-key-0123456789abcdef"] {
        assert!(before.contains(&key_digest(k.as_bytes())));
    }

    keys.reverse();
    let patch = json!({"spec": {"keys": keys}});
    clients(&env).patch("acme", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let c = wait_client_condition(&env, "acme", "Ready", "True", None).await;
    assert_eq!(c.spec.keys[0].name.as_deref(), Some("k2"), "the reorder was applied");
    assert_eq!(c.status.as_ref().unwrap().keys, 3);
    let (doc2, t2) = wait_table(&env, SERVICE, "acme at its new generation", |t| t.clients.len() == 1).await;
    assert_eq!(digests(&t2), before);
    assert_eq!(doc2.revision, doc.revision, "a reorder must not even rewrite the table");
    for (name, s) in [("acme-key-k1", s1), ("acme-key-k2", s2)] {
        let now = secrets(&env).get(name).await.unwrap();
        assert_eq!((now.metadata.resource_version, now.data), (s.metadata.resource_version, s.data), "{name}");
    }
    let generated_now: Vec<String> = secrets(&env)
        .list(&ListParams::default().labels(&format!("{LABEL_API_CLIENT}=acme")))
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(generated_now, ["acme-key-k1", "acme-key-k2"]);
    ctl.stop().await.unwrap();
}

/// A newer ApiClient referencing another client's generated key Secret gets nothing: not the key, not the older
/// client's identity, not a way around its source ranges. The proxy keeps answering as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_key_secret_cannot_be_taken_over() {
    let env = env("takeover").await;
    let ctl = start_controller(&env, "takeover-1").await;
    create_plan(&env, plan()).await;
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1"]))).await;
    let (_, key) = wait_generated(&env, "acme-key-k1").await;
    let proxy = Sidecar::start(&env).await;
    proxy.wait_answer(&env, LO, &key, 200, Some("acme")).await;
    assert_eq!(proxy.ask(LO2, &key).await.0, 403, "acme is allowed from 127.0.0.1 only");

    // "aaa" sorts before "acme" (the old tie-break) and allows 127.0.0.2.
    let by_ref = KeySpec {
        secret_ref: Some(SecretKeyRef { name: "acme-key-k1".into(), key: "key".into() }),
        ..Default::default()
    };
    create_client(&env, "aaa", client_with_keys(&["127.0.0.2/32"], vec![by_ref])).await;
    let st = wait_keys(&env, "aaa", "False", "SecretOwnedByAnotherClient").await;
    let msg = &condition(&st.conditions, "KeysResolved").unwrap().message;
    assert!(msg.contains("acme-key-k1") && msg.contains("\"acme\""), "{msg}");
    assert!(st.key_fingerprints.is_empty());
    wait_events(&env, "aaa", "SecretOwnedByAnotherClient", "acme-key-k1").await;
    // aaa is in the table, without a key; the proxy enforces that revision.
    let (doc, t) = wait_table(&env, SERVICE, "aaa present", |t| client_in(t, &env, "aaa").is_some()).await;
    assert!(client_in(&t, &env, "aaa").unwrap().keys.is_empty());
    assert_eq!(client_in(&t, &env, "acme").unwrap().keys[0].sha256, key_digest(key.as_bytes()));
    proxy.wait_revision(&doc.revision).await;
    assert_eq!(proxy.ask(LO2, &key).await.0, 403, "aaa's source range must not admit acme's key");
    assert_eq!(proxy.ask(LO, &key).await, (200, format!("{}/acme", env.ns)));
    // acme is unaffected.
    wait_keys(&env, "acme", "True", "Resolved").await;
    drop(proxy);
    ctl.stop().await.unwrap();
}

/// One opted-in Secret referenced by two ApiClients: the older keeps the key, the newer gets `DuplicateKey`, whatever
/// their names, and the proxy identifies the older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_claimed_twice_stays_with_the_older_client() {
    let env = env("dup").await;
    let ctl = start_controller(&env, "dup-1").await;
    create_plan(&env, plan()).await;
    let key = "shared-key-0123456789abcdefghij";
    create_secret(&env, "shared", &[("token", key)]).await;
    create_client(&env, "zed", client_spec(&[PLAN], &["127.0.0.1/32"], "shared", "token")).await;
    wait_keys(&env, "zed", "True", "Resolved").await;
    let proxy = Sidecar::start(&env).await;
    proxy.wait_answer(&env, LO, key, 200, Some("zed")).await;

    // Creation timestamps have a resolution of one second: make sure "abe" is strictly newer.
    let zed = clients(&env).get("zed").await.unwrap();
    let zed_created = zed.meta().creation_timestamp.clone().unwrap().0;
    wait_for(T, "a new second", || async {
        (k8s_openapi::jiff::Timestamp::now().as_second() > zed_created.as_second()).then_some(())
    })
    .await;
    create_client(&env, "abe", client_spec(&[PLAN], &["127.0.0.1/32", "127.0.0.2/32"], "shared", "token")).await;
    let st = wait_keys(&env, "abe", "False", "DuplicateKey").await;
    let msg = &condition(&st.conditions, "KeysResolved").unwrap().message;
    assert!(msg.contains(&fp(key)) && msg.contains("older"), "{msg}");
    let (doc, t) = wait_table(&env, SERVICE, "abe present", |t| client_in(t, &env, "abe").is_some()).await;
    assert!(client_in(&t, &env, "abe").unwrap().keys.is_empty());
    proxy.wait_revision(&doc.revision).await;
    assert_eq!(proxy.ask(LO, key).await, (200, format!("{}/zed", env.ns)));
    assert_eq!(proxy.ask(LO2, key).await.0, 403);
    wait_keys(&env, "zed", "True", "Resolved").await;
    drop(proxy);
    ctl.stop().await.unwrap();
}

/// A Secret without the opt-in label is never read as a key (its digest never reaches a table); labelling it is the
/// fix the condition names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlabelled_secret_is_not_used_until_it_opts_in() {
    let env = env("optin").await;
    let ctl = start_controller(&env, "optin-1").await;
    create_plan(&env, plan()).await;
    let key = "unlabelled-key-0123456789abcdef";
    create_secret_labelled(&env, "plain", &[("token", key)], false).await;
    create_client(&env, "acme", client_spec(&[PLAN], &["127.0.0.1/32"], "plain", "token")).await;
    let st = wait_keys(&env, "acme", "False", "SecretNotOptedIn").await;
    let msg = &condition(&st.conditions, "KeysResolved").unwrap().message;
    assert!(msg.contains("kubectl label secret plain portcullis.dev/api-key=true"), "{msg}");
    let (_, t) = wait_table(&env, SERVICE, "acme present", |t| client_in(t, &env, "acme").is_some()).await;
    assert!(client_in(&t, &env, "acme").unwrap().keys.is_empty(), "an unlabelled Secret's digest reached the table");
    wait_events(&env, "acme", "SecretNotOptedIn", "plain").await;

    let patch = json!({"metadata": {"labels": {LABEL_API_KEY: "true"}}});
    secrets(&env).patch("plain", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    wait_keys(&env, "acme", "True", "Resolved").await;
    wait_table(&env, SERVICE, "acme's key", |t| {
        client_in(t, &env, "acme").is_some_and(|c| c.keys.iter().any(|k| k.sha256 == key_digest(key.as_bytes())))
    })
    .await;
    ctl.stop().await.unwrap();
}

/// A generated Secret deleted behind the controller's back is regenerated: a NEW key (the old one stops working),
/// announced by a `KeyRegenerated` Warning naming both fingerprints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_generated_secret_is_regenerated_with_a_new_key() {
    let env = env("regen").await;
    let ctl = start_controller(&env, "regen-1").await;
    create_plan(&env, plan()).await;
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1"]))).await;
    let (s1, k1) = wait_generated(&env, "acme-key-k1").await;
    let st = wait_keys(&env, "acme", "True", "Resolved").await;
    assert_eq!(st.generated_keys[0].fingerprint, fp(&k1));
    let proxy = Sidecar::start(&env).await;
    proxy.wait_answer(&env, LO, &k1, 200, Some("acme")).await;

    secrets(&env).delete("acme-key-k1", &DeleteParams::default()).await.unwrap();
    let (s2, k2) = wait_for(T, "a new acme-key-k1", || async {
        let s = secrets(&env).get_opt("acme-key-k1").await.ok()??;
        (s.uid() != s1.uid()).then_some(())?;
        let k = String::from_utf8(s.data.as_ref()?.get("key")?.0.clone()).ok()?;
        Some((s, k))
    })
    .await;
    assert_ne!(k1, k2, "a regenerated key is a new key");
    assert_eq!(s2.labels()[LABEL_API_KEY], "true");
    let evs = wait_events(&env, "acme", "KeyRegenerated", &fp(&k2)).await;
    let note = evs[0].note.clone().unwrap();
    assert!(note.contains(&fp(&k1)) && note.contains("NEW"), "{note}");
    assert_eq!(evs[0].type_.as_deref(), Some("Warning"));
    proxy.wait_answer(&env, LO, &k2, 200, Some("acme")).await;
    proxy.wait_answer(&env, LO, &k1, 401, None).await;
    wait_for(T, "status shows the new fingerprint", || async {
        let st = clients(&env).get("acme").await.ok()?.status?;
        (st.generated_keys.first()?.fingerprint == fp(&k2) && st.key_fingerprints == [fp(&k2)]).then_some(())
    })
    .await;
    assert_no_key_material(&env, &[k1, k2]).await;
    drop(proxy);
    ctl.stop().await.unwrap();
}

/// A Secret someone else created at the generated name (even labelled) is never adopted, changed or deleted; its
/// value is refused by the proxy. Once it is gone, the controller generates its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_secret_at_the_generated_name_is_never_adopted() {
    let env = env("foreign").await;
    let ctl = start_controller(&env, "foreign-1").await;
    create_plan(&env, plan()).await;
    let planted = "planted-key-0123456789abcdefghij";
    create_secret(&env, "acme-key-k1", &[("key", planted)]).await;
    let before = secrets(&env).get("acme-key-k1").await.unwrap();
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1"]))).await;
    let st = wait_keys(&env, "acme", "False", "SecretConflict").await;
    let msg = &condition(&st.conditions, "KeysResolved").unwrap().message;
    assert!(msg.contains("acme-key-k1") && msg.contains("not generated for this ApiClient"), "{msg}");
    let proxy = Sidecar::start(&env).await;
    let (doc, t) = wait_table(&env, SERVICE, "acme present", |t| client_in(t, &env, "acme").is_some()).await;
    assert!(client_in(&t, &env, "acme").unwrap().keys.is_empty());
    proxy.wait_revision(&doc.revision).await;
    assert_eq!(proxy.ask(LO, planted).await.0, 401, "the planted key must not identify acme");
    let after = secrets(&env).get("acme-key-k1").await.unwrap();
    assert_eq!((&after.metadata.resource_version, &after.data), (&before.metadata.resource_version, &before.data));

    secrets(&env).delete("acme-key-k1", &DeleteParams::default()).await.unwrap();
    let (own, key) = wait_for(T, "acme's own acme-key-k1", || async {
        let s = secrets(&env).get_opt("acme-key-k1").await.ok()??;
        (s.uid() != before.uid()).then_some(())?;
        let k = String::from_utf8(s.data.as_ref()?.get("key")?.0.clone()).ok()?;
        Some((s, k))
    })
    .await;
    assert_eq!(own.owner_references()[0].kind, "ApiClient");
    wait_keys(&env, "acme", "True", "Resolved").await;
    wait_events(&env, "acme", "KeyGenerated", &fp(&key)).await;
    proxy.wait_answer(&env, LO, &key, 200, Some("acme")).await;
    assert_eq!(proxy.ask(LO, planted).await.0, 401);
    drop(proxy);
    ctl.stop().await.unwrap();
}

/// Removing a generated key deletes its Secret; adding an entry of that name again generates a new key, so a removed
/// key never comes back. Secrets the controller did not generate for the client are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_generated_secrets_are_deleted_and_never_come_back() {
    let env = env("orphan").await;
    let ctl = start_controller(&env, "orphan-1").await;
    create_plan(&env, plan()).await;
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1", "k2"]))).await;
    let (_, old_k2) = wait_generated(&env, "acme-key-k2").await;
    wait_keys(&env, "acme", "True", "Resolved").await;
    // Secrets owned by acme that the controller did not generate: a user's, and one of an earlier version's naming.
    let acme = clients(&env).get("acme").await.unwrap();
    let owner = acme.controller_owner_ref(&()).unwrap();
    for (name, labels) in [
        ("acme-notes", json!({LABEL_API_KEY: "true"})),
        ("acme-key-0", json!({LABEL_API_CLIENT: "acme", "app.kubernetes.io/managed-by": "portcullis-controller"})),
    ] {
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
            "stringData": {"key": "not-a-generated-key-0123456789"}
        }))
        .unwrap();
        secrets(&env).create(&PostParams::default(), &s).await.unwrap();
    }

    let patch = json!({"spec": {"keys": generated(&["k1"])}});
    clients(&env).patch("acme", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    wait_for(T, "acme-key-k2 deleted", || async {
        matches!(secrets(&env).get_opt("acme-key-k2").await, Ok(None)).then_some(())
    })
    .await;
    wait_events(&env, "acme", "KeyDeleted", &fp(&old_k2)).await;
    wait_table(&env, SERVICE, "k2 gone", |t| {
        client_in(t, &env, "acme")
            .is_some_and(|c| c.keys.len() == 1 && c.keys[0].sha256 != key_digest(old_k2.as_bytes()))
    })
    .await;

    // The entry comes back: a new key, not the old one.
    let patch = json!({"spec": {"keys": generated(&["k1", "k2"])}});
    clients(&env).patch("acme", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let (_, new_k2) = wait_generated(&env, "acme-key-k2").await;
    assert_ne!(new_k2, old_k2, "a removed key came back");
    wait_events(&env, "acme", "KeyGenerated", &fp(&new_k2)).await;
    wait_keys(&env, "acme", "True", "Resolved").await;
    for name in ["acme-notes", "acme-key-0"] {
        assert!(secrets(&env).get_opt(name).await.unwrap().is_some(), "{name} was deleted");
    }
    ctl.stop().await.unwrap();
}

/// A generated Secret that cannot be created sets `KeysResolved=False` (`SecretCreateFailed`, with the API server's
/// message), so `kubectl wait` fails instead of hanging; the creation is retried and succeeds once possible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_creation_sets_a_condition_and_is_retried() {
    let env = env("createfail").await;
    // A quota of zero Secrets. No quota controller runs here, so the test writes the usage status itself (the
    // API server's quota admission reads it).
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(env.admin.clone(), &env.ns);
    let quota = json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-secrets"},
                       "spec": {"hard": {"count/secrets": "0"}}});
    quotas.create(&PostParams::default(), &serde_json::from_value(quota).unwrap()).await.unwrap();
    let status = json!({"status": {"hard": {"count/secrets": "0"}, "used": {"count/secrets": "0"}}});
    quotas.patch_status("no-secrets", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    let probe: Secret = serde_json::from_value(json!({"metadata": {"name": "probe"}})).unwrap();
    wait_for(T, "the quota refuses Secrets", || async {
        match secrets(&env).create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(e)) if e.code == 403 => Some(()),
            Ok(_) => {
                let _ = secrets(&env).delete("probe", &DeleteParams::default()).await;
                None
            }
            Err(_) => None,
        }
    })
    .await;
    let ctl = start_controller(&env, "createfail-1").await;
    create_plan(&env, plan()).await;
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1"]))).await;
    let st = wait_keys(&env, "acme", "False", "SecretCreateFailed").await;
    let msg = &condition(&st.conditions, "KeysResolved").unwrap().message;
    assert!(msg.contains("acme-key-k1") && msg.contains("quota"), "{msg}");
    assert_eq!(condition(&st.conditions, "Ready").unwrap().reason, "SecretCreateFailed");
    wait_events(&env, "acme", "SecretCreateFailed", "acme-key-k1").await;

    quotas.delete("no-secrets", &DeleteParams::default()).await.unwrap();
    let (_, key) = wait_generated(&env, "acme-key-k1").await;
    wait_keys(&env, "acme", "True", "Resolved").await;
    wait_events(&env, "acme", "KeyGenerated", &fp(&key)).await;
    ctl.stop().await.unwrap();
}

/// Status lists that become empty are cleared (not left with their last entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_status_lists_are_cleared() {
    let env = env("clear").await;
    let ctl = start_controller(&env, "clear-1").await;
    create_plan(&env, plan()).await;
    create_client(&env, "acme", client_with_keys(&["127.0.0.1/32"], generated(&["k1"]))).await;
    wait_generated(&env, "acme-key-k1").await;
    let st = wait_keys(&env, "acme", "True", "Resolved").await;
    assert_eq!((st.key_fingerprints.len(), st.generated_keys.len()), (1, 1));
    // Keys → certificates only: the key lists must become empty.
    let patch = json!({"spec": {"keys": [], "certificates": [{"sanDNS": "acme.example"}]}});
    clients(&env).patch("acme", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let st = wait_keys(&env, "acme", "True", "Resolved").await;
    assert!(st.key_fingerprints.is_empty(), "{:?}", st.key_fingerprints);
    assert!(st.generated_keys.is_empty(), "{:?}", st.generated_keys);
    ctl.stop().await.unwrap();
}
