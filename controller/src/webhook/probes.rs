//! Probe rewriting for loopback-only applications (pure, no I/O).
//!
//! An app that listens on `127.0.0.1` only cannot be reached from the pod IP — which is the point: nothing gets to
//! it past the sidecar — but the kubelet probes from the node, at the pod IP. With the pod annotation
//! `portcullis.dev/app-loopback: "true"` the webhook therefore rewrites every `httpGet` and `tcpSocket` liveness,
//! readiness and startup probe of the application containers into an `httpGet` on the sidecar's admin port at
//! `/app-health/<container>/<livez|readyz|startupz>` (timings and thresholds kept), and hands the original probes
//! to the sidecar in [`APP_PROBES_ENV`]; the sidecar runs them against `127.0.0.1` (as Istio does for its
//! sidecars). `exec` probes run inside the container and are left alone. What cannot be carried over is refused
//! with a message naming the container and the probe: `grpc` probes, `httpGet.host`, `scheme: HTTPS`, and ports
//! naming no port of the container.

use super::inject::{ANNOTATION_APP_LOOPBACK, CONTAINER_NAME, InjectError};
use json_patch::PatchOperation;
use json_patch::jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::{Container, EnvVar, HTTPGetAction, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use portcullis_table::sidecar::{
    APP_PROBES_ENV, AppProbe, AppProbes, HttpGetProbe, ProbeHeader, ProbeKind, TcpSocketProbe, app_health_path,
};

/// What the webhook adds for a loopback-only app: the probe replacements and the sidecar's environment variable.
#[derive(Clone, Debug, PartialEq)]
pub struct Rewrite {
    pub ops: Vec<PatchOperation>,
    pub env: EnvVar,
}

/// Whether the pod declares its app loopback-only (`"true"`; `"false"` or absent: no).
pub fn app_loopback(pod: &Pod) -> Result<bool, InjectError> {
    match pod.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_APP_LOOPBACK)).map(|s| s.trim()) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(InjectError::BadAppLoopback(other.to_string())),
    }
}

/// The rewrite of `pod`'s probes onto admin port `admin_port`; `None` when the pod is not loopback-only or has
/// no probe to rewrite.
pub fn rewrite(pod: &Pod, admin_port: u16) -> Result<Option<Rewrite>, InjectError> {
    if !app_loopback(pod)? {
        return Ok(None);
    }
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let mut ops = Vec::new();
    let mut probes = AppProbes::new();
    for (i, c) in containers.iter().enumerate().filter(|(_, c)| c.name != CONTAINER_NAME) {
        for kind in ProbeKind::ALL {
            let Some(probe) = probe_of(c, kind) else { continue };
            let Some(original) = original(c, kind, probe)? else { continue };
            let path = app_health_path(&c.name, kind);
            let replaced = Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(path.clone()),
                    port: IntOrString::Int(i32::from(admin_port)),
                    scheme: Some("HTTP".into()),
                    ..Default::default()
                }),
                tcp_socket: None,
                ..probe.clone()
            };
            ops.push(PatchOperation::Replace(json_patch::ReplaceOperation {
                path: PointerBuf::from_tokens([
                    "spec".to_string(),
                    "containers".into(),
                    i.to_string(),
                    kind.field().into(),
                ]),
                value: serde_json::to_value(replaced).expect("a Probe always serializes"),
            }));
            probes.insert(path, original);
        }
    }
    if probes.is_empty() {
        return Ok(None);
    }
    let env = EnvVar {
        name: APP_PROBES_ENV.into(),
        value: Some(serde_json::to_string(&probes).expect("probes always serialize")),
        ..Default::default()
    };
    Ok(Some(Rewrite { ops, env }))
}

fn probe_of(c: &Container, kind: ProbeKind) -> Option<&Probe> {
    match kind {
        ProbeKind::Liveness => c.liveness_probe.as_ref(),
        ProbeKind::Readiness => c.readiness_probe.as_ref(),
        ProbeKind::Startup => c.startup_probe.as_ref(),
    }
}

/// The original probe for the sidecar; `None` for probes left alone (`exec`, or no handler).
fn original(c: &Container, kind: ProbeKind, p: &Probe) -> Result<Option<AppProbe>, InjectError> {
    let unsupported = |why: &str| InjectError::ProbeUnsupported {
        container: c.name.clone(),
        probe: kind.field(),
        why: why.to_string(),
    };
    let timeout_seconds = p.timeout_seconds.unwrap_or(1).clamp(1, 3600) as u32;
    if p.grpc.is_some() {
        return Err(unsupported(
            "a grpc probe cannot be carried through the sidecar; use an exec probe (e.g. grpc_health_probe \
             -addr=127.0.0.1:PORT) or an httpGet/tcpSocket probe",
        ));
    }
    if let Some(h) = &p.http_get {
        if h.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return Err(unsupported("httpGet.host is set; the sidecar probes 127.0.0.1 only, so remove it"));
        }
        if h.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("HTTP")) {
            return Err(unsupported(
                "httpGet.scheme HTTPS is not supported through the sidecar; probe a plain-HTTP health port, or use a \
                 tcpSocket or exec probe",
            ));
        }
        let port = resolve_port(c, kind, &h.port)?;
        let path = match h.path.as_deref() {
            None | Some("") => "/".to_string(),
            Some(p) if p.starts_with('/') => p.to_string(),
            Some(p) => format!("/{p}"),
        };
        let http_headers = h
            .http_headers
            .iter()
            .flatten()
            .map(|x| ProbeHeader { name: x.name.clone(), value: x.value.clone() })
            .collect();
        let probe =
            AppProbe { http_get: Some(HttpGetProbe { port, path, http_headers }), tcp_socket: None, timeout_seconds };
        return Ok(Some(probe));
    }
    if let Some(t) = &p.tcp_socket {
        if t.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return Err(unsupported("tcpSocket.host is set; the sidecar probes 127.0.0.1 only, so remove it"));
        }
        let port = resolve_port(c, kind, &t.port)?;
        return Ok(Some(AppProbe { http_get: None, tcp_socket: Some(TcpSocketProbe { port }), timeout_seconds }));
    }
    Ok(None)
}

/// A probe port as the kubelet resolves it: a number, or the name of one of the container's ports (then a number
/// written as a string).
fn resolve_port(c: &Container, kind: ProbeKind, port: &IntOrString) -> Result<u16, InjectError> {
    let bad = |port: String| InjectError::ProbePort { container: c.name.clone(), probe: kind.field(), port };
    let valid = |n: i32| u16::try_from(n).ok().filter(|p| *p != 0);
    match port {
        IntOrString::Int(n) => valid(*n).ok_or_else(|| bad(n.to_string())),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .or_else(|| name.parse::<i32>().ok())
            .and_then(valid)
            .ok_or_else(|| bad(format!("{name:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ExecAction, GRPCAction, HTTPHeader, PodSpec, TCPSocketAction};
    use kube::api::ObjectMeta;
    use portcullis_table::sidecar::parse_app_probes;

    fn http(port: IntOrString, path: &str) -> Probe {
        Probe {
            http_get: Some(HTTPGetAction { port, path: Some(path.into()), ..Default::default() }),
            period_seconds: Some(7),
            failure_threshold: Some(4),
            timeout_seconds: Some(2),
            ..Default::default()
        }
    }

    fn tcp(port: IntOrString) -> Probe {
        Probe { tcp_socket: Some(TCPSocketAction { port, host: None }), ..Default::default() }
    }

    fn app(liveness: Option<Probe>, readiness: Option<Probe>, startup: Option<Probe>) -> Container {
        Container {
            name: "app".into(),
            ports: Some(vec![
                ContainerPort { name: Some("http".into()), container_port: 8080, ..Default::default() },
                ContainerPort { name: Some("db".into()), container_port: 5432, ..Default::default() },
            ]),
            liveness_probe: liveness,
            readiness_probe: readiness,
            startup_probe: startup,
            ..Default::default()
        }
    }

    fn pod(loopback: Option<&str>, containers: Vec<Container>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: loopback.map(|v| [(ANNOTATION_APP_LOOPBACK.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec { containers, ..Default::default() }),
            ..Default::default()
        }
    }

    fn apply(p: &Pod, r: &Rewrite) -> Pod {
        let mut v = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut v, &r.ops).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn http_and_tcp_probes_on_named_and_numbered_ports_go_through_the_admin_port() {
        let mut live = http(IntOrString::String("http".into()), "/healthz?deep=1");
        live.http_get.as_mut().unwrap().http_headers =
            Some(vec![HTTPHeader { name: "X-Probe".into(), value: "yes".into() }]);
        let other = Container {
            name: "worker".into(),
            readiness_probe: Some(tcp(IntOrString::Int(7000))),
            liveness_probe: Some(Probe { exec: Some(ExecAction::default()), ..Default::default() }),
            ..Default::default()
        };
        let p = pod(
            Some("true"),
            vec![
                app(
                    Some(live),
                    Some(http(IntOrString::Int(8081), "ready")),
                    Some(tcp(IntOrString::String("db".into()))),
                ),
                other,
            ],
        );
        let r = rewrite(&p, 9901).unwrap().expect("rewritten");
        let out = apply(&p, &r);
        let cs = &out.spec.as_ref().unwrap().containers;
        for (c, kind) in
            [(0, ProbeKind::Liveness), (0, ProbeKind::Readiness), (0, ProbeKind::Startup), (1, ProbeKind::Readiness)]
        {
            let probe = probe_of(&cs[c], kind).unwrap();
            let h = probe.http_get.as_ref().unwrap();
            assert_eq!(h.port, IntOrString::Int(9901));
            assert_eq!(h.path.as_deref(), Some(app_health_path(&cs[c].name, kind).as_str()));
            assert!(probe.tcp_socket.is_none() && h.host.is_none() && h.http_headers.is_none());
        }
        let live = cs[0].liveness_probe.as_ref().unwrap();
        assert_eq!((live.period_seconds, live.failure_threshold, live.timeout_seconds), (Some(7), Some(4), Some(2)));
        assert!(cs[1].liveness_probe.as_ref().unwrap().exec.is_some(), "exec probes stay");

        assert_eq!(r.env.name, APP_PROBES_ENV);
        let probes = parse_app_probes(r.env.value.as_deref().unwrap()).expect("the sidecar's parser accepts it");
        let get = |c: &str, k| probes[&app_health_path(c, k)].clone();
        let l = get("app", ProbeKind::Liveness).http_get.unwrap();
        assert_eq!((l.port, l.path.as_str()), (8080, "/healthz?deep=1"));
        assert_eq!(l.http_headers, [ProbeHeader { name: "X-Probe".into(), value: "yes".into() }]);
        assert_eq!(get("app", ProbeKind::Liveness).timeout_seconds, 2);
        let rd = get("app", ProbeKind::Readiness).http_get.unwrap();
        assert_eq!((rd.port, rd.path.as_str()), (8081, "/ready"));
        assert_eq!(get("app", ProbeKind::Startup).tcp_socket.unwrap().port, 5432);
        assert_eq!(get("app", ProbeKind::Startup).timeout_seconds, 1, "Kubernetes' default");
        assert_eq!(get("worker", ProbeKind::Readiness).tcp_socket.unwrap().port, 7000);
        assert_eq!(probes.len(), 4);
    }

    #[test]
    fn without_the_annotation_nothing_changes() {
        let c = app(Some(http(IntOrString::String("http".into()), "/")), None, Some(tcp(IntOrString::Int(1))));
        for v in [None, Some("false")] {
            assert_eq!(rewrite(&pod(v, vec![c.clone()]), 9901), Ok(None), "{v:?}");
        }
        // Loopback, but nothing to rewrite.
        assert_eq!(rewrite(&pod(Some("true"), vec![app(None, None, None)]), 9901), Ok(None));
        assert_eq!(rewrite(&pod(Some("yes"), vec![c]), 9901), Err(InjectError::BadAppLoopback("yes".into())));
    }

    #[test]
    fn what_cannot_be_carried_is_refused_naming_container_and_probe() {
        let mut host = http(IntOrString::Int(8080), "/");
        host.http_get.as_mut().unwrap().host = Some("10.0.0.1".into());
        let mut https = http(IntOrString::Int(8443), "/");
        https.http_get.as_mut().unwrap().scheme = Some("HTTPS".into());
        let grpc = Probe { grpc: Some(GRPCAction { port: 9000, ..Default::default() }), ..Default::default() };
        for (probe, want) in [
            (host, "httpGet.host"),
            (https, "HTTPS"),
            (grpc, "grpc"),
            (http(IntOrString::String("nope".into()), "/"), "\"nope\""),
            (tcp(IntOrString::Int(0)), "0"),
            (tcp(IntOrString::Int(70000)), "70000"),
        ] {
            let e = rewrite(&pod(Some("true"), vec![app(None, Some(probe), None)]), 9901).unwrap_err().to_string();
            assert!(e.contains("\"app\"") && e.contains("readinessProbe") && e.contains(want), "{e}");
        }
        // A numeric string names no port but is read as the number, as the kubelet does.
        let r = rewrite(&pod(Some("true"), vec![app(None, Some(tcp(IntOrString::String("8080".into()))), None)]), 1);
        assert!(r.unwrap().is_some());
    }
}
