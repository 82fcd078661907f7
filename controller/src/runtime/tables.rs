//! The table writer: one logical table per (namespace, Service), rendered into an index ConfigMap and shard
//! ConfigMaps (A/B slots, index written last), plus UsagePlan status.
//!
//! Triggers come from the watchers as [`ServiceKey`]s; bursts are coalesced (trailing debounce with a maximum
//! wait), so thousands of ApiClient changes cost a handful of renders. One batch is processed at a time, so two
//! writers never race on the same Service.

use super::{Ctx, Error, FIELD_MANAGER, MANAGED_BY, publish_transitions};
use crate::conditions::{PlanFacts, merge, plan_conditions};
use crate::crd::{API_VERSION, ApiClient, TableStatus, UsagePlan, UsagePlanStatus};
use crate::model::{self, build_table, key_location, resolve_keys};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use portcullis_table::naming::{INDEX_DATA_KEY, LABEL_ROLE, LABEL_SERVICE, SHARD_DATA_KEY, Slot, index_name};
use portcullis_table::shard::{IndexDoc, MAX_SHARD_BYTES, render};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A protected Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// What the current table of a Service holds (as last written or confirmed by this controller).
#[derive(Clone, Debug, Default)]
pub struct ServiceState {
    pub revision: String,
    pub shards: usize,
    /// ApiClient name → generation in the table.
    pub clients: HashMap<String, i64>,
    /// Granting UsagePlan name → (uid, generation).
    pub plans: BTreeMap<String, (String, i64)>,
    /// ApiClient name → fingerprints of its keys left out as duplicates.
    pub duplicates: HashMap<String, Vec<String>>,
}

/// Trailing debounce: a batch closes after `quiet` without new triggers, or `max_wait` after it opened.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_wait: Duration,
}

pub async fn run_table_worker(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<ServiceKey>, debounce: Debounce) {
    while let Some(first) = rx.recv().await {
        let mut batch = BTreeSet::from([first]);
        let deadline = tokio::time::Instant::now() + debounce.max_wait;
        loop {
            let quiet = tokio::time::sleep(debounce.quiet);
            tokio::select! {
                k = rx.recv() => match k {
                    Some(k) => { batch.insert(k); }
                    None => return,
                },
                _ = quiet => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let mut plans_to_update: BTreeSet<(String, String)> = BTreeSet::new();
        for key in &batch {
            let started = Instant::now();
            let res = reconcile_service(&ctx, key).await;
            ctx.metrics.observe("table", started.elapsed(), res.is_ok());
            match res {
                Ok(()) => {
                    ctx.render_errors.write().expect("errors lock").remove(key);
                    ctx.enforcement.request(key);
                }
                Err(e) => {
                    ctx.render_errors.write().expect("errors lock").insert(key.clone(), e.to_string());
                    tracing::warn!(namespace = %key.namespace, service = %key.name, error = %e, "table reconcile failed; retrying");
                    // API errors are usually transient; a table that cannot be rendered (too large) only changes
                    // with the objects, whose events trigger a new attempt anyway.
                    let delay = if matches!(e, Error::Table { .. }) { 60 } else { 2 };
                    let (tx, key) = (ctx.table_tx.clone(), key.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(delay)).await;
                        let _ = tx.send(key);
                    });
                }
            }
            for p in ctx.plans.state() {
                if p.namespace().as_deref() == Some(key.namespace.as_str()) && model::grants(&p, &key.name) {
                    plans_to_update.insert((key.namespace.clone(), p.name_any()));
                }
            }
        }
        for (ns, name) in plans_to_update {
            if let Some(p) = ctx.plans.get(&ObjectRef::new(&name).within(&ns)) {
                let started = Instant::now();
                let res = update_plan_status(&ctx, &p).await;
                ctx.metrics.observe("usageplan", started.elapsed(), res.is_ok());
                if let Err(e) = res {
                    tracing::warn!(namespace = %ns, plan = %name, error = %e, "UsagePlan status update failed");
                }
            }
        }
    }
}

/// Resolved keys of `client` from the Secret cache (digests only).
pub(crate) fn cached_keys(ctx: &Ctx, client: &ApiClient) -> model::ResolvedKeys {
    let ns = client.namespace().unwrap_or_default();
    resolve_keys(client, |secret, key| secret_lookup(ctx, &ns, secret, key))
}

pub(crate) fn secret_lookup(ctx: &Ctx, ns: &str, secret: &str, key: &str) -> model::SecretLookup {
    match ctx.secrets.get(&ObjectRef::new(secret).within(ns)) {
        None => model::SecretLookup::SecretNotFound,
        Some(s) => match s.data.as_ref().and_then(|d| d.get(key)) {
            Some(v) => model::SecretLookup::Found(v.0.clone()),
            None => model::SecretLookup::KeyMissing,
        },
    }
}

async fn reconcile_service(ctx: &Ctx, key: &ServiceKey) -> Result<(), Error> {
    let ns = key.namespace.as_str();
    let plans: Vec<Arc<UsagePlan>> = ctx.plans.state_filter(|p| p.namespace().as_deref() == Some(ns));
    let clients: Vec<Arc<ApiClient>> = ctx.clients.state_filter(|c| c.namespace().as_deref() == Some(ns));
    let built = build_table(ns, &key.name, plans.iter().map(|p| &**p), clients.iter().map(|c| &**c), |c| {
        cached_keys(ctx, c).entries
    });
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let old = ctx.state.read().expect("state lock").get(key).cloned();

    if built.plans.is_empty() {
        delete_tables(&cms, &key.name, &HashSet::new()).await?;
        super::access::delete_access(ctx, ns, &key.name).await?;
        ctx.state.write().expect("state lock").remove(key);
        ctx.metrics.remove_table(ns, &key.name);
        if let Some(old) = old {
            tracing::info!(namespace = ns, service = %key.name, "no UsagePlan grants the Service any more; table deleted");
            notify_clients(ctx, ns, old.clients.keys());
        }
        return Ok(());
    }

    let table = &built.table;
    let index = index_name(&key.name);
    let owners: Vec<OwnerReference> = built
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
    let current = cms.get_opt(&index).await?;
    let current_doc = current
        .as_ref()
        .and_then(|cm| cm.data.as_ref()?.get(INDEX_DATA_KEY).cloned())
        .and_then(|json| IndexDoc::parse(&json, &index).ok());
    let current_owners: BTreeSet<String> =
        current.as_ref().map(|cm| cm.owner_references().iter().map(|o| o.uid.clone()).collect()).unwrap_or_default();
    let desired_owners: BTreeSet<String> = owners.iter().map(|o| o.uid.clone()).collect();

    let shards = match &current_doc {
        Some(doc) if doc.revision == table.revision && current_owners == desired_owners => {
            tracing::debug!(namespace = ns, service = %key.name, revision = %table.revision, "table unchanged");
            doc.shards.len()
        }
        _ => {
            let slot = current_doc.as_ref().map(|d| d.slot.other()).unwrap_or(Slot::A);
            let rendered = render(table, &index, slot, MAX_SHARD_BYTES)
                .map_err(|source| Error::Table { service: table.service.clone(), source })?;
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            for (name, json) in &rendered.shards {
                let cm = table_configmap(name, &key.name, "shard", SHARD_DATA_KEY, json, &owners, None);
                cms.patch(name, &pp, &Patch::Apply(&cm)).await?;
            }
            let cm = table_configmap(
                &index,
                &key.name,
                "index",
                INDEX_DATA_KEY,
                &rendered.index_json,
                &owners,
                Some(&table.revision),
            );
            cms.patch(&index, &pp, &Patch::Apply(&cm)).await?;
            // Keep the new revision and the previous one (a proxy may be mid-read of it); delete the rest.
            let mut keep: HashSet<String> = rendered.shards.iter().map(|(n, _)| n.clone()).collect();
            keep.insert(index.clone());
            if let Some(doc) = &current_doc {
                keep.extend(doc.shards.iter().map(|s| s.name.clone()));
            }
            delete_tables(&cms, &key.name, &keep).await?;
            ctx.metrics
                .table_writes
                .get_or_create(&super::metrics::ServiceLabels { namespace: ns.into(), service: key.name.clone() })
                .inc();
            tracing::info!(
                namespace = ns,
                service = %key.name,
                revision = %table.revision,
                slot = slot.as_str(),
                clients = table.clients.len(),
                shards = rendered.shards.len(),
                "table revision written"
            );
            rendered.shards.len()
        }
    };
    ctx.metrics.set_table(ns, &key.name, table.clients.len(), shards);
    let granting: Vec<&UsagePlan> =
        plans.iter().map(|p| &**p).filter(|p| built.plans.contains_key(&p.name_any())).collect();
    super::access::reconcile_access(ctx, ns, &key.name, &granting, &owners).await?;

    let mut duplicates: HashMap<String, Vec<String>> = HashMap::new();
    for (client, fp) in &built.duplicate_keys {
        duplicates.entry(client.clone()).or_default().push(fp.clone());
    }
    let new = ServiceState {
        revision: table.revision.clone(),
        shards,
        clients: built.clients,
        plans: built.plans,
        duplicates,
    };
    // Tell the ApiClient reconciler about clients whose presence, generation or duplicate keys changed.
    let changed: Vec<String> = match &old {
        None => new.clients.keys().cloned().collect(),
        Some(old) => {
            let mut v: Vec<String> = new
                .clients
                .iter()
                .filter(|(n, g)| old.clients.get(*n) != Some(g) || old.duplicates.get(*n) != new.duplicates.get(*n))
                .map(|(n, _)| n.clone())
                .collect();
            v.extend(old.clients.keys().filter(|n| !new.clients.contains_key(*n)).cloned());
            v.extend(old.duplicates.keys().filter(|n| !new.duplicates.contains_key(*n)).cloned());
            v
        }
    };
    ctx.state.write().expect("state lock").insert(key.clone(), new);
    notify_clients(ctx, ns, changed.iter());
    Ok(())
}

fn notify_clients<'a>(ctx: &Ctx, ns: &str, names: impl Iterator<Item = &'a String>) {
    for n in names {
        let _ = ctx.client_tx.send(ObjectRef::new(n).within(ns));
    }
}

fn table_configmap(
    name: &str,
    service: &str,
    role: &str,
    data_key: &str,
    json: &str,
    owners: &[OwnerReference],
    revision: Option<&str>,
) -> ConfigMap {
    let labels = BTreeMap::from([
        (LABEL_SERVICE.to_string(), service.to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
    ]);
    let annotations = revision.map(|r| BTreeMap::from([("portcullis.dev/revision".to_string(), r.to_string())]));
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            annotations,
            owner_references: Some(owners.to_vec()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(data_key.to_string(), json.to_string())])),
        ..Default::default()
    }
}

/// Deletes every table ConfigMap of `service` not named in `keep`.
async fn delete_tables(cms: &Api<ConfigMap>, service: &str, keep: &HashSet<String>) -> Result<(), Error> {
    let lp =
        ListParams::default().labels(&format!("{LABEL_SERVICE}={service},app.kubernetes.io/managed-by={MANAGED_BY}"));
    for cm in cms.list_metadata(&lp).await? {
        let name = cm.name_any();
        if !keep.contains(&name) {
            match cms.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::debug!(configmap = %name, "deleted stale table ConfigMap"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

async fn update_plan_status(ctx: &Ctx, plan: &UsagePlan) -> Result<(), Error> {
    let ns = plan.namespace().unwrap_or_default();
    let name = plan.name_any();
    let uid = plan.uid().unwrap_or_default();
    let generation = plan.metadata.generation.unwrap_or(0);
    let mut facts = PlanFacts::default();
    let mut tables = Vec::new();
    {
        let state = ctx.state.read().expect("state lock");
        for s in &plan.spec.services {
            facts.services.push(s.name.clone());
            let st = state.get(&ServiceKey { namespace: ns.clone(), name: s.name.clone() });
            let key = ServiceKey { namespace: ns.clone(), name: s.name.clone() };
            if let Some(e) = ctx.render_errors.read().expect("errors lock").get(&key) {
                facts.render_errors.push((s.name.clone(), e.clone()));
            }
            let svc = ctx.services.get(&ObjectRef::new(&s.name).within(&ns));
            let reconciled = st.is_some() && !facts.render_errors.iter().any(|(n, _)| *n == s.name);
            let findings = super::access::exposure_findings(ctx, &ns, &s.name, svc.as_deref(), reconciled);
            facts.exposure.push((s.name.clone(), findings));
            match st {
                Some(st) if st.plans.get(&name) == Some(&(uid.clone(), generation)) => tables.push(TableStatus {
                    service: s.name.clone(),
                    revision: st.revision.clone(),
                    shards: st.shards as u32,
                }),
                _ => facts.unprogrammed.push(s.name.clone()),
            }
        }
    }
    if let Err(e) = model::plan_entry(&name, &plan.spec, "") {
        facts.spec_error = Some(e.to_string());
    }
    let clients = ctx
        .clients
        .state()
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(ns.as_str()) && c.spec.usage_plans.contains(&name))
        .count() as u32;
    let old = plan.status.clone().unwrap_or_default();
    let mut decided = plan_conditions(&facts);
    decided.push(ctx.enforcement.condition(ctx, &ns, &facts.services, &facts.unprogrammed));
    let conditions = merge(&old.conditions, &decided, Some(generation), jiff::Timestamp::now());
    let status = UsagePlanStatus { observed_generation: Some(generation), conditions, clients, tables };
    if status == old {
        return Ok(());
    }
    let api: Api<UsagePlan> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    publish_transitions(ctx, &plan.object_ref(&()), &old.conditions, &status.conditions).await;
    Ok(())
}

/// Services whose tables a change of `client` may affect: those its plans grant now, and those it is in now.
pub(crate) fn services_of_client(ctx: &Ctx, client: &ApiClient) -> BTreeSet<ServiceKey> {
    let ns = client.namespace().unwrap_or_default();
    let name = client.name_any();
    let mut out = BTreeSet::new();
    for p in &client.spec.usage_plans {
        if let Some(plan) = ctx.plans.get(&ObjectRef::new(p).within(&ns)) {
            out.extend(plan.spec.services.iter().map(|s| ServiceKey { namespace: ns.clone(), name: s.name.clone() }));
        }
    }
    let state = ctx.state.read().expect("state lock");
    out.extend(
        state.iter().filter(|(k, st)| k.namespace == ns && st.clients.contains_key(&name)).map(|(k, _)| k.clone()),
    );
    out
}

/// Whether `client` reads key material from Secret `secret` (same namespace assumed).
pub(crate) fn uses_secret(client: &ApiClient, secret: &str) -> bool {
    let name = client.name_any();
    client.spec.keys.iter().enumerate().any(|(i, k)| key_location(&name, i, k).0 == secret)
}
