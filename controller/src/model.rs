//! Pure translation of UsagePlans and ApiClients (plus resolved key digests, see [`crate::keys`]) into one
//! Service's [`Table`]. No I/O: everything here is unit-tested.

use crate::crd::{
    ApiClient, CertificateSpec, QuotaPeriod, QuotaScopeSpec, StoreFallbackSpec, UsagePlan, UsagePlanSpec,
};
use ipnet::IpNet;
use kube::ResourceExt;
use portcullis_table::{
    CertIdentity, Client, KeyDigest, KeyEntry, Period, Plan, Quota, QuotaScope, RouteScope, StoreFallback, Table,
    Throttle,
};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("UsagePlan {plan}: spec.throttle.per {value:?} is not a duration like 500ms, 1s, 1m or 1h")]
    Per { plan: String, value: String },
}

/// `500ms`, `1s`, `2m`, `1h` → milliseconds.
pub fn parse_per(s: &str) -> Option<u64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        return None;
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    (n > 0).then(|| n.checked_mul(mult)).flatten()
}

/// The table's quota period of a spec period.
pub fn period(p: QuotaPeriod) -> Period {
    match p {
        QuotaPeriod::Day => Period::Day,
        QuotaPeriod::Week => Period::Week,
        QuotaPeriod::Month => Period::Month,
    }
}

/// Where a plan's quota is counted: as the spec says, else `Global` when the controller has a store configured
/// (`store`) and `Local` otherwise (so installs without a store keep per-replica quotas and Ready plans).
pub fn quota_scope(spec: &UsagePlanSpec, store: bool) -> QuotaScope {
    match spec.quota_scope {
        Some(QuotaScopeSpec::Global) => QuotaScope::Global,
        Some(QuotaScopeSpec::Local) => QuotaScope::Local,
        None if store => QuotaScope::Global,
        None => QuotaScope::Local,
    }
}

/// The plan's `onStoreUnavailable` (default `Local`).
pub fn store_fallback(spec: &UsagePlanSpec) -> StoreFallback {
    match spec.on_store_unavailable {
        None | Some(StoreFallbackSpec::Local) => StoreFallback::Local,
        Some(StoreFallbackSpec::FailOpen) => StoreFallback::FailOpen,
        Some(StoreFallbackSpec::FailClosed) => StoreFallback::FailClosed,
    }
}

/// What a plan counts in the shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreUse {
    /// A throttle with `globalLimits: true`.
    pub throttle: bool,
    /// A quota whose scope is `Global`.
    pub quota: bool,
}

impl StoreUse {
    pub fn any(self) -> bool {
        self.throttle || self.quota
    }
}

/// What `spec` counts in the shared store, `store` saying whether the controller has one configured.
pub fn store_use(spec: &UsagePlanSpec, store: bool) -> StoreUse {
    StoreUse {
        throttle: spec.throttle.is_some() && spec.global_limits == Some(true),
        quota: spec.quota.is_some() && quota_scope(spec, store) == QuotaScope::Global,
    }
}

/// Fields of `spec` that are set but change nothing (so they are reported, never silently ignored): `(field, why)`.
pub fn ineffective_fields(spec: &UsagePlanSpec, store: bool) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if spec.global_limits == Some(true) && spec.throttle.is_none() {
        out.push(("spec.globalLimits", "the plan has no throttle to count across replicas"));
    }
    if spec.quota_scope.is_some() && spec.quota.is_none() {
        out.push(("spec.quotaScope", "the plan has no quota"));
    }
    if spec.on_store_unavailable.is_some() && !store_use(spec, store).any() {
        out.push(("spec.onStoreUnavailable", "the plan counts nothing in the shared store"));
    }
    out
}

/// What plan `name` grants on the Service named in `routes`' grant; `store`: whether the controller has a shared
/// store configured (decides an unset `quotaScope`, see [`quota_scope`]).
pub fn plan_entry(name: &str, spec: &UsagePlanSpec, service: &str, store: bool) -> Result<Plan, SpecError> {
    let throttle = match &spec.throttle {
        None => None,
        Some(t) => {
            let per_millis =
                parse_per(&t.per).ok_or_else(|| SpecError::Per { plan: name.into(), value: t.per.clone() })?;
            Some(Throttle { rate: t.rate, per_millis, burst: t.burst.unwrap_or(t.rate) })
        }
    };
    let quota = spec.quota.as_ref().map(|q| Quota { limit: q.limit, period: period(q.period) });
    let routes = spec
        .services
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.routes.as_ref())
        .map(|rs| {
            rs.iter()
                .map(|r| RouteScope {
                    path_prefix: r.path_prefix.clone(),
                    methods: r.methods.clone().unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Plan {
        throttle,
        quota,
        global_limits: spec.global_limits.unwrap_or(false),
        quota_scope: quota_scope(spec, store),
        on_store_unavailable: store_fallback(spec),
        routes,
    })
}

/// Whether `plan` grants `service`.
pub fn grants(plan: &UsagePlan, service: &str) -> bool {
    plan.spec.services.iter().any(|s| s.name == service)
}

/// Parsed source ranges and the entries that are not CIDRs (schema should have refused them).
pub fn parse_source_ranges(ranges: &[String]) -> (Vec<IpNet>, Vec<String>) {
    let mut nets = Vec::with_capacity(ranges.len());
    let mut bad = Vec::new();
    for r in ranges {
        match r.trim().parse::<IpNet>() {
            Ok(n) => nets.push(n.trunc()),
            Err(_) => bad.push(r.clone()),
        }
    }
    nets.sort();
    nets.dedup();
    (nets, bad)
}

/// A `spec.certificates` entry as a table identity (canonical form); `None` when it sets no field (the schema's
/// exactly-one rule refuses that) and the first set field when it sets several.
pub fn cert_identity(spec: &CertificateSpec) -> Option<CertIdentity> {
    let id = if let Some(v) = &spec.subject {
        CertIdentity::Subject(v.clone())
    } else if let Some(v) = &spec.san_dns {
        CertIdentity::SanDns(v.clone())
    } else if let Some(v) = &spec.san_uri {
        CertIdentity::SanUri(v.clone())
    } else {
        CertIdentity::Sha256(spec.sha256.clone()?)
    };
    let id = id.normalized();
    // An identity that can never match (schema should have refused it) is left out rather than failing the table.
    id.problem().is_none().then_some(id)
}

/// A built table plus what the status writers need to know about it.
#[derive(Debug, Clone)]
pub struct BuiltTable {
    pub table: Table,
    /// The JSON of each client of `table`, in its order ([`Table::client_json`]).
    pub client_json: Vec<Arc<str>>,
    /// Granting plans: name → (uid, generation).
    pub plans: BTreeMap<String, (String, i64)>,
    /// The ApiClient generation of each client of `table`, in its order.
    pub generations: Vec<i64>,
    /// Keys left out because an older client (creationTimestamp, then name) in the table already uses the same key:
    /// (client, fingerprint).
    pub duplicate_keys: Vec<(String, String)>,
    /// Certificate identities left out because an older client already names them: (client, identity).
    pub duplicate_certificates: Vec<(String, String)>,
}

/// The first 16 bytes of `name`, zero-padded, as a big-endian integer: prefixes order as the names do, and differ
/// wherever the names differ within their first 16 bytes.
fn name_prefix(name: &str) -> u128 {
    let mut b = [0u8; 16];
    let n = name.len().min(16);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    u128::from_be_bytes(b)
}

/// A client a build selected, with what the build reads of it when it reuses its previous entry.
struct Selected<'a, A> {
    name: &'a str,
    a: &'a A,
    generation: i64,
    certificates: bool,
}

/// Which of two clients claiming the same key keeps it: the older by creationTimestamp, then by name (a client
/// without a timestamp, which the API server always sets, counts as newest).
fn seniority(c: &ApiClient) -> (bool, Option<jiff::Timestamp>, &str) {
    let created = c.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (created.is_none(), created, c.metadata.name.as_deref().unwrap_or_default())
}

/// Builds the table of Service `service` in `namespace` from the namespace's plans and clients, for a controller
/// without a shared store (see [`build_table_with_store`]).
pub fn build_table<'a>(
    namespace: &str,
    service: &str,
    plans: impl IntoIterator<Item = &'a UsagePlan>,
    clients: impl IntoIterator<Item = &'a ApiClient>,
    keys: impl Fn(&ApiClient) -> Vec<KeyEntry>,
) -> BuiltTable {
    build_table_with_store(namespace, service, plans, clients, keys, false)
}

/// Builds the table of Service `service` in `namespace` from the namespace's plans and clients. `keys` gives the
/// resolved keys of a client by name (clients without an entry get no keys); `store`: whether the controller has a
/// shared store configured (the default quota scope).
pub fn build_table_with_store<'a>(
    namespace: &str,
    service: &str,
    plans: impl IntoIterator<Item = &'a UsagePlan>,
    clients: impl IntoIterator<Item = &'a ApiClient>,
    keys: impl Fn(&ApiClient) -> Vec<KeyEntry>,
    store: bool,
) -> BuiltTable {
    build_table_reusing(namespace, service, plans, clients, None, keys, |_| None, store).0
}

/// What a builder knows of one client when it builds a table: its resolved keys and, for a builder that keeps
/// earlier builds (see [`crate::memo`]), the table entry and JSON built last time from the very same inputs.
pub trait ResolvedClient {
    /// The client's resolved keys, before keys claimed by an older client are left out.
    fn keys(&self) -> &[KeyEntry];
    /// The entry and its JSON built last time from the *same* ApiClient object and Secrets. The build reuses it
    /// only when the same plans grant the Service and it keeps the same keys and certificates (which depend on
    /// other clients); everything else in an entry is a function of the ApiClient and the granting plans' names.
    fn previous(&self) -> Option<(&Arc<Client>, &Arc<str>)> {
        None
    }
}

impl ResolvedClient for Vec<KeyEntry> {
    fn keys(&self) -> &[KeyEntry] {
        self
    }
}

/// [`build_table_with_store`] for a builder that keeps what it can between builds (see [`crate::memo`]): `keys`
/// resolves a client (given back per table client, in table order), `previous_plans` are the plans of the table
/// the resolved clients' [`ResolvedClient::previous`] entries come from, `json_of` the JSON of a client rendered
/// before, if known (else it is serialised here). `keys` is called once per table client in id (table) order,
/// `json_of` for each client not reused, in id order.
#[allow(clippy::too_many_arguments)]
pub fn build_table_reusing<'a, A: Borrow<ApiClient> + 'a, X: ResolvedClient>(
    namespace: &str,
    service: &str,
    plans: impl IntoIterator<Item = &'a UsagePlan>,
    clients: impl IntoIterator<Item = &'a A>,
    previous_plans: Option<&BTreeMap<String, Plan>>,
    keys: impl Fn(&'a A) -> X,
    json_of: impl Fn(&Client) -> Option<Arc<str>>,
    store: bool,
) -> (BuiltTable, Vec<X>) {
    let mut plan_map = BTreeMap::new();
    let mut plan_meta = BTreeMap::new();
    for p in plans {
        if !grants(p, service) {
            continue;
        }
        let name = p.name_any();
        // An invalid spec (schema should refuse it) grants nothing rather than something unintended.
        if let Ok(entry) = plan_entry(&name, &p.spec, service, store) {
            plan_meta.insert(name.clone(), (p.uid().unwrap_or_default(), p.metadata.generation.unwrap_or(0)));
            plan_map.insert(name, entry);
        }
    }
    // Entries of an earlier build are reused only while the same plans grant the Service (their names decide each
    // client's `plans`; what they grant is in the table's plans, not in its clients).
    let reuse = previous_plans.is_some_and(|p| p.keys().eq(plan_map.keys()));
    let clients = clients.into_iter();
    // Each selected client with the first 16 bytes of its name as one integer: sorting 100 000 names scattered over
    // the heap by comparing the strings themselves was a sixth of a one-client change. What the rest of the build
    // reads of a client that is reused whole (its generation, whether it has certificates) is taken here too: at
    // 100 000 clients every object lies on its own page, and each later visit was a cache and TLB miss (a third of
    // a one-client change in the running controller).
    let mut selected: Vec<(u128, Selected<'a, A>)> = Vec::with_capacity(clients.size_hint().1.unwrap_or(0));
    if !plan_map.is_empty() {
        for a in clients {
            let c: &'a ApiClient = a.borrow();
            if c.spec.usage_plans.iter().any(|p| plan_map.contains_key(p.as_str())) {
                let name = c.metadata.name.as_deref().unwrap_or_default();
                let generation = c.metadata.generation.unwrap_or(0);
                let certificates = !c.spec.certificates.is_empty();
                selected.push((name_prefix(name), Selected { name, a, generation, certificates }));
            }
        }
    }
    // Every id is `namespace/name` with the same namespace: name order is id order. The prefixes order as the names
    // do (zero-padded, big-endian); only equal prefixes compare the names.
    selected.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(b.1.name)));
    let selected: Vec<Selected<'a, A>> = selected.into_iter().map(|(_, s)| s).collect();
    let senior = |i: usize| seniority(selected[i].a.borrow());
    // Keys are resolved in id order (a builder reusing an earlier build looks them up in that order).
    let resolved: Vec<X> = selected.iter().map(|s| keys(s.a)).collect();
    // Which resolved keys each client keeps, flat: client i's flags are `kept[offsets[i]..offsets[i + 1]]`.
    let mut offsets = Vec::with_capacity(selected.len() + 1);
    offsets.push(0);
    for x in &resolved {
        offsets.push(offsets[offsets.len() - 1] + x.keys().len());
    }
    let mut kept = vec![true; offsets[selected.len()]];
    // Every claim of a key as (first 8 bytes of its digest, client, position in the client's keys), sorted: claims
    // of one key are adjacent (a hash map of 100 000 digests, probed twice per key, cost twice as much).
    let mut claims: Vec<(u64, u32, u32)> = Vec::with_capacity(kept.len());
    for (i, x) in resolved.iter().enumerate() {
        for (r, entry) in x.keys().iter().enumerate() {
            let head = u64::from_be_bytes(entry.sha256.0[..8].try_into().expect("8 bytes"));
            claims.push((head, i as u32, r as u32));
        }
    }
    claims.sort_unstable();
    let digest_of = |&(_, i, r): &(u64, u32, u32)| resolved[i as usize].keys()[r as usize].sha256;
    // (client, position, fingerprint) of each key left out, reported in order of the clients' seniority.
    let mut lost: Vec<(usize, usize, String)> = Vec::new();
    let mut run: Vec<(KeyDigest, u32, u32)> = Vec::new();
    for same_head in claims.chunk_by(|a, b| a.0 == b.0).filter(|c| c.len() > 1) {
        // Several claims share the first 8 bytes: group them by the whole digest (in client, position order).
        run.clear();
        run.extend(same_head.iter().map(|c| (digest_of(c), c.1, c.2)));
        run.sort_unstable();
        for key in run.chunk_by(|a, b| a.0 == b.0).filter(|k| k.len() > 1) {
            let owner = key.iter().map(|k| k.1 as usize).min_by(|&a, &b| senior(a).cmp(&senior(b))).expect("a claim");
            let mut first = true;
            for &(digest, i, r) in key {
                let (i, r) = (i as usize, r as usize);
                if i != owner {
                    kept[offsets[i] + r] = false;
                    lost.push((i, r, portcullis_table::fingerprint(&digest)));
                } else if first {
                    first = false;
                } else {
                    kept[offsets[i] + r] = false; // the same key twice in one client: kept once
                }
            }
        }
    }
    lost.sort_by(|a, b| senior(a.0).cmp(&senior(b.0)).then(a.1.cmp(&b.1)));
    let duplicate_keys: Vec<(String, String)> =
        lost.into_iter().map(|(i, _, fp)| (selected[i].name.to_string(), fp)).collect();
    // Certificates (few clients have them): in order of seniority.
    let mut kept_certs: Vec<Vec<CertIdentity>> = (0..selected.len()).map(|_| Vec::new()).collect();
    let mut with_certs: Vec<usize> = (0..selected.len()).filter(|&i| selected[i].certificates).collect();
    with_certs.sort_by(|&a, &b| senior(a).cmp(&senior(b)));
    let mut used_certs: HashSet<CertIdentity> = HashSet::new();
    let mut duplicate_certificates = Vec::new();
    for i in with_certs {
        let c: &ApiClient = selected[i].a.borrow();
        for id in c.spec.certificates.iter().filter_map(cert_identity) {
            if kept_certs[i].contains(&id) {
                continue;
            }
            if used_certs.insert(id.clone()) {
                kept_certs[i].push(id);
            } else {
                duplicate_certificates.push((c.name_any(), id.to_string()));
            }
        }
    }
    let mut generations = Vec::with_capacity(selected.len());
    let mut out: Vec<Arc<Client>> = Vec::with_capacity(selected.len());
    let mut json = Vec::with_capacity(selected.len());
    let mut keys_kept: Vec<KeyEntry> = Vec::new();
    for (i, (Selected { name, a, generation, .. }, certificates)) in selected.into_iter().zip(kept_certs).enumerate() {
        generations.push(generation);
        let x = &resolved[i];
        keys_kept.clear();
        keys_kept.extend(
            x.keys().iter().zip(&kept[offsets[i]..offsets[i + 1]]).filter(|(_, k)| **k).map(|(e, _)| e.clone()),
        );
        // By digest, not spec order: reordering `spec.keys` leaves the table (and its revision) unchanged.
        keys_kept.sort_unstable_by_key(|k| k.sha256);
        let same = x.previous().filter(|(p, _)| reuse && p.keys == keys_kept && p.certificates == certificates);
        if let Some((client, client_json)) = same {
            out.push(client.clone());
            json.push(client_json.clone());
            continue;
        }
        let c: &ApiClient = a.borrow();
        let mut granted: Vec<String> = Vec::new();
        for p in &c.spec.usage_plans {
            if plan_map.contains_key(p.as_str()) && !granted.contains(p) {
                granted.push(p.clone());
            }
        }
        let (source_ranges, _) = parse_source_ranges(&c.spec.source_ranges);
        let client = Client {
            id: format!("{namespace}/{name}"),
            keys: keys_kept.clone(),
            source_ranges,
            disabled: c.spec.disabled.unwrap_or(false),
            plans: granted,
            certificates,
            require_certificate: c.spec.require_certificate.unwrap_or(false),
        };
        json.push(json_of(&client).unwrap_or_else(|| Arc::from(Table::client_json(&client))));
        out.push(Arc::new(client));
    }
    let table = Table::from_serialised_clients(format!("{namespace}/{service}"), plan_map, out, &json);
    let built =
        BuiltTable { table, client_json: json, plans: plan_meta, generations, duplicate_keys, duplicate_certificates };
    (built, resolved)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portcullis_table::key_digest;
    use std::collections::HashMap;

    pub fn plan(name: &str, services: &[&str], rate: Option<u32>) -> UsagePlan {
        let mut p = UsagePlan::new(
            name,
            UsagePlanSpec {
                services: services.iter().map(|s| ServiceGrant { name: s.to_string(), routes: None }).collect(),
                throttle: rate.map(|rate| ThrottleSpec { rate, per: "1m".into(), burst: None }),
                quota: Some(QuotaSpec { limit: 1000, period: QuotaPeriod::Day }),
                global_limits: None,
                quota_scope: None,
                on_store_unavailable: None,
                network_policy: None,
            },
        );
        p.metadata.namespace = Some("ns".into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.generation = Some(1);
        p
    }

    pub fn client(name: &str, plans: &[&str], ranges: &[&str]) -> ApiClient {
        let mut c = ApiClient::new(
            name,
            ApiClientSpec {
                usage_plans: plans.iter().map(|s| s.to_string()).collect(),
                source_ranges: ranges.iter().map(|s| s.to_string()).collect(),
                keys: vec![KeySpec {
                    secret_ref: Some(SecretKeyRef { name: format!("{name}-secret"), key: "key".into() }),
                    ..Default::default()
                }],
                disabled: None,
                certificates: vec![],
                require_certificate: None,
            },
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.generation = Some(3);
        c
    }

    #[test]
    fn quota_scope_defaults_to_the_store_and_fields_reach_the_table() {
        let mut p = plan("gold", &["orders"], Some(10));
        let entry = |p: &UsagePlan, store| plan_entry("gold", &p.spec, "orders", store).unwrap();
        assert_eq!(entry(&p, false).quota_scope, QuotaScope::Local, "no store: per replica, as before");
        assert_eq!(entry(&p, true).quota_scope, QuotaScope::Global);
        assert_eq!(store_use(&p.spec, false), StoreUse::default());
        assert_eq!(store_use(&p.spec, true), StoreUse { throttle: false, quota: true });
        p.spec.quota_scope = Some(QuotaScopeSpec::Global);
        p.spec.global_limits = Some(true);
        p.spec.on_store_unavailable = Some(StoreFallbackSpec::FailClosed);
        let e = entry(&p, false);
        assert_eq!(
            (e.quota_scope, e.global_limits, e.on_store_unavailable),
            (QuotaScope::Global, true, StoreFallback::FailClosed)
        );
        assert_eq!(
            store_use(&p.spec, false),
            StoreUse { throttle: true, quota: true },
            "explicit: even without a store"
        );
        p.spec.quota_scope = Some(QuotaScopeSpec::Local);
        assert_eq!(entry(&p, true).quota_scope, QuotaScope::Local);
        assert!(ineffective_fields(&p.spec, true).is_empty());
        // Set but changing nothing: reported.
        p.spec.throttle = None;
        p.spec.quota = None;
        let fields: Vec<&str> = ineffective_fields(&p.spec, true).iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["spec.globalLimits", "spec.quotaScope", "spec.onStoreUnavailable"]);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_per("1s"), Some(1000));
        assert_eq!(parse_per("500ms"), Some(500));
        assert_eq!(parse_per("2m"), Some(120_000));
        assert_eq!(parse_per("1h"), Some(3_600_000));
        for bad in ["", "s", "0s", "1d", "-1s", "1.5s", "ms"] {
            assert_eq!(parse_per(bad), None, "{bad}");
        }
    }

    #[test]
    fn table_holds_granted_clients_with_digests_cidrs_and_limits() {
        let mut gold = plan("gold", &["orders"], Some(100));
        gold.spec.services[0].routes =
            Some(vec![RouteSpec { path_prefix: "/v1".into(), methods: Some(vec!["GET".into()]) }]);
        let other = plan("other", &["billing"], Some(5));
        let plans = [gold, other];
        let clients = [
            client("b", &["gold"], &["10.0.0.1/8", "2001:db8::/32"]),
            client("a", &["missing", "gold", "gold"], &[]),
            client("c", &["other"], &["0.0.0.0/0"]),
        ];
        let k = |c: &ApiClient| vec![KeyEntry { sha256: key_digest(c.name_any().as_bytes()), expires_at: None }];
        let keys: HashMap<String, Vec<KeyEntry>> = clients.iter().map(|c| (c.name_any(), k(c))).collect();
        let built =
            build_table("ns", "orders", &plans, &clients, |c| keys.get(&c.name_any()).cloned().unwrap_or_default());
        let t = &built.table;
        t.validate("test").unwrap();
        assert_eq!(t.service, "ns/orders");
        assert_eq!(t.plans.len(), 1);
        let p = &t.plans["gold"];
        assert_eq!(p.throttle, Some(Throttle { rate: 100, per_millis: 60_000, burst: 100 }));
        assert_eq!(p.quota, Some(Quota { limit: 1000, period: Period::Day }));
        assert_eq!(p.routes, vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] }]);
        let ids: Vec<&str> = t.clients.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["ns/a", "ns/b"]);
        assert_eq!(t.clients[0].plans, ["gold"]);
        assert!(t.clients[0].source_ranges.is_empty());
        assert_eq!(
            t.clients[1].source_ranges,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap(), "2001:db8::/32".parse().unwrap()]
        );
        assert_eq!(t.clients[1].keys[0].sha256, key_digest(b"b"));
        assert_eq!(built.generations[ids.iter().position(|id| *id == "ns/a").unwrap()], 3);
        assert_eq!(built.plans["gold"], ("uid-gold".to_string(), 1));
    }

    #[test]
    fn no_granting_plan_gives_an_empty_table_and_revisions_follow_content() {
        let plans = [plan("gold", &["orders"], Some(1))];
        let clients = [client("a", &["gold"], &["10.0.0.0/8"])];
        let empty = build_table("ns", "billing", &plans, &clients, |_| vec![]);
        assert!(empty.table.plans.is_empty() && empty.table.clients.is_empty());
        let t1 = build_table("ns", "orders", &plans, &clients, |_| vec![]).table;
        let t1b = build_table("ns", "orders", &plans, &clients, |_| vec![]).table;
        assert_eq!(t1.revision, t1b.revision);
        let clients2 = [client("a", &["gold"], &["10.0.0.0/9"])];
        let t2 = build_table("ns", "orders", &plans, &clients2, |_| vec![]).table;
        assert_ne!(t1.revision, t2.revision);
    }

    fn created(mut c: ApiClient, at: &str) -> ApiClient {
        c.metadata.creation_timestamp = Some(Time(at.parse().unwrap()));
        c
    }

    #[test]
    fn a_duplicate_key_stays_with_the_oldest_client_and_the_table_stays_valid() {
        let plans = [plan("gold", &["orders"], None)];
        let same = vec![KeyEntry { sha256: key_digest(b"same"), expires_at: None }];
        // "aaa" sorts first by name but was created after "acme": acme keeps the key.
        let acme = created(client("acme", &["gold"], &[]), "2026-01-01T00:00:00Z");
        let aaa = created(client("aaa", &["gold"], &["0.0.0.0/0"]), "2026-01-02T00:00:00Z");
        for clients in [[acme.clone(), aaa.clone()], [aaa.clone(), acme.clone()]] {
            let built = build_table("ns", "orders", &plans, &clients, |_| same.clone());
            built.table.validate("t").unwrap();
            let ids: Vec<&str> = built.table.clients.iter().map(|c| c.id.as_str()).collect();
            assert_eq!(ids, ["ns/aaa", "ns/acme"], "output stays sorted by id");
            assert!(built.table.clients[0].keys.is_empty(), "the newer client is refused");
            assert_eq!(built.table.clients[1].keys, same, "the older client keeps the key");
            assert_eq!(built.duplicate_keys, [("aaa".to_string(), portcullis_table::fingerprint(&same[0].sha256))]);
        }
        // Same timestamp: the name decides. No timestamp counts as newest.
        let b = created(client("b", &["gold"], &[]), "2026-01-01T00:00:00Z");
        let built = build_table("ns", "orders", &plans, &[b, acme.clone()], |_| same.clone());
        assert_eq!(built.duplicate_keys[0].0, "b");
        let built = build_table("ns", "orders", &plans, &[client("a", &["gold"], &[]), acme], |_| same.clone());
        assert_eq!(built.duplicate_keys[0].0, "a");
        // Key order in the spec does not change the table.
        let two = vec![same[0].clone(), KeyEntry { sha256: key_digest(b"other"), expires_at: None }];
        let rev = |keys: Vec<KeyEntry>| {
            build_table("ns", "orders", &plans, &[client("solo", &["gold"], &[])], |_| keys.clone()).table.revision
        };
        assert_eq!(rev(two.clone()), rev(two.into_iter().rev().collect()));
        // One client naming the same key twice keeps it once, and is not its own duplicate.
        let twice = vec![same[0].clone(), same[0].clone()];
        let built = build_table("ns", "orders", &plans, &[client("solo", &["gold"], &[])], |_| twice.clone());
        assert_eq!(built.table.clients[0].keys.len(), 1);
        assert!(built.duplicate_keys.is_empty());
    }

    /// Three claimants in every input order: the oldest keeps the key, the others are reported oldest first, a
    /// loser naming the key twice is reported twice, and a key only one client holds is unaffected.
    #[test]
    fn a_key_claimed_three_times_is_settled_by_seniority_in_any_order() {
        let plans = [plan("gold", &["orders"], None)];
        let same = KeyEntry { sha256: key_digest(b"same"), expires_at: None };
        let own = |n: &str| KeyEntry { sha256: key_digest(n.as_bytes()), expires_at: None };
        let c1 = created(client("zed", &["gold"], &[]), "2026-01-01T00:00:00Z");
        let c2 = created(client("mid", &["gold"], &[]), "2026-01-02T00:00:00Z");
        let c3 = created(client("abe", &["gold"], &[]), "2026-01-03T00:00:00Z");
        let keys = |c: &ApiClient| match c.name_any().as_str() {
            "zed" => vec![own("zed"), same.clone()],
            "mid" => vec![same.clone(), own("mid"), same.clone()],
            _ => vec![same.clone()],
        };
        let fp = portcullis_table::fingerprint(&same.sha256);
        let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let all = [c1, c2, c3];
        for order in orders {
            let clients: Vec<ApiClient> = order.iter().map(|&i| all[i].clone()).collect();
            let built = build_table("ns", "orders", &plans, &clients, keys);
            let by_id = |id: &str| built.table.clients.iter().find(|c| c.id == id).unwrap().keys.clone();
            let mut zed = vec![own("zed"), same.clone()];
            zed.sort_by_key(|k| k.sha256);
            assert_eq!(by_id("ns/zed"), zed, "{order:?}");
            assert_eq!(by_id("ns/mid"), [own("mid")], "{order:?}");
            assert!(by_id("ns/abe").is_empty(), "{order:?}");
            let want = [("mid", &fp), ("mid", &fp), ("abe", &fp)].map(|(n, f)| (n.to_string(), f.clone()));
            assert_eq!(built.duplicate_keys, want, "{order:?}");
        }
    }

    /// Claims are grouped by the digest's first 8 bytes before the whole digest: keys that share those bytes but
    /// differ stay with their clients, and a key claimed twice among them is still settled by seniority.
    #[test]
    fn keys_sharing_their_first_bytes_are_told_apart() {
        let plans = [plan("gold", &["orders"], None)];
        let digest = |last: u8| {
            let mut d = [7u8; 32];
            d[31] = last;
            KeyEntry { sha256: KeyDigest(d), expires_at: None }
        };
        let older = created(client("b", &["gold"], &[]), "2026-01-01T00:00:00Z");
        let newer = created(client("a", &["gold"], &[]), "2026-01-02T00:00:00Z");
        let keys = |c: &ApiClient| match c.name_any().as_str() {
            "b" => vec![digest(1), digest(2)],
            _ => vec![digest(3), digest(2), digest(4)],
        };
        let built = build_table("ns", "orders", &plans, &[newer, older], keys);
        let by_id = |id: &str| built.table.clients.iter().find(|c| c.id == id).unwrap().keys.clone();
        assert_eq!(by_id("ns/b"), [digest(1), digest(2)]);
        assert_eq!(by_id("ns/a"), [digest(3), digest(4)]);
        let fp = portcullis_table::fingerprint(&digest(2).sha256);
        assert_eq!(built.duplicate_keys, [("a".to_string(), fp)]);
    }

    /// Clients are ordered by name through a 16-byte prefix: names longer than it, sharing it, or a prefix of one
    /// another still come out in string order.
    #[test]
    fn clients_come_out_in_name_order_whatever_their_length() {
        let plans = [plan("gold", &["orders"], None)];
        let mut names: Vec<String> = vec![
            "a".into(),
            "a-very-long-client-name-2".into(),
            "a-very-long-client-name-10".into(),
            "a-very-long-client-name-1".into(),
            "a-very-long-clie".into(),
            "a-very-long-clien".into(),
            "b".into(),
            "ab".into(),
            "a0".into(),
            "z".repeat(63),
            "z".repeat(16),
        ];
        names.extend((0..200).map(|i| format!("client-{}", (i * 7919) % 1000)));
        let clients: Vec<ApiClient> = names.iter().map(|n| client(n, &["gold"], &[])).collect();
        let built = build_table("ns", "orders", &plans, &clients, |_| vec![]);
        let ids: Vec<&str> = built.table.clients.iter().map(|c| c.id.as_str()).collect();
        let mut want: Vec<String> = names.iter().map(|n| format!("ns/{n}")).collect();
        want.sort();
        assert_eq!(ids, want);
        for a in &names {
            for b in &names {
                assert!(name_prefix(a) <= name_prefix(b) || a > b, "{a} {b}");
            }
        }
    }

    #[test]
    fn certificates_and_require_certificate_reach_the_table() {
        let plans = [plan("gold", &["orders"], None)];
        let plain = build_table("ns", "orders", &plans, &[client("a", &["gold"], &[])], |_| vec![]).table;
        let mut a = client("a", &["gold"], &[]);
        a.spec.keys.clear();
        a.spec.certificates = vec![
            CertificateSpec { san_dns: Some("A.Example".into()), ..Default::default() },
            CertificateSpec { sha256: Some("AB".repeat(32)), ..Default::default() },
            CertificateSpec { subject: Some("client a".into()), ..Default::default() },
            CertificateSpec::default(),
        ];
        let mut b = client("b", &["gold"], &[]);
        b.spec.require_certificate = Some(true);
        b.spec.certificates = vec![
            CertificateSpec { san_dns: Some("a.example".into()), ..Default::default() },
            CertificateSpec { san_uri: Some("spiffe://td/ns/b".into()), ..Default::default() },
        ];
        let built = build_table("ns", "orders", &plans, &[a, b], |_| vec![]);
        built.table.validate("t").unwrap();
        let t = &built.table;
        assert_eq!(
            t.clients[0].certificates,
            vec![
                CertIdentity::SanDns("a.example".into()),
                CertIdentity::Sha256("ab".repeat(32)),
                CertIdentity::Subject("client a".into()),
            ]
        );
        assert!(!t.clients[0].require_certificate);
        assert_eq!(t.clients[1].certificates, vec![CertIdentity::SanUri("spiffe://td/ns/b".into())]);
        assert!(t.clients[1].require_certificate);
        assert_eq!(built.duplicate_certificates, vec![("b".to_string(), "sanDNS \"a.example\"".to_string())]);
        // Unused, the new fields leave the table (and its revision) exactly as before.
        assert!(!plain.to_json().contains("certificates"));
    }

    #[test]
    fn source_ranges_are_normalised_and_bad_ones_reported() {
        let (nets, bad) = parse_source_ranges(&["10.1.2.3/8".into(), "10.0.0.0/8".into(), "10.0.0.0/33".into()]);
        assert_eq!(nets, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(bad, vec!["10.0.0.0/33".to_string()]);
    }
}
