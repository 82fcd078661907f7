//! What `status` and `usage` print, from the objects as read (pure: JSON and index documents in, text out).

use crate::objects::{Condition, conditions, str_list};
use portcullis_table::shard::IndexDoc;
use serde_json::Value;
use std::fmt::Write as _;

/// One protected Service as `status` shows it.
pub struct ServiceState<'a> {
    pub service: &'a str,
    pub index: &'a IndexDoc,
    /// `name (phase, podIP)` of each pod injected for it.
    pub pods: Vec<String>,
    /// The UsagePlans (whole JSON) granting it.
    pub plans: Vec<&'a Value>,
}

/// The condition types `status` reports per plan: the table, the sidecars, and the bypass findings (`Exposure`, the
/// deprecated copy of `Protected`, is left out).
const PLAN_CONDITIONS: [&str; 5] = ["Programmed", "Enforced", "Protected", "CertificatesVerifiable", "GlobalLimits"];

fn name(v: &Value) -> &str {
    v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?")
}

/// Does `plan` grant `service`?
pub fn grants(plan: &Value, service: &str) -> bool {
    plan.pointer("/spec/services")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|s| s.get("name").and_then(Value::as_str) == Some(service)))
}

/// A condition that is not as it should be (every type `status` shows is good when True).
fn is_finding(c: &Condition) -> bool {
    c.status == "False"
}

pub fn render_status(ns: &str, services: &[ServiceState<'_>]) -> String {
    let mut out = String::new();
    if services.is_empty() {
        let _ = writeln!(
            out,
            "No protected Service in {ns}: no table ConfigMap (portcullis.dev/table-role=index). A UsagePlan naming a \
             Service in spec.services makes one (`kubectl get usageplans -n {ns}`)."
        );
        return out;
    }
    let _ =
        writeln!(out, "{:<24} {:<14} {:>8} {:>7} {:>6}  PLANS", "SERVICE", "REVISION", "SEQUENCE", "CLIENTS", "SHARDS");
    for s in services {
        let plans: Vec<&str> = s.plans.iter().map(|p| name(p)).collect();
        let rev = if s.index.deny_all.is_some() {
            "deny-all".to_string()
        } else {
            s.index.revision.chars().take(12).collect()
        };
        let _ = writeln!(
            out,
            "{:<24} {:<14} {:>8} {:>7} {:>6}  {}",
            s.service,
            rev,
            s.index.sequence,
            s.index.clients,
            s.index.shards.len(),
            if plans.is_empty() { "-".to_string() } else { plans.join(",") }
        );
        if let Some(d) = &s.index.deny_all {
            let _ = writeln!(out, "  deny-all: {}", d.reason);
        }
        let pods = if s.pods.is_empty() {
            "none found (pods annotated portcullis.dev/service)".into()
        } else {
            s.pods.join(", ")
        };
        let _ = writeln!(out, "  sidecar pods: {pods}");
        for p in &s.plans {
            let conds = conditions(p);
            for t in PLAN_CONDITIONS {
                if let Some(c) = conds.iter().find(|c| c.type_ == t) {
                    let flag = if is_finding(c) { "!" } else { " " };
                    let _ = writeln!(
                        out,
                        "  {flag} usageplan/{}: {}={} ({}): {}",
                        name(p),
                        c.type_,
                        c.status,
                        c.reason,
                        c.message
                    );
                }
            }
        }
    }
    out
}

/// One row of `usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub client: String,
    pub plan: String,
    pub period: String,
    /// `(used, limit, resets_at)` when counted in the shared store; `None` when counted per sidecar.
    pub shared: Option<(u64, u64, String)>,
}

/// The quota rows of ApiClient `client` (whole JSON), given the namespace's UsagePlans: every plan of the client
/// with a quota, its use from `status.usage` when the shared store counts it.
pub fn usage_rows(client: &Value, plans: &[Value]) -> Vec<UsageRow> {
    let usage = client.pointer("/status/usage").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for plan in str_list(client, "/spec/usagePlans") {
        let Some(p) = plans.iter().find(|p| name(p) == plan) else { continue };
        let Some(q) = p.pointer("/spec/quota") else { continue };
        let period = q.get("period").and_then(Value::as_str).unwrap_or("?").to_string();
        let shared = usage.iter().find(|u| u.get("plan").and_then(Value::as_str) == Some(plan.as_str())).map(|u| {
            (
                u.get("used").and_then(Value::as_u64).unwrap_or(0),
                u.get("limit").and_then(Value::as_u64).unwrap_or(0),
                u.get("resetsAt").and_then(Value::as_str).unwrap_or("-").to_string(),
            )
        });
        rows.push(UsageRow { client: name(client).to_string(), plan, period, shared });
    }
    rows
}

pub fn render_usage(ns: &str, rows: &[UsageRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        let _ = writeln!(out, "No quota applies to these ApiClients in {ns} (their UsagePlans have no spec.quota).");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<20} {:<7} {:>10} {:>10} {:>10}  RESETS",
        "CLIENT", "PLAN", "PERIOD", "USED", "LIMIT", "REMAINING"
    );
    for r in rows {
        match &r.shared {
            Some((used, limit, resets)) => {
                let _ = writeln!(
                    out,
                    "{:<24} {:<20} {:<7} {:>10} {:>10} {:>10}  {resets}",
                    r.client,
                    r.plan,
                    r.period,
                    used,
                    limit,
                    limit.saturating_sub(*used)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "{:<24} {:<20} {:<7} counted per sidecar (quotaScope: Local, or no shared store yet): see each \
                     sidecar's portcullis_proxy_client_quota_remaining",
                    r.client, r.plan, r.period
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_rows_say_where_each_quota_is_counted() {
        let plans = vec![
            json!({"metadata": {"name": "gold"}, "spec": {"quota": {"limit": 100, "period": "Day"}}}),
            json!({"metadata": {"name": "local"}, "spec": {"quota": {"limit": 5, "period": "Month"}, "quotaScope": "Local"}}),
            json!({"metadata": {"name": "free"}, "spec": {}}),
        ];
        let client = json!({"metadata": {"name": "acme"}, "spec": {"usagePlans": ["gold", "local", "free", "gone"]},
            "status": {"usage": [{"plan": "gold", "period": "Day", "used": 120, "limit": 100, "resetsAt": "2026-12-03T00:00:00Z"}]}});
        let rows = usage_rows(&client, &plans);
        assert_eq!(rows.len(), 2, "plans without a quota, and missing plans, have no row");
        assert_eq!(rows[0].shared, Some((120, 100, "2026-12-03T00:00:00Z".into())));
        assert_eq!(rows[1].shared, None);
        let text = render_usage("shop", &rows);
        assert!(text.contains("acme") && text.contains("counted per sidecar"), "{text}");
        let gold = text.lines().find(|l| l.contains("gold")).unwrap();
        assert!(gold.split_whitespace().any(|w| w == "0"), "remaining never goes below 0: {gold}");
    }

    #[test]
    fn status_flags_findings() {
        let index = IndexDoc {
            schema_version: 1,
            service: "shop/api".into(),
            revision: "0123456789abcdef".into(),
            sequence: 4,
            slot: portcullis_table::naming::Slot::A,
            clients: 2,
            plans: Default::default(),
            shards: vec![],
            deny_all: None,
        };
        let plan = json!({"metadata": {"name": "gold"}, "spec": {"services": [{"name": "api"}]}, "status": {"conditions": [
            {"type": "Enforced", "status": "True", "reason": "Enforced", "message": "1/1 sidecars serve revision 0123456789ab"},
            {"type": "Protected", "status": "False", "reason": "NodePort", "message": "Service \"api\" is type NodePort"}]}});
        assert!(grants(&plan, "api") && !grants(&plan, "web"));
        let text = render_status(
            "shop",
            &[ServiceState {
                service: "api",
                index: &index,
                pods: vec!["api-0 (Running, 10.0.0.5)".into()],
                plans: vec![&plan],
            }],
        );
        assert!(text.contains("0123456789ab ") && text.contains("api-0 (Running"), "{text}");
        assert!(text.contains("! usageplan/gold: Protected=False"), "{text}");
        assert!(text.contains("  usageplan/gold: Enforced=True"), "{text}");
        assert!(render_status("shop", &[]).contains("No protected Service in shop"));
    }
}
