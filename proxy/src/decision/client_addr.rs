//! Which address a request comes from.
//!
//! The socket peer, unless the peer is a trusted proxy (`--trusted-proxies`): then `X-Forwarded-For` is walked
//! from the right, skipping trusted hops, and the first untrusted address is the client (RFC 7239 `Forwarded: for=`
//! is used the same way when there is no `X-Forwarded-For`). Headers from untrusted peers are ignored entirely, and
//! `X-Real-IP` is never used (it cannot express a chain of hops). Any header that cannot be parsed where it matters,
//! a header sent on several lines, or both headers at once make the decision fall back to the peer: an ambiguous or
//! malformed chain is never half-trusted.

use super::cidr::CidrSet;
use http::HeaderMap;
use std::net::{IpAddr, SocketAddr};

/// Longest forwarding chain considered; longer chains fall back to the peer.
const MAX_HOPS: usize = 32;

/// The address the decision uses for this request.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &CidrSet) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let xff = headers.get_all("x-forwarded-for").iter().count();
    let fwd = headers.get_all("forwarded").iter().count();
    match (xff, fwd) {
        (0, 0) => peer,
        (1, 0) => walk(peer, xff_entries(headers), trusted),
        (0, 1) => walk(peer, forwarded_entries(headers), trusted),
        // Several lines, or both headers: we cannot tell which one our trusted hop wrote (a proxy may append to the
        // first line while the client supplied another), so nothing in them is believed.
        _ => peer,
    }
}

/// Walks hop addresses (left to right order, as sent) from the right; `None` entries are unparsable.
fn walk(peer: IpAddr, entries: Option<Vec<Option<IpAddr>>>, trusted: &CidrSet) -> IpAddr {
    let Some(entries) = entries else { return peer };
    if entries.is_empty() || entries.len() > MAX_HOPS {
        return peer;
    }
    let mut leftmost = peer;
    for e in entries.iter().rev() {
        let Some(ip) = e else { return peer };
        let ip = ip.to_canonical();
        if !trusted.contains(ip) {
            return ip;
        }
        leftmost = ip;
    }
    // Every hop is a trusted proxy: the request originated at the leftmost one.
    leftmost
}

fn xff_entries(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut out = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let s = v.to_str().ok()?;
        for part in s.split(',') {
            out.push(parse_node(part.trim()));
        }
    }
    Some(out)
}

fn forwarded_entries(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut out = Vec::new();
    for v in headers.get_all("forwarded") {
        let s = v.to_str().ok()?;
        for element in s.split(',') {
            let mut found = None;
            for pair in element.split(';') {
                let Some((k, v)) = pair.trim().split_once('=') else { continue };
                if k.trim().eq_ignore_ascii_case("for") {
                    if found.is_some() {
                        return None; // two `for` in one element: ambiguous
                    }
                    let v = v.trim();
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                    found = Some(parse_node(v));
                }
            }
            // An element without `for=` says nothing about the hop: treat as unparsable.
            out.push(found.flatten());
        }
    }
    Some(out)
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`; anything else (`unknown`,
/// obfuscated identifiers, garbage) is `None`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn trusted() -> CidrSet {
        CidrSet::parse_list("127.0.0.10/32, 10.0.0.0/8, fd00::/8").unwrap()
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let peer = ip("127.0.0.1");
        for h in [
            headers(&[("x-forwarded-for", b"127.0.0.2")]),
            headers(&[("x-real-ip", b"127.0.0.2")]),
            headers(&[("forwarded", b"for=127.0.0.2")]),
            headers(&[("x-forwarded-for", b"garbage"), ("x-forwarded-for", b"1.1.1.1")]),
            headers(&[("x-forwarded-for", b"\xff\xfe")]),
        ] {
            assert_eq!(client_addr(peer, &h, &trusted()), peer);
            assert_eq!(client_addr(peer, &h, &CidrSet::default()), peer);
        }
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let peer = ip("127.0.0.10");
        let h = headers(&[("x-forwarded-for", b"6.6.6.6, 203.0.113.9, 10.1.2.3")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("203.0.113.9"));
        // Split across several header lines: ambiguous (which line did our hop append to?), so the peer.
        let h = headers(&[("x-forwarded-for", b"6.6.6.6"), ("x-forwarded-for", b"203.0.113.9, 10.1.2.3")]);
        assert_eq!(client_addr(peer, &h, &trusted()), peer);
        let h = headers(&[("forwarded", b"for=6.6.6.6"), ("forwarded", b"for=203.0.113.9")]);
        assert_eq!(client_addr(peer, &h, &trusted()), peer);
        // All hops trusted: the leftmost originated it.
        let h = headers(&[("x-forwarded-for", b"10.9.9.9, 10.1.2.3")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("10.9.9.9"));
        // Ports and IPv6 forms, IPv4-mapped normalised.
        let h = headers(&[("x-forwarded-for", b"[2001:db8::1]:443")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("2001:db8::1"));
        let h = headers(&[("x-forwarded-for", b"::ffff:192.0.2.1")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("192.0.2.1"));
        let mapped_peer = ip("::ffff:127.0.0.10");
        let h = headers(&[("x-forwarded-for", b"192.0.2.1:5555")]);
        assert_eq!(client_addr(mapped_peer, &h, &trusted()), ip("192.0.2.1"));
    }

    #[test]
    fn garbage_from_a_trusted_peer_falls_back_to_the_peer() {
        let peer = ip("127.0.0.10");
        for v in [&b"unknown"[..], b"", b"1.2.3", b"a, 10.1.1.1", b"1.1.1.1,,", b"\xff"] {
            let h = headers(&[("x-forwarded-for", v)]);
            assert_eq!(client_addr(peer, &h, &trusted()), peer, "{v:?}");
        }
        // Garbage left of the first untrusted hop does not matter: it was never going to be believed.
        let h = headers(&[("x-forwarded-for", b"garbage, 203.0.113.9")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("203.0.113.9"));
        let long = vec!["10.0.0.1"; MAX_HOPS + 1].join(",");
        let h = headers(&[("x-forwarded-for", long.as_bytes())]);
        assert_eq!(client_addr(peer, &h, &trusted()), peer);
    }

    #[test]
    fn forwarded_header() {
        let peer = ip("127.0.0.10");
        let h =
            headers(&[("forwarded", b"for=192.0.2.60;proto=http;by=203.0.113.43, for=\"[2001:db8:cafe::17]:4711\"")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", b"For=198.51.100.17, for=10.0.0.5")]);
        assert_eq!(client_addr(peer, &h, &trusted()), ip("198.51.100.17"));
        for v in [&b"for=unknown"[..], b"for=_hidden", b"proto=https", b"for=1.1.1.1;for=2.2.2.2"] {
            let h = headers(&[("forwarded", v)]);
            assert_eq!(client_addr(peer, &h, &trusted()), peer, "{v:?}");
        }
        // Both headers at once: ambiguous, the peer.
        let h = headers(&[("forwarded", b"for=198.51.100.17"), ("x-forwarded-for", b"192.0.2.1")]);
        assert_eq!(client_addr(peer, &h, &trusted()), peer);
        // X-Real-IP alone is never used.
        let h = headers(&[("x-real-ip", b"192.0.2.1")]);
        assert_eq!(client_addr(peer, &h, &trusted()), peer);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn header_value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                // Plausible chains, with the odd garbage entry.
                proptest::collection::vec(
                    prop_oneof![
                        any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string()),
                        any::<u128>().prop_map(|v| format!("[{}]:443", std::net::Ipv6Addr::from(v))),
                        Just("127.0.0.10".to_string()),
                        Just("10.1.2.3".to_string()),
                        Just("unknown".to_string()),
                        "[a-z0-9:._\\[\\]\"=;-]{0,20}",
                    ],
                    0..6
                )
                .prop_map(|v| v.join(", ").into_bytes()),
                // Raw bytes valid in a header value.
                proptest::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..40),
            ]
        }

        fn header_set() -> impl Strategy<Value = Vec<(&'static str, Vec<u8>)>> {
            proptest::collection::vec(
                (prop_oneof![Just("x-forwarded-for"), Just("forwarded"), Just("x-real-ip")], header_value()),
                0..4,
            )
        }

        fn build(hs: &[(&'static str, Vec<u8>)]) -> HeaderMap {
            let mut h = HeaderMap::new();
            for (k, v) in hs {
                let k = http::HeaderName::from_static(k);
                let v = if k == "forwarded" {
                    let mut f = b"for=".to_vec();
                    f.extend_from_slice(v);
                    f
                } else {
                    v.clone()
                };
                h.append(k, HeaderValue::from_bytes(&v).unwrap());
            }
            h
        }

        proptest! {
            #[test]
            fn untrusted_peers_are_never_swayed(hs in header_set(), last in 1u8..=9) {
                let peer = IpAddr::from([127, 0, 0, last]);
                prop_assert_eq!(client_addr(peer, &build(&hs), &trusted()), peer);
            }

            #[test]
            fn trusted_peers_yield_the_peer_or_an_address_from_the_headers(hs in header_set()) {
                let peer = ip("127.0.0.10");
                let h = build(&hs);
                let got = client_addr(peer, &h, &trusted());
                if got != peer {
                    let text: String = h.values().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
                    let shown = got.to_string();
                    let mapped = match got { IpAddr::V4(a) => a.to_ipv6_mapped().to_string(), IpAddr::V6(_) => shown.clone() };
                    prop_assert!(text.contains(&shown) || text.contains(&mapped), "{} not in {:?}", got, text);
                }
            }
        }
    }
}
