//! The path the application sees is the path that was checked; the address and identity it is told are the
//! proxy's, not the client's (issue 12). Each reproduction over real sockets, HTTP/1.1 (raw bytes, so nothing is
//! tidied up by a client library) and h2c, against an application that records exactly what reaches it.

use crate::common::*;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_proxy::Config;
use portcullis_proxy::decision::CidrSet;
use portcullis_proxy::decision::path::EscapedSlashes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// What the application received: the request target as written on its connection, and the headers.
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<(String, HeaderMap)>>>);

impl Recorded {
    fn all(&self) -> Vec<(String, HeaderMap)> {
        self.0.lock().unwrap().clone()
    }
    fn last(&self) -> (String, HeaderMap) {
        self.all().pop().expect("the application saw a request")
    }
}

/// An HTTP/1.1 application on 127.0.0.1 that records each request and reads its whole body before answering 200.
async fn recording_app() -> (SocketAddr, Recorded) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = Recorded::default();
    let r = rec.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    r.0.lock().unwrap().push((req.uri().to_string(), req.headers().clone()));
                    async move {
                        let n = req.into_body().collect().await?.to_bytes().len();
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(format!("read {n}")))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, rec)
}

async fn proxy_with(tweak: impl FnOnce(&mut Config)) -> (portcullis_proxy::Running, Recorded, tempfile::TempDir) {
    let (app, rec) = recording_app().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let mut c = config(app, &path);
    tweak(&mut c);
    let p = start(c).await;
    wait_until("table loaded", || p.tables.is_ready()).await;
    (p, rec, dir)
}

/// Status and body of a raw HTTP/1.1 exchange (`Connection: close` is added).
async fn raw_request(from: u8, to: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut bytes = head.replace("\n", "\r\n").into_bytes();
    if !head.ends_with("\n\n") {
        bytes.extend_from_slice(b"Connection: close\r\n\r\n");
    }
    bytes.extend_from_slice(body);
    let out = raw(ip(from), to, &bytes).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn reason_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    v["reason"].as_str().unwrap().to_string()
}

/// One h2c connection from 127.0.0.1.
async fn h2c(to: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tcp_from(ip(1), to).await;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut b = Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = within("h2 response", send.send_request(b.body(Full::new(Bytes::new())).unwrap())).await.unwrap();
    let status = resp.status().as_u16();
    let body = within("h2 body", resp.into_body().collect()).await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The path as the application would resolve it (decode, split on `/` and `\`, drop `;` parameters, dot
/// segments): for the scope check at the end of each test.
fn app_resolves(target: &str) -> String {
    let path = target.split('?').next().unwrap();
    let decoded = percent_decode(path);
    let mut segs: Vec<&str> = Vec::new();
    for s in decoded.split(['/', '\\']) {
        match s.split(';').next().unwrap() {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    format!("/{}", segs.join("/"))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_all_in_v1(rec: &Recorded) {
    for (target, _) in rec.all() {
        let resolved = app_resolves(&target);
        assert!(resolved == "/v1" || resolved.starts_with("/v1/"), "the app saw {target} (→ {resolved})");
    }
}

const KEY: &str = "x-api-key: k-reader"; // t/reader: GET/POST under /v1, from 127.0.0.1

#[tokio::test]
async fn a_client_scoped_to_v1_cannot_reach_outside_it() {
    let (p, rec, _dir) = proxy_with(|_| {}).await;
    let cases: &[(&str, u16, &str, Option<&str>)] = &[
        // The three reproductions from the issue.
        ("/v1/../admin/secret.txt", 403, "route_not_allowed", None),
        ("/v1/%2e%2e/admin/secret.txt", 403, "route_not_allowed", None),
        ("/v1/..%2fadmin/secret.txt", 400, "invalid_path", None),
        // More of the same family.
        ("/v1/%2E%2E/%2e%2e/admin", 400, "invalid_path", None),
        ("/v1//../admin", 403, "route_not_allowed", None),
        ("/v1/..;/admin", 400, "invalid_path", None),
        ("/v1/..%3b/admin", 400, "invalid_path", None),
        ("/v1/..%5cadmin", 400, "invalid_path", None),
        ("/v1/..\\admin", 400, "invalid_path", None),
        ("/v1/%00", 400, "invalid_path", None),
        ("/v1/%zz", 400, "invalid_path", None),
        ("/v1/../../etc/passwd", 400, "invalid_path", None),
        ("/v10", 403, "route_not_allowed", None),
        ("/v1%2fadmin", 400, "invalid_path", None),
        ("*", 400, "invalid_path", None),
        // Overlong UTF-8: `.`, `/` and `\` to a lenient decoder (old Tomcat, IIS).
        ("/v1/%c0%ae%c0%ae/admin", 400, "invalid_path", None),
        ("/v1/%C0%AF../admin", 400, "invalid_path", None),
        ("/v1/..%c1%9cadmin", 400, "invalid_path", None),
        ("/v1/%e0%80%ae%e0%80%ae/admin", 400, "invalid_path", None),
        ("/v1/%f0%80%80%ae%f0%80%80%ae/admin", 400, "invalid_path", None),
        // Inside the scope: admitted, and the app gets the normalised path.
        ("/v1/x/../y", 200, "", Some("/v1/y")),
        ("/v1//x/./%7Ez/%2e", 200, "", Some("/v1/x/~z/")),
        ("/v1/a%2Db?q=/../admin", 200, "", Some("/v1/a-b?q=/../admin")),
        ("/v1/%e2%82%ac;p=1", 200, "", Some("/v1/%E2%82%AC;p=1")),
        ("/v1/%e0%a0%80/%f0%90%80%80/%c2%a0", 200, "", Some("/v1/%E0%A0%80/%F0%90%80%80/%C2%A0")),
    ];
    for (target, status, reason, app_saw) in cases {
        let before = rec.all().len();
        let (s, body) = raw_request(1, p.addr, &format!("GET {target} HTTP/1.1\nHost: svc.test\n{KEY}\n"), b"").await;
        assert_eq!(s, *status, "{target}: {body}");
        if !reason.is_empty() {
            assert_eq!(reason_of(&body), *reason, "{target}");
        }
        match app_saw {
            Some(want) => assert_eq!(rec.last().0, *want, "{target}"),
            None => assert_eq!(rec.all().len(), before, "{target} reached the app"),
        }
        // Absolute form: the same decision.
        let (s, _) =
            raw_request(1, p.addr, &format!("GET http://svc.test{target} HTTP/1.1\nHost: svc.test\n{KEY}\n"), b"")
                .await;
        if *target != "*" {
            assert_eq!(s, *status, "absolute-form {target}");
        }
    }
    // h2c: the same paths (those an h2 client can put in :path).
    let mut send = h2c(p.addr).await;
    for (target, status, reason, app_saw) in cases.iter().filter(|c| c.0.starts_with('/')) {
        let before = rec.all().len();
        let (s, body) = h2_get(&mut send, &format!("http://svc.test{target}"), &[("x-api-key", "k-reader")]).await;
        assert_eq!(s, *status, "h2 {target}: {body}");
        if !reason.is_empty() {
            assert_eq!(reason_of(&body), *reason, "h2 {target}");
        }
        match app_saw {
            Some(want) => assert_eq!(rec.last().0, *want, "h2 {target}"),
            None => assert_eq!(rec.all().len(), before, "h2 {target} reached the app"),
        }
    }
    assert_all_in_v1(&rec);
    let m = p.metrics.encode();
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="deny",reason="invalid_path"}"#), "{m}");
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn escaped_slashes_can_be_passed_through_when_configured() {
    let (p, rec, _dir) = proxy_with(|c| c.escaped_slashes = EscapedSlashes::Keep).await;
    let (s, _) = raw_request(1, p.addr, &format!("GET /v1/a%2fb/..%5Cc HTTP/1.1\nHost: svc.test\n{KEY}\n"), b"").await;
    assert_eq!(s, 200);
    assert_eq!(rec.last().0, "/v1/a%2Fb/..%5Cc", "kept escaped, not separators");
    // Everything else is still refused or normalised.
    let (s, _) = raw_request(1, p.addr, &format!("GET /v1/%2e%2e/admin HTTP/1.1\nHost: svc.test\n{KEY}\n"), b"").await;
    assert_eq!(s, 403);
    let (s, _) = raw_request(1, p.addr, &format!("GET /v1/%00 HTTP/1.1\nHost: svc.test\n{KEY}\n"), b"").await;
    assert_eq!(s, 400);
    p.shutdown();
    within("shutdown", p.wait()).await;
}

/// Headers a client may write but the application must never receive as written.
const FORGED: &str = "x-portcullis-client: t/forged
x_portcullis_client: t/forged
X-Portcullis_Client: t/forged
x_api_key: k-other
x-forwarded-for: 6.6.6.6
x_forwarded_for: 6.6.6.6
forwarded: for=6.6.6.6
x-real-ip: 6.6.6.6
x-forwarded-host: evil.example
x-forwarded-proto: https
x-original-url: /admin
x-http-method-override: DELETE
x-http-method: DELETE
x-method-override: DELETE
x-client-ip: 6.6.6.6
true-client-ip: 6.6.6.6
cf-connecting-ip: 6.6.6.6
fastly-client-ip: 6.6.6.6
x-cluster-client-ip: 6.6.6.6
client-ip: 6.6.6.6
x-forwarded: for=6.6.6.6
forwarded-for: 6.6.6.6
x-forwarded-ssl: on
x-forwarded-scheme: https
front-end-https: on
x_custom: 1
x-kept: yes
";

fn assert_clean(h: &HeaderMap, addr: &str, proto: &str, underscores_kept: bool) {
    assert_eq!(h.get_all("x-portcullis-client").iter().collect::<Vec<_>>(), ["t/reader"]);
    assert_eq!(h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), [addr]);
    assert_eq!(h.get_all("forwarded").iter().collect::<Vec<_>>(), [format!("for={addr};proto={proto}").as_str()]);
    assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), [proto]);
    for gone in [
        "x-real-ip",
        "x-forwarded-host",
        "x-original-url",
        "x-api-key",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "client-ip",
        "x-forwarded",
        "forwarded-for",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "front-end-https",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the app: {h:?}");
    }
    let underscored: Vec<&str> = h.keys().map(|k| k.as_str()).filter(|k| k.contains('_')).collect();
    assert_eq!(underscored, if underscores_kept { vec!["x_custom"] } else { vec![] }, "{h:?}");
    assert_eq!(h["x-kept"], "yes");
}

#[tokio::test]
async fn identity_and_address_headers_are_the_proxy_s() {
    let (p, rec, _dir) = proxy_with(|_| {}).await;
    let (s, body) = raw_request(1, p.addr, &format!("GET /v1/x HTTP/1.1\nHost: svc.test\n{KEY}\n{FORGED}"), b"").await;
    assert_eq!(s, 200, "{body}");
    assert_clean(&rec.last().1, "127.0.0.1", "http", false);

    let mut send = h2c(p.addr).await;
    let forged: Vec<(&str, &str)> = FORGED.lines().filter_map(|l| l.split_once(": ")).collect();
    let mut headers = forged.clone();
    headers.push(("x-api-key", "k-reader"));
    let (s, _) = h2_get(&mut send, "http://svc.test/v1/x", &headers).await;
    assert_eq!(s, 200);
    assert_clean(&rec.last().1, "127.0.0.1", "http", false);
    p.shutdown();
    within("shutdown", p.wait()).await;

    // Underscore headers allowed: ordinary ones pass, look-alikes of ours still do not.
    let (p, rec, _dir) = proxy_with(|c| c.allow_underscore_headers = true).await;
    let (s, _) = raw_request(1, p.addr, &format!("GET /v1/x HTTP/1.1\nHost: svc.test\n{KEY}\n{FORGED}"), b"").await;
    assert_eq!(s, 200);
    assert_clean(&rec.last().1, "127.0.0.1", "http", true);
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_app_gets_the_decided_address_only() {
    let (p, rec, _dir) = proxy_with(|c| c.trusted_proxies = CidrSet::parse_list("127.0.0.10/32").unwrap()).await;
    let send = |extra: String| {
        let head = format!("GET /v1/x HTTP/1.1\nHost: svc.test\n{KEY}\n{extra}");
        async move { raw_request(10, p.addr, &head, b"").await }
    };
    // The load balancer appended the client's real address (127.0.0.1) to what the client wrote.
    let (s, _) = send("x-forwarded-for: 6.6.6.6, 127.0.0.1\nx-forwarded-proto: https\n".into()).await;
    assert_eq!(s, 200);
    let h = rec.last().1;
    assert_clean_addr(&h, "127.0.0.1", "https");
    // A second line the client wrote before the one the load balancer added.
    let (s, _) = send("x-forwarded-for: 203.0.113.7\nx-forwarded-for: 127.0.0.1\n".into()).await;
    assert_eq!(s, 200);
    assert_clean_addr(&rec.last().1, "127.0.0.1", "http");
    let seen = rec.all().len();
    // The shapes that used to fall back to the load balancer's own address: refused, nothing forwarded.
    let long = vec!["127.0.0.1"; 40].join(", ");
    for extra in [
        format!("x-forwarded-for: {long}\n"),
        "forwarded: for=127.0.0.3\nx-forwarded-for: 127.0.0.1\n".to_string(),
        "x-forwarded-for: 127.0.0.1\nx-forwarded-for: garbage\n".to_string(),
        "forwarded: for=_hidden\n".to_string(),
    ] {
        let (s, body) = send(extra.clone()).await;
        assert_eq!((s, reason_of(&body).as_str()), (400, "ambiguous_forwarded"), "{extra}");
    }
    assert_eq!(rec.all().len(), seen);
    p.shutdown();
    within("shutdown", p.wait()).await;
}

fn assert_clean_addr(h: &HeaderMap, addr: &str, proto: &str) {
    assert_eq!(h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), [addr]);
    assert_eq!(h.get_all("forwarded").iter().collect::<Vec<_>>(), [format!("for={addr};proto={proto}").as_str()]);
    assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), [proto]);
}

#[tokio::test]
async fn a_key_in_the_query_never_reaches_the_app() {
    let (p, rec, _dir) = proxy_with(|_| {}).await;
    let (s, _) = raw_request(
        1,
        p.addr,
        &format!("GET /v1/x?a=1&x-api-key=k-reader&X_API_KEY=k-other;b=2 HTTP/1.1\nHost: svc.test\n{KEY}\n"),
        b"",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(rec.last().0, "/v1/x?a=1;b=2");
    let mut send = h2c(p.addr).await;
    let (s, _) = h2_get(&mut send, "http://svc.test/v1/x?x-api-key=k-reader", &[("x-api-key", "k-reader")]).await;
    assert_eq!(s, 200);
    assert_eq!(rec.last().0, "/v1/x");
    // The query never stands in for the header.
    let (s, body) = raw_request(1, p.addr, "GET /v1/x?x-api-key=k-reader HTTP/1.1\nHost: svc.test\n", b"").await;
    assert_eq!((s, reason_of(&body).as_str()), (401, "invalid_key"));
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn absolute_form_authority_wins_over_host() {
    let (p, rec, _dir) = proxy_with(|_| {}).await;
    let (s, _) =
        raw_request(1, p.addr, &format!("GET http://a.example:8080/v1/x HTTP/1.1\nHost: b.example\n{KEY}\n"), b"")
            .await;
    assert_eq!(s, 200);
    let (target, h) = rec.last();
    assert_eq!(target, "/v1/x");
    assert_eq!(h.get_all("host").iter().collect::<Vec<_>>(), ["a.example:8080"]);
    let seen = rec.all().len();
    for head in [
        format!("GET /v1/x HTTP/1.1\nHost: a.example\nHost: b.example\n{KEY}\n"),
        format!("GET http://user@a.example/v1/x HTTP/1.1\nHost: a.example\n{KEY}\n"),
        // A Host that is not `host[:port]` (RFC 9112 §3.2: 400): an application that builds its URL as
        // `http://${host}${target}` would route `evil/admin#` + `/v1/x` to `/admin`.
        format!("GET /v1/x HTTP/1.1\nHost: evil/admin#\n{KEY}\n"),
        format!("GET /v1/x HTTP/1.1\nHost: evil?\n{KEY}\n"),
        format!("GET /v1/x HTTP/1.1\nHost: evil#\n{KEY}\n"),
        format!("GET /v1/x HTTP/1.1\nHost: evil\\admin\n{KEY}\n"),
        format!("GET /v1/x HTTP/1.1\nHost: user@a.example\n{KEY}\n"),
        format!("GET /v1/x HTTP/1.1\nHost: a b\n{KEY}\n"),
        format!("GET http://a.example/v1/x HTTP/1.1\nHost: evil/admin#\n{KEY}\n"),
    ] {
        let (s, body) = raw_request(1, p.addr, &head, b"").await;
        assert_eq!((s, reason_of(&body).as_str()), (400, "bad_request"), "{head}");
    }
    assert_eq!(rec.all().len(), seen);
    // h2: a `host` header next to `:authority` is replaced by it, but is judged all the same.
    let mut send = h2c(p.addr).await;
    let (s, body) =
        h2_get(&mut send, "http://svc.test/v1/x", &[("x-api-key", "k-reader"), ("host", "evil/admin#")]).await;
    assert_eq!((s, reason_of(&body).as_str()), (400, "bad_request"));
    assert_eq!(rec.all().len(), seen);
    // Valid forms pass: a name, a port, an IPv6 literal, an empty Host.
    for host in ["a.example", "a.example:8080", "[::1]:80", "127.0.0.1", ""] {
        let (s, body) = raw_request(1, p.addr, &format!("GET /v1/x HTTP/1.1\nHost: {host}\n{KEY}\n"), b"").await;
        assert_eq!(s, 200, "{host}: {body}");
        assert_eq!(rec.last().1.get_all("host").iter().collect::<Vec<_>>(), [host]);
    }
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_not_an_allowed_502() {
    let (p, _rec, _dir) = proxy_with(|_| {}).await;
    let head = format!("POST /v1/upload HTTP/1.1\nHost: svc.test\n{KEY}\nTransfer-Encoding: chunked\n");
    let (s, body) = raw_request(1, p.addr, &head, b"5\r\nhello\r\nzz-not-a-size\r\n\r\n").await;
    assert_eq!((s, reason_of(&body).as_str()), (400, "bad_request"), "{body}");
    // A well-formed one passes.
    let (s, body) = raw_request(1, p.addr, &head, b"5\r\nhello\r\n0\r\n\r\n").await;
    assert_eq!((s, body.as_str()), (200, "read 5"));
    let m = p.metrics.encode();
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="deny",reason="bad_request"} 1"#), "{m}");
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="allow",reason="ok"} 1"#), "{m}");
    assert!(!m.contains("upstream_unavailable"), "{m}");
    p.shutdown();
    within("shutdown", p.wait()).await;
}
