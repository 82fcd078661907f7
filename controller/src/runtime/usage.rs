//! `ApiClient.status.usage`: every `--usage-refresh-seconds`, the quota counts of every ApiClient's plans whose quota
//! is counted in the shared store (`quotaScope: Global`) are read in batched MGETs of the keys the proxies write
//! ([`portcullis_table::store_keys::quota_key`]) and patched into the status where they changed. Quotas counted per
//! replica are not listed (no single number describes them).
//!
//! On Redis Cluster an MGET may only name keys of one hash slot: `Store::quota_used` splits each batch per slot
//! (a client's keys share its `{namespace/name}` tag, so one MGET per client at most) and sends the per-slot
//! MGETs together.

use super::Ctx;
use crate::crd::{ApiClient, UsagePlan, UsageStatus};
use crate::model;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use portcullis_table::period::period_end;
use portcullis_table::store_keys::quota_key;
use std::sync::Arc;

pub use super::store_client::StoreClient;

/// Keys read per call of `Store::quota_used` (one MGET; on Cluster, one per slot among them).
const BATCH: usize = 500;

/// One usage entry to fill in: the key to read and the entry without its count.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub key: String,
    pub entry: UsageStatus,
}

/// The usage entries of `client` (in `spec.usagePlans` order, each plan once) at `now` (Unix seconds): its plans
/// (looked up with `plan`) that have a quota counted in the store (`store`: whether one is configured).
pub fn pending_usage(
    client: &ApiClient,
    plan: impl Fn(&str) -> Option<Arc<UsagePlan>>,
    store: bool,
    now: i64,
) -> Vec<Pending> {
    let id = format!("{}/{}", client.namespace().unwrap_or_default(), client.name_any());
    let mut out: Vec<Pending> = Vec::new();
    for name in &client.spec.usage_plans {
        if out.iter().any(|p| &p.entry.plan == name) {
            continue;
        }
        let Some(p) = plan(name) else { continue };
        let Some(q) = &p.spec.quota else { continue };
        if !model::store_use(&p.spec, store).quota {
            continue;
        }
        let period = model::period(q.period);
        let resets_at = jiff::Timestamp::from_second(period_end(period, now)).unwrap_or_default();
        out.push(Pending {
            key: quota_key(&id, name, period, now),
            entry: UsageStatus {
                plan: name.clone(),
                period: q.period,
                used: 0,
                limit: q.limit,
                resets_at: Time(resets_at),
            },
        });
    }
    out
}

/// The `Used` column: `used/limit` of each entry, comma-separated; `None` without entries.
pub fn summary(usage: &[UsageStatus]) -> Option<String> {
    (!usage.is_empty()).then(|| usage.iter().map(|u| format!("{}/{}", u.used, u.limit)).collect::<Vec<_>>().join(", "))
}

/// Refreshes `status.usage` every `usage_every` until the task is dropped.
pub async fn run(ctx: Arc<Ctx>) {
    let Some(settings) = ctx.store.clone() else { return };
    let mut client = StoreClient::new(&settings);
    let mut tick = tokio::time::interval(settings.usage_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        let res = refresh(&ctx, &mut client).await;
        ctx.metrics.observe("usage", started.elapsed(), res.is_ok());
        match res {
            Ok(patched) if patched > 0 => tracing::debug!(patched, "ApiClient usage refreshed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading quota usage from the shared store failed; retrying"),
        }
    }
}

/// One refresh: reads every count, patches the ApiClients whose usage changed. `Ok(number patched)`.
pub async fn refresh(ctx: &Ctx, store: &mut StoreClient) -> Result<usize, String> {
    let now = jiff::Timestamp::now().as_second();
    let clients = ctx.clients.state();
    let per_client: Vec<(Arc<ApiClient>, Vec<Pending>)> = clients
        .into_iter()
        .map(|c| {
            let ns = c.namespace().unwrap_or_default();
            let p = pending_usage(&c, |n| ctx.plans.get(&ObjectRef::new(n).within(&ns)), ctx.has_store(), now);
            (c, p)
        })
        .collect();
    let keys: Vec<String> = per_client.iter().flat_map(|(_, p)| p.iter().map(|p| p.key.clone())).collect();
    let mut counts = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(BATCH) {
        counts.extend(store.quota_used(chunk).await?);
    }
    let mut counts = counts.into_iter();
    let mut patched = 0;
    for (c, pending) in per_client {
        let usage: Vec<UsageStatus> =
            pending.into_iter().map(|p| UsageStatus { used: counts.next().unwrap_or(0), ..p.entry }).collect();
        let old = c.status.clone().unwrap_or_default();
        let used_summary = summary(&usage);
        if old.usage == usage && old.used_summary == used_summary {
            continue;
        }
        let api: Api<ApiClient> = Api::namespaced(ctx.client.clone(), &c.namespace().unwrap_or_default());
        let patch = serde_json::json!({ "status": { "usage": usage, "usedSummary": used_summary } });
        match api.patch_status(&c.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => patched += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(client = %c.name_any(), error = %e, "patching status.usage failed"),
        }
    }
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{QuotaPeriod, QuotaScopeSpec};
    use crate::model::tests::{client, plan};

    #[test]
    fn usage_lists_global_quotas_in_plan_order_with_the_proxies_keys() {
        let gold = Arc::new(plan("gold", &["orders"], Some(5))); // quota 1000 / Day, scope unset
        let mut local = plan("local", &["orders"], None);
        local.spec.quota_scope = Some(QuotaScopeSpec::Local);
        let mut free = plan("free", &["orders"], None);
        free.spec.quota = None;
        let plans = [gold.clone(), Arc::new(local), Arc::new(free)];
        let lookup = |n: &str| plans.iter().find(|p| p.name_any() == n).cloned();
        let c = client("acme", &["missing", "local", "gold", "free", "gold"], &[]);
        let now = 1_771_419_600; // 2026-02-18T13:00:00Z
        assert!(pending_usage(&c, lookup, false, now).is_empty(), "no store: quotas are Local by default");
        let p = pending_usage(&c, lookup, true, now);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "portcullis:{ns/acme}:gold:q:d20502");
        assert_eq!((p[0].entry.plan.as_str(), p[0].entry.period, p[0].entry.limit), ("gold", QuotaPeriod::Day, 1000));
        assert_eq!(p[0].entry.resets_at.0.to_string(), "2026-02-19T00:00:00Z");
        let mut u = vec![UsageStatus { used: 7, ..p[0].entry.clone() }];
        assert_eq!(summary(&u).as_deref(), Some("7/1000"));
        u.push(UsageStatus { used: 0, limit: 5, ..u[0].clone() });
        assert_eq!(summary(&u).as_deref(), Some("7/1000, 0/5"));
        assert_eq!(summary(&[]), None);
    }
}
