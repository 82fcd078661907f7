//! Lifecycle of tables against the real local API server, each scenario asserting what a client gets from a running
//! sidecar (`portcullis-proxy`, with its own ServiceAccount token, bound only by the controller's RoleBinding)
//! before and after: ungranting (last plan deleted, Service removed from a plan, plan invalid), a deleted
//! RoleBinding, a relist with deletions during the gap, deleted and edited shards, a paused leader, and a client
//! that cannot be rendered; and that the controller's own writes do not re-decide the table. Revocations are timed
//! over repeated trials; figures are printed (`--nocapture`).

use crate::common::sidecar::{Relay, Sidecar, report, service_and_pod, start_echo};
use crate::common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use portcullis_controller::crd::*;
use portcullis_controller::runtime::access::sidecar_rbac_name;
use portcullis_table::naming::{INDEX_DATA_KEY, Slot, index_name};
use portcullis_table::shard::IndexDoc;
use portcullis_testkit::{ControlPlane, wait_for};
use serde_json::json;
use std::time::{Duration, Instant};

const SERVICE: &str = "orders";
const SA_SIDECAR: &str = "orders-sidecar";
const KEY: &str = "lifecycle-key-acme-0123456789abcdef";
/// Trials per timed revocation scenario.
const TRIALS: usize = 10;
/// The goal is 1 s at p99; the assertion leaves room for a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(3);

fn plan(name: &str, services: &[&str]) -> UsagePlan {
    UsagePlan::new(
        name,
        UsagePlanSpec {
            services: services.iter().map(|s| ServiceGrant { name: s.to_string(), routes: None }).collect(),
            throttle: Some(ThrottleSpec { rate: 1000, per: "1s".into(), burst: Some(1000) }),
            quota: None,
            global_limits: None,
            quota_scope: None,
            on_store_unavailable: None,
            network_policy: None,
        },
    )
}

fn plans(env: &Env) -> Api<UsagePlan> {
    Api::namespaced(env.admin.clone(), &env.ns)
}

/// Plan `gold` granting `orders`, ApiClient `acme` (key [`KEY`], from 127.0.0.1), the Service and an opted-in Pod,
/// and a sidecar that admits `acme`.
async fn granted(env: &Env) -> Sidecar {
    create_secret(env, "acme-key", &[("key", KEY)]).await;
    create_plan(env, plan("gold", &[SERVICE])).await;
    create_client(env, "acme", client_spec(&["gold"], &["127.0.0.1/32"], "acme-key", "key")).await;
    service_and_pod(env, SERVICE, SA_SIDECAR).await;
    let mut sidecar = Sidecar::start(env, SERVICE, SA_SIDECAR, start_echo().await).await;
    sidecar.until(KEY, "acme admitted", |s| s == 200).await;
    sidecar
}

/// The live index of `orders`.
async fn index(env: &Env) -> Option<(ConfigMap, IndexDoc)> {
    let cm = Api::<ConfigMap>::namespaced(env.admin.clone(), &env.ns).get_opt(&index_name(SERVICE)).await.ok()??;
    let doc = IndexDoc::parse(cm.data.as_ref()?.get(INDEX_DATA_KEY)?, "index").ok()?;
    Some((cm, doc))
}

/// Runs `TRIALS` revoke/restore cycles; returns the revocation times (until the sidecar answers 403).
async fn trials<R, G>(env: &Env, sidecar: &mut Sidecar, what: &str, revoke: R, restore: G) -> Vec<Duration>
where
    R: AsyncFn(&Env),
    G: AsyncFn(&Env),
{
    let mut samples = Vec::new();
    for _ in 0..TRIALS {
        let t = Instant::now();
        revoke(env).await;
        let (_, status) = sidecar.until(KEY, what, |s| s != 200).await;
        samples.push(t.elapsed());
        assert!(status == 403 || status == 503, "{what}: denied with {status}");
        // Settles on the deny-all table (403 service_not_granted), not on a lost table.
        sidecar.until(KEY, "deny-all table", |s| s == 403).await;
        restore(env).await;
        sidecar.until(KEY, "re-granted", |s| s == 200).await;
    }
    let (_, p99, max) = report(what, &samples);
    assert!(p99 <= BOUND && max <= BOUND * 2, "{what}: p99 {p99:?}, max {max:?}");
    samples
}

/// The sidecar's RoleBinding binds its ServiceAccount beside the deny-all table, owned by the Service (the garbage
/// collector may delete the plan-owned one first: the controller then restores it).
async fn binding_kept(env: &Env) {
    let rbs = Api::<RoleBinding>::namespaced(env.admin.clone(), &env.ns);
    let rb = wait_for(T, "sidecar RoleBinding kept beside the deny-all table", || async {
        let rb = rbs.get_opt(&sidecar_rbac_name(SERVICE)).await.ok()??;
        let owners = rb.metadata.owner_references.clone().unwrap_or_default();
        (owners.len() == 1 && owners[0].kind == "Service").then_some(rb)
    })
    .await;
    assert_eq!(rb.subjects.unwrap()[0].name, SA_SIDECAR);
    // And it stays (not removed after the table was published).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rbs.get_opt(&sidecar_rbac_name(SERVICE)).await.unwrap().is_some(), "the RoleBinding was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_last_plan_denies_every_client() {
    let env = env("lc-delplan").await;
    let ctl = start_controller(&env, "lc-delplan").await;
    let mut sidecar = granted(&env).await;
    trials(
        &env,
        &mut sidecar,
        "last plan deleted → 403",
        async |env: &Env| plans(env).delete("gold", &DeleteParams::default()).await.map(|_| ()).unwrap(),
        async |env: &Env| create_plan(env, plan("gold", &[SERVICE])).await,
    )
    .await;
    plans(&env).delete("gold", &DeleteParams::default()).await.unwrap();
    sidecar.until(KEY, "deny-all", |s| s == 403).await;
    let (_, doc) = wait_for(T, "deny-all index", || async { index(&env).await.filter(|(_, d)| d.is_deny_all()) }).await;
    assert!(doc.deny_all.unwrap().reason.contains("no valid UsagePlan grants"));
    binding_kept(&env).await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_service_from_a_plan_denies_its_clients() {
    let env = env("lc-unlist").await;
    let ctl = start_controller(&env, "lc-unlist").await;
    let mut sidecar = granted(&env).await;
    let e = &env;
    let set = move |services: serde_json::Value| async move {
        let patch = json!({"spec": {"services": services}});
        plans(e).patch("gold", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    };
    let mut samples = Vec::new();
    for _ in 0..TRIALS {
        let t = Instant::now();
        set(json!([{"name": "billing"}])).await;
        sidecar.until(KEY, "unlisted", |s| s != 200).await;
        samples.push(t.elapsed());
        sidecar.until(KEY, "deny-all table", |s| s == 403).await;
        set(json!([{"name": SERVICE}])).await;
        sidecar.until(KEY, "listed again", |s| s == 200).await;
    }
    let (_, p99, max) = report("Service removed from the plan → 403", &samples);
    assert!(p99 <= BOUND && max <= BOUND * 2, "p99 {p99:?}, max {max:?}");
    set(json!([{"name": "billing"}])).await;
    sidecar.until(KEY, "deny-all", |s| s == 403).await;
    binding_kept(&env).await;
    ctl.stop().await.unwrap();
}

/// A plan the controller cannot use (here: stored under a looser schema, as after a CRD downgrade or an object
/// written before a validation existed) grants nothing: its Services get the deny-all table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_plan_grants_nothing() {
    let env = env("lc-invalid").await;
    loosen_usageplan_schema(&env).await;
    let ctl = start_controller(&env, "lc-invalid").await;
    let mut sidecar = granted(&env).await;
    let e = &env;
    let set_per = move |per: &'static str| async move {
        let patch = json!({"spec": {"throttle": {"per": per}}});
        plans(e).patch("gold", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    };
    let mut samples = Vec::new();
    for _ in 0..TRIALS {
        let t = Instant::now();
        set_per("1d").await;
        sidecar.until(KEY, "plan invalid", |s| s != 200).await;
        samples.push(t.elapsed());
        sidecar.until(KEY, "deny-all table", |s| s == 403).await;
        set_per("1s").await;
        sidecar.until(KEY, "plan valid again", |s| s == 200).await;
    }
    let (_, p99, max) = report("plan made invalid → 403", &samples);
    assert!(p99 <= BOUND && max <= BOUND * 2, "p99 {p99:?}, max {max:?}");
    set_per("1d").await;
    wait_for(T, "UsagePlan gold Ready=False InvalidSpec", || async {
        let p = plans(&env).get("gold").await.ok()?;
        let c = condition(&p.status?.conditions, "Ready")?.clone();
        (c.status == "False").then_some(())
    })
    .await;
    binding_kept(&env).await;
    ctl.stop().await.unwrap();
}

/// Removes the `per` pattern from the UsagePlan CRD of this test binary's control plane (no other test here relies
/// on it), so that a plan the controller must refuse can be stored.
async fn loosen_usageplan_schema(env: &Env) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
        let mut crd = crds.get("usageplans.portcullis.dev").await.unwrap();
        let mut v = serde_json::to_value(&crd.spec).unwrap();
        let per = &mut v["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["throttle"]
            ["properties"]["per"];
        per.as_object_mut().expect("the per schema").remove("pattern");
        crd.spec = serde_json::from_value(v).unwrap();
        crds.replace("usageplans.portcullis.dev", &PostParams::default(), &crd).await.unwrap();
        // Wait until the API server accepts the looser value (schema changes apply asynchronously).
        let probe_ns = env.ns.clone();
        wait_for(T, "looser UsagePlan schema in force", || async {
            let mut p = plan("probe", &["none"]);
            p.spec.throttle.as_mut().unwrap().per = "1d".into();
            let api: Api<UsagePlan> = Api::namespaced(env.admin.clone(), &probe_ns);
            let ok = api.create(&PostParams::default(), &p).await.is_ok();
            if ok {
                let _ = api.delete("probe", &DeleteParams::default()).await;
            }
            ok.then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_role_binding_is_restored() {
    let env = env("lc-rbac").await;
    let ctl = start_controller(&env, "lc-rbac").await;
    let mut sidecar = granted(&env).await;
    let rbs: Api<RoleBinding> = Api::namespaced(env.admin.clone(), &env.ns);
    let before = rbs.get(&sidecar_rbac_name(SERVICE)).await.unwrap();
    let t = Instant::now();
    rbs.delete(&sidecar_rbac_name(SERVICE), &DeleteParams::default()).await.unwrap();
    let restored = wait_for(T, "RoleBinding restored", || async {
        rbs.get_opt(&sidecar_rbac_name(SERVICE)).await.ok()?.filter(|rb| rb.metadata.uid != before.metadata.uid)
    })
    .await;
    eprintln!("RoleBinding restored after {:?}", t.elapsed());
    assert_eq!(restored.subjects.unwrap()[0].name, SA_SIDECAR);
    // The sidecar reads (and serves) again; a change made now reaches it.
    sidecar.until(KEY, "admitted after the restore", |s| s == 200).await;
    Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns)
        .patch("acme", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sourceRanges": ["10.0.0.0/8"]}})))
        .await
        .unwrap();
    sidecar.until(KEY, "source range change enforced", |s| s == 403).await;
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_and_edited_shards_are_repaired() {
    let env = env("lc-drift").await;
    let ctl = start_controller(&env, "lc-drift").await;
    let _sidecar = granted(&env).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    for (damage, done) in [("delete", "deleted"), ("edit", "edited")] {
        let (_, doc) = index(&env).await.expect("index");
        let shard = doc.shards[0].name.clone();
        let t = Instant::now();
        match damage {
            "delete" => cms.delete(&shard, &DeleteParams::default()).await.map(|_| ()).unwrap(),
            _ => {
                let patch = json!({"data": {"shard.json": "{\"tampered\": true}"}});
                cms.patch(&shard, &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ()).unwrap()
            }
        }
        wait_table(&env, SERVICE, &format!("consistent after the {done} shard"), |t| t.clients.len() == 1).await;
        eprintln!("shard {done} → consistent table after {:?}", t.elapsed());
        // A sidecar starting now (a new pod) loads the repaired table and admits acme.
        let mut fresh = Sidecar::start(&env, SERVICE, SA_SIDECAR, start_echo().await).await;
        fresh.until(KEY, &format!("new sidecar after the {done} shard"), |s| s == 200).await;
    }
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_be_rendered_does_not_hold_back_the_others() {
    let env = env("lc-render").await;
    let lease = format!("pc-{}", env.ns);
    // 4 KiB shards: a client with 200 IPv6 ranges no longer fits one.
    let ctl = start_controller_with(&env, "lc-render", &lease, None, |c| c.max_shard_bytes = 4096).await;
    let mut sidecar = granted(&env).await;
    let mut big = client_spec(&["gold"], &[], "acme-key", "key");
    big.keys.clear();
    big.certificates = vec![CertificateSpec { san_dns: Some("big.example".into()), ..Default::default() }];
    big.source_ranges = (0..200).map(|i| format!("2001:db8:{i:x}::/48")).collect();
    create_client(&env, "big", big).await;
    let c = wait_client_condition(&env, "big", "Programmed", "False", Some("RenderFailed")).await;
    let msg = &condition(&c.status.as_ref().unwrap().conditions, "Programmed").unwrap().message;
    assert!(msg.contains("orders") && msg.contains("more than a shard holds"), "{msg}");
    // The other client's changes still propagate: revoke acme's address range.
    let t = Instant::now();
    Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns)
        .patch("acme", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sourceRanges": ["10.0.0.0/8"]}})))
        .await
        .unwrap();
    let (_, status) = sidecar.until(KEY, "acme's range revoked beside the bad client", |s| s != 200).await;
    assert_eq!(status, 403);
    eprintln!("revocation beside an unrenderable client: {:?}", t.elapsed());
    wait_client_condition(&env, "acme", "Ready", "True", None).await;
    ctl.stop().await.unwrap();
}

/// Two controller processes; the leader is paused (SIGSTOP) right after an edit, past its lease; the standby takes
/// over and publishes a revocation; the old leader, resumed, must not publish anything (it steps down and exits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_publishes_nothing_stale() {
    let env = env("lc-pause").await;
    let lease = format!("pause-{}", env.ns);
    let token = env.cp.service_account_token(SYSTEM_NS, SA).await;
    let kubeconfig = env.cp.kubeconfig_for_token(&token);
    let spawn = |identity: &str| {
        let log = env.cp.dir().join(format!("controller-{identity}.log"));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-controller"))
            .args(["--namespace", &env.ns, "--lease-namespace", SYSTEM_NS, "--lease-name", &lease])
            .args(["--identity", identity, "--lease-duration-seconds", "4", "--lease-renew-deadline-seconds", "2"])
            .args(["--lease-retry-period-seconds", "1", "--webhook=false", "--log-format", "json"])
            .arg(format!("--metrics-listen=127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAMESPACE")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning portcullis-controller");
        (child, log)
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.admin.clone(), SYSTEM_NS);
    let holder = async || leases.get_opt(&lease).await.ok().flatten()?.spec?.holder_identity;
    let (mut a, a_log) = spawn("pause-a");
    wait_for(T, "pause-a leads", || async { (holder().await.as_deref() == Some("pause-a")).then_some(()) }).await;
    let (mut b, _) = spawn("pause-b");
    let mut sidecar = granted(&env).await;

    // An edit the leader has just seen (its render may be pending), then the pause.
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let patch = json!({"spec": {"sourceRanges": ["127.0.0.1/32", "10.1.0.0/16"]}});
    clients.patch("acme", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let pid = a.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let paused = Instant::now();
    wait_for(T, "pause-b takes over", || async { (holder().await.as_deref() == Some("pause-b")).then_some(()) }).await;
    eprintln!("standby took over {:?} after the pause", paused.elapsed());

    // The new leader revokes acme.
    clients.delete("acme", &DeleteParams::default()).await.unwrap();
    let (took, status) = sidecar.until(KEY, "acme revoked by the new leader", |s| s != 200).await;
    assert_eq!(status, 401);
    eprintln!("revocation by the new leader: {took:?}");
    let (revoked_cm, revoked) =
        wait_for(T, "index without acme", || async { index(&env).await.filter(|(_, d)| d.clients == 0) }).await;

    // Resume the old leader: it must step down without writing.
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let resumed = Instant::now();
    let exit = tokio::time::timeout(T, a.wait()).await.expect("the old leader exits after resuming").unwrap();
    assert!(!exit.success(), "the old leader exits with an error (lost Lease): {exit:?}");
    let log = std::fs::read_to_string(&a_log).unwrap()
        + &std::fs::read_to_string(a_log.with_extension("err")).unwrap_or_default();
    assert!(log.contains("stepping down") || log.contains("lost the leader Lease"), "{log}");
    // For a while after the resume: no index write reinstates acme; the sidecar keeps refusing it.
    while resumed.elapsed() < Duration::from_secs(3) {
        let (cm, doc) = index(&env).await.expect("index");
        assert_eq!(doc.clients, 0, "a stale table reinstating acme was published: {doc:?}");
        assert!(doc.sequence >= revoked.sequence, "the sequence went back");
        if cm.metadata.resource_version != revoked_cm.metadata.resource_version {
            eprintln!("index rewritten after the resume (sequence {}), still without acme", doc.sequence);
        }
        assert_eq!(sidecar.status(KEY).await, Some(401));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(holder().await.as_deref(), Some("pause-b"));
    let _ = b.kill().await;
}

/// Trials of the relist scenario (each restarts the API server).
const RELIST_TRIALS: usize = 5;

/// The controller is cut off from the API server; during the gap a client is deleted, etcd compacts its history and
/// the API server restarts (so its watch cache cannot replay the gap): the controller's watches relist (410 Gone),
/// and the deletion found in the diff revokes the client. Repeated [`RELIST_TRIALS`] times, one client each; the
/// time is measured from the moment the controller can reach the API server again, with the sidecar's own watch
/// re-established (its reconnection after the restart is measured and printed separately: it is bounded by the
/// sidecar's retry backoff, at most 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_a_gap_applies_deletions() {
    // Started on a thread of its own (it runs a runtime of its own while starting).
    let cp = std::thread::spawn(|| ControlPlane::start(true)).join().unwrap().expect("private control plane");
    let cp: &'static ControlPlane = Box::leak(Box::new(cp));
    let env = env_on(cp, "lc-relist").await;
    let api_addr: std::net::SocketAddr = cp.server_url().trim_start_matches("https://").parse().unwrap();
    let relay = Relay::start(api_addr).await;
    let mut kube = controller_kube_config(&env).await;
    kube.cluster_url = format!("https://{}", relay.addr).parse().unwrap();
    let lease = format!("relist-{}", env.ns);
    // A long lease: the gap (API server restart) must not cost the controller its leadership.
    let ctl = start_controller_with(&env, "lc-relist", &lease, Some(kube), |c| {
        c.lease_duration = Duration::from_secs(120);
        c.lease_renew_deadline = Duration::from_secs(90);
        c.lease_retry_period = Duration::from_secs(2);
    })
    .await;
    let mut sidecar = granted(&env).await;
    let keys: Vec<String> = (0..RELIST_TRIALS).map(|i| format!("lifecycle-key-gap{i}-0123456789abcdef")).collect();
    for (i, key) in keys.iter().enumerate() {
        create_secret(&env, &format!("gap{i}-key"), &[("key", key)]).await;
        create_client(
            &env,
            &format!("gap{i}"),
            client_spec(&["gold"], &["127.0.0.1/32"], &format!("gap{i}-key"), "key"),
        )
        .await;
        sidecar.until(key, "admitted", |s| s == 200).await;
    }

    let clients = Api::<ApiClient>::namespaced(env.admin.clone(), &env.ns);
    let (mut published, mut enforced, mut reconnected) = (Vec::new(), Vec::new(), Vec::new());
    for (i, key) in keys.iter().enumerate() {
        relay.stop().await;
        clients.delete(&format!("gap{i}"), &DeleteParams::default()).await.unwrap();
        cp.compact_etcd().await.expect("compacting etcd");
        cp.stop_apiserver();
        cp.start_apiserver().await.expect("restarting kube-apiserver");
        reconnected.push(sidecar.until_watching().await);
        assert_eq!(sidecar.status(key).await, Some(200), "trial {i}: nothing was rendered during the gap");
        let t = Instant::now();
        relay.resume().await;
        let left = RELIST_TRIALS - i - 1;
        wait_for(T, "index without the deleted client", || async {
            index(&env).await.filter(|(_, d)| d.clients == left + 1)
        })
        .await;
        published.push(t.elapsed());
        let (_, status) = sidecar.until(key, "revoked after the relist", |s| s != 200).await;
        enforced.push(t.elapsed());
        assert_eq!(status, 401);
        sidecar.until(KEY, "acme still admitted", |s| s == 200).await;
    }
    report("relist after a gap: sidecar watch re-established after the API server restart", &reconnected);
    report("relist after a gap: deletion published, after the controller could reconnect", &published);
    let (_, p99, max) = report("relist after a gap: deletion enforced by the sidecar", &enforced);
    // LC_DEBUG=1 prints the controller's watch, relist and Lease log lines (where the time after reconnection goes).
    if std::env::var_os("LC_DEBUG").is_some() {
        for l in logs().lines().filter(|l| {
            l.contains("watch") || l.contains("relist") || l.contains("table revision") || l.contains("Lease")
        }) {
            eprintln!("{l}");
        }
    }
    assert!(
        controller_log_lines("lc-relist", "relisted; re-checking what changed in the gap") > 0,
        "the controller's watches did not relist (no 410 Gone?)"
    );
    assert!(p99 <= BOUND && max <= BOUND * 2, "relist: p99 {p99:?}, max {max:?}");
    ctl.stop().await.unwrap();
}

/// A table of `n` clients for `orders` in the test's namespace (the controller's own build, from synthetic input).
fn table_of(env: &Env, n: usize) -> portcullis_table::Table {
    use portcullis_controller::keys::resolve_keys;
    let (plans, clients, keys) = portcullis_controller::fixtures::fixture(n);
    portcullis_controller::model::build_table(&env.ns, SERVICE, &plans, &clients, |c| {
        resolve_keys(c, |name| (name == "keys").then_some(&keys)).entries
    })
    .table
}

/// Fencing, at the API server: a writer that read the tables before another writer replaced them cannot publish
/// over them — not the index, not a shard — nor delete the index; readers always assemble the winner's table. Two
/// writers play two controller replicas; no Lease is involved, so this is the resourceVersion preconditions alone
/// (the Lease is `a_paused_leader_publishes_nothing_stale`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_lost_the_index_precondition_publishes_nothing() {
    use portcullis_controller::runtime::{Error, publish::Writer};
    let env = env("lc-fence").await;
    let old = Writer::unfenced(env.admin.clone(), &env.ns, SERVICE);
    let new = Writer::unfenced(env.admin.clone(), &env.ns, SERVICE);
    let (two, one) = (table_of(&env, 2), table_of(&env, 1));
    let max = portcullis_table::shard::MAX_SHARD_BYTES;

    // Both writers find no tables; the first publishes, the second's first shard create is refused.
    let (absent_a, absent_b) = (old.read().await.unwrap(), new.read().await.unwrap());
    old.publish(&absent_a, &two, None, false, &[], max).await.expect("first publish");
    let lost = new.publish(&absent_b, &one, None, false, &[], max).await;
    assert!(matches!(lost, Err(Error::Conflict(_))), "a second create must conflict: {:?}", lost.err());
    let (doc, table, _) = read_table(&env, SERVICE).await.expect("the first writer's table, whole");
    assert_eq!((doc.sequence, table.revision.as_str()), (1, two.revision.as_str()));

    // Both read revision 1; the new writer revokes a client (sequence 2); the old one, still holding what it read,
    // tries to publish two clients again (a stale table) and then to delete the index: both refused.
    let (stale, fresh) = (old.read().await.unwrap(), new.read().await.unwrap());
    new.publish(&fresh, &one, None, false, &[], max).await.expect("the new writer publishes");
    let revoked = read_table(&env, SERVICE).await.expect("a readable table");
    assert_eq!((revoked.0.sequence, revoked.1.clients.len()), (2, 1));
    let refused = old.publish(&stale, &two, None, false, &[], max).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "a stale publish must conflict: {:?}", refused.err());
    let refused = old.remove(&stale).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "a stale delete must conflict: {:?}", refused.err());

    // Nothing of the stale writer landed: the new writer's table is whole (every shard matches its index).
    let (doc, t, _) = read_table(&env, SERVICE).await.expect("the new writer's table, whole");
    assert_eq!((doc.sequence, t.revision.as_str()), (2, one.revision.as_str()), "the table went back");

    // A ConfigMap at a shard name that is not ours (no managed-by label) is no writer's: taken over, not a conflict.
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    // (Where the next write of shard 0 goes: the slot its current version is not in.)
    let slot = if doc.shards[0].name.ends_with("-a-0") { Slot::B } else { Slot::A };
    let foreign = portcullis_table::naming::shard_name(&index_name(SERVICE), slot, 0);
    cms.delete(&foreign, &DeleteParams::default()).await.unwrap();
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta { name: Some(foreign.clone()), ..Default::default() },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let live = new.read().await.unwrap();
    // (A table with other content, so that shard 0 is written.)
    new.publish(&live, &two, None, false, &[], max).await.expect("publish over a foreign ConfigMap");
    let (doc, t, shards) = read_table(&env, SERVICE).await.expect("a readable table after the takeover");
    assert_eq!((doc.sequence, t.clients.len()), (3, 2));
    assert_eq!(shards[0].metadata.name.as_deref(), Some(foreign.as_str()));
}

/// Stale shards are deleted after a publish, not during it (`Writer::prune`, run by the controller while it is idle):
/// only those neither the index just written nor the one it replaced names, only while that index is still the
/// live one (a job of an older publish deletes nothing), and never a ConfigMap that is not ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_shards_are_pruned_only_while_their_index_is_live() {
    use portcullis_controller::runtime::publish::Writer;
    use std::collections::BTreeSet;
    let env = env("lc-prune").await;
    let w = Writer::unfenced(env.admin.clone(), &env.ns, SERVICE);
    // Small shards: 60 clients span several; the later revisions one each.
    let max = 4096;
    let shard_names = || async {
        let mut v = table_configmaps(&env, SERVICE).await;
        v.retain(|n| *n != index_name(SERVICE));
        v.into_iter().collect::<BTreeSet<String>>()
    };
    let named = |doc: &IndexDoc| doc.shards.iter().map(|s| s.name.clone()).collect::<BTreeSet<String>>();
    w.publish(&w.read().await.unwrap(), &table_of(&env, 60), None, false, &[], max).await.expect("revision 1");
    let rev1 = read_table(&env, SERVICE).await.expect("revision 1, whole").0;
    assert!(rev1.shards.len() >= 3, "the test needs several shards, got {}", rev1.shards.len());
    let (_, prune2) =
        w.publish(&w.read().await.unwrap(), &table_of(&env, 1), None, false, &[], max).await.expect("revision 2");
    let rev2 = read_table(&env, SERVICE).await.expect("revision 2, whole").0;
    let (_, prune3) =
        w.publish(&w.read().await.unwrap(), &table_of(&env, 2), None, false, &[], max).await.expect("revision 3");
    let rev3 = read_table(&env, SERVICE).await.expect("revision 3, whole").0;
    // Publishing deleted nothing: every shard of every revision is still there.
    let all: BTreeSet<String> = named(&rev1).into_iter().chain(named(&rev2)).chain(named(&rev3)).collect();
    assert_eq!(shard_names().await, all, "a publish deleted shards");
    // A ConfigMap labelled as a shard of the Service but not managed by Portcullis is not ours to delete.
    let cms: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let foreign = "orders-table-not-ours";
    use portcullis_table::naming::{LABEL_ROLE, LABEL_SERVICE};
    let labels = [(LABEL_SERVICE, SERVICE), (LABEL_ROLE, "shard")];
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(foreign.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // Revision 2's job: its index is no longer the live one, so it deletes nothing (revision 1's shards are what
    // revision 2 replaced, and revision 3's are another publish's).
    w.prune(&prune2).await.expect("an outdated prune");
    let mut with_foreign = all.clone();
    with_foreign.insert(foreign.to_string());
    assert_eq!(shard_names().await, with_foreign, "an outdated prune deleted shards");
    // Revision 3's job: revision 1's shards go; revision 3's and the one it replaced (2) stay whole, as does the
    // foreign ConfigMap. Running it again changes nothing.
    for _ in 0..2 {
        w.prune(&prune3).await.expect("prune");
        let mut want: BTreeSet<String> = named(&rev3).into_iter().chain(named(&rev2)).collect();
        want.insert(foreign.to_string());
        assert_eq!(shard_names().await, want);
    }
    let (doc, table, _) = read_table(&env, SERVICE).await.expect("revision 3 still whole");
    assert_eq!((doc.sequence, table.clients.len()), (3, 2));
}

/// The table's ConfigMaps are owned by the plans granting the Service (garbage collection follows them). A plan
/// granting it, or ceasing to, changes no client, yet every shard must be rewritten with the new owners: a shard
/// still owned only by a deleted plan would be collected while another plan grants its clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_follows_the_plans_granting_the_service() {
    let env = env("lc-owners").await;
    let lease = format!("pc-{}", env.ns);
    // Small shards (4 KiB): 30 clients span several.
    let ctl = start_controller_with(&env, "lc-owners", &lease, None, |c| c.max_shard_bytes = 4096).await;
    let keys: Vec<(String, String)> =
        (0..30).map(|i| (format!("k{i}"), format!("owners-key-{i:02}-0123456789abcdef"))).collect();
    let data: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    create_secret(&env, "owners-keys", &data).await;
    create_plan(&env, plan("gold", &[SERVICE])).await;
    for (k, _) in &keys {
        create_client(&env, &format!("c-{k}"), client_spec(&["gold"], &["127.0.0.1/32"], "owners-keys", k)).await;
    }
    wait_table(&env, SERVICE, "every client", |t| t.clients.len() == keys.len()).await;
    let uid = |name: &'static str| {
        let plans = plans(&env);
        async move { plans.get(name).await.unwrap().metadata.uid.unwrap() }
    };
    // Every ConfigMap of the table (index and shards) owned by exactly `want`, with the clients all there.
    let owned_by = |want: Vec<String>| {
        let env = &env;
        let what = format!("every table ConfigMap owned by {want:?}");
        async move {
            wait_for(T, &what, || async {
                let (doc, table, shards) = read_table(env, SERVICE).await?;
                let (index, _) = index(env).await?;
                let mut want = want.clone();
                want.sort();
                let owners = |cm: &ConfigMap| {
                    let mut v: Vec<String> =
                        cm.metadata.owner_references.iter().flatten().map(|o| o.uid.clone()).collect();
                    v.sort();
                    v
                };
                (table.clients.len() == 30 && std::iter::once(&index).chain(&shards).all(|cm| owners(cm) == want))
                    .then_some(doc)
            })
            .await
        }
    };
    let gold = uid("gold").await;
    let doc = owned_by(vec![gold.clone()]).await;
    assert!(doc.shards.len() >= 2, "the test needs several shards, got {}", doc.shards.len());
    // A second plan grants the Service (no client uses it): every shard gains it as an owner.
    create_plan(&env, plan("silver", &[SERVICE])).await;
    let silver = uid("silver").await;
    owned_by(vec![gold.clone(), silver.clone()]).await;
    // The second plan is deleted (still no client changes): every shard is owned by the first only again.
    plans(&env).delete("silver", &DeleteParams::default()).await.unwrap();
    owned_by(vec![gold]).await;

    // The table shrinks to one shard, then changes once more: the controller deletes the shards neither of the
    // last two revisions names once it is idle (pruning is not part of a publish).
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    for (k, _) in &keys[2..] {
        clients.delete(&format!("c-{k}"), &DeleteParams::default()).await.unwrap();
    }
    let (before, _) = wait_table(&env, SERVICE, "two clients", |t| t.clients.len() == 2).await;
    clients.delete("c-k1", &DeleteParams::default()).await.unwrap();
    let (last, _) = wait_table(&env, SERVICE, "one client", |t| t.clients.len() == 1).await;
    let want: std::collections::BTreeSet<String> =
        before.shards.iter().chain(&last.shards).map(|s| s.name.clone()).chain([index_name(SERVICE)]).collect();
    wait_for(T, "only the last two revisions' shards left", || async {
        let left: std::collections::BTreeSet<String> = table_configmaps(&env, SERVICE).await.into_iter().collect();
        (left == want).then_some(())
    })
    .await;
    ctl.stop().await.unwrap();
}

/// The value of counter `series` (name and labels) on the controller's `/metrics` (0 if not yet there).
async fn counter(ctl: &Running, series: &str) -> u64 {
    let (_, body) = http_get(ctl.admin_addr, "/metrics").await.expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.parse().unwrap_or_else(|_| panic!("{series} {v}")))
}

const TABLE_RECONCILES: &str = "portcullis_controller_reconciles_total{controller=\"table\"}";
const CONFIGMAP_TRIGGERS: &str = "portcullis_controller_table_triggers_total{source=\"configmap\"}";

/// The controller's own writes (shards, index, pruned shards) come back as watch events, and what the sidecars
/// report changes after each revision: neither re-decides the table. Each awaited change costs one reconcile, not
/// two (before: one for the change and one for its echoes, ≈ 0.4 s each at 100 000 clients, holding the next
/// change back). An edit by anyone else still triggers a repair (`deleted_and_edited_shards_are_repaired`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_costs_one_reconcile_not_its_echoes() {
    let env = env("lc-echo").await;
    let ctl = start_controller(&env, "lc-echo").await;
    let mut sidecar = granted(&env).await;
    wait_client_condition(&env, "acme", "Ready", "True", None).await;
    let clients: Api<ApiClient> = Api::namespaced(env.admin.clone(), &env.ns);
    let before = counter(&ctl, TABLE_RECONCILES).await;
    let cm_before = counter(&ctl, CONFIGMAP_TRIGGERS).await;
    const CHANGES: u64 = 6;
    for i in 0..CHANGES {
        let range = if i % 2 == 0 { "127.0.0.2/32" } else { "127.0.0.1/32" };
        clients
            .patch("acme", &PatchParams::default(), &Patch::Merge(json!({"spec": {"sourceRanges": [range]}})))
            .await
            .unwrap();
        let what = format!("change {i} served");
        sidecar.until(KEY, &what, |s| if i % 2 == 0 { s == 403 } else { s == 200 }).await;
    }
    let after = counter(&ctl, TABLE_RECONCILES).await;
    // Each change's shard, index and pruned shard came back through the watch (at the latest, the next change's
    // reconcile came after them): none queued the table again.
    assert_eq!(counter(&ctl, CONFIGMAP_TRIGGERS).await, cm_before, "our own ConfigMap writes triggered the writer");
    // One reconcile per change; one more for a trigger of the setup still queued when `before` was read.
    assert!(
        (1..=CHANGES + 1).contains(&(after - before)),
        "{} table reconciles for {CHANGES} changes (echoes of our own writes re-decide the table?)",
        after - before
    );
    ctl.stop().await.unwrap();
}
