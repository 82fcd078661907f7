//! The ApiClient reconciler (a kube-runtime `Controller`): creates generated key Secrets once, resolves keys and
//! plans, and writes status (conditions, fingerprints) plus Events on condition transitions.

use super::tables::{ServiceKey, cached_keys};
use super::{Ctx, Error, MANAGED_BY, publish_transitions};
use crate::conditions::{ClientFacts, client_conditions, merge};
use crate::crd::{ApiClient, ApiClientStatus};
use crate::keygen::generate_key;
use crate::model::{GENERATED_KEY_DATA_KEY, LABEL_API_CLIENT, generated_secret_name, parse_source_ranges};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
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
    tracing::warn!(namespace = ?client.namespace(), client = %client.name_any(), error = %err, "ApiClient reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner(obj: &ApiClient, ctx: &Ctx) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let generation = obj.metadata.generation.unwrap_or(0);

    // Generated keys: create the owned Secret once; never touch an existing one.
    let mut created = false;
    for (i, k) in obj.spec.keys.iter().enumerate() {
        if k.generate.is_some() && k.secret_ref.is_none() {
            let secret = generated_secret_name(&name, i);
            if ctx.secrets.get(&ObjectRef::new(&secret).within(&ns)).is_none() {
                created |= ensure_generated_secret(ctx, obj, &ns, &secret).await?;
            }
        }
    }
    if created {
        // The Secret watch brings it into the cache and triggers us again.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    let resolved = cached_keys(ctx, obj);
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
            if st.and_then(|st| st.clients.get(&name)) != Some(&generation) {
                facts.unprogrammed.push(s.clone());
            }
            if let Some(d) = st.and_then(|st| st.duplicates.get(&name)) {
                facts.duplicate_keys.extend(d.iter().cloned());
            }
        }
    }
    facts.services = services.into_iter().collect();

    let old = obj.status.clone().unwrap_or_default();
    let mut decided = client_conditions(&facts);
    decided.push(ctx.enforcement.client_condition(ctx, &ns, &name, generation, &facts.services, &facts.unprogrammed));
    let conditions = merge(&old.conditions, &decided, Some(generation), now);
    let status = ApiClientStatus {
        observed_generation: Some(generation),
        conditions,
        key_fingerprints: resolved.entries.iter().map(|k| fingerprint(&k.sha256)).collect(),
        keys: facts.live_keys as u32,
    };
    if status != old {
        let api: Api<ApiClient> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        publish_transitions(ctx, &obj.object_ref(&()), &old.conditions, &status.conditions).await;
    }
    // Re-check when the next key expires; otherwise rely on watches (plus a slow resync).
    let requeue = resolved
        .next_expiry(now)
        .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
        .map(|d| d + Duration::from_secs(1))
        .unwrap_or(Duration::from_secs(600))
        .min(Duration::from_secs(600));
    Ok(Action::requeue(requeue))
}

/// Creates Secret `secret` holding a fresh key, owned by the ApiClient. `Ok(true)` if created now. An existing
/// Secret (say, the cache lags) is left alone: keys are never regenerated.
async fn ensure_generated_secret(ctx: &Ctx, obj: &ApiClient, ns: &str, secret: &str) -> Result<bool, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let owner = obj.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = None;
        o
    });
    let key = generate_key();
    let fp = fingerprint(&key_digest(key.as_bytes()));
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(secret.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL_API_CLIENT.to_string(), obj.name_any()),
                ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
            ])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(GENERATED_KEY_DATA_KEY.to_string(), ByteString(key.into_bytes()))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &s).await {
        Ok(_) => {
            tracing::info!(namespace = ns, client = %obj.name_any(), secret, key = %fp, "created generated key Secret");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
