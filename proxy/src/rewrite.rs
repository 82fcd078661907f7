//! Pure header rewrites between the client and the application: hop-by-hop headers (both ways) and upgrade
//! detection.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The header naming the decided client to the application (`<namespace>/<name>`).
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("x-portcullis-client");

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
    for n in named {
        h.remove(n);
    }
    for n in [header::CONNECTION, header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::UPGRADE] {
        h.remove(n);
    }
    h.remove("keep-alive");
    let proxy: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for n in proxy {
        h.remove(n);
    }
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

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
