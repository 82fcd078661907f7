//! The decision for one request: key (or, without a key, the verified client certificate) → client → key expiry /
//! certificate required / disabled → source range → route → throttle → quota. [`RequestFacts`] in, [`Decision`]
//! out.

use super::certs::PeerCert;
use super::compiled::{CompiledClient, CompiledPlan, CompiledTable, KeyRef};
use super::quota::period_secs;
use super::reason::Reason;
use super::throttle::{retry_after_secs, window_secs};
use governor::clock::{Clock, DefaultClock};
use jiff::Timestamp;
use portcullis_table::{KeyDigest, Quota, Throttle, key_digest};
use std::net::IpAddr;
use std::time::Duration;

/// What the decision needs from a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub addr: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    /// The key header's value; `None` when absent or sent more than once.
    pub key: Option<&'a [u8]>,
    /// `key_digest(key)`, when the caller has it already (a connection's previous request sent the same key);
    /// `None`: computed here.
    pub digest: Option<KeyDigest>,
    /// The connection's verified client certificate (TLS with `--client-ca`), if one was presented.
    pub cert: Option<&'a PeerCert>,
    pub now: Timestamp,
}

/// `RateLimit-Policy` / `RateLimit` values (draft-ietf-httpapi-ratelimit-headers) for a 429.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub policy: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    pub retry_after: Option<u64>,
    pub rate_limit: Option<RateLimitHeaders>,
}

impl From<Reason> for Denial {
    fn from(reason: Reason) -> Self {
        Self { reason, retry_after: None, rate_limit: None }
    }
}

pub enum Decision<'t, C: Clock = DefaultClock> {
    Allow {
        client: &'t CompiledClient<C>,
        plan: &'t CompiledPlan<C>,
    },
    /// Refused before a client was identified (no table, a missing or unknown key).
    Deny(Denial),
    /// Refused for a client the key (or certificate) identified: expired key, missing certificate, disabled client,
    /// source address, route, rate or quota. The client is named in the access log and per-client metrics.
    Refuse {
        client: &'t CompiledClient<C>,
        denial: Denial,
    },
}

impl<C: Clock> Decision<'_, C> {
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Deny(d) | Decision::Refuse { denial: d, .. } => Some(d.reason),
        }
    }
}

/// Decides a request against the current table (`None`: no table has loaded yet → fail closed).
pub fn decide<'t, C: Clock + Clone>(table: Option<&'t CompiledTable<C>>, req: &RequestFacts<'_>) -> Decision<'t, C> {
    let Some(table) = table else { return Decision::Deny(Reason::NoTable.into()) };
    let deny = |r: Reason| Decision::Deny(r.into());
    if table.deny_all.is_some() {
        return deny(Reason::ServiceNotGranted);
    }
    match req.key.filter(|k| !k.is_empty()) {
        Some(key) => match table.lookup(&req.digest.unwrap_or_else(|| key_digest(key))) {
            Some((client, key_ref)) => decide_identified(table, client, Some(key_ref), req),
            None => deny(Reason::InvalidKey),
        },
        // No key: a certificate naming exactly one client identifies it; anything else reads as a missing key.
        None => match req.cert.and_then(|c| table.lookup_cert(c)) {
            Some((_, client)) => decide_identified(table, client, None, req),
            None => deny(Reason::InvalidKey),
        },
    }
}

/// The rest of [`decide`] once `client` is identified: by the key `key` refers to, or (`None`) by the connection's
/// certificate. `kubectl portcullis check` starts here, with a key of the client's from the live table (it never
/// holds the raw key).
#[inline]
pub fn decide_identified<'t, C: Clock + Clone>(
    table: &'t CompiledTable<C>,
    client: &'t CompiledClient<C>,
    key: Option<KeyRef>,
    req: &RequestFacts<'_>,
) -> Decision<'t, C> {
    let refuse = |denial: Denial| Decision::Refuse { client, denial };
    if let Some(key_ref) = key {
        if key_ref.expires_at.is_some_and(|exp| req.now >= exp) {
            return refuse(Reason::KeyExpired.into());
        }
        if client.require_certificate && !req.cert.is_some_and(|c| table.cert_matches(c, key_ref.client)) {
            return refuse(Reason::CertificateRequired.into());
        }
    }
    if client.disabled {
        return refuse(Reason::ClientDisabled.into());
    }
    if !client.sources.contains(req.addr) {
        return refuse(Reason::SourceNotAllowed.into());
    }
    let Some(plan) = client.plans().find(|p| super::route::admits(&p.spec.routes, req.method, req.path)) else {
        return refuse(Reason::RouteNotAllowed.into());
    };
    // With a shared store, global counts are taken after the decision (crate::global), not here.
    let local_throttle = !(table.store_counts && plan.spec.global_throttle);
    let local_quota = !(table.store_counts && plan.spec.global_quota);
    if let Some(q) = plan.quota.as_ref().filter(|_| local_quota) {
        q.prefetch();
    }
    if let Some(t) = plan.throttle.as_ref().filter(|_| local_throttle)
        && let Err(wait) = t.check()
    {
        return refuse(rate_limited(&t.spec, wait));
    }
    if let Some(q) = plan.quota.as_ref().filter(|_| local_quota) {
        let now = req.now.as_second();
        if let Err(e) = q.try_acquire(now) {
            return refuse(quota_exceeded(&q.spec, now, e.resets_at));
        }
    }
    Decision::Allow { client, plan }
}

/// The refusal of a request over `spec`'s throttle, `wait` before the next one would pass.
pub fn rate_limited(spec: &Throttle, wait: Duration) -> Denial {
    let secs = retry_after_secs(wait);
    Denial {
        reason: Reason::RateLimited,
        retry_after: Some(secs),
        rate_limit: Some(RateLimitHeaders {
            policy: format!("\"burst\";q={};w={}", spec.burst, window_secs(spec)),
            state: format!("\"burst\";r=0;t={secs}"),
        }),
    }
}

/// The refusal of a request over `spec`'s quota, whose period ends at `resets_at` (Unix seconds).
pub fn quota_exceeded(spec: &Quota, now: i64, resets_at: i64) -> Denial {
    let secs = (resets_at - now).max(1) as u64;
    Denial {
        reason: Reason::QuotaExceeded,
        retry_after: Some(secs),
        rate_limit: Some(RateLimitHeaders {
            policy: format!("\"quota\";q={};w={}", spec.limit, period_secs(spec.period)),
            state: format!("\"quota\";r=0;t={secs}"),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use portcullis_table::{CertIdentity, Client, Period, Plan, Quota, RouteScope, Table, Throttle};
    use std::collections::BTreeMap;
    use std::time::Duration;

    pub fn table() -> Table {
        let mut plans = BTreeMap::new();
        plans.insert(
            "read".to_string(),
            Plan {
                throttle: Some(Throttle { rate: 10, per_millis: 1000, burst: 2 }),
                routes: vec![RouteScope { path_prefix: "/v1".into(), methods: vec!["GET".into()] }],
                ..Default::default()
            },
        );
        plans.insert(
            "small".to_string(),
            Plan { quota: Some(Quota { limit: 2, period: Period::Day }), ..Default::default() },
        );
        plans.insert("open".to_string(), Plan::default());
        let client = |id: &str, key: &[u8], cidr: &str, plans: &[&str]| {
            Client::builder(id).key(key).source(cidr).plans(plans).build()
        };
        let mut expired = client("ns/expired", b"k-exp", "127.0.0.0/8", &["small"]);
        expired.keys[0].expires_at = Some("2020-01-01T00:00:00Z".parse().unwrap());
        let mut disabled = client("ns/disabled", b"k-dis", "127.0.0.0/8", &["small"]);
        disabled.disabled = true;
        let mut by_cert = client("ns/by-cert", b"k-cert", "127.0.0.0/8", &["open"]);
        by_cert.keys.clear();
        by_cert.certificates = vec![CertIdentity::SanDns("a.example".into()), CertIdentity::Subject("A".into())];
        let mut strict = client("ns/strict", b"k-strict", "127.0.0.0/8", &["open"]);
        strict.require_certificate = true;
        strict.certificates = vec![CertIdentity::SanUri("spiffe://td/strict".into())];
        Table::new(
            "ns/svc",
            plans,
            vec![
                client("ns/reader", b"k-read", "127.0.0.1/32", &["read"]),
                client("ns/quota", b"k-quota", "::1/128", &["small"]),
                expired,
                disabled,
                by_cert,
                strict,
            ],
        )
    }

    fn facts<'a>(key: Option<&'a [u8]>, addr: &str, method: &'a str, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            addr: addr.parse().unwrap(),
            method,
            path,
            key,
            digest: None,
            cert: None,
            now: "2026-02-18T12:00:00Z".parse().unwrap(),
        }
    }

    fn cert(ids: &[CertIdentity]) -> PeerCert {
        PeerCert { identities: ids.to_vec() }
    }

    fn allowed_id<C: Clock>(d: Decision<'_, C>) -> Result<String, Reason> {
        match d {
            Decision::Allow { client, .. } => Ok(client.id.clone()),
            Decision::Deny(d) | Decision::Refuse { denial: d, .. } => Err(d.reason),
        }
    }

    #[test]
    fn certificates_identify_and_combine_with_keys() {
        let t = CompiledTable::compile(&table(), None, FakeRelativeClock::default()).unwrap();
        let t = Some(&t);
        let a_dns = cert(&[CertIdentity::Subject("other".into()), CertIdentity::SanDns("a.example".into())]);
        let a_both = cert(&[CertIdentity::Subject("A".into()), CertIdentity::SanDns("a.example".into())]);
        let strict = cert(&[CertIdentity::SanUri("spiffe://td/strict".into())]);
        let unknown = cert(&[CertIdentity::Sha256("00".repeat(32))]);
        let ambiguous =
            cert(&[CertIdentity::SanDns("a.example".into()), CertIdentity::SanUri("spiffe://td/strict".into())]);
        let with = |key: Option<&'static [u8]>, c: &'static PeerCert| RequestFacts {
            cert: Some(c),
            ..facts(key, "127.0.0.1", "GET", "/")
        };
        let leak = |c: PeerCert| -> &'static PeerCert { Box::leak(Box::new(c)) };
        let (a_dns, a_both, strict, unknown, ambiguous) =
            (leak(a_dns), leak(a_both), leak(strict), leak(unknown), leak(ambiguous));

        // Certificate alone.
        assert_eq!(allowed_id(decide(t, &with(None, a_dns))), Ok("ns/by-cert".into()));
        assert_eq!(allowed_id(decide(t, &with(None, a_both))), Ok("ns/by-cert".into()), "two identities, one client");
        assert_eq!(allowed_id(decide(t, &with(None, unknown))), Err(Reason::InvalidKey));
        assert_eq!(allowed_id(decide(t, &with(None, ambiguous))), Err(Reason::InvalidKey), "names two clients");
        assert_eq!(allowed_id(decide(t, &facts(None, "127.0.0.1", "GET", "/"))), Err(Reason::InvalidKey));
        // A certificate-only client still goes through source ranges.
        let far = RequestFacts { cert: Some(a_dns), ..facts(None, "10.0.0.1", "GET", "/") };
        assert_eq!(allowed_id(decide(t, &far)), Err(Reason::SourceNotAllowed));
        // A key wins over the certificate; a bad key is not rescued by a good certificate.
        let read = RequestFacts { cert: Some(a_dns), ..facts(Some(b"k-read"), "127.0.0.1", "GET", "/v1") };
        assert_eq!(allowed_id(decide(t, &read)), Ok("ns/reader".into()));
        assert_eq!(allowed_id(decide(t, &with(Some(b"nope"), a_dns))), Err(Reason::InvalidKey));
        // requireCertificate: key + matching certificate, nothing less.
        assert_eq!(
            allowed_id(decide(t, &facts(Some(b"k-strict"), "127.0.0.1", "GET", "/"))),
            Err(Reason::CertificateRequired)
        );
        assert_eq!(allowed_id(decide(t, &with(Some(b"k-strict"), a_dns))), Err(Reason::CertificateRequired));
        assert_eq!(allowed_id(decide(t, &with(Some(b"k-strict"), strict))), Ok("ns/strict".into()));
        assert_eq!(allowed_id(decide(t, &with(Some(b"k-strict"), ambiguous))), Ok("ns/strict".into()));
        assert_eq!(allowed_id(decide(t, &with(None, strict))), Ok("ns/strict".into()), "its certificate alone");
        assert_eq!(Reason::CertificateRequired.status(), 403);
    }

    #[test]
    fn a_digest_from_the_caller_decides_as_the_key_does() {
        let (a, b) = (table(), table());
        let ta = CompiledTable::compile(&a, None, FakeRelativeClock::default()).unwrap();
        let tb = CompiledTable::compile(&b, None, FakeRelativeClock::default()).unwrap();
        let keys: [&[u8]; 6] = [b"k-read", b"k-quota", b"k-exp", b"k-dis", b"k-strict", b"unknown"];
        for _ in 0..3 {
            for key in keys {
                for (addr, method, path) in [("127.0.0.1", "GET", "/v1/x"), ("10.0.0.1", "POST", "/v1")] {
                    let raw = facts(Some(key), addr, method, path);
                    let memo = RequestFacts { digest: Some(key_digest(key)), ..facts(Some(key), addr, method, path) };
                    let (x, y) = (allowed_id(decide(Some(&ta), &raw)), allowed_id(decide(Some(&tb), &memo)));
                    assert_eq!(x, y, "{key:?} {addr} {method} {path}");
                }
            }
        }
    }

    #[test]
    fn deciding_for_an_identified_client_is_decide_after_the_key_lookup() {
        // Two tables, so throttle state is not shared between the two ways of asking.
        let (a, b) = (table(), table());
        let ta = CompiledTable::compile(&a, None, FakeRelativeClock::default()).unwrap();
        let tb = CompiledTable::compile(&b, None, FakeRelativeClock::default()).unwrap();
        let keys: [&[u8]; 5] = [b"k-read", b"k-quota", b"k-exp", b"k-dis", b"k-strict"];
        let requests = [
            ("127.0.0.1", "GET", "/v1/x"),
            ("::1", "GET", "/"),
            ("10.0.0.1", "POST", "/v1"),
            ("127.0.0.1", "GET", "/v2"),
        ];
        for _ in 0..3 {
            for key in keys {
                for (addr, method, path) in requests {
                    let req = facts(Some(key), addr, method, path);
                    let (client, key_ref) = tb.lookup(&key_digest(key)).unwrap();
                    assert_eq!(
                        allowed_id(decide(Some(&ta), &req)),
                        allowed_id(decide_identified(&tb, client, Some(key_ref), &req)),
                        "{key:?} {addr} {method} {path}"
                    );
                }
            }
        }
    }

    fn reason<C: Clock>(d: Decision<'_, C>) -> Option<Reason> {
        d.reason()
    }

    #[test]
    fn with_a_store_global_counts_are_left_to_the_store_stage() {
        let mut tbl = table();
        let read = tbl.plans.get_mut("read").unwrap();
        read.global_limits = true; // throttle burst 2: global
        let small = tbl.plans.get_mut("small").unwrap();
        small.quota_scope = portcullis_table::QuotaScope::Global; // quota 2 a day: global (the default)
        let tbl = Table::new(tbl.service.clone(), tbl.plans, tbl.clients);
        let read = facts(Some(b"k-read"), "127.0.0.1", "GET", "/v1/x");
        let quota = facts(Some(b"k-quota"), "::1", "GET", "/");
        // Without a store: counted here, as before.
        let local = CompiledTable::compile(&tbl, None, FakeRelativeClock::default()).unwrap();
        assert_eq!(local.global_plans, 2);
        let refused = (0..5).filter(|_| decide(Some(&local), &read).reason().is_some()).count();
        assert_eq!(refused, 3);
        assert_eq!((0..5).filter(|_| decide(Some(&local), &quota).reason().is_some()).count(), 3);
        // With one: never refused here; the plan says what the store stage must count.
        let mut shared = CompiledTable::compile(&tbl, None, FakeRelativeClock::default()).unwrap();
        shared.store_counts = true;
        for _ in 0..5 {
            match decide(Some(&shared), &read) {
                Decision::Allow { plan, .. } => assert!(plan.spec.global_throttle && !plan.spec.global_quota),
                d => panic!("{:?}", d.reason()),
            }
            match decide(Some(&shared), &quota) {
                Decision::Allow { plan, .. } => assert!(plan.spec.global_quota && !plan.spec.global_throttle),
                d => panic!("{:?}", d.reason()),
            }
        }
    }

    #[test]
    fn every_outcome() {
        let clock = FakeRelativeClock::default();
        let t = CompiledTable::compile(&table(), None, clock.clone()).unwrap();
        let t = Some(&t);
        let ok = facts(Some(b"k-read"), "127.0.0.1", "GET", "/v1/x");
        match decide(t, &ok) {
            Decision::Allow { client, plan } => {
                assert_eq!(client.id, "ns/reader");
                assert_eq!(plan.spec.name, "read");
            }
            d => panic!("{:?}", d.reason()),
        }
        assert_eq!(reason(decide(t, &facts(None, "127.0.0.1", "GET", "/v1"))), Some(Reason::InvalidKey));
        assert_eq!(reason(decide(t, &facts(Some(b""), "127.0.0.1", "GET", "/v1"))), Some(Reason::InvalidKey));
        assert_eq!(reason(decide(t, &facts(Some(b"zzz"), "127.0.0.1", "GET", "/v1"))), Some(Reason::InvalidKey));
        assert_eq!(reason(decide(t, &facts(Some(b"k-exp"), "127.0.0.1", "GET", "/"))), Some(Reason::KeyExpired));
        assert_eq!(reason(decide(t, &facts(Some(b"k-dis"), "127.0.0.1", "GET", "/"))), Some(Reason::ClientDisabled));
        assert_eq!(
            reason(decide(t, &facts(Some(b"k-read"), "127.0.0.2", "GET", "/v1"))),
            Some(Reason::SourceNotAllowed)
        );
        assert_eq!(
            reason(decide(t, &facts(Some(b"k-read"), "::ffff:127.0.0.1", "GET", "/v1"))),
            None,
            "mapped address normalised"
        );
        assert_eq!(
            reason(decide(t, &facts(Some(b"k-read"), "127.0.0.1", "POST", "/v1"))),
            Some(Reason::RouteNotAllowed)
        );
        // Burst 2: both used above (the first request and the mapped-address one); the next is limited.
        match decide(t, &ok) {
            Decision::Refuse { client, denial: d } => {
                assert_eq!(client.id, "ns/reader", "a refusal names the identified client");
                assert_eq!(d.reason, Reason::RateLimited);
                assert_eq!(d.retry_after, Some(1));
                let rl = d.rate_limit.unwrap();
                assert_eq!(rl.policy, "\"burst\";q=2;w=1");
                assert_eq!(rl.state, "\"burst\";r=0;t=1");
            }
            _ => panic!("should be limited"),
        }
        clock.advance(Duration::from_millis(100));
        assert_eq!(reason(decide(t, &ok)), None);

        let q = facts(Some(b"k-quota"), "::1", "DELETE", "/anything");
        assert_eq!(reason(decide(t, &q)), None);
        assert_eq!(reason(decide(t, &q)), None);
        match decide(t, &q) {
            Decision::Refuse { denial: d, .. } => {
                assert_eq!(d.reason, Reason::QuotaExceeded);
                assert_eq!(d.retry_after, Some(12 * 3600));
                assert_eq!(d.rate_limit.unwrap().policy, "\"quota\";q=2;w=86400");
            }
            _ => panic!("should be over quota"),
        }
        let none: Option<&CompiledTable<FakeRelativeClock>> = None;
        assert_eq!(reason(decide(none, &ok)), Some(Reason::NoTable));
    }

    #[test]
    fn refusals_name_the_client_only_once_one_was_identified() {
        let t = CompiledTable::compile(&table(), None, FakeRelativeClock::default()).unwrap();
        let who =
            |key: Option<&[u8]>, addr: &str, method: &str| match decide(Some(&t), &facts(key, addr, method, "/v1")) {
                Decision::Refuse { client, denial } => (Some(client.id.clone()), denial.reason),
                Decision::Deny(d) => (None, d.reason),
                Decision::Allow { .. } => panic!("allowed"),
            };
        assert_eq!(who(None, "127.0.0.1", "GET"), (None, Reason::InvalidKey));
        assert_eq!(who(Some(b"nope"), "127.0.0.1", "GET"), (None, Reason::InvalidKey));
        assert_eq!(who(Some(b"k-exp"), "127.0.0.1", "GET"), (Some("ns/expired".into()), Reason::KeyExpired));
        assert_eq!(who(Some(b"k-dis"), "127.0.0.1", "GET"), (Some("ns/disabled".into()), Reason::ClientDisabled));
        assert_eq!(who(Some(b"k-strict"), "127.0.0.1", "GET"), (Some("ns/strict".into()), Reason::CertificateRequired));
        assert_eq!(who(Some(b"k-read"), "127.0.0.9", "GET"), (Some("ns/reader".into()), Reason::SourceNotAllowed));
        assert_eq!(who(Some(b"k-read"), "127.0.0.1", "PUT"), (Some("ns/reader".into()), Reason::RouteNotAllowed));
    }

    #[test]
    fn unknown_keys_create_no_state() {
        let t = CompiledTable::compile(&table(), None, FakeRelativeClock::default()).unwrap();
        let before = t.keys.len();
        for i in 0..100u32 {
            let k = i.to_string();
            assert_eq!(
                reason(decide(Some(&t), &facts(Some(k.as_bytes()), "127.0.0.1", "GET", "/v1"))),
                Some(Reason::InvalidKey)
            );
        }
        assert_eq!(t.keys.len(), before);
    }
}
