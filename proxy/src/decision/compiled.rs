//! The compiled table: what the request path reads, built once per table revision.
//!
//! Keys are looked up by SHA-256 digest in a hash map whose hasher takes the digest's first 8 bytes as the hash:
//! the digests are already uniformly distributed, so there is nothing to gain from hashing them again, and a client
//! cannot choose a digest without breaking SHA-256. Equality (after the bucket is found) compares all 32 bytes in
//! constant time (`subtle`). That is belt and braces: a timing difference could only tell an attacker how many
//! leading bytes of *the digest of their guess* match a stored digest, which does not help find a key (preimage
//! resistance), but the constant-time compare costs a few nanoseconds and removes the question.

use super::certs::PeerCert;
use super::cidr::CidrSet;
use super::quota::QuotaCounter;
use super::throttle::ThrottleState;
use governor::clock::{Clock, DefaultClock};
use http::HeaderValue;
use jiff::Timestamp;
use portcullis_table::{CertIdentity, KeyDigest, Plan, QuotaScope, RouteScope, StoreFallback, Table};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// A key digest as a map key: hashed by prefix, compared in constant time.
#[derive(Clone, Copy)]
pub struct DigestKey(pub [u8; 32]);

impl From<KeyDigest> for DigestKey {
    fn from(d: KeyDigest) -> Self {
        Self(d.0)
    }
}

impl PartialEq for DigestKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for DigestKey {}

impl Hash for DigestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

/// Identity hasher for [`DigestKey`] (which writes exactly one `u64`).
#[derive(Default, Clone, Copy)]
pub struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by DigestKey; a correct (if slow) fallback for anything else.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type DigestMap<V> = HashMap<DigestKey, V, BuildHasherDefault<PrefixHasher>>;

#[derive(Debug, Clone, Copy)]
pub struct KeyRef {
    pub client: u32,
    pub expires_at: Option<Timestamp>,
}

/// What a plan is, shared by every client holding it (so route data stays in cache across clients).
#[derive(Debug)]
pub struct PlanSpec {
    pub name: String,
    pub routes: Vec<RouteScope>,
    /// The throttle is counted across replicas in the shared store (`globalLimits` and a throttle).
    pub global_throttle: bool,
    /// The quota is counted across replicas in the shared store (a quota with `quotaScope: Global`).
    pub global_quota: bool,
    /// What to do with the shared counts while the store is unreachable.
    pub on_store_unavailable: StoreFallback,
}

impl PlanSpec {
    fn new(name: &str, p: &Plan) -> Self {
        Self {
            name: name.to_string(),
            routes: p.routes.clone(),
            global_throttle: p.global_limits && p.throttle.is_some(),
            global_quota: p.quota.is_some() && p.quota_scope == QuotaScope::Global,
            on_store_unavailable: p.on_store_unavailable,
        }
    }

    /// Something of this plan is counted in the shared store.
    pub fn counts_globally(&self) -> bool {
        self.global_throttle || self.global_quota
    }
}

/// A plan as held by one client: the shared spec plus this client's own limiter state.
pub struct CompiledPlan<C: Clock = DefaultClock> {
    pub spec: Arc<PlanSpec>,
    pub throttle: Option<ThrottleState<C>>,
    pub quota: Option<Arc<QuotaCounter>>,
}

/// One client. Fields read by every decision come first (`repr(C)` keeps that order) and the first plan is stored
/// inline, so a decision for a typical client (one plan, one or two ranges) touches one or two cache lines here.
#[repr(C)]
pub struct CompiledClient<C: Clock = DefaultClock> {
    pub disabled: bool,
    /// A key alone does not identify this client: the connection's certificate must match it too.
    pub require_certificate: bool,
    pub sources: CidrSet,
    first_plan: Option<CompiledPlan<C>>,
    more_plans: Box<[CompiledPlan<C>]>,
    /// `id` ready to send upstream as `x-portcullis-client`.
    pub header: HeaderValue,
    pub id: String,
}

impl<C: Clock> CompiledClient<C> {
    /// The client's plans in order of precedence.
    pub fn plans(&self) -> impl Iterator<Item = &CompiledPlan<C>> {
        self.first_plan.iter().chain(self.more_plans.iter())
    }
}

pub struct CompiledTable<C: Clock = DefaultClock> {
    pub service: String,
    pub revision: String,
    /// A deny-all table ([`portcullis_table::Table::deny_all`]): every request is refused, with this reason in
    /// the logs and `/readyz` (never in responses).
    pub deny_all: Option<String>,
    pub keys: DigestMap<KeyRef>,
    /// Certificate identity (canonical form) → index into `clients`.
    pub certs: HashMap<CertIdentity, u32>,
    pub clients: Vec<CompiledClient<C>>,
    pub clock: C,
    /// A shared store is configured: the plans' global throttles and quotas are counted there (after the
    /// decision, in [`crate::global`]) and [`super::decide`] leaves them alone. Without one, they are counted
    /// here, per proxy (the `Local` fallback with one replica).
    pub store_counts: bool,
    /// Plans of the table that ask for counts shared across replicas.
    pub global_plans: usize,
}

/// A table's parts other than its clients (borrowed from a table, owned or not).
struct Parts<'a> {
    service: &'a str,
    revision: &'a str,
    plans: &'a std::collections::BTreeMap<String, Plan>,
    deny_all: Option<&'a portcullis_table::DenyAll>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("client id {0:?} cannot be sent as an HTTP header value")]
    ClientId(String),
    #[error("table has {0} clients, more than this proxy supports")]
    TooManyClients(usize),
}

impl<C: Clock + Clone> CompiledTable<C> {
    /// Compiles a validated table. Throttle and quota state of `previous` is carried over for every
    /// (client, plan) whose throttle / quota did not change.
    pub fn compile(table: &Table, previous: Option<&CompiledTable<C>>, clock: C) -> Result<Self, CompileError> {
        let Table { schema_version: _, service, revision, plans, clients, deny_all } = table;
        let parts = Parts { service, revision, plans, deny_all: deny_all.as_ref() };
        Self::compile_parts(parts, clients.len(), clients.iter().cloned(), previous, clock)
    }

    /// [`CompiledTable::compile`], consuming the table: each client's parsed form is freed as soon as it is
    /// compiled, so a large table's parsed and compiled forms do not both stay whole during a swap.
    pub fn compile_owned(table: Table, previous: Option<&CompiledTable<C>>, clock: C) -> Result<Self, CompileError> {
        let Table { schema_version: _, service, revision, plans, clients, deny_all } = table;
        let parts = Parts { service: &service, revision: &revision, plans: &plans, deny_all: deny_all.as_ref() };
        Self::compile_parts(parts, clients.len(), clients.into_iter(), previous, clock)
    }

    fn compile_parts(
        table: Parts<'_>,
        count: usize,
        clients_in: impl Iterator<Item = portcullis_table::Client>,
        previous: Option<&CompiledTable<C>>,
        clock: C,
    ) -> Result<Self, CompileError> {
        if count > u32::MAX as usize {
            return Err(CompileError::TooManyClients(count));
        }
        let prev_index: HashMap<&str, &CompiledClient<C>> =
            previous.map(|p| p.clients.iter().map(|c| (c.id.as_str(), c)).collect()).unwrap_or_default();
        let specs: HashMap<&str, Arc<PlanSpec>> = table
            .plans
            .iter()
            .map(|(name, p)| {
                let spec = PlanSpec::new(name, p);
                (name.as_str(), Arc::new(spec))
            })
            .collect();
        // Most clients hold one key: the map grows beyond that if needed.
        let mut keys: DigestMap<KeyRef> = DigestMap::with_capacity_and_hasher(count, Default::default());
        let mut certs = HashMap::new();
        let mut clients = Vec::with_capacity(count);
        for (i, c) in clients_in.enumerate() {
            let header = HeaderValue::from_str(&c.id).map_err(|_| CompileError::ClientId(c.id.clone()))?;
            let prev = prev_index.get(c.id.as_str());
            let mut plans = Vec::with_capacity(c.plans.len());
            for name in &c.plans {
                // `Table::validate` guarantees the plan exists; a missing one is treated as an empty plan.
                let plan = table.plans.get(name).cloned().unwrap_or_default();
                let spec = specs
                    .get(name.as_str())
                    .cloned()
                    .unwrap_or_else(|| Arc::new(PlanSpec::new(name, &Plan::default())));
                let prev_plan = prev.and_then(|p| p.plans().find(|pp| &pp.spec.name == name));
                let throttle = plan
                    .throttle
                    .map(|t| ThrottleState::carry_over(t, prev_plan.and_then(|p| p.throttle.as_ref()), &clock));
                let quota = plan.quota.map(|q| QuotaCounter::carry_over(q, prev_plan.and_then(|p| p.quota.as_ref())));
                plans.push(CompiledPlan { spec, throttle, quota });
            }
            for k in &c.keys {
                keys.insert(k.sha256.into(), KeyRef { client: i as u32, expires_at: k.expires_at });
            }
            for ci in &c.certificates {
                // `Table::validate` guarantees an identity names one client; should two, the first keeps it.
                certs.entry(ci.normalized()).or_insert(i as u32);
            }
            let mut plans = plans.into_iter();
            clients.push(CompiledClient {
                disabled: c.disabled,
                require_certificate: c.require_certificate,
                sources: CidrSet::new(&c.source_ranges),
                first_plan: plans.next(),
                more_plans: plans.collect(),
                header,
                id: c.id,
            });
        }
        Ok(Self {
            service: table.service.to_string(),
            revision: table.revision.to_string(),
            deny_all: table.deny_all.map(|d| d.reason.clone()),
            keys,
            certs,
            clients,
            clock,
            store_counts: false,
            global_plans: table.plans.iter().filter(|(n, p)| PlanSpec::new(n, p).counts_globally()).count(),
        })
    }

    /// The client a key digest belongs to, with the key's expiry.
    pub fn lookup(&self, digest: &KeyDigest) -> Option<(&CompiledClient<C>, KeyRef)> {
        let r = *self.keys.get(&DigestKey(digest.0))?;
        Some((&self.clients[r.client as usize], r))
    }

    /// The one client `cert` identifies: its identities must all lead to the same client (none leading nowhere
    /// is fine); a certificate matching two clients identifies none.
    pub fn lookup_cert(&self, cert: &PeerCert) -> Option<(u32, &CompiledClient<C>)> {
        let mut found = None;
        for id in &cert.identities {
            if let Some(&i) = self.certs.get(id) {
                match found {
                    None => found = Some(i),
                    Some(f) if f == i => {}
                    Some(_) => return None,
                }
            }
        }
        found.map(|i| (i, &self.clients[i as usize]))
    }

    /// Whether `cert` carries an identity of client number `client`.
    pub fn cert_matches(&self, cert: &PeerCert, client: u32) -> bool {
        cert.identities.iter().any(|id| self.certs.get(id) == Some(&client))
    }

    pub fn client(&self, id: &str) -> Option<&CompiledClient<C>> {
        self.clients.iter().find(|c| c.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use portcullis_table::{Client, Plan, Throttle, key_digest};
    use std::collections::BTreeMap;

    #[test]
    fn digest_keys_hash_by_prefix_and_compare_fully() {
        let a = key_digest(b"a");
        let mut b = a;
        b.0[31] ^= 1;
        assert!(DigestKey(a.0) != DigestKey(b.0));
        let mut h1 = PrefixHasher::default();
        DigestKey(a.0).hash(&mut h1);
        let mut h2 = PrefixHasher::default();
        DigestKey(b.0).hash(&mut h2);
        assert_eq!(h1.finish(), h2.finish(), "same prefix, same bucket; equality still tells them apart");
        let mut m: DigestMap<u8> = DigestMap::default();
        m.insert(DigestKey(a.0), 1);
        m.insert(DigestKey(b.0), 2);
        assert_eq!(m.get(&DigestKey(a.0)), Some(&1));
        assert_eq!(m.get(&DigestKey(b.0)), Some(&2));
    }

    #[test]
    fn compile_indexes_keys_and_carries_state() {
        let mut plans = BTreeMap::new();
        plans.insert(
            "p".to_string(),
            Plan { throttle: Some(Throttle { rate: 1, per_millis: 60_000, burst: 1 }), ..Default::default() },
        );
        let client = |id: &str, key: &[u8]| Client::builder(id).key(key).source("127.0.0.1/32").plan("p").build();
        let t1 = Table::new("ns/svc", plans.clone(), vec![client("ns/a", b"ka"), client("ns/b", b"kb")]);
        let clock = FakeRelativeClock::default();
        let c1 = CompiledTable::compile(&t1, None, clock.clone()).unwrap();
        let (a, _) = c1.lookup(&key_digest(b"ka")).unwrap();
        assert_eq!(a.id, "ns/a");
        assert!(c1.lookup(&key_digest(b"nope")).is_none());
        assert!(a.plans().next().unwrap().throttle.as_ref().unwrap().check().is_ok());

        let mut t2 = t1.clone();
        t2.clients.retain(|c| c.id != "ns/b");
        t2.revision = t2.compute_revision();
        let c2 = CompiledTable::compile(&t2, Some(&c1), clock).unwrap();
        let (a2, _) = c2.lookup(&key_digest(b"ka")).unwrap();
        assert!(a2.plans().next().unwrap().throttle.as_ref().unwrap().check().is_err(), "limiter carried over");
        assert!(c2.lookup(&key_digest(b"kb")).is_none(), "revoked");
    }
}
