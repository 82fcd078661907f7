//! `portcullis-controller`: renders Portcullis tables and ApiClient/UsagePlan status.

use clap::{Parser, ValueEnum};
use portcullis_controller::network_policy::SidecarPorts;
use portcullis_controller::runtime::{Config, tables::Debounce};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

#[derive(Parser, Debug)]
#[command(version, about = "Portcullis controller: ApiClients and UsagePlans → per-Service tables in ConfigMaps")]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PORTCULLIS_NAMESPACE")]
    namespace: Option<String>,
    /// Use a coordination.k8s.io/v1 Lease so only one replica writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "portcullis-controller")]
    lease_name: String,
    /// Lease duration in seconds: how long a standby waits, after it last saw the Lease renewed, before taking it.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// The leader stops writing this long after the start of its last successful renewal (below the duration).
    #[arg(long, default_value_t = 10)]
    lease_renew_deadline_seconds: u64,
    /// Interval between Lease renewals, also the timeout of each Lease API call (below the renew deadline).
    #[arg(long, default_value_t = 2)]
    lease_retry_period_seconds: u64,
    /// Every Service's table is re-rendered and its shards checked this often (repairs unreported drift).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    resync_seconds: u64,
    /// Identity in the Lease and Events (default: POD_NAME or hostname + pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Admin HTTP address serving /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Quiet time that closes a burst of changes before tables are rendered.
    #[arg(long, default_value_t = 100)]
    debounce_millis: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Serve the sidecar-injection admission webhook (`--webhook=false` to run without it).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    webhook: bool,
    #[command(flatten)]
    webhook_args: portcullis_controller::webhook::WebhookArgs,
    #[command(flatten)]
    network_policy: portcullis_controller::network_policy::NetworkPolicyArgs,
    #[command(flatten)]
    store: portcullis_controller::store::StoreArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
        LogFormat::Pretty => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    if let Err(e) = real_main(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(mut args: Args) -> anyhow::Result<()> {
    // Store settings first: a bad URL stops the controller before it touches the cluster.
    let store = args.store.settings(|k| std::env::var(k).ok())?;
    if let Some(s) = &store {
        tracing::info!(url = %s.url, user = ?s.username, password = s.password.is_some(), "shared store configured");
    }
    args.webhook_args.sidecar_store = store.as_ref().map(|s| portcullis_controller::webhook::inject::SidecarStore {
        url: s.url.clone(),
        timeout: s.sidecar_timeout,
    });
    let kube_config = kube::Config::infer().await?;
    let client = kube::Client::try_from(kube_config)?;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "portcullis-controller".into());
        format!("{host}-{}", std::process::id())
    });
    let config = Config {
        namespace: args.namespace,
        leader_elect: args.leader_elect,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        lease_duration: Duration::from_secs(args.lease_duration_seconds),
        lease_renew_deadline: Duration::from_secs(args.lease_renew_deadline_seconds),
        lease_retry_period: Duration::from_secs(args.lease_retry_period_seconds),
        resync_interval: Duration::from_secs(args.resync_seconds),
        max_shard_bytes: portcullis_table::shard::MAX_SHARD_BYTES,
        identity,
        metrics_listen: Some(args.metrics_listen),
        debounce: Debounce { quiet: Duration::from_millis(args.debounce_millis), max_wait: Duration::from_secs(2) },
        // The NetworkPolicy's default admin peer is the controller's own namespace (it reads `/revision`).
        network_policy: args.network_policy.settings(&args.webhook_args.webhook_namespace)?,
        sidecar_ports: SidecarPorts {
            proxy: i32::from(args.webhook_args.sidecar_proxy_port),
            admin: i32::from(args.webhook_args.sidecar_admin_port),
        },
        sidecar_client_ca_default: args
            .webhook_args
            .sidecar_client_ca_secret
            .as_deref()
            .is_some_and(|s| !s.trim().is_empty()),
        // `/readyz` follows the webhook (when it runs here), not leadership or cache sync.
        webhook_ready: args.webhook.then(|| Arc::new(AtomicBool::new(false))),
        enforcement: Default::default(),
        store,
        own_namespace: args.webhook_args.webhook_namespace.clone(),
    };
    let webhook_ready = config.webhook_ready.clone();
    let controller = async { portcullis_controller::run(client.clone(), config, shutdown_signal()).await };
    if let Some(ready) = webhook_ready {
        let webhook = portcullis_controller::webhook::run(args.webhook_args, client.clone(), shutdown_signal(), ready);
        tokio::try_join!(async { webhook.await.map_err(anyhow::Error::from) }, async {
            controller.await.map_err(anyhow::Error::from)
        },)?;
    } else {
        controller.await?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
