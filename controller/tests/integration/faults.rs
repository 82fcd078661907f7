//! Faults with the whole product running (issue 13, part 2): the API server and etcd stopped (15 s by default, as in
//! CI; `PORTCULLIS_OUTAGE_SECS=60` for the minute docs/reliability.md reports) while a load loop talks to a real
//! sidecar (`portcullis-proxy` with its own ServiceAccount token). The sidecar keeps enforcing
//! the last table (the allowed client never fails, the revoked one is never admitted); the controller backs off,
//! relists and converges, and the time from the restart to a correct status, table and sidecar is measured.
//!
//! The sidecar binary is the workspace's debug build, made on first use (`common::sidecar::proxy_binary`).
//! Figures are printed (`--nocapture`) and recorded in docs/reliability.md.

use crate::common::sidecar::{LO, Sidecar, request, service_and_pod, start_echo};
use crate::common::*;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use portcullis_controller::crd::*;
use portcullis_testkit::ControlPlane;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const SERVICE: &str = "orders";
const SA_SIDECAR: &str = "orders-sidecar";
/// How long the API server and etcd stay down: `PORTCULLIS_OUTAGE_SECS`, 15 s unless set.
fn outage() -> Duration {
    let secs =
        std::env::var("PORTCULLIS_OUTAGE_SECS").map_or(15, |v| v.parse().expect("PORTCULLIS_OUTAGE_SECS: seconds"));
    Duration::from_secs(secs)
}
/// The controller's reflected watches (plans, clients, Secrets, ConfigMaps, Services, Pods, Roles, RoleBindings,
/// NetworkPolicies).
const WATCHES: usize = 9;
const ALLOWED: &str = "faults-key-acme-0123456789abcdef";
const REVOKED: &str = "faults-key-rogue-0123456789abcdef";
const DELETED: &str = "faults-key-dora-0123456789abcdef";
const CREATED: &str = "faults-key-nova-0123456789abcdef";

fn plan() -> UsagePlan {
    UsagePlan::new(
        "gold",
        UsagePlanSpec {
            services: vec![ServiceGrant { name: SERVICE.into(), routes: None }],
            throttle: Some(ThrottleSpec { rate: 100_000, per: "1s".into(), burst: Some(100_000) }),
            quota: None,
            global_limits: None,
            quota_scope: None,
            on_store_unavailable: None,
            network_policy: None,
        },
    )
}

/// `GET /v1/orders` with `key` on a fresh connection: the status and the body's `reason` (if any), or why there
/// was no answer.
async fn ask(addr: SocketAddr, key: &str) -> Result<(u16, String), String> {
    let a = request(LO, addr, key).await?;
    let reason = serde_json::from_slice::<serde_json::Value>(&a.body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_string))
        .unwrap_or_default();
    Ok((a.status, reason))
}

#[derive(Debug, Default)]
struct Tally {
    /// (key, answer) → count; answer is the status or the transport error.
    answers: BTreeMap<(&'static str, String), usize>,
    allowed_failed: usize,
    revoked_admitted: usize,
    examples: Vec<String>,
}

/// Alternates the allowed and the revoked key against the sidecar until `stop` flips.
fn spawn_load(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Tally> {
    tokio::spawn(async move {
        let mut t = Tally::default();
        let mut n = 0usize;
        while !stop.load(Ordering::Acquire) {
            for key in [ALLOWED, REVOKED] {
                let a = ask(addr, key).await;
                let label = match &a {
                    Ok((s, r)) => format!("{s} {r}").trim_end().to_string(),
                    Err(e) => e.clone(),
                };
                *t.answers.entry((if key == ALLOWED { "allowed" } else { "revoked" }, label.clone())).or_default() += 1;
                let status = a.as_ref().map(|(s, _)| *s);
                let bad = if key == ALLOWED { status != Ok(200) } else { status == Ok(200) || a.is_err() };
                if bad {
                    if key == ALLOWED {
                        t.allowed_failed += 1;
                    } else {
                        t.revoked_admitted += 1;
                    }
                    if t.examples.len() < 5 {
                        t.examples.push(format!("{key}: {label} at {:?}", std::time::SystemTime::now()));
                    }
                }
                n += 1;
            }
            assert!(n < 5_000_000, "the load loop is bounded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t
    })
}

const ID: &str = "faults-outage";

/// Log lines of this test's controller whose message contains `what` (not other tests' controllers: the capture is
/// the binary's).
fn log_lines(what: &str) -> usize {
    controller_log_lines(ID, what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_and_etcd_down_under_load() {
    let outage_for = outage();
    // A private control plane: this test stops it. Started on a thread of its own (it runs its own runtime).
    let cp = std::thread::spawn(|| ControlPlane::start(true)).join().unwrap().expect("private control plane");
    let cp: &'static ControlPlane = Box::leak(Box::new(cp));
    // Beside the other tests: the log lines counted below are this test's controller's (see `log_lines`).
    let env = env_on(cp, "faults-outage").await;
    // The lease outlives the outage (leases live in etcd too): the same leader backs off and carries on. With the
    // default 15 s lease it would step down and exit, and its Deployment would restart it.
    let ctl = start_controller_with(&env, ID, &format!("outage-{}", env.ns), None, |c| {
        c.lease_duration = Duration::from_secs(180);
        c.lease_renew_deadline = Duration::from_secs(150);
        c.lease_retry_period = Duration::from_secs(2);
    })
    .await;
    create_plan(&env, plan()).await;
    for (name, key) in [("acme", ALLOWED), ("rogue", REVOKED), ("dora", DELETED), ("nova", CREATED)] {
        create_secret(&env, &format!("{name}-key"), &[("key", key)]).await;
    }
    for name in ["acme", "rogue", "dora"] {
        create_client(&env, name, client_spec(&["gold"], &["127.0.0.1/32"], &format!("{name}-key"), "key")).await;
    }
    service_and_pod(&env, SERVICE, SA_SIDECAR).await;
    let mut sidecar = Sidecar::start(&env, SERVICE, SA_SIDECAR, start_echo().await).await;
    for key in [ALLOWED, REVOKED, DELETED] {
        sidecar.until(key, "admitted before the outage", |s| s == 200).await;
    }
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    clients.patch("rogue", &PatchParams::default(), &Patch::Merge(json!({"spec": {"disabled": true}}))).await.unwrap();
    sidecar.until(REVOKED, "rogue revoked", |s| s == 403).await;
    wait_client_condition(&env, "acme", "Ready", "True", None).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(sidecar.addr, stop.clone());
    let watch_errors_before = log_lines("watch error (retrying with backoff)");
    let counting = Instant::now();
    let relists_before = log_lines("relisted; re-checking what changed in the gap");

    // The outage: API server, then etcd (data kept on disk).
    cp.stop_apiserver();
    cp.stop_etcd();
    let down = Instant::now();
    tokio::time::sleep(outage_for).await;
    assert!(!ctl.is_finished(), "the controller kept running through the outage");
    let watch_errors = log_lines("watch error (retrying with backoff)") - watch_errors_before;
    let counted_for = counting.elapsed();
    let proxy_metrics = crate::common::http_get(sidecar.admin, "/metrics").await.expect("sidecar /metrics").1;
    let readyz = crate::common::http_get(sidecar.admin, "/readyz").await.expect("sidecar /readyz");
    assert!(readyz.0.contains("200"), "the sidecar stays ready on its last table: {readyz:?}");

    cp.start_etcd().await.expect("restarting etcd");
    cp.start_apiserver().await.expect("restarting kube-apiserver");
    let up = Instant::now();
    let outage = up - down;
    // Changes right after the restart: one client deleted, one created.
    clients.delete("dora", &DeleteParams::default()).await.unwrap();
    create_client(&env, "nova", client_spec(&["gold"], &["127.0.0.1/32"], "nova-key", "key")).await;
    let ns = env.ns.clone();
    let has = |t: &portcullis_table::Table, c: &str| t.clients.iter().any(|x| x.id == format!("{ns}/{c}"));
    wait_table(&env, SERVICE, "nova in, dora out", |t| has(t, "nova") && !has(t, "dora")).await;
    let table_at = up.elapsed();
    wait_client_condition(&env, "nova", "Ready", "True", None).await;
    let status_at = up.elapsed();
    sidecar.until(CREATED, "nova admitted after the restart", |s| s == 200).await;
    sidecar.until(DELETED, "dora refused after the restart", |s| s == 401).await;
    let sidecar_at = up.elapsed();
    // The clients untouched during the gap still have a correct status.
    wait_client_condition(&env, "acme", "Ready", "True", None).await;
    wait_client_condition(&env, "rogue", "Ready", "True", None).await;
    let status_all_at = up.elapsed();

    stop.store(true, Ordering::Release);
    let tally = tokio::time::timeout(T, load).await.expect("load loop ends").unwrap();
    let relists = log_lines("relisted; re-checking what changed in the gap") - relists_before;
    let transient: u64 = proxy_metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"portcullis_proxy_table_source_errors_total{kind="transient"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    eprintln!(
        "API server + etcd down {outage:.1?} under load: allowed {} requests, {} failed; revoked {} requests, {} \
         admitted; answers {:?}",
        tally.answers.iter().filter(|((k, _), _)| *k == "allowed").map(|(_, n)| n).sum::<usize>(),
        tally.allowed_failed,
        tally.answers.iter().filter(|((k, _), _)| *k == "revoked").map(|(_, n)| n).sum::<usize>(),
        tally.revoked_admitted,
        tally.answers,
    );
    eprintln!(
        "during the outage: controller watch errors logged {watch_errors} in {counted_for:.1?} ({WATCHES} watches, retry every 250 ms at \
         most), sidecar transient source errors {transient}; after the restart: controller relists {relists}"
    );
    eprintln!(
        "from the API server ready again: table correct {table_at:.2?}, nova Ready {status_at:.2?}, sidecar admits \
         nova and refuses dora {sidecar_at:.2?}, every status correct {status_all_at:.2?}"
    );
    let sidecar_log = std::fs::read_to_string(&sidecar.log).unwrap_or_default();
    let count = |what: &str| sidecar_log.lines().filter(|l| l.contains(what)).count();
    eprintln!(
        "sidecar log: {} access denials not believed (API server not ready), {} revocations",
        count("access denial not believed"),
        count("table revoked")
    );
    if tally.allowed_failed + tally.revoked_admitted > 0 {
        // What the sidecar heard from its table source: every warning and error (each revocation names its cause
        // and the API server's answer), not just the start of the log.
        let noteworthy = |l: &&str| {
            ["WARN", "ERROR", "table revoked", "table applied", "not believed"].iter().any(|w| l.contains(w))
        };
        for l in sidecar_log.lines().filter(noteworthy).take(200) {
            eprintln!("sidecar: {l}");
        }
    }
    assert_eq!(tally.allowed_failed, 0, "the allowed client failed: {:?}", tally.examples);
    assert_eq!(tally.revoked_admitted, 0, "the revoked client was admitted: {:?}", tally.examples);
    assert!(tally.answers.values().sum::<usize>() >= 1000, "the load ran throughout: {:?}", tally.answers);
    // Backed off: each of the controller's WATCHES retries after 100 ms, 200 ms, then every 250 ms (a deliberate
    // cap, controller/src/runtime/caches.rs); a tight loop would be thousands of retries per second.
    assert!(watch_errors > 0, "the controller noticed the outage");
    // Counted over the stop and the outage: `counted_for`.
    let bound = (WATCHES as f64 * (2.0 + 4.0 * counted_for.as_secs_f64()) * 1.1) as usize;
    assert!(watch_errors <= bound, "{watch_errors} watch errors in {counted_for:.1?} (bound {bound}): no backoff?");
    assert!(transient > 0 && transient < 100, "the sidecar retried with backoff: {transient}");
    assert!(relists > 0, "the controller's watches relisted after the restart");
    assert!(sidecar_at < Duration::from_secs(60), "converged within a minute of the restart");
    ctl.stop().await.unwrap();
}
