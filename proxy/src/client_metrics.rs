//! Per-client metrics with a bounded number of series: `portcullis_proxy_client_requests_total{client, outcome}` and
//! `portcullis_proxy_client_quota_remaining{client, plan}`.
//!
//! The first `--client-metrics` clients seen (default 100) get their own `client` label, for the life of the
//! process (a counter must not move between series); every later one is counted under `client="other"`. So the
//! series are at most (limit + 1) × outcomes for requests and limit × plans for quotas, whatever the table holds —
//! 100 000 clients included. `outcome` is `allowed` or a refusal's reason code; requests refused before a client
//! was identified (unknown key, no table) are not per-client (see `portcullis_proxy_requests_total`).
//!
//! `quota_remaining` is set for labelled clients whose plan counts its quota in this proxy (local quotas); quotas
//! counted in the shared store are in each ApiClient's `status.usage`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// The `client` label of everyone beyond the limit.
pub const OTHER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: Arc<str>,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientPlanLabels {
    pub client: Arc<str>,
    pub plan: Arc<str>,
}

pub struct ClientMetrics {
    limit: usize,
    labelled: RwLock<HashSet<Arc<str>>>,
    other: Arc<str>,
    pub requests: Family<ClientLabels, Counter>,
    pub quota_remaining: Family<ClientPlanLabels, Gauge>,
}

impl ClientMetrics {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            labelled: RwLock::new(HashSet::new()),
            other: Arc::from(OTHER),
            requests: Family::default(),
            quota_remaining: Family::default(),
        }
    }

    /// The label `client` is counted under: its own while fewer than `limit` clients have one, else `other`.
    pub fn label(&self, client: &str) -> Option<Arc<str>> {
        if self.limit == 0 {
            return None;
        }
        {
            let r = self.labelled.read().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = r.get(client) {
                return Some(l.clone());
            }
            // Full: every later client is `other`, decided under the shared lock (no writer per request).
            if r.len() >= self.limit {
                return Some(self.other.clone());
            }
        }
        let mut w = self.labelled.write().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = w.get(client) {
            return Some(l.clone());
        }
        if w.len() >= self.limit {
            return Some(self.other.clone());
        }
        let l: Arc<str> = Arc::from(client);
        w.insert(l.clone());
        Some(l)
    }

    /// Counts one request of `client` with `outcome` (`allowed` or a reason code).
    pub fn count(&self, client: &str, outcome: &'static str) {
        if let Some(client) = self.label(client) {
            self.requests.get_or_create(&ClientLabels { client, outcome }).inc();
        }
    }

    /// Records what is left of a labelled client's local quota on `plan` (nothing for `other`).
    pub fn quota_left(&self, client: &str, plan: &str, remaining: u64) {
        if let Some(client) = self.label(client).filter(|l| **l != *OTHER) {
            let labels = ClientPlanLabels { client, plan: Arc::from(plan) };
            self.quota_remaining.get_or_create(&labels).set(remaining.min(i64::MAX as u64) as i64);
        }
    }

    /// Clients with a label of their own.
    pub fn labelled(&self) -> usize {
        self.labelled.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn a_hundred_thousand_clients_make_at_most_limit_plus_one_series_per_outcome() {
        let m = ClientMetrics::new(100);
        for i in 0..100_000 {
            let id = format!("ns/client-{i}");
            m.count(&id, if i % 3 == 0 { "rate_limited" } else { "allowed" });
            m.quota_left(&id, "gold", 5);
        }
        // Seen again: the first hundred keep their label, the rest stay `other`.
        m.count("ns/client-7", "allowed");
        m.count("ns/client-99999", "allowed");
        assert_eq!(m.labelled(), 100);
        let mut r = Registry::default();
        r.register("client_requests", "", m.requests.clone());
        r.register("client_quota_remaining", "", m.quota_remaining.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        // Each of the first hundred has the one outcome it had; `other` has both.
        assert_eq!(series("client_requests_total{"), 100 + 2);
        assert_eq!(series("client_quota_remaining{"), 100, "no quota series for other");
        assert!(text.contains(r#"client_requests_total{client="ns/client-7",outcome="allowed"} 2"#), "{text}");
        let other_allowed = 99_900 - (100..100_000).filter(|i| i % 3 == 0).count() as u64 + 1;
        assert!(
            text.contains(&format!(r#"client_requests_total{{client="other",outcome="allowed"}} {other_allowed}"#)),
            "{text}"
        );
    }

    #[test]
    fn zero_means_no_per_client_series() {
        let m = ClientMetrics::new(0);
        m.count("ns/a", "allowed");
        m.quota_left("ns/a", "p", 1);
        assert_eq!(m.labelled(), 0);
        assert!(m.label("ns/a").is_none());
    }
}
