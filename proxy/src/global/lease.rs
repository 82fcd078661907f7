//! Leases of shared counts, per (client, plan): what this proxy took from the store and has not used yet. Pure
//! (time is passed in), so every transition is unit-tested without a store.
//!
//! A request first spends from the local lease. When the lease is empty it asks the store for a chunk sized to the
//! client's observed rate (about [`LeaseParams::window`] of its traffic, capped), so a busy client costs one store
//! round trip per chunk rather than per request, and a quiet one (chunk 1) is counted exactly. A lease whose chunk
//! is at least 2 is refilled **in the background** once it is spent down to half a chunk ([`Lease::refill`]), so a
//! busy client's requests find tokens in the lease and do not wait for the store; only a request that finds the
//! lease empty (a quiet client, a first request, a burst faster than the refill) waits for a round trip. What a lease has
//! not spent when it expires ([`LeaseParams::ttl`]) goes back to the store (Doorman-style), so nothing leased is
//! lost for longer than the ttl. A refusal from the store is remembered locally (the throttle's wait, or the
//! quota's exhaustion for one ttl), so a client far over its limit is refused without a store call.
//!
//! Accuracy: the store's count is authoritative and leases are taken from it, so a proxy never admits more than
//! the store granted: the global limit is never exceeded. What leases cost is the other direction: while one
//! replica holds unused tokens or units, another may be refused early, by at most (replicas − 1) × chunk, until
//! the lease is spent or returned (≤ ttl).

use std::time::{Duration, Instant};

/// How leases are sized and how long they live.
#[derive(Debug, Clone, Copy)]
pub struct LeaseParams {
    /// A chunk covers about this much of the client's observed traffic.
    pub window: Duration,
    /// Unspent lease is returned after this long.
    pub ttl: Duration,
    /// Throttle chunks are at most burst / this (at least 1), so one replica never holds the whole burst.
    pub burst_divisor: u64,
    /// Quota chunks are at most limit / this (at least 1).
    pub quota_divisor: u64,
    /// And never more than this.
    pub max_chunk: u64,
    /// How far ahead of running out a refill must start: about two of the store's recent slow round trips
    /// ([`StoreLatency::lead`]; zero: the half-chunk watermark alone). A chunk then covers at least twice this much
    /// traffic and a lease is refilled when it holds no more than this much, so a store that slows down (a loaded
    /// Redis, a busier network) widens the leases instead of letting requests find them empty and wait.
    pub lead: Duration,
}

impl Default for LeaseParams {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(20),
            ttl: Duration::from_millis(200),
            burst_divisor: 4,
            quota_divisor: 1000,
            max_chunk: 1024,
            lead: Duration::ZERO,
        }
    }
}

/// The store's recent slow round trip, from which [`LeaseParams::lead`] is derived: the longest round trip seen,
/// halving for every second since it was seen (one slow call widens leases for a few seconds, not for ever). Pure:
/// time is passed in.
#[derive(Debug, Clone, Copy)]
pub struct StoreLatency {
    slow: Duration,
    at: Instant,
}

/// A lead never exceeds this (a store that takes longer is failing: its timeout and circuit handle it).
const MAX_LEAD: Duration = Duration::from_millis(50);

impl StoreLatency {
    pub fn new(now: Instant) -> Self {
        Self { slow: Duration::ZERO, at: now }
    }

    /// One store call took `rtt`.
    pub fn observe(&mut self, now: Instant, rtt: Duration) {
        let decayed = self.decayed(now);
        if rtt >= decayed {
            self.slow = rtt;
            self.at = now;
        }
    }

    fn decayed(&self, now: Instant) -> Duration {
        let halvings = now.saturating_duration_since(self.at).as_secs_f64();
        self.slow.mul_f64(0.5f64.powf(halvings))
    }

    /// Two recent slow round trips, at most [`MAX_LEAD`].
    pub fn lead(&self, now: Instant) -> Duration {
        (self.decayed(now) * 2).min(MAX_LEAD)
    }
}

/// What a request needs counted in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// The throttle's burst, when the throttle is global.
    pub burst: Option<u64>,
    /// The quota's limit and the current period's number, when the quota is global.
    pub quota: Option<(u64, u64)>,
}

/// The outcome of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Counted (spent from the lease): pass.
    Admit,
    /// Over the throttle: the next token comes in this long.
    Throttled(Duration),
    /// Over the quota.
    QuotaExhausted,
    /// Ask the store for this many tokens and units (nothing was spent).
    Fetch { tokens: u64, units: u64 },
}

/// What the store granted for a [`Step::Fetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    pub tokens: u64,
    /// Until the next token, when none was granted.
    pub wait: Duration,
    pub units: u64,
    /// The quota's count in the store after the grant.
    pub used: u64,
}

/// Unspent lease to return to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leftover {
    pub tokens: u64,
    pub units: u64,
    /// The period the units were leased in (their key).
    pub period: u64,
}

#[derive(Debug, Clone)]
pub struct Lease {
    tokens: u64,
    tokens_until: Instant,
    throttled_until: Option<Instant>,
    units: u64,
    units_period: u64,
    units_until: Instant,
    exhausted_until: Option<(Instant, u64)>,
    /// Quota used in the store after the last grant (for the `Local` fallback's share).
    pub last_used: Option<(u64, u64)>,
    rate: RateEstimate,
    /// A background refill is in flight ([`Lease::refill`] … [`Lease::refilled`]).
    refilling: bool,
}

impl Lease {
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: 0,
            tokens_until: now,
            throttled_until: None,
            units: 0,
            units_period: 0,
            units_until: now,
            exhausted_until: None,
            last_used: None,
            rate: RateEstimate::new(now),
            refilling: false,
        }
    }

    fn has_tokens(&self, now: Instant) -> bool {
        self.tokens > 0 && now < self.tokens_until
    }

    fn has_units(&self, now: Instant, period: u64) -> bool {
        self.units > 0 && self.units_period == period && now < self.units_until
    }

    /// The first step of a request: spend from the lease, refuse from memory, or say what to fetch.
    pub fn step(&mut self, now: Instant, needs: Needs, p: &LeaseParams) -> Step {
        self.rate.arrival(now);
        self.plan(now, needs, p)
    }

    fn plan(&mut self, now: Instant, needs: Needs, p: &LeaseParams) -> Step {
        let need_token = needs.burst.is_some() && !self.has_tokens(now);
        if need_token && let Some(until) = self.throttled_until {
            if now < until {
                return Step::Throttled(until - now);
            }
            self.throttled_until = None;
        }
        let need_unit = needs.quota.is_some_and(|(_, period)| !self.has_units(now, period));
        if need_unit
            && let Some((until, period)) = self.exhausted_until
            && needs.quota.is_some_and(|(_, p)| p == period)
        {
            if now < until {
                return Step::QuotaExhausted;
            }
            self.exhausted_until = None;
        }
        if !need_token && !need_unit {
            self.spend(needs);
            return Step::Admit;
        }
        let (want_tokens, want_units) = self.chunks(needs, p);
        let tokens = if need_token { want_tokens } else { 0 };
        let units = if need_unit { want_units } else { 0 };
        Step::Fetch { tokens, units }
    }

    /// The chunk sizes for this client now: (tokens, units), 0 for what `needs` does not count.
    fn chunks(&self, needs: Needs, p: &LeaseParams) -> (u64, u64) {
        let want = self.rate.chunk(p.window.max(p.lead * 2));
        let tokens = needs.burst.map_or(0, |burst| want.min(cap(burst, p.burst_divisor, p.max_chunk)));
        let units = needs.quota.map_or(0, |(limit, _)| want.min(cap(limit, p.quota_divisor, p.max_chunk)));
        (tokens, units)
    }

    /// After an admitted request: whether to refill in the background, and with what (tokens, units). A resource
    /// is refilled when its chunk is at least 2 and the lease holds at most half a chunk of it, or at most the
    /// traffic expected within [`LeaseParams::lead`] (a slow store is asked earlier); nothing is asked
    /// while a refill is in flight or while the store's last refusal holds. Marks the refill as in flight: answer
    /// with [`Lease::refilled`] or [`Lease::refill_failed`].
    ///
    /// A chunk of 1 (a quiet client, or a burst under 4) is never fetched ahead: holding a token another replica
    /// could use would cost accuracy, and such a client's requests are rare enough to wait.
    pub fn refill(&mut self, now: Instant, needs: Needs, p: &LeaseParams) -> Option<(u64, u64)> {
        if self.refilling {
            return None;
        }
        let (want_tokens, want_units) = self.chunks(needs, p);
        // What the client spends while a refill is on its way: refill before the lease holds less (never more than
        // a chunk ahead, so a lease holds at most two chunks).
        let in_lead = if p.lead.is_zero() { 0 } else { self.rate.chunk(p.lead) };
        let low = |held: u64, want: u64| want >= 2 && (held * 2 <= want || held <= in_lead.min(want));
        let held_tokens = if self.has_tokens(now) { self.tokens } else { 0 };
        let tokens = if low(held_tokens, want_tokens) && self.throttled_until.is_none_or(|u| now >= u) {
            want_tokens
        } else {
            0
        };
        let units = match needs.quota {
            Some((_, period)) => {
                let held = if self.has_units(now, period) { self.units } else { 0 };
                let refused = self.exhausted_until.is_some_and(|(u, p)| p == period && now < u);
                if low(held, want_units) && !refused { want_units } else { 0 }
            }
            None => 0,
        };
        if tokens == 0 && units == 0 {
            return None;
        }
        self.refilling = true;
        Some((tokens, units))
    }

    /// The store's answer to a [`Lease::refill`]: add to the lease (nothing is spent). A resource asked for and not
    /// granted is remembered as a refusal (the throttle's wait, or the quota's exhaustion for one ttl), so when the
    /// lease runs out the request is refused locally. Returns stale units of a past period, to give back.
    pub fn refilled(&mut self, now: Instant, needs: Needs, p: &LeaseParams, asked: (u64, u64), g: Grant) -> Leftover {
        self.refilling = false;
        let stale = self.add(now, needs, p, g);
        if asked.0 > 0 && g.tokens == 0 {
            self.throttled_until = Some(now + g.wait.max(Duration::from_micros(1)));
        }
        if let Some((_, period)) = needs.quota
            && asked.1 > 0
            && g.units == 0
        {
            self.exhausted_until = Some((now + p.ttl, period));
        }
        stale
    }

    /// A [`Lease::refill`] failed (the store did not answer): a later request may ask again.
    pub fn refill_failed(&mut self) {
        self.refilling = false;
    }

    /// Adds a grant to the lease (renewing its ttl); returns units of a past period.
    fn add(&mut self, now: Instant, needs: Needs, p: &LeaseParams, g: Grant) -> Leftover {
        let mut stale = Leftover::default();
        if g.tokens > 0 {
            if !self.has_tokens(now) {
                self.tokens = 0;
            }
            self.tokens += g.tokens;
            self.tokens_until = now + p.ttl;
        }
        if let Some((limit, period)) = needs.quota {
            if g.units > 0 || self.units_period != period {
                if self.units_period != period && self.units > 0 {
                    stale = Leftover { tokens: 0, units: self.units, period: self.units_period };
                    self.units = 0;
                }
                self.units += g.units;
                self.units_period = period;
                self.units_until = now + p.ttl;
            }
            self.last_used = Some((g.used.min(limit), period));
        }
        stale
    }

    /// The store's answer to a [`Step::Fetch`]: add to the lease, then spend for this request.
    /// `wait` is the store's time until the next token when it granted none. Returns what the old lease held
    /// that can no longer be used (units of a past period), to give back.
    ///
    /// `asked`: the [`Step::Fetch`] this answers. Only a resource asked for and not granted is a refusal; when
    /// concurrent requests spent what was granted (or what the lease held when this one asked for the other
    /// resource), the answer is another [`Step::Fetch`].
    pub fn granted(
        &mut self,
        now: Instant,
        needs: Needs,
        p: &LeaseParams,
        asked: (u64, u64),
        g: Grant,
    ) -> (Step, Leftover) {
        let Grant { tokens, wait, units, .. } = g;
        let stale = self.add(now, needs, p, g);
        if needs.burst.is_some() && !self.has_tokens(now) {
            if asked.0 > 0 && tokens == 0 {
                self.throttled_until = Some(now + wait.max(Duration::from_micros(1)));
                return (Step::Throttled(wait), stale);
            }
            return (self.plan(now, needs, p), stale);
        }
        if let Some((_, period)) = needs.quota
            && !self.has_units(now, period)
        {
            if asked.1 > 0 && units == 0 {
                self.exhausted_until = Some((now + p.ttl, period));
                return (Step::QuotaExhausted, stale);
            }
            return (self.plan(now, needs, p), stale);
        }
        self.spend(needs);
        (Step::Admit, stale)
    }

    fn spend(&mut self, needs: Needs) {
        if needs.burst.is_some() {
            self.tokens -= 1;
        }
        if needs.quota.is_some() {
            self.units -= 1;
        }
    }

    /// Takes what expired unspent (to give back to the store).
    pub fn take_expired(&mut self, now: Instant) -> Leftover {
        let mut out = Leftover { period: self.units_period, ..Default::default() };
        if self.tokens > 0 && now >= self.tokens_until {
            out.tokens = std::mem::take(&mut self.tokens);
        }
        if self.units > 0 && now >= self.units_until {
            out.units = std::mem::take(&mut self.units);
        }
        out
    }

    /// Takes everything unspent (shutdown).
    pub fn take_all(&mut self) -> Leftover {
        Leftover {
            tokens: std::mem::take(&mut self.tokens),
            units: std::mem::take(&mut self.units),
            period: self.units_period,
        }
    }

    /// Nothing held or remembered, and no traffic for a while: the entry may be dropped.
    pub fn idle(&self, now: Instant, p: &LeaseParams) -> bool {
        self.tokens == 0
            && self.units == 0
            && !self.refilling
            && self.throttled_until.is_none_or(|u| now >= u)
            && self.exhausted_until.is_none_or(|(u, _)| now >= u)
            && now.saturating_duration_since(self.rate.last) > p.ttl * 50
    }
}

fn cap(limit: u64, divisor: u64, max: u64) -> u64 {
    (limit / divisor.max(1)).clamp(1, max.max(1))
}

/// Requests per second, as an exponentially weighted average over 100 ms buckets.
#[derive(Debug, Clone)]
struct RateEstimate {
    bucket_start: Instant,
    in_bucket: u64,
    per_sec: f64,
    last: Instant,
}

const BUCKET: Duration = Duration::from_millis(100);

impl RateEstimate {
    fn new(now: Instant) -> Self {
        Self { bucket_start: now, in_bucket: 0, per_sec: 0.0, last: now }
    }

    fn arrival(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.bucket_start);
        if elapsed >= BUCKET {
            let buckets = (elapsed.as_nanos() / BUCKET.as_nanos()) as i32;
            let sample = self.in_bucket as f64 / BUCKET.as_secs_f64();
            // The bucket that just closed weighs 1/2; each empty bucket after it halves the estimate again.
            self.per_sec = (self.per_sec + sample) / 2.0 * 0.5f64.powi(buckets - 1);
            self.in_bucket = 0;
            self.bucket_start += BUCKET * buckets as u32;
        }
        self.in_bucket += 1;
        self.last = now;
    }

    /// Requests expected in `window`, at least 1.
    fn chunk(&self, window: Duration) -> u64 {
        let rate = self.per_sec.max(self.in_bucket as f64 / BUCKET.as_secs_f64());
        ((rate * window.as_secs_f64()).ceil() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LeaseParams = LeaseParams {
        window: Duration::from_millis(20),
        ttl: Duration::from_millis(200),
        burst_divisor: 4,
        quota_divisor: 1000,
        max_chunk: 256,
        lead: Duration::ZERO,
    };
    const MS: Duration = Duration::from_millis(1);

    fn g(tokens: u64, wait: Duration, units: u64, used: u64) -> Grant {
        Grant { tokens, wait, units, used }
    }

    fn throttle_only() -> Needs {
        Needs { burst: Some(100), quota: None }
    }

    #[test]
    fn a_quiet_client_fetches_one_at_a_time() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let needs = Needs { burst: Some(10), quota: Some((1000, 7)) };
        assert_eq!(l.step(t0, needs, &P), Step::Fetch { tokens: 1, units: 1 });
        assert_eq!(l.granted(t0, needs, &P, (1, 1), g(1, Duration::ZERO, 1, 1)).0, Step::Admit);
        // Spent: the next request fetches again.
        assert_eq!(l.step(t0 + 500 * MS, needs, &P), Step::Fetch { tokens: 1, units: 1 });
    }

    #[test]
    fn a_busy_client_fetches_chunks_sized_to_its_rate_and_spends_them_locally() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let needs = throttle_only();
        // 1000 req/s for 300 ms, each fetch granted in full.
        let mut fetches = 0;
        let mut last_chunk = 0;
        for i in 0..300u32 {
            let now = t0 + MS * i;
            match l.step(now, needs, &P) {
                Step::Admit => {}
                Step::Fetch { tokens, .. } => {
                    fetches += 1;
                    last_chunk = tokens;
                    assert_eq!(l.granted(now, needs, &P, (tokens, 0), g(tokens, Duration::ZERO, 0, 0)).0, Step::Admit);
                }
                s => panic!("{s:?}"),
            }
        }
        assert!((10..=25).contains(&last_chunk), "20 ms of 1000 req/s, capped by burst/4: {last_chunk}");
        assert!(fetches < 60, "{fetches} fetches for 300 requests");
    }

    #[test]
    fn a_refusal_is_remembered_so_the_store_is_not_asked_again() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let needs = throttle_only();
        assert!(matches!(l.step(t0, needs, &P), Step::Fetch { .. }));
        assert_eq!(l.granted(t0, needs, &P, (1, 0), g(0, 30 * MS, 0, 0)).0, Step::Throttled(30 * MS));
        assert_eq!(l.step(t0 + 10 * MS, needs, &P), Step::Throttled(20 * MS));
        assert!(matches!(l.step(t0 + 30 * MS, needs, &P), Step::Fetch { .. }));

        let q = Needs { burst: None, quota: Some((10, 3)) };
        assert!(matches!(l.step(t0, q, &P), Step::Fetch { tokens: 0, units: 1 }));
        assert_eq!(l.granted(t0, q, &P, (0, 1), g(0, Duration::ZERO, 0, 10)).0, Step::QuotaExhausted);
        assert_eq!(l.step(t0 + 100 * MS, q, &P), Step::QuotaExhausted);
        // After a ttl the store is asked again (another replica may have given units back) …
        assert!(matches!(l.step(t0 + 200 * MS, q, &P), Step::Fetch { .. }));
        // … and at once in a new period.
        assert!(matches!(l.step(t0 + 201 * MS, Needs { burst: None, quota: Some((10, 4)) }, &P), Step::Fetch { .. }));
    }

    #[test]
    fn unspent_lease_expires_and_is_given_back_once() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let needs = Needs { burst: Some(100), quota: Some((100_000, 5)) };
        assert!(matches!(l.step(t0, needs, &P), Step::Fetch { .. }));
        l.granted(t0, needs, &P, (8, 8), g(8, Duration::ZERO, 8, 8));
        assert_eq!(l.take_expired(t0 + 100 * MS), Leftover { tokens: 0, units: 0, period: 5 });
        assert_eq!(l.take_expired(t0 + 200 * MS), Leftover { tokens: 7, units: 7, period: 5 });
        assert_eq!(l.take_expired(t0 + 300 * MS), Leftover { tokens: 0, units: 0, period: 5 });
        // An expired lease is not spent.
        assert!(matches!(l.step(t0 + 300 * MS, needs, &P), Step::Fetch { .. }));
    }

    #[test]
    fn units_of_a_past_period_go_back_to_their_own_key() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let day1 = Needs { burst: None, quota: Some((100_000, 1)) };
        let day2 = Needs { burst: None, quota: Some((100_000, 2)) };
        l.step(t0, day1, &P);
        l.granted(t0, day1, &P, (0, 5), g(0, Duration::ZERO, 5, 5));
        assert!(matches!(l.step(t0 + MS, day2, &P), Step::Fetch { units: 1.., .. }));
        let (step, stale) = l.granted(t0 + MS, day2, &P, (0, 3), g(0, Duration::ZERO, 3, 3));
        assert_eq!(step, Step::Admit);
        assert_eq!(stale, Leftover { tokens: 0, units: 4, period: 1 });
        assert_eq!(l.take_all(), Leftover { tokens: 0, units: 2, period: 2 });
    }

    #[test]
    fn what_concurrent_requests_spent_first_is_fetched_again_not_refused() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let needs = Needs { burst: Some(100), quota: Some((1_000_000, 1)) };
        assert_eq!(l.step(t0, needs, &P), Step::Fetch { tokens: 1, units: 1 });
        l.granted(t0, needs, &P, (1, 1), g(1, Duration::ZERO, 2, 2)); // one unit left in the lease
        // A asks for a token only (it saw a unit); B spends the unit before A's answer arrives.
        assert!(matches!(l.step(t0, needs, &P), Step::Fetch { tokens: 1.., units: 0 }));
        let b = Needs { burst: None, quota: Some((1_000_000, 1)) };
        assert_eq!(l.step(t0, b, &P), Step::Admit);
        let (step, _) = l.granted(t0, needs, &P, (1, 0), g(1, Duration::ZERO, 0, 0));
        assert!(matches!(step, Step::Fetch { tokens: 0, units: 1.. }), "{step:?}: not a quota refusal");
        // Nor is a grant that others spent first.
        let (step, _) = l.granted(t0, b, &P, (0, 1), g(0, Duration::ZERO, 1, 3));
        assert_eq!(step, Step::Admit);
    }

    /// A simulated 1000 req/s client whose refills answer `rtt` later: how many requests had to fetch themselves.
    fn run_with_background_refills(needs: Needs, rtt: Duration, requests: u32) -> (u32, u32) {
        run_with_background_refills_at(needs, rtt, requests, &P)
    }

    fn run_with_background_refills_at(needs: Needs, rtt: Duration, requests: u32, p: &LeaseParams) -> (u32, u32) {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let (mut foreground, mut background) = (0, 0);
        let mut in_flight: Option<(Instant, (u64, u64))> = None;
        for i in 0..requests {
            let now = t0 + MS * i;
            if let Some((at, asked)) = in_flight
                && now >= at
            {
                l.refilled(now, needs, p, asked, g(asked.0, Duration::ZERO, asked.1, 0));
                in_flight = None;
            }
            match l.step(now, needs, p) {
                Step::Admit => {}
                Step::Fetch { tokens, units } => {
                    foreground += 1;
                    let (s, _) = l.granted(now, needs, p, (tokens, units), g(tokens, Duration::ZERO, units, 0));
                    assert_eq!(s, Step::Admit);
                }
                s => panic!("{s:?}"),
            }
            if let Some(asked) = l.refill(now, needs, p) {
                assert!(in_flight.is_none(), "one refill in flight at a time");
                background += 1;
                in_flight = Some((now + rtt, asked));
            }
        }
        (foreground, background)
    }

    #[test]
    fn a_busy_client_is_refilled_in_the_background_and_does_not_wait() {
        // 1000 req/s: chunks of 20 (20 ms), refilled at 10 left; a round trip of 3 ms never empties the lease.
        let needs = Needs { burst: Some(1000), quota: Some((1_000_000, 1)) };
        let (foreground, background) = run_with_background_refills(needs, 3 * MS, 2000);
        eprintln!("3 ms refills: {foreground} fetches on the request path, {background} in the background");
        assert!(foreground <= 25, "only the first requests (before the rate is known) wait: {foreground}");
        assert!((80..=250).contains(&background), "about one refill per 10 requests: {background}");
        // A round trip longer than half a chunk's worth of traffic: some requests find the lease empty.
        let (slow, _) = run_with_background_refills(needs, 15 * MS, 2000);
        eprintln!("15 ms refills: {slow} fetches on the request path");
        assert!(slow > foreground, "{slow} vs {foreground}");
    }

    #[test]
    fn a_slow_store_widens_the_lease_instead_of_making_requests_wait() {
        // 1000 req/s with 15 ms refills: half a chunk (10 ms) is not enough lead, so requests find the lease empty.
        let needs = Needs { burst: Some(1000), quota: Some((1_000_000, 1)) };
        let (fixed, _) = run_with_background_refills(needs, 15 * MS, 2000);
        // With the lead the store's latency sets (2 × 15 ms), chunks cover 60 ms and refills start 30 ms ahead.
        let p = LeaseParams { lead: 30 * MS, ..P };
        let (led, background) = run_with_background_refills_at(needs, 15 * MS, 2000, &p);
        eprintln!("15 ms refills: {fixed} request-path fetches at a fixed watermark, {led} with the lead");
        assert!(led <= 25, "only the first requests (before the rate is known) wait: {led}");
        assert!(led < fixed, "{led} vs {fixed}");
        assert!(background <= 2000 / 20, "chunks grew rather than refills multiplied: {background}");
    }

    #[test]
    fn the_lead_follows_the_slow_round_trips_and_fades() {
        let t0 = Instant::now();
        let mut l = StoreLatency::new(t0);
        assert_eq!(l.lead(t0), Duration::ZERO);
        l.observe(t0, 4 * MS);
        l.observe(t0, MS); // a fast call does not hide the slow one
        assert_eq!(l.lead(t0), 8 * MS);
        assert_eq!(l.lead(t0 + Duration::from_secs(1)), 4 * MS, "halved a second later");
        l.observe(t0 + Duration::from_secs(1), 3 * MS); // slower than the decayed 2 ms: taken
        assert_eq!(l.lead(t0 + Duration::from_secs(1)), 6 * MS);
        l.observe(t0 + Duration::from_secs(2), Duration::from_secs(1)); // a failing store: capped
        assert_eq!(l.lead(t0 + Duration::from_secs(2)), MAX_LEAD);
    }

    #[test]
    fn a_chunk_of_one_is_never_fetched_ahead() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        // Burst 1 caps the chunk at 1, however busy the client.
        let needs = Needs { burst: Some(1), quota: None };
        for i in 0..300u32 {
            let now = t0 + MS * i;
            if let Step::Fetch { tokens, .. } = l.step(now, needs, &P) {
                assert_eq!(tokens, 1);
                l.granted(now, needs, &P, (1, 0), g(1, Duration::ZERO, 0, 0));
            }
            assert_eq!(l.refill(now, needs, &P), None);
        }
        // A quiet client neither.
        let mut quiet = Lease::new(t0);
        let needs = Needs { burst: Some(100), quota: Some((1000, 1)) };
        quiet.step(t0, needs, &P);
        quiet.granted(t0, needs, &P, (1, 1), g(1, Duration::ZERO, 1, 1));
        assert_eq!(quiet.refill(t0, needs, &P), None);
    }

    /// Spends from the lease (fetching when empty) until it asks for a refill; returns what it asked.
    fn spend_to_watermark(l: &mut Lease, now: Instant, needs: Needs) -> (u64, u64) {
        for _ in 0..1000 {
            if let Some(asked) = l.refill(now, needs, &P) {
                return asked;
            }
            if let Step::Fetch { tokens, units } = l.step(now, needs, &P) {
                l.granted(now, needs, &P, (tokens, units), g(tokens, Duration::ZERO, units, 0));
            }
        }
        panic!("never reached the watermark");
    }

    #[test]
    fn a_refused_refill_is_remembered_for_when_the_lease_runs_out() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let needs = throttle_only();
        // Learn a rate of 1000/s (chunks of 20), then spend down to the watermark.
        for i in 0..200u32 {
            let now = t0 + MS * i;
            if let Step::Fetch { tokens, .. } = l.step(now, needs, &P) {
                l.granted(now, needs, &P, (tokens, 0), g(tokens, Duration::ZERO, 0, 0));
            }
        }
        let now = t0 + 200 * MS;
        let asked = spend_to_watermark(&mut l, now, needs);
        assert_eq!(l.refill(now, needs, &P), None, "in flight");
        // The store refuses: next token in 30 ms. The lease is spent first, then refused locally.
        l.refilled(now, needs, &P, asked, g(0, 30 * MS, 0, 0));
        while l.tokens > 0 {
            assert_eq!(l.step(now, needs, &P), Step::Admit);
        }
        assert_eq!(l.step(now + MS, needs, &P), Step::Throttled(29 * MS));
        assert_eq!(l.refill(now + MS, needs, &P), None, "no refill while the refusal holds");
        assert!(matches!(l.step(now + 30 * MS, needs, &P), Step::Fetch { .. }));

        // A failed refill may be retried by a later request.
        let mut l = Lease::new(t0);
        let q = Needs { burst: None, quota: Some((1_000_000, 1)) };
        for i in 0..200u32 {
            let now = t0 + MS * i;
            if let Step::Fetch { units, .. } = l.step(now, q, &P) {
                l.granted(now, q, &P, (0, units), g(0, Duration::ZERO, units, 0));
            }
            if l.refill(now, q, &P).is_some() {
                l.refill_failed();
            }
        }
        let asked = spend_to_watermark(&mut l, now, q);
        // Refused quota: exhausted for one ttl once the lease is spent.
        l.refilled(now, q, &P, asked, g(0, Duration::ZERO, 0, 1_000_000));
        while l.units > 0 {
            assert_eq!(l.step(now, q, &P), Step::Admit);
        }
        assert_eq!(l.step(now + MS, q, &P), Step::QuotaExhausted);
        assert_eq!(l.refill(now + MS, q, &P), None);
    }

    #[test]
    fn refilled_units_keep_the_lease_alive_and_are_given_back_at_expiry() {
        let t0 = Instant::now();
        let mut l = Lease::new(t0);
        let q = Needs { burst: None, quota: Some((1_000_000, 1)) };
        l.step(t0, q, &P);
        l.granted(t0, q, &P, (0, 10), g(0, Duration::ZERO, 10, 10));
        l.refilling = true;
        assert_eq!(l.refilled(t0 + 100 * MS, q, &P, (0, 10), g(0, Duration::ZERO, 10, 20)), Leftover::default());
        assert_eq!(l.take_expired(t0 + 250 * MS).units, 0, "the refill renewed the ttl");
        assert_eq!(l.take_expired(t0 + 300 * MS), Leftover { tokens: 0, units: 19, period: 1 });
    }

    #[test]
    fn chunks_are_capped_by_burst_and_quota() {
        assert_eq!(cap(10, 4, 256), 2);
        assert_eq!(cap(3, 4, 256), 1);
        assert_eq!(cap(1_000_000, 1000, 256), 256);
        assert_eq!(cap(5000, 1000, 256), 5);
    }
}
