//! Why a request was refused: the reason codes, their HTTP status and their constant JSON bodies.

/// Why a request was refused. `code()` is the `reason` of the JSON body and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No key, an unknown key, or several key headers. One reason for all so the body is identical.
    InvalidKey,
    KeyExpired,
    ClientDisabled,
    SourceNotAllowed,
    RouteNotAllowed,
    RateLimited,
    QuotaExceeded,
    NoTable,
    UpstreamUnavailable,
    /// `--require-tls`: the key header was sent over plain HTTP.
    TlsRequired,
    /// The key's client has `requireCertificate` and the connection's certificate does not match it.
    CertificateRequired,
    /// The table is a deny-all table: no UsagePlan grants this Service.
    ServiceNotGranted,
    /// The proxy had a table and it was taken away (index deleted, or reading it is no longer permitted).
    TableRevoked,
    /// An HTTP/1.1 `Upgrade` to a protocol not in `--upgrade-protocols`.
    UpgradeNotAllowed,
    /// The shared upstream pool for busy h2 connections is at `--max-side-pool-requests`.
    UpstreamBusy,
    /// The request body did not arrive fast enough (`--body-read-timeout`).
    BodyTimeout,
    /// The path cannot be normalised safely (see [`super::path`]).
    InvalidPath,
    /// A trusted proxy's forwarding headers do not name one client (see [`super::client_addr`]).
    AmbiguousForwarded,
    /// Malformed in another way: several `Host` lines, userinfo in the target, a malformed request body.
    BadRequest,
    /// The plan counts in the shared store (Redis), the store cannot be reached and the plan says
    /// `onStoreUnavailable: FailClosed`.
    StoreUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::InvalidKey,
        Reason::KeyExpired,
        Reason::ClientDisabled,
        Reason::SourceNotAllowed,
        Reason::RouteNotAllowed,
        Reason::RateLimited,
        Reason::QuotaExceeded,
        Reason::NoTable,
        Reason::UpstreamUnavailable,
        Reason::TlsRequired,
        Reason::CertificateRequired,
        Reason::ServiceNotGranted,
        Reason::TableRevoked,
        Reason::UpgradeNotAllowed,
        Reason::UpstreamBusy,
        Reason::BodyTimeout,
        Reason::InvalidPath,
        Reason::AmbiguousForwarded,
        Reason::BadRequest,
        Reason::StoreUnavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            Reason::InvalidPath | Reason::AmbiguousForwarded | Reason::BadRequest | Reason::UpgradeNotAllowed => 400,
            Reason::InvalidKey => 401,
            Reason::KeyExpired
            | Reason::ClientDisabled
            | Reason::SourceNotAllowed
            | Reason::RouteNotAllowed
            | Reason::TlsRequired
            | Reason::CertificateRequired
            | Reason::ServiceNotGranted => 403,
            Reason::RateLimited | Reason::QuotaExceeded => 429,
            Reason::NoTable | Reason::TableRevoked | Reason::UpstreamBusy | Reason::StoreUnavailable => 503,
            Reason::UpstreamUnavailable => 502,
            Reason::BodyTimeout => 408,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Reason::InvalidKey => "invalid_key",
            Reason::KeyExpired => "key_expired",
            Reason::ClientDisabled => "client_disabled",
            Reason::SourceNotAllowed => "source_not_allowed",
            Reason::RouteNotAllowed => "route_not_allowed",
            Reason::RateLimited => "rate_limited",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::NoTable => "no_table",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::TlsRequired => "tls_required",
            Reason::CertificateRequired => "certificate_required",
            Reason::ServiceNotGranted => "service_not_granted",
            Reason::TableRevoked => "table_revoked",
            Reason::UpgradeNotAllowed => "upgrade_not_allowed",
            Reason::UpstreamBusy => "upstream_busy",
            Reason::BodyTimeout => "body_timeout",
            Reason::InvalidPath => "invalid_path",
            Reason::AmbiguousForwarded => "ambiguous_forwarded",
            Reason::BadRequest => "bad_request",
            Reason::StoreUnavailable => "store_unavailable",
        }
    }

    /// The JSON body. Static: never contains anything from the request (in particular never the key).
    pub fn body(self) -> &'static str {
        match self {
            Reason::InvalidKey => r#"{"error":"missing or invalid API key","reason":"invalid_key"}"#,
            Reason::KeyExpired => r#"{"error":"API key has expired","reason":"key_expired"}"#,
            Reason::ClientDisabled => r#"{"error":"API client is disabled","reason":"client_disabled"}"#,
            Reason::SourceNotAllowed => {
                r#"{"error":"source address not allowed for this client","reason":"source_not_allowed"}"#
            }
            Reason::RouteNotAllowed => r#"{"error":"route not allowed for this client","reason":"route_not_allowed"}"#,
            Reason::RateLimited => r#"{"error":"rate limit exceeded","reason":"rate_limited"}"#,
            Reason::QuotaExceeded => r#"{"error":"quota exceeded","reason":"quota_exceeded"}"#,
            Reason::NoTable => r#"{"error":"no access table loaded yet","reason":"no_table"}"#,
            Reason::UpstreamUnavailable => r#"{"error":"upstream unavailable","reason":"upstream_unavailable"}"#,
            Reason::TlsRequired => r#"{"error":"API keys are accepted over HTTPS only","reason":"tls_required"}"#,
            Reason::CertificateRequired => {
                r#"{"error":"a matching client certificate is required","reason":"certificate_required"}"#
            }
            Reason::ServiceNotGranted => {
                r#"{"error":"no usage plan grants access to this service","reason":"service_not_granted"}"#
            }
            Reason::TableRevoked => {
                r#"{"error":"the access table was withdrawn; every request is refused","reason":"table_revoked"}"#
            }
            Reason::UpgradeNotAllowed => {
                r#"{"error":"upgrade to this protocol is not allowed","reason":"upgrade_not_allowed"}"#
            }
            Reason::UpstreamBusy => r#"{"error":"upstream busy, retry","reason":"upstream_busy"}"#,
            Reason::BodyTimeout => r#"{"error":"request body too slow","reason":"body_timeout"}"#,
            Reason::InvalidPath => r#"{"error":"request path cannot be normalised safely","reason":"invalid_path"}"#,
            Reason::AmbiguousForwarded => {
                r#"{"error":"forwarding headers do not name one client","reason":"ambiguous_forwarded"}"#
            }
            Reason::BadRequest => r#"{"error":"malformed request","reason":"bad_request"}"#,
            Reason::StoreUnavailable => r#"{"error":"limit store unavailable, retry","reason":"store_unavailable"}"#,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_with_their_reason() {
        for r in Reason::ALL {
            let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
            assert_eq!(v["reason"], r.code());
            assert!(v["error"].is_string());
        }
    }
}
