//! Which address a request comes from.
//!
//! Without `--trusted-proxies`, or when the socket peer is not a trusted proxy, the peer is the client and every
//! forwarding header is ignored (and removed before forwarding). When the peer is trusted:
//!
//! - `X-Forwarded-For` lines are combined in order into one list (RFC 9110 §5.3: several lines of a list field
//!   mean the same as one line joined by commas), and so are `Forwarded` (RFC 7239) lines.
//! - Each list is walked from the right, skipping trusted proxies; the first address that is not trusted is the
//!   client. When every entry is trusted, the leftmost is the client. Entries left of the client are not looked
//!   at (they were written by the client, so they are never believed).
//! - When both headers are present, both are walked and must name the same client.
//! - `X-Real-IP` is never used (it cannot express a chain of hops).
//!
//! Anything ambiguous is refused ([`Ambiguous`], 400 `ambiguous_forwarded`) — never resolved to the trusted peer,
//! whose address is often allowed far more than the client behind it: a chain longer than [`MAX_HOPS`] entries,
//! an entry reached in the walk that is not an IP address (`unknown`, an obfuscated `_identifier`, garbage, an
//! empty entry), a `Forwarded` element without `for=` or with two, a header that does not parse (bad quoting,
//! bytes that are not visible ASCII), or the two headers naming different clients.

use super::cidr::CidrSet;
use http::HeaderMap;
use std::net::{IpAddr, SocketAddr};

/// Longest forwarding chain accepted (entries in one header, all lines together).
pub const MAX_HOPS: usize = 32;

/// Why the forwarding headers of a trusted peer do not name a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguous {
    /// More than [`MAX_HOPS`] entries.
    TooLong,
    /// An entry or header that does not parse where it matters.
    Unparsable,
    /// `X-Forwarded-For` and `Forwarded` name different clients.
    Disagree,
}

impl Ambiguous {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Ambiguous::TooLong => "forwarding chain too long",
            Ambiguous::Unparsable => "unparsable forwarding entry",
            Ambiguous::Disagree => "X-Forwarded-For and Forwarded disagree",
        }
    }
}

/// The address the decision uses for this request.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &CidrSet) -> Result<IpAddr, Ambiguous> {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return Ok(peer);
    }
    let xff = headers.contains_key("x-forwarded-for").then(|| walk(xff_entries(headers)?, trusted));
    let fwd = headers.contains_key("forwarded").then(|| walk(forwarded_entries(headers)?, trusted));
    match (xff, fwd) {
        (None, None) => Ok(peer),
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(b)) => {
            let (a, b) = (a?, b?);
            if a == b { Ok(a) } else { Err(Ambiguous::Disagree) }
        }
    }
}

/// Walks hop addresses (in the order sent) from the right; `None` entries are unparsable.
fn walk(entries: Vec<Option<IpAddr>>, trusted: &CidrSet) -> Result<IpAddr, Ambiguous> {
    if entries.len() > MAX_HOPS {
        return Err(Ambiguous::TooLong);
    }
    let mut leftmost = None;
    for e in entries.iter().rev() {
        let ip = e.ok_or(Ambiguous::Unparsable)?.to_canonical();
        if !trusted.contains(ip) {
            return Ok(ip);
        }
        leftmost = Some(ip);
    }
    // Every hop is a trusted proxy: the request originated at the leftmost one.
    leftmost.ok_or(Ambiguous::Unparsable)
}

fn xff_entries(headers: &HeaderMap) -> Result<Vec<Option<IpAddr>>, Ambiguous> {
    let mut out = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let s = v.to_str().map_err(|_| Ambiguous::Unparsable)?;
        for part in s.split(',') {
            if out.len() == MAX_HOPS {
                return Err(Ambiguous::TooLong);
            }
            out.push(parse_node(part.trim_matches([' ', '\t'])));
        }
    }
    Ok(out)
}

fn forwarded_entries(headers: &HeaderMap) -> Result<Vec<Option<IpAddr>>, Ambiguous> {
    let mut out = Vec::new();
    for v in headers.get_all("forwarded") {
        let s = v.to_str().map_err(|_| Ambiguous::Unparsable)?;
        for element in split_forwarded(s)? {
            if out.len() == MAX_HOPS {
                return Err(Ambiguous::TooLong);
            }
            let mut found = None;
            for (name, value) in element {
                if name.eq_ignore_ascii_case("for") {
                    if found.is_some() {
                        return Err(Ambiguous::Unparsable); // two `for` in one element
                    }
                    found = Some(parse_node(&value));
                }
            }
            // An element without `for=` says nothing about the hop: unparsable if the walk reaches it.
            out.push(found.flatten());
        }
    }
    Ok(out)
}

/// RFC 7239 §4: `element *( "," element )`, `element = [ pair ] *( ";" [ pair ] )`, `pair = token "=" value`,
/// `value = token / quoted-string`. Quoted strings are unescaped. Anything else is [`Ambiguous::Unparsable`].
fn split_forwarded(s: &str) -> Result<Vec<Vec<(&str, String)>>, Ambiguous> {
    let b = s.as_bytes();
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let skip_ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let mut elements = Vec::new();
    let mut pairs: Vec<(&str, String)> = Vec::new();
    let mut i = 0;
    loop {
        skip_ows(&mut i);
        if i < b.len() && b[i] != b',' && b[i] != b';' {
            let start = i;
            while i < b.len() && is_tchar(b[i]) {
                i += 1;
            }
            if i == start || b.get(i) != Some(&b'=') {
                return Err(Ambiguous::Unparsable);
            }
            let name = &s[start..i];
            i += 1;
            let mut value = String::new();
            if b.get(i) == Some(&b'"') {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(Ambiguous::Unparsable),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let c = *b.get(i + 1).ok_or(Ambiguous::Unparsable)?;
                            value.push(c as char);
                            i += 2;
                        }
                        Some(&c) => {
                            value.push(c as char);
                            i += 1;
                        }
                    }
                }
            } else {
                let start = i;
                while i < b.len() && is_tchar(b[i]) {
                    i += 1;
                }
                if i == start {
                    return Err(Ambiguous::Unparsable);
                }
                value.push_str(&s[start..i]);
            }
            pairs.push((name, value));
            skip_ows(&mut i);
        }
        match b.get(i) {
            None => {
                elements.push(pairs);
                return Ok(elements);
            }
            Some(b';') => i += 1,
            Some(b',') => {
                elements.push(std::mem::take(&mut pairs));
                i += 1;
            }
            Some(_) => return Err(Ambiguous::Unparsable),
        }
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`; anything else (`unknown`,
/// obfuscated identifiers, garbage, empty) is `None`.
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

    fn ok(peer: IpAddr, h: &HeaderMap) -> IpAddr {
        client_addr(peer, h, &trusted()).unwrap_or_else(|e| panic!("{h:?}: {e:?}"))
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
            headers(&[("forwarded", b"for=\"unterminated")]),
        ] {
            assert_eq!(client_addr(peer, &h, &trusted()), Ok(peer));
            assert_eq!(client_addr(peer, &h, &CidrSet::default()), Ok(peer));
        }
        // No trusted proxies at all: even a peer inside what would be a trusted range decides alone.
        let h = headers(&[("x-forwarded-for", b"203.0.113.9")]);
        assert_eq!(client_addr(ip("10.1.2.3"), &h, &CidrSet::default()), Ok(ip("10.1.2.3")));
    }

    #[test]
    fn trusted_hops_are_skipped_from_the_right() {
        let peer = ip("127.0.0.10");
        assert_eq!(ok(peer, &headers(&[])), peer, "no headers: the trusted peer itself");
        let h = headers(&[("x-forwarded-for", b"6.6.6.6, 203.0.113.9, 10.1.2.3")]);
        assert_eq!(ok(peer, &h), ip("203.0.113.9"));
        // Several lines are one list, in order: the line our hop appended is the last.
        let h = headers(&[("x-forwarded-for", b"6.6.6.6"), ("x-forwarded-for", b"203.0.113.9, 10.1.2.3")]);
        assert_eq!(ok(peer, &h), ip("203.0.113.9"));
        let h = headers(&[("x-forwarded-for", b"203.0.113.9"), ("x-forwarded-for", b"6.6.6.6")]);
        assert_eq!(ok(peer, &h), ip("6.6.6.6"));
        let h = headers(&[("forwarded", b"for=6.6.6.6"), ("forwarded", b"for=203.0.113.9")]);
        assert_eq!(ok(peer, &h), ip("203.0.113.9"));
        // All hops trusted: the leftmost originated it.
        let h = headers(&[("x-forwarded-for", b"10.9.9.9, 10.1.2.3")]);
        assert_eq!(ok(peer, &h), ip("10.9.9.9"));
        // Ports and IPv6 forms, IPv4-mapped normalised.
        let h = headers(&[("x-forwarded-for", b"[2001:db8::1]:443")]);
        assert_eq!(ok(peer, &h), ip("2001:db8::1"));
        let h = headers(&[("x-forwarded-for", b"::ffff:192.0.2.1")]);
        assert_eq!(ok(peer, &h), ip("192.0.2.1"));
        let mapped_peer = ip("::ffff:127.0.0.10");
        let h = headers(&[("x-forwarded-for", b"192.0.2.1:5555")]);
        assert_eq!(ok(mapped_peer, &h), ip("192.0.2.1"));
        // Entries left of the client are never looked at.
        let h = headers(&[("x-forwarded-for", b"garbage, unknown, , 203.0.113.9")]);
        assert_eq!(ok(peer, &h), ip("203.0.113.9"));
        let long = format!("{}, 203.0.113.9", vec!["1.1.1.1"; MAX_HOPS - 1].join(","));
        assert_eq!(ok(peer, &headers(&[("x-forwarded-for", long.as_bytes())])), ip("203.0.113.9"));
    }

    #[test]
    fn every_ambiguous_shape_is_refused_not_resolved_to_the_peer() {
        let peer = ip("127.0.0.10");
        let refused = |pairs: &[(&str, &[u8])], want: Ambiguous| {
            let h = headers(pairs);
            assert_eq!(client_addr(peer, &h, &trusted()), Err(want), "{pairs:?}");
        };
        use Ambiguous::*;
        for v in [&b"unknown"[..], b"", b" ", b"1.2.3", b"10.1.1.1, a", b"1.1.1.1,,", b"1.1.1.1,", b"_hidden", b"\xff"]
        {
            refused(&[("x-forwarded-for", v)], Unparsable);
        }
        // A trusted hop followed by garbage, or garbage right of an address our hop wrote.
        refused(&[("x-forwarded-for", b"203.0.113.9, 10.0.0.1, bogus")], Unparsable);
        refused(&[("x-forwarded-for", b"203.0.113.9"), ("x-forwarded-for", b"")], Unparsable);
        refused(&[("x-forwarded-for", b"203.0.113.9"), ("x-forwarded-for", b"\xff")], Unparsable);
        // Over the cap: in one line, or across lines.
        let long = vec!["203.0.113.9"; MAX_HOPS + 1].join(",");
        refused(&[("x-forwarded-for", long.as_bytes())], TooLong);
        let half = vec!["203.0.113.9"; MAX_HOPS / 2 + 1].join(",");
        refused(&[("x-forwarded-for", half.as_bytes()), ("x-forwarded-for", half.as_bytes())], TooLong);
        let many = vec!["for=203.0.113.9"; MAX_HOPS + 1].join(",");
        refused(&[("forwarded", many.as_bytes())], TooLong);
        // Forwarded: unknown / obfuscated / missing / doubled `for`, bad syntax.
        for v in [
            &b"for=unknown"[..],
            b"for=_hidden",
            b"for=\"_x:80\"",
            b"proto=https",
            b"for=1.1.1.1;for=2.2.2.2",
            b"for=\"1.1.1.1",
            b"for=",
            b"=1.1.1.1",
            b"for 1.1.1.1",
            b"for=1.1.1.1 2.2.2.2",
            b"for=\"1.1.1.1\"x",
            b"for=203.0.113.9, by=10.0.0.1",
        ] {
            refused(&[("forwarded", v)], Unparsable);
        }
        // Both headers: must agree.
        refused(&[("forwarded", b"for=198.51.100.17"), ("x-forwarded-for", b"192.0.2.1")], Disagree);
        refused(&[("forwarded", b"for=unknown"), ("x-forwarded-for", b"192.0.2.1")], Unparsable);
        refused(&[("forwarded", b"for=192.0.2.1"), ("x-forwarded-for", b"nope")], Unparsable);
        let h = headers(&[("forwarded", b"for=192.0.2.1;proto=https"), ("x-forwarded-for", b"192.0.2.1, 10.0.0.3")]);
        assert_eq!(ok(peer, &h), ip("192.0.2.1"));
    }

    #[test]
    fn forwarded_header() {
        let peer = ip("127.0.0.10");
        let h =
            headers(&[("forwarded", b"for=192.0.2.60;proto=http;by=203.0.113.43, for=\"[2001:db8:cafe::17]:4711\"")]);
        assert_eq!(ok(peer, &h), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", b"For=198.51.100.17, for=10.0.0.5")]);
        assert_eq!(ok(peer, &h), ip("198.51.100.17"));
        // Quoted strings may hold `,` and `;` (and escapes) without splitting the list.
        let h = headers(&[("forwarded", b"for=\"x,;y\\\"\";proto=a, for=203.0.113.1 ; by=\"10.0.0.1\"")]);
        assert_eq!(ok(peer, &h), ip("203.0.113.1"));
        let h = headers(&[("forwarded", b"for=\"x,;y\", for=10.0.0.1")]);
        assert_eq!(client_addr(peer, &h, &trusted()), Err(Ambiguous::Unparsable));
        // X-Real-IP alone is never used.
        let h = headers(&[("x-real-ip", b"192.0.2.1")]);
        assert_eq!(ok(peer, &h), peer);
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
                prop_assert_eq!(client_addr(peer, &build(&hs), &trusted()), Ok(peer));
            }

            /// A trusted peer's headers yield an address written in them, or a refusal; the peer's own address
            /// only when no forwarding header is present at all (or when the headers name it).
            #[test]
            fn trusted_peers_yield_an_address_from_the_headers_or_a_refusal(hs in header_set()) {
                let peer = ip("127.0.0.10");
                let h = build(&hs);
                let forwarding = h.contains_key("x-forwarded-for") || h.contains_key("forwarded");
                match client_addr(peer, &h, &trusted()) {
                    Ok(got) if !forwarding => prop_assert_eq!(got, peer),
                    Ok(got) => {
                        let text: String =
                            h.values().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
                        let shown = got.to_string();
                        let mapped = match got {
                            IpAddr::V4(a) => a.to_ipv6_mapped().to_string(),
                            IpAddr::V6(_) => shown.clone(),
                        };
                        prop_assert!(text.contains(&shown) || text.contains(&mapped), "{} not in {:?}", got, text);
                    }
                    Err(_) => prop_assert!(forwarding),
                }
            }

            /// The result never depends on entries left of the client: prepending anything (within the cap)
            /// changes nothing once an untrusted address has been found.
            #[test]
            fn entries_left_of_the_client_do_not_matter(junk in "[ -~]{0,20}", ip4 in any::<[u8; 4]>()) {
                let client = std::net::Ipv4Addr::from(ip4);
                prop_assume!(!trusted().contains(IpAddr::V4(client)));
                let peer = ip("127.0.0.10");
                let junk = junk.replace(',', " ");
                let v = format!("{junk}, {client}, 10.0.0.1");
                let h = headers(&[("x-forwarded-for", v.as_bytes())]);
                prop_assert_eq!(client_addr(peer, &h, &trusted()), Ok(IpAddr::V4(client)));
            }
        }
    }
}
