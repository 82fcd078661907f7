//! Names of the shared store's (Redis) keys for counts kept across proxy replicas. The proxy writes them; the
//! controller reads the quota keys for each ApiClient's `status.usage`. Pure, so both sides agree by construction.
//!
//! A client's keys share one Redis Cluster slot (the `{client id}` hash tag), so a script may touch several of them.
//! Client ids (`namespace/name`) and plan names are Kubernetes names: no braces, colons or spaces.

use crate::Period;
use crate::period::{period_end, period_number};

/// Every key starts with this.
pub const PREFIX: &str = "portcullis";

/// How long a quota key outlives its period, so a reader at the boundary (or with a slightly skewed clock) still
/// finds the count of the period that just ended.
pub const QUOTA_KEY_GRACE_SECS: i64 = 86_400;

/// The throttle state (GCRA theoretical arrival time) of `client` under `plan`.
pub fn throttle_key(client: &str, plan: &str) -> String {
    format!("{PREFIX}:{{{client}}}:{plan}:t")
}

/// The quota count of `client` under `plan` for the UTC period containing `now` (Unix seconds).
pub fn quota_key(client: &str, plan: &str, period: Period, now: i64) -> String {
    quota_key_of_period(client, plan, period, period_number(period, now))
}

/// The quota key of the period numbered `number` ([`crate::period::period_number`]).
pub fn quota_key_of_period(client: &str, plan: &str, period: Period, number: u64) -> String {
    let p = match period {
        Period::Day => 'd',
        Period::Week => 'w',
        Period::Month => 'm',
    };
    format!("{PREFIX}:{{{client}}}:{plan}:q:{p}{number}")
}

/// The sorted set where every proxy of `service` (`namespace/name`) records its replica id with the time of its last
/// heartbeat: the live members are the replicas a fallback rate is divided by.
pub fn replicas_key(service: &str) -> String {
    format!("{PREFIX}:replicas:{{{service}}}")
}

/// Unix seconds at which the quota key for the period containing `now` may expire.
pub fn quota_key_expires_at(period: Period, now: i64) -> i64 {
    period_end(period, now) + QUOTA_KEY_GRACE_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_client_hash_tag_and_the_period() {
        assert_eq!(throttle_key("team-a/acme", "gold"), "portcullis:{team-a/acme}:gold:t");
        // 2026-02-18T13:00:00Z: day 20502, Monday-week 2929, month 673.
        let now = 1_771_419_600;
        assert_eq!(quota_key("team-a/acme", "gold", Period::Day, now), "portcullis:{team-a/acme}:gold:q:d20502");
        assert_eq!(quota_key("team-a/acme", "gold", Period::Week, now), "portcullis:{team-a/acme}:gold:q:w2929");
        assert_eq!(quota_key("team-a/acme", "gold", Period::Month, now), "portcullis:{team-a/acme}:gold:q:m673");
        assert_eq!(quota_key_expires_at(Period::Day, now), 1_771_459_200 + 86_400);
        assert_eq!(
            quota_key_of_period("team-a/acme", "gold", Period::Day, 20502),
            quota_key("team-a/acme", "gold", Period::Day, now)
        );
        assert_eq!(replicas_key("team-a/api"), "portcullis:replicas:{team-a/api}");
    }

    #[test]
    fn a_new_period_is_a_new_key() {
        let end = period_end(Period::Day, 1_771_419_600);
        assert_ne!(quota_key("a/b", "p", Period::Day, end - 1), quota_key("a/b", "p", Period::Day, end));
    }
}
