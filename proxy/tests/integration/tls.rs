//! TLS termination on loopback with certificates made here (rcgen): HTTPS and h2 via ALPN, `--require-tls`,
//! certificate rotation through a Kubernetes-style `..data` symlink swap with a connection open across it, bad
//! certificates refused (the old one stays), PROXY v2 in front of TLS.

use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_proxy::decision::CidrSet;
use portcullis_proxy::proxy_protocol::encode_v2;
use portcullis_proxy::{Running, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SerialNumber};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

const KEY: (&str, &str) = ("x-api-key", "k-reader"); // t/reader: allowed from 127.0.0.1 and 203.0.113.7 only

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "portcullis test CA");
        Ca { issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap() }
    }

    /// A `localhost` server certificate with this serial: (cert PEM, key PEM).
    fn leaf(&self, serial: u64) -> (String, String) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.serial_number = Some(SerialNumber::from(serial));
        p.distinguished_name.push(DnType::CommonName, format!("portcullis test server {serial}"));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut c = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

/// A directory laid out like a Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<n>`; an update
/// writes a new `..<n>` and swaps `..data` with one rename.
struct SecretDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretDir {
    fn new(cert: &str, key: &str) -> Self {
        let mut s = SecretDir { dir: tempfile::tempdir().unwrap(), generation: 0 };
        s.update(cert.as_bytes(), key.as_bytes());
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(f), s.dir.path().join(f)).unwrap();
        }
        s
    }

    fn update(&mut self, cert: &[u8], key: &[u8]) {
        self.generation += 1;
        let name = format!("..gen_{}", self.generation);
        let d = self.dir.path().join(&name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("tls.crt"), cert).unwrap();
        std::fs::write(d.join("tls.key"), key).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn files(&self) -> TlsFiles {
        TlsFiles::new(self.path("tls.crt"), self.path("tls.key"))
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

async fn tls_proxy(
    secret: &SecretDir,
    tweak: impl FnOnce(&mut portcullis_proxy::Config),
) -> (Running, Seen, tempfile::TempDir) {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let mut c = config(up, &path);
    c.tls = Some(secret.files());
    tweak(&mut c);
    let p = start(c).await;
    wait_until("table loaded", || p.tables.is_ready()).await;
    (p, seen, dir)
}

async fn tls_over(stream: TcpStream, cfg: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    within("TLS handshake", connector.connect(ServerName::try_from("localhost").unwrap(), stream))
        .await
        .expect("TLS handshake")
}

async fn tls_connect(src: IpAddr, to: SocketAddr, cfg: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    tls_over(tcp_from(src, to).await, cfg).await
}

/// Serial number (hex) of the certificate the server presented.
fn served_serial(s: &TlsStream<TcpStream>) -> String {
    let certs = s.get_ref().1.peer_certificates().expect("server certificate");
    let (_, c) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
    c.raw_serial_as_string()
}

/// Serial number (hex) of a PEM certificate.
fn serial_of(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    p.parse_x509().unwrap().raw_serial_as_string()
}

/// An HTTP/1.1 connection over an established TLS stream.
async fn http1_over(s: TlsStream<TcpStream>) -> Conn {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    Conn(send)
}

/// Serial seen by a fresh handshake.
async fn fresh_serial(p: &Running, ca: &Ca) -> String {
    served_serial(&tls_connect(ip(1), p.addr, ca.client_config(&[b"http/1.1"])).await)
}

async fn wait_for_serial(p: &Running, ca: &Ca, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if fresh_serial(p, ca).await == want {
            return;
        }
        assert!(Instant::now() < deadline, "new handshakes never saw serial {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn https_and_h2_via_alpn() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(1);
    let secret = SecretDir::new(&cert, &key);
    let (p, seen, _d) = tls_proxy(&secret, |_| {}).await;

    // HTTP/1.1 over TLS: admitted, forwarded without the key.
    let s = tls_connect(ip(1), p.addr, ca.client_config(&[b"http/1.1"])).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut c = http1_over(s).await;
    let r = c.send("GET", "/v1/orders", &[KEY]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "upstream saw GET /v1/orders");
    let h = seen.last();
    assert!(!h.contains_key("x-api-key"), "upstream must never see the key");
    assert_eq!(h["x-portcullis-client"], "t/reader");
    // Decisions are the same over TLS.
    assert_eq!(c.send("GET", "/v1/orders", &[("x-api-key", "k-nope")]).await.reason(), "invalid_key");
    let mut other = http1_over(tls_connect(ip(2), p.addr, ca.client_config(&[b"http/1.1"])).await).await;
    assert_eq!(other.send("GET", "/v1/x", &[KEY]).await.reason(), "source_not_allowed");

    // h2 negotiated by ALPN.
    let s = tls_connect(ip(1), p.addr, ca.client_config(&[b"h2", b"http/1.1"])).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://svc.test/v1/upload")
            .header("x-api-key", "k-reader")
            .body(Full::new(Bytes::from(vec![b'x'; 100_000])))
            .unwrap();
        let resp = within("h2 response", send.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["x-body-len"], "100000");
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&b[..], b"upstream saw POST /v1/upload");
    }
    assert_eq!(seen.last()["host"], "svc.test");

    // Plain HTTP on the TLS listener: no response, a failed handshake.
    let out = raw(ip(1), p.addr, b"GET / HTTP/1.1\r\nhost: x\r\nx-api-key: k-reader\r\n\r\n").await;
    assert!(!String::from_utf8_lossy(&out).contains("upstream saw"));

    let m = p.metrics.encode();
    assert!(m.contains(r#"portcullis_proxy_tls_handshakes_total{outcome="ok"} 3"#), "{m}");
    wait_until("failed handshake counted", || {
        p.metrics.encode().contains(r#"portcullis_proxy_tls_handshakes_total{outcome="error"} 1"#)
    })
    .await;
    let (_, leaf) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
    let not_after = leaf.parse_x509().unwrap().validity().not_after.timestamp();
    assert!(m.contains(&format!("portcullis_proxy_tls_certificate_expiry_timestamp_seconds {not_after}")), "{m}");
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn require_tls_refuses_keys_over_plain_http() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(1);
    let secret = SecretDir::new(&cert, &key);
    let (p, seen, _d) = tls_proxy(&secret, |c| {
        c.plain_listen = Some("127.0.0.1:0".parse().unwrap());
        c.require_tls = true;
    })
    .await;
    let plain = p.plain_addr.expect("plain listener");
    let before = seen.count();

    let r = get(ip(1), plain, "/v1/x", &[KEY]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.reason(), "tls_required");
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(!r.body.contains("k-reader"));
    // Even an unknown or empty key: the key header itself is what must not travel in clear.
    assert_eq!(get(ip(1), plain, "/", &[("x-api-key", "")]).await.reason(), "tls_required");
    // h2c too.
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp_from(ip(1), plain).await))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://svc.test/v1/x")
        .header("x-api-key", "k-reader")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(within("h2c", send.send_request(req)).await.unwrap().status(), 403);
    // Without a key: the ordinary decision (401).
    assert_eq!(get(ip(1), plain, "/", &[]).await.reason(), "invalid_key");
    assert_eq!(seen.count(), before, "nothing reached the upstream over plain HTTP");

    // Over TLS the same request goes through.
    let mut c = http1_over(tls_connect(ip(1), p.addr, ca.client_config(&[b"http/1.1"])).await).await;
    assert_eq!(c.send("GET", "/v1/x", &[KEY]).await.status, 200);
    let m = p.metrics.encode();
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="deny",reason="tls_required"} 3"#), "{m}");

    // Without --require-tls the plain listener decides as usual.
    let (q, _seen, _d2) = tls_proxy(&secret, |c| c.plain_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    assert_eq!(get(ip(1), q.plain_addr.unwrap(), "/v1/x", &[KEY]).await.status, 200);
    // A proxy without TLS exposes no TLS metrics (an expiry of 0 would fire alerts).
    let (up, _s) = upstream().await;
    let plain_only = start(config(up, &_d.path().join("tables.json"))).await;
    assert!(!plain_only.metrics.encode().contains("tls_"), "{}", plain_only.metrics.encode());
    // --require-tls without a certificate is a configuration error.
    let (up, _s) = upstream().await;
    let mut bad = config(up, &_d.path().join("tables.json"));
    bad.require_tls = true;
    assert!(matches!(portcullis_proxy::start(bad).await.err(), Some(portcullis_proxy::StartError::NeedsCert)));
    for x in [p, q, plain_only] {
        x.shutdown();
        within("shutdown", x.wait()).await;
    }
}

#[tokio::test]
async fn rotation_is_picked_up_and_open_connections_keep_working() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(1);
    let mut secret = SecretDir::new(&cert, &key);
    let (p, _seen, _d) = tls_proxy(&secret, |_| {}).await;

    let before = tls_connect(ip(1), p.addr, ca.client_config(&[b"http/1.1"])).await;
    assert_eq!(served_serial(&before), serial_of(&cert));
    let mut open = http1_over(before).await;
    assert_eq!(open.send("GET", "/v1/a", &[KEY]).await.status, 200);

    let (cert2, key2) = ca.leaf(2);
    secret.update(cert2.as_bytes(), key2.as_bytes());
    wait_for_serial(&p, &ca, &serial_of(&cert2)).await;
    assert!(p.metrics.encode().contains(r#"portcullis_proxy_tls_reloads_total{outcome="ok"} 1"#));

    // The connection opened before the rotation still works.
    for _ in 0..3 {
        assert_eq!(open.send("GET", "/v1/b", &[KEY]).await.status, 200);
    }
    let mut after = http1_over(tls_connect(ip(1), p.addr, ca.client_config(&[b"http/1.1"])).await).await;
    assert_eq!(after.send("GET", "/v1/c", &[KEY]).await.status, 200);
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn bad_certificates_keep_the_old_one() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(1);
    let mut secret = SecretDir::new(&cert, &key);
    let (p, _seen, _d) = tls_proxy(&secret, |_| {}).await;
    let one = serial_of(&cert);
    assert_eq!(fresh_serial(&p, &ca).await, one);
    let errors = |n: u32| format!(r#"portcullis_proxy_tls_reloads_total{{outcome="error"}} {n}"#);

    // Not a certificate at all.
    secret.update(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", key.as_bytes());
    wait_until("malformed certificate refused", || p.metrics.encode().contains(&errors(1))).await;
    assert_eq!(fresh_serial(&p, &ca).await, one);

    // A valid certificate with somebody else's key.
    let (cert2, _) = ca.leaf(2);
    let (_, other_key) = ca.leaf(3);
    secret.update(cert2.as_bytes(), other_key.as_bytes());
    wait_until("mismatched key refused", || p.metrics.encode().contains(&errors(2))).await;
    assert_eq!(fresh_serial(&p, &ca).await, one);

    // Garbage text.
    secret.update(b"garbage", b"garbage");
    wait_until("garbage refused", || p.metrics.encode().contains(&errors(3))).await;
    let mut c = http1_over(tls_connect(ip(1), p.addr, ca.client_config(&[b"http/1.1"])).await).await;
    assert_eq!(c.send("GET", "/v1/x", &[KEY]).await.status, 200);
    assert!(!p.metrics.encode().contains(r#"tls_reloads_total{outcome="ok"}"#));

    // A good pair then applies.
    let (cert4, key4) = ca.leaf(4);
    secret.update(cert4.as_bytes(), key4.as_bytes());
    wait_for_serial(&p, &ca, &serial_of(&cert4)).await;
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn proxy_v2_in_front_of_tls() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(1);
    let secret = SecretDir::new(&cert, &key);
    let (p, _seen, _d) = tls_proxy(&secret, |c| {
        c.proxy_protocol = true;
        c.trusted_proxies = CidrSet::parse_list("127.0.0.10/32").unwrap();
    })
    .await;
    let cfg = ca.client_config(&[b"h2", b"http/1.1"]);
    let allowed: SocketAddr = "203.0.113.7:40000".parse().unwrap();

    // From the trusted balancer, PROXY v2 says 203.0.113.7 (allowed for k-reader); the balancer's own address is not.
    let mut tcp = tcp_from(ip(10), p.addr).await;
    tcp.write_all(&encode_v2(allowed, p.addr)).await.unwrap();
    let mut c = http1_over(tls_over(tcp, cfg.clone()).await).await;
    let r = c.send("GET", "/v1/x", &[KEY]).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Same balancer without a header: its own address, refused.
    let mut c = http1_over(tls_connect(ip(10), p.addr, cfg.clone()).await).await;
    assert_eq!(c.send("GET", "/v1/x", &[KEY]).await.reason(), "source_not_allowed");

    // A PROXY header from an untrusted peer: closed before any TLS.
    let mut tcp = tcp_from(ip(3), p.addr).await;
    tcp.write_all(&encode_v2(allowed, p.addr)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let r = within("refused handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp)).await;
    assert!(r.is_err(), "an untrusted PROXY header must not get a TLS session");
    assert!(p.metrics.encode().contains("portcullis_proxy_proxy_protocol_refused_total 1"));
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn the_binary_serves_tls_configured_from_the_environment() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(7);
    let secret = SecretDir::new(&cert, &key);
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (listen, plain, admin) = (free(), free(), free());
    let spawn = |cert: PathBuf| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"))
            .env("PORTCULLIS_LISTEN", listen.to_string())
            .env("PORTCULLIS_PLAIN_LISTEN", plain.to_string())
            .env("PORTCULLIS_ADMIN_LISTEN", admin.to_string())
            .env("PORTCULLIS_UPSTREAM", up.to_string())
            .env("PORTCULLIS_TABLES", &path)
            .env("PORTCULLIS_TLS_CERT", cert)
            .env("PORTCULLIS_TLS_KEY", secret.path("tls.key"))
            .env("PORTCULLIS_REQUIRE_TLS", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_exit = |mut child: std::process::Child| async move {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // A certificate that does not load at start: the proxy refuses to start.
    let bad = dir.path().join("bad.crt");
    std::fs::write(&bad, "not a certificate").unwrap();
    assert!(!wait_exit(spawn(bad)).await.success());

    let child = spawn(secret.path("tls.crt"));
    let deadline = Instant::now() + WAIT;
    loop {
        if tokio::net::TcpStream::connect(admin).await.is_ok() && get(ip(1), admin, "/readyz", &[]).await.status == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "proxy never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = tls_connect(ip(1), listen, ca.client_config(&[b"http/1.1"])).await;
    assert_eq!(served_serial(&s), serial_of(&cert));
    assert_eq!(http1_over(s).await.send("GET", "/v1/x", &[KEY]).await.status, 200);
    assert_eq!(get(ip(1), plain, "/v1/x", &[KEY]).await.reason(), "tls_required");
    let m = get(ip(1), admin, "/metrics", &[]).await.body;
    assert!(m.contains("portcullis_proxy_tls_certificate_expiry_timestamp_seconds "), "{m}");
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(wait_exit(child).await.success());
}

#[tokio::test]
async fn tls12_is_accepted_and_stalled_handshakes_time_out() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(1);
    let secret = SecretDir::new(&cert, &key);
    let (p, _seen, _d) = tls_proxy(&secret, |c| c.header_read_timeout = Duration::from_millis(300)).await;

    let mut roots = RootCertStore::empty();
    roots.add(ca.issuer.der().clone()).unwrap();
    let tls12 = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let s = tls_connect(ip(1), p.addr, Arc::new(tls12)).await;
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(http1_over(s).await.send("GET", "/v1/x", &[KEY]).await.status, 200);

    // A client that connects and never says hello is cut off and counted.
    let out = within("stalled client closed", async {
        let mut s = tcp_from(ip(1), p.addr).await;
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await
    })
    .await;
    assert!(!matches!(out, Ok(n) if n > 0), "no bytes for a client that sent none");
    wait_until("timeout counted", || {
        p.metrics.encode().contains(r#"portcullis_proxy_tls_handshakes_total{outcome="timeout"} 1"#)
    })
    .await;

    // A client that finishes the handshake (ALPN h2) but sends only part of the HTTP/2 preface is cut off too.
    let mut s = tls_connect(ip(1), p.addr, ca.client_config(&[b"h2"])).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tokio::io::AsyncWriteExt::write_all(&mut s, b"PRI * HTTP/2.0").await.unwrap();
    let out = within("partial preface closed", async {
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await.map(|_| buf)
    })
    .await;
    assert!(!matches!(&out, Ok(b) if !b.is_empty()), "nothing answered: {out:?}");
    wait_until("preface timeout counted", || {
        p.metrics.encode().contains(r#"portcullis_proxy_connections_closed_total{reason="preface_timeout"} 1"#)
    })
    .await;
    p.shutdown();
    within("shutdown", p.wait()).await;
}
