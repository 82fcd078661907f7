//! `kubectl portcullis check CLIENT --from ADDR METHOD PATH`: would this request pass right now, and which rule
//! decides? The verdict is the sidecar's own: the live table compiled by [`CompiledTable::compile`], the path
//! normalised by [`normalize`], and [`decide_identified`] run for the client with one of its keys from the table
//! (the plugin never holds a raw key). Pure: the table and the quota use are read by the caller.
//!
//! What `check` cannot see is said, not guessed: throttle counts live in each sidecar (or the shared store), so the
//! throttle is evaluated on a fresh count; a quota counted in the shared store is taken from the ApiClient's
//! `status.usage` (as fresh as the controller's last read).

use governor::clock::DefaultClock;
use ipnet::IpNet;
use jiff::Timestamp;
use portcullis_proxy::decision::compiled::{ClientRef, KeyRef};
use portcullis_proxy::decision::path::{EscapedSlashes, normalize};
use portcullis_proxy::decision::{CompiledTable, Decision, Reason, RequestFacts, decide_identified};
use portcullis_table::{Client, Plan, Table, fingerprint};
use std::fmt::Write as _;
use std::net::IpAddr;

/// The request to check.
#[derive(Debug, Clone)]
pub struct Request {
    pub addr: IpAddr,
    pub method: String,
    pub path: String,
    pub now: Timestamp,
}

/// One plan's quota use in the current period, from the ApiClient's `status.usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub plan: String,
    pub used: u64,
    pub limit: u64,
    pub resets_at: String,
}

/// How one step of the decision went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Pass,
    Fail,
    /// Not decided here (state `check` cannot see), or not reached.
    Note,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub mark: Mark,
    pub detail: String,
}

/// The answer: the status the sidecar would send, its reason code, the rule that decides, and every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub service: String,
    pub revision: String,
    pub status: u16,
    /// `None` when the request would be forwarded.
    pub reason: Option<&'static str>,
    /// The rule that decides, in words that name the field to change.
    pub rule: String,
    /// The plan the request would be counted under, when it passes the route check.
    pub plan: Option<String>,
    pub steps: Vec<Step>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.reason.is_none()
    }

    fn refused(table: &Table, reason: Reason, rule: String, steps: Vec<Step>) -> Self {
        Self {
            service: table.service.clone(),
            revision: table.revision.clone(),
            status: reason.status(),
            reason: Some(reason.code()),
            rule,
            plan: None,
            steps,
        }
    }

    /// Human-readable lines (what the command prints).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let short = &self.revision[..self.revision.len().min(12)];
        let _ = writeln!(out, "Service {} (table revision {short})", self.service);
        for s in &self.steps {
            let mark = match s.mark {
                Mark::Pass => "ok  ",
                Mark::Fail => "FAIL",
                Mark::Note => "  · ",
            };
            let _ = writeln!(out, "  {mark} {:<9} {}", s.name, s.detail);
        }
        match self.reason {
            None => {
                let plan = self.plan.as_deref().unwrap_or("-");
                let _ = writeln!(out, "ALLOWED: forwarded to the application under plan {plan} ({})", self.rule);
            }
            Some(code) => {
                let _ = writeln!(out, "REFUSED: {} {code}: decided by {}", self.status, self.rule);
            }
        }
        out
    }
}

/// Why `check` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the table of {service} cannot be compiled: {detail}")]
    Compile { service: String, detail: String },
}

/// Decides `req` for client `client_id` (`namespace/name`) against `table`, with quota use `usage`.
pub fn check(table: &Table, client_id: &str, req: &Request, usage: &[Usage]) -> Result<Verdict, CheckError> {
    let mut steps = Vec::new();
    if let Some(d) = &table.deny_all {
        let rule = format!(
            "no UsagePlan grants Service {} (the controller wrote a deny-all table: {})",
            table.service, d.reason
        );
        return Ok(Verdict::refused(table, Reason::ServiceNotGranted, rule, steps));
    }
    // The sidecar's defaults: escaped slashes refused (`--allow-escaped-slashes` off).
    // The decision sees the path without the query, as the sidecar's does (`uri.path()`).
    let raw = req.path.split_once('?').map_or(req.path.as_str(), |(p, _)| p);
    let path = match normalize(raw, EscapedSlashes::default()) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            steps.push(Step { name: "path", mark: Mark::Fail, detail: format!("{:?}: {}", req.path, e.as_str()) });
            let rule = "path normalisation (the sidecar refuses a path it cannot normalise safely)".to_string();
            return Ok(Verdict::refused(table, Reason::InvalidPath, rule, steps));
        }
    };
    let shown = if path == raw { path.clone() } else { format!("{path} (normalised from {raw:?})") };
    steps.push(Step { name: "path", mark: Mark::Pass, detail: shown });

    let Some(index) = table.clients.iter().position(|c| c.id == client_id) else {
        steps.push(Step {
            name: "client",
            mark: Mark::Fail,
            detail: format!("{client_id} is not in this table: none of its keys is known to the sidecar"),
        });
        let rule = format!(
            "the table's clients: ApiClient {client_id} is not in it (no plan of its grants Service {}, or its keys \
             did not resolve: see its conditions, `kubectl get apiclient {} -o yaml`)",
            table.service,
            client_id.split_once('/').map_or(client_id, |(_, n)| n)
        );
        return Ok(Verdict::refused(table, Reason::InvalidKey, rule, steps));
    };
    let client = &table.clients[index];
    let compiled = CompiledTable::compile(table, None, DefaultClock::default())
        .map_err(|e| CheckError::Compile { service: table.service.clone(), detail: e.to_string() })?;
    // A table compiled whole is one part: the client's position in it is its position in the table.
    let at = ClientRef { part: 0, index: index as u32 };
    let cc = compiled.client_at(at);

    // A key of the client's: one still valid if it has one (the sidecar would accept any of them the same way).
    let key = client.keys.iter().find(|k| k.expires_at.is_none_or(|e| req.now < e)).or(client.keys.first());
    let key_ref = key.map(|k| KeyRef { client: at, expires_at: k.expires_at });
    match key {
        Some(k) => {
            let valid = client.keys.iter().filter(|k| k.expires_at.is_none_or(|e| req.now < e)).count();
            let expiry = k.expires_at.map_or("no expiry".to_string(), |e| format!("expires {e}"));
            let mark = if valid > 0 { Mark::Pass } else { Mark::Fail };
            let detail = format!(
                "{client_id}: {valid} of {} key(s) valid now; checking with {} ({expiry})",
                client.keys.len(),
                fingerprint(&k.sha256)
            );
            steps.push(Step { name: "key", mark, detail });
        }
        None if client.certificates.is_empty() => {
            steps.push(Step {
                name: "key",
                mark: Mark::Fail,
                detail: format!("{client_id} has no key and no certificate in the table"),
            });
            let rule =
                format!("spec.keys of ApiClient {client_id}: it has no key in force (see its KeysResolved condition)");
            return Ok(Verdict::refused(table, Reason::InvalidKey, rule, steps));
        }
        None => steps.push(Step {
            name: "key",
            mark: Mark::Note,
            detail: format!("{client_id} has no key: identified by its client certificate (assumed presented)"),
        }),
    }

    let facts = RequestFacts {
        addr: req.addr,
        method: &req.method,
        path: &path,
        key: None,
        digest: None,
        cert: None,
        now: req.now,
    };
    let decision = decide_identified(&compiled, cc, key_ref, &facts);
    let mut verdict = match decision {
        Decision::Allow { plan, .. } => Verdict {
            service: table.service.clone(),
            revision: table.revision.clone(),
            status: 200,
            reason: None,
            rule: String::new(),
            plan: Some(plan.spec.name.clone()),
            steps: Vec::new(),
        },
        Decision::Deny(d) | Decision::Refuse { denial: d, .. } => {
            Verdict::refused(table, d.reason, String::new(), Vec::new())
        }
    };
    explain(table, client, req.addr, &req.method, &path, req.now, key, &mut steps, &mut verdict);

    // A quota counted in the shared store: the sidecars refuse once `status.usage` says it is used up.
    if verdict.allowed()
        && let Some(plan) = verdict.plan.clone()
        && let Some(u) = usage.iter().find(|u| u.plan == plan)
        && u.used >= u.limit
    {
        steps.push(Step {
            name: "quota",
            mark: Mark::Fail,
            detail: format!(
                "plan {plan}: {} of {} used this period (status.usage), resets at {}",
                u.used, u.limit, u.resets_at
            ),
        });
        verdict = Verdict::refused(
            table,
            Reason::QuotaExceeded,
            format!("the quota of UsagePlan {plan} (used up until {})", u.resets_at),
            Vec::new(),
        );
        verdict.plan = Some(plan);
    }
    verdict.steps = steps;
    Ok(verdict)
}

/// Adds the steps after the key, and the decisive rule's words, to what [`decide_identified`] decided.
#[allow(clippy::too_many_arguments)]
fn explain(
    table: &Table,
    client: &Client,
    addr: IpAddr,
    method: &str,
    path: &str,
    now: Timestamp,
    key: Option<&portcullis_table::KeyEntry>,
    steps: &mut Vec<Step>,
    verdict: &mut Verdict,
) {
    let id = &client.id;
    let reason = verdict.reason;
    let code = |r: Reason| Some(r.code());
    if reason == code(Reason::KeyExpired) {
        let at = key.and_then(|k| k.expires_at).map_or("-".to_string(), |e| e.to_string());
        verdict.rule = format!("spec.keys[].expiresAt of ApiClient {id}: every key of it has expired (last at {at})");
        return;
    }
    if reason == code(Reason::CertificateRequired) {
        steps.push(Step { name: "cert", mark: Mark::Fail, detail: "a key alone is not enough for this client".into() });
        verdict.rule = format!(
            "spec.requireCertificate of ApiClient {id}: the connection must present a matching client certificate \
             (check evaluates the key alone)"
        );
        return;
    }
    let disabled = reason == code(Reason::ClientDisabled);
    steps.push(Step {
        name: "disabled",
        mark: if disabled { Mark::Fail } else { Mark::Pass },
        detail: if disabled { "spec.disabled: true".into() } else { "no".into() },
    });
    if disabled {
        verdict.rule = format!("spec.disabled of ApiClient {id}");
        return;
    }
    let ranges: Vec<String> = client.source_ranges.iter().map(IpNet::to_string).collect();
    match client.source_ranges.iter().find(|n| n.contains(&addr)) {
        Some(net) => steps.push(Step { name: "source", mark: Mark::Pass, detail: format!("{addr} is in {net}") }),
        None => {
            let list = if ranges.is_empty() { "(none: admits no address)".to_string() } else { ranges.join(", ") };
            steps.push(Step { name: "source", mark: Mark::Fail, detail: format!("{addr} is in none of {list}") });
            verdict.rule = format!("spec.sourceRanges of ApiClient {id} ({list})");
            return;
        }
    }
    let describe = |name: &str, p: &Plan| -> String {
        if p.routes.is_empty() {
            return format!("{name} (every route)");
        }
        let routes: Vec<String> = p
            .routes
            .iter()
            .map(|r| {
                if r.methods.is_empty() {
                    format!("{} *", r.path_prefix)
                } else {
                    format!("{} {}", r.path_prefix, r.methods.join("|"))
                }
            })
            .collect();
        format!("{name} ({})", routes.join(", "))
    };
    let plans: Vec<(&String, Plan)> =
        client.plans.iter().map(|n| (n, table.plans.get(n).cloned().unwrap_or_default())).collect();
    let Some(plan) = verdict.plan.clone() else {
        if reason == code(Reason::RouteNotAllowed) {
            let all: Vec<String> = plans.iter().map(|(n, p)| describe(n, p)).collect();
            steps.push(Step {
                name: "route",
                mark: Mark::Fail,
                detail: format!("{method} {path}: no plan admits it; plans: {}", all.join("; ")),
            });
            verdict.rule = format!("the routes of ApiClient {id}'s UsagePlans ({})", all.join("; "));
        } else if let Some(c) = reason {
            verdict.rule = format!("{c} (throttle or quota)");
        }
        return;
    };
    let p = table.plans.get(&plan).cloned().unwrap_or_default();
    steps.push(Step { name: "route", mark: Mark::Pass, detail: format!("plan {}", describe(&plan, &p)) });
    match &p.throttle {
        Some(t) => steps.push(Step {
            name: "throttle",
            mark: Mark::Note,
            detail: format!(
                "{} per {} ms, burst {}, counted {}: check starts from a fresh count",
                t.rate,
                t.per_millis,
                t.burst,
                if p.global_limits { "in the shared store across replicas" } else { "in each sidecar" }
            ),
        }),
        None => steps.push(Step { name: "throttle", mark: Mark::Pass, detail: "none".into() }),
    }
    match &p.quota {
        Some(q) => steps.push(Step {
            name: "quota",
            mark: Mark::Note,
            detail: format!("{} per {:?} (use: `kubectl portcullis usage`)", q.limit, q.period),
        }),
        None => steps.push(Step { name: "quota", mark: Mark::Pass, detail: "none".into() }),
    }
    let _ = now;
    verdict.rule = match client.source_ranges.iter().find(|n| n.contains(&addr)) {
        Some(net) => format!("key of {id}, source {net}, route of plan {plan}"),
        None => format!("key of {id}, route of plan {plan}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_table::{Period, Quota, RouteScope, Throttle};
    use std::collections::BTreeMap;

    fn table() -> Table {
        let mut plans = BTreeMap::new();
        plans.insert(
            "read".to_string(),
            Plan {
                throttle: Some(Throttle { rate: 5, per_millis: 1000, burst: 5 }),
                routes: vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] }],
                quota: Some(Quota { limit: 10, period: Period::Day }),
                ..Default::default()
            },
        );
        let mut expired = Client::builder("shop/old").key(b"old").source("127.0.0.0/8").plan("read").build();
        expired.keys[0].expires_at = Some("2020-01-01T00:00:00Z".parse().unwrap());
        let mut off = Client::builder("shop/off").key(b"off").source("127.0.0.0/8").plan("read").build();
        off.disabled = true;
        let rotating =
            Client::builder("shop/rot").key(b"rot-old").key(b"rot-new").source("127.0.0.0/8").plan("read").build();
        let mut rotating = rotating;
        rotating.keys[0].expires_at = Some("2020-01-01T00:00:00Z".parse().unwrap());
        Table::new(
            "shop/api",
            plans,
            vec![
                Client::builder("shop/acme")
                    .key(b"acme")
                    .source("127.0.0.1/32")
                    .source("10.0.0.0/8")
                    .plan("read")
                    .build(),
                expired,
                off,
                rotating,
            ],
        )
    }

    fn req(addr: &str, method: &str, path: &str) -> Request {
        Request {
            addr: addr.parse().unwrap(),
            method: method.into(),
            path: path.into(),
            now: "2026-12-02T12:00:00Z".parse().unwrap(),
        }
    }

    fn failed(v: &Verdict) -> Vec<&str> {
        v.steps.iter().filter(|s| s.mark == Mark::Fail).map(|s| s.name).collect()
    }

    #[test]
    fn an_allowed_request_names_its_plan_and_range() {
        let v = check(&table(), "shop/acme", &req("10.1.2.3", "GET", "/v1/orders"), &[]).unwrap();
        assert!(v.allowed(), "{}", v.render());
        assert_eq!((v.status, v.plan.as_deref()), (200, Some("read")));
        assert!(v.rule.contains("10.0.0.0/8"), "{}", v.rule);
        assert!(failed(&v).is_empty());
        // The sidecar normalises the path before the route check; so does check.
        let v = check(&table(), "shop/acme", &req("127.0.0.1", "GET", "/v2/../v1/./orders"), &[]).unwrap();
        assert!(v.allowed(), "{}", v.render());
        assert!(v.steps[0].detail.contains("normalised"), "{:?}", v.steps[0]);
        // The query is not part of the path the routes see.
        let v = check(&table(), "shop/acme", &req("127.0.0.1", "GET", "/v1?next=/admin/../x"), &[]).unwrap();
        assert!(v.allowed() && v.steps[0].detail == "/v1", "{}", v.render());
    }

    #[test]
    fn each_refusal_names_the_rule_that_decides() {
        let t = table();
        let cases = [
            ("shop/acme", "192.0.2.1", "GET", "/v1", "source_not_allowed", "spec.sourceRanges", "source"),
            ("shop/acme", "127.0.0.1", "POST", "/v1", "route_not_allowed", "routes", "route"),
            ("shop/acme", "127.0.0.1", "GET", "/v10", "route_not_allowed", "/v1 GET", "route"),
            ("shop/old", "127.0.0.1", "GET", "/v1", "key_expired", "expiresAt", "key"),
            ("shop/off", "127.0.0.1", "GET", "/v1", "client_disabled", "spec.disabled", "disabled"),
            ("shop/nobody", "127.0.0.1", "GET", "/v1", "invalid_key", "not in it", "client"),
            ("shop/acme", "127.0.0.1", "GET", "/v1/%2e%2e%2f", "invalid_path", "normalisation", "path"),
        ];
        for (client, addr, method, path, code, rule, step) in cases {
            let v = check(&t, client, &req(addr, method, path), &[]).unwrap();
            assert_eq!(v.reason, Some(code), "{client} {addr} {method} {path}: {}", v.render());
            assert!(v.rule.contains(rule), "{client} {method} {path}: rule {:?} lacks {rule:?}", v.rule);
            assert_eq!(failed(&v), vec![step], "{}", v.render());
        }
    }

    #[test]
    fn an_expired_key_beside_a_valid_one_does_not_refuse() {
        let v = check(&table(), "shop/rot", &req("127.0.0.1", "GET", "/v1"), &[]).unwrap();
        assert!(v.allowed(), "{}", v.render());
        assert!(v.steps.iter().any(|s| s.name == "key" && s.detail.contains("1 of 2")), "{}", v.render());
    }

    #[test]
    fn a_used_up_shared_quota_refuses_and_a_deny_all_table_refuses_everyone() {
        let used = |used| Usage { plan: "read".into(), used, limit: 10, resets_at: "2026-12-03T00:00:00Z".into() };
        let v = check(&table(), "shop/acme", &req("127.0.0.1", "GET", "/v1"), &[used(10)]).unwrap();
        assert_eq!((v.status, v.reason), (429, Some("quota_exceeded")), "{}", v.render());
        assert!(v.rule.contains("UsagePlan read"));
        let v = check(&table(), "shop/acme", &req("127.0.0.1", "GET", "/v1"), &[used(9)]).unwrap();
        assert!(v.allowed());
        let deny = Table::deny_all("shop/api", "no UsagePlan grants it");
        let v = check(&deny, "shop/acme", &req("127.0.0.1", "GET", "/v1"), &[]).unwrap();
        assert_eq!((v.status, v.reason), (403, Some("service_not_granted")));
    }
}
