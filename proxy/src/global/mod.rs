//! Counts shared by every replica of a Service, in the shared store (Redis): `globalLimits` throttles (GCRA in one
//! server-side script) and global quotas (per client, plan and UTC period). Runs after the pure decision
//! ([`crate::decision::decide`] leaves these counts alone when a store is configured) and only for plans that
//! count globally. See docs/global-limits.md.
//!
//! - [`lease`]: local leases taken from the store in chunks (pure);
//! - [`health`]: the circuit breaker and the replica count (pure);
//! - [`fallback`]: `onStoreUnavailable` and the `Local` policy's divided limiters (pure);
//! - this module: the I/O — the store calls (bounded by `--store-timeout`), the background probe, heartbeat and
//!   the return of expired leases.

pub mod fallback;
pub mod health;
pub mod lease;

use crate::decision::{Denial, PlanSpec, Reason, quota_exceeded, rate_limited};
use crate::metrics::{KindLabels, Metrics, OpLabels, PolicyLabels};
use crate::tables::TableStore;
use fallback::LocalShare;
use health::{HEARTBEAT_INTERVAL, Health, PROBE_INTERVAL, REPLICA_TTL};
use lease::{Grant, Lease, LeaseParams, Leftover, Needs, Step, StoreLatency};
use portcullis_store::{Store, StoreConfig, StoreError, Take};
use portcullis_table::period::{period_end, period_number};
use portcullis_table::store_keys::{quota_key, quota_key_expires_at, quota_key_of_period, replicas_key, throttle_key};
use portcullis_table::{Quota, StoreFallback, Throttle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What one allowed request asks of the shared counts.
#[derive(Debug, Clone)]
pub struct Ask {
    pub client: String,
    pub plan: Arc<PlanSpec>,
    /// The plan's throttle, when it is global.
    pub throttle: Option<Throttle>,
    /// The plan's quota, when it is global.
    pub quota: Option<Quota>,
    /// Unix seconds (the quota's period).
    pub now_unix: i64,
}

/// A lease with the specs it was taken under (to give it back without looking the plan up again).
struct Entry {
    lease: Lease,
    throttle: Option<Throttle>,
    quota: Option<Quota>,
}

type LeaseMap = HashMap<String, HashMap<String, Arc<Mutex<Entry>>>>;

pub struct GlobalLimits {
    store: Store,
    replica_id: String,
    params: LeaseParams,
    up: AtomicBool,
    health: Mutex<Health>,
    leases: RwLock<LeaseMap>,
    shares: Mutex<HashMap<(String, String), LocalShare>>,
    metrics: Arc<Metrics>,
    /// The store's recent slow round trip, updated by every store call ([`GlobalLimits::observe`]) …
    latency: Mutex<StoreLatency>,
    /// … and the lease lead it gives, in µs, read by every request without a lock ([`LeaseParams::lead`]).
    lead_us: AtomicU64,
}

impl GlobalLimits {
    /// Validates the settings and prepares the connection (made in the background: a store that is down at start
    /// only means the plans' fallbacks apply until it is up).
    pub fn new(config: &StoreConfig, replica_id: String, metrics: Arc<Metrics>) -> Result<Arc<Self>, StoreError> {
        let store = Store::connect_lazy(config)?;
        tracing::info!(store = %config, replica_id, "shared store configured for global limits");
        Ok(Arc::new(Self {
            store,
            replica_id,
            params: LeaseParams::default(),
            up: AtomicBool::new(false),
            health: Mutex::new(Health::new(Instant::now())),
            leases: RwLock::new(HashMap::new()),
            shares: Mutex::new(HashMap::new()),
            metrics,
            latency: Mutex::new(StoreLatency::new(Instant::now())),
            lead_us: AtomicU64::new(0),
        }))
    }

    /// The lease parameters with the current lead.
    fn lease_params(&self) -> LeaseParams {
        LeaseParams { lead: Duration::from_micros(self.lead_us.load(Ordering::Relaxed)), ..self.params }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counts one request in the shared store (or its lease), or falls back per the plan's policy.
    pub async fn admit(self: &Arc<Self>, ask: &Ask) -> Result<(), Denial> {
        if ask.throttle.is_none() && ask.quota.is_none() {
            return Ok(());
        }
        if !self.up.load(Ordering::Acquire) {
            return self.fall_back(ask);
        }
        let needs = Needs {
            burst: ask.throttle.map(|t| u64::from(t.burst.max(1))),
            quota: ask.quota.map(|q| (q.limit, period_number(q.period, ask.now_unix))),
        };
        let lease = self.lease(&ask.client, &ask.plan.name);
        let mut step = {
            let mut e = lock(&lease);
            e.throttle = ask.throttle;
            e.quota = ask.quota;
            e.lease.step(Instant::now(), needs, &self.lease_params())
        };
        // Built only when the store is asked (a request the lease admits formats no key).
        let mut keys: Option<Keys> = None;
        // Concurrent requests may spend a grant before this one does: ask again, a few times at most.
        for _ in 0..4 {
            let Step::Fetch { tokens, units } = step else { break };
            let keys = keys.get_or_insert_with(|| Keys::of(ask));
            let started = Instant::now();
            let result = self.store.take(&keys.take(ask, needs, tokens, units)).await;
            self.observe("take", started, result.as_ref().err());
            let granted = match result {
                Ok(g) => g,
                Err(e) => {
                    self.store_failed(&e);
                    return self.fall_back(ask);
                }
            };
            let g = grant(granted, started.elapsed());
            let (next, stale) =
                lock(&lease).lease.granted(Instant::now(), needs, &self.lease_params(), (tokens, units), g);
            if stale.units > 0 {
                self.give_back_later(ask, stale);
            }
            step = next;
        }
        if let Step::Fetch { tokens, .. } = step {
            // Still outrun after four grants (heavy contention on one client): refuse this one, remember nothing.
            return if tokens > 0 {
                self.outcome(Step::Throttled(Duration::from_millis(1)), ask)
            } else {
                self.outcome(Step::QuotaExhausted, ask)
            };
        }
        if step == Step::Admit {
            self.refill_in_background(&lease, ask, needs);
        }
        self.outcome(step, ask)
    }

    /// Tops the lease up off the request path when it is spent down to its watermark ([`Lease::refill`]).
    fn refill_in_background(self: &Arc<Self>, lease: &Arc<Mutex<Entry>>, ask: &Ask, needs: Needs) {
        let Some((tokens, units)) = lock(lease).lease.refill(Instant::now(), needs, &self.lease_params()) else {
            return;
        };
        let (this, lease, ask) = (self.clone(), lease.clone(), ask.clone());
        tokio::spawn(async move {
            let keys = Keys::of(&ask);
            let started = Instant::now();
            let result = this.store.take(&keys.take(&ask, needs, tokens, units)).await;
            this.observe("refill", started, result.as_ref().err());
            match result {
                Ok(g) => {
                    let g = grant(g, started.elapsed());
                    let stale =
                        lock(&lease).lease.refilled(Instant::now(), needs, &this.lease_params(), (tokens, units), g);
                    if stale.units > 0 {
                        this.give_back_later(&ask, stale);
                    }
                }
                Err(e) => {
                    lock(&lease).lease.refill_failed();
                    this.store_failed(&e);
                }
            }
        });
    }

    fn outcome(&self, step: Step, ask: &Ask) -> Result<(), Denial> {
        match step {
            Step::Admit => Ok(()),
            Step::Throttled(wait) => Err(rate_limited(&ask.throttle.expect("throttled needs a throttle"), wait)),
            Step::QuotaExhausted => {
                let q = ask.quota.expect("exhausted needs a quota");
                Err(quota_exceeded(&q, ask.now_unix, period_end(q.period, ask.now_unix)))
            }
            Step::Fetch { .. } => unreachable!("a fetch is answered before the outcome"),
        }
    }

    fn lease(&self, client: &str, plan: &str) -> Arc<Mutex<Entry>> {
        if let Some(l) = read(&self.leases).get(client).and_then(|m| m.get(plan)) {
            return l.clone();
        }
        let mut map = self.leases.write().unwrap_or_else(|e| e.into_inner());
        map.entry(client.to_string())
            .or_default()
            .entry(plan.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Entry { lease: Lease::new(Instant::now()), throttle: None, quota: None }))
            })
            .clone()
    }

    /// The plan's `onStoreUnavailable` decides.
    fn fall_back(&self, ask: &Ask) -> Result<(), Denial> {
        let policy = ask.plan.on_store_unavailable;
        self.metrics.store_fallbacks.get_or_create(&PolicyLabels { policy: fallback::label(policy) }).inc();
        match policy {
            StoreFallback::FailOpen => Ok(()),
            StoreFallback::FailClosed => {
                Err(Denial { reason: Reason::StoreUnavailable, retry_after: Some(1), rate_limit: None })
            }
            StoreFallback::Local => self.local_share(ask),
        }
    }

    fn local_share(&self, ask: &Ask) -> Result<(), Denial> {
        let replicas = lock(&self.health).replicas();
        let used = read(&self.leases)
            .get(&ask.client)
            .and_then(|m| m.get(&ask.plan.name))
            .and_then(|l| lock(l).lease.last_used)
            .filter(|(_, period)| ask.quota.is_some_and(|q| period_number(q.period, ask.now_unix) == *period))
            .map_or(0, |(used, _)| used);
        let mut shares = lock(&self.shares);
        let key = (ask.client.to_string(), ask.plan.name.clone());
        let share = shares.entry(key).or_insert_with(|| LocalShare::new(ask.throttle, ask.quota, used, replicas));
        if !share.matches(ask.throttle, ask.quota, replicas) {
            *share = LocalShare::new(ask.throttle, ask.quota, used, replicas);
        }
        if let Some(t) = &share.throttle
            && let Err(wait) = t.check()
        {
            return Err(rate_limited(&t.spec, wait));
        }
        if let Some(q) = &share.quota
            && let Err(e) = q.try_acquire(ask.now_unix)
        {
            return Err(quota_exceeded(&q.spec, ask.now_unix, e.resets_at));
        }
        Ok(())
    }

    fn observe(&self, op: &'static str, started: Instant, error: Option<&StoreError>) {
        let rtt = started.elapsed();
        self.metrics.store_latency.get_or_create(&OpLabels { op }).observe(rtt.as_secs_f64());
        if error.is_none() {
            let now = Instant::now();
            let mut latency = lock(&self.latency);
            latency.observe(now, rtt);
            self.lead_us.store(latency.lead(now).as_micros() as u64, Ordering::Relaxed);
        }
        if let Some(e) = error {
            self.metrics.store_errors.get_or_create(&KindLabels { kind: e.kind() }).inc();
        }
    }

    fn store_failed(&self, e: &StoreError) {
        let opened = lock(&self.health).failed(Instant::now(), e.kind(), e.to_string());
        self.up.store(false, Ordering::Release);
        self.metrics.store_up.set(0);
        if opened {
            tracing::warn!(error = %e, "shared store unavailable: plans fall back per onStoreUnavailable until it answers");
        }
    }

    fn store_answered(&self, replicas: Option<u64>) {
        let mut h = lock(&self.health);
        let closed = h.succeeded(Instant::now(), replicas);
        self.metrics.store_replicas.set(h.replicas() as i64);
        drop(h);
        self.up.store(true, Ordering::Release);
        self.metrics.store_up.set(1);
        if closed {
            // Local shares counted during the outage start afresh next time.
            lock(&self.shares).clear();
            tracing::info!(?replicas, "shared store reachable: global limits counted in it");
        }
    }

    /// The `/readyz` line.
    pub fn describe(&self) -> String {
        lock(&self.health).describe(Instant::now())
    }

    pub fn replicas(&self) -> u64 {
        lock(&self.health).replicas()
    }

    fn give_back_later(&self, ask: &Ask, left: Leftover) {
        let Some(q) = ask.quota else { return };
        let job = GiveBack {
            throttle_key: throttle_key(&ask.client, &ask.plan.name),
            interval_us: 1,
            tokens: 0,
            quota_key: quota_key_of_period(&ask.client, &ask.plan.name, q.period, left.period),
            units: left.units,
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            let _ = job.send(&store).await;
        });
    }

    /// Background work until `stop`: heartbeat (the replica count) while up, a probe every
    /// [`PROBE_INTERVAL`] while down, and the return of expired leases.
    pub async fn run(self: Arc<Self>, tables: Arc<TableStore>, mut stop: watch::Receiver<bool>) {
        let mut next_heartbeat = Instant::now();
        let mut counted = false;
        loop {
            let now = Instant::now();
            // The first table names the Service: heartbeat at once rather than at the next interval.
            let first_count = !counted && tables.current.load().is_some();
            if now >= next_heartbeat || !self.up.load(Ordering::Acquire) || first_count {
                counted |= self.probe(&tables).await;
                next_heartbeat = Instant::now() + HEARTBEAT_INTERVAL;
            }
            if self.up.load(Ordering::Acquire) {
                self.return_expired().await;
            }
            let pause = if self.up.load(Ordering::Acquire) { self.params.ttl / 2 } else { PROBE_INTERVAL };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
        }
        self.return_all().await;
    }

    /// Heartbeat (with a table) or PING; true when the replicas were counted.
    async fn probe(&self, tables: &TableStore) -> bool {
        let service = tables.current.load().as_ref().map(|t| t.service.clone());
        let started = Instant::now();
        let result = match &service {
            Some(s) => self.store.heartbeat(&replicas_key(s), &self.replica_id, REPLICA_TTL).await.map(Some),
            None => self.store.ping().await.map(|_| None),
        };
        self.observe("heartbeat", started, result.as_ref().err());
        match result {
            Ok(replicas) => {
                self.store_answered(replicas);
                replicas.is_some()
            }
            Err(e) => {
                self.store_failed(&e);
                false
            }
        }
    }

    /// Gives back what leases hold past their ttl, and forgets idle entries.
    async fn return_expired(&self) {
        let jobs = self.collect(|l, now| l.take_expired(now));
        self.send_all(jobs).await;
        let now = Instant::now();
        let mut map = self.leases.write().unwrap_or_else(|e| e.into_inner());
        for plans in map.values_mut() {
            plans.retain(|_, l| !lock(l).lease.idle(now, &self.params));
        }
        map.retain(|_, plans| !plans.is_empty());
    }

    /// Shutdown: everything unspent goes back (a proxy killed without this leaves at most its leases counted).
    async fn return_all(&self) {
        let jobs = self.collect(|l, _| l.take_all());
        self.send_all(jobs).await;
    }

    fn collect(&self, mut take: impl FnMut(&mut Lease, Instant) -> Leftover) -> Vec<GiveBack> {
        let now = Instant::now();
        let mut jobs = Vec::new();
        for (client, plans) in read(&self.leases).iter() {
            for (plan, entry) in plans {
                let mut e = lock(entry);
                let left = take(&mut e.lease, now);
                if left.tokens == 0 && left.units == 0 {
                    continue;
                }
                jobs.push(GiveBack {
                    throttle_key: throttle_key(client, plan),
                    interval_us: e.throttle.map_or(1, |t| interval_us(&t)),
                    tokens: if e.throttle.is_some() { left.tokens } else { 0 },
                    quota_key: e
                        .quota
                        .map_or_else(String::new, |q| quota_key_of_period(client, plan, q.period, left.period)),
                    units: if e.quota.is_some() { left.units } else { 0 },
                });
            }
        }
        jobs
    }

    async fn send_all(&self, jobs: Vec<GiveBack>) {
        for job in jobs {
            let started = Instant::now();
            let result = job.send(&self.store).await;
            self.observe("give_back", started, result.as_ref().err());
            if let Err(e) = result {
                self.store_failed(&e);
                return;
            }
        }
    }
}

struct GiveBack {
    throttle_key: String,
    interval_us: u64,
    tokens: u64,
    quota_key: String,
    units: u64,
}

impl GiveBack {
    async fn send(&self, store: &Store) -> Result<(), StoreError> {
        store.give_back(&self.throttle_key, self.tokens, self.interval_us, &self.quota_key, self.units).await
    }
}

/// The store's answer as the lease sees it. The store's wait was measured at the store, about half the round trip
/// `rtt` ago: shortened by that, the next claim (sent when the wait ends) reaches the store about when the token
/// falls due rather than a whole round trip later — lateness the store's carry absorbs, but that a loaded machine
/// would add to.
fn grant(g: portcullis_store::Granted, rtt: Duration) -> Grant {
    let wait = Duration::from_micros(g.wait_us).saturating_sub(rtt / 2).max(Duration::from_micros(1));
    Grant { tokens: g.tokens, wait, units: g.units, used: g.used }
}

/// GCRA emission interval in µs, rounded up (never admits more than the rate).
pub fn interval_us(t: &Throttle) -> u64 {
    (t.per_millis.max(1) * 1000).div_ceil(u64::from(t.rate.max(1))).max(1)
}

/// The store keys and GCRA interval of one ask, from which every `take` of it is built.
struct Keys {
    throttle: String,
    quota: String,
    interval_us: u64,
    expires_at: i64,
}

impl Keys {
    fn of(ask: &Ask) -> Self {
        let (quota, expires_at) = match ask.quota {
            Some(q) => (
                quota_key(&ask.client, &ask.plan.name, q.period, ask.now_unix),
                quota_key_expires_at(q.period, ask.now_unix),
            ),
            None => (String::new(), 0),
        };
        Self {
            throttle: throttle_key(&ask.client, &ask.plan.name),
            quota,
            interval_us: ask.throttle.map_or(1, |t| interval_us(&t)),
            expires_at,
        }
    }

    fn take(&self, ask: &Ask, needs: Needs, tokens: u64, units: u64) -> Take<'_> {
        Take {
            throttle_key: &self.throttle,
            tokens,
            interval_us: self.interval_us,
            burst: needs.burst.unwrap_or(1),
            quota_key: &self.quota,
            units,
            limit: ask.quota.map_or(0, |q| q.limit),
            expires_at: self.expires_at,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_round_up() {
        assert_eq!(interval_us(&Throttle { rate: 3, per_millis: 1000, burst: 1 }), 333_334);
        assert_eq!(interval_us(&Throttle { rate: 10_000_000, per_millis: 1000, burst: 1 }), 1);
    }
}
