//! Check functions for the fuzz targets in `fuzz/` (`cargo +nightly fuzz run <target>`), compiled for tests and
//! with the `fuzzing` feature. Each takes the fuzzer's bytes and panics on a broken property; the replay tests
//! below run every checked-in corpus input through the same function on stable (`cargo test -p
//! portcullis-proxy --lib fuzzing`).

use crate::decision::client_addr::{Ambiguous, client_addr};
use crate::decision::path::{EscapedSlashes, normalize};
use crate::decision::path_reference::{app_view, model};
use crate::decision::{CidrSet, CompiledTable, Decision, PeerCert, RequestFacts, decide};
use crate::handle::{origin_target, single_header};
use crate::proxy_protocol::{self, Parsed};
use crate::rewrite::{PROXY_OWNED, scrub_client_headers, strip_key_param};
use arbitrary::{Arbitrary, Unstructured};
use governor::clock::FakeRelativeClock;
use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis_table::{
    CertIdentity, Client, KeyEntry, Period, Plan, Quota, QuotaScope, RouteScope, StoreFallback, Table, Throttle,
    key_digest,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

pub use portcullis_table::fuzzing::replay;

/// The trusted proxies the forwarding checks use.
const TRUSTED: &str = "127.0.0.10/32, 10.0.0.0/8, fd00::/8, ::ffff:192.0.2.0/120";
const PEERS: [&str; 6] = ["127.0.0.10", "10.1.2.3", "fd00::1", "::ffff:127.0.0.10", "127.0.0.1", "203.0.113.5"];

/// Header lines from the fuzzer's bytes: `\n`-separated; the first byte of a line picks the name
/// (`x` `X-Forwarded-For`, `f` `Forwarded`, `r` `X-Real-IP`, otherwise the line is `name:value`).
fn header_lines(data: &[u8], short: &[(u8, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&first, rest)) = line.split_first() else { continue };
        let (name, value) = match short.iter().find(|(c, _)| *c == first) {
            Some((_, n)) => (HeaderName::from_static(n), rest),
            None => {
                let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
                let Ok(n) = HeaderName::from_bytes(&line[..colon]) else { continue };
                (n, &line[colon + 1..])
            }
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(name, v);
        }
    }
    h
}

/// Every address written anywhere in `h` (with or without a port, in brackets, quoted, escaped), canonical: the
/// only addresses [`client_addr`] may return for a trusted peer with forwarding headers.
fn written_addresses(h: &HeaderMap) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for v in h.values() {
        let text: String = String::from_utf8_lossy(v.as_bytes()).replace('\\', "");
        for tok in text.split([',', ';', '=', ' ', '\t', '"']) {
            let bare = tok.trim_start_matches('[').split(']').next().unwrap_or("");
            for cand in [tok, bare] {
                if let Ok(ip) = cand.parse::<IpAddr>() {
                    out.push(ip.to_canonical());
                } else if let Ok(sa) = cand.parse::<SocketAddr>() {
                    out.push(sa.ip().to_canonical());
                }
            }
        }
    }
    out
}

/// `X-Forwarded-For` / `Forwarded` parsing and the client-address decision.
///
/// Input: one byte picking the socket peer, then header lines (see [`header_lines`]).
///
/// Properties: an untrusted peer is always the client, whatever the headers; a trusted peer without forwarding
/// headers is the client; otherwise the result is an address written in the headers, or a refusal; `X-Real-IP`
/// never changes anything; one more trusted hop appended on the right changes nothing (but the length cap).
pub fn forwarded(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let trusted = CidrSet::parse_list(TRUSTED).expect("valid list");
    let peer: IpAddr = PEERS[usize::from(pick) % PEERS.len()].parse().expect("valid address");
    let h = header_lines(rest, &[(b'x', "x-forwarded-for"), (b'f', "forwarded"), (b'r', "x-real-ip")]);
    let got = client_addr(peer, &h, &trusted);
    if !trusted.contains(peer.to_canonical()) {
        assert_eq!(got, Ok(peer.to_canonical()), "an untrusted peer was swayed");
        return;
    }
    let forwarding = h.contains_key("x-forwarded-for") || h.contains_key("forwarded");
    match got {
        Ok(ip) if !forwarding => assert_eq!(ip, peer.to_canonical()),
        Ok(ip) => {
            assert_eq!(ip, ip.to_canonical(), "not canonical");
            assert!(written_addresses(&h).contains(&ip), "{ip} is not written in {h:?}");
        }
        Err(_) => assert!(forwarding, "refused without forwarding headers"),
    }
    let mut without_real_ip = h.clone();
    without_real_ip.remove("x-real-ip");
    assert_eq!(client_addr(peer, &without_real_ip, &trusted), got, "X-Real-IP changed the result");
    let mut one_more = h.clone();
    if one_more.contains_key("x-forwarded-for") {
        one_more.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
    }
    if one_more.contains_key("forwarded") {
        one_more.append("forwarded", HeaderValue::from_static("for=10.0.0.1;proto=https"));
    }
    let again = client_addr(peer, &one_more, &trusted);
    assert!(
        again == got || again == Err(Ambiguous::TooLong),
        "a trusted hop on the right changed {got:?} to {again:?}"
    );
}

/// PROXY protocol v1/v2.
///
/// Properties: nothing panics; a header never claims more bytes than were given; every prefix of the input is
/// either "read more" or already the final answer (a header is decided by its own bytes only), and bytes after a
/// decided input change nothing; a v2 header built from the input's address round-trips.
pub fn proxy_protocol(data: &[u8]) {
    let full = proxy_protocol::parse(data);
    if let Ok(Parsed::Header(h)) = &full {
        assert!(h.len <= data.len() && h.len >= 8, "header length {} of {} bytes", h.len, data.len());
        assert_eq!(proxy_protocol::parse(&data[..h.len]), full, "the header depends on bytes after it");
    }
    let decided_at = match &full {
        Ok(Parsed::Header(h)) => h.len,
        _ => data.len(),
    };
    // The first and last 40 prefixes, and every 29th in between (a v2 header may be 2 KiB).
    let every = (0..decided_at).filter(|k| *k < 40 || *k + 40 >= decided_at || k % 29 == 0);
    for k in every {
        let p = proxy_protocol::parse(&data[..k]);
        assert!(p == Ok(Parsed::Incomplete) || p == full, "prefix of {k} bytes: {p:?}, all {}: {full:?}", data.len());
    }
    if full != Ok(Parsed::Incomplete) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(proxy_protocol::parse(&longer), full, "bytes after a decided input changed it");
    }
    // Round trip: a well-formed v2 PROXY header carrying an address from the input.
    if data.len() >= 18 {
        let mut hdr = proxy_protocol::V2_SIGNATURE.to_vec();
        let v6 = data[0] & 1 == 1;
        let tlvs = usize::from(data[1] % 32);
        let addrs = if v6 { 36 } else { 12 };
        hdr.extend_from_slice(&[0x21, if v6 { 0x21 } else { 0x11 }]);
        hdr.extend_from_slice(&u16::try_from(addrs + tlvs).expect("small").to_be_bytes());
        let mut block = vec![0u8; addrs + tlvs];
        for (b, d) in block.iter_mut().zip(data[2..].iter().cycle()) {
            *b = *d;
        }
        hdr.extend_from_slice(&block);
        let want = if v6 {
            let ip: [u8; 16] = block[..16].try_into().expect("16 bytes");
            SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes([block[32], block[33]]))
        } else {
            let ip: [u8; 4] = block[..4].try_into().expect("4 bytes");
            SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes([block[8], block[9]]))
        };
        let len = hdr.len();
        hdr.extend_from_slice(&data[2..]);
        match proxy_protocol::parse(&hdr) {
            Ok(Parsed::Header(h)) => {
                assert_eq!(h.len, len);
                assert_eq!(h.source, Some(want));
            }
            other => panic!("a well-formed v2 header: {other:?}"),
        }
    }
}

/// Path normalisation, against the reference model.
///
/// Input: one byte picking [`EscapedSlashes`] (bit 0) and a route prefix, then the path (UTF-8).
///
/// Properties: the single-pass normaliser accepts exactly what the reference model accepts, with the same result;
/// the result is idempotent and in normal form; and with escaped slashes refused, whenever a route prefix admits
/// the normalised path, a lenient application's reading of that path (decode every escape, split on `/` and `\`,
/// drop `;` parameters, resolve dot segments) is under the prefix too: never a path outside the decided prefix.
pub fn path(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(p) = std::str::from_utf8(rest) else { return };
    let slashes = if flags & 1 == 0 { EscapedSlashes::Reject } else { EscapedSlashes::Keep };
    let got = normalize(p, slashes);
    let want = model(p, slashes);
    assert_eq!(got.as_deref().ok(), want.as_deref().ok(), "normalize and the model disagree on {p:?}");
    let Ok(norm) = got else { return };
    assert!(norm.starts_with('/') && !norm.contains("//") && !norm.contains('\\'), "not normal: {norm:?}");
    assert!(norm.split('/').all(|s| s != "." && s != ".."), "dot segment left in {norm:?}");
    assert_eq!(normalize(&norm, slashes).as_deref(), Ok(norm.as_ref()), "not idempotent: {p:?}");
    // The prefix property is about real request targets: the path the proxy reads from a parsed URI (no `?`, no
    // `#`, no controls or spaces).
    let real = http::uri::PathAndQuery::try_from(p).is_ok_and(|pq| pq.path() == p);
    if slashes == EscapedSlashes::Keep || !real {
        return;
    }
    let first_seg = norm.split('/').nth(1).unwrap_or("");
    let first_two: String = norm.split('/').take(3).collect::<Vec<_>>().join("/");
    let picked = ["/v1", "/v1/admin", "/admin", "/"][usize::from(flags >> 1) % 4];
    let app = app_view(&norm);
    for prefix in [picked.to_string(), format!("/{first_seg}"), first_two] {
        let scope = RouteScope { path_prefix: prefix.clone(), methods: vec![] };
        if !scope.matches("GET", &norm) {
            continue;
        }
        // The prefix read the same lenient way (a prefix taken from the path may carry `;` parameters too).
        let want = app_view(&prefix);
        assert!(
            app.len() >= want.len() && app.iter().zip(&want).all(|(a, b)| a == b),
            "{p:?} → {norm:?} is admitted by {prefix:?} but a lenient application reads {app:?}"
        );
    }
}

/// The key header's name in the key-handling checks.
const KEY_HEADER: &str = "x-api-key";

/// A query parameter's name as a lenient application reads it: percent-decoded once (bytes), `+` as a space,
/// lower case, `_` as `-`.
fn app_param_name(piece: &str) -> Vec<u8> {
    let name = piece.split('=').next().unwrap_or("").as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < name.len() {
        let hex = name.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (name[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok().filter(|_| !h.starts_with('+')))) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out.iter().map(|&c| if c == b'_' { b'-' } else { c.to_ascii_lowercase() }).collect()
}

/// How the proxy handles the API key: the key header's value (sent exactly once, or not at all), the headers the
/// application never sees, and the key query parameter removed from the target.
///
/// Input: one flag byte (bit 0: `--allow-underscore-headers`), a query string line, then header lines (`k` is the
/// key header, otherwise `name:value`).
///
/// Properties: the key is the value of the single key header line, `None` when absent or repeated; after scrubbing
/// no header the application could read as the key header or a proxy-owned one is left (underscores read as
/// dashes), and every other header is untouched; the query handed on has no parameter a lenient application reads
/// as the key, and keeps every other parameter in order, byte for byte.
pub fn key_header(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let allow_underscores = flags & 1 == 1;
    let mut lines = rest.splitn(2, |&b| b == b'\n');
    let query = lines.next().and_then(|q| std::str::from_utf8(q).ok()).unwrap_or("");
    let h = header_lines(lines.next().unwrap_or(b""), &[(b'k', KEY_HEADER)]);
    let key_name = HeaderName::from_static(KEY_HEADER);

    let sent: Vec<&HeaderValue> = h.get_all(&key_name).iter().collect();
    let want = match sent[..] {
        [v] => Some(v.as_bytes()),
        _ => None,
    };
    assert_eq!(single_header(&h, &key_name), want);

    let mut scrubbed = h.clone();
    scrub_client_headers(&mut scrubbed, &key_name, allow_underscores);
    let dashed = |n: &str| n.replace('_', "-");
    for name in scrubbed.keys() {
        let n = dashed(name.as_str());
        assert!(n != KEY_HEADER && !PROXY_OWNED.contains(&n.as_str()), "{name} reaches the application");
        assert!(allow_underscores || !name.as_str().contains('_'), "{name} reaches the application");
    }
    for (name, v) in &h {
        let n = dashed(name.as_str());
        let dropped =
            n == KEY_HEADER || PROXY_OWNED.contains(&n.as_str()) || !allow_underscores && name.as_str().contains('_');
        if !dropped {
            assert!(scrubbed.get_all(name).iter().any(|s| s == v), "{name} was dropped");
        }
    }

    // Empty pieces (`a&&b`) are not parameters: whether a separator survives around them does not matter.
    let pieces =
        |q: &str| -> Vec<String> { q.split(['&', ';']).filter(|p| !p.is_empty()).map(str::to_string).collect() };
    let is_key = |p: &str| app_param_name(p) == KEY_HEADER.as_bytes();
    let kept: Vec<String> = pieces(query).into_iter().filter(|p| !is_key(p)).collect();
    match strip_key_param(query, KEY_HEADER) {
        None => assert!(!pieces(query).iter().any(|p| is_key(p)), "key parameter kept in {query:?}"),
        Some(out) => {
            assert_eq!(pieces(&out), kept, "{query:?} → {out:?}");
            assert_eq!(strip_key_param(&out, KEY_HEADER), None, "stripping twice changed {out:?}");
        }
    }
    // The same through the target the application receives.
    let Ok(uri) = format!("/v1?{query}").parse::<http::Uri>() else { return };
    if let Ok(target) = origin_target(&uri, EscapedSlashes::Reject, KEY_HEADER) {
        let q = target.query().unwrap_or("");
        assert!(!pieces(q).iter().any(|p| is_key(p)), "{uri} → {target}: key parameter handed on");
    }
}

/// Bounded choices for the structured table target.
const SERVICES: [&str; 3] = ["shop/orders", "a/b", "team-a/svc"];
const PREFIXES: [&str; 6] = ["/", "/v1", "/v1/", "/v1/admin", "/admin", "/a;b"];
const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "get"];
const RANGES: [&str; 6] = ["10.0.0.0/8", "192.0.2.0/24", "0.0.0.0/0", "::/0", "2001:db8::/32", "203.0.113.7/32"];
const ADDRS: [&str; 5] = ["10.1.2.3", "192.0.2.9", "203.0.113.7", "2001:db8::1", "198.51.100.1"];
const PATHS: [&str; 6] = ["/", "/v1", "/v1/x", "/v1/admin/y", "/admin", "/v10"];

fn pick<'a, T: Copy>(u: &mut Unstructured<'a>, from: &[T]) -> arbitrary::Result<T> {
    u.choose(from).copied()
}

fn small_string(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    let s = String::arbitrary(u)?;
    Ok(s.chars().take(24).collect())
}

fn plan(u: &mut Unstructured<'_>) -> arbitrary::Result<Plan> {
    let throttle = if u.arbitrary()? {
        Some(Throttle {
            rate: u.int_in_range(0..=50)?,
            per_millis: u.int_in_range(0..=60_000)?,
            burst: u.int_in_range(0..=5)?,
        })
    } else {
        None
    };
    let quota = if u.arbitrary()? {
        Some(Quota { limit: u.int_in_range(0..=3)?, period: pick(u, &[Period::Day, Period::Week, Period::Month])? })
    } else {
        None
    };
    let mut routes = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let path_prefix = if u.ratio(1, 8)? { small_string(u)? } else { pick(u, &PREFIXES)?.to_string() };
        let methods =
            (0..u.int_in_range(0..=2)?).map(|_| pick(u, &METHODS).map(str::to_string)).collect::<Result<_, _>>()?;
        routes.push(RouteScope { path_prefix, methods });
    }
    Ok(Plan {
        throttle,
        quota,
        global_limits: u.ratio(1, 8)?,
        quota_scope: pick(u, &[QuotaScope::Global, QuotaScope::Local])?,
        on_store_unavailable: pick(u, &[StoreFallback::Local, StoreFallback::FailOpen, StoreFallback::FailClosed])?,
        routes,
    })
}

fn identity(u: &mut Unstructured<'_>) -> arbitrary::Result<CertIdentity> {
    Ok(match u.int_in_range(0..=3)? {
        0 => CertIdentity::Subject(small_string(u)?),
        1 => CertIdentity::SanDns(pick(u, &["a.example", "b.example", "A.example"])?.to_string()),
        2 => CertIdentity::SanUri(small_string(u)?),
        _ => CertIdentity::Sha256(key_digest(&[u8::arbitrary(u)?]).to_hex()),
    })
}

/// A random table from random ApiClients and UsagePlans: bounded counts, names and values from small sets (so
/// keys, ranges and routes meet the requests), the odd arbitrary string (so escaping and validation are reached).
pub fn arbitrary_table(u: &mut Unstructured<'_>) -> arbitrary::Result<Table> {
    let service = if u.ratio(1, 16)? { small_string(u)? } else { pick(u, &SERVICES)?.to_string() };
    if u.ratio(1, 8)? {
        return Ok(Table::deny_all(service, small_string(u)?));
    }
    let mut plans = BTreeMap::new();
    for i in 0..u.int_in_range(0..=3)? {
        plans.insert(format!("plan-{i}"), plan(u)?);
    }
    let mut clients = Vec::new();
    for i in 0..u.int_in_range(0..=6)? {
        let id = if u.ratio(1, 16)? { small_string(u)? } else { format!("team/client-{i}") };
        let keys = (0..u.int_in_range(0..=2)?)
            .map(|k| {
                let expires_at = if u.ratio(1, 4)? {
                    Some(
                        jiff::Timestamp::from_second(u.int_in_range(1_700_000_000..=1_900_000_000)?).expect("in range"),
                    )
                } else {
                    None
                };
                Ok(KeyEntry { sha256: key_digest(format!("key-{i}-{k}").as_bytes()), expires_at })
            })
            .collect::<arbitrary::Result<_>>()?;
        let source_ranges = (0..u.int_in_range(0..=2)?)
            .map(|_| Ok(pick(u, &RANGES)?.parse().expect("valid range")))
            .collect::<arbitrary::Result<_>>()?;
        let names: Vec<String> = plans.keys().cloned().collect();
        let mut client_plans = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            client_plans.push(if names.is_empty() || u.ratio(1, 16)? {
                "missing".to_string()
            } else {
                u.choose(&names)?.clone()
            });
        }
        let certificates = (0..u.int_in_range(0..=1)?).map(|_| identity(u)).collect::<arbitrary::Result<_>>()?;
        clients.push(Client {
            id,
            keys,
            source_ranges,
            disabled: u.ratio(1, 8)?,
            plans: client_plans,
            certificates,
            require_certificate: u.ratio(1, 8)?,
        });
    }
    Ok(Table::new(service, plans, clients))
}

/// The structured target: render a random table to an index and shards and read it back (decode(render(x)) ==
/// x, through the table file format too), then compile it and decide random requests against it: `decide` never
/// panics, and an allowed request really has a key of an enabled client, from an allowed source, on an admitted
/// route.
pub fn table_decide(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(table) = arbitrary_table(&mut u) else { return };
    if table.validate("fuzz").is_err() {
        // Never rendered: `render` refuses what does not validate (a deny-all one), or the index does not parse.
        return;
    }
    assert_eq!(Table::from_json(&table.to_json(), "fuzz").as_ref(), Ok(&table), "table file round trip");
    let max_bytes = u.int_in_range(300..=4000).unwrap_or(4000);
    portcullis_table::fuzzing::round_trip(&table, max_bytes, u.arbitrary().unwrap_or(false));

    let clock = FakeRelativeClock::default();
    let Ok(compiled) = CompiledTable::compile(&table, None, clock.clone()) else { return };
    for _ in 0..u.int_in_range(1..=8).unwrap_or(1) {
        let Ok(req) = request(&mut u) else { break };
        let cert = req.cert.map(|identities| PeerCert { identities });
        let facts = RequestFacts {
            addr: req.addr,
            method: req.method,
            path: &req.path,
            key: req.key.as_deref(),
            digest: None,
            cert: cert.as_ref(),
            now: req.now,
        };
        if let Decision::Allow { client, plan } = decide(Some(&compiled), &facts) {
            let c = table.clients.iter().find(|c| c.id == client.id).expect("allowed client is in the table");
            assert!(!c.disabled);
            let by_key = facts.key.filter(|k| !k.is_empty()).map(key_digest);
            match by_key {
                Some(d) => {
                    let k = c.keys.iter().find(|k| k.sha256 == d).expect("allowed with another client's key");
                    assert!(k.expires_at.is_none_or(|e| facts.now < e), "allowed with an expired key");
                }
                None => assert!(cert.is_some(), "allowed without key or certificate"),
            }
            assert!(c.source_ranges.iter().any(|r| r.contains(&req.addr)), "{} allowed from {}", c.id, req.addr);
            let routes = &table.plans[&plan.spec.name].routes;
            assert!(routes.is_empty() || routes.iter().any(|r| r.matches(facts.method, facts.path)));
        }
        clock.advance(std::time::Duration::from_millis(u.int_in_range(0..=2000).unwrap_or(0)));
    }
}

struct Request {
    addr: IpAddr,
    method: &'static str,
    path: String,
    key: Option<Vec<u8>>,
    cert: Option<Vec<CertIdentity>>,
    now: jiff::Timestamp,
}

fn request(u: &mut Unstructured<'_>) -> arbitrary::Result<Request> {
    let key = match u.int_in_range(0..=3)? {
        0 => None,
        1 => Some(Vec::<u8>::arbitrary(u)?),
        _ => Some(format!("key-{}-{}", u.int_in_range(0..=6)?, u.int_in_range(0..=2)?).into_bytes()),
    };
    let cert = if u.ratio(1, 4)? { Some(vec![identity(u)?]) } else { None };
    Ok(Request {
        addr: pick(u, &ADDRS)?.parse().expect("valid address"),
        method: pick(u, &METHODS)?,
        path: if u.ratio(1, 8)? { small_string(u)? } else { pick(u, &PATHS)?.to_string() },
        key,
        cert,
        now: jiff::Timestamp::from_second(u.int_in_range(1_600_000_000..=2_000_000_000)?).expect("in range"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every checked-in input of each fuzz target still passes its check: the regression tests for what the
    /// fuzzers found, and a smoke test of the checks themselves.
    #[test]
    fn fuzz_corpora_replay() {
        for (target, check) in [
            ("forwarded", forwarded as fn(&[u8])),
            ("proxy_protocol", proxy_protocol),
            ("path", path),
            ("key_header", key_header),
            ("table_decide", table_decide),
        ] {
            assert!(replay(target, check) > 0, "{target}");
        }
    }
}
