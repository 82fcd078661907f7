//! Admin listener: `/metrics`, `/healthz`, `/readyz` (200 only while an ordinary table is enforced; 503 with the
//! reason before the first table, for a deny-all table and while the table is revoked; a second line on the shared
//! store, which never changes the status), `/revision` (which table
//! this sidecar serves, as JSON: the controller's `Enforced` condition reads it) and `/app-health/<container>/<kind>`
//! (the application's own probes run on loopback: [`crate::app_probe`]).
//!
//! HTTP/1.1 only, at most `--admin-max-connections` connections at once (further ones wait in the accept backlog,
//! as on the main listener), each closed when a request head takes more than 10 s, including the wait for the next
//! request on a kept-alive connection (hyper's header read timeout), so a slot is never held longer than that by a
//! client that sends nothing.

use crate::metrics::Metrics;
use crate::tables::TableStore;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_table::sidecar::{APP_HEALTH_PREFIX, AppProbes, REVISION_PATH, RevisionReport};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// How long a request head (or the wait for the next one) may take.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin port knows about the sidecar's pod.
#[derive(Debug, Clone, Default)]
pub struct PodInfo {
    /// `POD_NAME`, reported by `/revision`.
    pub pod: Option<String>,
    /// The application's original probes, served under `/app-health/`.
    pub app_probes: AppProbes,
}

pub async fn serve(
    listener: TcpListener,
    tables: Arc<TableStore>,
    metrics: Arc<Metrics>,
    pod: Arc<PodInfo>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = stop.changed() => return,
        };
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let tables = tables.clone();
        let metrics = metrics.clone();
        let pod = pod.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (tables, metrics, pod) = (tables.clone(), metrics.clone(), pod.clone());
                async move { Ok::<_, Infallible>(route(&req, &tables, &metrics, &pod).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
            drop(permit);
        });
    }
}

async fn route(
    req: &Request<Incoming>,
    tables: &TableStore,
    metrics: &Metrics,
    pod: &PodInfo,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
        r
    };
    match req.uri().path() {
        "/metrics" => {
            text(StatusCode::OK, metrics.encode(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let state = tables.state();
            let status = if state.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            // The store's state is a detail, never a reason to leave the Service: a store outage would otherwise
            // take every replica out at once, and the plans' fallbacks exist for exactly that case.
            let store = tables.store_detail().map(|d| format!("{d}\n")).unwrap_or_default();
            text(status, format!("{}\n{store}", state.describe()), "text/plain")
        }
        REVISION_PATH => {
            let current = tables.current.load();
            let report = RevisionReport {
                service: current.as_ref().map(|t| t.service.clone()),
                revision: current.as_ref().map(|t| t.revision.clone()),
                pod: pod.pod.clone(),
            };
            let status = if report.revision.is_some() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = serde_json::to_string(&report).expect("a report always serializes");
            text(status, body, "application/json")
        }
        path if path.starts_with(APP_HEALTH_PREFIX) => match pod.app_probes.get(path) {
            None => text(StatusCode::NOT_FOUND, "no such application probe\n".into(), "text/plain"),
            Some(_) if req.method() != http::Method::GET => {
                text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), "text/plain")
            }
            Some(probe) => {
                let outcome = crate::app_probe::run(probe, req.headers().get(header::USER_AGENT)).await;
                let status = if outcome.is_healthy() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                text(status, outcome.describe(), "text/plain")
            }
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}
