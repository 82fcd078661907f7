//! Prometheus metrics (`portcullis_proxy_*`).

use crate::access_log::AccessLog;
use crate::client_metrics::ClientMetrics;
use crate::decision::Reason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub decision: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub service: String,
    pub revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardUseLabels {
    pub shards: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: &'static str,
}

/// Every value of the `state` label of `portcullis_proxy_table_state` (see [`crate::tables::TableState`]).
pub const TABLE_STATES: [&str; 4] = ["no_table", "serving", "deny_all", "revoked"];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<DecisionLabels, Histogram>,
    /// The series of `requests` and `latency` an allowed request counts in, looked up once (a family lookup hashes
    /// its labels under a lock: on every request, the most frequent outcome).
    allowed: Counter,
    allowed_latency: Histogram,
    pub table_info: Family<TableLabels, Gauge>,
    pub clients: Gauge,
    pub swaps: Counter,
    pub rejected_tables: Family<SourceLabels, Counter>,
    pub table_shards: Family<ShardUseLabels, Counter>,
    pub table_load: Histogram,
    pub table_state: Family<StateLabels, Gauge>,
    pub table_revocations: Family<CauseLabels, Counter>,
    pub tables_out_of_order: Counter,
    pub table_source_errors: Family<KindLabels, Counter>,
    pub table_watch_open: Gauge,
    pub proxy_protocol_refused: Counter,
    pub open_connections: Gauge,
    pub open_tunnels: Gauge,
    pub connections_closed: Family<CloseLabels, Counter>,
    pub tls_handshakes: Family<OutcomeLabels, Counter>,
    pub tls_reloads: Family<OutcomeLabels, Counter>,
    pub tls_certificate_expiry: Gauge,
    pub store_latency: Family<OpLabels, Histogram>,
    pub store_errors: Family<KindLabels, Counter>,
    pub store_fallbacks: Family<PolicyLabels, Counter>,
    pub store_up: Gauge,
    pub store_replicas: Gauge,
    /// `portcullis_proxy_client_*` ([`crate::client_metrics`]); registered by [`Metrics::register_clients`].
    pub per_client: ClientMetrics,
    current_table: Mutex<Option<TableLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<DecisionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        let table_info = Family::<TableLabels, Gauge>::default();
        let clients = Gauge::default();
        let swaps = Counter::default();
        let rejected_tables = Family::<SourceLabels, Counter>::default();
        let table_shards = Family::<ShardUseLabels, Counter>::default();
        let table_load = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let proxy_protocol_refused = Counter::default();
        let table_state = Family::<StateLabels, Gauge>::default();
        for state in TABLE_STATES {
            table_state.get_or_create(&StateLabels { state }).set(i64::from(state == "no_table"));
        }
        let table_revocations = Family::<CauseLabels, Counter>::default();
        let tables_out_of_order = Counter::default();
        let table_source_errors = Family::<KindLabels, Counter>::default();
        let table_watch_open = Gauge::default();
        let open_connections = Gauge::default();
        let open_tunnels = Gauge::default();
        let connections_closed = Family::<CloseLabels, Counter>::default();
        let tls_handshakes = Family::<OutcomeLabels, Counter>::default();
        let tls_reloads = Family::<OutcomeLabels, Counter>::default();
        let tls_certificate_expiry = Gauge::default();
        registry.register("requests", "Requests by decision (allow/deny) and reason", requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time from request headers to response headers (including the upstream for allowed requests)",
            latency.clone(),
        );
        registry.register("table_info", "The table revision being enforced (value 1)", table_info.clone());
        registry.register("clients", "Clients in the table being enforced", clients.clone());
        registry.register("table_swaps", "Tables applied", swaps.clone());
        registry.register(
            "tables_rejected",
            "Tables refused (invalid, incomplete or corrupt)",
            rejected_tables.clone(),
        );
        registry.register(
            "table_shards",
            "Shards of stable-layout table revisions applied from the API: read (new or changed) or reused (unchanged \
             since the table in force)",
            table_shards.clone(),
        );
        registry.register(
            "table_load_seconds",
            "Time to load a table revision from the API and swap it in (shard reads, parse, compile), for revisions \
             applied",
            table_load.clone(),
        );
        registry.register(
            "table_state",
            "What the proxy enforces (value 1 for the current state): no_table (none yet), serving, deny_all (a \
             deny-all table: no plan grants the Service), revoked (the table was deleted or may no longer be read)",
            table_state.clone(),
        );
        registry.register(
            "table_revocations",
            "Times the proxy started denying every request because its table was taken away, by cause",
            table_revocations.clone(),
        );
        registry.register(
            "tables_out_of_order",
            "Index revisions refused because their sequence is older than (or conflicts with) the one applied",
            tables_out_of_order.clone(),
        );
        registry.register(
            "table_source_errors",
            "Errors reading the table source, by kind (transient: the table stays; gone: relist; forbidden, \
             unauthorized, not_found: the proxy denies)",
            table_source_errors.clone(),
        );
        registry.register(
            "table_watch_open",
            "1 while the watch on the table's index ConfigMap is open (0 while listing, retrying or reconnecting; \
             API mode only)",
            table_watch_open.clone(),
        );
        registry.register(
            "proxy_protocol_refused",
            "Connections refused: PROXY header from an untrusted peer, or malformed",
            proxy_protocol_refused.clone(),
        );
        registry.register("open_connections", "Client connections open", open_connections.clone());
        registry.register(
            "open_tunnels",
            "Upgraded (WebSocket) connections open (also counted in open_connections)",
            open_tunnels.clone(),
        );
        registry.register(
            "connections_closed",
            "Client connections the proxy closed itself, by reason (source_limit, preface_timeout, head_timeout, idle, tunnel_idle)",
            connections_closed.clone(),
        );
        let allowed = requests.get_or_create(&RequestLabels { decision: "allow", reason: "ok" }).clone();
        let allowed_latency = latency.get_or_create(&DecisionLabels { decision: "allow" }).clone();
        Self {
            registry,
            allowed,
            allowed_latency,
            requests,
            latency,
            table_info,
            clients,
            swaps,
            rejected_tables,
            table_shards,
            table_load,
            table_state,
            table_revocations,
            tables_out_of_order,
            table_source_errors,
            table_watch_open,
            proxy_protocol_refused,
            open_connections,
            open_tunnels,
            connections_closed,
            tls_handshakes,
            tls_reloads,
            tls_certificate_expiry,
            store_latency: Family::<OpLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_025, 2.0, 14))
            }),
            store_errors: Family::default(),
            store_fallbacks: Family::default(),
            store_up: Gauge::default(),
            store_replicas: Gauge::default(),
            per_client: ClientMetrics::new(0),
            current_table: Mutex::new(None),
        }
    }

    pub fn count(&self, reason: Option<Reason>, seconds: f64) {
        let (decision, reason) = match reason {
            None => {
                self.allowed.inc();
                self.allowed_latency.observe(seconds);
                return;
            }
            // Admitted by the decision; the application could not take it.
            Some(r @ (Reason::UpstreamUnavailable | Reason::UpstreamBusy)) => ("allow", r.code()),
            Some(r) => ("deny", r.code()),
        };
        self.requests.get_or_create(&RequestLabels { decision, reason }).inc();
        self.latency.get_or_create(&DecisionLabels { decision }).observe(seconds);
    }

    pub fn table_applied(&self, service: &str, revision: &str, clients: usize) {
        let labels = TableLabels { service: service.to_string(), revision: revision.to_string() };
        let mut cur = self.current_table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cur.take() {
            self.table_info.remove(&old);
        }
        self.table_info.get_or_create(&labels).set(1);
        *cur = Some(labels);
        self.clients.set(clients as i64);
        self.swaps.inc();
    }

    /// The table is no longer enforced (revoked): drop its info series and client count.
    pub fn table_dropped(&self) {
        let mut cur = self.current_table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cur.take() {
            self.table_info.remove(&old);
        }
        self.clients.set(0);
    }

    pub fn set_table_state(&self, state: &'static str) {
        for s in TABLE_STATES {
            self.table_state.get_or_create(&StateLabels { state: s }).set(i64::from(s == state));
        }
    }

    pub fn table_revoked(&self, cause: &'static str) {
        self.table_revocations.get_or_create(&CauseLabels { cause }).inc();
    }

    pub fn table_source_error(&self, kind: &'static str) {
        self.table_source_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// A stable-layout revision was read: `read` shards fetched, `reused` shared with the table in force.
    pub fn table_shards_read(&self, read: usize, reused: usize) {
        self.table_shards.get_or_create(&ShardUseLabels { shards: "read" }).inc_by(read as u64);
        self.table_shards.get_or_create(&ShardUseLabels { shards: "reused" }).inc_by(reused as u64);
    }

    pub fn table_rejected(&self, source: &'static str) {
        self.rejected_tables.get_or_create(&SourceLabels { source }).inc();
    }

    /// Exposes the TLS metrics: only proxies that serve TLS have them (an expiry of 0 would page someone).
    pub fn register_tls(&mut self) {
        self.registry.register(
            "tls_handshakes",
            "TLS handshakes by outcome (ok, error, timeout)",
            self.tls_handshakes.clone(),
        );
        self.registry.register(
            "tls_reloads",
            "Certificate reloads after the files changed, by outcome (ok, error: the old certificate stays)",
            self.tls_reloads.clone(),
        );
        self.registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate, Unix seconds",
            self.tls_certificate_expiry.clone(),
        );
    }

    /// Exposes the shared-store metrics: only proxies with `--store-url` have them.
    pub fn register_store(&mut self) {
        self.registry.register(
            "store_request_duration_seconds",
            "Round trips to the shared store (Redis), by operation (take: on the request path; refill: a lease topped up in the background; give_back, heartbeat), errors included",
            self.store_latency.clone(),
        );
        self.registry.register(
            "store_errors",
            "Failed shared-store operations by kind (timeout, connection, auth, other)",
            self.store_errors.clone(),
        );
        self.registry.register(
            "store_fallbacks",
            "Requests decided without the shared store (unreachable, or the circuit open), by the plan's \
             onStoreUnavailable policy (Local, FailOpen, FailClosed)",
            self.store_fallbacks.clone(),
        );
        self.registry.register(
            "store_up",
            "1 while the shared store answers (circuit closed), 0 while requests fall back",
            self.store_up.clone(),
        );
        self.registry.register(
            "store_replicas",
            "Proxy replicas of this Service known from the store's heartbeats (the last count during an outage; \
             1 if never known): local fallbacks divide rates and quotas by it",
            self.store_replicas.clone(),
        );
    }

    /// Exposes per-client metrics for up to `limit` clients (0: none).
    pub fn register_clients(&mut self, limit: usize) {
        self.per_client = ClientMetrics::new(limit);
        if limit == 0 {
            return;
        }
        self.registry.register(
            "client_requests",
            "Requests of identified clients by client and outcome (allowed or the refusal's reason); the first \
             --client-metrics clients seen have their own label, later ones are counted as client=\"other\"",
            self.per_client.requests.clone(),
        );
        self.registry.register(
            "client_quota_remaining",
            "Units left in the current period of a labelled client's plan whose quota this proxy counts (local \
             quotas; shared ones are in the ApiClient's status.usage), as of its last request",
            self.per_client.quota_remaining.clone(),
        );
    }

    /// Exposes the access log's dropped-lines count.
    pub fn register_access_log(&mut self, log: Arc<AccessLog>) {
        self.registry.register_collector(Box::new(AccessLogDropped(log)));
    }

    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed.get_or_create(&CloseLabels { reason }).inc();
    }

    pub fn tls_handshake(&self, outcome: &'static str) {
        self.tls_handshakes.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn tls_reload(&self, outcome: &'static str) {
        self.tls_reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

/// `portcullis_proxy_access_log_dropped_total`, read from the writer at scrape time.
#[derive(Debug)]
struct AccessLogDropped(Arc<AccessLog>);

impl Collector for AccessLogDropped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(self.0.dropped());
        let metric = encoder.encode_descriptor(
            "access_log_dropped",
            "Access-log lines dropped because stdout could not keep up (requests are never slowed by the log)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::{AccessLogFormat, AccessLogSettings};
    use portcullis_table::test_util::{chart_monitoring_files, exported_metric_names, metric_names_in};

    #[test]
    fn allowed_requests_count_in_the_labelled_series() {
        let m = Metrics::new();
        m.count(None, 0.001);
        m.count(None, 0.002);
        m.count(Some(Reason::UpstreamUnavailable), 0.001);
        let allowed = m.requests.get_or_create(&RequestLabels { decision: "allow", reason: "ok" }).get();
        assert_eq!(allowed, 2);
        assert_eq!(
            m.requests.get_or_create(&RequestLabels { decision: "allow", reason: "upstream_unavailable" }).get(),
            1
        );
        let text = m.encode();
        assert!(text.contains("portcullis_proxy_requests_total{decision=\"allow\",reason=\"ok\"} 2"), "{text}");
        assert!(text.contains("portcullis_proxy_request_duration_seconds_count{decision=\"allow\"} 3"), "{text}");
    }

    #[test]
    fn alert_and_dashboard_metrics_exist() {
        let mut m = Metrics::new();
        m.register_tls();
        m.register_store();
        m.register_clients(1);
        let log =
            AccessLog::to_writer(AccessLogSettings { format: AccessLogFormat::Json, sample: 1.0 }, std::io::sink());
        m.register_access_log(log.unwrap());
        // Families appear in the exposition once they have a series: give each one.
        m.count(None, 0.001);
        m.count(Some(Reason::InvalidKey), 0.001);
        m.table_applied("ns/svc", "r1", 1);
        m.table_rejected("file");
        m.table_revoked("deleted");
        m.table_source_error("transient");
        m.connection_closed("idle");
        m.tls_handshake("ok");
        m.tls_reload("ok");
        m.store_latency.get_or_create(&OpLabels { op: "take" }).observe(0.001);
        m.store_errors.get_or_create(&KindLabels { kind: "timeout" }).inc();
        m.store_fallbacks.get_or_create(&PolicyLabels { policy: "Local" }).inc();
        m.per_client.count("ns/a", "allowed");
        m.per_client.quota_left("ns/a", "gold", 1);
        let exported = exported_metric_names(&m.encode());
        assert!(exported.contains("portcullis_proxy_requests_total"), "{exported:?}");
        for (file, text) in chart_monitoring_files() {
            let named = metric_names_in(&text, "portcullis_proxy_");
            assert!(!named.is_empty(), "{file} names no proxy metric");
            let missing: Vec<_> = named.difference(&exported).collect();
            assert!(missing.is_empty(), "{file} names metrics the proxy does not export: {missing:?}");
        }
    }
}
