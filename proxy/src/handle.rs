//! One request, start to finish: the facts the decision needs → the decision → the rewrite of what the
//! application receives → forwarding (and, for an accepted upgrade, the tunnel). Everything about the connection
//! itself (PROXY header, TLS, HTTP/1.1 vs h2, timeouts, shutdown) is in [`crate::server`].

use crate::body::{BodyStalled, RequestBody};
use crate::config::Config;
use crate::decision::client_addr::client_addr;
use crate::decision::{CidrSet, Decision, Denial, PeerCert, Reason, RequestFacts, decide};
use crate::metrics::Metrics;
use crate::respond::{Body, denial_response, json_response};
use crate::rewrite::{CLIENT_HEADER, is_upgrade, strip_hop_by_hop};
use crate::tables::TableStore;
use crate::tunnel::{self, UpgradeProtocols};
use crate::upstream::{Busy, ConnSlot, Upstream};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// What the connection contributes to each of its requests.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    /// The socket peer, or the source of a trusted PROXY header.
    pub addr: IpAddr,
    /// The request arrived over TLS.
    pub tls: bool,
    /// The connection's verified client certificate.
    pub cert: Option<Arc<PeerCert>>,
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
}

impl Handler {
    pub fn new(
        config: &Config,
        tables: Arc<TableStore>,
        metrics: Arc<Metrics>,
        upstream: Arc<Upstream>,
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
        })
    }

    /// Decides `req` and forwards it when allowed; every outcome is a response (refusals are JSON).
    pub async fn handle(&self, slot: &ConnSlot, conn: &ConnFacts, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        if self.require_tls && !conn.tls && req.headers().contains_key(&self.key_header) {
            // The key has crossed the network in clear already; refusing keeps callers from relying on it working.
            self.metrics.count(Some(Reason::TlsRequired), start.elapsed().as_secs_f64());
            return denial_response(&Reason::TlsRequired.into());
        }
        let verdict: Result<HeaderValue, Denial> = {
            let addr = client_addr(conn.addr, req.headers(), &self.trusted);
            let facts = RequestFacts {
                addr,
                method: req.method().as_str(),
                path: req.uri().path(),
                key: single_header(req.headers(), &self.key_header),
                cert: conn.cert.as_deref(),
                now: jiff::Timestamp::now(),
            };
            let table = self.tables.current.load();
            match decide(table.as_deref(), &facts) {
                Decision::Allow { client, .. } => Ok(client.header.clone()),
                Decision::Deny(d) => {
                    tracing::debug!(client_addr = %addr, reason = d.reason.code(), "denied");
                    Err(d)
                }
            }
        };
        let client_header = match verdict {
            Ok(v) => v,
            Err(d) => {
                self.metrics.count(Some(d.reason), start.elapsed().as_secs_f64());
                return denial_response(&d);
            }
        };

        // Only HTTP/1.1 has Upgrade; on h2 the header is connection-specific and simply stripped. The protocol must be
        // allow-listed (`tunnel::judge`); a lone `h2c` is served as the plain request it also is.
        let upgrade = req.version() == Version::HTTP_11
            && is_upgrade(req.headers())
            && match tunnel::judge(req.headers(), &self.upgrade_protocols) {
                tunnel::Verdict::Pass => true,
                tunnel::Verdict::Strip => false,
                tunnel::Verdict::Refuse => {
                    self.metrics.count(Some(Reason::UpgradeNotAllowed), start.elapsed().as_secs_f64());
                    return denial_response(&Reason::UpgradeNotAllowed.into());
                }
            };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(&self.key_header);
        parts.headers.remove(&CLIENT_HEADER);
        parts.headers.insert(CLIENT_HEADER, client_header);
        if !parts.headers.contains_key(header::HOST) {
            let host = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            parts.headers.insert(header::HOST, host.unwrap_or_else(|| self.upstream_authority.clone()));
        }
        // Origin form (`/path?query`) for the upstream, whatever form the client used.
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        parts.uri = match Uri::builder().path_and_query(pq).build() {
            Ok(u) => u,
            Err(_) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"bad request target","reason":"bad_request"}"#,
                );
            }
        };
        parts.version = Version::HTTP_11;

        let body = RequestBody::new(body, self.body_read_timeout);
        let result = self.upstream.send(slot, Request::from_parts(parts, body)).await;
        let mut resp = match result {
            Ok(r) => r,
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
                self.metrics.count(Some(denial.reason), start.elapsed().as_secs_f64());
                return denial_response(&denial);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            if !tunnel::response_allowed(resp.headers(), &self.upgrade_protocols) {
                tracing::warn!("the application switched to a protocol not in --upgrade-protocols; refused");
                self.metrics.count(Some(Reason::UpstreamUnavailable), start.elapsed().as_secs_f64());
                return denial_response(&Reason::UpstreamUnavailable.into());
            }
            self.metrics.count(None, start.elapsed().as_secs_f64());
            // The connection runs the tunnel once HTTP/1.1 has handed the socket over (it stays counted).
            slot.set_tunnel(client_upgrade, hyper::upgrade::on(&mut resp));
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, http_body_util::Empty::new().map_err(|never| match never {}).boxed());
        }
        self.metrics.count(None, start.elapsed().as_secs_f64());
        strip_hop_by_hop(resp.headers_mut(), false);
        resp.map(|b| b.boxed())
    }
}

/// The key header's value when sent exactly once.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut it = headers.get_all(name).iter();
    match (it.next(), it.next()) {
        (Some(v), None) => Some(v.as_bytes()),
        _ => None,
    }
}
