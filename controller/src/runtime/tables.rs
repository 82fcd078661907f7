//! The table writer: one logical table per (namespace, Service), rendered into an index ConfigMap and shard
//! ConfigMaps (A/B slots, index written last), plus UsagePlan status.
//!
//! Triggers come from the watchers as [`ServiceKey`]s; bursts are coalesced (trailing debounce with a maximum
//! wait), so thousands of ApiClient changes cost a handful of renders. One batch is processed at a time, so two
//! writers never race on the same Service.

pub use super::rendered::{ServiceKey, ServiceState};
use super::status::update_plan_status;
use super::{Ctx, Error, FIELD_MANAGER, MANAGED_BY};
use crate::crd::{API_VERSION, ApiClient, UsagePlan};
use crate::model::{self, build_table, resolve_keys};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use portcullis_table::naming::{INDEX_DATA_KEY, LABEL_ROLE, LABEL_SERVICE, SHARD_DATA_KEY, Slot, index_name};
use portcullis_table::sequence::{PreviousIndex, next_sequence};
use portcullis_table::shard::{IndexDoc, MAX_SHARD_BYTES, render};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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
            let previous = match (&current, &current_doc) {
                (None, _) => PreviousIndex::Absent,
                (Some(_), Some(doc)) => PreviousIndex::Readable(doc),
                (Some(_), None) => PreviousIndex::Unreadable,
            };
            let sequence = next_sequence(previous, jiff::Timestamp::now());
            let rendered = render(table, &index, slot, sequence, MAX_SHARD_BYTES)
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
        excluded: Default::default(),
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
