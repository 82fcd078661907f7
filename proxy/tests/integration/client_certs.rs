//! Client certificates on loopback (rcgen CA + leaves made here): `--client-ca` requests one, a verified one can
//! identify a client on its own (`certificates`), `requireCertificate` needs key + matching certificate,
//! unknown certificates read as a missing key, and certificates from another CA or expired ones fail the handshake.

use crate::common::*;
use hyper_util::rt::TokioIo;
use portcullis_proxy::{Running, TlsFiles};
use portcullis_table::{CertIdentity, Table};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    date_time_ymd,
};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A client certificate: DER + key.
struct Leaf {
    der: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Leaf {
    fn sha256(&self) -> String {
        Sha256::digest(&self.der).iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca { issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn server(&self) -> (String, String) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "portcullis test server");
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }

    /// A client certificate with this CN and SAN DNS names; `expired` puts its validity in the past.
    fn client(&self, cn: &str, dns: &[&str], expired: bool) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = dns.iter().map(|d| SanType::DnsName((*d).try_into().unwrap())).collect();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf { der: cert.der().clone(), key: key.serialize_der() }
    }
}

fn client_config(server_ca: &Ca, leaf: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.issuer.der().clone()).unwrap();
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match leaf {
        Some(l) => b
            .with_client_auth_cert(vec![l.der.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key.clone())))
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// Handshake + one request; `Err` if the handshake or the request fails (with TLS 1.3 a refused client
/// certificate shows up after the client's side of the handshake, on the first read).
async fn request(p: &Running, cfg: Arc<ClientConfig>, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let stream = tcp_from(ip(1), p.addr).await;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let s: TlsStream<TcpStream> =
        within("TLS handshake", connector.connect(ServerName::try_from("localhost").unwrap(), stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(s)).await.map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    let mut c = Conn(send);
    let mut b = http::Request::builder().method("GET").uri("/v1/x").header("host", "svc.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    let resp = within("response", c.0.send_request(req)).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    use http_body_util::BodyExt;
    let body = within("body", resp.into_body().collect()).await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok(Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

struct Setup {
    server_ca: Ca,
    client_ca: Ca,
    by_cert: Leaf,
    strict: Leaf,
    p: Running,
    seen: Seen,
    _dir: tempfile::TempDir,
}

async fn setup(require_client_cert: bool) -> Setup {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let by_cert = client_ca.client("by-cert client", &["a.clients.test"], false);
    let strict = client_ca.client("strict client", &[], false);

    let mut clients = standard_clients();
    let mut c = client("t/by-cert", "unused", &["127.0.0.0/8"], &["open"]);
    c.keys.clear();
    c.certificates = vec![CertIdentity::SanDns("a.clients.test".into())];
    clients.push(c);
    let mut c = client("t/strict", "k-strict", &["127.0.0.0/8"], &["open"]);
    c.require_certificate = true;
    c.certificates = vec![CertIdentity::Sha256(strict.sha256())];
    clients.push(c);
    let table = Table::new("t/svc", plans(), clients);

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server_ca.server();
    for (f, v) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", client_ca.pem())] {
        std::fs::write(dir.path().join(f), v).unwrap();
    }
    let path = dir.path().join("tables.json");
    write_table(&path, &table);
    let (up, seen) = upstream().await;
    let mut cfg = config(up, &path);
    let mut files = TlsFiles::new(dir.path().join("tls.crt"), dir.path().join("tls.key"));
    files.client_ca = Some(dir.path().join("ca.crt"));
    files.require_client_cert = require_client_cert;
    cfg.tls = Some(files);
    let p = start(cfg).await;
    wait_until("table loaded", || p.tables.is_ready()).await;
    Setup { server_ca, client_ca, by_cert, strict, p, seen, _dir: dir }
}

#[tokio::test]
async fn certificates_identify_clients_and_combine_with_keys() {
    let s = setup(false).await;
    let p = &s.p;
    let no_cert = client_config(&s.server_ca, None);

    // Certificate alone identifies t/by-cert.
    let r = request(p, client_config(&s.server_ca, Some(&s.by_cert)), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.seen.last()["x-portcullis-client"], "t/by-cert");

    // Keys work as before, with or without a certificate.
    let r = request(p, no_cert.clone(), &[("x-api-key", "k-reader")]).await.unwrap();
    assert_eq!((r.status.as_u16(), s.seen.last()["x-portcullis-client"].to_str().unwrap()), (200, "t/reader"));

    // A certificate from the right CA naming no client, or none at all, and no key: 401 exactly as a missing key.
    let nobody = s.client_ca.client("nobody", &["nobody.clients.test"], false);
    let unknown = request(p, client_config(&s.server_ca, Some(&nobody)), &[]).await.unwrap();
    let missing = request(p, no_cert.clone(), &[]).await.unwrap();
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.reason(), "invalid_key");
    assert_eq!(unknown.body, missing.body, "same body for an unknown certificate and a missing key");

    // requireCertificate: key without certificate, or with another client's → 403; with its own → 200.
    let r = request(p, no_cert.clone(), &[("x-api-key", "k-strict")]).await.unwrap();
    assert_eq!((r.status.as_u16(), r.reason()), (403, "certificate_required".to_string()));
    let r = request(p, client_config(&s.server_ca, Some(&s.by_cert)), &[("x-api-key", "k-strict")]).await.unwrap();
    assert_eq!((r.status.as_u16(), r.reason()), (403, "certificate_required".to_string()));
    let r = request(p, client_config(&s.server_ca, Some(&s.strict)), &[("x-api-key", "k-strict")]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.seen.last()["x-portcullis-client"], "t/strict");

    // A certificate from another CA, or an expired one, fails the handshake even though none is required.
    let before = s.seen.count();
    let other_ca = Ca::new("someone else's CA");
    let foreign = other_ca.client("by-cert client", &["a.clients.test"], false);
    assert!(request(p, client_config(&s.server_ca, Some(&foreign)), &[]).await.is_err(), "foreign CA admitted");
    let expired = s.client_ca.client("by-cert client", &["a.clients.test"], true);
    assert!(request(p, client_config(&s.server_ca, Some(&expired)), &[]).await.is_err(), "expired cert admitted");
    assert_eq!(s.seen.count(), before, "nothing reached the upstream");
    wait_until("failed handshakes counted", || {
        p.metrics.encode().contains(r#"portcullis_proxy_tls_handshakes_total{outcome="error"} 2"#)
    })
    .await;
    s.p.shutdown();
    within("shutdown", s.p.wait()).await;
}

#[tokio::test]
async fn require_client_cert_refuses_handshakes_without_one() {
    let s = setup(true).await;
    let p = &s.p;
    assert!(
        request(p, client_config(&s.server_ca, None), &[("x-api-key", "k-reader")]).await.is_err(),
        "no certificate, handshake refused even with a valid key"
    );
    let r = request(p, client_config(&s.server_ca, Some(&s.by_cert)), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // A certificate that passes the handshake but names no client, with a valid key: the key decides.
    let nobody = s.client_ca.client("nobody", &[], false);
    let r = request(p, client_config(&s.server_ca, Some(&nobody)), &[("x-api-key", "k-reader")]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    s.p.shutdown();
    within("shutdown", s.p.wait()).await;
}
