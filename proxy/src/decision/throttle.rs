//! Throttles: one GCRA limiter (governor, direct) per (client, plan), generic over the clock so tests drive time.

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use portcullis_table::Throttle;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

pub type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A throttle as enforced: the spec it was built from (to decide whether state survives a table swap) and the
/// limiter (shared by `Arc` between the old and the new compiled table when the spec did not change).
pub struct ThrottleState<C: Clock = DefaultClock> {
    pub spec: Throttle,
    pub limiter: Arc<Limiter<C>>,
}

impl<C: Clock> Clone for ThrottleState<C> {
    fn clone(&self) -> Self {
        Self { spec: self.spec, limiter: self.limiter.clone() }
    }
}

/// The GCRA quota for `rate` per `per_millis` with bursts of `burst`. The emission interval is rounded *up* to
/// the nanosecond so the limiter never admits more than `burst + rate × elapsed / per`.
pub fn gcra_quota(t: &Throttle) -> Quota {
    let per_nanos = u128::from(t.per_millis.max(1)) * 1_000_000;
    let rate = u128::from(t.rate.max(1));
    let interval = per_nanos.div_ceil(rate).clamp(1, u128::from(u64::MAX));
    let interval = Duration::from_nanos(interval as u64);
    Quota::with_period(interval)
        .expect("interval is at least 1ns")
        .allow_burst(NonZeroU32::new(t.burst.max(1)).expect("burst ≥ 1"))
}

impl<C: Clock + Clone> ThrottleState<C> {
    pub fn new(spec: Throttle, clock: &C) -> Self {
        Self { spec, limiter: Arc::new(RateLimiter::direct_with_clock(gcra_quota(&spec), clock.clone())) }
    }

    /// Reuses `previous`'s limiter when the spec is unchanged, so a table swap does not refill anyone's burst.
    pub fn carry_over(spec: Throttle, previous: Option<&ThrottleState<C>>, clock: &C) -> Self {
        match previous {
            Some(p) if p.spec == spec => p.clone(),
            _ => Self::new(spec, clock),
        }
    }

    /// `Ok` when a request may pass now, else how long until the next one would.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter.check().map_err(|not_until| {
            let now = self.limiter.clock().now();
            not_until.wait_time_from(now)
        })
    }

    /// Window of the `RateLimit-Policy` header: seconds to refill a whole burst, at least 1.
    pub fn window_secs(&self) -> u64 {
        window_secs(&self.spec)
    }
}

/// Window of the `RateLimit-Policy` header for `spec`: seconds to refill a whole burst, at least 1.
pub fn window_secs(spec: &Throttle) -> u64 {
    let nanos = u128::from(spec.per_millis) * 1_000_000 * u128::from(spec.burst) / u128::from(spec.rate.max(1));
    (nanos.div_ceil(1_000_000_000) as u64).max(1)
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use proptest::prelude::*;

    #[test]
    fn burst_then_rate() {
        let clock = FakeRelativeClock::default();
        let t = ThrottleState::new(Throttle { rate: 10, per_millis: 1000, burst: 3 }, &clock);
        for _ in 0..3 {
            assert!(t.check().is_ok());
        }
        let wait = t.check().unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(retry_after_secs(wait), 1);
        clock.advance(Duration::from_millis(100));
        assert!(t.check().is_ok());
        assert!(t.check().is_err());
        assert_eq!(t.window_secs(), 1);
    }

    #[test]
    fn state_carries_over_only_for_an_unchanged_spec() {
        let clock = FakeRelativeClock::default();
        let spec = Throttle { rate: 1, per_millis: 60_000, burst: 1 };
        let a = ThrottleState::new(spec, &clock);
        assert!(a.check().is_ok());
        let b = ThrottleState::carry_over(spec, Some(&a), &clock);
        assert!(b.check().is_err(), "same spec: the spent burst stays spent");
        let c = ThrottleState::carry_over(Throttle { burst: 2, ..spec }, Some(&b), &clock);
        assert!(c.check().is_ok(), "changed spec: fresh limiter");
    }

    proptest! {
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_elapsed(
            rate in 1u32..1000,
            per_millis in 1u64..10_000,
            burst in 1u32..50,
            steps in proptest::collection::vec((0u64..50_000_000, 1u32..20), 1..200),
        ) {
            let clock = FakeRelativeClock::default();
            let t = ThrottleState::new(Throttle { rate, per_millis, burst }, &clock);
            let mut admitted: u128 = 0;
            let mut elapsed: u128 = 0;
            for (advance_nanos, tries) in steps {
                clock.advance(Duration::from_nanos(advance_nanos));
                elapsed += u128::from(advance_nanos);
                for _ in 0..tries {
                    if t.check().is_ok() {
                        admitted += 1;
                    }
                }
                // admitted ≤ burst + rate × elapsed / per  (all in integers: × per_nanos)
                let per_nanos = u128::from(per_millis) * 1_000_000;
                prop_assert!(
                    admitted * per_nanos <= u128::from(burst) * per_nanos + u128::from(rate) * elapsed,
                    "admitted {} after {}ns (rate {}/{}ms burst {})", admitted, elapsed, rate, per_millis, burst
                );
            }
        }
    }
}
