//! Whether the store is usable (a circuit breaker) and how many replicas share the counts. Pure: the I/O side
//! reports successes and failures, the request path reads [`Health::is_up`].
//!
//! One failed store call on the request path opens the circuit: from then on requests use the plan's fallback at
//! once, without waiting for a timeout each. Only the background probe (every [`PROBE_INTERVAL`] while down)
//! closes it again.

use std::time::{Duration, Instant};

/// How often the background task checks a store that is down.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How often a proxy records itself in the replica set while the store is up.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A replica that has not heartbeat for this long no longer counts.
pub const REPLICA_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Health {
    up: bool,
    since: Instant,
    /// The last error's kind and text (never a credential: see `portcullis_store::StoreError`).
    error: Option<(&'static str, String)>,
    /// Live replicas from the last heartbeat; kept through an outage.
    replicas: Option<u64>,
}

impl Health {
    /// A store not reached yet counts as down: requests fall back until the first probe succeeds (at start, so
    /// within one probe interval).
    pub fn new(now: Instant) -> Self {
        Self { up: false, since: now, error: Some(("connecting", "not reached yet".into())), replicas: None }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// A store call failed. Returns true when this opened the circuit or the kind of failure changed (worth a
    /// log line).
    pub fn failed(&mut self, now: Instant, kind: &'static str, error: String) -> bool {
        let opened = self.up;
        if opened {
            self.since = now;
        }
        let changed = self.error.as_ref().is_none_or(|(k, _)| *k != kind);
        self.up = false;
        self.error = Some((kind, error));
        opened || changed
    }

    /// A store call (the probe) succeeded, with the replica count when it was a heartbeat. Returns true when this
    /// closed the circuit.
    pub fn succeeded(&mut self, now: Instant, replicas: Option<u64>) -> bool {
        let closed = !self.up;
        if closed {
            self.since = now;
        }
        self.up = true;
        self.error = None;
        if let Some(n) = replicas {
            self.replicas = Some(n.max(1));
        }
        closed
    }

    /// The replicas to divide by: the last count, 1 if never known.
    pub fn replicas(&self) -> u64 {
        self.replicas.unwrap_or(1)
    }

    /// The `/readyz` line.
    pub fn describe(&self, now: Instant) -> String {
        let replicas = match self.replicas {
            Some(n) => format!("{n} replicas known"),
            None => "replicas unknown (counted as 1)".into(),
        };
        if self.up {
            return format!("store: up; {replicas}");
        }
        let (kind, error) = self.error.clone().unwrap_or(("unknown", String::new()));
        format!(
            "store: unavailable for {}s ({kind}: {error}); plans fall back per onStoreUnavailable; {replicas}{}",
            now.saturating_duration_since(self.since).as_secs(),
            if self.replicas.is_some() && !self.up { " (last count)" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_a_failure_closes_on_a_probe_and_keeps_the_replica_count() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert!(!h.is_up());
        assert_eq!(h.replicas(), 1);
        assert!(h.describe(t0).contains("replicas unknown (counted as 1)"), "{}", h.describe(t0));
        assert!(h.succeeded(t0, Some(3)));
        assert!(!h.succeeded(t0, None));
        assert_eq!(h.describe(t0), "store: up; 3 replicas known");
        assert!(h.failed(t0, "timeout", "no answer within 50ms".into()));
        assert!(!h.failed(t0, "timeout", "again".into()), "already open");
        assert_eq!(h.replicas(), 3, "the last count holds through an outage");
        let d = h.describe(t0 + Duration::from_secs(4));
        assert!(
            d.starts_with("store: unavailable for 4s (timeout: again)") && d.ends_with("3 replicas known (last count)"),
            "{d}"
        );
        assert!(h.succeeded(t0, Some(0)));
        assert_eq!(h.replicas(), 1, "at least this proxy");
    }
}
