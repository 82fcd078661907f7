//! Builders for tests and benchmarks (feature `test-util`; always on for this crate's own tests), so no test
//! spells out every field of a [`Client`] literal and a new field is added in one place.
//!
//! ```ignore
//! use portcullis_table::Client;
//! let c = Client::builder("shop/acme").key("k-1").source("127.0.0.0/8").plan("open").build();
//! assert_eq!(c.source_ranges.len(), 1);
//! ```

use crate::{CertIdentity, Client, KeyDigest, KeyEntry, key_digest};
use ipnet::IpNet;
use jiff::Timestamp;

impl Client {
    /// A client `id` with no keys, no source ranges (admits no address) and no plans, enabled.
    pub fn builder(id: impl Into<String>) -> ClientBuilder {
        ClientBuilder(Client {
            id: id.into(),
            keys: vec![],
            source_ranges: vec![],
            disabled: false,
            plans: vec![],
            certificates: vec![],
            require_certificate: false,
        })
    }
}

/// See [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder(Client);

impl ClientBuilder {
    /// Adds a key (its raw bytes; the table holds the digest), never expiring.
    pub fn key(self, key: impl AsRef<[u8]>) -> Self {
        self.key_digest(key_digest(key.as_ref()), None)
    }

    /// Adds a key by digest, with an optional expiry.
    pub fn key_digest(mut self, sha256: KeyDigest, expires_at: Option<Timestamp>) -> Self {
        self.0.keys.push(KeyEntry { sha256, expires_at });
        self
    }

    /// Admits source range `cidr` (panics when it is not a CIDR: test input).
    pub fn source(mut self, cidr: &str) -> Self {
        self.0.source_ranges.push(cidr.parse().unwrap_or_else(|e| panic!("{cidr:?} is not a CIDR: {e}")));
        self
    }

    /// Admits every range of `ranges`.
    pub fn sources(mut self, ranges: impl IntoIterator<Item = IpNet>) -> Self {
        self.0.source_ranges.extend(ranges);
        self
    }

    /// Grants plan `name` (after the ones granted so far, in order of precedence).
    pub fn plan(mut self, name: &str) -> Self {
        self.0.plans.push(name.to_string());
        self
    }

    /// Grants every plan of `names`, in order.
    pub fn plans<S: AsRef<str>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.0.plans.extend(names.into_iter().map(|n| n.as_ref().to_string()));
        self
    }

    /// Identifies the client by certificate identity `id` too.
    pub fn certificate(mut self, id: CertIdentity) -> Self {
        self.0.certificates.push(id);
        self
    }

    /// A key alone is not enough: the verified client certificate must match too.
    pub fn require_certificate(mut self) -> Self {
        self.0.require_certificate = true;
        self
    }

    pub fn disabled(mut self) -> Self {
        self.0.disabled = true;
        self
    }

    pub fn build(self) -> Client {
        self.0
    }
}

impl From<ClientBuilder> for Client {
    fn from(b: ClientBuilder) -> Client {
        b.0
    }
}

/// The chart's alert rules and Grafana dashboard, for tests checking that every metric they name is exported.
pub fn chart_monitoring_files() -> Vec<(&'static str, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/portcullis/files");
    ["portcullis-alerts.yaml", "portcullis-dashboard.json"]
        .into_iter()
        .map(|f| (f, std::fs::read_to_string(format!("{dir}/{f}")).unwrap_or_else(|e| panic!("{dir}/{f}: {e}"))))
        .collect()
}

/// Metric names starting with `prefix` that `text` (a rule or dashboard expression file) mentions.
pub fn metric_names_in(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every series name a Prometheus text exposition can produce, from its `# TYPE` lines (counters gain `_total`,
/// histograms `_bucket`, `_sum`, `_count`), so families with no series yet count too.
pub fn exported_metric_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}
