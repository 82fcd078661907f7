//! Status written by the table writer: UsagePlan status (conditions, clients, tables written), and the Events that
//! accompany condition transitions (for UsagePlans and ApiClients alike).

use super::Ctx;
use super::caches::{count, in_namespace};
use super::rendered::ServiceKey;
use crate::conditions::{PlanFacts, merge, plan_conditions, transitions};
use crate::crd::{TableStatus, UsagePlan, UsagePlanStatus};
use crate::model;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KEvent, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

/// Condition types whose transitions are announced on UsagePlans only, never on each ApiClient: `Enforced` says
/// what a Service's sidecars serve, one fact for every client of the Service. Announced per client, a Service
/// without sidecars (or with one stuck) would cost one Warning Event per client — 100 000 Event writes competing
/// with the status writes for the API server (measured: ≈ 1 `NoSidecars` Event per ApiClient created in the
/// 100 000-client propagation run). The ApiClient's condition still says it, for `kubectl get` and `kubectl wait`.
pub(crate) const ANNOUNCED_ON_PLANS_ONLY: &[&str] = &[crate::conditions::types::ENFORCED];

/// Which object a transition is announced on ([`ANNOUNCED_ON_PLANS_ONLY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    UsagePlan,
    ApiClient,
}

/// The transitions announced on `subject`: Warning when a condition turns False (except the transient `Pending`),
/// Normal when Ready turns True; none for [`ANNOUNCED_ON_PLANS_ONLY`] types on an ApiClient.
pub(crate) fn announced<'a>(
    subject: Subject,
    old: &[Condition],
    new: &'a [Condition],
) -> Vec<(EventType, &'a Condition)> {
    transitions(old, new)
        .into_iter()
        .filter(|c| subject == Subject::UsagePlan || !ANNOUNCED_ON_PLANS_ONLY.contains(&c.type_.as_str()))
        .filter_map(|c| match (c.status.as_str(), c.type_.as_str()) {
            ("False", _) if c.reason != crate::conditions::reason::PENDING => Some((EventType::Warning, c)),
            ("True", "Ready") => Some((EventType::Normal, c)),
            _ => None,
        })
        .collect()
}

/// Publishes an Event per announced condition transition ([`announced`]). Messages come from conditions, which
/// never contain key material.
pub(crate) async fn publish_transitions(
    ctx: &Ctx,
    subject: Subject,
    obj: &ObjectReference,
    old: &[Condition],
    new: &[Condition],
) {
    for (type_, c) in announced(subject, old, new) {
        let note = match type_ {
            EventType::Warning => format!("{}: {}", c.type_, c.message),
            EventType::Normal => c.message.clone(),
        };
        let note = Some(crate::events::truncate_note(note));
        let ev = KEvent { type_, reason: c.reason.clone(), note, action: "Reconcile".into(), secondary: None };
        if let Err(e) = ctx.recorder.publish(&ev, obj).await {
            tracing::debug!(error = %e, "publishing an Event failed");
        }
    }
}

pub(crate) async fn update_plan_status(ctx: &Ctx, plan: &UsagePlan) -> Result<(), super::Error> {
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
            ctx.metrics.set_bypass_findings(&ns, &s.name, findings.len());
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
    if let Err(e) = model::plan_entry(&name, &plan.spec, "", ctx.has_store()) {
        facts.spec_error = Some(e.to_string());
    }
    facts.store_use = model::store_use(&plan.spec, ctx.has_store());
    facts.fallback = model::store_fallback(&plan.spec);
    facts.store = ctx.store_health.read().expect("store health lock").clone();
    facts.ineffective = model::ineffective_fields(&plan.spec, ctx.has_store());
    let clients = count(&ctx.clients, |c| in_namespace(c, &ns) && c.spec.usage_plans.contains(&name)) as u32;
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
    publish_transitions(ctx, Subject::UsagePlan, &plan.object_ref(&()), &old.conditions, &status.conditions).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{type_} {reason}"),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    #[test]
    fn enforced_is_announced_on_plans_only() {
        let old = vec![cond("Ready", "False", "Pending"), cond("Enforced", "False", "Pending")];
        let new = vec![
            cond("Ready", "True", "Ready"),
            cond("KeysResolved", "False", "SecretNotFound"),
            cond("Enforced", "False", "NoSidecars"),
        ];
        let names = |subject| -> Vec<(EventType, String)> {
            announced(subject, &old, &new).into_iter().map(|(t, c)| (t, c.type_.clone())).collect()
        };
        let client = names(Subject::ApiClient);
        assert_eq!(
            client,
            vec![(EventType::Normal, "Ready".into()), (EventType::Warning, "KeysResolved".into())],
            "an ApiClient gets no Enforced Event"
        );
        let plan = names(Subject::UsagePlan);
        assert!(plan.contains(&(EventType::Warning, "Enforced".into())), "{plan:?}");
        assert_eq!(plan.len(), 3);
        // No transition, no Event; Pending is never announced.
        assert!(announced(Subject::UsagePlan, &new, &new).is_empty());
        assert!(announced(Subject::UsagePlan, &[], &[cond("Enforced", "False", "Pending")]).is_empty());
    }
}
