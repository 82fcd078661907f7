//! The sidecar-injection admission webhook: a pure decision ([`inject`]), its HTTPS server ([`server`]) and the
//! self-managed serving certificate ([`certs`]). The binary flattens [`WebhookArgs`] into its command line and runs
//! [`run`] next to the reconcilers:
//!
//! ```ignore
//! #[command(flatten)]
//! webhook: portcullis_controller::webhook::WebhookArgs,
//! // ...
//! tokio::spawn(portcullis_controller::webhook::run(args.webhook, client.clone(), shutdown_signal()));
//! ```
//!
//! Certificates: with `--webhook-cert-dir` the server uses `tls.crt`/`tls.key` from that directory (e.g. a
//! cert-manager Secret mounted there) and reloads them when they change; without it the controller keeps its own
//! CA and serving certificate in the Secret `--webhook-cert-secret`, rotates them 30 days before expiry and writes
//! the CA into the `caBundle` of its own entry of `--webhook-config-name` (with the CA a rotation replaced, until
//! it expires: [`certs`]). Every replica re-reads the live caBundle every `--webhook-ca-bundle-check-seconds` and
//! writes it back when it differs (a `helm upgrade --force` or a GitOps sync that cleared it).
//!
//! Readiness: [`Webhook::ready_flag`] is set while the server accepts connections; the controller's `/readyz`
//! follows it (and not leadership or cache sync), so every replica serves admission.

pub mod certs;
pub mod inject;
pub mod probes;
pub mod server;

use inject::InjectSettings;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use portcullis_table::Chain;
use server::CertResolver;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// How often mounted certificate files are checked for changes.
const FILE_RELOAD_EVERY: Duration = Duration::from_secs(10);
/// How often the self-managed certificate Secret is re-checked (rotation, another replica's rotation).
const SECRET_RECHECK_EVERY: Duration = Duration::from_secs(3600);
/// Retry period after a failed certificate or caBundle update.
const RETRY_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook certificate: {0}")]
    Cert(String),
    #[error("webhook TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Kube(String, #[source] kube::Error),
    #[error("reading {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("webhook: cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{flag}: {message}")]
    Setting { flag: &'static str, message: String },
}

/// Command-line settings of the webhook; `#[command(flatten)]` them into the controller's arguments.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct WebhookArgs {
    /// Address of the webhook's HTTPS server.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub webhook_listen: SocketAddr,
    /// Directory holding `tls.crt` and `tls.key` (reloaded when they change). Unset: the controller manages its own
    /// certificate in `--webhook-cert-secret` and writes the caBundle itself.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,
    /// The MutatingWebhookConfiguration whose caBundle a self-managed certificate is written into.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CONFIG_NAME", default_value = "portcullis")]
    pub webhook_config_name: String,
    /// The webhook entry (in that configuration) whose caBundle is written.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_NAME", default_value = "inject.portcullis.dev")]
    pub webhook_name: String,
    /// The Service in front of the webhook (names of the self-managed certificate).
    #[arg(long, env = "PORTCULLIS_WEBHOOK_SERVICE", default_value = "portcullis-webhook")]
    pub webhook_service: String,
    /// Namespace of that Service and of the certificate Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
    pub webhook_namespace: String,
    /// Secret holding the self-managed CA and serving certificate.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CERT_SECRET", default_value = "portcullis-webhook-tls")]
    pub webhook_cert_secret: String,
    /// Image of the injected proxy sidecar.
    #[arg(long, env = "PORTCULLIS_SIDECAR_IMAGE", default_value = concat!("ghcr.io/portcullis/portcullis-proxy:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,
    /// imagePullPolicy of the sidecar (default: the cluster's default for the tag).
    #[arg(long, env = "PORTCULLIS_SIDECAR_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: Option<String>,
    /// Port the sidecar listens on (the Service's targetPort).
    #[arg(long, env = "PORTCULLIS_SIDECAR_PROXY_PORT", default_value_t = inject::DEFAULT_PROXY_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub sidecar_proxy_port: u16,
    /// Admin port of the sidecar (metrics, probes).
    #[arg(long, env = "PORTCULLIS_SIDECAR_ADMIN_PORT", default_value_t = inject::DEFAULT_ADMIN_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub sidecar_admin_port: u16,
    /// CPU request of the sidecar, e.g. `50m`.
    #[arg(long, env = "PORTCULLIS_SIDECAR_CPU_REQUEST")]
    pub sidecar_cpu_request: Option<String>,
    /// Memory request of the sidecar, e.g. `32Mi`.
    #[arg(long, env = "PORTCULLIS_SIDECAR_MEMORY_REQUEST")]
    pub sidecar_memory_request: Option<String>,
    /// CPU limit of the sidecar.
    #[arg(long, env = "PORTCULLIS_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,
    /// Memory limit of the sidecar, e.g. `128Mi`.
    #[arg(long, env = "PORTCULLIS_SIDECAR_MEMORY_LIMIT")]
    pub sidecar_memory_limit: Option<String>,
    /// Chart-wide default of `portcullis.dev/trusted-proxies`: comma-separated CIDRs whose forwarding headers
    /// (X-Forwarded-For, Forwarded, PROXY) the sidecars believe.
    #[arg(long, env = "PORTCULLIS_SIDECAR_TRUSTED_PROXIES", default_value = "")]
    pub sidecar_trusted_proxies: String,
    /// Chart-wide default of `portcullis.dev/proxy-protocol` (needs trusted proxies).
    #[arg(long, env = "PORTCULLIS_SIDECAR_PROXY_PROTOCOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub sidecar_proxy_protocol: bool,
    /// Chart-wide default of `portcullis.dev/client-ca-secret`: a Secret (in each pod's namespace) whose `ca.crt`
    /// verifies client certificates; applied to pods with `portcullis.dev/tls-secret`.
    #[arg(long, env = "PORTCULLIS_SIDECAR_CLIENT_CA_SECRET")]
    pub sidecar_client_ca_secret: Option<String>,
    /// Chart-wide default of `portcullis.dev/require-tls`; applied to pods with `portcullis.dev/tls-secret`.
    #[arg(long, env = "PORTCULLIS_SIDECAR_REQUIRE_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub sidecar_require_tls: bool,
    /// Chart-wide default of `portcullis.dev/workers` (unset: the proxy's default, one per CPU).
    #[arg(long, env = "PORTCULLIS_SIDECAR_WORKERS")]
    pub sidecar_workers: Option<String>,
    /// Chart-wide default of `portcullis.dev/admin-address`: the IP the sidecars' admin listener binds (unset:
    /// 0.0.0.0).
    #[arg(long, env = "PORTCULLIS_SIDECAR_ADMIN_ADDRESS")]
    pub sidecar_admin_address: Option<String>,
    /// How often the live MutatingWebhookConfiguration's caBundle is compared with the CA this webhook serves
    /// (self-managed certificate), and repaired when it differs (e.g. cleared by `helm upgrade --force`).
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CA_BUNDLE_CHECK_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub webhook_ca_bundle_check_seconds: u64,
    /// The shared store the injected sidecars use (from the controller's `--store-*` flags, not a flag of its own).
    #[arg(skip)]
    pub sidecar_store: Option<inject::SidecarStore>,
}

impl WebhookArgs {
    /// The defaults, as if no flag were given (handy in tests).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: WebhookArgs,
        }
        <P as clap::Parser>::parse_from(["webhook"]).a
    }

    /// The injection settings these arguments describe.
    pub fn inject_settings(&self) -> Result<InjectSettings, Error> {
        if self.sidecar_proxy_port == self.sidecar_admin_port {
            return Err(Error::Setting {
                flag: "--sidecar-admin-port",
                message: format!("{} is also the proxy port", self.sidecar_admin_port),
            });
        }
        let quantity = |flag: &'static str, v: &Option<String>| -> Result<Option<Quantity>, Error> {
            match v.as_deref().map(str::trim) {
                None => Ok(None),
                Some(s) if inject::is_quantity(s) => Ok(Some(Quantity(s.to_string()))),
                Some(s) => Err(Error::Setting { flag, message: format!("{s:?} is not a Kubernetes quantity") }),
            }
        };
        let pair = |cpu: Option<Quantity>, mem: Option<Quantity>| -> Option<BTreeMap<String, Quantity>> {
            let m: BTreeMap<String, Quantity> =
                [("cpu", cpu), ("memory", mem)].into_iter().filter_map(|(k, v)| Some((k.to_string(), v?))).collect();
            (!m.is_empty()).then_some(m)
        };
        let requests = pair(
            quantity("--sidecar-cpu-request", &self.sidecar_cpu_request)?,
            quantity("--sidecar-memory-request", &self.sidecar_memory_request)?,
        );
        let limits = pair(
            quantity("--sidecar-cpu-limit", &self.sidecar_cpu_limit)?,
            quantity("--sidecar-memory-limit", &self.sidecar_memory_limit)?,
        );
        let resources = (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
            requests,
            limits,
            ..Default::default()
        });
        let setting =
            |flag: &'static str, value: &str, why: String| Error::Setting { flag, message: format!("{value:?} {why}") };
        use crate::sidecar_contract::default_flag;
        let trusted_proxies = inject::parse_trusted_proxies(&self.sidecar_trusted_proxies)
            .map_err(|why| setting(default_flag::TRUSTED_PROXIES, &self.sidecar_trusted_proxies, why))?;
        if self.sidecar_proxy_protocol && trusted_proxies.is_empty() {
            return Err(Error::Setting {
                flag: default_flag::PROXY_PROTOCOL,
                message: format!(
                    "PROXY protocol is accepted only from trusted proxies; set {}",
                    default_flag::TRUSTED_PROXIES
                ),
            });
        }
        let client_ca_secret = match self.sidecar_client_ca_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) if inject::is_dns_subdomain(s) => Some(s.to_string()),
            Some(s) => return Err(setting(default_flag::CLIENT_CA_SECRET, s, "is not a valid Secret name".into())),
        };
        let workers = match self.sidecar_workers.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(inject::parse_workers(s).map_err(|why| setting(default_flag::WORKERS, s, why))?),
        };
        let admin_address = match self.sidecar_admin_address.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => {
                Some(inject::parse_admin_address(s).map_err(|why| setting(default_flag::ADMIN_ADDRESS, s, why))?)
            }
        };
        Ok(InjectSettings {
            defaults: inject::SidecarOptions {
                trusted_proxies,
                proxy_protocol: self.sidecar_proxy_protocol,
                client_ca_secret,
                require_tls: self.sidecar_require_tls,
                workers,
                admin_address,
                ..Default::default()
            },
            sidecar_image: self.sidecar_image.clone(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            proxy_port: self.sidecar_proxy_port,
            admin_port: self.sidecar_admin_port,
            resources,
            store: self.sidecar_store.clone(),
        })
    }
}

/// Where the serving certificate comes from.
enum Source {
    Dir(PathBuf),
    Secret,
}

/// A bound, ready-to-serve webhook.
pub struct Webhook {
    args: WebhookArgs,
    client: kube::Client,
    listener: TcpListener,
    resolver: Arc<CertResolver>,
    settings: Arc<InjectSettings>,
    source: Source,
    /// The CA bundle currently written into the caBundle (self-managed mode), and whether that write succeeded.
    ca_pem: Option<String>,
    ca_written: bool,
    ready: Arc<AtomicBool>,
}

impl Webhook {
    /// Loads (or creates) the certificate, writes the caBundle when self-managed, and binds the listener.
    pub async fn bind(args: WebhookArgs, client: kube::Client) -> Result<Self, Error> {
        let settings = Arc::new(args.inject_settings()?);
        let (resolver, source, ca_pem, ca_written) = match &args.webhook_cert_dir {
            Some(dir) => {
                let (cert, key) = read_dir(dir).await?;
                (CertResolver::from_pem(&cert, &key)?, Source::Dir(dir.clone()), None, false)
            }
            None => {
                let b = certs::ensure_secret(
                    &client,
                    &args.webhook_namespace,
                    &args.webhook_cert_secret,
                    &args.webhook_service,
                )
                .await?;
                let bundle = b.ca_bundle_pem(jiff::Timestamp::now().as_second());
                let written = write_ca_bundle(&client, &args, &bundle).await;
                (CertResolver::from_pem(&b.cert_pem, &b.key_pem)?, Source::Secret, Some(bundle), written)
            }
        };
        let listener = TcpListener::bind(args.webhook_listen)
            .await
            .map_err(|source| Error::Bind { addr: args.webhook_listen, source })?;
        Ok(Self {
            args,
            client,
            listener,
            resolver: Arc::new(resolver),
            settings,
            source,
            ca_pem,
            ca_written,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// True while the server accepts admission requests (from [`Webhook::serve`] until shutdown).
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// Uses `flag` as the ready flag (so a caller can hold it before the webhook is bound).
    pub fn with_ready_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.ready = flag;
        self
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(|source| Error::Bind { addr: self.args.webhook_listen, source })
    }

    /// Serves until `shutdown` completes, reloading or rotating the certificate in the background.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let config = Arc::new(server::tls_config(self.resolver.clone())?);
        tracing::info!(addr = %self.local_addr()?, "admission webhook listening");
        let reload = tokio::spawn(keep_certificate_fresh(
            self.source,
            self.resolver,
            self.client,
            self.args,
            self.ca_pem,
            self.ca_written,
        ));
        self.ready.store(true, Ordering::SeqCst);
        let result = server::serve(self.listener, config, self.settings, shutdown).await;
        self.ready.store(false, Ordering::SeqCst);
        reload.abort();
        result
    }
}

/// Binds and serves the webhook until `shutdown` completes; `ready` is set while it serves.
pub async fn run(
    args: WebhookArgs,
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
    ready: Arc<AtomicBool>,
) -> Result<(), Error> {
    Webhook::bind(args, client).await?.with_ready_flag(ready).serve(shutdown).await
}

async fn read_dir(dir: &Path) -> Result<(String, String), Error> {
    let read = |name: &str| {
        let path = dir.join(name);
        async move { tokio::fs::read_to_string(&path).await.map_err(|source| Error::Read { path, source }) }
    };
    Ok((read("tls.crt").await?, read("tls.key").await?))
}

async fn write_ca_bundle(client: &kube::Client, args: &WebhookArgs, ca_pem: &str) -> bool {
    match certs::patch_ca_bundle(client, &args.webhook_config_name, &args.webhook_name, ca_pem).await {
        Ok(()) => {
            tracing::info!(config = %args.webhook_config_name, "webhook caBundle written");
            true
        }
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "could not write the webhook caBundle; retrying");
            false
        }
    }
}

async fn keep_certificate_fresh(
    source: Source,
    resolver: Arc<CertResolver>,
    client: kube::Client,
    args: WebhookArgs,
    mut ca_pem: Option<String>,
    mut ca_written: bool,
) {
    let mut last_files = None;
    let check_every = Duration::from_secs(args.webhook_ca_bundle_check_seconds);
    let mut last_secret_check = tokio::time::Instant::now();
    loop {
        match &source {
            Source::Dir(dir) => {
                tokio::time::sleep(FILE_RELOAD_EVERY).await;
                match read_dir(dir).await {
                    Ok(files) if last_files.as_ref() != Some(&files) => {
                        match resolver.set_pem(&files.0, &files.1) {
                            Ok(()) if last_files.is_some() => tracing::info!("webhook certificate reloaded"),
                            Ok(()) => {}
                            Err(e) => tracing::warn!(error = %Chain(&e), "keeping the previous webhook certificate"),
                        }
                        last_files = Some(files);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %Chain(&e), "keeping the previous webhook certificate"),
                }
            }
            Source::Secret => {
                tokio::time::sleep(if ca_written { check_every } else { RETRY_EVERY.min(check_every) }).await;
                if ca_written && last_secret_check.elapsed() < SECRET_RECHECK_EVERY {
                    // Between Secret checks only the live caBundle is read. When it differs (cleared by a
                    // `helm upgrade --force`, or another replica rotated the CA) the Secret is read again and
                    // what it holds is written: replicas never write back an older bundle than the Secret's.
                    if bundle_is_live(&client, &args, ca_pem.as_deref()).await {
                        continue;
                    }
                    ca_written = false;
                }
                let b = match certs::ensure_secret(
                    &client,
                    &args.webhook_namespace,
                    &args.webhook_cert_secret,
                    &args.webhook_service,
                )
                .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "could not check the webhook certificate");
                        ca_written = false;
                        continue;
                    }
                };
                last_secret_check = tokio::time::Instant::now();
                if let Err(e) = resolver.set_pem(&b.cert_pem, &b.key_pem) {
                    tracing::warn!(error = %Chain(&e), "keeping the previous webhook certificate");
                }
                let bundle = b.ca_bundle_pem(jiff::Timestamp::now().as_second());
                if ca_pem.as_deref() != Some(bundle.as_str()) || !ca_written {
                    ca_written = write_ca_bundle(&client, &args, &bundle).await;
                    ca_pem = Some(bundle);
                }
            }
        }
    }
}

/// Whether the live caBundle is `want`; a difference is logged. A failed read counts as live (retried later).
async fn bundle_is_live(client: &kube::Client, args: &WebhookArgs, want: Option<&str>) -> bool {
    match certs::live_ca_bundle(client, &args.webhook_config_name, &args.webhook_name).await {
        Ok(live) if live.as_deref() == want => true,
        Ok(live) => {
            let found = match live.as_deref() {
                None => "no such webhook entry",
                Some("") => "an empty caBundle",
                Some(_) => "another caBundle",
            };
            tracing::warn!(
                config = %args.webhook_config_name, webhook = %args.webhook_name, found,
                "the webhook caBundle drifted; writing it again from the certificate Secret"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "could not read the webhook configuration");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_make_default_settings() {
        let a = WebhookArgs::defaults();
        assert_eq!(a.webhook_listen, "0.0.0.0:9443".parse().unwrap());
        let s = a.inject_settings().unwrap();
        assert_eq!((s.proxy_port, s.admin_port), (8443, 9901));
        assert!(s.sidecar_image.starts_with("ghcr.io/portcullis/portcullis-proxy:"));
        assert_eq!(s.resources, None);
    }

    #[test]
    fn resources_and_bad_settings() {
        let mut a = WebhookArgs::defaults();
        a.sidecar_cpu_request = Some("50m".into());
        a.sidecar_memory_limit = Some("128Mi".into());
        let r = a.inject_settings().unwrap().resources.unwrap();
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("50m".into()));
        assert_eq!(r.limits.unwrap()["memory"], Quantity("128Mi".into()));
        a.sidecar_memory_limit = Some("lots".into());
        let e = a.inject_settings().unwrap_err().to_string();
        assert!(e.contains("--sidecar-memory-limit") && e.contains("lots"), "{e}");
        let mut a = WebhookArgs::defaults();
        a.sidecar_admin_port = 8443;
        assert!(a.inject_settings().unwrap_err().to_string().contains("--sidecar-admin-port"));
    }

    #[test]
    fn quantities() {
        for ok in ["1", "0.5", "100m", "64Mi", "1e3", "2E-1", "1.5Gi"] {
            assert!(inject::is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", ".", "1.2.3", "64mi", "lots", "1e", "-1"] {
            assert!(!inject::is_quantity(bad), "{bad}");
        }
    }
}
