//! The HTTPS server the API server calls: `POST /mutate` with an `admission.k8s.io/v1` `AdmissionReview`, answered
//! with a JSON Patch (or a denial); `GET /healthz` for probes. TLS is rustls (ring provider) with a certificate that
//! can be swapped at runtime (file reload, rotation) without restarting the listener.

use super::Error;
use super::inject::{self, Decision, InjectSettings};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// Largest AdmissionReview body accepted (a Pod with huge annotations still fits).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// How long in-flight requests may run after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The current serving certificate; replaced atomically by [`CertResolver::set_pem`].
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

/// `notAfter` (Unix seconds) of the certificate this process serves admission with (0: none yet), exported as
/// `portcullis_controller_webhook_certificate_expiry_timestamp_seconds` for the expiry alert.
pub static SERVING_CERT_NOT_AFTER: AtomicI64 = AtomicI64::new(0);

impl CertResolver {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let r = Self { current: RwLock::new(certified_key(cert_pem, key_pem)?) };
        note_expiry(cert_pem);
        Ok(r)
    }

    /// Swaps in a new certificate; new handshakes use it, established connections keep theirs.
    pub fn set_pem(&self, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
        let key = certified_key(cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
        note_expiry(cert_pem);
        Ok(())
    }
}

fn note_expiry(cert_pem: &str) {
    if let Ok(info) = super::certs::inspect(cert_pem) {
        SERVING_CERT_NOT_AFTER.store(info.not_after_unix, Ordering::Relaxed);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Tls(format!("serving certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Tls("serving certificate PEM holds no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Error::Tls(format!("serving key PEM: {e}")))?;
    let signing = ring::sign::any_supported_type(&key).map_err(|e| Error::Tls(format!("serving key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// A rustls server configuration (ring provider, TLS 1.2+, HTTP/1.1) resolving certificates through `resolver`.
pub fn tls_config(resolver: Arc<CertResolver>) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Answers one AdmissionReview body (JSON) with a response AdmissionReview (JSON). Pure.
pub fn review(body: &[u8], settings: &InjectSettings) -> Vec<u8> {
    let response = match serde_json::from_slice::<AdmissionReview<Pod>>(body) {
        Err(e) => AdmissionResponse::invalid(format!("request body is not an AdmissionReview: {e}")),
        Ok(review) => match TryInto::<AdmissionRequest<Pod>>::try_into(review) {
            Err(e) => AdmissionResponse::invalid(format!("AdmissionReview without a usable request: {e}")),
            Ok(req) => respond(&req, settings),
        },
    };
    serde_json::to_vec(&response.into_review()).expect("an AdmissionReview always serializes")
}

fn respond(req: &AdmissionRequest<Pod>, settings: &InjectSettings) -> AdmissionResponse {
    let allow = AdmissionResponse::from(req);
    let Some(pod) = req.object.as_ref() else { return allow };
    let namespace = req.namespace.as_deref().or(pod.metadata.namespace.as_deref()).unwrap_or("default");
    let name = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or("");
    match inject::decide(pod, namespace, settings) {
        Decision::NotRequested => allow,
        Decision::AlreadyInjected => {
            tracing::debug!(namespace, pod = name, "sidecar already present");
            allow
        }
        Decision::Inject(patch) => {
            tracing::info!(namespace, pod = name, "injecting the portcullis-proxy sidecar");
            match allow.with_patch(patch) {
                Ok(r) => r,
                Err(e) => AdmissionResponse::from(req).deny(format!("portcullis: could not encode the patch: {e}")),
            }
        }
        Decision::Deny(e) => {
            tracing::info!(namespace, pod = name, reason = %e, "refusing pod");
            allow.deny(format!("portcullis sidecar injection: {e}"))
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    r
}

async fn handle(req: Request<Incoming>, settings: Arc<InjectSettings>) -> Result<Response<Full<Bytes>>, Error> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, "body too large or unreadable\n")),
            };
            let out = review(&body, &settings);
            let mut r = Response::new(Full::new(Bytes::from(out)));
            r.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
            Ok(r)
        }
        (_, "/mutate") => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n")),
        (&Method::GET, "/healthz") => Ok(text(StatusCode::OK, "ok\n")),
        _ => Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    }
}

/// Serves HTTPS on `listener` until `shutdown` completes, then lets in-flight requests finish (bounded).
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    settings: Arc<InjectSettings>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let acceptor = TlsAcceptor::from(config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |req| handle(req, settings.clone()));
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("webhook connections still open after {SHUTDOWN_GRACE:?}; closing");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn review_json(pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "team-a",
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": pod,
                "dryRun": false
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "api-", "labels": {"portcullis.dev/inject": "true"}, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        })
    }

    fn response(body: &[u8]) -> Value {
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002", "uid is echoed");
        v["response"].clone()
    }

    #[test]
    fn answers_with_a_base64_json_patch() {
        let settings = InjectSettings::new("proxy:1");
        let r = response(&review(
            &review_json(pod(json!({"portcullis.dev/service": "api", "portcullis.dev/upstream-port": "8080"}))),
            &settings,
        ));
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        // kube serializes the patch bytes as a JSON array of numbers (Go's decoder accepts it, as it does base64).
        let patch: Vec<u8> = match &r["patch"] {
            Value::String(s) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(s).unwrap()
            }
            other => serde_json::from_value(other.clone()).unwrap(),
        };
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(patch[0]["path"], "/spec/containers/-");
        assert_eq!(patch[0]["value"]["name"], "portcullis-proxy");
        assert_eq!(patch[0]["value"]["args"][3], "--tables-from=configmap/team-a/portcullis-table-api");
    }

    #[test]
    fn denies_bad_annotations_with_the_annotation_named() {
        let r = response(&review(
            &review_json(pod(json!({"portcullis.dev/service": "api", "portcullis.dev/upstream-port": "http"}))),
            &InjectSettings::new("proxy:1"),
        ));
        assert_eq!(r["allowed"], false);
        let msg = r["status"]["message"].as_str().unwrap();
        assert!(msg.contains("portcullis.dev/upstream-port") && msg.contains("\"http\""), "{msg}");
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        let v: Value = serde_json::from_slice(&review(b"{nope", &InjectSettings::new("p"))).unwrap();
        assert_eq!(v["response"]["allowed"], false);
    }

    #[test]
    fn certificates_load_and_swap() {
        let b = super::super::certs::plan(None, &["localhost".into()], 0).unwrap().unwrap();
        let r = CertResolver::from_pem(&b.cert_pem, &b.key_pem).unwrap();
        r.set_pem(&b.cert_pem, &b.key_pem).unwrap();
        assert!(r.set_pem("junk", &b.key_pem).is_err());
        assert!(tls_config(Arc::new(r)).is_ok());
    }
}
