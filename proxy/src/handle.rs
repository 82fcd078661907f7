//! One request, start to finish: the facts the decision needs → the decision → the rewrite of what the
//! application receives → forwarding (and, for an accepted upgrade, the tunnel). Everything about the connection
//! itself (PROXY header, TLS, HTTP/1.1 vs h2, timeouts, shutdown) is in [`crate::server`].

use crate::access_log::{self, AccessLog};
use crate::body::{BodyStalled, RequestBody, RequestBodyError};
use crate::config::Config;
use crate::decision::client_addr::client_addr;
use crate::decision::path::{EscapedSlashes, PathError, normalize};
use crate::decision::{CidrSet, Decision, Denial, PeerCert, Reason, RequestFacts, decide};
use crate::global::Ask;
use crate::metrics::Metrics;
use crate::respond::{Body, denial_response};
use crate::rewrite::{
    CLIENT_HEADER, Forwarding, Proto, is_upgrade, scrub_client_headers, set_forwarding_headers, strip_hop_by_hop,
    strip_key_param,
};
use crate::tables::TableStore;
use crate::tunnel::{self, UpgradeProtocols};
use crate::upstream::{Busy, ConnSlot, Upstream};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_table::{KeyDigest, key_digest};
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the connection contributes to each of its requests.
#[derive(Debug)]
pub struct ConnFacts {
    /// The socket peer, or the source of a trusted PROXY header.
    pub addr: IpAddr,
    /// The request arrived over TLS.
    pub tls: bool,
    /// The connection's verified client certificate.
    pub cert: Option<Arc<PeerCert>>,
    /// The forwarding headers of the connection's first admitted request, reused by the next ones for the same
    /// address and scheme (all of them, unless a trusted proxy forwards for many clients).
    pub forwarding: std::sync::OnceLock<Forwarding>,
    /// The key the connection's last request presented, with its digest: a kept-alive client sends the same key
    /// request after request, and its SHA-256 is the largest single cost of a decision.
    last_key: std::sync::Mutex<Option<(Box<[u8]>, KeyDigest)>>,
}

impl ConnFacts {
    pub fn new(addr: IpAddr, tls: bool, cert: Option<Arc<PeerCert>>) -> Self {
        Self { addr, tls, cert, forwarding: std::sync::OnceLock::new(), last_key: std::sync::Mutex::new(None) }
    }

    /// `key_digest(key)`, from the connection's memo when `key` is the key its last request presented (compared in
    /// constant time, as the table's digests are).
    pub fn key_digest(&self, key: &[u8]) -> KeyDigest {
        use subtle::ConstantTimeEq;
        let mut last = self.last_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((raw, digest)) = last.as_ref()
            && bool::from(raw.as_ref().ct_eq(key))
        {
            return *digest;
        }
        let digest = key_digest(key);
        *last = Some((key.into(), digest));
        digest
    }
}

/// The request path's settings and shared state.
pub struct Handler {
    pub tables: Arc<TableStore>,
    pub metrics: Arc<Metrics>,
    pub upstream: Arc<Upstream>,
    /// `Host` for requests that carry none (HTTP/1.0 without one).
    pub upstream_authority: HeaderValue,
    pub key_header: HeaderName,
    pub trusted: CidrSet,
    pub require_tls: bool,
    pub body_read_timeout: std::time::Duration,
    pub upgrade_protocols: UpgradeProtocols,
    pub escaped_slashes: EscapedSlashes,
    pub allow_underscore_headers: bool,
    /// `--access-log` (`None`: off).
    pub access_log: Option<Arc<AccessLog>>,
    /// `--client-metrics` is above zero.
    pub per_client: bool,
}

/// What the access log and the per-client metrics learn about a request while it is decided and forwarded.
#[derive(Default)]
struct Trail {
    /// The access log is on: the fields below that cost an allocation are filled in.
    logging: bool,
    /// The final outcome as counted in `portcullis_proxy_requests_total` (`None`: allowed).
    reason: Option<Reason>,
    client: Option<HeaderValue>,
    source: Option<IpAddr>,
    path: Option<String>,
    upstream: Option<Duration>,
    /// A labelled client's local quota after this request: (plan, units left).
    quota_left: Option<(String, u64)>,
}

impl Handler {
    pub fn new(
        config: &Config,
        tables: Arc<TableStore>,
        metrics: Arc<Metrics>,
        upstream: Arc<Upstream>,
        access_log: Option<Arc<AccessLog>>,
    ) -> Result<Self, http::Error> {
        let authority: http::uri::Authority = config.upstream.parse().map_err(http::Error::from)?;
        let upstream_authority = HeaderValue::from_str(authority.as_str()).map_err(http::Error::from)?;
        Ok(Self {
            tables,
            metrics,
            upstream,
            upstream_authority,
            key_header: config.key_header.clone(),
            trusted: config.trusted_proxies.clone(),
            require_tls: config.require_tls,
            body_read_timeout: config.body_read_timeout,
            upgrade_protocols: config.upgrade_protocols.clone(),
            escaped_slashes: config.escaped_slashes,
            allow_underscore_headers: config.allow_underscore_headers,
            access_log,
            per_client: config.client_metrics > 0,
        })
    }

    /// Decides `req` and forwards it when allowed; every outcome is a response (refusals are JSON). Then counts it
    /// per client and, when logged, wraps the response body so the access-log line is written when it ends.
    pub async fn handle(&self, slot: &ConnSlot, conn: &ConnFacts, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let Some(log) = &self.access_log else {
            if !self.per_client {
                return self.serve(slot, conn, req, start, &mut Trail::default()).await;
            }
            let mut trail = Trail::default();
            let resp = self.serve(slot, conn, req, start, &mut trail).await;
            self.count_client(&mut trail);
            return resp;
        };
        let time = jiff::Timestamp::now();
        let method = req.method().clone();
        let raw = access_log::raw_path(req.uri().path());
        let mut trail = Trail { logging: true, ..Default::default() };
        let resp = self.serve(slot, conn, req, start, &mut trail).await;
        self.count_client(&mut trail);
        let reason = trail.reason;
        if reason.is_none() && !log.sample_allowed() {
            return resp;
        }
        let entry = access_log::Entry {
            time,
            start,
            client: trail.client,
            source: trail.source.unwrap_or(conn.addr),
            method,
            path: trail.path.unwrap_or(raw),
            status: resp.status().as_u16(),
            reason,
            upstream: trail.upstream,
        };
        let log = log.clone();
        resp.map(|b| access_log::Logged::new(b, entry, log).boxed())
    }

    fn count_client(&self, trail: &mut Trail) {
        if !self.per_client {
            return;
        }
        let Some(id) = trail.client.as_ref().and_then(|c| c.to_str().ok()) else { return };
        let per_client = &self.metrics.per_client;
        per_client.count(id, trail.reason.map_or("allowed", Reason::code));
        if let Some((plan, left)) = trail.quota_left.take() {
            per_client.quota_left(id, &plan, left);
        }
    }

    /// Counts the request's outcome (`None`: allowed) and remembers it for the access log.
    fn count(&self, trail: &mut Trail, reason: Option<Reason>, seconds: f64) {
        trail.reason = reason;
        self.metrics.count(reason, seconds);
    }

    async fn serve(
        &self,
        slot: &ConnSlot,
        conn: &ConnFacts,
        mut req: Request<Incoming>,
        start: Instant,
        trail: &mut Trail,
    ) -> Response<Body> {
        if self.require_tls && !conn.tls && req.headers().contains_key(&self.key_header) {
            // The key has crossed the network in clear already; refusing keeps callers from relying on it working.
            self.count(trail, Some(Reason::TlsRequired), start.elapsed().as_secs_f64());
            return denial_response(&Reason::TlsRequired.into());
        }
        let refuse = |trail: &mut Trail, reason: Reason, detail: &str| {
            tracing::debug!(peer = %conn.addr, reason = reason.code(), detail, "refused");
            self.count(trail, Some(reason), start.elapsed().as_secs_f64());
            denial_response(&reason.into())
        };
        // RFC 9112 §3.2: one Host, and a valid one; RFC 9110 §4.2.4: no userinfo in the target.
        let mut hosts = req.headers().get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => return refuse(trail, Reason::BadRequest, "several Host lines"),
            (Some(h), None) if !valid_host(h.as_bytes()) => return refuse(trail, Reason::BadRequest, "invalid Host"),
            _ => {}
        }
        let authority = req.uri().authority().map(|a| a.as_str());
        if authority.is_some_and(|a| a.contains('@')) {
            return refuse(trail, Reason::BadRequest, "userinfo in the request target");
        }
        // The path is normalised once: the decision sees it, and so does the application.
        let target = match origin_target(req.uri(), self.escaped_slashes, self.key_header.as_str()) {
            Ok(t) => t,
            Err(e) => return refuse(trail, Reason::InvalidPath, e.as_str()),
        };
        if trail.logging {
            trail.path = Some(target.path().to_owned());
        }
        let addr = match client_addr(conn.addr, req.headers(), &self.trusted) {
            Ok(a) => a,
            Err(e) => return refuse(trail, Reason::AmbiguousForwarded, e.as_str()),
        };
        trail.source = Some(addr);
        let now = jiff::Timestamp::now();
        let mut global_ask: Option<Ask> = None;
        let verdict: Result<HeaderValue, Denial> = {
            let key = single_header(req.headers(), &self.key_header);
            let facts = RequestFacts {
                addr,
                method: req.method().as_str(),
                path: target.path(),
                key,
                digest: key.filter(|k| !k.is_empty()).map(|k| conn.key_digest(k)),
                cert: conn.cert.as_deref(),
                now,
            };
            let table = self.tables.current.load();
            let decision = match table.as_deref() {
                Some(t) => decide(Some(t), &facts),
                None => Decision::Deny(self.tables.missing_reason().into()),
            };
            match decision {
                Decision::Allow { client, plan } => {
                    if trail.logging || self.per_client {
                        trail.client = Some(client.header.clone());
                    }
                    if self.per_client
                        && let Some(q) = plan
                            .quota
                            .as_ref()
                            .filter(|_| !(table.as_deref().is_some_and(|t| t.store_counts) && plan.spec.global_quota))
                    {
                        let left = q.spec.limit.saturating_sub(q.used(now.as_second()));
                        trail.quota_left = Some((plan.spec.name.clone(), left));
                    }
                    if table.as_deref().is_some_and(|t| t.store_counts) && plan.spec.counts_globally() {
                        let throttle = plan.throttle.as_ref().filter(|_| plan.spec.global_throttle).map(|t| t.spec);
                        let quota = plan.quota.as_ref().filter(|_| plan.spec.global_quota).map(|q| q.spec);
                        global_ask = Some(Ask {
                            client: client.id.clone(),
                            plan: plan.spec.clone(),
                            throttle,
                            quota,
                            now_unix: now.as_second(),
                        });
                    }
                    Ok(client.header.clone())
                }
                Decision::Deny(d) => {
                    tracing::debug!(client_addr = %addr, reason = d.reason.code(), "denied");
                    Err(d)
                }
                Decision::Refuse { client, denial } => {
                    tracing::debug!(client_addr = %addr, client = client.id, reason = denial.reason.code(), "denied");
                    if trail.logging || self.per_client {
                        trail.client = Some(client.header.clone());
                    }
                    Err(denial)
                }
            }
        };
        let client_header = match verdict {
            Ok(v) => v,
            Err(d) => {
                self.count(trail, Some(d.reason), start.elapsed().as_secs_f64());
                return denial_response(&d);
            }
        };
        // Counts shared across replicas: after the pure decision, bounded by --store-timeout.
        if let (Some(ask), Some(global)) = (global_ask, self.tables.global())
            && let Err(d) = global.admit(&ask).await
        {
            tracing::debug!(client_addr = %addr, reason = d.reason.code(), "denied (shared count)");
            self.count(trail, Some(d.reason), start.elapsed().as_secs_f64());
            return denial_response(&d);
        }
        // The authority of an absolute-form (or h2) target wins over the client's Host (RFC 9112 §3.2.2).
        let host = match authority {
            Some(a) => HeaderValue::from_str(a).ok(),
            None => None,
        };
        let proto = Proto::decide(conn.tls, self.trusted.contains(conn.addr.to_canonical()), req.headers());

        // Only HTTP/1.1 has Upgrade; on h2 the header is connection-specific and simply stripped. The protocol must be
        // allow-listed (`tunnel::judge`); a lone `h2c` is served as the plain request it also is.
        let upgrade = req.version() == Version::HTTP_11
            && is_upgrade(req.headers())
            && match tunnel::judge(req.headers(), &self.upgrade_protocols) {
                tunnel::Verdict::Pass => true,
                tunnel::Verdict::Strip => false,
                tunnel::Verdict::Refuse => {
                    self.count(trail, Some(Reason::UpgradeNotAllowed), start.elapsed().as_secs_f64());
                    return denial_response(&Reason::UpgradeNotAllowed.into());
                }
            };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        scrub_client_headers(&mut parts.headers, &self.key_header, self.allow_underscore_headers);
        parts.headers.insert(CLIENT_HEADER, client_header);
        match conn.forwarding.get_or_init(|| Forwarding::new(addr, proto)) {
            cached if cached.is_for(addr, proto) => cached.apply(&mut parts.headers),
            _ => set_forwarding_headers(&mut parts.headers, addr, proto),
        }
        match host {
            Some(h) => {
                parts.headers.insert(header::HOST, h);
            }
            None if !parts.headers.contains_key(header::HOST) => {
                parts.headers.insert(header::HOST, self.upstream_authority.clone());
            }
            None => {}
        }
        parts.uri = target;
        parts.version = Version::HTTP_11;

        let body = RequestBody::new(body, self.body_read_timeout);
        let sent = Instant::now();
        let result = self.upstream.send(slot, Request::from_parts(parts, body)).await;
        trail.upstream = Some(sent.elapsed());
        let mut resp = match result {
            Ok(r) => r,
            Err(e) if client_body_failed(&*e) => {
                // The client's body was malformed (bad chunked framing) or cut short: the client's fault, not the
                // application's, and not an allowed request.
                tracing::debug!(error = %e, "request body from the client failed");
                self.count(trail, Some(Reason::BadRequest), start.elapsed().as_secs_f64());
                return denial_response(&Reason::BadRequest.into());
            }
            Err(e) => {
                let denial = if e.is::<Busy>() {
                    tracing::debug!(error = %e, "side pool full");
                    Denial { reason: Reason::UpstreamBusy, retry_after: Some(1), rate_limit: None }
                } else if BodyStalled::in_chain(&*e) {
                    tracing::debug!(error = %e, "request body stalled; request aborted");
                    Reason::BodyTimeout.into()
                } else {
                    tracing::warn!(error = %e, "upstream request failed");
                    Reason::UpstreamUnavailable.into()
                };
                self.count(trail, Some(denial.reason), start.elapsed().as_secs_f64());
                return denial_response(&denial);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            if !tunnel::response_allowed(resp.headers(), &self.upgrade_protocols) {
                tracing::warn!("the application switched to a protocol not in --upgrade-protocols; refused");
                self.count(trail, Some(Reason::UpstreamUnavailable), start.elapsed().as_secs_f64());
                return denial_response(&Reason::UpstreamUnavailable.into());
            }
            self.count(trail, None, start.elapsed().as_secs_f64());
            // The connection runs the tunnel once HTTP/1.1 has handed the socket over (it stays counted).
            slot.set_tunnel(client_upgrade, hyper::upgrade::on(&mut resp));
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, http_body_util::Empty::new().map_err(|never| match never {}).boxed());
        }
        self.count(trail, None, start.elapsed().as_secs_f64());
        strip_hop_by_hop(resp.headers_mut(), false);
        resp.map(|b| b.boxed())
    }
}

/// A `Host` value is `uri-host [ ":" port ]` or empty (RFC 9112 §3.2, RFC 3986 §3.2): no userinfo, and nothing
/// an application building `http://{host}{target}` could read as a path, query or fragment (`evil/admin#`).
fn valid_host(v: &[u8]) -> bool {
    if v.is_empty() {
        return true;
    }
    let Ok(a) = http::uri::Authority::try_from(v) else { return false };
    // `http` accepts userinfo and does not look at the port's characters.
    let port = a.as_str().rsplit_once(':').filter(|(h, _)| !h.starts_with('[') || h.ends_with(']'));
    !v.contains(&b'@') && port.is_none_or(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
}

/// The key header's value when sent exactly once.
pub fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut it = headers.get_all(name).iter();
    match (it.next(), it.next()) {
        (Some(v), None) => Some(v.as_bytes()),
        _ => None,
    }
}

/// The origin-form target for the application: the normalised path (see [`crate::decision::path`]) and the query
/// without the key ([`strip_key_param`]). When neither changes, the client's path-and-query is reused as is.
pub fn origin_target(uri: &Uri, slashes: EscapedSlashes, key_header: &str) -> Result<Uri, PathError> {
    let path = normalize(uri.path(), slashes)?;
    let query = uri.query();
    let stripped = query.and_then(|q| strip_key_param(q, key_header));
    if let (Cow::Borrowed(_), None, Some(pq)) = (&path, &stripped, uri.path_and_query()) {
        return Ok(Uri::from(pq.clone()));
    }
    let pq = match (stripped, query) {
        (Some(q), _) if q.is_empty() => path.into_owned(),
        (Some(q), _) => format!("{path}?{q}"),
        (None, Some(q)) => format!("{path}?{q}"),
        (None, None) => path.into_owned(),
    };
    // Built from pieces of a valid target (escapes upper-cased, unreserved characters decoded): always valid.
    PathAndQuery::try_from(pq).map(Uri::from).map_err(|_| PathError::NotOriginForm)
}

/// True when forwarding failed because the client's request body did (malformed chunked framing, a body cut short,
/// an h2 stream reset): see [`RequestBodyError::client_in_chain`].
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    RequestBodyError::client_in_chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(u: &str) -> Result<String, PathError> {
        origin_target(&u.parse().unwrap(), EscapedSlashes::Reject, "x-api-key").map(|u| u.to_string())
    }

    #[test]
    fn a_connection_s_key_memo_gives_every_key_its_own_digest() {
        let conn = ConnFacts::new("127.0.0.1".parse().unwrap(), false, None);
        for key in [&b"k-1"[..], b"k-1", b"k-2", b"k-1", b"k-10", b"k-1\0", b"", b"k-1"] {
            assert_eq!(conn.key_digest(key), key_digest(key), "{key:?}");
        }
    }

    #[test]
    fn host_values() {
        for h in ["a.example", "a.example:8080", "127.0.0.1:1", "[::1]", "[2001:db8::1]:443", "", "a-b.c_d"] {
            assert!(valid_host(h.as_bytes()), "{h}");
        }
        for h in [
            "evil/admin#",
            "evil?",
            "evil#x",
            "evil\\admin",
            "u@evil",
            "a b",
            "a\tb",
            "[::1",
            "a:b:c",
            "/",
            "?",
            "evil:x",
            "evil:80x",
            "[::1]:x",
        ] {
            assert!(!valid_host(h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn the_forwarded_target_is_origin_form_normalised_and_keyless() {
        assert_eq!(target("/v1/x?a=1").as_deref(), Ok("/v1/x?a=1"));
        assert_eq!(target("/v1/x?").as_deref(), Ok("/v1/x?"));
        assert_eq!(target("/v1/../admin?a=/../x").as_deref(), Ok("/admin?a=/../x"), "the query is not a path");
        assert_eq!(target("http://a.example/v1/%2e%2e/b?x-api-key=k&q=1").as_deref(), Ok("/b?q=1"));
        assert_eq!(target("http://a.example").as_deref(), Ok("/"));
        assert_eq!(target("https://a.example:8443/v1?x-api-key=k").as_deref(), Ok("/v1"));
        assert_eq!(target("/v1/..%2fadmin"), Err(PathError::EscapedSlash));
        assert_eq!(target("*"), Err(PathError::NotOriginForm));
        assert_eq!(target("a.example:443"), Err(PathError::NotOriginForm));
    }
}
