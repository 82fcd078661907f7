//! TLS termination with rustls (ring provider, TLS 1.2 + 1.3, rustls' default cipher suites, ALPN `h2` and
//! `http/1.1`).
//!
//! The serving certificate lives in a [`CertResolver`] (an `ArcSwap<CertifiedKey>`): every handshake loads the
//! current one, so a reload affects new handshakes only and open connections are untouched. [`CertWatcher`] polls
//! the certificate and key files (size, mtime, inode, following symlinks, so Kubernetes' `..data` symlink swap is
//! seen) and swaps in a new pair only when it parses and the key matches the certificate; otherwise the failure is
//! logged and counted and the old pair stays.
//!
//! With a client CA (`--client-ca`) the listener requests a client certificate and verifies it with rustls'
//! `WebPkiClientVerifier` (chain to the CA, validity period, client-auth usage). A certificate that fails
//! verification fails the handshake; none at all is accepted unless `--require-client-cert`. The CA file is read
//! at start only.

use crate::config::TlsFiles;
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;

/// ALPN protocols offered, in server preference order.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Pem { path: String, source: rustls::pki_types::pem::Error },
    #[error("{path}: no PEM CERTIFICATE block")]
    NoCertificate { path: String },
    #[error("{path}: the certificate does not parse: {reason}")]
    Certificate { path: String, reason: String },
    #[error("certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{path}: client CA: {reason}")]
    ClientCa { path: String, reason: String },
}

/// A certificate chain + key that parsed and match, with what the metrics and logs need.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// notAfter of the end-entity certificate, Unix seconds.
    pub not_after: i64,
    pub subject: String,
    pub serial: String,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// Reads and checks a PEM certificate chain (end-entity first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load(cert_path: &Path, key_path: &Path, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let cp = || cert_path.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { path: cp(), source })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cp() });
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::Certificate { path: cp(), reason: e.to_string() })?;
    let not_after = parsed.validity().not_after.timestamp();
    let subject = parsed.subject().to_string();
    let serial = parsed.raw_serial_as_string();
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|source| TlsError::Pem { path: key_path.display().to_string(), source })?;
    let certified = CertifiedKey::from_der(chain, key, provider)?;
    Ok(Loaded { key: Arc::new(certified), not_after, subject, serial })
}

/// Hands every handshake the current certificate.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self { current: ArcSwap::new(key) }
    }

    pub fn store(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The ring provider: the only one this workspace builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client-certificate verifier for `--client-ca` (`require`: `--require-client-cert`).
pub fn client_verifier(
    ca_path: &Path,
    require: bool,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let pem = read(ca_path)?;
    let err = |reason: String| TlsError::ClientCa { path: ca_path.display().to_string(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| err(e.to_string()))?;
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no PEM CERTIFICATE block".into()));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if require { builder } else { builder.allow_unauthenticated() };
    builder.build().map_err(|e| err(e.to_string()))
}

/// Loads the certificate (an error here stops the start) and builds the acceptor and its watcher.
pub fn setup(files: &TlsFiles, metrics: Arc<Metrics>) -> Result<(TlsAcceptor, CertWatcher), TlsError> {
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let provider = provider();
    // Stamped before reading, so a change racing the first load is seen by the first poll.
    let stamps = (stamp(&cert), stamp(&key));
    let loaded = load(&cert, &key, &provider)?;
    tracing::info!(cert = %cert.display(), subject = %loaded.subject, serial = %loaded.serial, "TLS certificate loaded");
    metrics.tls_certificate_expiry.set(loaded.not_after);
    let resolver = Arc::new(CertResolver::new(loaded.key));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = client_verifier(ca, files.require_client_cert, provider.clone())?;
            tracing::info!(client_ca = %ca.display(), required = files.require_client_cert, "client certificates requested");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    let last = match stamps {
        (Some(c), Some(k)) => Some((c, k)),
        _ => None,
    };
    let watcher = CertWatcher { resolver, provider, cert, key, metrics, last };
    Ok((TlsAcceptor::from(Arc::new(config)), watcher))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
    dev: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a `..data` swap changes the target's inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp { len: m.len(), modified: m.modified().ok(), ino: m.ino(), dev: m.dev() })
}

/// Polls the certificate and key files and swaps in a new pair when they change and check out.
pub struct CertWatcher {
    resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
    cert: PathBuf,
    key: PathBuf,
    metrics: Arc<Metrics>,
    last: Option<(Stamp, Stamp)>,
}

impl CertWatcher {
    fn stamps(&self) -> Option<(Stamp, Stamp)> {
        Some((stamp(&self.cert)?, stamp(&self.key)?))
    }

    /// One look at the files. A pair is tried once per distinct (cert, key) metadata; a missing file keeps the
    /// current certificate without counting a failure (the other half of an update may be on its way).
    pub fn check(&mut self) {
        let Some(now) = self.stamps() else {
            return;
        };
        if self.last.as_ref() == Some(&now) {
            return;
        }
        self.last = Some(now);
        match load(&self.cert, &self.key, &self.provider) {
            Ok(l) => {
                self.resolver.store(l.key);
                self.metrics.tls_certificate_expiry.set(l.not_after);
                self.metrics.tls_reload("ok");
                tracing::info!(cert = %self.cert.display(), subject = %l.subject, serial = %l.serial,
                    "TLS certificate reloaded; new handshakes use it");
            }
            Err(e) => {
                self.metrics.tls_reload("error");
                tracing::error!(cert = %self.cert.display(), error = %e,
                    "TLS certificate reload refused; the previous certificate stays in use");
            }
        }
    }

    pub async fn run(mut self, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            // Reading two small files and one signature check: cheap enough, but keep it off the reactor.
            self = tokio::task::spawn_blocking(move || {
                self.check();
                self
            })
            .await
            .expect("certificate reload does not panic");
        }
    }
}
