//! Pure rewrites of what the application receives: hop-by-hop headers (both ways), upgrade detection, header
//! hygiene (identity, key and address headers the client wrote are dropped), the forwarding headers the proxy
//! writes, and the key removed from the query string.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// The header naming the decided client to the application (`<namespace>/<name>`).
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("x-portcullis-client");

/// Headers only the proxy writes: whatever the client sent under these names is dropped (then the proxy adds its
/// own `x-portcullis-client`, `x-forwarded-for`, `forwarded`, `x-forwarded-proto`). The path-override headers some
/// frameworks honour (`X-Original-URL`, `X-Rewrite-URL`) would route the application to a path that was never
/// decided, and the method-override headers (`X-HTTP-Method-Override`, ...) to a method that was never decided, so
/// they are dropped too; and so are the other client-address headers libraries read before `X-Forwarded-For`
/// (`X-Client-IP`, `True-Client-IP`, `CF-Connecting-IP`, Rails' `Client-IP`, ...) and the scheme claims Rack and
/// others honour (`X-Forwarded-Ssl`, `X-Forwarded-Scheme`, `Front-End-Https`).
pub const PROXY_OWNED: [&str; 23] = [
    "x-portcullis-client",
    "x-forwarded-for",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
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
];

/// `name` with `_` read as `-` (header names are lower case already), the way CGI/WSGI-style servers merge them.
fn same_name(name: &str, other: &str) -> bool {
    name.len() == other.len() && name.bytes().zip(other.bytes()).all(|(a, b)| a == b || (a == b'_' && b == b'-'))
}

/// Drops the key header, every proxy-owned header ([`PROXY_OWNED`]), any header whose name is one of those with
/// `_` for `-` (`x_portcullis_client`, `x_api_key`, ...), and — unless `allow_underscores` — every other header
/// with `_` in its name (nginx and Envoy drop them by default for the same reason).
pub fn scrub_client_headers(h: &mut HeaderMap, key_header: &HeaderName, allow_underscores: bool) {
    // One pass over the names the request has (a handful), not a removal per name it might have (each a hash and
    // a probe: 10 000 instructions a request for the 24 names here).
    let key = key_header.as_str();
    let dropped = |k: &str| {
        k == key
            || PROXY_OWNED.contains(&k)
            || (k.contains('_')
                && (!allow_underscores || same_name(k, key) || PROXY_OWNED.iter().any(|p| same_name(k, p))))
    };
    remove_names(h, |k| dropped(k.as_str()));
}

/// Removes every header whose name `drop` picks; allocates only when one is there.
fn remove_names(h: &mut HeaderMap, drop: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = h.keys().filter(|k| drop(k)).cloned().collect();
    for n in names {
        h.remove(n);
    }
}

/// `http` or `https`, as the application should be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http,
    Https,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http => "http",
            Proto::Https => "https",
        }
    }

    /// The scheme of the connection to the proxy; from a trusted proxy, its own `X-Forwarded-Proto` when it sent
    /// exactly one, `http` or `https` (a TLS-terminating load balancer in front of a plain listener).
    pub fn decide(tls: bool, peer_trusted: bool, h: &HeaderMap) -> Self {
        if tls {
            return Proto::Https;
        }
        if peer_trusted {
            let mut it = h.get_all("x-forwarded-proto").iter();
            if let (Some(v), None) = (it.next(), it.next())
                && v.as_bytes().eq_ignore_ascii_case(b"https")
            {
                return Proto::Https;
            }
        }
        Proto::Http
    }
}

/// Writes the decided client address: `X-Forwarded-For: <addr>`, `Forwarded: for=<addr>;proto=<proto>` and
/// `X-Forwarded-Proto: <proto>`, replacing anything of those names.
pub fn set_forwarding_headers(h: &mut HeaderMap, addr: IpAddr, proto: Proto) {
    Forwarding::new(addr, proto).apply(h);
}

/// The forwarding header values for one client address and scheme, formatted once: a connection keeps them for its
/// requests (formatting an address costs more than the rest of the rewrite).
#[derive(Debug, Clone)]
pub struct Forwarding {
    addr: IpAddr,
    proto: Proto,
    xff: HeaderValue,
    fwd: HeaderValue,
}

impl Forwarding {
    pub fn new(addr: IpAddr, proto: Proto) -> Self {
        let (xff, fwd) = match addr {
            IpAddr::V4(a) => (a.to_string(), format!("for={a};proto={}", proto.as_str())),
            IpAddr::V6(a) => (a.to_string(), format!("for=\"[{a}]\";proto={}", proto.as_str())),
        };
        // Addresses and the fixed text are ASCII: always a valid value.
        let (xff, fwd) = (HeaderValue::try_from(xff).expect("ASCII"), HeaderValue::try_from(fwd).expect("ASCII"));
        Self { addr, proto, xff, fwd }
    }

    /// Whether these are the values for `addr` and `proto`.
    pub fn is_for(&self, addr: IpAddr, proto: Proto) -> bool {
        self.addr == addr && self.proto == proto
    }

    /// Writes the three headers, replacing anything of those names.
    pub fn apply(&self, h: &mut HeaderMap) {
        h.insert(HeaderName::from_static("x-forwarded-for"), self.xff.clone());
        h.insert(header::FORWARDED, self.fwd.clone());
        h.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(self.proto.as_str()));
    }
}

/// The query without any parameter named like the key header (compared after percent-decoding, `+` as space,
/// case-insensitively, `_` as `-`; parameters separated by `&` or `;`), or `None` when there is none to remove.
/// The other parameters are kept byte for byte.
pub fn strip_key_param(query: &str, key_header: &str) -> Option<String> {
    let key = key_header.as_bytes();
    // Decodes the parameter's name on the fly and compares it with the key header's name; no allocation.
    let is_key = |piece: &str| {
        let name = piece.split('=').next().unwrap_or("").as_bytes();
        if name.len() < key.len() {
            return false;
        }
        let hex = |j: usize| name.get(j).and_then(|c| (*c as char).to_digit(16));
        let (mut i, mut k) = (0, 0);
        while i < name.len() {
            let (c, step) = match (name[i], hex(i + 1), hex(i + 2)) {
                (b'%', Some(hi), Some(lo)) => ((hi * 16 + lo) as u8, 3),
                (b'+', ..) => (b' ', 1),
                (c, ..) => (c, 1),
            };
            let c = if c == b'_' { b'-' } else { c.to_ascii_lowercase() };
            if key.get(k) != Some(&c) {
                return false;
            }
            i += step;
            k += 1;
        }
        k == key.len()
    };
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, c) in query.char_indices() {
        if c == '&' || c == ';' {
            pieces.push((start, i));
            start = i + 1;
        }
    }
    pieces.push((start, query.len()));
    if !pieces.iter().any(|&(a, b)| is_key(&query[a..b])) {
        return None;
    }
    let mut out = String::with_capacity(query.len());
    for &(a, b) in &pieces {
        if is_key(&query[a..b]) {
            continue;
        }
        if !out.is_empty() {
            // The separator that preceded this piece in the original.
            out.push(if a > 0 { query.as_bytes()[a - 1] as char } else { '&' });
        }
        out.push_str(&query[a..b]);
    }
    Some(out)
}

/// An HTTP/1.1 upgrade request: `Upgrade` plus `Connection: upgrade`.
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, and `Proxy-*`. For an upgrade being passed through, `Upgrade` and
/// `Connection: upgrade` are kept.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade: Vec<HeaderValue> =
        if keep_upgrade { h.get_all(header::UPGRADE).iter().cloned().collect() } else { Vec::new() };
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    // One pass over the names present (see `scrub_client_headers`).
    remove_names(h, |k| {
        k == header::CONNECTION
            || k == header::TE
            || k == header::TRAILER
            || k == header::TRANSFER_ENCODING
            || k == header::UPGRADE
            || k.as_str() == "keep-alive"
            || k.as_str().starts_with("proxy-")
            || named.contains(k)
    });
    if !upgrade.is_empty() {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for v in upgrade {
            h.append(header::UPGRADE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut a = h.clone();
        strip_hop_by_hop(&mut a, false);
        assert_eq!(a.len(), 1);
        assert_eq!(a["x-kept"], "yes");
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 3);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn identity_key_and_address_headers_from_the_client_are_dropped() {
        let key = HeaderName::from_static("x-api-key");
        let written = [
            ("x-portcullis-client", "ns/forged"),
            ("x_portcullis_client", "ns/forged"),
            ("x-portcullis_client", "ns/forged"),
            ("X_Portcullis_Client", "ns/forged"),
            ("x-api-key", "k"),
            ("x_api_key", "k"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x_forwarded_for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x_real_ip", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("X-HTTP-Method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x_http_method_override", "DELETE"),
            ("x-client-ip", "1.2.3.4"),
            ("True-Client-IP", "1.2.3.4"),
            ("cf-connecting-ip", "1.2.3.4"),
            ("fastly-client-ip", "1.2.3.4"),
            ("x-cluster-client-ip", "1.2.3.4"),
            ("client-ip", "1.2.3.4"),
            ("client_ip", "1.2.3.4"),
            ("x-forwarded", "for=1.2.3.4"),
            ("forwarded-for", "1.2.3.4"),
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-scheme", "https"),
            ("front-end-https", "on"),
            ("x-kept", "1"),
            ("x_other", "1"),
        ];
        for allow in [false, true] {
            let mut h = map(&written);
            scrub_client_headers(&mut h, &key, allow);
            // Which names are left, not their order (removals reorder a HeaderMap).
            let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            let want: &[&str] = if allow { &["x-kept", "x_other"] } else { &["x-kept"] };
            assert_eq!(left, want, "allow_underscores={allow}");
        }
        // Another key header name: its look-alikes go, x-api-key is an ordinary header then.
        let mut h = map(&[("x-key", "k"), ("x_key", "k"), ("x-api-key", "v")]);
        scrub_client_headers(&mut h, &HeaderName::from_static("x-key"), true);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-api-key"]);
    }

    #[test]
    fn forwarding_values_are_for_one_address_and_scheme() {
        let (a, b): (IpAddr, IpAddr) = ("203.0.113.9".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let f = Forwarding::new(a, Proto::Http);
        assert!(f.is_for(a, Proto::Http));
        assert!(!f.is_for(b, Proto::Http) && !f.is_for(a, Proto::Https));
        for (addr, proto) in [(a, Proto::Http), (b, Proto::Https)] {
            let (mut cached, mut fresh) = (map(&[("forwarded", "x")]), map(&[("forwarded", "x")]));
            Forwarding::new(addr, proto).apply(&mut cached);
            set_forwarding_headers(&mut fresh, addr, proto);
            assert_eq!(cached, fresh);
        }
    }

    #[test]
    fn forwarding_headers_are_replaced_by_the_decided_address() {
        let mut h =
            map(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6"), ("x-forwarded-proto", "https")]);
        set_forwarding_headers(&mut h, "203.0.113.9".parse().unwrap(), Proto::Http);
        assert_eq!(h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["203.0.113.9"]);
        assert_eq!(h.get_all("forwarded").iter().collect::<Vec<_>>(), ["for=203.0.113.9;proto=http"]);
        assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), ["http"]);
        set_forwarding_headers(&mut h, "2001:db8::1".parse().unwrap(), Proto::Https);
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn proto_is_the_connection_s_unless_a_trusted_proxy_says_https() {
        let https = map(&[("x-forwarded-proto", "HTTPS")]);
        assert_eq!(Proto::decide(true, false, &HeaderMap::new()), Proto::Https);
        assert_eq!(Proto::decide(false, false, &https), Proto::Http, "an untrusted client's claim");
        assert_eq!(Proto::decide(false, true, &https), Proto::Https);
        assert_eq!(Proto::decide(false, true, &map(&[("x-forwarded-proto", "https, http")])), Proto::Http);
        let two = map(&[("x-forwarded-proto", "https"), ("x-forwarded-proto", "https")]);
        assert_eq!(Proto::decide(false, true, &two), Proto::Http);
        assert_eq!(Proto::decide(true, true, &map(&[("x-forwarded-proto", "http")])), Proto::Https);
    }

    #[test]
    fn the_key_is_removed_from_the_query() {
        let k = "x-api-key";
        assert_eq!(strip_key_param("a=1&b=2", k), None);
        assert_eq!(strip_key_param("", k), None);
        assert_eq!(strip_key_param("x-api-keys=1&x-api-ke=2", k), None);
        assert_eq!(strip_key_param("x-api-key=secret", k).as_deref(), Some(""));
        assert_eq!(strip_key_param("a=1&x-api-key=secret&b=2", k).as_deref(), Some("a=1&b=2"));
        assert_eq!(strip_key_param("x-api-key=s&a=%20+1;b", k).as_deref(), Some("a=%20+1;b"));
        assert_eq!(strip_key_param("a=1;X_API_KEY=s;b=2", k).as_deref(), Some("a=1;b=2"));
        for q in
            ["x%2dapi%2Dkey=s", "X-Api-Key=s", "x_api_key=s", "x-api-key", "x-api-key=", "%78-api-key=s&x-api-key=t"]
        {
            assert_eq!(strip_key_param(q, k).as_deref(), Some(""), "{q}");
        }
        assert_eq!(strip_key_param("x+api+key=s", k), None, "`+` is a space, not a dash");
        assert_eq!(strip_key_param("a=x-api-key", k), None, "a value is not a name");
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
