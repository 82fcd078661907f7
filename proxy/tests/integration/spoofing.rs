//! Address spoofing: forwarding headers and PROXY headers are believed only from trusted proxies.

use crate::common::*;
use portcullis_proxy::decision::CidrSet;
use portcullis_proxy::proxy_protocol::{encode_v1, encode_v2};
use std::net::SocketAddr;

const KEY: (&str, &str) = ("x-api-key", "k-reader"); // t/reader: allowed from 127.0.0.1 and 203.0.113.7 only

/// A proxy trusting 127.0.0.10 and 127.0.0.11 as hops, with what its upstream has seen.
async fn proxy(proxy_protocol: bool) -> (portcullis_proxy::Running, tempfile::TempDir, Seen) {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    write_table(&path, &standard_table());
    let mut c = config(up, &path);
    c.trusted_proxies = CidrSet::parse_list("127.0.0.10/32, 127.0.0.11/32").unwrap();
    c.proxy_protocol = proxy_protocol;
    let p = start(c).await;
    wait_until("table loaded", || p.tables.is_ready()).await;
    (p, dir, seen)
}

#[tokio::test]
async fn untrusted_peers_cannot_change_the_decision_with_headers() {
    let (p, _dir, _) = proxy(false).await;
    let spoofs: Vec<Vec<(&str, &str)>> = vec![
        vec![("x-forwarded-for", "127.0.0.1")],
        vec![("x-forwarded-for", "203.0.113.7")],
        vec![("x-forwarded-for", "127.0.0.3, 127.0.0.1")],
        vec![("x-real-ip", "127.0.0.1")],
        vec![("forwarded", "for=127.0.0.1")],
        vec![("forwarded", "for=\"[::ffff:127.0.0.1]\"")],
        vec![("x-forwarded-for", "127.0.0.1"), ("x-forwarded-for", "127.0.0.1")],
        vec![("x-forwarded-for", "garbage"), ("forwarded", "for=unknown"), ("x-real-ip", "::1")],
        vec![("x-forwarded-for", "127.0.0.1, 127.0.0.10")],
    ];
    // From 127.0.0.3 (not allowed): refused whatever the headers say.
    for s in &spoofs {
        let mut h = s.clone();
        h.push(KEY);
        let r = get(ip(3), p.addr, "/v1/x", &h).await;
        assert_eq!(r.status, 403, "{s:?}");
        assert_eq!(r.reason(), "source_not_allowed");
    }
    // From 127.0.0.1 (allowed): admitted whatever the headers say.
    for s in &spoofs {
        let mut h: Vec<(&str, &str)> =
            s.iter().map(|(k, v)| (*k, if v.contains("127.0.0.1") { "127.0.0.3" } else { *v })).collect();
        h.push(KEY);
        assert_eq!(get(ip(1), p.addr, "/v1/x", &h).await.status, 200, "{s:?}");
    }
    p.shutdown();
    within("shutdown", p.wait()).await;
}

#[tokio::test]
async fn trusted_hops_use_the_rightmost_untrusted_address() {
    let (p, _dir, _) = proxy(false).await;
    let trusted = ip(10);
    let long = vec!["127.0.0.1"; 33].join(", ");
    type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str);
    let cases: &[Case] = &[
        (&[("x-forwarded-for", "127.0.0.1")], 200, ""),
        (&[("x-forwarded-for", "203.0.113.7")], 200, ""),
        (&[("x-forwarded-for", "127.0.0.1, 127.0.0.11")], 200, ""), // .11 is another trusted hop
        (&[("x-forwarded-for", "127.0.0.3, 127.0.0.1")], 200, ""),  // the client claims .3; .1 is what our hop saw
        (&[("x-forwarded-for", "127.0.0.1, 127.0.0.3")], 403, "source_not_allowed"), // spoofed .1 left of .3
        // Several lines are one list in order: the last line is the one our hop appended.
        (&[("x-forwarded-for", "127.0.0.1"), ("x-forwarded-for", "127.0.0.3")], 403, "source_not_allowed"),
        (&[("x-forwarded-for", "127.0.0.3"), ("x-forwarded-for", "127.0.0.1")], 200, ""),
        (&[("forwarded", "for=127.0.0.3"), ("forwarded", "for=127.0.0.1")], 200, ""),
        // Both headers: they must name the same client.
        (&[("x-forwarded-for", "127.0.0.1"), ("forwarded", "for=127.0.0.1")], 200, ""),
        (&[("x-forwarded-for", "127.0.0.3"), ("forwarded", "for=127.0.0.1")], 400, "ambiguous_forwarded"),
        (&[("x-forwarded-for", "127.0.0.1"), ("forwarded", "for=127.0.0.3")], 400, "ambiguous_forwarded"),
        (&[("x-forwarded-for", "::ffff:127.0.0.1")], 200, ""),
        (&[("forwarded", "for=127.0.0.1;proto=http")], 200, ""),
        (&[("forwarded", "for=127.0.0.1, for=127.0.0.3")], 403, "source_not_allowed"),
        // Garbage, obfuscation and over-long chains from a trusted hop: refused, never the peer.
        (&[("x-forwarded-for", "not-an-ip")], 400, "ambiguous_forwarded"),
        (&[("x-forwarded-for", "127.0.0.1, nonsense")], 400, "ambiguous_forwarded"),
        (&[("x-forwarded-for", long.as_str())], 400, "ambiguous_forwarded"),
        (&[("forwarded", "for=unknown")], 400, "ambiguous_forwarded"),
        (&[("forwarded", "for=_gateway")], 400, "ambiguous_forwarded"),
        (&[("forwarded", "for=\"127.0.0.1")], 400, "ambiguous_forwarded"),
        // X-Real-IP is never used; no header at all: the peer (127.0.0.10, not allowed) decides.
        (&[("x-real-ip", "127.0.0.1")], 403, "source_not_allowed"),
        (&[], 403, "source_not_allowed"),
    ];
    for (headers, status, reason) in cases {
        let mut h = headers.to_vec();
        h.push(KEY);
        let r = get(trusted, p.addr, "/v1/x", &h).await;
        assert_eq!(r.status.as_u16(), *status, "{headers:?}: {}", r.body);
        if !reason.is_empty() {
            assert_eq!(r.reason(), *reason, "{headers:?}");
        }
    }
    p.shutdown();
    within("shutdown", p.wait()).await;
}

fn request() -> Vec<u8> {
    b"GET /v1/x HTTP/1.1\r\nHost: svc.test\r\nx-api-key: k-reader\r\nConnection: close\r\n\r\n".to_vec()
}

fn status_of(resp: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(resp).ok()?;
    s.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn proxy_protocol_only_from_trusted_peers() {
    let (p, _dir, _) = proxy(true).await;
    let dst: SocketAddr = p.addr;
    let with = |hdr: Vec<u8>| [hdr, request()].concat();
    let src = |last: u8| SocketAddr::new(ip(last), 40000);

    // Trusted peer, v1 and v2, announcing an allowed client.
    assert_eq!(status_of(&raw(ip(10), dst, &with(encode_v1(src(1), dst))).await), Some(200));
    assert_eq!(status_of(&raw(ip(10), dst, &with(encode_v2(src(1), dst))).await), Some(200));
    let ext: SocketAddr = "203.0.113.7:5000".parse().unwrap();
    assert_eq!(status_of(&raw(ip(10), dst, &with(encode_v2(ext, dst))).await), Some(200));
    // Trusted peer announcing a client that is not allowed.
    assert_eq!(status_of(&raw(ip(10), dst, &with(encode_v1(src(3), dst))).await), Some(403));
    assert_eq!(status_of(&raw(ip(10), dst, &with(encode_v2(src(3), dst))).await), Some(403));
    // Untrusted peer sending a PROXY header: connection refused, no response at all.
    for hdr in [encode_v1(src(1), dst), encode_v2(src(1), dst)] {
        let out = raw(ip(3), dst, &with(hdr)).await;
        assert!(out.is_empty(), "got {:?}", String::from_utf8_lossy(&out));
    }
    // Even from the allowed address itself, a PROXY header from an untrusted peer is refused.
    assert!(raw(ip(1), dst, &with(encode_v1(src(1), dst))).await.is_empty());
    // Malformed header from a trusted peer: refused.
    assert!(raw(ip(10), dst, &with(b"PROXY TCP4 nonsense\r\n".to_vec())).await.is_empty());
    // No header: the socket peer decides.
    assert_eq!(status_of(&raw(ip(1), dst, &request()).await), Some(200));
    assert_eq!(status_of(&raw(ip(3), dst, &request()).await), Some(403));
    assert!(p.metrics.encode().contains("portcullis_proxy_proxy_protocol_refused_total 4"), "{}", p.metrics.encode());
    p.shutdown();
    within("shutdown", p.wait()).await;
}

/// The forwarding headers are formatted once per connection and reused: a request must still forward its own
/// address and scheme when a trusted proxy carries several clients on one kept-alive connection, and an untrusted
/// peer's claims never replace its own address on any request of its connection.
#[tokio::test]
async fn each_request_on_a_kept_alive_connection_forwards_its_own_address() {
    let (p, _dir, seen) = proxy(false).await;
    let forwarded = |h: &http::HeaderMap| {
        let v = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        (v("x-forwarded-for"), v("forwarded"), v("x-forwarded-proto"))
    };
    let mut via_lb = Conn::open(ip(10), p.addr).await;
    for (xff, proto, want_for, want_proto) in [
        ("127.0.0.1", None, "127.0.0.1", "http"),
        ("203.0.113.7", None, "203.0.113.7", "http"),
        ("203.0.113.7", Some("https"), "203.0.113.7", "https"),
        ("127.0.0.1", None, "127.0.0.1", "http"),
    ] {
        let mut h = vec![("x-forwarded-for", xff), KEY];
        h.extend(proto.map(|p| ("x-forwarded-proto", p)));
        assert_eq!(via_lb.send("GET", "/v1/x", &h).await.status, 200, "{xff} {proto:?}");
        let want = (want_for.to_string(), format!("for={want_for};proto={want_proto}"), want_proto.to_string());
        assert_eq!(forwarded(&seen.last()), want, "{xff} {proto:?}");
    }
    let mut direct = Conn::open(ip(1), p.addr).await;
    for claim in ["203.0.113.7", "127.0.0.9", "127.0.0.1"] {
        let h = [("x-forwarded-for", claim), ("x-forwarded-proto", "https"), KEY];
        assert_eq!(direct.send("GET", "/v1/x", &h).await.status, 200, "{claim}");
        let want = ("127.0.0.1".to_string(), "for=127.0.0.1;proto=http".to_string(), "http".to_string());
        assert_eq!(forwarded(&seen.last()), want, "{claim}");
    }
    p.shutdown();
    within("shutdown", p.wait()).await;
}
