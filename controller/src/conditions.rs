//! Condition types and reasons, and the mapping from facts to conditions. No I/O.
//!
//! The vocabulary of the status: the modules that compute facts ([`crate::keys`]: [`KeyProblem`];
//! [`crate::exposure`] and [`crate::network_policy`]: [`Finding`]) do not import this module; it imports their
//! fact types and turns them into [`Cond`]s.

use crate::exposure::Finding;
use crate::keys::KeyProblem;
use crate::model::StoreUse;
use crate::store::{StoreHealth, global_limits_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portcullis_table::StoreFallback;

pub mod types {
    pub const READY: &str = "Ready";
    pub const KEYS_RESOLVED: &str = "KeysResolved";
    pub const PLAN_RESOLVED: &str = "PlanResolved";
    pub const SOURCE_RANGES_VALID: &str = "SourceRangesValid";
    pub const PROGRAMMED: &str = "Programmed";
    /// UsagePlan only: True when its Services are reachable only through the proxy and the proxy sees the
    /// clients' own addresses (no SNAT in front). Informational: not part of `Ready`.
    pub const PROTECTED: &str = "Protected";
    /// Deprecated name of [`PROTECTED`] (same status, reason and message), written for one more version so
    /// alerts and scripts can move; removed in the next minor version.
    pub const EXPOSURE: &str = "Exposure";
    /// ApiClient only: can every sidecar of every Service it is granted verify client certificates, as its
    /// `spec.certificates`/`requireCertificate` need? True `NotNeeded` for clients that use neither.
    pub const CERTIFICATES_VERIFIABLE: &str = "CertificatesVerifiable";
    /// Every running sidecar of every Service concerned serves the current revision ([`crate::enforcement`]).
    /// Informational: not part of `Ready`.
    pub const ENFORCED: &str = "Enforced";
    /// UsagePlan only: are the counts the plan shares across replicas (a `globalLimits` throttle, a `Global` quota)
    /// kept in a store the controller reaches? True `Local` for plans that count only per replica. Part of `Ready`.
    pub const GLOBAL_LIMITS: &str = "GlobalLimits";
    /// UsagePlan only: is every field that is set honoured? False names the fields that change nothing (e.g.
    /// `globalLimits: true` without a throttle). Informational: not part of `Ready`.
    pub const SPEC_HONOURED: &str = "SpecHonoured";
}

pub mod reason {
    pub const RESOLVED: &str = "Resolved";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// A `secretRef` Secret without the opt-in label `portcullis.dev/api-key: "true"`.
    pub const SECRET_NOT_OPTED_IN: &str = "SecretNotOptedIn";
    /// A `secretRef` Secret owned by another ApiClient.
    pub const SECRET_OWNED_BY_ANOTHER_CLIENT: &str = "SecretOwnedByAnotherClient";
    /// A Secret at a generated key's name that is not this ApiClient's generated key.
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    /// Creating a generated key's Secret failed.
    pub const SECRET_CREATE_FAILED: &str = "SecretCreateFailed";
    /// A `generate` entry without a name (stored before names were required).
    pub const KEY_NAME_MISSING: &str = "KeyNameMissing";
    pub const KEY_EXPIRED: &str = "KeyExpired";
    pub const DUPLICATE_KEY: &str = "DuplicateKey";
    pub const PLAN_NOT_FOUND: &str = "PlanNotFound";
    pub const VALID: &str = "Valid";
    pub const INVALID_SOURCE_RANGE: &str = "InvalidSourceRange";
    pub const PROGRAMMED: &str = "Programmed";
    pub const PENDING: &str = "Pending";
    pub const NO_SERVICES: &str = "NoServices";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const RENDER_FAILED: &str = "RenderFailed";
    pub const READY: &str = "Ready";
    pub const NOT_READY: &str = "NotReady";
    /// `Protected` True: the plan's Services are reachable only through the proxy.
    pub const INTERNAL: &str = "Internal";
    /// `CertificatesVerifiable` True / False.
    pub const NOT_NEEDED: &str = "NotNeeded";
    pub const CLIENT_CA_CONFIGURED: &str = "ClientCAConfigured";
    pub const CLIENT_CA_MISSING: &str = "ClientCAMissing";
    /// `GlobalLimits` True: the plan counts nothing across replicas.
    pub const LOCAL: &str = "Local";
    pub const STORE_REACHABLE: &str = "StoreReachable";
    pub const STORE_NOT_CONFIGURED: &str = "StoreNotConfigured";
    pub const STORE_UNREACHABLE: &str = "StoreUnreachable";
    pub const STORE_AUTH_FAILED: &str = "StoreAuthFailed";
    pub const STORE_INVALID: &str = "StoreInvalid";
    /// `SpecHonoured` True / False.
    pub const HONOURED: &str = "Honoured";
    pub const INEFFECTIVE_FIELD: &str = "IneffectiveField";
}

/// The `KeysResolved` reason a key problem reports.
pub fn key_problem_reason(p: &KeyProblem) -> &'static str {
    match p {
        KeyProblem::NameMissing { .. } => reason::KEY_NAME_MISSING,
        KeyProblem::SecretNotFound { .. } => reason::SECRET_NOT_FOUND,
        KeyProblem::SecretKeyMissing { .. } | KeyProblem::EmptyKey { .. } => reason::SECRET_KEY_MISSING,
        KeyProblem::NotOptedIn { .. } => reason::SECRET_NOT_OPTED_IN,
        KeyProblem::OwnedByAnotherClient { .. } => reason::SECRET_OWNED_BY_ANOTHER_CLIENT,
        KeyProblem::SecretConflict { .. } => reason::SECRET_CONFLICT,
        KeyProblem::CreateFailed { .. } => reason::SECRET_CREATE_FAILED,
    }
}

/// A condition before timestamps: what the reconciler decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, ok, reason, message: message.into() }
    }
}

/// Facts about one ApiClient, gathered by the reconciler.
#[derive(Debug, Clone, Default)]
pub struct ClientFacts {
    pub key_problems: Vec<KeyProblem>,
    /// Resolved keys, and how many of them are not expired.
    pub resolved_keys: usize,
    pub live_keys: usize,
    /// Entries of `spec.certificates`: a client identified by certificate needs no key.
    pub certificates: usize,
    /// Keys dropped because another client uses the same key (fingerprints).
    pub duplicate_keys: Vec<String>,
    pub missing_plans: Vec<String>,
    pub invalid_ranges: Vec<String>,
    /// Services the client's (existing) plans grant.
    pub services: Vec<String>,
    /// Of those, the ones whose current table does not contain this client's current generation.
    pub unprogrammed: Vec<String>,
    /// Tables this client was left out of because it cannot be rendered: "service: reason".
    pub render_failed: Vec<String>,
    /// `spec.requireCertificate: true`.
    pub require_certificate: bool,
    /// Of `services`, the ones whose sidecars verify no client certificate (no `--client-ca`; for a Service
    /// without sidecars yet: the chart-wide default gives none).
    pub services_without_client_ca: Vec<String>,
    /// Some of those have running sidecars without `--client-ca` (not only the default): requests are refused now.
    pub client_ca_missing_on_sidecars: bool,
}

pub fn client_conditions(f: &ClientFacts) -> Vec<Cond> {
    use types::*;
    let keys = if let Some(p) = f.key_problems.first() {
        let msg = f.key_problems.iter().map(KeyProblem::message).collect::<Vec<_>>().join("; ");
        Cond::new(KEYS_RESOLVED, false, key_problem_reason(p), msg)
    } else if !f.duplicate_keys.is_empty() {
        Cond::new(
            KEYS_RESOLVED,
            false,
            reason::DUPLICATE_KEY,
            format!(
                "key(s) {} are also claimed by an older ApiClient in the same table, which keeps them; refused for \
                 this ApiClient (give it its own key)",
                f.duplicate_keys.join(", ")
            ),
        )
    } else if f.resolved_keys == 0 && f.certificates > 0 {
        Cond::new(
            KEYS_RESOLVED,
            true,
            reason::RESOLVED,
            format!("no keys; identified by {} certificate identity(ies)", f.certificates),
        )
    } else if f.live_keys == 0 {
        Cond::new(KEYS_RESOLVED, false, reason::KEY_EXPIRED, format!("all {} keys have expired", f.resolved_keys))
    } else {
        Cond::new(KEYS_RESOLVED, true, reason::RESOLVED, format!("{} key(s) resolved", f.resolved_keys))
    };
    let plans = if f.missing_plans.is_empty() {
        Cond::new(PLAN_RESOLVED, true, reason::RESOLVED, "all UsagePlans found")
    } else {
        let names = f.missing_plans.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ");
        Cond::new(PLAN_RESOLVED, false, reason::PLAN_NOT_FOUND, format!("spec.usagePlans: UsagePlan {names} not found"))
    };
    let ranges = if f.invalid_ranges.is_empty() {
        Cond::new(SOURCE_RANGES_VALID, true, reason::VALID, "all source ranges are valid CIDRs")
    } else {
        Cond::new(
            SOURCE_RANGES_VALID,
            false,
            reason::INVALID_SOURCE_RANGE,
            format!("spec.sourceRanges: {:?} are not CIDRs and are ignored", f.invalid_ranges),
        )
    };
    let programmed = if f.services.is_empty() {
        Cond::new(PROGRAMMED, false, reason::NO_SERVICES, "no UsagePlan of this client grants a Service")
    } else if !f.render_failed.is_empty() {
        Cond::new(
            PROGRAMMED,
            false,
            reason::RENDER_FAILED,
            format!("left out of the table of Service(s) {}", f.render_failed.join("; ")),
        )
    } else if !f.unprogrammed.is_empty() {
        Cond::new(
            PROGRAMMED,
            false,
            reason::PENDING,
            format!("waiting for the table of Service(s) {}", f.unprogrammed.join(", ")),
        )
    } else {
        Cond::new(
            PROGRAMMED,
            true,
            reason::PROGRAMMED,
            format!("in the tables of Service(s) {}", f.services.join(", ")),
        )
    };
    let certs = certificates_verifiable(f);
    // Part of `Ready` when sidecars without a client CA exist and certificates are the only way in (required, or the
    // client's sole identity): then the client's requests there are refused. Otherwise informational (its keys
    // still work, or no sidecar runs yet and only the chart-wide default was judged).
    let blocking = !certs.ok && f.client_ca_missing_on_sidecars && (f.require_certificate || f.resolved_keys == 0);
    let mut out = vec![keys, plans, ranges, programmed];
    if blocking {
        out.push(certs);
        out.push(ready(&out));
    } else {
        out.push(ready(&out));
        out.push(certs);
    }
    out
}

/// `CertificatesVerifiable`: a client identified or required to present a certificate needs sidecars that verify
/// one (`--client-ca`); the proxy refuses its requests (403) otherwise.
fn certificates_verifiable(f: &ClientFacts) -> Cond {
    use types::CERTIFICATES_VERIFIABLE as T;
    if f.certificates == 0 && !f.require_certificate {
        return Cond::new(T, true, reason::NOT_NEEDED, "the client uses no certificate");
    }
    if f.services_without_client_ca.is_empty() {
        return Cond::new(T, true, reason::CLIENT_CA_CONFIGURED, "every Service's sidecars verify client certificates");
    }
    let field = if f.require_certificate { "spec.requireCertificate" } else { "spec.certificates" };
    Cond::new(
        T,
        false,
        reason::CLIENT_CA_MISSING,
        format!(
            "{field} needs client certificates verified, but the sidecars of Service(s) {} have no client CA, so \
             the proxy refuses this client's certificate requests (403); annotate their pods with \
             {} (and {}) or set the chart-wide sidecar client CA ({})",
            f.services_without_client_ca.join(", "),
            crate::sidecar_contract::ANNOTATION_CLIENT_CA_SECRET,
            crate::sidecar_contract::ANNOTATION_TLS_SECRET,
            crate::sidecar_contract::default_flag::CLIENT_CA_SECRET,
        ),
    )
}

/// Facts about one UsagePlan.
#[derive(Debug, Clone, Default)]
pub struct PlanFacts {
    pub spec_error: Option<String>,
    pub services: Vec<String>,
    pub unprogrammed: Vec<String>,
    /// Tables that could not be rendered or written: (service, error).
    pub render_errors: Vec<(String, String)>,
    /// Bypass-guard findings per Service (see [`crate::exposure`]).
    pub exposure: Vec<(String, Vec<Finding>)>,
    /// What the plan counts in the shared store, what proxies do when they cannot, and the store's state.
    pub store_use: StoreUse,
    pub fallback: StoreFallback,
    pub store: StoreHealth,
    /// Fields set but changing nothing: `(field, why)` ([`crate::model::ineffective_fields`]).
    pub ineffective: Vec<(&'static str, &'static str)>,
}

pub fn plan_conditions(f: &PlanFacts) -> Vec<Cond> {
    use types::*;
    let programmed = if let Some(e) = &f.spec_error {
        Cond::new(PROGRAMMED, false, reason::INVALID_SPEC, e.clone())
    } else if let Some((svc, e)) = f.render_errors.first() {
        Cond::new(PROGRAMMED, false, reason::RENDER_FAILED, format!("table of Service {svc}: {e}"))
    } else if !f.unprogrammed.is_empty() {
        Cond::new(
            PROGRAMMED,
            false,
            reason::PENDING,
            format!("waiting for the table of Service(s) {}", f.unprogrammed.join(", ")),
        )
    } else {
        Cond::new(
            PROGRAMMED,
            true,
            reason::PROGRAMMED,
            format!("tables written for Service(s) {}", f.services.join(", ")),
        )
    };
    let global = global_limits_condition(f.store_use, f.fallback, &f.store);
    let mut out = vec![programmed, global];
    out.push(ready(&out));
    // After `Ready`: exposure is a warning for the platform team, the plan works either way.
    let protected = exposure_condition(&f.exposure);
    let deprecated = Cond { type_: types::EXPOSURE, ..protected.clone() };
    out.push(protected);
    out.push(deprecated);
    out.push(spec_honoured(&f.ineffective));
    out
}

/// `SpecHonoured`: False with every field that is set but changes nothing.
pub fn spec_honoured(ineffective: &[(&'static str, &'static str)]) -> Cond {
    if ineffective.is_empty() {
        return Cond::new(types::SPEC_HONOURED, true, reason::HONOURED, "every field set is in effect");
    }
    let msg = ineffective.iter().map(|(f, why)| format!("{f} has no effect: {why}")).collect::<Vec<_>>().join("; ");
    Cond::new(types::SPEC_HONOURED, false, reason::INEFFECTIVE_FIELD, msg)
}

/// The `Protected` condition of a plan from its Services' findings (`(service, findings)`): True without findings,
/// else the first finding's reason and every finding's message.
pub fn exposure_condition(services: &[(String, Vec<Finding>)]) -> Cond {
    let findings: Vec<&Finding> = services.iter().flat_map(|(_, f)| f).collect();
    match findings.first() {
        None => {
            let names: Vec<&str> = services.iter().map(|(s, _)| s.as_str()).collect();
            // True only after both checks: the Service and the pods' NetworkPolicy isolation. What a policy cannot
            // promise (a network plugin that ignores NetworkPolicy) is said, not implied.
            Cond::new(
                types::PROTECTED,
                true,
                reason::INTERNAL,
                format!(
                    "Service(s) {} are internal and target only the proxy, and a NetworkPolicy admits ingress to their \
                     pods only on the sidecar's ports: reachable only through the proxy where the network plugin \
                     enforces NetworkPolicy, and no node SNAT hides the clients' addresses",
                    names.join(", ")
                ),
            )
        }
        Some(first) => Cond::new(
            types::PROTECTED,
            false,
            first.reason,
            findings.iter().map(|f| f.message.as_str()).collect::<Vec<_>>().join("; "),
        ),
    }
}

/// `Ready`: True when every other condition is True; otherwise the first failing one's reason and message.
fn ready(others: &[Cond]) -> Cond {
    match others.iter().find(|c| !c.ok) {
        None => Cond::new(types::READY, true, reason::READY, "ready"),
        Some(c) => Cond::new(types::READY, false, c.reason, format!("{}: {}", c.type_, c.message)),
    }
}

/// Merges decided conditions into the existing list: `lastTransitionTime` only moves when the status changes.
pub fn merge(existing: &[Condition], new: &[Cond], generation: Option<i64>, now: jiff::Timestamp) -> Vec<Condition> {
    new.iter()
        .map(|c| {
            let status = if c.ok { "True" } else { "False" };
            let prev = existing.iter().find(|e| e.type_ == c.type_);
            let last_transition_time = match prev {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => Time(now),
            };
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.to_string(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Conditions whose status or reason changed (for Events): `(new condition, was it a status change)`.
pub fn transitions<'a>(old: &[Condition], new: &'a [Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|n| {
            old.iter().find(|o| o.type_ == n.type_).is_none_or(|o| o.status != n.status || o.reason != n.reason)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(cs: &'a [Cond], t: &str) -> &'a Cond {
        cs.iter().find(|c| c.type_ == t).unwrap()
    }

    fn good() -> ClientFacts {
        ClientFacts { resolved_keys: 1, live_keys: 1, services: vec!["orders".into()], ..Default::default() }
    }

    #[test]
    fn all_good_is_ready() {
        let cs = client_conditions(&good());
        assert!(cs.iter().all(|c| c.ok), "{cs:?}");
        assert_eq!(get(&cs, "Ready").reason, "Ready");
    }

    #[test]
    fn certificates_need_a_client_ca_and_block_ready_only_when_they_are_the_only_way_in() {
        assert_eq!(get(&client_conditions(&good()), "CertificatesVerifiable").reason, "NotNeeded");
        // Certificates next to a key, sidecars without a CA: said, informational.
        let mut f = good();
        f.certificates = 1;
        f.services_without_client_ca = vec!["orders".into()];
        f.client_ca_missing_on_sidecars = true;
        let cs = client_conditions(&f);
        let c = get(&cs, "CertificatesVerifiable");
        assert_eq!((c.ok, c.reason), (false, "ClientCAMissing"));
        assert!(c.message.contains("spec.certificates") && c.message.contains("orders"), "{}", c.message);
        assert!(get(&cs, "Ready").ok, "the key still works");
        // Required certificate: every request is refused there, so not Ready.
        f.require_certificate = true;
        let cs = client_conditions(&f);
        assert_eq!((get(&cs, "Ready").ok, get(&cs, "Ready").reason), (false, "ClientCAMissing"));
        assert!(get(&cs, "CertificatesVerifiable").message.starts_with("spec.requireCertificate"));
        // Only the chart-wide default judged (no sidecar yet): informational.
        f.client_ca_missing_on_sidecars = false;
        assert!(get(&client_conditions(&f), "Ready").ok);
        // Certificate-only client with CA-less sidecars: not Ready.
        let f = ClientFacts {
            certificates: 1,
            services: vec!["orders".into()],
            services_without_client_ca: vec!["orders".into()],
            client_ca_missing_on_sidecars: true,
            ..Default::default()
        };
        assert_eq!(get(&client_conditions(&f), "Ready").reason, "ClientCAMissing");
        let ok = ClientFacts { services_without_client_ca: vec![], ..f };
        let cs = client_conditions(&ok);
        assert_eq!(get(&cs, "CertificatesVerifiable").reason, "ClientCAConfigured");
        assert!(get(&cs, "Ready").ok);
    }

    #[test]
    fn missing_secret_names_secret_and_blocks_ready() {
        let mut f = good();
        let at = crate::keys::KeyAt { index: 0, name: None };
        f.key_problems.push(KeyProblem::SecretNotFound { at, secret: "k1".into() });
        let cs = client_conditions(&f);
        let k = get(&cs, "KeysResolved");
        assert!(!k.ok);
        assert_eq!(k.reason, "SecretNotFound");
        assert!(k.message.contains("\"k1\""));
        let r = get(&cs, "Ready");
        assert!(!r.ok);
        assert_eq!(r.reason, "SecretNotFound");
    }

    #[test]
    fn expired_missing_plan_invalid_range_pending() {
        let mut f = good();
        f.live_keys = 0;
        let mut by_cert = f.clone();
        by_cert.resolved_keys = 0;
        by_cert.certificates = 1;
        assert!(get(&client_conditions(&by_cert), "KeysResolved").ok, "certificates stand in for keys");
        f.missing_plans = vec!["gold".into()];
        f.invalid_ranges = vec!["10.0.0.0/33".into()];
        f.unprogrammed = vec!["orders".into()];
        let cs = client_conditions(&f);
        assert_eq!(get(&cs, "KeysResolved").reason, "KeyExpired");
        assert_eq!(get(&cs, "PlanResolved").reason, "PlanNotFound");
        assert!(get(&cs, "PlanResolved").message.contains("\"gold\""));
        assert_eq!(get(&cs, "SourceRangesValid").reason, "InvalidSourceRange");
        assert_eq!(get(&cs, "Programmed").reason, "Pending");
        assert_eq!(get(&cs, "Ready").reason, "KeyExpired");
    }

    #[test]
    fn plan_conditions_follow_programming() {
        let mut f = PlanFacts { services: vec!["orders".into()], ..Default::default() };
        assert!(plan_conditions(&f).iter().all(|c| c.ok));
        f.unprogrammed = vec!["orders".into()];
        let cs = plan_conditions(&f);
        assert_eq!(get(&cs, "Ready").reason, "Pending");
        f.render_errors = vec![("orders".into(), "would need 70 shards".into())];
        let cs = plan_conditions(&f);
        assert_eq!(get(&cs, "Programmed").reason, "RenderFailed");
        assert!(get(&cs, "Ready").message.contains("orders"));
    }

    #[test]
    fn global_limits_is_part_of_ready_and_ineffective_fields_are_reported() {
        let mut f = PlanFacts { services: vec!["orders".into()], ..Default::default() };
        let cs = plan_conditions(&f);
        assert_eq!((get(&cs, "GlobalLimits").ok, get(&cs, "GlobalLimits").reason), (true, "Local"));
        assert_eq!(get(&cs, "SpecHonoured").reason, "Honoured");
        f.store_use.quota = true;
        let cs = plan_conditions(&f);
        assert_eq!(get(&cs, "GlobalLimits").reason, "StoreNotConfigured");
        assert_eq!((get(&cs, "Ready").ok, get(&cs, "Ready").reason), (false, "StoreNotConfigured"));
        f.store = StoreHealth::Reachable;
        assert!(get(&plan_conditions(&f), "Ready").ok);
        f.ineffective = vec![("spec.globalLimits", "the plan has no throttle to count across replicas")];
        let cs = plan_conditions(&f);
        let h = get(&cs, "SpecHonoured");
        assert_eq!((h.ok, h.reason), (false, "IneffectiveField"));
        assert!(h.message.starts_with("spec.globalLimits has no effect"), "{}", h.message);
        assert!(get(&cs, "Ready").ok, "informational");
    }

    #[test]
    fn exposure_does_not_affect_ready() {
        let f = PlanFacts {
            services: vec!["orders".into()],
            exposure: vec![("orders".into(), crate::exposure::check_service("orders", None, 8443))],
            ..Default::default()
        };
        let cs = plan_conditions(&f);
        assert_eq!(get(&cs, "Protected").reason, "ServiceNotFound");
        assert_eq!(get(&cs, "Exposure"), &Cond { type_: "Exposure", ..get(&cs, "Protected").clone() }, "kept alike");
        assert!(get(&cs, "Ready").ok);
    }

    #[test]
    fn merge_keeps_transition_time_unless_status_changes() {
        let t0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: jiff::Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
        let first = merge(&[], &client_conditions(&good()), Some(1), t0);
        let same = merge(&first, &client_conditions(&good()), Some(2), t1);
        assert!(same.iter().all(|c| c.last_transition_time.0 == t0));
        assert!(same.iter().all(|c| c.observed_generation == Some(2)));
        assert!(transitions(&first, &same).is_empty());
        let mut f = good();
        f.missing_plans = vec!["x".into()];
        let changed = merge(&same, &client_conditions(&f), Some(3), t1);
        let pr = changed.iter().find(|c| c.type_ == "PlanResolved").unwrap();
        assert_eq!(pr.last_transition_time.0, t1);
        let tr: Vec<&str> = transitions(&same, &changed).iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(tr, ["PlanResolved", "Ready"]);
    }
}
