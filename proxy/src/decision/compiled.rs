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
use std::collections::{BTreeMap, HashMap};
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

/// Where a client is in a [`CompiledTable`]: its part (shard) and its position there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRef {
    pub part: u32,
    pub index: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct KeyRef {
    pub client: ClientRef,
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

/// The compiled clients of one shard of a stable-layout table (or of a whole table). Consecutive tables share the
/// parts whose shard did not change (with their limiter state), so a change to one client compiles one shard.
pub struct Part<C: Clock = DefaultClock> {
    /// SHA-256 of the shard's data string; empty for a part compiled from a whole table (never reused).
    pub digest: String,
    pub clients: Vec<CompiledClient<C>>,
    /// The part's key digests: (digest, client position, expiry). The table's key map is built from these.
    keys: Vec<(DigestKey, u32, Option<Timestamp>)>,
    /// The part's certificate identities: (identity, client position).
    certs: Vec<(CertIdentity, u32)>,
}

pub struct CompiledTable<C: Clock = DefaultClock> {
    pub service: String,
    pub revision: String,
    /// A deny-all table ([`portcullis_table::Table::deny_all`]): every request is refused, with this reason in
    /// the logs and `/readyz` (never in responses).
    pub deny_all: Option<String>,
    pub keys: DigestMap<KeyRef>,
    /// Certificate identity (canonical form) → client.
    pub certs: HashMap<CertIdentity, ClientRef>,
    parts: Vec<Arc<Part<C>>>,
    /// The plans as the table gave them, and compiled: parts are reused only under the same plans.
    plans: BTreeMap<String, Plan>,
    specs: HashMap<String, Arc<PlanSpec>>,
    pub clock: C,
    /// A shared store is configured: the plans' global throttles and quotas are counted there (after the
    /// decision, in [`crate::global`]) and [`super::decide`] leaves them alone. Without one, they are counted
    /// here, per proxy (the `Local` fallback with one replica).
    pub store_counts: bool,
    /// Plans of the table that ask for counts shared across replicas.
    pub global_plans: usize,
}

/// One shard of a stable-layout table to compile: the previous table's part, or the shard's clients as read.
pub enum ShardInput<C: Clock = DefaultClock> {
    Keep(Arc<Part<C>>),
    New { digest: String, clients: Vec<portcullis_table::Client> },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("client id {0:?} cannot be sent as an HTTP header value")]
    ClientId(String),
    #[error("table has {0} clients, more than this proxy supports")]
    TooManyClients(usize),
    #[error("key {0} is listed by two clients (in two shards)")]
    DuplicateKey(String),
    #[error("certificate {0} is listed by two clients (in two shards)")]
    DuplicateCertificate(String),
}

impl<C: Clock + Clone> CompiledTable<C> {
    /// Compiles a validated table. Throttle and quota state of `previous` is carried over for every
    /// (client, plan) whose throttle / quota did not change.
    pub fn compile(table: &Table, previous: Option<&CompiledTable<C>>, clock: C) -> Result<Self, CompileError> {
        Self::compile_owned(table.clone(), previous, clock)
    }

    /// [`CompiledTable::compile`], consuming the table: each client's parsed form is freed as soon as it is
    /// compiled, so a large table's parsed and compiled forms do not both stay whole during a swap.
    pub fn compile_owned(table: Table, previous: Option<&CompiledTable<C>>, clock: C) -> Result<Self, CompileError> {
        let Table { schema_version: _, service, revision, plans, clients, deny_all } = table;
        let deny_all = deny_all.map(|d| d.reason);
        // Unshared in a table this proxy parsed: unwrapping moves each client, it copies none.
        let clients = clients.into_iter().map(std::sync::Arc::unwrap_or_clone).collect();
        let input = ShardInput::New { digest: String::new(), clients };
        Self::compile_parts(service, revision, plans, deny_all, vec![input], previous, clock)
    }

    /// Compiles a stable-layout table shard by shard: kept parts are shared with `previous` as they are, new ones
    /// compiled (their limiter state carried over from `previous`); the key and certificate maps are built over
    /// all parts, and a key or identity listed in two parts refuses the table.
    pub fn compile_stable(
        index: &portcullis_table::shard::IndexDoc,
        shards: Vec<ShardInput<C>>,
        previous: Option<&CompiledTable<C>>,
        clock: C,
    ) -> Result<Self, CompileError> {
        let deny_all = index.deny_all.as_ref().map(|d| d.reason.clone());
        Self::compile_parts(
            index.service.clone(),
            index.revision.clone(),
            index.plans.clone(),
            deny_all,
            shards,
            previous,
            clock,
        )
    }

    /// The part of shard `i` of `index` this table can lend to the next one: same service, plans and shard count,
    /// and the shard's digest unchanged.
    pub fn reusable_part(&self, index: &portcullis_table::shard::IndexDoc, i: usize) -> Option<Arc<Part<C>>> {
        let part = self.parts.get(i)?;
        let same = self.deny_all.is_none()
            && index.deny_all.is_none()
            && self.service == index.service
            && self.parts.len() == index.shards.len()
            && self.plans == index.plans
            && !part.digest.is_empty()
            && index.shards.get(i).is_some_and(|r| r.sha256 == part.digest);
        same.then(|| part.clone())
    }

    fn compile_parts(
        service: String,
        revision: String,
        plans: BTreeMap<String, Plan>,
        deny_all: Option<String>,
        shards: Vec<ShardInput<C>>,
        previous: Option<&CompiledTable<C>>,
        clock: C,
    ) -> Result<Self, CompileError> {
        if shards.len() > u32::MAX as usize {
            return Err(CompileError::TooManyClients(shards.len()));
        }
        // Plan specs are shared by every client holding the plan (and with the previous table under the same plans).
        let specs: HashMap<String, Arc<PlanSpec>> = match previous {
            Some(p) if p.plans == plans => p.specs.clone(),
            _ => plans.iter().map(|(name, p)| (name.clone(), Arc::new(PlanSpec::new(name, p)))).collect(),
        };
        // Limiter state is carried over from the previous table's client of the same id: in the same part when
        // the layout is the same (clients are sorted by id within a part), else looked up across all parts.
        let same_layout = previous.is_some_and(|p| p.parts.len() == shards.len());
        let by_id: HashMap<&str, &CompiledClient<C>> = match previous {
            Some(p) if !same_layout => {
                p.parts.iter().flat_map(|part| part.clients.iter()).map(|c| (c.id.as_str(), c)).collect()
            }
            _ => HashMap::new(),
        };
        let mut parts = Vec::with_capacity(shards.len());
        for (i, shard) in shards.into_iter().enumerate() {
            let part = match shard {
                ShardInput::Keep(part) => part,
                ShardInput::New { digest, clients } => {
                    let prev_part = previous.filter(|_| same_layout).map(|p| &p.parts[i]);
                    let prev = |id: &str| match prev_part {
                        Some(part) => {
                            part.clients.binary_search_by(|c| c.id.as_str().cmp(id)).ok().map(|j| &part.clients[j])
                        }
                        None => by_id.get(id).copied(),
                    };
                    Arc::new(compile_part(digest, clients, &plans, &specs, prev, &clock)?)
                }
            };
            parts.push(part);
        }
        // The key and certificate maps: with the same layout, the previous table's maps with the entries of the
        // replaced parts swapped (a copy, then work in proportion to what changed); else built over every part.
        let (mut keys, mut certs, rebuilt): (DigestMap<KeyRef>, _, Vec<usize>) = match previous {
            Some(p) if same_layout => {
                let replaced: Vec<usize> = (0..parts.len()).filter(|&i| !Arc::ptr_eq(&p.parts[i], &parts[i])).collect();
                let (mut keys, mut certs) = (p.keys.clone(), p.certs.clone());
                // Every replaced part's entries go before any new one comes in: a key may move between parts.
                for &i in &replaced {
                    for (digest, _, _) in &p.parts[i].keys {
                        keys.remove(digest);
                    }
                    for (identity, _) in &p.parts[i].certs {
                        certs.remove(identity);
                    }
                }
                (keys, certs, replaced)
            }
            _ => {
                let nkeys = parts.iter().map(|p| p.keys.len()).sum();
                let keys = DigestMap::with_capacity_and_hasher(nkeys, Default::default());
                (keys, HashMap::new(), (0..parts.len()).collect())
            }
        };
        for pi in rebuilt {
            let part = &parts[pi];
            let at = |index: u32| ClientRef { part: pi as u32, index };
            for (digest, index, expires_at) in &part.keys {
                if keys.insert(*digest, KeyRef { client: at(*index), expires_at: *expires_at }).is_some() {
                    return Err(CompileError::DuplicateKey(portcullis_table::fingerprint(&KeyDigest(digest.0))));
                }
            }
            for (identity, index) in &part.certs {
                if certs.insert(identity.clone(), at(*index)).is_some() {
                    return Err(CompileError::DuplicateCertificate(identity.to_string()));
                }
            }
        }
        let global_plans = specs.values().filter(|s| s.counts_globally()).count();
        Ok(Self {
            service,
            revision,
            deny_all,
            keys,
            certs,
            parts,
            plans,
            specs,
            clock,
            store_counts: false,
            global_plans,
        })
    }

    /// How many clients the table has.
    pub fn client_count(&self) -> usize {
        self.parts.iter().map(|p| p.clients.len()).sum()
    }

    /// How many parts (shards) the table has.
    pub fn part_count(&self) -> usize {
        self.parts.len()
    }

    /// The client at `r` (from a key or certificate lookup; a table compiled whole has one part, 0).
    pub fn client_at(&self, r: ClientRef) -> &CompiledClient<C> {
        &self.parts[r.part as usize].clients[r.index as usize]
    }

    /// The client a key digest belongs to, with the key's expiry.
    pub fn lookup(&self, digest: &KeyDigest) -> Option<(&CompiledClient<C>, KeyRef)> {
        let r = *self.keys.get(&DigestKey(digest.0))?;
        Some((self.client_at(r.client), r))
    }

    /// The one client `cert` identifies: its identities must all lead to the same client (none leading nowhere
    /// is fine); a certificate matching two clients identifies none.
    pub fn lookup_cert(&self, cert: &PeerCert) -> Option<(ClientRef, &CompiledClient<C>)> {
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
        found.map(|i| (i, self.client_at(i)))
    }

    /// Whether `cert` carries an identity of the client at `client`.
    pub fn cert_matches(&self, cert: &PeerCert, client: ClientRef) -> bool {
        cert.identities.iter().any(|id| self.certs.get(id) == Some(&client))
    }

    pub fn client(&self, id: &str) -> Option<&CompiledClient<C>> {
        self.parts.iter().flat_map(|p| p.clients.iter()).find(|c| c.id == id)
    }
}

/// Compiles one part: `clients` (validated, sorted by id) under `plans`, limiter state carried over from `prev`.
fn compile_part<'p, C: Clock + Clone + 'p>(
    digest: String,
    clients_in: Vec<portcullis_table::Client>,
    plans: &BTreeMap<String, Plan>,
    specs: &HashMap<String, Arc<PlanSpec>>,
    prev: impl Fn(&str) -> Option<&'p CompiledClient<C>>,
    clock: &C,
) -> Result<Part<C>, CompileError> {
    if clients_in.len() > u32::MAX as usize {
        return Err(CompileError::TooManyClients(clients_in.len()));
    }
    let mut keys = Vec::with_capacity(clients_in.len());
    let mut certs = Vec::new();
    let mut clients = Vec::with_capacity(clients_in.len());
    for (i, c) in clients_in.into_iter().enumerate() {
        let header = HeaderValue::from_str(&c.id).map_err(|_| CompileError::ClientId(c.id.clone()))?;
        let prev = prev(&c.id);
        let mut compiled_plans = Vec::with_capacity(c.plans.len());
        for name in &c.plans {
            // `Table::validate` guarantees the plan exists; a missing one is treated as an empty plan.
            let plan = plans.get(name).cloned().unwrap_or_default();
            let spec = specs.get(name).cloned().unwrap_or_else(|| Arc::new(PlanSpec::new(name, &Plan::default())));
            let prev_plan = prev.and_then(|p| p.plans().find(|pp| &pp.spec.name == name));
            let throttle =
                plan.throttle.map(|t| ThrottleState::carry_over(t, prev_plan.and_then(|p| p.throttle.as_ref()), clock));
            let quota = plan.quota.map(|q| QuotaCounter::carry_over(q, prev_plan.and_then(|p| p.quota.as_ref())));
            compiled_plans.push(CompiledPlan { spec, throttle, quota });
        }
        for k in &c.keys {
            keys.push((DigestKey::from(k.sha256), i as u32, k.expires_at));
        }
        for ci in &c.certificates {
            // `validate_clients` guarantees an identity names one client of the part.
            certs.push((ci.normalized(), i as u32));
        }
        let mut compiled_plans = compiled_plans.into_iter();
        clients.push(CompiledClient {
            disabled: c.disabled,
            require_certificate: c.require_certificate,
            sources: CidrSet::new(&c.source_ranges),
            first_plan: compiled_plans.next(),
            more_plans: compiled_plans.collect(),
            header,
            id: c.id,
        });
    }
    Ok(Part { digest, clients, keys, certs })
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

    /// A stable-layout revision that changes one client compiles one part; the others (and their limiter state)
    /// are the previous table's own.
    #[test]
    fn a_stable_revision_shares_its_unchanged_parts() {
        use portcullis_table::shard::{IndexDoc, Previous, check_shard, render, shard_of};
        let mut plans = BTreeMap::new();
        plans.insert(
            "p".to_string(),
            Plan { throttle: Some(Throttle { rate: 1, per_millis: 60_000, burst: 1 }), ..Default::default() },
        );
        let client = |i: usize, range: &str| {
            Client::builder(format!("ns/c{i:04}")).key(format!("k{i}")).source(range).plan("p").build()
        };
        let t1 = Table::new("ns/svc", plans.clone(), (0..600).map(|i| client(i, "127.0.0.1/32")).collect());
        let r1 = render(&t1, "i", Previous::NONE, 1, 8 * 1024).unwrap();
        let idx1 = IndexDoc::parse(&r1.index_json, "i").unwrap();
        let n = idx1.shards.len();
        assert!(n >= 4, "{n} shards");
        let read = |idx: &IndexDoc, i: usize, texts: &[(String, String)]| {
            let text = texts.iter().find(|(name, _)| *name == idx.shards[i].name).map(|(_, t)| t.as_str());
            ShardInput::New { digest: idx.shards[i].sha256.clone(), clients: check_shard(idx, i, text).unwrap() }
        };
        let clock = FakeRelativeClock::default();
        let inputs = (0..n).map(|i| read(&idx1, i, &r1.shards)).collect();
        let c1 = CompiledTable::compile_stable(&idx1, inputs, None, clock.clone()).unwrap();
        assert_eq!((c1.client_count(), c1.part_count()), (600, n));
        for i in [0, 299, 599] {
            assert_eq!(c1.lookup(&key_digest(format!("k{i}").as_bytes())).unwrap().0.id, format!("ns/c{i:04}"));
        }
        // Use up the burst of two clients: one in the shard that will change, one elsewhere.
        let changed = shard_of("ns/c0007", n);
        let other = (0..600).find(|i| shard_of(&format!("ns/c{i:04}"), n) != changed).unwrap();
        for i in [7, other] {
            let (c, _) = c1.lookup(&key_digest(format!("k{i}").as_bytes())).unwrap();
            assert!(c.plans().next().unwrap().throttle.as_ref().unwrap().check().is_ok());
        }

        // Client 7 gets another range: one shard changes.
        let mut t2 = t1.clone();
        t2.clients[7] = std::sync::Arc::new(client(7, "127.0.0.2/32"));
        t2.revision = t2.compute_revision();
        let r2 = render(&t2, "i", Previous::of(Some(&idx1), Some(&t1)), 2, 8 * 1024).unwrap();
        let idx2 = IndexDoc::parse(&r2.index_json, "i").unwrap();
        assert_eq!(r2.shards.len(), 1);
        let inputs = (0..n)
            .map(|i| match c1.reusable_part(&idx2, i) {
                Some(part) => ShardInput::Keep(part),
                None => read(&idx2, i, &r2.shards),
            })
            .collect();
        let c2 = CompiledTable::compile_stable(&idx2, inputs, Some(&c1), clock.clone()).unwrap();
        let shared: Vec<bool> = (0..n).map(|i| Arc::ptr_eq(&c1.parts[i], &c2.parts[i])).collect();
        assert_eq!(shared.iter().filter(|s| !**s).count(), 1, "{shared:?}");
        assert!(!shared[changed]);
        for i in [7, other] {
            let (c, _) = c2.lookup(&key_digest(format!("k{i}").as_bytes())).unwrap();
            assert!(c.plans().next().unwrap().throttle.as_ref().unwrap().check().is_err(), "client {i}: state kept");
        }
        let (c7, _) = c2.lookup(&key_digest(b"k7")).unwrap();
        assert!(
            c7.sources.contains("127.0.0.2".parse().unwrap()) && !c7.sources.contains("127.0.0.1".parse().unwrap())
        );
        assert_eq!(c2.client_count(), 600);

        // Other plans: nothing is reused.
        let mut idx3 = idx2.clone();
        idx3.plans.get_mut("p").unwrap().throttle = Some(Throttle { rate: 2, per_millis: 60_000, burst: 2 });
        assert!((0..n).all(|i| c2.reusable_part(&idx3, i).is_none()));
    }

    /// The key map of a revision compiled from the previous one (its entries of the replaced parts swapped) is the
    /// map a compile from scratch builds, also when a key moves from one part to another; a key that a kept part
    /// still holds is refused.
    #[test]
    fn a_patched_key_map_is_the_map_built_from_scratch() {
        use portcullis_table::shard::{IndexDoc, Previous, check_shard, render, shard_of};
        let mut plans = BTreeMap::new();
        plans.insert("p".to_string(), Plan::default());
        let client = |i: usize, key: &str| {
            Client::builder(format!("ns/c{i:04}")).key(key).source("127.0.0.1/32").plan("p").build()
        };
        let t1 = Table::new("ns/svc", plans, (0..400).map(|i| client(i, &format!("k{i}"))).collect());
        let r1 = render(&t1, "i", Previous::NONE, 1, 8 * 1024).unwrap();
        let idx1 = IndexDoc::parse(&r1.index_json, "i").unwrap();
        let n = idx1.shards.len();
        let read = |idx: &IndexDoc, i: usize, texts: &[&[(String, String)]]| {
            let text = texts
                .iter()
                .flat_map(|t| t.iter())
                .find(|(name, _)| *name == idx.shards[i].name)
                .map(|(_, t)| t.as_str());
            ShardInput::New { digest: idx.shards[i].sha256.clone(), clients: check_shard(idx, i, text).unwrap() }
        };
        let clock = FakeRelativeClock::default();
        let c1 = CompiledTable::compile_stable(
            &idx1,
            (0..n).map(|i| read(&idx1, i, &[&r1.shards])).collect(),
            None,
            clock.clone(),
        )
        .unwrap();
        let entries = |c: &CompiledTable<FakeRelativeClock>| {
            let mut v: Vec<([u8; 32], u32, u32)> =
                c.keys.iter().map(|(d, r)| (d.0, r.client.part, r.client.index)).collect();
            v.sort();
            v
        };
        // Client 3 gives up its key; a client in another shard takes it (dropping its own); client 7's key rotates.
        let a = 3;
        let b = (0..400).find(|i| shard_of(&format!("ns/c{i:04}"), n) != shard_of("ns/c0003", n)).unwrap();
        let mut t2 = t1.clone();
        t2.clients[a] = std::sync::Arc::new(client(a, "k3-new"));
        t2.clients[b] = std::sync::Arc::new(client(b, "k3"));
        t2.clients[7] = std::sync::Arc::new(client(7, "k7-rotated"));
        t2.revision = t2.compute_revision();
        let r2 = render(&t2, "i", Previous::of(Some(&idx1), Some(&t1)), 2, 8 * 1024).unwrap();
        let idx2 = IndexDoc::parse(&r2.index_json, "i").unwrap();
        let inputs = (0..n)
            .map(|i| match c1.reusable_part(&idx2, i) {
                Some(part) => ShardInput::Keep(part),
                None => read(&idx2, i, &[&r2.shards, &r1.shards]),
            })
            .collect();
        let patched = CompiledTable::compile_stable(&idx2, inputs, Some(&c1), clock.clone()).unwrap();
        let scratch = CompiledTable::compile_stable(
            &idx2,
            (0..n).map(|i| read(&idx2, i, &[&r2.shards, &r1.shards])).collect(),
            None,
            clock.clone(),
        )
        .unwrap();
        assert_eq!(entries(&patched), entries(&scratch));
        assert_eq!(patched.lookup(&key_digest(b"k3")).unwrap().0.id, format!("ns/c{b:04}"));
        assert!(patched.lookup(&key_digest(b"k7")).is_none(), "the rotated key is gone");
        assert!(patched.lookup(&key_digest(&format!("k{b}").into_bytes())).is_none());

        // A new part claiming a key a kept part holds: refused, as a compile from scratch refuses it.
        let holder = (0..400)
            .find(|i| ![a, b, 7].contains(i) && shard_of(&format!("ns/c{i:04}"), n) != shard_of("ns/c0003", n))
            .unwrap();
        let mut t3 = t2.clone();
        t3.clients[a] = std::sync::Arc::new(client(a, &format!("k{holder}")));
        t3.revision = t3.compute_revision();
        let r3 = render(&t3, "i", Previous::of(Some(&idx2), Some(&t2)), 3, 8 * 1024).unwrap();
        let idx3 = IndexDoc::parse(&r3.index_json, "i").unwrap();
        let inputs = (0..n)
            .map(|i| match patched.reusable_part(&idx3, i) {
                Some(part) => ShardInput::Keep(part),
                None => read(&idx3, i, &[&r3.shards, &r2.shards, &r1.shards]),
            })
            .collect();
        let r = CompiledTable::compile_stable(&idx3, inputs, Some(&patched), clock);
        assert!(matches!(r, Err(CompileError::DuplicateKey(_))), "{:?}", r.err());
    }

    #[test]
    fn a_key_in_two_parts_refuses_the_table() {
        let mut plans = BTreeMap::new();
        plans.insert("p".to_string(), Plan::default());
        let idx = portcullis_table::shard::IndexDoc {
            schema_version: portcullis_table::shard::STABLE_LAYOUT,
            service: "ns/svc".into(),
            revision: "r".into(),
            sequence: 1,
            slot: portcullis_table::naming::Slot::A,
            clients: 2,
            plans,
            shards: vec![],
            deny_all: None,
        };
        let part = |id: &str| ShardInput::New {
            digest: format!("d-{id}"),
            clients: vec![Client::builder(id).key("same").source("127.0.0.1/32").plan("p").build()],
        };
        let r =
            CompiledTable::compile_stable(&idx, vec![part("ns/a"), part("ns/b")], None, FakeRelativeClock::default());
        assert!(matches!(r, Err(CompileError::DuplicateKey(_))), "{:?}", r.err());
    }
}
