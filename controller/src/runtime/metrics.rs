//! Prometheus metrics (`portcullis_controller_*`) and the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub service: String,
    pub revision: String,
}

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub errors: Family<ControllerLabels, Counter>,
    pub duration: HistogramFamily,
    pub table_writes: Family<ServiceLabels, Counter>,
    /// Services queued for the table writer, by the kind of watch event (or task) that queued them.
    pub table_triggers: Family<SourceLabels, Counter>,
    pub table_clients: Family<ServiceLabels, Gauge>,
    pub table_shards: Family<ServiceLabels, Gauge>,
    /// `{service="NAMESPACE/NAME", revision}` = 1 for the revision last written: the same labels as the sidecars'
    /// `portcullis_proxy_table_info`, so a rule can find sidecars on another revision.
    pub table_info: Family<TableLabels, Gauge>,
    /// Findings of the `Protected` condition (ways past the proxy) per Service.
    pub bypass_findings: Family<ServiceLabels, Gauge>,
    current_revisions: std::sync::Mutex<std::collections::HashMap<String, String>>,
    pub leader: Gauge,
    /// 1 while the last check of the shared store succeeded (0 when it failed or no store is configured).
    pub store_up: Gauge,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis_controller");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let errors = Family::<ControllerLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let table_writes = Family::<ServiceLabels, Counter>::default();
        let table_triggers = Family::<SourceLabels, Counter>::default();
        let table_clients = Family::<ServiceLabels, Gauge>::default();
        let table_shards = Family::<ServiceLabels, Gauge>::default();
        let leader = Gauge::default();
        let store_up = Gauge::default();
        registry.register("reconciles", "Reconciliations by controller", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciliations by controller", errors.clone());
        registry.register("reconcile_duration_seconds", "Reconciliation duration by controller", duration.clone());
        registry.register("table_writes", "Table revisions written per Service", table_writes.clone());
        registry.register(
            "table_triggers",
            "Services queued for the table writer, by source (the watch event kind, resync, store)",
            table_triggers.clone(),
        );
        registry.register("table_clients", "Clients in the current table per Service", table_clients.clone());
        registry.register("table_shards", "Shards of the current table per Service", table_shards.clone());
        let table_info = Family::<TableLabels, Gauge>::default();
        registry.register(
            "table_info",
            "The table revision last written per Service (value 1; service=NAMESPACE/NAME, as in the sidecars' \
             portcullis_proxy_table_info)",
            table_info.clone(),
        );
        let bypass_findings = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "bypass_findings",
            "Ways to reach a protected Service's pods past the sidecar (the findings of its UsagePlans' Protected \
             condition; 0 = protected)",
            bypass_findings.clone(),
        );
        registry.register_collector(Box::new(WebhookCertExpiry));
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        registry.register("store_up", "1 while the shared store answered the last check", store_up.clone());
        Self {
            registry,
            reconciles,
            errors,
            duration,
            table_writes,
            table_triggers,
            table_clients,
            table_shards,
            table_info,
            bypass_findings,
            current_revisions: Default::default(),
            leader,
            store_up,
        }
    }

    pub fn observe(&self, controller: &str, elapsed: Duration, ok: bool) {
        let l = ControllerLabels { controller: controller.to_string() };
        self.reconciles.get_or_create(&l).inc();
        if !ok {
            self.errors.get_or_create(&l).inc();
        }
        self.duration.get_or_create(&l).observe(elapsed.as_secs_f64());
    }

    pub fn set_table(&self, namespace: &str, service: &str, clients: usize, shards: usize, revision: &str) {
        let l = ServiceLabels { namespace: namespace.into(), service: service.into() };
        self.table_clients.get_or_create(&l).set(clients as i64);
        self.table_shards.get_or_create(&l).set(shards as i64);
        let id = format!("{namespace}/{service}");
        let mut cur = self.current_revisions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cur.insert(id.clone(), revision.to_string()).filter(|o| o != revision) {
            self.table_info.remove(&TableLabels { service: id.clone(), revision: old });
        }
        self.table_info.get_or_create(&TableLabels { service: id, revision: revision.into() }).set(1);
    }

    pub fn set_bypass_findings(&self, namespace: &str, service: &str, n: usize) {
        let l = ServiceLabels { namespace: namespace.into(), service: service.into() };
        self.bypass_findings.get_or_create(&l).set(n as i64);
    }

    pub fn remove_table(&self, namespace: &str, service: &str) {
        let l = ServiceLabels { namespace: namespace.into(), service: service.into() };
        self.table_clients.remove(&l);
        self.table_shards.remove(&l);
        self.bypass_findings.remove(&l);
        let id = format!("{namespace}/{service}");
        let mut cur = self.current_revisions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cur.remove(&id) {
            self.table_info.remove(&TableLabels { service: id, revision: old });
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String");
        out
    }
}

/// `portcullis_controller_webhook_certificate_expiry_timestamp_seconds`: read at scrape time from the webhook's
/// serving certificate (absent until one is loaded).
#[derive(Debug)]
struct WebhookCertExpiry;

impl prometheus_client::collector::Collector for WebhookCertExpiry {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let not_after = crate::webhook::server::SERVING_CERT_NOT_AFTER.load(Ordering::Relaxed);
        if not_after == 0 {
            return Ok(());
        }
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(not_after);
        let metric = encoder.encode_descriptor(
            "webhook_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate the admission webhook serves, Unix seconds",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Liveness/readiness flags served by the admin server. `/readyz` is 200 once `ready` is set and the `gate` (the
/// admission webhook serving, when this process runs one) is open; leadership and cache sync do not enter into it.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
    pub gate: Option<Arc<AtomicBool>>,
}

impl Health {
    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.gate.as_ref().is_none_or(|g| g.load(Ordering::SeqCst))
    }
}

/// Binds `addr` and serves the admin endpoints until the returned task is aborted.
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = respond(req.uri().path(), &metrics, &health);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok((bound, task))
}

fn respond(path: &str, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if health.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_table::test_util::{chart_monitoring_files, exported_metric_names, metric_names_in};

    #[test]
    fn alert_and_dashboard_metrics_exist() {
        // Families appear in the exposition once they have a series: give each one.
        let m = Metrics::new();
        m.observe("table", Duration::from_millis(1), false);
        m.set_table("ns", "svc", 1, 1, "r1");
        m.table_writes.get_or_create(&ServiceLabels { namespace: "ns".into(), service: "svc".into() }).inc();
        m.set_bypass_findings("ns", "svc", 0);
        crate::webhook::server::SERVING_CERT_NOT_AFTER.store(1, Ordering::Relaxed);
        let exported = exported_metric_names(&m.encode());
        for (file, text) in chart_monitoring_files() {
            let named = metric_names_in(&text, "portcullis_controller_");
            assert!(!named.is_empty(), "{file} names no controller metric");
            let missing: Vec<_> = named.difference(&exported).collect();
            assert!(missing.is_empty(), "{file} names metrics the controller does not export: {missing:?}");
        }
    }

    #[test]
    fn metrics_are_prefixed() {
        let m = Metrics::new();
        m.observe("table", Duration::from_millis(3), false);
        m.set_table("ns", "orders", 10, 1, "r1");
        m.set_table("ns", "orders", 11, 1, "r2");
        let text = m.encode();
        assert!(text.contains("portcullis_controller_table_info{service=\"ns/orders\",revision=\"r2\"} 1"), "{text}");
        assert!(!text.contains("revision=\"r1\""), "the previous revision's series is gone: {text}");
        assert!(text.contains("portcullis_controller_reconciles_total{controller=\"table\"} 1"), "{text}");
        assert!(text.contains("portcullis_controller_reconcile_errors_total"));
        assert!(text.contains("portcullis_controller_reconcile_duration_seconds_bucket"));
        assert!(text.contains("portcullis_controller_table_clients{namespace=\"ns\",service=\"orders\"} 11"));
        m.remove_table("ns", "orders");
        assert!(!m.encode().contains("revision=\"r2\""));
    }
}
