//! Run-time configuration. [`Cli`] is the command line (every flag also an environment variable); [`Config`] is
//! what [`crate::start`] takes, so tests can build it directly.

use crate::decision::CidrSet;
use crate::decision::path::EscapedSlashes;
use crate::tunnel::UpgradeProtocols;
use clap::Parser;
use http::HeaderName;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone)]
pub enum TableSource {
    /// `--tables FILE`
    File(PathBuf),
    /// `--tables-from configmap/NAMESPACE/INDEX_NAME`; `kube: None` infers the client config (KUBECONFIG or
    /// in-cluster), tests pass one explicitly.
    ConfigMap { namespace: String, name: String, kube: Option<Box<kube::Config>> },
}

impl std::fmt::Debug for TableSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableSource::File(p) => write!(f, "file {}", p.display()),
            TableSource::ConfigMap { namespace, name, .. } => write!(f, "configmap/{namespace}/{name}"),
        }
    }
}

/// `--tls-cert` / `--tls-key`: PEM files, watched.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--client-ca`: PEM CA certificates; request a client certificate and verify it against them.
    pub client_ca: Option<PathBuf>,
    /// `--require-client-cert`: refuse handshakes without a (verified) client certificate.
    pub require_client_cert: bool,
}

impl TlsFiles {
    /// A serving certificate and key, no client certificates.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self { cert: cert.into(), key: key.into(), client_ca: None, require_client_cert: false }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Serves TLS when `tls` is set, plain HTTP (HTTP/1.1 + h2c) otherwise.
    pub listen: SocketAddr,
    /// A second, plain-HTTP listener (in-cluster callers) next to a TLS `listen`.
    pub plain_listen: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    /// Refuse requests carrying the key header on plain-HTTP connections (403 `tls_required`). Needs `tls`.
    pub require_tls: bool,
    pub admin_listen: Option<SocketAddr>,
    /// `host:port` of the application (loopback).
    pub upstream: String,
    pub tables: TableSource,
    pub trusted_proxies: CidrSet,
    pub proxy_protocol: bool,
    pub key_header: HeaderName,
    /// `--allow-escaped-slashes`: keep `%2F` / `%5C` in paths instead of refusing them.
    pub escaped_slashes: EscapedSlashes,
    /// `--allow-underscore-headers`: forward headers with `_` in their name (except look-alikes of the identity,
    /// key and forwarding headers, which are always dropped).
    pub allow_underscore_headers: bool,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Open connections per source address (IPv6: per /64); 0 = no cap.
    pub max_connections_per_source: usize,
    /// Protocols an HTTP/1.1 `Upgrade` may switch to.
    pub upgrade_protocols: UpgradeProtocols,
    /// Close an upgraded connection after this long with no byte either way.
    pub tunnel_idle_timeout: Duration,
    /// Requests in progress at once on the shared upstream pool (h2 streams arriving while their connection's own
    /// upstream connection is busy).
    pub max_side_pool_requests: usize,
    /// A request body must advance by `body::PROGRESS_FLOOR` bytes in every period this long spent waiting on it.
    pub body_read_timeout: Duration,
    /// Open connections on the admin listener.
    pub admin_max_connections: usize,
    pub shutdown_grace: Duration,
    pub file_poll_interval: Duration,
    /// `--tables-from`: the table watch is re-established this often (its `timeoutSeconds`), each time authorised
    /// afresh, so a lost permission (RBAC removed) is noticed within about this time even when nothing changes.
    /// Whole seconds, at least 1 s.
    pub table_rewatch: Duration,
    /// Serving threads; 0 = one per CPU.
    pub workers: usize,
    /// This sidecar's pod, reported by the admin `/revision`.
    pub pod_name: Option<String>,
    /// The application's original probes, served on the admin port under `/app-health/`.
    pub app_probes: portcullis_table::sidecar::AppProbes,
    /// The shared store for `globalLimits` throttles and global quotas (`--store-url`); `None`: counts stay local.
    pub store: Option<portcullis_store::StoreConfig>,
    /// This proxy's name among its Service's replicas in the store's heartbeats.
    pub replica_id: String,
    /// `--access-log`, `--access-log-sample` (off in [`Config::new`]; the CLI's default is JSON).
    pub access_log: crate::access_log::AccessLogSettings,
    /// `--client-metrics`: clients given their own label in the per-client metrics (first come); the rest are
    /// counted as `other`. 0 = no per-client metrics.
    pub client_metrics: usize,
}

/// Default for `--replica-id`: `POD_NAME`, else the host name, else the process id.
pub fn default_replica_id() -> String {
    let from_env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    from_env("POD_NAME")
        .or_else(|| from_env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

impl Config {
    /// Defaults for everything but the three things that have none.
    pub fn new(listen: SocketAddr, upstream: impl Into<String>, tables: TableSource) -> Self {
        Self {
            listen,
            plain_listen: None,
            tls: None,
            require_tls: false,
            admin_listen: None,
            upstream: upstream.into(),
            tables,
            trusted_proxies: CidrSet::default(),
            proxy_protocol: false,
            key_header: HeaderName::from_static("x-api-key"),
            escaped_slashes: EscapedSlashes::Reject,
            allow_underscore_headers: false,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            max_connections_per_source: 0,
            upgrade_protocols: UpgradeProtocols::default(),
            tunnel_idle_timeout: Duration::from_secs(300),
            max_side_pool_requests: 256,
            body_read_timeout: Duration::from_secs(30),
            admin_max_connections: 32,
            shutdown_grace: Duration::from_secs(20),
            file_poll_interval: Duration::from_millis(250),
            table_rewatch: Duration::from_secs(30),
            workers: 0,
            pod_name: None,
            app_probes: Default::default(),
            store: None,
            replica_id: default_replica_id(),
            access_log: Default::default(),
            client_metrics: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// portcullis-proxy: API key + source address + route + throttle/quota checks in front of an app on loopback.
#[derive(Debug, Parser)]
#[command(name = "portcullis-proxy", version)]
pub struct Cli {
    /// Address clients connect to: HTTPS when --tls-cert is given, plain HTTP otherwise.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Also serve plain HTTP here (in-cluster callers), next to the TLS listener.
    #[arg(long, env = "PORTCULLIS_PLAIN_LISTEN", requires = "tls_cert")]
    pub plain_listen: Option<SocketAddr>,
    /// PEM certificate chain (end-entity first); serve HTTPS. Reloaded when the file changes.
    #[arg(long, env = "PORTCULLIS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "PORTCULLIS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): request a client certificate on the TLS listener and verify it against them (read at
    /// start). A verified certificate can identify an ApiClient (spec.certificates).
    #[arg(long, env = "PORTCULLIS_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Refuse TLS handshakes without a client certificate verified against --client-ca.
    #[arg(long, env = "PORTCULLIS_REQUIRE_CLIENT_CERT", requires = "client_ca")]
    pub require_client_cert: bool,
    /// Refuse (403 tls_required) any request carrying the key header over plain HTTP.
    #[arg(long, env = "PORTCULLIS_REQUIRE_TLS", requires = "tls_cert")]
    pub require_tls: bool,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "0.0.0.0:9901")]
    pub admin_listen: SocketAddr,
    /// The application, `host:port` (normally 127.0.0.1:PORT).
    #[arg(long, env = "PORTCULLIS_UPSTREAM")]
    pub upstream: String,
    /// Read the table from this JSON file, watched for changes.
    #[arg(long, env = "PORTCULLIS_TABLES", conflicts_with = "tables_from", required_unless_present = "tables_from")]
    pub tables: Option<PathBuf>,
    /// Read the table from the Kubernetes API: `configmap/NAMESPACE/INDEX_NAME`.
    #[arg(long, env = "PORTCULLIS_TABLES_FROM")]
    pub tables_from: Option<String>,
    /// Comma-separated CIDRs of proxies whose X-Forwarded-For / Forwarded / PROXY headers are believed.
    #[arg(long, env = "PORTCULLIS_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Accept PROXY protocol v1/v2 headers (from trusted proxies only).
    #[arg(long, env = "PORTCULLIS_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Header carrying the API key.
    #[arg(long, env = "PORTCULLIS_KEY_HEADER", default_value = "x-api-key")]
    pub key_header: String,
    /// Pass `%2F` and `%5C` in request paths to the application (escaped, not segment separators for route
    /// scopes) instead of refusing the request with 400 invalid_path. Only for applications that never decode
    /// them into separators.
    #[arg(long, env = "PORTCULLIS_ALLOW_ESCAPED_SLASHES")]
    pub allow_escaped_slashes: bool,
    /// Forward request headers with `_` in their name (dropped by default, as nginx and Envoy do). Look-alikes of
    /// x-portcullis-client, the key header and the forwarding headers are dropped regardless.
    #[arg(long, env = "PORTCULLIS_ALLOW_UNDERSCORE_HEADERS")]
    pub allow_underscore_headers: bool,
    #[arg(long, env = "PORTCULLIS_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Largest request head (request line + headers) accepted, in bytes (at least 8192 for HTTP/1).
    #[arg(long, env = "PORTCULLIS_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// Time allowed to receive a request's headers (e.g. `10s`); also the time a new connection has, from accept,
    /// to finish its PROXY header, TLS handshake and the HTTP/2 preface (or first HTTP/1.1 byte).
    #[arg(long, env = "PORTCULLIS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Close client connections with no request in progress (HTTP/2: no open stream) for this long. PINGs do not
    /// count as activity.
    #[arg(long, env = "PORTCULLIS_IDLE_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Most client connections open at once (upgraded ones included); further connections wait in the accept
    /// backlog.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most connections one source address (IPv6: one /64) may hold open; further ones are closed at once. The TCP
    /// peer, or for --trusted-proxies peers with --proxy-protocol the PROXY header's source; trusted peers without
    /// --proxy-protocol are not capped. 0 = no cap.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 0)]
    pub max_connections_per_source: usize,
    /// Comma-separated protocols an HTTP/1.1 `Upgrade` may switch to (empty: none). `Upgrade: h2c` alone is
    /// ignored; any other protocol is refused with 400 upgrade_not_allowed.
    #[arg(long, env = "PORTCULLIS_UPGRADE_PROTOCOLS", default_value = "websocket")]
    pub upgrade_protocols: String,
    /// Close an upgraded (WebSocket) connection after this long with no byte in either direction.
    #[arg(long, env = "PORTCULLIS_TUNNEL_IDLE_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub tunnel_idle_timeout: Duration,
    /// Requests in progress at once on the shared upstream pool used by HTTP/2 streams that arrive while their
    /// connection's own upstream connection is busy; beyond it, 503 upstream_busy.
    #[arg(long, env = "PORTCULLIS_MAX_SIDE_POOL_REQUESTS", default_value_t = 256)]
    pub max_side_pool_requests: usize,
    /// A request body must arrive at 1 KiB (or its end) per this much time spent waiting for it, or the request is
    /// aborted (408 body_timeout).
    #[arg(long, env = "PORTCULLIS_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// Most connections open at once on the admin listener; further ones wait in its accept backlog.
    #[arg(long, env = "PORTCULLIS_ADMIN_MAX_CONNECTIONS", default_value_t = 32)]
    pub admin_max_connections: usize,
    /// Threads serving connections, each with its own single-threaded runtime (0 = one per CPU this process may
    /// use, cgroup CPU quota included).
    #[arg(long, env = "PORTCULLIS_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// With --tables-from: re-establish the table watch this often (whole seconds, at least 1s). Each new watch is
    /// authorised afresh, so a removed RoleBinding is noticed within about this time even if the table does not
    /// change (deletions and changes of the table are seen at once, whatever this is).
    #[arg(long, env = "PORTCULLIS_TABLE_REWATCH", default_value = "30s", value_parser = parse_rewatch)]
    pub table_rewatch: Duration,
    /// On SIGTERM/SIGINT, time given to in-flight requests before exiting.
    #[arg(long, env = "PORTCULLIS_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// This sidecar's pod name, reported by the admin `/revision` (the webhook sets `POD_NAME`).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The application's original probes as JSON (set by the webhook for `portcullis.dev/app-loopback` pods):
    /// served on the admin port at `/app-health/<container>/<livez|readyz|startupz>`, run against 127.0.0.1.
    #[arg(long, env = portcullis_table::sidecar::APP_PROBES_ENV)]
    pub app_probes: Option<String>,
    /// The shared store (Redis) where plans with globalLimits count their throttle and global quotas their use,
    /// across every replica: redis://host:port[/db] or rediss:// (TLS). No credentials in the URL: they come from
    /// PORTCULLIS_STORE_USERNAME / PORTCULLIS_STORE_PASSWORD. Unset: every count is kept per proxy.
    #[arg(long, env = "PORTCULLIS_STORE_URL")]
    pub store_url: Option<String>,
    /// Longest a request waits for the store; past it the plan's onStoreUnavailable policy decides.
    #[arg(long, env = "PORTCULLIS_STORE_TIMEOUT", default_value = "50ms", value_parser = parse_duration)]
    pub store_timeout: Duration,
    /// This proxy's name in the store's replica heartbeats (default: POD_NAME, else the host name).
    #[arg(long, env = "PORTCULLIS_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// One line per request on stdout (docs/observability.md): `json`, or `off`.
    #[arg(long, env = "PORTCULLIS_ACCESS_LOG", value_enum, default_value = "json")]
    pub access_log: crate::access_log::AccessLogFormat,
    /// Fraction of allowed requests in the access log (0 to 1); every refusal is logged.
    #[arg(long, env = "PORTCULLIS_ACCESS_LOG_SAMPLE", default_value = "1", value_parser = crate::access_log::parse_sample)]
    pub access_log_sample: f64,
    /// Clients with their own label in portcullis_proxy_client_requests_total (the first this many seen; the rest
    /// are counted under client="other"). Bounds the metrics' cardinality; 0 = no per-client metrics.
    #[arg(long, env = "PORTCULLIS_CLIENT_METRICS", default_value_t = 100)]
    pub client_metrics: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--trusted-proxies: {0}")]
    TrustedProxies(String),
    #[error("--key-header {0:?} is not a valid header name")]
    KeyHeader(String),
    #[error("--tables-from {0:?}: expected configmap/NAMESPACE/NAME")]
    TablesFrom(String),
    #[error("one of --tables or --tables-from is required")]
    NoTables,
    #[error("--upgrade-protocols: {0}")]
    UpgradeProtocols(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error(transparent)]
    AppProbes(#[from] portcullis_table::sidecar::AppProbesError),
    #[error("--store-url: {0}")]
    Store(#[from] portcullis_store::ConfigError),
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration =
        s.parse().map_err(|e| format!("{s:?} is not a duration such as 10s or 500ms: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} must not be negative"))
}

/// A `--table-rewatch` value: the watch's `timeoutSeconds`, so whole seconds and at least one.
pub fn parse_rewatch(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    check_rewatch(d)?;
    Ok(d)
}

pub fn check_rewatch(d: Duration) -> Result<(), String> {
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 || d.as_secs() > u64::from(u32::MAX) {
        return Err(format!("{d:?}: the table watch timeout must be whole seconds, at least 1s"));
    }
    Ok(())
}

impl Cli {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let tables = match (self.tables, self.tables_from) {
            (Some(p), _) => TableSource::File(p),
            (None, Some(spec)) => parse_tables_from(&spec)?,
            (None, None) => return Err(ConfigError::NoTables),
        };
        let mut c = Config::new(self.listen, self.upstream, tables);
        c.plain_listen = self.plain_listen;
        c.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsFiles { cert, key, client_ca: self.client_ca, require_client_cert: self.require_client_cert })
            }
            _ => None,
        };
        c.require_tls = self.require_tls;
        c.admin_listen = Some(self.admin_listen);
        c.trusted_proxies = CidrSet::parse_list(&self.trusted_proxies).map_err(ConfigError::TrustedProxies)?;
        c.proxy_protocol = self.proxy_protocol;
        c.key_header = HeaderName::from_bytes(self.key_header.to_ascii_lowercase().as_bytes())
            .map_err(|_| ConfigError::KeyHeader(self.key_header.clone()))?;
        c.escaped_slashes = if self.allow_escaped_slashes { EscapedSlashes::Keep } else { EscapedSlashes::Reject };
        c.allow_underscore_headers = self.allow_underscore_headers;
        c.max_header_bytes = self.max_header_bytes;
        c.header_read_timeout = self.header_read_timeout;
        c.idle_timeout = self.idle_timeout;
        c.max_connections = self.max_connections.max(1);
        c.max_connections_per_source = self.max_connections_per_source;
        c.upgrade_protocols =
            UpgradeProtocols::parse(&self.upgrade_protocols).map_err(ConfigError::UpgradeProtocols)?;
        for (name, d) in [
            ("--header-read-timeout", self.header_read_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--tunnel-idle-timeout", self.tunnel_idle_timeout),
            ("--body-read-timeout", self.body_read_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        c.tunnel_idle_timeout = self.tunnel_idle_timeout;
        for (name, n) in [
            ("--max-side-pool-requests", self.max_side_pool_requests),
            ("--admin-max-connections", self.admin_max_connections),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        c.max_side_pool_requests = self.max_side_pool_requests;
        c.body_read_timeout = self.body_read_timeout;
        c.admin_max_connections = self.admin_max_connections;
        c.shutdown_grace = self.shutdown_grace;
        c.table_rewatch = self.table_rewatch;
        c.workers = self.workers;
        c.pod_name = self.pod_name.filter(|p| !p.is_empty());
        c.app_probes = match self.app_probes.as_deref().map(str::trim) {
            None | Some("") => Default::default(),
            Some(json) => portcullis_table::sidecar::parse_app_probes(json)?,
        };
        c.store = match self.store_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                let mut s = portcullis_store::StoreConfig::new(url).with_env_credentials();
                s.timeout = self.store_timeout;
                s.validate()?;
                Some(s)
            }
        };
        if let Some(id) = self.replica_id.filter(|r| !r.is_empty()) {
            c.replica_id = id;
        }
        c.access_log = crate::access_log::AccessLogSettings { format: self.access_log, sample: self.access_log_sample };
        c.client_metrics = self.client_metrics;
        Ok(c)
    }
}

pub fn parse_tables_from(spec: &str) -> Result<TableSource, ConfigError> {
    let parts: Vec<&str> = spec.split('/').collect();
    match parts[..] {
        ["configmap", ns, name] if !ns.is_empty() && !name.is_empty() => {
            Ok(TableSource::ConfigMap { namespace: ns.to_string(), name: name.to_string(), kube: None })
        }
        _ => Err(ConfigError::TablesFrom(spec.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_into_config() {
        let cli = Cli::try_parse_from([
            "portcullis-proxy",
            "--upstream",
            "127.0.0.1:8080",
            "--tables-from",
            "configmap/shop/portcullis-table-orders",
            "--trusted-proxies",
            "10.0.0.0/8, 127.0.0.10",
            "--key-header",
            "X-Key",
            "--idle-timeout",
            "1500ms",
        ])
        .unwrap();
        let c = cli.into_config().unwrap();
        assert!(
            matches!(&c.tables, TableSource::ConfigMap { namespace, name, .. } if namespace == "shop" && name == "portcullis-table-orders")
        );
        assert!(c.trusted_proxies.contains("127.0.0.10".parse().unwrap()));
        assert_eq!(c.key_header.as_str(), "x-key");
        assert_eq!(c.idle_timeout, Duration::from_millis(1500));
        assert!(parse_tables_from("secret/a/b").is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(Cli::try_parse_from(["portcullis-proxy", "--upstream", "x:1"]).is_err(), "a table source is required");
        assert!(c.tls.is_none() && !c.require_tls && c.plain_listen.is_none());
        assert_eq!(c.escaped_slashes, EscapedSlashes::Reject);
        assert!(!c.allow_underscore_headers);
        let base = ["portcullis-proxy", "--upstream", "127.0.0.1:1", "--tables", "t.json"];
        let c = Cli::try_parse_from(base.iter().chain(&["--allow-escaped-slashes", "--allow-underscore-headers"]))
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(c.escaped_slashes, EscapedSlashes::Keep);
        assert!(c.allow_underscore_headers);
        assert_eq!(c.table_rewatch, Duration::from_secs(30));
    }

    #[test]
    fn table_rewatch_must_be_whole_seconds() {
        let parse = |v: &str| {
            Cli::try_parse_from(["portcullis-proxy", "--upstream", "x:1", "--tables", "t", "--table-rewatch", v])
                .map(|c| c.table_rewatch)
        };
        assert_eq!(parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        for bad in ["500ms", "1500ms", "0s", "soon"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connection_bound_flags() {
        let base = ["portcullis-proxy", "--upstream", "127.0.0.1:1", "--tables", "t.json"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra.iter())).unwrap().into_config();
        let d = parse(&[]).unwrap();
        assert_eq!(d.max_connections_per_source, 0, "off unless asked for");
        assert_eq!(d.upgrade_protocols, UpgradeProtocols::default());
        assert_eq!(d.tunnel_idle_timeout, Duration::from_secs(300));
        assert_eq!(d.max_side_pool_requests, 256);
        assert_eq!(d.body_read_timeout, Duration::from_secs(30));
        assert_eq!(d.admin_max_connections, 32);
        let c = parse(&[
            "--max-connections-per-source",
            "20",
            "--upgrade-protocols",
            "",
            "--tunnel-idle-timeout",
            "1m",
            "--max-side-pool-requests",
            "8",
            "--body-read-timeout",
            "5s",
            "--admin-max-connections",
            "4",
        ])
        .unwrap();
        assert_eq!(c.max_connections_per_source, 20);
        assert_eq!(c.upgrade_protocols, UpgradeProtocols::none());
        assert_eq!(c.tunnel_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_side_pool_requests, 8);
        assert_eq!(c.body_read_timeout, Duration::from_secs(5));
        assert_eq!(c.admin_max_connections, 4);
        assert!(matches!(parse(&["--upgrade-protocols", "websocket,h2c"]), Err(ConfigError::UpgradeProtocols(_))));
        for zero in [
            ["--body-read-timeout", "0s"],
            ["--tunnel-idle-timeout", "0s"],
            ["--idle-timeout", "0ms"],
            ["--header-read-timeout", "0s"],
            ["--max-side-pool-requests", "0"],
            ["--admin-max-connections", "0"],
        ] {
            let e = parse(&zero).err().unwrap_or_else(|| panic!("{zero:?} accepted"));
            assert_eq!(e.to_string(), format!("{} must be greater than zero", zero[0]));
        }
    }

    #[test]
    fn tls_flags() {
        let base = ["portcullis-proxy", "--upstream", "127.0.0.1:1", "--tables", "t.json"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra.iter())).map(|c| c.into_config());
        let c =
            parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--require-tls", "--plain-listen", "0.0.0.0:8080"])
                .unwrap()
                .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!((tls.cert.to_str(), tls.key.to_str()), (Some("c.pem"), Some("k.pem")));
        assert!(c.require_tls);
        assert_eq!(c.plain_listen, Some("0.0.0.0:8080".parse().unwrap()));
        assert!(parse(&["--tls-cert", "c.pem"]).is_err(), "a certificate needs its key");
        assert!(parse(&["--tls-key", "k.pem"]).is_err());
        assert!(parse(&["--require-tls"]).is_err(), "--require-tls needs a certificate");
        assert!(parse(&["--plain-listen", "0.0.0.0:8080"]).is_err());
        let c = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--client-ca", "ca.pem", "--require-client-cert"])
            .unwrap()
            .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.client_ca.as_deref().and_then(|p| p.to_str()), Some("ca.pem"));
        assert!(tls.require_client_cert);
        assert!(parse(&["--client-ca", "ca.pem"]).is_err(), "--client-ca needs a certificate");
        assert!(
            parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--require-client-cert"]).is_err(),
            "--require-client-cert needs --client-ca"
        );
    }
}
