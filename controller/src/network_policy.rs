//! The per-Service NetworkPolicy `portcullis-<service>` (closed by default) and the isolation check behind the
//! `Exposure` condition. Pure: no I/O (the writing is in `runtime::access`).
//!
//! The policy selects the Service's pods (its `spec.selector`) and admits ingress on two **named** ports only: the
//! sidecar's proxy port (`portcullis`) from anywhere, and its admin port (`portcullis-adm`) from the peers of
//! `--network-policy-admin-from` (the controller, which reads `/revision` for `Enforced`, and whoever scrapes
//! `/metrics`). Named ports follow `--sidecar-proxy-port`/`--sidecar-admin-port` without a second setting.
//!
//! It is written unless every UsagePlan granting the Service opts out: `spec.networkPolicy: false`, or unset with
//! the controller's `--network-policy-default=false` (chart value `networkPolicy.enabled`).
//!
//! Isolation ([`isolation_findings`]) follows NetworkPolicy semantics: a pod is isolated for ingress when at least
//! one policy selecting it has the `Ingress` type, and what it admits is the union of the ingress rules of every
//! policy selecting it. The pods are isolated when each admits TCP on the sidecar's ports and nothing else —
//! whether the policy is ours or an equivalent one written by someone else.

use crate::crd::UsagePlan;
use crate::exposure::Finding;
use crate::webhook::inject::{ADMIN_PORT_NAME, CONTAINER_NAME, PROXY_PORT_NAME};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

pub mod reason {
    /// No NetworkPolicy isolates the Service's pods: their other ports are open to whatever reaches the pod IP.
    pub const NOT_ISOLATED: &str = "NotIsolated";
    /// A NetworkPolicy selecting the pods admits ports other than the sidecar's.
    pub const POLICY_ADMITS_OTHER_PORTS: &str = "PolicyAdmitsOtherPorts";
    /// The Service selects no pods by label, so no NetworkPolicy can be derived from it.
    pub const NO_SELECTOR: &str = "NoSelector";
}

/// Name of the NetworkPolicy of a Service.
pub fn name(service: &str) -> String {
    format!("portcullis-{service}")
}

/// How the controller writes NetworkPolicies.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Write the policy for plans that leave `spec.networkPolicy` unset.
    pub default_on: bool,
    /// Who may reach the sidecar's admin port. Empty: no ingress rule for it (only the node, where the network
    /// plugin exempts kubelet probes).
    pub admin_from: Vec<NetworkPolicyPeer>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { default_on: true, admin_from: Vec::new() }
    }
}

/// Command-line settings (`#[command(flatten)]` into the controller's arguments).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct NetworkPolicyArgs {
    /// Write the NetworkPolicy `portcullis-<service>` for UsagePlans that leave `spec.networkPolicy` unset.
    #[arg(long, env = "PORTCULLIS_NETWORK_POLICY_DEFAULT", default_value_t = true, action = clap::ArgAction::Set)]
    pub network_policy_default: bool,
    /// Who may reach the sidecars' admin port through that policy: a JSON array of NetworkPolicyPeer objects.
    /// Unset: every pod of the controller's own namespace (`POD_NAMESPACE`).
    #[arg(long, env = "PORTCULLIS_NETWORK_POLICY_ADMIN_FROM")]
    pub network_policy_admin_from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("--network-policy-admin-from: {0}")]
pub struct SettingsError(String);

impl NetworkPolicyArgs {
    /// The settings; `own_namespace` is the default admin peer.
    pub fn settings(&self, own_namespace: &str) -> Result<Settings, SettingsError> {
        let admin_from = match self.network_policy_admin_from.as_deref().map(str::trim) {
            None | Some("") => vec![namespace_peer(own_namespace)],
            Some(json) => parse_peers(json)?,
        };
        Ok(Settings { default_on: self.network_policy_default, admin_from })
    }
}

/// Every pod of namespace `ns`.
pub fn namespace_peer(ns: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A JSON array of NetworkPolicyPeer; each must select something (an empty peer would admit everyone).
pub fn parse_peers(json: &str) -> Result<Vec<NetworkPolicyPeer>, SettingsError> {
    let peers: Vec<NetworkPolicyPeer> = serde_json::from_str(json)
        .map_err(|e| SettingsError(format!("not a JSON array of NetworkPolicyPeer objects: {e}")))?;
    for (i, p) in peers.iter().enumerate() {
        if p.ip_block.is_none() && p.namespace_selector.is_none() && p.pod_selector.is_none() {
            return Err(SettingsError(format!(
                "entry {i} sets none of ipBlock, namespaceSelector, podSelector (it would select nothing useful)"
            )));
        }
    }
    Ok(peers)
}

/// Whether `plan` asks for the policy of the Services it grants.
pub fn wanted_by(plan: &UsagePlan, settings: &Settings) -> bool {
    plan.spec.network_policy.unwrap_or(settings.default_on)
}

/// The policy of `service`, selecting the pods of `selector`. `meta` carries name, labels and owners.
pub fn render(meta: ObjectMeta, selector: &BTreeMap<String, String>, settings: &Settings) -> NetworkPolicy {
    let port = |name: &str| NetworkPolicyPort {
        port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".into()),
        end_port: None,
    };
    let mut ingress = vec![NetworkPolicyIngressRule { from: None, ports: Some(vec![port(PROXY_PORT_NAME)]) }];
    if !settings.admin_from.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(settings.admin_from.clone()),
            ports: Some(vec![port(ADMIN_PORT_NAME)]),
        });
    }
    NetworkPolicy {
        metadata: meta,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(selector.clone()), ..Default::default() }),
            policy_types: Some(vec!["Ingress".into()]),
            egress: None,
            ingress: Some(ingress),
        }),
    }
}

// === isolation ===

/// The sidecar's ports as a policy may name them: by name, or by the numbers the sidecar declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarPorts {
    pub proxy: i32,
    pub admin: i32,
}

impl Default for SidecarPorts {
    fn default() -> Self {
        use crate::webhook::inject::{DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT};
        Self { proxy: i32::from(DEFAULT_PROXY_PORT), admin: i32::from(DEFAULT_ADMIN_PORT) }
    }
}

impl SidecarPorts {
    /// The ports the pod's `portcullis-proxy` container declares, else `default`.
    pub fn of(pod: &Pod, default: &SidecarPorts) -> SidecarPorts {
        let declared = |name: &str| {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .find(|c| c.name == CONTAINER_NAME)?
                .ports
                .as_ref()?
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port)
        };
        SidecarPorts {
            proxy: declared(PROXY_PORT_NAME).unwrap_or(default.proxy),
            admin: declared(ADMIN_PORT_NAME).unwrap_or(default.admin),
        }
    }

    fn admits_only_sidecar(&self, p: &NetworkPolicyPort) -> bool {
        let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
        let ours = match &p.port {
            None => false, // every port
            Some(IntOrString::String(name)) => {
                (name == PROXY_PORT_NAME || name == ADMIN_PORT_NAME) && p.end_port.is_none()
            }
            Some(IntOrString::Int(n)) => {
                (*n == self.proxy || *n == self.admin) && p.end_port.is_none_or(|end| end == *n)
            }
        };
        // A rule for another protocol on another port is still a hole (the app may listen on UDP).
        tcp && ours
    }
}

/// Whether `selector` selects an object labelled `labels` (matchLabels and matchExpressions; an empty selector
/// selects everything, as in a NetworkPolicy's podSelector).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let have = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => have.is_none_or(|h| !values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false, // the API server refuses other operators; never match what we cannot read
        }
    });
    labels_ok && exprs_ok
}

fn isolates_ingress(np: &NetworkPolicy) -> bool {
    let Some(spec) = &np.spec else { return false };
    match &spec.policy_types {
        Some(types) => types.iter().any(|t| t == "Ingress"),
        // Unset policyTypes: Ingress always applies (and Egress when egress rules exist).
        None => true,
    }
}

/// Findings about the ingress isolation of Service `service`'s pods. `selector` is the Service's `spec.selector`;
/// `pods` the known pods of the Service (when empty, a pod carrying exactly the selector's labels stands in);
/// `policies` every NetworkPolicy of the namespace; `default_ports` the sidecar ports when a pod declares none.
pub fn isolation_findings<'a>(
    service: &str,
    selector: Option<&BTreeMap<String, String>>,
    pods: &[&Pod],
    policies: impl IntoIterator<Item = &'a NetworkPolicy> + Clone,
    default_ports: &SidecarPorts,
) -> Vec<Finding> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return vec![Finding {
            reason: reason::NO_SELECTOR,
            message: format!(
                "Service {service:?} has no spec.selector, so no NetworkPolicy can be derived for its pods; give it a \
                 selector, or isolate its pods with a NetworkPolicy admitting only ports {PROXY_PORT_NAME:?} and \
                 {ADMIN_PORT_NAME:?}"
            ),
        }];
    };
    let stand_in =
        Pod { metadata: ObjectMeta { labels: Some(selector.clone()), ..Default::default() }, ..Default::default() };
    let pods: Vec<&Pod> = if pods.is_empty() { vec![&stand_in] } else { pods.to_vec() };
    let fix = format!(
        "let the controller write NetworkPolicy {:?} (UsagePlan spec.networkPolicy: true, or leave it unset with the \
         controller's default on) or isolate them with a NetworkPolicy admitting only ports {PROXY_PORT_NAME:?} and \
         {ADMIN_PORT_NAME:?}",
        name(service)
    );
    let mut unisolated = Vec::new();
    let mut holes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in &pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let ports = SidecarPorts::of(pod, default_ports);
        let selecting: Vec<&NetworkPolicy> = policies
            .clone()
            .into_iter()
            .filter(|np| isolates_ingress(np))
            .filter(|np| np.spec.as_ref().and_then(|s| s.pod_selector.as_ref()).is_some_and(|s| selects(s, &labels)))
            .collect();
        if selecting.is_empty() {
            unisolated.push(pod.metadata.name.clone().unwrap_or_default());
            continue;
        }
        for np in selecting {
            for rule in np.spec.as_ref().and_then(|s| s.ingress.as_deref()).unwrap_or_default() {
                let open: Vec<String> = match rule.ports.as_deref() {
                    None | Some([]) => vec!["every port".into()],
                    Some(list) => list.iter().filter(|p| !ports.admits_only_sidecar(p)).map(describe_port).collect(),
                };
                if !open.is_empty() {
                    let e = holes.entry(np.metadata.name.clone().unwrap_or_default()).or_default();
                    for o in open {
                        if !e.contains(&o) {
                            e.push(o);
                        }
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    if !unisolated.is_empty() {
        let which = if unisolated.iter().all(String::is_empty) {
            "the pods".to_string()
        } else {
            format!("pod(s) {}", unisolated.join(", "))
        };
        out.push(Finding {
            reason: reason::NOT_ISOLATED,
            message: format!(
                "no NetworkPolicy isolates {which} of Service {service:?}, so anything that reaches a pod IP reaches \
                 the app's own port without the proxy; {fix}"
            ),
        });
    }
    for (np, open) in holes {
        out.push(Finding {
            reason: reason::POLICY_ADMITS_OTHER_PORTS,
            message: format!(
                "NetworkPolicy {np:?} admits {} to the pods of Service {service:?}, past the proxy; restrict its \
                 ingress to ports {PROXY_PORT_NAME:?} and {ADMIN_PORT_NAME:?}",
                open.join(", ")
            ),
        });
    }
    out
}

fn describe_port(p: &NetworkPolicyPort) -> String {
    let proto = p.protocol.as_deref().unwrap_or("TCP");
    match (&p.port, p.end_port) {
        (None, _) => format!("every {proto} port"),
        (Some(IntOrString::Int(n)), Some(end)) if end != *n => format!("{proto} ports {n}-{end}"),
        (Some(IntOrString::Int(n)), _) => format!("{proto} port {n}"),
        (Some(IntOrString::String(s)), _) => format!("{proto} port {s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const PORTS: SidecarPorts = SidecarPorts { proxy: 8443, admin: 9901 };

    fn ours(selector: &[(&str, &str)]) -> NetworkPolicy {
        let settings = Settings { default_on: true, admin_from: vec![namespace_peer("portcullis-system")] };
        render(ObjectMeta { name: Some(name("api")), ..Default::default() }, &labels(selector), &settings)
    }

    fn np(v: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(v).unwrap()
    }

    fn reasons(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.reason).collect()
    }

    #[test]
    fn rendered_policy_admits_the_named_sidecar_ports_only() {
        let p = ours(&[("app", "api")]);
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
        let rules = spec.ingress.as_ref().unwrap();
        assert_eq!(rules.len(), 2);
        assert!(rules[0].from.is_none(), "the proxy port is open to every client");
        assert_eq!(rules[0].ports.as_ref().unwrap()[0].port, Some(IntOrString::String("portcullis".into())));
        assert_eq!(rules[1].ports.as_ref().unwrap()[0].port, Some(IntOrString::String("portcullis-adm".into())));
        assert_eq!(rules[1].from.as_ref().unwrap().len(), 1);
        let no_admin = render(ObjectMeta::default(), &labels(&[("app", "api")]), &Settings::default());
        assert_eq!(no_admin.spec.unwrap().ingress.unwrap().len(), 1, "no peers: no admin rule (never from: [])");
        assert!(isolation_findings("api", Some(&labels(&[("app", "api")])), &[], [&p], &PORTS).is_empty());
    }

    #[test]
    fn admin_peers_parse_and_refuse_empty_peers() {
        let args = |v: Option<&str>| NetworkPolicyArgs {
            network_policy_default: true,
            network_policy_admin_from: v.map(Into::into),
        };
        let s = args(None).settings("pc-system").unwrap();
        assert_eq!(s.admin_from, vec![namespace_peer("pc-system")]);
        let s = args(Some(
            r#"[{"namespaceSelector":{"matchLabels":{"name":"monitoring"}}},{"ipBlock":{"cidr":"10.0.0.0/8"}}]"#,
        ))
        .settings("x")
        .unwrap();
        assert_eq!(s.admin_from.len(), 2);
        assert_eq!(args(Some("[]")).settings("x").unwrap().admin_from, vec![]);
        for bad in ["{}", "[{}]", "nope"] {
            let e = args(Some(bad)).settings("x").unwrap_err().to_string();
            assert!(e.starts_with("--network-policy-admin-from"), "{e}");
        }
    }

    #[test]
    fn no_policy_means_not_isolated_with_the_fix_named() {
        let f = isolation_findings("api", Some(&labels(&[("app", "api")])), &[], [], &PORTS);
        assert_eq!(reasons(&f), ["NotIsolated"]);
        assert!(f[0].message.contains("\"portcullis-api\"") && f[0].message.contains("spec.networkPolicy"), "{f:?}");
        let f = isolation_findings("api", None, &[], [], &PORTS);
        assert_eq!(reasons(&f), ["NoSelector"]);
        // A policy for other pods, or an egress-only one, does not isolate these.
        let other = ours(&[("app", "other")]);
        let egress = np(json!({"metadata": {"name": "e"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}));
        let f = isolation_findings("api", Some(&labels(&[("app", "api")])), &[], [&other, &egress], &PORTS);
        assert_eq!(reasons(&f), ["NotIsolated"]);
    }

    #[test]
    fn an_equivalent_policy_counts_and_holes_are_named() {
        let sel = labels(&[("app", "api"), ("tier", "web")]);
        // Someone else's: selects by one label, numbered ports, policyTypes unset.
        let equivalent = np(json!({"metadata": {"name": "theirs"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]},
            "ingress": [{"ports": [{"port": 8443}, {"port": 9901, "protocol": "TCP"}]}]}}));
        assert!(isolation_findings("api", Some(&sel), &[], [&equivalent], &PORTS).is_empty());
        // A second policy opening the app's port is a hole even next to ours (policies add up).
        let allow_app = np(json!({"metadata": {"name": "allow-app"}, "spec": {
            "podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": 8080}, {"port": 9000, "endPort": 9100}, {"port": 8443, "protocol": "UDP"}]}]}}));
        let f = isolation_findings("api", Some(&sel), &[], [&ours(&[("app", "api")]), &allow_app], &PORTS);
        assert_eq!(reasons(&f), ["PolicyAdmitsOtherPorts"]);
        let m = &f[0].message;
        assert!(m.contains("\"allow-app\"") && m.contains("TCP port 8080") && m.contains("TCP ports 9000-9100"), "{m}");
        assert!(m.contains("UDP port 8443"), "{m}");
        // A rule without ports admits every port.
        let all = np(json!({"metadata": {"name": "all"}, "spec": {"podSelector": {}, "ingress": [{}]}}));
        let f = isolation_findings("api", Some(&sel), &[], [&all], &PORTS);
        assert!(f[0].message.contains("every port"), "{f:?}");
        // A deny-all policy (no rules) isolates, admitting nothing: fine for the bypass question.
        let deny = np(json!({"metadata": {"name": "deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}));
        assert!(isolation_findings("api", Some(&sel), &[], [&deny], &PORTS).is_empty());
    }

    #[test]
    fn real_pods_are_checked_with_their_own_labels_and_ports() {
        let pod = |name: &str, extra: &[(&str, &str)], proxy: i32| {
            let mut l = labels(&[("app", "api")]);
            l.extend(labels(extra));
            Pod {
                metadata: ObjectMeta { name: Some(name.into()), labels: Some(l), ..Default::default() },
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: CONTAINER_NAME.into(),
                        ports: Some(vec![ContainerPort {
                            name: Some(PROXY_PORT_NAME.into()),
                            container_port: proxy,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        // Excludes canary pods: they are not isolated.
        let theirs = np(json!({"metadata": {"name": "theirs"}, "spec": {
            "podSelector": {"matchLabels": {"app": "api"},
                            "matchExpressions": [{"key": "track", "operator": "NotIn", "values": ["canary"]}]},
            "ingress": [{"ports": [{"port": 7000}]}]}}));
        let (a, b) = (pod("api-a", &[], 7000), pod("api-b", &[("track", "canary")], 7000));
        let f = isolation_findings("api", Some(&labels(&[("app", "api")])), &[&a, &b], [&theirs], &PORTS);
        assert_eq!(reasons(&f), ["NotIsolated"]);
        assert!(f[0].message.contains("pod(s) api-b"), "{f:?}");
        // Port 7000 is fine for a pod whose sidecar listens there, not for one on the default port.
        let c = pod("api-c", &[], 8443);
        let f = isolation_findings("api", Some(&labels(&[("app", "api")])), &[&a, &c], [&theirs], &PORTS);
        assert_eq!(reasons(&f), ["PolicyAdmitsOtherPorts"]);
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let l = labels(&[("app", "api"), ("tier", "web")]);
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        };
        assert!(selects(&LabelSelector::default(), &l));
        assert!(selects(&expr("app", "In", &["api", "x"]), &l));
        assert!(!selects(&expr("app", "NotIn", &["api"]), &l));
        assert!(selects(&expr("track", "NotIn", &["canary"]), &l));
        assert!(selects(&expr("tier", "Exists", &[]), &l));
        assert!(!selects(&expr("tier", "DoesNotExist", &[]), &l));
        assert!(!selects(&expr("tier", "Bogus", &[]), &l));
        let ml = LabelSelector { match_labels: Some(labels(&[("app", "other")])), ..Default::default() };
        assert!(!selects(&ml, &l));
    }
}
