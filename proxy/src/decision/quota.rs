//! Quotas counted locally per (client, plan) in UTC calendar periods.
//!
//! One `AtomicU64` holds the period number (high 24 bits) and the count (low 40 bits), so taking a unit is a
//! single compare-and-swap loop with no lock, and a new period resets the count in the same step.

use portcullis_table::Quota;
pub use portcullis_table::period::period_secs;
use portcullis_table::period::{period_end, period_number};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const PERIOD_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

pub struct QuotaCounter {
    pub spec: Quota,
    state: AtomicU64,
}

/// Why a quota refused: when the period ends, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub resets_at: i64,
}

impl QuotaCounter {
    pub fn new(spec: Quota) -> Self {
        Self { spec, state: AtomicU64::new(0) }
    }

    /// Reuses `previous` when the spec is unchanged, so a table swap does not reset anyone's count.
    pub fn carry_over(spec: Quota, previous: Option<&Arc<QuotaCounter>>) -> Arc<QuotaCounter> {
        match previous {
            Some(p) if p.spec == spec => p.clone(),
            _ => Arc::new(Self::new(spec)),
        }
    }

    /// Takes one unit at `now` (Unix seconds); returns the remaining units, or when the period resets.
    pub fn try_acquire(&self, now: i64) -> Result<u64, QuotaExceeded> {
        let period = period_number(self.spec.period, now) & PERIOD_MASK;
        // Limits beyond the counter's range are effectively unlimited (2^40 ≈ 10^12 per period).
        let limit = self.spec.limit.min(COUNT_MASK);
        let mut remaining = 0;
        let r = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            let (p, count) = (s >> COUNT_BITS, s & COUNT_MASK);
            let count = if p == period { count } else { 0 };
            if count >= limit {
                return None;
            }
            remaining = limit - count - 1;
            Some((period << COUNT_BITS) | (count + 1))
        });
        match r {
            Ok(_) => Ok(remaining),
            Err(_) => Err(QuotaExceeded { resets_at: period_end(self.spec.period, now) }),
        }
    }

    /// Reads the counter without changing it, so its cache line is fetched while the throttle's atomic
    /// read-modify-write (a full barrier on x86) runs: the two cache misses overlap instead of queueing.
    #[inline]
    pub fn prefetch(&self) {
        std::hint::black_box(self.state.load(Ordering::Relaxed));
    }

    /// Units used in the period containing `now`.
    pub fn used(&self, now: i64) -> u64 {
        let s = self.state.load(Ordering::Acquire);
        if s >> COUNT_BITS == period_number(self.spec.period, now) & PERIOD_MASK { s & COUNT_MASK } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use portcullis_table::Period;

    fn ts(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn counts_and_resets_with_the_period() {
        let q = QuotaCounter::new(Quota { limit: 2, period: Period::Day });
        let now = ts("2026-02-18T13:00:00Z");
        assert_eq!(q.try_acquire(now), Ok(1));
        assert_eq!(q.try_acquire(now + 10), Ok(0));
        assert_eq!(q.try_acquire(now + 20), Err(QuotaExceeded { resets_at: ts("2026-02-19T00:00:00Z") }));
        assert_eq!(q.used(now), 2);
        assert_eq!(q.try_acquire(ts("2026-02-19T00:00:00Z")), Ok(1));
    }

    #[test]
    fn carry_over_keeps_the_count_for_the_same_spec() {
        let spec = Quota { limit: 1, period: Period::Month };
        let a = Arc::new(QuotaCounter::new(spec));
        assert!(a.try_acquire(0).is_ok());
        let b = QuotaCounter::carry_over(spec, Some(&a));
        assert!(b.try_acquire(0).is_err());
        let c = QuotaCounter::carry_over(Quota { limit: 5, ..spec }, Some(&b));
        assert!(c.try_acquire(0).is_ok());
    }
}
