//! What a plan's shared counts become while the store cannot be reached (`onStoreUnavailable`), and the local
//! limiters of the `Local` policy: the plan's rate, burst and remaining quota divided by the replicas this proxy
//! knows of.

use crate::decision::quota::QuotaCounter;
use crate::decision::throttle::ThrottleState;
use governor::clock::DefaultClock;
use portcullis_table::{Quota, StoreFallback, Throttle};

/// The metrics label of a policy.
pub fn label(p: StoreFallback) -> &'static str {
    match p {
        StoreFallback::Local => "Local",
        StoreFallback::FailOpen => "FailOpen",
        StoreFallback::FailClosed => "FailClosed",
    }
}

/// `t` shared by `replicas`: the same burst-per-replica and `rate / replicas` (the period is stretched, so
/// nothing is lost to rounding), burst at least 1.
pub fn throttle_share(t: Throttle, replicas: u64) -> Throttle {
    let n = replicas.clamp(1, u64::from(u32::MAX));
    Throttle { rate: t.rate, per_millis: t.per_millis.saturating_mul(n), burst: (u64::from(t.burst) / n).max(1) as u32 }
}

/// This replica's share of what is left of `q` (`used`: the store's count when last seen), at least 1.
pub fn quota_share(q: Quota, used: u64, replicas: u64) -> Quota {
    Quota { limit: (q.limit.saturating_sub(used) / replicas.max(1)).max(1), period: q.period }
}

/// The `Local` policy's limiters of one (client, plan), rebuilt when the replica count or the specs change.
pub struct LocalShare {
    pub replicas: u64,
    pub throttle_spec: Option<Throttle>,
    pub quota_spec: Option<Quota>,
    pub throttle: Option<ThrottleState<DefaultClock>>,
    pub quota: Option<QuotaCounter>,
}

impl LocalShare {
    pub fn new(throttle: Option<Throttle>, quota: Option<Quota>, used: u64, replicas: u64) -> Self {
        Self {
            replicas,
            throttle_spec: throttle,
            quota_spec: quota,
            throttle: throttle.map(|t| ThrottleState::new(throttle_share(t, replicas), &DefaultClock::default())),
            quota: quota.map(|q| QuotaCounter::new(quota_share(q, used, replicas))),
        }
    }

    pub fn matches(&self, throttle: Option<Throttle>, quota: Option<Quota>, replicas: u64) -> bool {
        self.replicas == replicas && self.throttle_spec == throttle && self.quota_spec == quota
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_table::Period;

    #[test]
    fn shares_divide_by_the_replicas() {
        let t = Throttle { rate: 100, per_millis: 1000, burst: 30 };
        assert_eq!(throttle_share(t, 1), t);
        assert_eq!(throttle_share(t, 3), Throttle { rate: 100, per_millis: 3000, burst: 10 });
        assert_eq!(throttle_share(Throttle { burst: 2, ..t }, 5).burst, 1);
        let q = Quota { limit: 1000, period: Period::Day };
        assert_eq!(quota_share(q, 100, 3).limit, 300);
        assert_eq!(quota_share(q, 1000, 3).limit, 1, "never 0: a counter of 0 would refuse the whole period");
        assert_eq!(quota_share(q, 0, 0).limit, 1000);
    }

    #[test]
    fn a_local_share_throttles_at_its_fraction() {
        let s = LocalShare::new(Some(Throttle { rate: 10, per_millis: 1000, burst: 6 }), None, 0, 3);
        let t = s.throttle.as_ref().unwrap();
        assert!(t.check().is_ok() && t.check().is_ok());
        assert!(t.check().is_err(), "burst 6 / 3 replicas = 2");
    }
}
