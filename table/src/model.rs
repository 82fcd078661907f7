//! The logical table: plans and the clients they admit, for one protected Service.

use crate::{KeyDigest, SCHEMA_VERSION, TableError};
use ipnet::IpNet;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// One protected Service's table. Clients are sorted by `id`; `revision` is a hash of the content, so equal
/// content always has an equal revision and rendering twice gives byte-identical output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Table {
    pub schema_version: u32,
    /// `namespace/name` of the protected Service.
    pub service: String,
    /// Content hash (see [`Table::compute_revision`]). Optional in hand-written files: computed when empty.
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub plans: BTreeMap<String, Plan>,
    /// Shared, so a build that keeps most clients of the previous table (the controller's, see its `memo`) reuses
    /// them instead of copying 100 000 clients.
    #[serde(default)]
    pub clients: Vec<Arc<Client>>,
    /// Present on a **deny-all table**: no UsagePlan grants the Service, so the proxy refuses every request
    /// (403 `service_not_granted`). Such a table has no plans and no clients. Omitted otherwise (so tables that
    /// do not use it, and their revisions, are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_all: Option<DenyAll>,
}

/// Why a table denies everything (see [`Table::deny_all`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DenyAll {
    /// Human-readable, for logs and the proxy's `/readyz` (never sent to clients). 1..=[`MAX_DENY_REASON`] bytes,
    /// no control characters.
    pub reason: String,
}

/// Longest accepted [`DenyAll::reason`], in bytes.
pub const MAX_DENY_REASON: usize = 512;

impl DenyAll {
    pub fn validate(&self, what: &str) -> Result<(), TableError> {
        if self.reason.is_empty() || self.reason.len() > MAX_DENY_REASON {
            return Err(TableError::invalid(what, format!("denyAll reason must be 1..={MAX_DENY_REASON} bytes")));
        }
        if self.reason.chars().any(char::is_control) {
            return Err(TableError::invalid(what, "denyAll reason contains control characters"));
        }
        Ok(())
    }
}

/// What a UsagePlan grants on this Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Plan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Throttle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// Count the throttle across replicas (in the shared store, Redis) instead of per proxy.
    #[serde(default, skip_serializing_if = "is_false")]
    pub global_limits: bool,
    /// Where the quota is counted: across replicas in the shared store (the default) or per proxy.
    #[serde(default, skip_serializing_if = "is_default")]
    pub quota_scope: QuotaScope,
    /// What the proxy does with this plan's shared (global) counts while the store cannot be reached.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_store_unavailable: StoreFallback,
    /// Route scopes; empty means every path and method of the Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteScope>,
}

/// Where a quota is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum QuotaScope {
    /// Across every proxy replica, in the shared store: exact, and it survives proxy restarts.
    #[default]
    Global,
    /// Per proxy replica, in memory (starts again at zero when the proxy restarts).
    Local,
}

/// What a proxy does with a plan's shared counts while the store is unreachable (not configured, down, timing out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum StoreFallback {
    /// Count locally, with the throttle rate and the quota divided by the number of replicas the proxy knows of.
    #[default]
    Local,
    /// Admit without counting.
    FailOpen,
    /// Refuse (503) what would have been counted.
    FailClosed,
}

/// `rate` requests per `per_millis`, with bursts of up to `burst` (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Throttle {
    pub rate: u32,
    pub per_millis: u64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quota {
    pub limit: u64,
    pub period: Period,
}

/// UTC calendar periods: a Day starts at 00:00 UTC, a Week on Monday 00:00 UTC, a Month on its 1st at 00:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Period {
    Day,
    Week,
    Month,
}

/// A path prefix (segment-aware: `/v1` matches `/v1` and `/v1/x`, not `/v10`) and the methods allowed under it
/// (empty: all methods).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteScope {
    pub path_prefix: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// One ApiClient as this Service sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Client {
    /// `namespace/name` of the ApiClient; sent upstream as `x-portcullis-client`.
    pub id: String,
    pub keys: Vec<KeyEntry>,
    /// Allowed source ranges. Empty admits no address.
    #[serde(default)]
    pub source_ranges: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Names of plans (keys of [`Table::plans`]) granting this client access, in order of precedence.
    pub plans: Vec<String>,
    /// Client-certificate identities that identify this client (TLS with `--client-ca` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertIdentity>,
    /// A key alone is not enough: the connection's verified client certificate must match `certificates` too.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_certificate: bool,
}

/// One accepted client-certificate identity. Serialised as a single-key object, e.g. `{"sanDNS": "a.example"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum CertIdentity {
    /// The subject's Common Name (CN), compared exactly (case-sensitive).
    #[serde(rename = "subject")]
    Subject(String),
    /// A DNS name among the subjectAltNames; compared case-insensitively (stored lowercase).
    #[serde(rename = "sanDNS")]
    SanDns(String),
    /// A URI among the subjectAltNames (e.g. a SPIFFE ID), compared exactly.
    #[serde(rename = "sanURI")]
    SanUri(String),
    /// SHA-256 of the certificate's DER encoding, 64 lowercase hex digits.
    #[serde(rename = "sha256")]
    Sha256(String),
}

impl CertIdentity {
    /// The canonical form: DNS names and fingerprints lowercased (fingerprints may also be written with `:`).
    pub fn normalized(&self) -> CertIdentity {
        match self {
            CertIdentity::Subject(s) => CertIdentity::Subject(s.clone()),
            CertIdentity::SanDns(s) => CertIdentity::SanDns(s.to_ascii_lowercase()),
            CertIdentity::SanUri(s) => CertIdentity::SanUri(s.clone()),
            CertIdentity::Sha256(s) => CertIdentity::Sha256(s.replace(':', "").to_ascii_lowercase()),
        }
    }

    /// Why this identity can never match, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let (kind, v) = match self {
            CertIdentity::Subject(v) => ("subject", v),
            CertIdentity::SanDns(v) => ("sanDNS", v),
            CertIdentity::SanUri(v) => ("sanURI", v),
            CertIdentity::Sha256(v) => ("sha256", v),
        };
        if v.is_empty() {
            return Some(format!("certificate {kind} is empty"));
        }
        if let CertIdentity::Sha256(h) = self
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Some(format!("certificate sha256 {h:?} is not 64 lowercase hex digits"));
        }
        if let CertIdentity::SanDns(d) = self
            && d.bytes().any(|b| b.is_ascii_uppercase())
        {
            return Some(format!("certificate sanDNS {d:?} is not lowercase"));
        }
        None
    }
}

impl std::fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertIdentity::Subject(v) => write!(f, "subject {v:?}"),
            CertIdentity::SanDns(v) => write!(f, "sanDNS {v:?}"),
            CertIdentity::SanUri(v) => write!(f, "sanURI {v:?}"),
            CertIdentity::Sha256(v) => write!(f, "sha256 {v}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyEntry {
    pub sha256: KeyDigest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Table {
    /// A sealed table: clients sorted, revision computed.
    pub fn new<C: Into<Arc<Client>>>(
        service: impl Into<String>,
        plans: BTreeMap<String, Plan>,
        clients: Vec<C>,
    ) -> Self {
        let mut clients: Vec<Arc<Client>> = clients.into_iter().map(Into::into).collect();
        clients.sort_by(|a, b| a.id.cmp(&b.id));
        let mut t = Self {
            schema_version: SCHEMA_VERSION,
            service: service.into(),
            revision: String::new(),
            plans,
            clients,
            deny_all: None,
        };
        t.revision = t.compute_revision();
        t
    }

    /// A sealed table of `clients` already sorted by id, each with its JSON (`serde_json::to_string` of it, as
    /// [`Table::client_json`] gives): the revision is hashed from those strings instead of serialising every client
    /// again, so a builder that keeps the JSON of unchanged clients between builds hashes a large table in one pass
    /// over bytes. The result is exactly [`Table::new`]'s.
    pub fn from_serialised_clients<S: AsRef<str>>(
        service: impl Into<String>,
        plans: BTreeMap<String, Plan>,
        clients: Vec<Arc<Client>>,
        json: &[S],
    ) -> Self {
        assert_eq!(clients.len(), json.len(), "one JSON string per client");
        debug_assert!(clients.windows(2).all(|w| w[0].id <= w[1].id), "clients sorted by id");
        debug_assert!(clients.iter().zip(json).all(|(c, j)| Self::client_json(c) == j.as_ref()), "JSON of each client");
        let mut t = Self {
            schema_version: SCHEMA_VERSION,
            service: service.into(),
            revision: String::new(),
            plans,
            clients,
            deny_all: None,
        };
        // The canonical JSON of `compute_revision`, written in three parts: the fields before the clients, the
        // clients, and the end (a table built here has no denyAll).
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Head<'a> {
            schema_version: u32,
            service: &'a str,
            plans: &'a BTreeMap<String, Plan>,
        }
        let head =
            serde_json::to_string(&Head { schema_version: t.schema_version, service: &t.service, plans: &t.plans })
                .expect("serialising a table cannot fail");
        let mut h = Sha256::new();
        h.update(&head.as_bytes()[..head.len() - 1]); // without its closing brace
        h.update(b",\"clients\":[");
        for (i, j) in json.iter().enumerate() {
            if i > 0 {
                h.update(b",");
            }
            h.update(j.as_ref().as_bytes());
        }
        h.update(b"]}");
        t.revision = hex::encode(h.finalize())[..16].to_string();
        t
    }

    /// The JSON of one client as a table holds it (what [`Table::from_serialised_clients`] takes).
    pub fn client_json(client: &Client) -> String {
        serde_json::to_string(client).expect("serialising a client cannot fail")
    }

    /// The sealed **deny-all table** of `service` (`namespace/name`): what the controller publishes for a Service
    /// no UsagePlan grants, so running proxies refuse every request (403 `service_not_granted`) instead of keeping
    /// the last table they had. `reason` is for operators (logs, `/readyz`), e.g. "no UsagePlan grants shop/orders".
    pub fn deny_all(service: impl Into<String>, reason: impl Into<String>) -> Self {
        let mut t = Self {
            schema_version: SCHEMA_VERSION,
            service: service.into(),
            revision: String::new(),
            plans: BTreeMap::new(),
            clients: Vec::new(),
            deny_all: Some(DenyAll { reason: reason.into() }),
        };
        t.revision = t.compute_revision();
        t
    }

    /// Whether this is a deny-all table.
    pub fn is_deny_all(&self) -> bool {
        self.deny_all.is_some()
    }

    /// Hash of everything but the revision itself: the first 16 hex digits of SHA-256 over the canonical JSON.
    pub fn compute_revision(&self) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Content<'a> {
            schema_version: u32,
            service: &'a str,
            plans: &'a BTreeMap<String, Plan>,
            clients: &'a [Arc<Client>],
            #[serde(skip_serializing_if = "Option::is_none")]
            deny_all: Option<&'a DenyAll>,
        }
        let content = Content {
            schema_version: self.schema_version,
            service: &self.service,
            plans: &self.plans,
            clients: &self.clients,
            deny_all: self.deny_all.as_ref(),
        };
        let mut h = Sha256::new();
        serde_json::to_writer(HashWriter(&mut h), &content).expect("serialising a table cannot fail");
        hex::encode(h.finalize())[..16].to_string()
    }

    /// Deterministic JSON (the `--tables FILE` format).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serialising a table cannot fail")
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("serialising a table cannot fail")
    }

    /// Parses and validates a table file. An empty `revision` is computed; a present one must match the content.
    pub fn from_json(json: &str, what: &str) -> Result<Self, TableError> {
        let mut t: Table = parse_json(json, what)?;
        if t.revision.is_empty() {
            t.clients.sort_by(|a, b| a.id.cmp(&b.id));
            t.revision = t.compute_revision();
        }
        t.validate(what)?;
        Ok(t)
    }

    /// Checks everything a proxy relies on. A table that fails here must never replace a good one.
    pub fn validate(&self, what: &str) -> Result<(), TableError> {
        check_schema(self.schema_version, what)?;
        if self.service.split('/').count() != 2 || self.service.split('/').any(str::is_empty) {
            return Err(TableError::invalid(what, format!("service {:?} is not namespace/name", self.service)));
        }
        if let Some(d) = &self.deny_all {
            d.validate(what)?;
            if !self.plans.is_empty() || !self.clients.is_empty() {
                return Err(TableError::invalid(what, "a denyAll table has no plans and no clients"));
            }
        }
        for (name, plan) in &self.plans {
            plan.validate(&format!("{what}: plan {name}"))?;
        }
        validate_clients(&self.plans, &self.clients, what)?;
        let computed = self.compute_revision();
        if computed != self.revision {
            return Err(TableError::invalid(
                what,
                format!("revision {:?} does not match its content (expected {computed:?})", self.revision),
            ));
        }
        Ok(())
    }
}

impl Plan {
    pub fn validate(&self, what: &str) -> Result<(), TableError> {
        if let Some(t) = &self.throttle
            && (t.rate == 0 || t.per_millis == 0 || t.burst == 0)
        {
            return Err(TableError::invalid(what, "throttle rate, per and burst must be positive"));
        }
        if let Some(q) = &self.quota
            && q.limit == 0
        {
            return Err(TableError::invalid(what, "quota limit must be positive"));
        }
        for r in &self.routes {
            if !r.path_prefix.starts_with('/') {
                return Err(TableError::invalid(
                    what,
                    format!("route pathPrefix {:?} must start with '/'", r.path_prefix),
                ));
            }
        }
        Ok(())
    }
}

impl RouteScope {
    /// Segment-aware prefix match plus method check (methods compared case-sensitively, as HTTP does).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let p = self.path_prefix.trim_end_matches('/');
        let path_ok = p.is_empty()
            || (path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/') | Some(b'?')));
        path_ok && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
    }
}

/// Checks a run of clients (a whole table's, or one shard's) against the plans they may name: sorted by id, each id
/// once, every plan known, at least one plan, every key digest and certificate identity once, certificates valid.
pub fn validate_clients<C: Borrow<Client>>(
    plans: &BTreeMap<String, Plan>,
    clients: &[C],
    what: &str,
) -> Result<(), TableError> {
    let mut ids = HashSet::with_capacity(clients.len());
    let mut digests = HashSet::new();
    let mut identities = HashSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c: &Client = c.borrow();
        if i > 0 && clients[i - 1].borrow().id >= c.id {
            return Err(TableError::invalid(what, format!("clients not sorted by id at {:?}", c.id)));
        }
        if !ids.insert(c.id.as_str()) {
            return Err(TableError::invalid(what, format!("client {} appears twice", c.id)));
        }
        for p in &c.plans {
            if !plans.contains_key(p) {
                return Err(TableError::invalid(what, format!("client {} names unknown plan {p:?}", c.id)));
            }
        }
        if c.plans.is_empty() {
            return Err(TableError::invalid(what, format!("client {} has no plan", c.id)));
        }
        for k in &c.keys {
            if !digests.insert(k.sha256) {
                return Err(TableError::invalid(what, format!("key {} is listed twice (client {})", k.sha256, c.id)));
            }
        }
        for ci in &c.certificates {
            if let Some(p) = ci.problem() {
                return Err(TableError::invalid(what, format!("client {}: {p}", c.id)));
            }
            if !identities.insert(ci) {
                return Err(TableError::invalid(what, format!("certificate {ci} is listed twice (client {})", c.id)));
            }
        }
    }
    Ok(())
}

pub(crate) fn check_schema(found: u32, what: &str) -> Result<(), TableError> {
    if found != SCHEMA_VERSION {
        return Err(TableError::SchemaVersion { what: what.to_string(), found, supported: SCHEMA_VERSION });
    }
    Ok(())
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T, TableError> {
    serde_json::from_str(json).map_err(|e| TableError::Malformed { what: what.to_string(), detail: e.to_string() })
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_table_from_serialised_clients_is_the_table_new_builds() {
        let plans = |n: usize| -> BTreeMap<String, Plan> {
            (0..n).map(|i| (format!("p{i}"), Plan { routes: vec![], ..Default::default() })).collect()
        };
        for (nplans, nclients) in [(0, 0), (1, 0), (1, 1), (2, 5)] {
            let clients: Vec<Client> = (0..nclients)
                .map(|i| {
                    Client::builder(format!("ns/c{i}")).key(format!("key-{i}")).source("10.0.0.0/8").plan("p0").build()
                })
                .collect();
            let json: Vec<String> = clients.iter().map(Table::client_json).collect();
            let a = Table::new("ns/svc", plans(nplans), clients.clone());
            let b = Table::from_serialised_clients(
                "ns/svc",
                plans(nplans),
                clients.into_iter().map(Arc::new).collect(),
                &json,
            );
            assert_eq!(a, b, "{nplans} plans, {nclients} clients");
            assert_eq!(b.revision, b.compute_revision());
        }
    }

    pub fn sample(n: usize) -> Table {
        let mut plans = BTreeMap::new();
        plans.insert(
            "gold".to_string(),
            Plan {
                throttle: Some(Throttle { rate: 100, per_millis: 1000, burst: 20 }),
                quota: Some(Quota { limit: 100_000, period: Period::Month }),
                routes: vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] }],
                ..Default::default()
            },
        );
        let clients = (0..n)
            .map(|i| {
                Client::builder(format!("team-a/client-{i:06}"))
                    .key(format!("key-{i}"))
                    .source(&format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255))
                    .plan("gold")
                    .build()
            })
            .collect();
        Table::new("team-a/orders", plans, clients)
    }

    #[test]
    fn rendering_is_deterministic_and_round_trips() {
        let t = sample(50);
        let a = t.to_json();
        assert_eq!(a, sample(50).to_json());
        assert_eq!(Table::from_json(&a, "test").unwrap(), t);
    }

    #[test]
    fn revision_changes_with_content() {
        let mut t = sample(3);
        let before = t.revision.clone();
        Arc::make_mut(&mut t.clients[0]).source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        assert_ne!(t.compute_revision(), before);
    }

    #[test]
    fn tampered_revision_is_refused() {
        let mut t = sample(2);
        t.revision = "0000000000000000".into();
        let err = Table::from_json(&t.to_json(), "f.json").unwrap_err();
        assert!(err.to_string().contains("does not match its content"), "{err}");
    }

    #[test]
    fn hand_written_file_without_revision_is_accepted() {
        let json = r#"{"schemaVersion":1,"service":"demo/echo","plans":{"p":{}},
            "clients":[{"id":"demo/a","keys":[{"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}],
            "sourceRanges":["127.0.0.1/32"],"plans":["p"]}]}"#;
        let t = Table::from_json(json, "f").unwrap();
        assert_eq!(t.revision.len(), 16);
    }

    #[test]
    fn invalid_tables_are_refused_with_reasons() {
        let mut t = sample(2);
        Arc::make_mut(&mut t.clients[1]).plans = vec!["missing".into()];
        t.revision = t.compute_revision();
        assert!(t.validate("x").unwrap_err().to_string().contains("unknown plan"));

        let mut t = sample(2);
        Arc::make_mut(&mut t.clients[1]).keys = t.clients[0].keys.clone();
        t.revision = t.compute_revision();
        assert!(t.validate("x").unwrap_err().to_string().contains("listed twice"));

        let mut t = sample(1);
        t.schema_version = 9;
        assert!(matches!(t.validate("x"), Err(TableError::SchemaVersion { found: 9, .. })));

        assert!(matches!(Table::from_json("{not json", "f"), Err(TableError::Malformed { .. })));
        let bad_cidr = r#"{"schemaVersion":1,"service":"a/b","clients":[{"id":"a/c","keys":[],"sourceRanges":["10.0.0.0/33"],"plans":[]}]}"#;
        assert!(matches!(Table::from_json(bad_cidr, "f"), Err(TableError::Malformed { .. })));
    }

    #[test]
    fn certificate_identities_round_trip_and_are_validated() {
        let unused = sample(2);
        let json = unused.to_json();
        assert!(!json.contains("certificates") && !json.contains("requireCertificate"), "unused fields not written");

        let mut t = sample(2);
        Arc::make_mut(&mut t.clients[0]).certificates = vec![
            CertIdentity::Subject("Client A".into()),
            CertIdentity::SanDns("a.example".into()),
            CertIdentity::SanUri("spiffe://td/a".into()),
            CertIdentity::Sha256("ab".repeat(32)),
        ];
        Arc::make_mut(&mut t.clients[0]).require_certificate = true;
        t.revision = t.compute_revision();
        assert_ne!(t.revision, unused.revision);
        let json = t.to_json();
        assert!(
            json.contains(
                r#""certificates":[{"subject":"Client A"},{"sanDNS":"a.example"},{"sanURI":"spiffe://td/a"}"#
            )
        );
        assert!(json.contains(r#""requireCertificate":true"#));
        assert_eq!(Table::from_json(&json, "f").unwrap(), t);

        let mut dup = t.clone();
        Arc::make_mut(&mut dup.clients[1]).certificates = vec![CertIdentity::SanDns("a.example".into())];
        dup.revision = dup.compute_revision();
        assert!(dup.validate("x").unwrap_err().to_string().contains("listed twice"));

        for bad in [
            CertIdentity::Sha256("AB".repeat(32)),
            CertIdentity::Sha256("ab".into()),
            CertIdentity::SanDns("A.example".into()),
            CertIdentity::Subject(String::new()),
        ] {
            let mut b = sample(1);
            Arc::make_mut(&mut b.clients[0]).certificates = vec![bad.clone()];
            b.revision = b.compute_revision();
            assert!(b.validate("x").is_err(), "{bad}");
        }
        assert_eq!(CertIdentity::Sha256("AB:".repeat(32)).normalized(), CertIdentity::Sha256("ab".repeat(32)));
    }

    #[test]
    fn deny_all_table_round_trips_and_is_validated() {
        let t = Table::deny_all("shop/orders", "no UsagePlan grants shop/orders");
        assert!(t.is_deny_all());
        let json = t.to_json();
        assert!(json.contains(r#""denyAll":{"reason":"no UsagePlan grants shop/orders"}"#), "{json}");
        assert_eq!(Table::from_json(&json, "f").unwrap(), t);
        // The reason is content: another reason is another revision; an ordinary empty table differs too.
        assert_ne!(t.revision, Table::deny_all("shop/orders", "other").revision);
        assert_ne!(t.revision, Table::new("shop/orders", BTreeMap::new(), Vec::<Client>::new()).revision);
        // Ordinary tables do not mention it, so their revisions did not change with the field.
        assert!(!sample(1).to_json().contains("denyAll"));

        let mut with_clients = sample(1);
        with_clients.deny_all = Some(DenyAll { reason: "x".into() });
        with_clients.revision = with_clients.compute_revision();
        assert!(with_clients.validate("x").unwrap_err().to_string().contains("no plans and no clients"));
        for bad in ["", "line\nbreak", &"r".repeat(MAX_DENY_REASON + 1)] {
            let t = Table::deny_all("a/b", bad);
            assert!(t.validate("x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_scope_matching_is_segment_aware() {
        let r = RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] };
        assert!(r.matches("GET", "/v1"));
        assert!(r.matches("GET", "/v1/orders"));
        assert!(r.matches("GET", "/v1?x=1"));
        assert!(!r.matches("GET", "/v10"));
        assert!(!r.matches("POST", "/v1"));
        let any = RouteScope { path_prefix: "/".into(), methods: vec![] };
        assert!(any.matches("DELETE", "/anything"));
    }
}
