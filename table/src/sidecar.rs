//! The sidecar's contract with the controller beyond the tables: what its admin port answers and how the webhook
//! hands it the application's rewritten probes. Both sides use these types and parsers (controller and proxy never
//! depend on each other), so the contract has one source of truth.
//!
//! - `GET /revision` → [`RevisionReport`] as JSON: which Service's table and which revision this sidecar serves
//!   (the controller's `Enforced` condition reads it on each pod IP).
//! - `GET /app-health/<container>/<livez|readyz|startupz>` → the result of the application's original probe, run
//!   by the sidecar on loopback: `200` when the app answered 2xx/3xx (HTTP) or accepted a connection (TCP), `503`
//!   otherwise. The original probes arrive in the environment variable [`APP_PROBES_ENV`] as [`AppProbes`] JSON,
//!   mirroring Istio's `ISTIO_KUBE_APP_PROBERS`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Admin path of the [`RevisionReport`].
pub const REVISION_PATH: &str = "/revision";
/// Prefix of the application-probe paths on the admin port.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";
/// Environment variable of the sidecar carrying the application's original probes ([`AppProbes`] JSON).
pub const APP_PROBES_ENV: &str = "PORTCULLIS_APP_PROBES";

/// What `GET /revision` answers (status 200 with a table, 503 without one; the body is this JSON either way).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RevisionReport {
    /// `namespace/service` of the table in force; `None` before a first table loaded.
    pub service: Option<String>,
    /// Revision in force; `None` before a first table loaded.
    pub revision: Option<String>,
    /// The sidecar's pod (`POD_NAME`), so a reader that dialled a pod IP knows it reached the pod it meant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Which probe of a container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [ProbeKind::Liveness, ProbeKind::Readiness, ProbeKind::Startup];

    /// Last segment of the admin path.
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }

    /// The Pod field: `livenessProbe`, `readinessProbe`, `startupProbe`.
    pub fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }
}

/// Admin path serving `kind` of `container` (container names are DNS labels: no escaping needed).
pub fn app_health_path(container: &str, kind: ProbeKind) -> String {
    format!("{APP_HEALTH_PREFIX}{container}/{}", kind.segment())
}

/// Admin path → the original probe.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One original probe: exactly one of `httpGet` or `tcpSocket`, always against `127.0.0.1`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketProbe>,
    /// The probe's `timeoutSeconds` (Kubernetes' default is 1).
    pub timeout_seconds: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetProbe {
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<ProbeHeader>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TcpSocketProbe {
    pub port: u16,
}

/// Why an [`AppProbes`] document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{APP_PROBES_ENV}: {0}")]
pub struct AppProbesError(String);

/// Parses and validates the [`APP_PROBES_ENV`] document.
pub fn parse_app_probes(json: &str) -> Result<AppProbes, AppProbesError> {
    let probes: AppProbes =
        serde_json::from_str(json).map_err(|e| AppProbesError(format!("not an app-probes document: {e}")))?;
    for (path, p) in &probes {
        validate(path, p).map_err(|e| AppProbesError(format!("{path:?}: {e}")))?;
    }
    Ok(probes)
}

fn validate(path: &str, p: &AppProbe) -> Result<(), String> {
    let rest = path.strip_prefix(APP_HEALTH_PREFIX).ok_or_else(|| format!("must start with {APP_HEALTH_PREFIX}"))?;
    let (container, kind) = rest.split_once('/').ok_or("expected /app-health/<container>/<kind>")?;
    let dns_label = !container.is_empty()
        && container.len() <= 63
        && container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !dns_label || !ProbeKind::ALL.iter().any(|k| k.segment() == kind) {
        return Err("expected /app-health/<container>/<livez|readyz|startupz>".into());
    }
    if !(1..=3600).contains(&p.timeout_seconds) {
        return Err(format!("timeoutSeconds {} is outside 1-3600", p.timeout_seconds));
    }
    match (&p.http_get, &p.tcp_socket) {
        (Some(h), None) => {
            if h.port == 0 {
                return Err("httpGet.port 0".into());
            }
            let printable = |s: &str| s.bytes().all(|b| (0x21..0x7f).contains(&b));
            if !h.path.starts_with('/') || !printable(&h.path) {
                return Err(format!("httpGet.path {:?} must start with / and hold no spaces or controls", h.path));
            }
            for hd in &h.http_headers {
                let token = !hd.name.is_empty()
                    && hd.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                let value = hd.value.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
                if !token || !value {
                    return Err(format!("httpGet header {:?} is not a valid header", hd.name));
                }
            }
            Ok(())
        }
        (None, Some(t)) if t.port != 0 => Ok(()),
        (None, Some(_)) => Err("tcpSocket.port 0".into()),
        _ => Err("exactly one of httpGet or tcpSocket must be set".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_documents_round_trip() {
        assert_eq!(app_health_path("app", ProbeKind::Readiness), "/app-health/app/readyz");
        let mut probes = AppProbes::new();
        probes.insert(
            app_health_path("app", ProbeKind::Liveness),
            AppProbe {
                http_get: Some(HttpGetProbe {
                    port: 8080,
                    path: "/healthz?full=1".into(),
                    http_headers: vec![ProbeHeader { name: "X-Probe".into(), value: "kubelet".into() }],
                }),
                tcp_socket: None,
                timeout_seconds: 1,
            },
        );
        probes.insert(
            app_health_path("app", ProbeKind::Startup),
            AppProbe { http_get: None, tcp_socket: Some(TcpSocketProbe { port: 5432 }), timeout_seconds: 3 },
        );
        let json = serde_json::to_string(&probes).unwrap();
        assert!(json.contains(r#""httpGet":{"port":8080"#), "{json}");
        assert_eq!(parse_app_probes(&json).unwrap(), probes);
    }

    #[test]
    fn bad_documents_are_refused_naming_the_entry() {
        for (bad, why) in [
            (r#"{"/app-health/app/livez": {"timeoutSeconds": 1}}"#, "exactly one"),
            (r#"{"/app-health/app/livez": {"tcpSocket": {"port": 0}, "timeoutSeconds": 1}}"#, "port 0"),
            (r#"{"/elsewhere/app/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1}}"#, "/app-health/"),
            (r#"{"/app-health/app/healthz": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1}}"#, "livez|readyz"),
            (r#"{"/app-health/App/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 1}}"#, "livez|readyz"),
            (r#"{"/app-health/app/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}"#, "timeoutSeconds"),
            (r#"{"/app-health/app/livez": {"httpGet": {"port": 1, "path": "x"}, "timeoutSeconds": 1}}"#, "path"),
            (r#"{"/app-health/app/livez": {"httpGet": {"port": 1, "path": "/a b"}, "timeoutSeconds": 1}}"#, "path"),
            (
                r#"{"/app-health/app/livez": {"httpGet": {"port": 1, "path": "/", "httpHeaders": [{"name": "A", "value": "x\r\nB: y"}]}, "timeoutSeconds": 1}}"#,
                "header",
            ),
            (r#"{"/app-health/app/livez": {"exec": {}, "timeoutSeconds": 1}}"#, "unknown field"),
            ("[]", "not an app-probes document"),
        ] {
            let e = parse_app_probes(bad).expect_err(bad).to_string();
            assert!(e.starts_with(APP_PROBES_ENV) && e.contains(why), "{bad}: {e}");
        }
        assert_eq!(parse_app_probes("{}").unwrap(), AppProbes::new());
    }

    #[test]
    fn revision_report_json() {
        let r = RevisionReport { service: Some("shop/orders".into()), revision: Some("0123".into()), pod: None };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"service":"shop/orders","revision":"0123"}"#);
        let none: RevisionReport = serde_json::from_str(r#"{"service":null,"revision":null}"#).unwrap();
        assert_eq!(none, RevisionReport::default());
    }
}
