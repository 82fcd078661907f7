//! Portcullis proxy: the sidecar that checks an API key, the source address, the route, a throttle and a quota
//! before forwarding a request to the application on loopback.
//!
//! [`decision`] is the pure logic (no I/O); [`handle`] is one request's path (decision, rewrite, forward);
//! [`server`] is the listeners and each connection's lifecycle. [`start`] binds the listeners and returns a [`Running`] proxy whose
//! bound addresses tests can read; [`run`] is what the binary calls.

pub mod access_log;
pub mod admin;
pub mod app_probe;
pub mod body;
pub mod client_metrics;
pub mod config;
pub mod decision;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod global;
pub mod handle;
pub mod heap;
pub mod io;
pub mod metrics;
pub mod proxy_protocol;
pub mod respond;
pub mod rewrite;
pub mod server;
pub mod source_limit;
pub mod tables;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod workers;

pub use config::{Cli, Config, TableSource, TlsFiles};

use metrics::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tables::TableStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("--upstream")]
    Upstream(#[from] http::Error),
    #[error("Kubernetes client configuration (in-cluster service account or KUBECONFIG)")]
    KubeConfig(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    KubeClient(#[source] kube::Error),
    #[error("TLS")]
    Tls(#[from] tls::TlsError),
    #[error("starting the worker threads")]
    Workers(#[source] std::io::Error),
    #[error("--require-tls and --plain-listen need --tls-cert and --tls-key")]
    NeedsCert,
    #[error("--table-rewatch: {0}")]
    TableRewatch(String),
    #[error("--store-url")]
    Store(#[source] portcullis_store::StoreError),
}

/// A started proxy.
pub struct Running {
    /// The main listener: HTTPS when a certificate is configured.
    pub addr: SocketAddr,
    /// The plain-HTTP listener next to a TLS one (`--plain-listen`).
    pub plain_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub tables: Arc<TableStore>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting; in-flight requests get the configured grace period.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits for the listener to drain (after [`Running::shutdown`]).
    pub async fn wait(self) {
        for s in self.servers {
            let _ = s.await;
        }
        for b in self.background {
            b.abort();
            let _ = b.await;
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
}

/// Binds the listeners, starts the table source and serves. A table that cannot be loaded at start is logged
/// and the proxy answers 503 `no_table` until one loads; a table taken away later (deleted, no longer readable)
/// makes it answer 503 `table_revoked` (see [`tables::TableState`]).
pub async fn start(config: Config) -> Result<Running, StartError> {
    let mut metrics = Metrics::new();
    if config.tls.is_some() {
        metrics.register_tls();
    }
    if config.store.is_some() {
        metrics.register_store();
    }
    metrics.register_clients(config.client_metrics);
    let access_log = access_log::AccessLog::stdout(config.access_log);
    if let Some(log) = &access_log {
        metrics.register_access_log(log.clone());
    }
    let metrics = Arc::new(metrics);
    let tables = Arc::new(TableStore::new(metrics.clone()));
    let global = match &config.store {
        Some(s) => {
            let g =
                global::GlobalLimits::new(s, config.replica_id.clone(), metrics.clone()).map_err(StartError::Store)?;
            tables.set_global(g.clone());
            Some(g)
        }
        None => None,
    };
    let shared = Arc::new(server::Shared::new(&config, tables.clone(), metrics.clone(), access_log)?);
    if config.tls.is_none() && (config.require_tls || config.plain_listen.is_some()) {
        return Err(StartError::NeedsCert);
    }
    let tls = match &config.tls {
        Some(f) => Some(tls::setup(f, metrics.clone())?),
        None => None,
    };
    let listener = bind(config.listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let plain = match config.plain_listen {
        Some(a) => {
            let l = bind(a).await?;
            let bound = l.local_addr().map_err(|source| StartError::Bind { addr: a, source })?;
            Some((l, bound))
        }
        None => None,
    };
    let (stop, stop_rx) = watch::channel(false);
    let mut background = Vec::new();
    if let Some(g) = global {
        background.push(tokio::spawn(g.run(tables.clone(), stop_rx.clone())));
    }
    let acceptor = match tls {
        Some((acceptor, watcher)) => {
            background.push(tokio::spawn(watcher.run(config.file_poll_interval, stop_rx.clone())));
            Some(acceptor)
        }
        None => None,
    };

    let admin_addr = match config.admin_listen {
        Some(a) => {
            let l = bind(a).await?;
            let bound = l.local_addr().map_err(|source| StartError::Bind { addr: a, source })?;
            let pod = Arc::new(admin::PodInfo { pod: config.pod_name.clone(), app_probes: config.app_probes.clone() });
            background.push(tokio::spawn(admin::serve(
                l,
                tables.clone(),
                metrics.clone(),
                pod,
                config.admin_max_connections,
                stop_rx.clone(),
            )));
            Some(bound)
        }
        None => None,
    };

    match config.tables.clone() {
        TableSource::File(path) => {
            let mut watcher = tables::FileWatcher::new(tables.clone(), path);
            watcher.check().await;
            background.push(tokio::spawn(watcher.run(config.file_poll_interval, stop_rx.clone())));
        }
        TableSource::ConfigMap { namespace, name, kube } => {
            config::check_rewatch(config.table_rewatch).map_err(StartError::TableRewatch)?;
            let mut kube_config = match kube {
                Some(c) => *c,
                None => kube::Config::infer().await.map_err(StartError::KubeConfig)?,
            };
            // The table watch retries on its own, with backoff; the client's retry layer would only hide failures.
            kube_config.default_retry = false;
            let client = kube::Client::try_from(kube_config).map_err(StartError::KubeClient)?;
            background.push(tokio::spawn(tables::watch_configmap(
                tables.clone(),
                client,
                namespace,
                name,
                config.table_rewatch,
                stop_rx.clone(),
            )));
        }
    }

    let plain_addr = plain.as_ref().map(|(_, a)| *a);
    tracing::info!(%addr, tls = acceptor.is_some(), ?plain_addr, ?admin_addr, require_tls = config.require_tls,
        upstream = %config.upstream, tables = ?config.tables, "proxy listening");
    let max = config.max_connections.max(1);
    let workers = Arc::new(
        workers::Workers::start(workers::Workers::default_count(config.workers)).map_err(StartError::Workers)?,
    );
    tracing::info!(workers = workers.len(), "serving threads started");
    let mut servers = vec![tokio::spawn(server::serve(
        listener,
        acceptor,
        shared.clone(),
        workers.clone(),
        max,
        config.shutdown_grace,
        stop_rx.clone(),
    ))];
    if let Some((l, _)) = plain {
        servers.push(tokio::spawn(server::serve(l, None, shared, workers, max, config.shutdown_grace, stop_rx)));
    }
    Ok(Running { addr, plain_addr, admin_addr, tables, metrics, stop, servers, background })
}

/// Runs until `signal` completes, then shuts down gracefully.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    signal.await;
    tracing::info!("shutting down");
    running.shutdown();
    running.wait().await;
    Ok(())
}
