//! The table writer: one logical table per (namespace, Service), decided from the caches ([`decide`], pure) and
//! published as an index ConfigMap and shard ConfigMaps ([`super::publish`], fenced), then the sidecar's RBAC
//! ([`super::access`]) and UsagePlan status ([`super::status`]).
//!
//! Triggers come from the watchers as [`ServiceKey`]s; bursts are coalesced (trailing debounce with a maximum
//! wait), so thousands of ApiClient changes cost a handful of renders. One batch is processed at a time, so this
//! replica never races itself on a Service; other writers are fenced by the index's resourceVersion.
//!
//! A Service that no valid UsagePlan grants gets a **deny-all table** (proxies refuse every request) while its
//! Service object exists or sidecar Pods name it; its sidecar Role and RoleBinding are kept, so running sidecars
//! keep reading and see the deny-all table now and a new grant later. Only when nothing names the Service any more
//! are its tables (index first) and RBAC removed.

use super::caches::in_namespace;
use super::publish::{Prune, Writer};
pub use super::rendered::{Generations, ServiceKey, ServiceState};
use super::status::update_plan_status;
use super::thread_time::Mark;
use super::{Ctx, Error};
use crate::crd::{API_VERSION, ApiClient, UsagePlan};
use crate::keys::{self, resolve_keys};
use crate::memo::{KeyMemo, TableMemo};
use crate::model;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use portcullis_table::Chain;
use portcullis_table::{Client, Table};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Trailing debounce: a batch closes after `quiet` without new triggers, or `max_wait` after it opened.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_wait: Duration,
}

/// How often a reconcile that lost the index precondition re-reads and re-decides before giving up for now.
const CONFLICT_RETRIES: usize = 3;

/// How often a reconcile whose request the API server left unanswered (connection closed) is tried again at once,
/// before the usual retry delay applies.
const UNANSWERED_RETRIES: usize = 1;

/// Processes queued Services until the queue closes, or returns [`Error::LostLease`] once this replica no longer
/// leads (it must not write again). `plan_status`: Services whose plans only need their status rewritten (what the
/// sidecars serve changed); handled at once between batches, and folded into an open batch without extending it.
pub async fn run_table_worker(
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<ServiceKey>,
    mut plan_status: mpsc::UnboundedReceiver<ServiceKey>,
    debounce: Debounce,
) -> Result<(), Error> {
    // Shards left to delete after each publish: deleted while the worker has nothing else to do (see
    // `publish::Prune`); the next trigger drops a deletion in progress, and a later publish of the same Service
    // replaces its job.
    let mut prunes: BTreeMap<ServiceKey, Prune> = BTreeMap::new();
    loop {
        // Table triggers first: a status-only request waits for nothing, but a table never waits for a status.
        let first = tokio::select! {
            biased;
            k = rx.recv() => match k {
                Some(k) => k,
                None => return Ok(()),
            },
            Some(k) = plan_status.recv() => {
                let mut services = BTreeSet::from([k]);
                while let Ok(k) = plan_status.try_recv() {
                    services.insert(k);
                }
                tracing::debug!(services = services.len(), "plan status batch");
                update_plans_granting(&ctx, &services).await;
                continue;
            }
            pruned = prune_one(&ctx, &mut prunes), if !prunes.is_empty() => {
                pruned?;
                continue;
            }
        };
        let opened = tokio::time::Instant::now();
        let mut batch = BTreeSet::from([first]);
        let mut status_only: BTreeSet<ServiceKey> = BTreeSet::new();
        let deadline = opened + debounce.max_wait;
        let mut quiet_until = opened + debounce.quiet;
        let mut triggers = 1usize;
        let closed_by = loop {
            tokio::select! {
                k = rx.recv() => match k {
                    Some(k) => {
                        batch.insert(k);
                        triggers += 1;
                        quiet_until = tokio::time::Instant::now() + debounce.quiet;
                    }
                    None => return Ok(()),
                },
                Some(k) = plan_status.recv() => { status_only.insert(k); }
                _ = tokio::time::sleep_until(quiet_until) => break "quiet",
                _ = tokio::time::sleep_until(deadline) => break "max_wait",
            }
        };
        tracing::debug!(services = batch.len(), triggers, waited = ?opened.elapsed(), closed_by, "table batch");
        for key in &batch {
            let started = Instant::now();
            let (mut attempt, mut unanswered) = (0, 0);
            let res = loop {
                match reconcile_service(&ctx, key).await {
                    Err(Error::Conflict(index)) if attempt < CONFLICT_RETRIES => {
                        attempt += 1;
                        tracing::info!(namespace = %key.namespace, index, "index changed since it was read; re-reading");
                    }
                    Err(e) if e.is_unanswered() && unanswered < UNANSWERED_RETRIES => {
                        unanswered += 1;
                        tracing::info!(namespace = %key.namespace, service = %key.name, error = %Chain(&e), "API server closed the connection before answering; trying again at once");
                    }
                    res => break res,
                }
            };
            ctx.metrics.observe("table", started.elapsed(), res.is_ok());
            tracing::debug!(namespace = %key.namespace, service = %key.name, took = ?started.elapsed(), ok = res.is_ok(), "table reconciled");
            match res {
                Ok(prune) => {
                    if let Some(prune) = prune {
                        prunes.insert(key.clone(), prune);
                    }
                    ctx.render_errors.write().expect("errors lock").remove(key);
                    ctx.enforcement.request(key);
                }
                Err(e @ Error::LostLease(_)) => return Err(e),
                Err(e) => {
                    ctx.render_errors.write().expect("errors lock").insert(key.clone(), Chain(&e).to_string());
                    tracing::warn!(namespace = %key.namespace, service = %key.name, error = %Chain(&e), "table reconcile failed; retrying");
                    // API errors are usually transient; a table that cannot be rendered (too large) only changes
                    // with the objects, whose events trigger a new attempt anyway.
                    let delay = if matches!(e, Error::Table { .. } | Error::IndexTooLarge { .. }) { 60 } else { 2 };
                    let (tx, key) = (ctx.table_tx.clone(), key.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(delay)).await;
                        let _ = tx.send(key);
                    });
                }
            }
        }
        batch.extend(status_only);
        update_plans_granting(&ctx, &batch).await;
    }
}

/// Deletes the stale shards of the first Service in `prunes` and forgets its job (also when it fails: the next
/// publish of that Service makes another). `Err` only if this replica no longer leads. Dropped mid-way, a deletion
/// already sent may still land; its echo mark stays until that name is written again, which only hides a
/// deletion of a ConfigMap no index names.
async fn prune_one(ctx: &Ctx, prunes: &mut BTreeMap<ServiceKey, Prune>) -> Result<(), Error> {
    let Some((key, prune)) = prunes.first_key_value() else { return Ok(()) };
    let res = Writer::new(ctx, &key.namespace, &key.name).prune(prune).await;
    let (key, _) = prunes.pop_first().expect("the job just run");
    match res {
        Err(e @ Error::LostLease(_)) => Err(e),
        Err(e) => {
            tracing::warn!(namespace = %key.namespace, service = %key.name, error = %Chain(&e), "deleting stale table shards failed; left for the next revision");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Rewrites the status of every UsagePlan that grants one of `services`.
async fn update_plans_granting(ctx: &Ctx, services: &BTreeSet<ServiceKey>) {
    let mut plans: BTreeSet<(String, String)> = BTreeSet::new();
    for p in ctx.plans.state() {
        let ns = p.namespace().unwrap_or_default();
        if services.iter().any(|k| k.namespace == ns && model::grants(&p, &k.name)) {
            plans.insert((ns, p.name_any()));
        }
    }
    for (ns, name) in plans {
        if let Some(p) = ctx.plans.get(&ObjectRef::new(&name).within(&ns)) {
            let started = Instant::now();
            let res = update_plan_status(ctx, &p).await;
            ctx.metrics.observe("usageplan", started.elapsed(), res.is_ok());
            if let Err(e) = res {
                tracing::warn!(namespace = %ns, plan = %name, error = %Chain(&e), "UsagePlan status update failed");
            }
        }
    }
}

/// Resolved keys of `client` from the Secret cache (digests only).
pub(crate) fn cached_keys(ctx: &Ctx, client: &ApiClient) -> keys::ResolvedKeys {
    let ns = client.namespace().unwrap_or_default();
    resolve_keys(client, |secret| ctx.secrets.get(&ObjectRef::new(secret).within(&ns)))
}

/// What the table of one Service should be.
#[derive(Debug)]
pub struct Desired {
    /// A table of the granted clients, or the deny-all table of a Service no valid UsagePlan grants.
    pub table: Arc<Table>,
    /// What this build keeps for the next one of the same Service (none for a deny-all table).
    pub memo: Option<Arc<TableMemo>>,
    /// The ids of the clients in which `table` differs from the table of the memo it was built with (added, changed
    /// or removed); `None` without a memo.
    pub changed: Option<Vec<String>>,
    /// Owners of the table ConfigMaps and the sidecar RBAC: the granting UsagePlans; for a deny-all table the Service
    /// (so that deleting the Service removes them), or none when only sidecar Pods still name it.
    pub owners: Vec<OwnerReference>,
    pub plans: BTreeMap<String, (String, i64)>,
    pub clients: Generations,
    pub duplicates: HashMap<String, Vec<String>>,
    /// ApiClients left out because they cannot be rendered: name → reason.
    pub excluded: BTreeMap<String, String>,
}

/// Room left in a shard for its envelope (schemaVersion, service, revision, shard number): a client larger than
/// `max_shard_bytes - SHARD_ENVELOPE` is left out rather than failing the whole table.
const SHARD_ENVELOPE: usize = 1024;

/// Decides the table of Service `service` in `ns` from the namespace's plans, clients and Secrets (`secrets`: by
/// name), reusing what `memo` (the previous build of this Service) resolved and rendered where it still holds
/// ([`crate::memo`]). `None`: no plan grants it, no Service object and no sidecar Pod names it: nothing to keep,
/// remove its tables and RBAC.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    ns: &str,
    service: &str,
    plans: &[Arc<UsagePlan>],
    clients: &[Arc<ApiClient>],
    secrets: impl Fn(&str) -> Option<Arc<Secret>>,
    memo: Option<&TableMemo>,
    svc: Option<&Service>,
    sidecars: bool,
    max_shard_bytes: usize,
    store: bool,
) -> Option<Desired> {
    let plans = plans.iter().map(|p| &**p);
    // Each Secret looked up once per decision (a namespace's keys live in a few Secrets; the cache lookup builds an
    // `ObjectRef` and takes a lock each time), and every client sees the same object of it.
    let seen: RefCell<HashMap<String, Option<Arc<Secret>>, foldhash::fast::RandomState>> = RefCell::default();
    let secrets = |name: &str| {
        if let Some(found) = seen.borrow().get(name) {
            return found.clone();
        }
        let found = secrets(name);
        seen.borrow_mut().insert(name.to_string(), found.clone());
        found
    };
    let build = |keep: &dyn Fn(&ApiClient) -> bool| {
        // Both are asked in id order (see `build_table_reusing`): each has a cursor into the memo.
        let (keys_at, json_at) = (memo.map(TableMemo::cursor), memo.map(TableMemo::cursor));
        let known = |c: &Arc<ApiClient>| match &keys_at {
            Some(m) => m.known(c, secrets),
            None => crate::memo::resolve(c, secrets),
        };
        let json_of = |c: &Client| json_at.as_ref().and_then(|m| m.json_of(c));
        let kept = clients.iter().filter(|c| keep(c));
        let previous_plans = memo.map(|m| &m.table.plans);
        let (built, known) =
            model::build_table_reusing(ns, service, plans.clone(), kept, previous_plans, known, json_of, store);
        let changed = memo.map(|m| m.changed(&built.table));
        let key_memos: Vec<KeyMemo> = known.into_iter().map(|k| k.keys).collect();
        (built, key_memos, changed)
    };
    let (mut built, mut key_memos, mut changed) = build(&|_| true);
    if built.plans.is_empty() {
        if svc.is_none() && !sidecars {
            return None;
        }
        let reason = format!("no valid UsagePlan grants Service {ns}/{service}");
        let owners = svc.and_then(|s| s.controller_owner_ref(&())).map(|mut o| {
            o.controller = None;
            o.block_owner_deletion = None;
            vec![o]
        });
        return Some(Desired {
            table: Arc::new(Table::deny_all(format!("{ns}/{service}"), reason)),
            memo: None,
            changed: None,
            owners: owners.unwrap_or_default(),
            plans: BTreeMap::new(),
            clients: Generations::default(),
            duplicates: HashMap::new(),
            excluded: BTreeMap::new(),
        });
    }
    // One client that cannot be rendered must not hold back every other client's changes (or revocation).
    let budget = max_shard_bytes.saturating_sub(SHARD_ENVELOPE);
    let mut excluded = BTreeMap::new();
    for (c, json) in built.table.clients.iter().zip(&built.client_json) {
        let bytes = json.len() + 1;
        if bytes > budget {
            let name = c.id.rsplit_once('/').map_or(c.id.as_str(), |(_, n)| n).to_string();
            excluded.insert(name, format!("its table entry is {bytes} bytes, more than a shard holds ({budget})"));
        }
    }
    if !excluded.is_empty() {
        (built, key_memos, changed) = build(&|c| !excluded.contains_key(&c.name_any()));
    }
    let owners = built
        .plans
        .iter()
        .map(|(name, (uid, _))| OwnerReference {
            api_version: API_VERSION.to_string(),
            kind: "UsagePlan".to_string(),
            name: name.clone(),
            uid: uid.clone(),
            ..Default::default()
        })
        .collect();
    let mut duplicates: HashMap<String, Vec<String>> = HashMap::new();
    for (client, fp) in &built.duplicate_keys {
        duplicates.entry(client.clone()).or_default().push(fp.clone());
    }
    let table = Arc::new(built.table);
    let memo = Arc::new(TableMemo::new(table.clone(), built.client_json, key_memos));
    Some(Desired {
        clients: Generations::new(table.clone(), built.generations),
        table,
        memo: Some(memo),
        changed,
        owners,
        plans: built.plans,
        duplicates,
        excluded,
    })
}

/// Decides and publishes the table of `key`; returns the shards the publish left to delete, if it published.
async fn reconcile_service(ctx: &Ctx, key: &ServiceKey) -> Result<Option<Prune>, Error> {
    let ns = key.namespace.as_str();
    // The CPU split is read from /proc only when the phase log below is on.
    let split = tracing::enabled!(tracing::Level::DEBUG);
    let gather = Mark::start(split);
    let plans: Vec<Arc<UsagePlan>> = ctx.plans.state_filter(|p| in_namespace(p, ns));
    let clients: Vec<Arc<ApiClient>> = ctx.clients.state_filter(|c| in_namespace(c, ns));
    let svc = ctx.services.get(&ObjectRef::new(&key.name).within(ns));
    let sidecars = ctx
        .pods
        .find(|p| {
            in_namespace(p, ns) && p.annotations().get(crate::webhook::inject::ANNOTATION_SERVICE) == Some(&key.name)
        })
        .is_some();
    // What the previous build keeps (shared, not copied: the rest of the state is 100 000 entries at scale).
    let (old_table, old_memo) = match ctx.state.read().expect("state lock").get(key) {
        Some(o) => (o.table.clone(), o.memo.clone()),
        None => (None, None),
    };
    let gathered = gather.spent();
    let t0 = Instant::now();
    let deciding = Mark::start(split);
    let desired = decide(
        ns,
        &key.name,
        &plans,
        &clients,
        |name| ctx.secrets.get(&ObjectRef::new(name).within(ns)),
        old_memo.as_deref(),
        svc.as_deref(),
        sidecars,
        ctx.max_shard_bytes,
        ctx.has_store(),
    );
    let decided = deciding.spent();
    let decided_in = t0.elapsed();
    let writer = Writer::new(ctx, ns, &key.name);
    let live = writer.read().await?;
    let read_in = t0.elapsed();

    let Some(desired) = desired else {
        // Nothing protects or reads this Service any more: the index goes first (fenced), then shards, then RBAC.
        writer.remove(&live).await?;
        super::access::delete_access(ctx, ns, &key.name).await?;
        let old = ctx.state.write().expect("state lock").remove(key);
        ctx.metrics.remove_table(ns, &key.name);
        if let Some(old) = old {
            tracing::info!(namespace = ns, service = %key.name, "no UsagePlan, Service or sidecar left; tables removed");
            notify_clients(ctx, ns, old.clients.names().chain(old.excluded.keys().map(String::as_str)));
        }
        return Ok(None);
    };

    let table = &desired.table;
    let want_owners: Vec<String> = {
        let mut v: Vec<String> = desired.owners.iter().map(|o| o.uid.clone()).collect();
        v.sort();
        v
    };
    let (unchanged, damaged) = match &live.doc {
        // A schema-1 index (written by an older controller) is rewritten in the stable layout.
        Some(doc) if doc.revision == table.revision && live.owners() == want_owners && doc.is_stable() => {
            let damaged = writer.damaged(doc).await?;
            if !damaged.is_empty() {
                tracing::warn!(namespace = ns, service = %key.name, shards = ?damaged, "shards of the current revision are missing or edited; rewriting");
            }
            (damaged.is_empty(), !damaged.is_empty())
        }
        _ => (false, false),
    };
    let (shards, prune) = if unchanged {
        tracing::debug!(namespace = ns, service = %key.name, revision = %table.revision, "table unchanged");
        (live.doc.as_ref().map_or(0, |d| d.shards.len()), None)
    } else {
        // The changed ids are relative to the memo's table (which is the remembered table).
        let previous = match (&desired.changed, &old_memo) {
            (Some(ids), Some(memo)) => Some((&*memo.table, Some(ids.as_slice()))),
            _ => old_table.as_deref().map(|t| (t, None)),
        };
        let (rendered, prune) =
            writer.publish(&live, table, previous, damaged, &desired.owners, ctx.max_shard_bytes).await?;
        ctx.metrics
            .table_writes
            .get_or_create(&super::metrics::ServiceLabels { namespace: ns.into(), service: key.name.clone() })
            .inc();
        tracing::info!(
            namespace = ns,
            service = %key.name,
            revision = %table.revision,
            sequence = rendered.index.sequence,
            slot = rendered.index.slot.as_str(),
            clients = table.clients.len(),
            shards = rendered.index.shards.len(),
            written = rendered.shards.len(),
            deny_all = table.is_deny_all(),
            "table revision written"
        );
        (rendered.index.shards.len(), Some(prune))
    };
    let published_in = t0.elapsed();
    ctx.metrics.set_table(ns, &key.name, table.clients.len(), shards, &table.revision);
    // RBAC after the table: a deny-all table stays readable, so sidecars keep their watch and see a later grant.
    let granting: Vec<&UsagePlan> =
        plans.iter().map(|p| &**p).filter(|p| desired.plans.contains_key(&p.name_any())).collect();
    super::access::reconcile_access(ctx, ns, &key.name, &granting, &desired.owners).await?;
    tracing::debug!(namespace = ns, service = %key.name, gather = ?gathered.wall, decide = ?decided_in, read = ?read_in,
        publish = ?published_in, access = ?t0.elapsed(), decide_on_cpu = ?decided.on_cpu,
        decide_waiting_for_cpu = ?decided.waiting_for_cpu, gather_on_cpu = ?gathered.on_cpu,
        "table reconcile phases (cumulative from the decision)");

    // The table in force, for the next render (shared, not copied: 100 000 clients are tens of MiB), and what its
    // build keeps for the next one.
    let new = ServiceState {
        revision: table.revision.clone(),
        table: Some(desired.table.clone()),
        memo: desired.memo.clone(),
        shards,
        clients: desired.clients,
        plans: desired.plans,
        duplicates: desired.duplicates,
        excluded: desired.excluded,
    };
    for (client, reason) in &new.excluded {
        tracing::warn!(namespace = ns, service = %key.name, client, reason, "ApiClient left out of the table");
    }
    // Tell the ApiClient reconciler about clients whose presence, generation, duplicates or exclusion changed
    // (compared under the read lock: only this worker writes the state).
    let state = ctx.state.read().expect("state lock");
    let mut changed: Vec<String> = match state.get(key) {
        None => new.clients.names().map(String::from).chain(new.excluded.keys().cloned()).collect(),
        Some(old) => {
            let mut v = old.clients.changed(&new.clients);
            v.extend(new.duplicates.keys().filter(|n| old.duplicates.get(*n) != new.duplicates.get(*n)).cloned());
            v.extend(old.duplicates.keys().filter(|n| !new.duplicates.contains_key(*n)).cloned());
            v.extend(new.excluded.keys().filter(|n| old.excluded.get(*n) != new.excluded.get(*n)).cloned());
            v.extend(old.excluded.keys().filter(|n| !new.excluded.contains_key(*n)).cloned());
            v
        }
    };
    changed.sort_unstable();
    changed.dedup();
    drop(state);
    ctx.state.write().expect("state lock").insert(key.clone(), new);
    notify_clients(ctx, ns, changed.iter().map(String::as_str));
    Ok(prune)
}

fn notify_clients<'a>(ctx: &Ctx, ns: &str, names: impl Iterator<Item = &'a str>) {
    for n in names {
        let _ = ctx.client_tx.send(ObjectRef::new(n).within(ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::fixture;

    fn decide_with(
        plans: &[UsagePlan],
        clients: &[ApiClient],
        svc: Option<&Service>,
        sidecars: bool,
        max: usize,
    ) -> Option<Desired> {
        let (_, _, secret) = fixture(clients.len());
        let secret = Arc::new(secret);
        let plans: Vec<Arc<UsagePlan>> = plans.iter().cloned().map(Arc::new).collect();
        let clients: Vec<Arc<ApiClient>> = clients.iter().cloned().map(Arc::new).collect();
        let lookup = |name: &str| (name == "keys").then(|| secret.clone());
        decide("shop", "orders", &plans, &clients, lookup, None, svc, sidecars, max, false)
    }

    fn service() -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("orders".into());
        s.metadata.namespace = Some("shop".into());
        s.metadata.uid = Some("svc-uid".into());
        s
    }

    #[test]
    fn granted_service_gets_its_clients_owned_by_the_plans() {
        let (plans, clients, _) = fixture(3);
        let d = decide_with(&plans, &clients, None, false, portcullis_table::shard::MAX_SHARD_BYTES).unwrap();
        assert!(!d.table.is_deny_all());
        assert_eq!(d.table.clients.len(), 3);
        assert_eq!(d.owners.len(), 1);
        assert_eq!(d.owners[0].kind, "UsagePlan");
        assert!(d.excluded.is_empty());
    }

    #[test]
    fn ungranted_service_that_exists_gets_a_deny_all_table_owned_by_the_service() {
        let (mut plans, clients, _) = fixture(2);
        plans[0].spec.services.clear();
        let svc = service();
        let d = decide_with(&plans, &clients, Some(&svc), false, 1 << 20).unwrap();
        assert!(d.table.is_deny_all());
        assert!(d.table.clients.is_empty() && d.plans.is_empty());
        assert_eq!(d.owners.len(), 1);
        assert_eq!((d.owners[0].kind.as_str(), d.owners[0].uid.as_str()), ("Service", "svc-uid"));
        // No Service, but a sidecar still reads the table: deny-all, no owner.
        let d = decide_with(&plans, &clients, None, true, 1 << 20).unwrap();
        assert!(d.table.is_deny_all() && d.owners.is_empty());
        // Nothing names it any more: remove.
        assert!(decide_with(&plans, &clients, None, false, 1 << 20).is_none());
    }

    #[test]
    fn an_invalid_plan_grants_nothing() {
        let (mut plans, clients, _) = fixture(2);
        plans[0].spec.throttle.as_mut().unwrap().per = "soon".into();
        let d = decide_with(&plans, &clients, Some(&service()), false, 1 << 20).unwrap();
        assert!(d.table.is_deny_all());
    }

    #[test]
    fn a_client_too_large_to_render_is_left_out_and_the_others_stay() {
        let (plans, mut clients, _) = fixture(3);
        clients[1].spec.source_ranges = (0..200).map(|i| format!("2001:db8:{i:x}::/48")).collect();
        let d = decide_with(&plans, &clients, None, false, 4096).unwrap();
        assert_eq!(d.table.clients.len(), 2);
        assert!(d.table.clients.iter().all(|c| !c.id.ends_with("client-000001")));
        assert!(d.excluded["client-000001"].contains("more than a shard holds"), "{:?}", d.excluded);
        assert!(!d.clients.contains("client-000001"));
        // The table still renders (the check is conservative).
        portcullis_table::shard::render(&d.table, "i", portcullis_table::shard::Previous::NONE, 1, 4096).unwrap();
    }

    /// A build reusing the previous build's memo gives exactly the table a build from scratch gives, and names
    /// exactly the clients that differ, through every kind of change (the reflector hands out a new object for
    /// each changed ApiClient or Secret; unchanged ones stay the same objects).
    #[test]
    fn a_build_from_the_memo_is_a_build_from_scratch() {
        use k8s_openapi::ByteString;
        let (plans, clients, secret) = fixture(300);
        let mut plans: Vec<Arc<UsagePlan>> = plans.into_iter().map(Arc::new).collect();
        let mut clients: Vec<Arc<ApiClient>> = clients.into_iter().map(Arc::new).collect();
        let mut secret = Arc::new(secret);
        let max = portcullis_table::shard::MAX_SHARD_BYTES;
        let run =
            |plans: &[Arc<UsagePlan>], clients: &[Arc<ApiClient>], secret: &Arc<Secret>, memo: Option<&TableMemo>| {
                let lookup = |name: &str| (name == "keys").then(|| secret.clone());
                decide("shop", "orders", plans, clients, lookup, memo, None, false, max, false).unwrap()
            };
        let mut memo = run(&plans, &clients, &secret, None).memo.unwrap();
        // A spec change, as the API server makes it: a new object at the next generation.
        let edit = |c: &Arc<ApiClient>, f: &dyn Fn(&mut ApiClient)| {
            let mut c = (**c).clone();
            f(&mut c);
            c.metadata.generation = Some(c.metadata.generation.unwrap_or(0) + 1);
            Arc::new(c)
        };
        // A status write: a new object, same generation.
        let status_written = |c: &Arc<ApiClient>| {
            let mut c = (**c).clone();
            c.metadata.resource_version = Some(format!("{}-status", c.metadata.resource_version.unwrap_or_default()));
            c.status = Some(Default::default());
            Arc::new(c)
        };
        type Step<'a> = (&'a str, Box<dyn Fn(&mut Vec<Arc<ApiClient>>, &mut Arc<Secret>, &mut Vec<Arc<UsagePlan>>)>);
        let steps: Vec<Step> = vec![
            ("nothing", Box::new(|_, _, _| {})),
            (
                "a CIDR",
                Box::new(move |c, _, _| c[7] = edit(&c[7], &|c| c.spec.source_ranges = vec!["192.0.2.0/24".into()])),
            ),
            (
                "a client removed",
                Box::new(|c, _, _| {
                    c.remove(20);
                }),
            ),
            (
                "a client added",
                Box::new(move |c, _, _| {
                    let mut n = (*c[0]).clone();
                    n.metadata.name = Some("client-zzz".into());
                    n.spec.keys[0].secret_ref.as_mut().unwrap().key = "new".into();
                    c.push(Arc::new(n));
                }),
            ),
            (
                "the new client's key appears",
                Box::new(|_, s, _| {
                    let mut x = (**s).clone();
                    x.data.as_mut().unwrap().insert("new".into(), ByteString(b"a-new-key".to_vec()));
                    *s = Arc::new(x);
                }),
            ),
            (
                "a key rotated in the Secret",
                Box::new(|_, s, _| {
                    let mut x = (**s).clone();
                    x.data.as_mut().unwrap().insert("k5".into(), ByteString(b"rotated".to_vec()));
                    *s = Arc::new(x);
                }),
            ),
            (
                "a key claimed by a second client",
                Box::new(move |c, _, _| {
                    c[9] = edit(&c[9], &|c| c.spec.keys[0].secret_ref.as_mut().unwrap().key = "k8".into())
                }),
            ),
            (
                "the claim dropped",
                Box::new(move |c, _, _| {
                    c[9] = edit(&c[9], &|c| c.spec.keys[0].secret_ref.as_mut().unwrap().key = "k9".into())
                }),
            ),
            ("a client disabled", Box::new(move |c, _, _| c[3] = edit(&c[3], &|c| c.spec.disabled = Some(true)))),
            ("its plan dropped", Box::new(move |c, _, _| c[4] = edit(&c[4], &|c| c.spec.usage_plans.clear()))),
            (
                "an older client claims a newer one's key",
                Box::new(move |c, _, _| {
                    c[2] = edit(&c[2], &|c| {
                        let mut k = c.spec.keys[0].clone();
                        k.secret_ref.as_mut().unwrap().key = "k30".into();
                        c.spec.keys.push(k);
                    })
                }),
            ),
            ("and lets it go", Box::new(move |c, _, _| c[2] = edit(&c[2], &|c| c.spec.keys.truncate(1)))),
            (
                "the plan's throttle changed",
                Box::new(|_, _, p| {
                    let mut x = (*p[0]).clone();
                    x.spec.throttle.as_mut().unwrap().rate = 7;
                    p[0] = Arc::new(x);
                }),
            ),
            (
                "a second plan granted to one client",
                Box::new(move |c, _, p| {
                    let mut x = (*p[0]).clone();
                    x.metadata.name = Some("silver".into());
                    x.metadata.uid = Some("uid-silver".into());
                    p.push(Arc::new(x));
                    c[5] = edit(&c[5], &|c| c.spec.usage_plans.push("silver".into()));
                }),
            ),
            ("the second plan deleted", Box::new(|_, _, p| p.truncate(1))),
            ("a client renamed nothing, only re-read", Box::new(move |c, _, _| c[6] = edit(&c[6], &|_| {}))),
            ("a client's status written", Box::new(move |c, _, _| c[8] = status_written(&c[8]))),
            (
                "every client's status written",
                Box::new(move |c, _, _| c.iter_mut().for_each(|x| *x = status_written(x))),
            ),
            (
                "the Secret gone",
                Box::new(|_, s, _| {
                    let mut x = (**s).clone();
                    x.data = None;
                    *s = Arc::new(x);
                }),
            ),
        ];
        for (what, step) in steps {
            let (secret_then, plans_then) = (secret.clone(), plans.clone());
            step(&mut clients, &mut secret, &mut plans);
            let fresh = run(&plans, &clients, &secret, None);
            let reused = run(&plans, &clients, &secret, Some(&memo));
            assert_eq!(reused.table, fresh.table, "{what}");
            assert_eq!((&reused.clients, &reused.duplicates), (&fresh.clients, &fresh.duplicates), "{what}");
            // The changed ids are exactly the clients whose table entry differs.
            let mut want: Vec<String> = Vec::new();
            let (old, new) = (&memo.table.clients, &reused.table.clients);
            for c in old {
                if new.iter().find(|n| n.id == c.id) != Some(c) {
                    want.push(c.id.clone());
                }
            }
            want.extend(new.iter().filter(|n| !old.iter().any(|c| c.id == n.id)).map(|n| n.id.clone()));
            let mut got = reused.changed.clone().unwrap();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{what}");
            // With the same Secret and plans, clients whose ApiClient did not change are the previous build's
            // entries, shared, not copied (one client at most is a new object with an equal entry).
            let same_inputs = Arc::ptr_eq(&secret_then, &secret)
                && plans_then.len() == plans.len()
                && plans_then.iter().zip(&plans).all(|(a, b)| Arc::ptr_eq(a, b));
            let shared = new.iter().filter(|n| old.iter().any(|c| Arc::ptr_eq(c, n))).count();
            if what.contains("status written") {
                assert_eq!(shared, new.len(), "{what}: a status write changes no entry");
            }
            if same_inputs {
                assert!(shared + want.len() + 1 >= new.len(), "{what}: {shared} of {} shared", new.len());
            } else {
                assert!(shared <= new.len() - want.len(), "{what}");
            }
            memo = reused.memo.unwrap();
        }
    }
}
