//! The bypass guard: can traffic reach a protected Service's pods without passing the proxy? Pure; no I/O.
//!
//! A protected Service must stay inside the cluster (ClusterIP, or a load balancer marked internal by one of
//! [`INTERNAL_LB_ANNOTATIONS`], no `externalIPs`, not `NodePort`) and every port must target the proxy (the
//! configured `--sidecar-proxy-port`, [`DEFAULT_PROXY_PORT`] by default, or the port name [`PROXY_PORT_NAME`]) —
//! [`check_service`]; and its pods must admit ingress on the sidecar's ports only (a NetworkPolicy, ours or an
//! equivalent one) — [`crate::network_policy::isolation_findings`]. Otherwise clients can skip the keys, CIDRs and
//! limits. A `LoadBalancer` or `NodePort` Service with `externalTrafficPolicy: Cluster` (the default) is flagged
//! too: nodes SNAT the traffic they forward, so the proxy sees node addresses and `sourceRanges` cannot match the
//! real clients ([`reason::CLIENT_ADDRESS_HIDDEN`]).

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The proxy sidecar's default port and its container port name.
pub use crate::sidecar_contract::{DEFAULT_PROXY_PORT, PROXY_PORT_NAME};

/// Annotations (and values, compared case-insensitively) that make a `LoadBalancer` Service internal.
pub const INTERNAL_LB_ANNOTATIONS: &[(&str, &str)] = &[
    ("networking.gke.io/load-balancer-type", "internal"),
    ("cloud.google.com/load-balancer-type", "internal"),
    ("service.beta.kubernetes.io/aws-load-balancer-internal", "true"),
    ("service.beta.kubernetes.io/aws-load-balancer-scheme", "internal"),
    ("service.beta.kubernetes.io/azure-load-balancer-internal", "true"),
    ("service.beta.kubernetes.io/oci-load-balancer-internal", "true"),
];

pub mod reason {
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    pub const NODE_PORT: &str = "NodePort";
    pub const PUBLIC_LOAD_BALANCER: &str = "PublicLoadBalancer";
    pub const EXTERNAL_IPS: &str = "ExternalIPs";
    pub const TARGET_PORT_BYPASSES_PROXY: &str = "TargetPortBypassesProxy";
    /// `LoadBalancer`/`NodePort` with `externalTrafficPolicy: Cluster`: client addresses are SNATed away.
    pub const CLIENT_ADDRESS_HIDDEN: &str = "ClientAddressHidden";
}

/// One way a Service can be reached without the proxy, with what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub reason: &'static str,
    pub message: String,
}

/// Whether `annotations` mark a load balancer as internal.
pub fn is_internal_lb(service: &Service) -> bool {
    let Some(a) = service.metadata.annotations.as_ref() else { return false };
    INTERNAL_LB_ANNOTATIONS.iter().any(|(k, v)| a.get(*k).is_some_and(|have| have.trim().eq_ignore_ascii_case(v)))
}

/// Everything that exposes Service `name` (`None`: it does not exist) past the proxy, or hides its clients'
/// addresses from the proxy; empty when it is internal. `proxy_port`: the sidecars' proxy port.
pub fn check_service(name: &str, service: Option<&Service>, proxy_port: i32) -> Vec<Finding> {
    let Some(svc) = service else {
        return vec![Finding {
            reason: reason::SERVICE_NOT_FOUND,
            message: format!(
                "Service {name:?} not found in the plan's namespace; create it (type ClusterIP, targetPort {proxy_port})"
            ),
        }];
    };
    let spec = svc.spec.clone().unwrap_or_default();
    let mut out = Vec::new();
    match spec.type_.as_deref() {
        Some("NodePort") => out.push(Finding {
            reason: reason::NODE_PORT,
            message: format!(
                "Service {name:?} is type NodePort, so every node forwards to its pods from outside the cluster; set spec.type: ClusterIP"
            ),
        }),
        Some("LoadBalancer") if !is_internal_lb(svc) => out.push(Finding {
            reason: reason::PUBLIC_LOAD_BALANCER,
            message: format!(
                "Service {name:?} is type LoadBalancer without an internal-load-balancer annotation (e.g. \
                 networking.gke.io/load-balancer-type: Internal or service.beta.kubernetes.io/aws-load-balancer-scheme: internal); \
                 set spec.type: ClusterIP or mark the load balancer internal"
            ),
        }),
        _ => {}
    }
    let forwards_from_nodes = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    if forwards_from_nodes && spec.external_traffic_policy.as_deref().is_none_or(|p| p == "Cluster") {
        out.push(Finding {
            reason: reason::CLIENT_ADDRESS_HIDDEN,
            message: format!(
                "Service {name:?} is type {} with externalTrafficPolicy: Cluster, so nodes SNAT the traffic they \
                 forward and the proxy sees node addresses: sourceRanges cannot match the real clients; set \
                 spec.externalTrafficPolicy: Local",
                spec.type_.as_deref().unwrap_or_default()
            ),
        });
    }
    if let Some(ips) = spec.external_ips.as_ref().filter(|v| !v.is_empty()) {
        out.push(Finding {
            reason: reason::EXTERNAL_IPS,
            message: format!("Service {name:?} has spec.externalIPs {ips:?}; remove them"),
        });
    }
    if spec.type_.as_deref() != Some("ExternalName") {
        for p in spec.ports.as_deref().unwrap_or_default() {
            let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
            let ok = match &target {
                IntOrString::Int(n) => *n == proxy_port,
                IntOrString::String(s) => s == PROXY_PORT_NAME || s.parse::<i32>() == Ok(proxy_port),
            };
            if !ok {
                let port = match &p.name {
                    Some(n) if !n.is_empty() => format!("{} ({n})", p.port),
                    _ => p.port.to_string(),
                };
                let target = match target {
                    IntOrString::Int(n) => n.to_string(),
                    IntOrString::String(s) => format!("{s:?}"),
                };
                out.push(Finding {
                    reason: reason::TARGET_PORT_BYPASSES_PROXY,
                    message: format!(
                        "Service {name:?} port {port} targets {target}, which bypasses the proxy; set its targetPort to {proxy_port} (or the port name {PROXY_PORT_NAME:?})"
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::exposure_condition;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use std::collections::BTreeMap;

    const P: i32 = DEFAULT_PROXY_PORT as i32;

    fn svc(type_: &str, target: Option<IntOrString>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: target,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_policy(mut s: Service, policy: Option<&str>) -> Service {
        s.spec.as_mut().unwrap().external_traffic_policy = policy.map(Into::into);
        s
    }

    fn internal(mut s: Service) -> Service {
        s.metadata.annotations =
            Some(BTreeMap::from([("networking.gke.io/load-balancer-type".into(), "Internal".into())]));
        s
    }

    fn reasons(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.reason).collect()
    }

    #[test]
    fn cluster_ip_to_proxy_port_is_internal() {
        assert!(check_service("a", Some(&svc("ClusterIP", Some(IntOrString::Int(8443)))), P).is_empty());
        assert!(
            check_service("a", Some(&svc("ClusterIP", Some(IntOrString::String("portcullis".into())))), P).is_empty()
        );
        let c = exposure_condition(&[("a".into(), vec![])]);
        assert!(c.ok);
        assert_eq!((c.type_, c.reason), ("Protected", "Internal"));
    }

    /// Every Service shape, with the findings it must produce (in order).
    #[test]
    fn every_service_shape() {
        let to_proxy = || Some(IntOrString::Int(8443));
        let cases: Vec<(&str, Service, Vec<&str>)> = vec![
            ("ClusterIP", svc("ClusterIP", to_proxy()), vec![]),
            ("ClusterIP, named port", svc("ClusterIP", Some(IntOrString::String("portcullis".into()))), vec![]),
            ("ClusterIP, app port", svc("ClusterIP", Some(IntOrString::Int(8080))), vec!["TargetPortBypassesProxy"]),
            ("ClusterIP, no targetPort", svc("ClusterIP", None), vec!["TargetPortBypassesProxy"]),
            ("NodePort, Cluster (default)", svc("NodePort", to_proxy()), vec!["NodePort", "ClientAddressHidden"]),
            (
                "NodePort, Cluster (explicit)",
                with_policy(svc("NodePort", to_proxy()), Some("Cluster")),
                vec!["NodePort", "ClientAddressHidden"],
            ),
            ("NodePort, Local", with_policy(svc("NodePort", to_proxy()), Some("Local")), vec!["NodePort"]),
            (
                "public LoadBalancer, Cluster",
                svc("LoadBalancer", to_proxy()),
                vec!["PublicLoadBalancer", "ClientAddressHidden"],
            ),
            (
                "public LoadBalancer, Local",
                with_policy(svc("LoadBalancer", to_proxy()), Some("Local")),
                vec!["PublicLoadBalancer"],
            ),
            ("internal LoadBalancer, Cluster", internal(svc("LoadBalancer", to_proxy())), vec!["ClientAddressHidden"]),
            (
                "internal LoadBalancer, Local",
                internal(with_policy(svc("LoadBalancer", to_proxy()), Some("Local"))),
                vec![],
            ),
            (
                "internal LoadBalancer, Local, app port",
                internal(with_policy(svc("LoadBalancer", Some(IntOrString::Int(8080))), Some("Local"))),
                vec!["TargetPortBypassesProxy"],
            ),
            ("ExternalName", svc("ExternalName", None), vec![]),
        ];
        for (what, s, want) in &cases {
            let f = check_service("orders", Some(s), P);
            assert_eq!(&reasons(&f), want, "{what}: {f:?}");
            let hidden = f.iter().find(|f| f.reason == reason::CLIENT_ADDRESS_HIDDEN);
            if let Some(h) = hidden {
                assert!(h.message.contains("externalTrafficPolicy: Local"), "{what}: says what to set: {}", h.message);
                assert!(h.message.contains("sourceRanges"), "{what}: says what breaks: {}", h.message);
            }
            let c = exposure_condition(&[("orders".into(), f.clone())]);
            assert_eq!(c.ok, want.is_empty(), "{what}");
            assert_eq!(c.reason, want.first().copied().unwrap_or("Internal"), "{what}");
        }
    }

    #[test]
    fn node_port_and_wrong_target_port() {
        let f = check_service(
            "orders",
            Some(&with_policy(svc("NodePort", Some(IntOrString::Int(8080))), Some("Local"))),
            P,
        );
        assert_eq!(reasons(&f), ["NodePort", "TargetPortBypassesProxy"]);
        assert!(f[0].message.contains("ClusterIP"));
        assert!(
            f[1].message.contains("port 80 (http)") && f[1].message.contains("8080") && f[1].message.contains("8443")
        );
        let c = exposure_condition(&[("orders".into(), f)]);
        assert!(!c.ok);
        assert_eq!(c.reason, "NodePort");
        // Absent targetPort means the port itself.
        let f = check_service("orders", Some(&svc("ClusterIP", None)), P);
        assert_eq!(reasons(&f), ["TargetPortBypassesProxy"]);
        assert!(f[0].message.contains("targets 80"));
    }

    /// `--sidecar-proxy-port` other than 8443: that port (and the port name) is the proxy, 8443 is not.
    #[test]
    fn the_configured_proxy_port_is_the_proxy() {
        assert!(check_service("a", Some(&svc("ClusterIP", Some(IntOrString::Int(7443)))), 7443).is_empty());
        assert!(check_service("a", Some(&svc("ClusterIP", Some(IntOrString::String("7443".into())))), 7443).is_empty());
        assert!(
            check_service("a", Some(&svc("ClusterIP", Some(IntOrString::String("portcullis".into())))), 7443)
                .is_empty()
        );
        let f = check_service("a", Some(&svc("ClusterIP", Some(IntOrString::Int(8443)))), 7443);
        assert_eq!(reasons(&f), ["TargetPortBypassesProxy"]);
        assert!(f[0].message.contains("set its targetPort to 7443"), "{}", f[0].message);
        assert!(check_service("gone", None, 7443)[0].message.contains("targetPort 7443"));
    }

    #[test]
    fn load_balancers_need_an_internal_annotation() {
        let mut lb = with_policy(svc("LoadBalancer", Some(IntOrString::Int(8443))), Some("Local"));
        assert_eq!(reasons(&check_service("a", Some(&lb), P)), ["PublicLoadBalancer"]);
        for (k, v) in INTERNAL_LB_ANNOTATIONS {
            lb.metadata.annotations = Some(BTreeMap::from([(k.to_string(), v.to_uppercase())]));
            assert!(check_service("a", Some(&lb), P).is_empty(), "{k}");
        }
        lb.metadata.annotations =
            Some(BTreeMap::from([("service.beta.kubernetes.io/aws-load-balancer-internal".into(), "false".into())]));
        assert_eq!(reasons(&check_service("a", Some(&lb), P)), ["PublicLoadBalancer"]);
    }

    #[test]
    fn external_ips_and_missing_service() {
        let mut s = svc("ClusterIP", Some(IntOrString::Int(8443)));
        s.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.7".into()]);
        assert_eq!(reasons(&check_service("a", Some(&s), P)), ["ExternalIPs"]);
        let f = check_service("gone", None, P);
        assert_eq!(reasons(&f), ["ServiceNotFound"]);
        let c = exposure_condition(&[("ok".into(), vec![]), ("gone".into(), f)]);
        assert_eq!((c.ok, c.reason), (false, "ServiceNotFound"));
        assert!(c.message.contains("\"gone\""));
    }
}
