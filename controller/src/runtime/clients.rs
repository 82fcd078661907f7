//! The ApiClient reconciler (a kube-runtime `Controller`): creates generated key Secrets once (and deletes the ones no
//! entry names any more), resolves keys and plans, and writes status (conditions, fingerprints) plus Events on
//! condition transitions and key lifecycle changes. The rules of key identity are in [`crate::keys`].

use super::status::Subject;
use super::tables::{ServiceKey, cached_keys};
use super::{Ctx, Error, MANAGED_BY, publish_transitions};
use crate::conditions::{ClientFacts, client_conditions, merge};
use crate::crd::{ApiClient, ApiClientStatus, GeneratedKeyStatus};
use crate::events::{self, KeyEvent};
use crate::keygen::generate_key;
use crate::keys::{self, GENERATED_KEY_DATA_KEY, generated_secret_labels};
use crate::model::parse_source_ranges;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KEvent, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use portcullis_table::Chain;
use portcullis_table::{fingerprint, key_digest};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn reconcile(client: Arc<ApiClient>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let res = reconcile_inner(&client, &ctx).await;
    ctx.metrics.observe("apiclient", started.elapsed(), res.is_ok());
    res
}

pub fn error_policy(client: Arc<ApiClient>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(namespace = ?client.namespace(), client = %client.name_any(), error = %Chain(err), "ApiClient reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner(obj: &ApiClient, ctx: &Ctx) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let generation = obj.metadata.generation.unwrap_or(0);
    let old = obj.status.clone().unwrap_or_default();

    // Generated keys: create each missing Secret once; never touch an existing one (whoever owns it).
    let mut created = false;
    let mut create_failures = Vec::new();
    for (at, key_name, secret) in keys::generated_keys(obj) {
        if ctx.secrets.get(&ObjectRef::new(&secret).within(&ns)).is_some() {
            continue;
        }
        match create_generated_secret(ctx, obj, &ns, &key_name, &secret).await {
            Ok(Some((fp, uid))) => {
                let previous = old.generated_keys.iter().find(|g| g.name == key_name).map(|g| g.fingerprint.as_str());
                let ev = events::key_generated(&key_name, &secret, &fp, previous);
                publish_key_event(ctx, obj, ev, secret_ref(&ns, &secret, uid)).await;
                created = true;
            }
            // Already there (the cache lags): its watch event brings it in and triggers us again.
            Ok(None) => created = true,
            Err(e) => {
                tracing::warn!(namespace = %ns, client = %name, secret, error = %e, "creating a generated key Secret failed");
                create_failures.push((at, secret, e.to_string()));
            }
        }
    }
    // A failed delete (say, an older ClusterRole without `delete` on Secrets) must not stop the status: the orphan
    // is not used either way (no entry names it), and the delete is retried.
    let orphans_left = match delete_orphaned_secrets(ctx, obj, &ns).await {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(namespace = %ns, client = %name, error = %e, "deleting an unreferenced generated key Secret failed");
            true
        }
    };
    if created && create_failures.is_empty() {
        // The Secret watch brings it into the cache and triggers us again.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    let mut resolved = cached_keys(ctx, obj);
    for (at, secret, error) in &create_failures {
        resolved.record_create_failure(at, secret, error.clone());
    }
    let now = jiff::Timestamp::now();
    let mut facts = ClientFacts {
        key_problems: resolved.problems.clone(),
        resolved_keys: resolved.entries.len(),
        live_keys: resolved.live(now),
        certificates: obj.spec.certificates.len(),
        ..Default::default()
    };
    facts.invalid_ranges = parse_source_ranges(&obj.spec.source_ranges).1;
    let mut services = BTreeSet::new();
    for p in &obj.spec.usage_plans {
        match ctx.plans.get(&ObjectRef::new(p).within(&ns)) {
            Some(plan) => services.extend(plan.spec.services.iter().map(|s| s.name.clone())),
            None => {
                if !facts.missing_plans.contains(p) {
                    facts.missing_plans.push(p.clone());
                }
            }
        }
    }
    {
        let state = ctx.state.read().expect("state lock");
        for s in &services {
            let st = state.get(&ServiceKey { namespace: ns.clone(), name: s.clone() });
            if st.and_then(|st| st.clients.get(&name)) != Some(generation) {
                facts.unprogrammed.push(s.clone());
            }
            if let Some(r) = st.and_then(|st| st.excluded.get(&name)) {
                facts.render_failed.push(format!("{s}: {r}"));
            }
            if let Some(d) = st.and_then(|st| st.duplicates.get(&name)) {
                facts.duplicate_keys.extend(d.iter().cloned());
            }
        }
    }
    facts.services = services.into_iter().collect();
    facts.require_certificate = obj.spec.require_certificate == Some(true);
    if facts.require_certificate || facts.certificates > 0 {
        for s in &facts.services {
            // No sidecar yet: the chart-wide default is what the webhook would inject.
            match super::access::sidecars_verify_certificates(ctx, &ns, s) {
                Some(true) => {}
                Some(false) => {
                    facts.services_without_client_ca.push(s.clone());
                    facts.client_ca_missing_on_sidecars = true;
                }
                None if ctx.sidecar_client_ca_default => {}
                None => facts.services_without_client_ca.push(s.clone()),
            }
        }
    }

    let mut decided = client_conditions(&facts);
    decided.push(ctx.enforcement.client_condition(ctx, &ns, &name, generation, &facts.services, &facts.unprogrammed));
    let conditions = merge(&old.conditions, &decided, Some(generation), now);
    let status = ApiClientStatus {
        observed_generation: Some(generation),
        conditions,
        key_fingerprints: resolved.resolved.iter().map(|k| k.fingerprint.clone()).collect(),
        generated_keys: generated_key_status(&resolved.resolved),
        keys: facts.live_keys as u32,
        // Written by the usage refresher ([`super::usage`]) alone: kept as they are, and left out of this patch.
        usage: old.usage.clone(),
        used_summary: old.used_summary.clone(),
    };
    if status != old {
        let api: Api<ApiClient> = Api::namespaced(ctx.client.clone(), &ns);
        // Every list is serialised, empty ones as `[]`: a merge patch then clears what became empty.
        let mut value = serde_json::to_value(&status).expect("status serialises");
        if let Some(o) = value.as_object_mut() {
            o.remove("usage");
            o.remove("usedSummary");
        }
        let patch = serde_json::json!({ "status": value });
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(namespace = %ns, client = %name, changed = ?status_changes(&old, &status), "writing status");
        }
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        publish_transitions(ctx, Subject::ApiClient, &obj.object_ref(&()), &old.conditions, &status.conditions).await;
    }
    // Re-check when the next key expires; otherwise rely on watches (plus a slow resync).
    let requeue = resolved
        .next_expiry(now)
        .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
        .map(|d| d + Duration::from_secs(1))
        .unwrap_or_else(resync)
        .min(Duration::from_secs(RESYNC_SECS * 11 / 10));
    // A failed creation or delete is retried (for a creation, the condition says why meanwhile).
    let requeue =
        if create_failures.is_empty() && !orphans_left { requeue } else { requeue.min(Duration::from_secs(10)) };
    Ok(Action::requeue(requeue))
}

/// The status fields that differ (for the debug log): names, and for conditions the types whose status, reason or
/// message changed.
fn status_changes(old: &ApiClientStatus, new: &ApiClientStatus) -> Vec<String> {
    let mut out = Vec::new();
    if old.observed_generation != new.observed_generation {
        out.push("observedGeneration".to_string());
    }
    for c in &new.conditions {
        let before = old.conditions.iter().find(|o| o.type_ == c.type_);
        if before.is_none_or(|o| (&o.status, &o.reason, &o.message) != (&c.status, &c.reason, &c.message)) {
            out.push(format!("condition {}: {} {}", c.type_, c.reason, c.message));
        } else if before.is_some_and(|o| o != c) {
            out.push(format!("condition {} (times)", c.type_));
        }
    }
    if old.key_fingerprints != new.key_fingerprints {
        out.push("keyFingerprints".to_string());
    }
    if old.generated_keys != new.generated_keys {
        out.push("generatedKeys".to_string());
    }
    if old.keys != new.keys {
        out.push("keys".to_string());
    }
    out
}

/// Seconds between an ApiClient's reconciles when nothing triggers one (a safety net; watches do the work).
const RESYNC_SECS: u64 = 600;

/// The resync delay, spread over ±10 %: 100 000 ApiClients created together would otherwise come back together,
/// every 10 minutes.
fn resync() -> Duration {
    use rand::RngExt;
    Duration::from_millis(rand::rng().random_range(RESYNC_SECS * 900..=RESYNC_SECS * 1100))
}

/// `status.generatedKeys`: one entry per key name (a list-map keyed by name; the schema keeps names unique, this
/// keeps the status writable even if it did not).
fn generated_key_status(resolved: &[keys::ResolvedKey]) -> Vec<GeneratedKeyStatus> {
    let mut out: Vec<GeneratedKeyStatus> = Vec::new();
    for k in resolved.iter().filter(|k| k.generated) {
        if let Some(name) = &k.at.name
            && !out.iter().any(|g| &g.name == name)
        {
            out.push(GeneratedKeyStatus {
                name: name.clone(),
                secret: k.secret.clone(),
                fingerprint: k.fingerprint.clone(),
            });
        }
    }
    out
}

/// Creates Secret `secret` holding a fresh key for key `key_name`, owned by the ApiClient and labelled as a generated,
/// opted-in key. `Ok(Some((fingerprint, uid)))` if created now, `Ok(None)` if a Secret of that name exists already
/// (it is left alone: keys are never overwritten; [`keys::resolve_keys`] decides whether it may be used).
async fn create_generated_secret(
    ctx: &Ctx,
    obj: &ApiClient,
    ns: &str,
    key_name: &str,
    secret: &str,
) -> Result<Option<(String, Option<String>)>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let owner = obj.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = None;
        o
    });
    let key = generate_key();
    let fp = fingerprint(&key_digest(key.as_bytes()));
    let mut labels: BTreeMap<String, String> =
        generated_secret_labels(&obj.name_any(), key_name).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    labels.insert("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string());
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(secret.to_string()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(GENERATED_KEY_DATA_KEY.to_string(), ByteString(key.into_bytes()))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &s).await {
        Ok(created) => {
            tracing::info!(namespace = ns, client = %obj.name_any(), secret, key = %fp, "created generated key Secret");
            Ok(Some((fp, created.uid())))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes the generated key Secrets of `obj` that no entry names any more, so a removed key cannot come back. The
/// ApiClient is read fresh first (a cached spec may lag behind one that names the Secret again), and each delete
/// carries the Secret's uid as a precondition.
async fn delete_orphaned_secrets(ctx: &Ctx, obj: &ApiClient, ns: &str) -> Result<(), Error> {
    // The candidates are the generated key Secrets this ApiClient owns (the index files them by owner uid; a walk
    // over every Secret per reconcile was quadratic in a namespace of generated keys), each checked from the store.
    let check = keys::OrphanCheck::new(obj);
    let uid = obj.uid().unwrap_or_default();
    let secrets: Vec<Arc<Secret>> = ctx
        .caches
        .key_secret_owners
        .lookup(ns, &uid)
        .iter()
        .filter_map(|name| ctx.secrets.get(&ObjectRef::new(name).within(ns)))
        .collect();
    if !secrets.iter().any(|s| check.is_orphan(s)) {
        return Ok(());
    }
    let Some(fresh) = Api::<ApiClient>::namespaced(ctx.client.clone(), ns).get_opt(&obj.name_any()).await? else {
        return Ok(()); // deleted: the garbage collector takes its Secrets
    };
    if fresh.uid() != obj.uid() {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for (name, uid) in keys::orphaned_generated_secrets(&fresh, secrets.iter().map(|s| &**s)) {
        let fp = secrets.iter().find(|s| s.name_any() == name && s.namespace().as_deref() == Some(ns)).and_then(|s| {
            s.data.as_ref()?.get(GENERATED_KEY_DATA_KEY).map(|v| fingerprint(&key_digest(v.0.trim_ascii())))
        });
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid.clone()), resource_version: None }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {
                tracing::info!(namespace = ns, client = %obj.name_any(), secret = %name, key = ?fp, "deleted generated key Secret no entry names");
                publish_key_event(
                    ctx,
                    obj,
                    events::key_deleted(&name, fp.as_deref()),
                    secret_ref(ns, &name, Some(uid)),
                )
                .await;
            }
            // Gone already, or replaced by another Secret of that name (uid precondition): nothing to do.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn secret_ref(ns: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}

/// Publishes a key lifecycle Event about `obj`, naming the Secret as the related object.
async fn publish_key_event(ctx: &Ctx, obj: &ApiClient, ev: KeyEvent, secret: ObjectReference) {
    let ev = KEvent {
        type_: if ev.warning { EventType::Warning } else { EventType::Normal },
        reason: ev.reason.into(),
        note: Some(events::truncate_note(ev.note)),
        action: "ManageKeys".into(),
        secondary: Some(secret),
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an Event failed");
    }
}
