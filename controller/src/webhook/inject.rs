//! Sidecar injection as a pure function (no I/O): a Pod and the injection settings in, a decision out — leave the
//! Pod alone, refuse it (naming the bad annotation and value), or an RFC 6902 JSON Patch that adds the
//! `portcullis-proxy` container (and, for `portcullis.dev/app-loopback: "true"` pods, moves the app's probes onto
//! the sidecar's admin port: [`super::probes`]). The names it writes and reads are the sidecar contract
//! ([`crate::sidecar_contract`]); per-workload settings come from the pod's annotations, each defaulting to the
//! controller's chart-wide flag ([`SidecarOptions`]).

pub use crate::sidecar_contract::{
    ADMIN_PORT_NAME, ANNOTATION_ADMIN_ADDRESS, ANNOTATION_APP_LOOPBACK, ANNOTATION_CLIENT_CA_SECRET,
    ANNOTATION_CPU_LIMIT, ANNOTATION_CPU_REQUEST, ANNOTATION_MEMORY_LIMIT, ANNOTATION_MEMORY_REQUEST,
    ANNOTATION_PROXY_PROTOCOL, ANNOTATION_REQUIRE_TLS, ANNOTATION_SERVICE, ANNOTATION_TLS_SECRET,
    ANNOTATION_TRUSTED_PROXIES, ANNOTATION_UPSTREAM_PORT, ANNOTATION_WORKERS, CONTAINER_NAME, DEFAULT_ADMIN_PORT,
    DEFAULT_PROXY_PORT, INJECT_KEY, PROXY_PORT_NAME, TLS_MOUNT_PATH, TLS_VOLUME_NAME,
};
use crate::sidecar_contract::{
    ANNOTATION_ACCESS_LOG, ANNOTATION_ACCESS_LOG_SAMPLE, ANNOTATION_CLIENT_METRICS, CLIENT_CA_KEY,
    CLIENT_CA_MOUNT_PATH, CLIENT_CA_VOLUME_NAME, arg, proxy_flag,
};
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, Pod,
    Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// UID/GID of the distroless `nonroot` user.
const NONROOT_ID: i64 = 65532;
/// Most serving threads a sidecar may be given by annotation.
pub const MAX_WORKERS: u32 = 256;
/// Most clients a sidecar may give their own metric series (`portcullis.dev/client-metrics`).
pub const MAX_CLIENT_METRICS: u32 = 100_000;

/// How the sidecar is built.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectSettings {
    pub sidecar_image: String,
    pub image_pull_policy: Option<String>,
    pub proxy_port: u16,
    pub admin_port: u16,
    pub resources: Option<ResourceRequirements>,
    /// The shared store the sidecars count global limits in (`None`: no store configured).
    pub store: Option<SidecarStore>,
    /// Chart-wide defaults of the per-workload settings (each overridden by its pod annotation).
    pub defaults: SidecarOptions,
}

/// Per-workload sidecar settings: the controller's `--sidecar-*` flags give the defaults, the pod's annotations
/// ([`crate::sidecar_contract`]) override them one by one.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SidecarOptions {
    /// CIDRs (or addresses) whose forwarding headers are believed (`--trusted-proxies`).
    pub trusted_proxies: Vec<String>,
    /// Accept PROXY protocol headers from the trusted proxies (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// Secret whose `ca.crt` verifies client certificates (`--client-ca`); only for pods with a TLS Secret.
    pub client_ca_secret: Option<String>,
    /// Refuse keys over plain HTTP (`--require-tls`); only for pods with a TLS Secret.
    pub require_tls: bool,
    /// Serving threads (`--workers`; `None`: the proxy's default, one per CPU).
    pub workers: Option<u32>,
    /// Address the admin listener binds (`None`: `0.0.0.0`).
    pub admin_address: Option<IpAddr>,
    /// `--access-log` (`json`/`off`; `None`: the proxy's default, `json`).
    pub access_log: Option<&'static str>,
    /// `--access-log-sample` as written in the annotation (validated: 0 to 1).
    pub access_log_sample: Option<String>,
    /// `--client-metrics` (`None`: the proxy's default, 100).
    pub client_metrics: Option<u32>,
}

/// What an injected sidecar is told about the shared store: its URL and command timeout as flags, its credentials
/// from the Secret [`crate::store::SIDECAR_CREDENTIALS_SECRET`] in the pod's namespace (which the controller keeps
/// there; `optional`, so a pod starts before the copy exists and a store without credentials needs none).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SidecarStore {
    pub url: String,
    pub timeout: Option<std::time::Duration>,
}

impl InjectSettings {
    /// Settings with the default ports and no resources, for tests and local runs.
    pub fn new(sidecar_image: impl Into<String>) -> Self {
        Self {
            sidecar_image: sidecar_image.into(),
            image_pull_policy: None,
            proxy_port: DEFAULT_PROXY_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            resources: None,
            store: None,
            defaults: SidecarOptions::default(),
        }
    }
}

/// What to do with a Pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// The pod did not opt in: admit it untouched.
    NotRequested,
    /// The sidecar is already there: admit it untouched (idempotent).
    AlreadyInjected,
    /// Admit with this patch.
    Inject(Patch),
    /// Refuse, with a message for the user.
    Deny(InjectError),
}

/// Why an opted-in pod is refused. Every message names the annotation (or field) and the bad value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {ANNOTATION_SERVICE} is required on pods that set {INJECT_KEY}=\"true\"")]
    MissingService,
    #[error(
        "annotation {ANNOTATION_SERVICE}: {0:?} is not a valid Service name (lower-case letters, digits and '-', \
         starting with a letter, at most 63 characters)"
    )]
    BadService(String),
    #[error("annotation {ANNOTATION_UPSTREAM_PORT} is required on pods that set {INJECT_KEY}=\"true\"")]
    MissingUpstreamPort,
    #[error("annotation {ANNOTATION_UPSTREAM_PORT}: {0:?} is not a port number (1-65535)")]
    BadUpstreamPort(String),
    #[error(
        "annotation {ANNOTATION_UPSTREAM_PORT}: {port} is the sidecar's {which} port; the application must listen \
         on another port"
    )]
    UpstreamIsSidecarPort { port: u16, which: &'static str },
    #[error(
        "container {container:?} declares containerPort {port}, which the {CONTAINER_NAME} sidecar needs for its \
         {which} port"
    )]
    PortTaken { container: String, port: u16, which: &'static str },
    #[error(
        "annotation {ANNOTATION_TLS_SECRET}: {0:?} is not a valid Secret name (lower-case letters, digits, '-' and \
         '.', starting and ending with a letter or digit, at most 253 characters)"
    )]
    BadTlsSecret(String),
    #[error(
        "annotation {ANNOTATION_TLS_SECRET}: the pod already has a volume named {TLS_VOLUME_NAME:?}, which the \
         {CONTAINER_NAME} sidecar needs for the TLS Secret"
    )]
    TlsVolumeTaken,
    #[error("annotation {ANNOTATION_APP_LOOPBACK}: {0:?} is neither \"true\" nor \"false\"")]
    BadAppLoopback(String),
    #[error("container {container:?} {probe} (with {ANNOTATION_APP_LOOPBACK}: \"true\"): {why}")]
    ProbeUnsupported { container: String, probe: &'static str, why: String },
    #[error(
        "container {container:?} {probe} (with {ANNOTATION_APP_LOOPBACK}: \"true\"): port {port} is neither a \
         port number (1-65535) nor the name of one of the container's ports"
    )]
    ProbePort { container: String, probe: &'static str, port: String },
    /// A per-workload setting annotation with a value it cannot take.
    #[error("annotation {annotation}: {value:?} {why}")]
    BadValue { annotation: &'static str, value: String, why: String },
    /// A per-workload setting that would change nothing (or stop the sidecar) without another one.
    #[error("annotation {annotation}: {why}")]
    Unusable { annotation: &'static str, why: String },
    #[error(
        "annotation {ANNOTATION_CLIENT_CA_SECRET}: the pod already has a volume named {CLIENT_CA_VOLUME_NAME:?}, \
         which the {CONTAINER_NAME} sidecar needs for the client CA Secret"
    )]
    ClientCaVolumeTaken,
}

/// Whether the pod opted in, by label or annotation `portcullis.dev/inject: "true"`.
pub fn requested(pod: &Pod) -> bool {
    let is_true =
        |m: &Option<BTreeMap<String, String>>| m.as_ref().and_then(|m| m.get(INJECT_KEY)).is_some_and(|v| v == "true");
    is_true(&pod.metadata.labels) || is_true(&pod.metadata.annotations)
}

/// Decides what to do with `pod`, created in `namespace` (pods being created often carry no namespace yet).
pub fn decide(pod: &Pod, namespace: &str, settings: &InjectSettings) -> Decision {
    if !requested(pod) {
        return Decision::NotRequested;
    }
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let init = pod.spec.as_ref().and_then(|s| s.init_containers.as_deref()).unwrap_or_default();
    if containers.iter().chain(init).any(|c| c.name == CONTAINER_NAME) {
        return Decision::AlreadyInjected;
    }
    let parts = sidecar_with_volumes(pod, namespace, settings)
        .and_then(|(c, v)| Ok((c, v, super::probes::rewrite(pod, settings.admin_port)?)));
    let (mut container, volumes, probes) = match parts {
        Ok(v) => v,
        Err(e) => return Decision::Deny(e),
    };
    let mut ops = Vec::new();
    if let Some(rewrite) = probes {
        container.env.get_or_insert_default().push(rewrite.env);
        ops.extend(rewrite.ops);
    }
    let value = serde_json::to_value(container).expect("a Container always serializes");
    ops.push(PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(["spec", "containers", "-"]), value }));
    let mut has_volumes = pod.spec.as_ref().is_some_and(|s| s.volumes.is_some());
    for volume in volumes {
        let volume = serde_json::to_value(volume).expect("a Volume always serializes");
        ops.push(PatchOperation::Add(if has_volumes {
            AddOperation { path: PointerBuf::from_tokens(["spec", "volumes", "-"]), value: volume }
        } else {
            AddOperation { path: PointerBuf::from_tokens(["spec", "volumes"]), value: serde_json::json!([volume]) }
        }));
        has_volumes = true;
    }
    Decision::Inject(Patch(ops))
}

/// The validated `portcullis.dev/tls-secret` annotation, when present.
pub fn tls_secret(pod: &Pod) -> Result<Option<String>, InjectError> {
    let Some(name) = annotation(pod, ANNOTATION_TLS_SECRET) else {
        return Ok(None);
    };
    if !is_dns_subdomain(name) {
        return Err(InjectError::BadTlsSecret(name.to_string()));
    }
    if has_volume(pod, TLS_VOLUME_NAME) {
        return Err(InjectError::TlsVolumeTaken);
    }
    Ok(Some(name.to_string()))
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(|s| s.trim())
}

fn has_volume(pod: &Pod, name: &str) -> bool {
    pod.spec.as_ref().and_then(|s| s.volumes.as_deref()).unwrap_or_default().iter().any(|v| v.name == name)
}

/// A Secret volume projecting only `keys`.
fn secret_volume(volume: &str, secret: &str, keys: &[&str]) -> Volume {
    let item = |k: &&str| KeyToPath { key: k.to_string(), path: k.to_string(), ..Default::default() };
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: Some(keys.iter().map(item).collect()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn bad(annotation: &'static str, value: &str, why: impl Into<String>) -> InjectError {
    InjectError::BadValue { annotation, value: value.to_string(), why: why.into() }
}

/// `"true"`/`"false"`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("is neither \"true\" nor \"false\"".into()),
    }
}

/// Comma-separated CIDRs or addresses, as `--trusted-proxies` reads them (empty entries skipped; `""`: none).
pub fn parse_trusted_proxies(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.parse::<ipnet::IpNet>().is_err() && part.parse::<IpAddr>().is_err() {
            return Err(format!("is not a comma-separated list of CIDRs: {part:?} is neither a CIDR nor an address"));
        }
        out.push(part.to_string());
    }
    Ok(out)
}

/// A worker count 0..=[`MAX_WORKERS`], digits only.
pub fn parse_workers(s: &str) -> Result<u32, String> {
    let why = || format!("is not a number of workers (0-{MAX_WORKERS}; 0 = one per CPU)");
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(why());
    }
    s.parse::<u32>().ok().filter(|n| *n <= MAX_WORKERS).ok_or_else(why)
}

/// An address the admin listener can bind and the kubelet can probe: an IP, not loopback or multicast.
pub fn parse_admin_address(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|_| "is not an IP address (e.g. 0.0.0.0 or ::)".to_string())?;
    if ip.is_loopback() || ip.is_multicast() {
        return Err("cannot be the admin address: the kubelet probes the admin port from the node".into());
    }
    Ok(ip)
}

/// Digits with an optional fraction and a known suffix, e.g. `100m`, `0.5`, `64Mi`, `1e3`.
pub fn is_quantity(s: &str) -> bool {
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let num_ok = !num.is_empty() && num != "." && num.matches('.').count() <= 1;
    let suffix_ok =
        matches!(suffix, "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei")
            || (suffix.len() > 1
                && (suffix.starts_with('e') || suffix.starts_with('E'))
                && suffix[1..].trim_start_matches(['+', '-']).bytes().all(|b| b.is_ascii_digit()));
    num_ok && suffix_ok
}

/// The pod's settings: the chart-wide defaults with every annotation present applied, validated.
pub fn options(pod: &Pod, defaults: &SidecarOptions) -> Result<SidecarOptions, InjectError> {
    let mut o = defaults.clone();
    let tls = tls_secret(pod)?.is_some();
    if let Some(v) = annotation(pod, ANNOTATION_TRUSTED_PROXIES) {
        o.trusted_proxies = parse_trusted_proxies(v).map_err(|why| bad(ANNOTATION_TRUSTED_PROXIES, v, why))?;
    }
    let proxy_protocol = annotation(pod, ANNOTATION_PROXY_PROTOCOL);
    if let Some(v) = proxy_protocol {
        o.proxy_protocol = parse_bool(v).map_err(|why| bad(ANNOTATION_PROXY_PROTOCOL, v, why))?;
    }
    if o.proxy_protocol && o.trusted_proxies.is_empty() {
        let annotation = if proxy_protocol.is_some() { ANNOTATION_PROXY_PROTOCOL } else { ANNOTATION_TRUSTED_PROXIES };
        return Err(InjectError::Unusable {
            annotation,
            why: format!(
                "PROXY protocol is accepted only from trusted proxies, and none are set; set \
                 {ANNOTATION_TRUSTED_PROXIES} to the load balancers' addresses (or {ANNOTATION_PROXY_PROTOCOL}: \
                 \"false\")"
            ),
        });
    }
    let client_ca = annotation(pod, ANNOTATION_CLIENT_CA_SECRET);
    match client_ca {
        Some("") => o.client_ca_secret = None,
        Some(v) if !is_dns_subdomain(v) => {
            return Err(bad(ANNOTATION_CLIENT_CA_SECRET, v, "is not a valid Secret name"));
        }
        Some(v) if !tls => {
            return Err(InjectError::Unusable {
                annotation: ANNOTATION_CLIENT_CA_SECRET,
                why: format!(
                    "{v:?} needs {ANNOTATION_TLS_SECRET}: client certificates are verified on the sidecar's TLS \
                     listener"
                ),
            });
        }
        Some(v) => o.client_ca_secret = Some(v.to_string()),
        // The chart-wide CA applies to pods that serve TLS; the others have no listener to verify on.
        None if !tls => o.client_ca_secret = None,
        None => {}
    }
    if o.client_ca_secret.is_some() && has_volume(pod, CLIENT_CA_VOLUME_NAME) {
        return Err(InjectError::ClientCaVolumeTaken);
    }
    match annotation(pod, ANNOTATION_REQUIRE_TLS) {
        Some(v) => {
            o.require_tls = parse_bool(v).map_err(|why| bad(ANNOTATION_REQUIRE_TLS, v, why))?;
            if o.require_tls && !tls {
                return Err(InjectError::Unusable {
                    annotation: ANNOTATION_REQUIRE_TLS,
                    why: format!("\"true\" needs {ANNOTATION_TLS_SECRET}: without it the sidecar has no TLS listener"),
                });
            }
        }
        None if !tls => o.require_tls = false,
        None => {}
    }
    if let Some(v) = annotation(pod, ANNOTATION_WORKERS) {
        o.workers = Some(parse_workers(v).map_err(|why| bad(ANNOTATION_WORKERS, v, why))?);
    }
    if let Some(v) = annotation(pod, ANNOTATION_ADMIN_ADDRESS) {
        o.admin_address = Some(parse_admin_address(v).map_err(|why| bad(ANNOTATION_ADMIN_ADDRESS, v, why))?);
    }
    if let Some(v) = annotation(pod, ANNOTATION_ACCESS_LOG) {
        o.access_log = Some(match v.trim() {
            "json" => "json",
            "off" => "off",
            _ => return Err(bad(ANNOTATION_ACCESS_LOG, v, "must be \"json\" or \"off\"")),
        });
    }
    if let Some(v) = annotation(pod, ANNOTATION_ACCESS_LOG_SAMPLE) {
        let ok = v.trim().parse::<f64>().ok().filter(|f| (0.0..=1.0).contains(f));
        if ok.is_none() {
            return Err(bad(ANNOTATION_ACCESS_LOG_SAMPLE, v, "must be a number from 0 to 1"));
        }
        o.access_log_sample = Some(v.trim().to_string());
    }
    if let Some(v) = annotation(pod, ANNOTATION_CLIENT_METRICS) {
        let n = v.trim().parse::<u32>().ok().filter(|n| *n <= MAX_CLIENT_METRICS && !v.trim().starts_with('+'));
        o.client_metrics = Some(n.ok_or_else(|| {
            bad(ANNOTATION_CLIENT_METRICS, v, format!("must be a number of clients from 0 to {MAX_CLIENT_METRICS}"))
        })?);
    }
    Ok(o)
}

/// The sidecar's resources: the chart-wide ones with the pod's resource annotations applied.
pub fn resources(
    pod: &Pod,
    defaults: Option<&ResourceRequirements>,
) -> Result<Option<ResourceRequirements>, InjectError> {
    let mut r = defaults.cloned().unwrap_or_default();
    for (key, which, resource) in [
        (ANNOTATION_CPU_REQUEST, 0, "cpu"),
        (ANNOTATION_MEMORY_REQUEST, 0, "memory"),
        (ANNOTATION_CPU_LIMIT, 1, "cpu"),
        (ANNOTATION_MEMORY_LIMIT, 1, "memory"),
    ] {
        let Some(v) = annotation(pod, key) else { continue };
        if !is_quantity(v) {
            return Err(bad(key, v, "is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi)"));
        }
        let map = if which == 0 { &mut r.requests } else { &mut r.limits };
        map.get_or_insert_default().insert(resource.into(), Quantity(v.into()));
    }
    let (req, lim) = (r.requests.clone().unwrap_or_default(), r.limits.clone().unwrap_or_default());
    for resource in ["cpu", "memory"] {
        if let (Some(q), Some(l)) = (req.get(resource), lim.get(resource))
            && let (Some(qv), Some(lv)) = (quantity_value(&q.0), quantity_value(&l.0))
            && qv > lv
        {
            let (annotation, value) = if annotation(pod, limit_annotation(resource)).is_some() {
                (limit_annotation(resource), l.0.clone())
            } else {
                (request_annotation(resource), q.0.clone())
            };
            return Err(bad(
                annotation,
                &value,
                format!("leaves the {resource} request ({}) above the {resource} limit ({})", q.0, l.0),
            ));
        }
    }
    Ok((r.requests.is_some() || r.limits.is_some()).then_some(r))
}

fn limit_annotation(resource: &str) -> &'static str {
    if resource == "cpu" { ANNOTATION_CPU_LIMIT } else { ANNOTATION_MEMORY_LIMIT }
}

fn request_annotation(resource: &str) -> &'static str {
    if resource == "cpu" { ANNOTATION_CPU_REQUEST } else { ANNOTATION_MEMORY_REQUEST }
}

/// A quantity's value as a float (enough to compare a request with a limit).
fn quantity_value(s: &str) -> Option<f64> {
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let n: f64 = num.parse().ok()?;
    let m = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e => 10f64.powi(e.get(1..)?.parse().ok()?),
    };
    Some(n * m)
}

/// Validates the annotations and builds the sidecar container.
pub fn sidecar(pod: &Pod, namespace: &str, settings: &InjectSettings) -> Result<Container, InjectError> {
    sidecar_with_volumes(pod, namespace, settings).map(|(c, _)| c)
}

/// The sidecar container and the volumes it mounts (TLS Secret, client CA Secret).
fn sidecar_with_volumes(
    pod: &Pod,
    namespace: &str,
    settings: &InjectSettings,
) -> Result<(Container, Vec<Volume>), InjectError> {
    let service = annotation(pod, ANNOTATION_SERVICE).ok_or(InjectError::MissingService)?;
    if !is_dns_label(service) {
        return Err(InjectError::BadService(service.to_string()));
    }
    let raw_port = annotation(pod, ANNOTATION_UPSTREAM_PORT).ok_or(InjectError::MissingUpstreamPort)?;
    let upstream = parse_port(raw_port).ok_or_else(|| InjectError::BadUpstreamPort(raw_port.to_string()))?;
    for (port, which) in [(settings.proxy_port, "proxy"), (settings.admin_port, "admin")] {
        if upstream == port {
            return Err(InjectError::UpstreamIsSidecarPort { port, which });
        }
        let spec = pod.spec.as_ref();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            if c.ports.iter().flatten().any(|p| p.container_port == i32::from(port)) {
                return Err(InjectError::PortTaken { container: c.name.clone(), port, which });
            }
        }
    }
    let tls = tls_secret(pod)?;
    let opts = options(pod, &settings.defaults)?;
    let resources = resources(pod, settings.resources.as_ref())?;
    let mut c = container(namespace, service, upstream, settings, &opts);
    c.resources = resources;
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    if let Some(secret) = tls {
        c.args.get_or_insert_default().extend([
            arg(proxy_flag::TLS_CERT, format!("{TLS_MOUNT_PATH}/tls.crt")),
            arg(proxy_flag::TLS_KEY, format!("{TLS_MOUNT_PATH}/tls.key")),
        ]);
        mounts.push(mount(TLS_VOLUME_NAME, TLS_MOUNT_PATH));
        volumes.push(secret_volume(TLS_VOLUME_NAME, &secret, &["tls.crt", "tls.key"]));
        if let Some(ca) = &opts.client_ca_secret {
            c.args
                .get_or_insert_default()
                .push(arg(proxy_flag::CLIENT_CA, format!("{CLIENT_CA_MOUNT_PATH}/{CLIENT_CA_KEY}")));
            mounts.push(mount(CLIENT_CA_VOLUME_NAME, CLIENT_CA_MOUNT_PATH));
            volumes.push(secret_volume(CLIENT_CA_VOLUME_NAME, ca, &[CLIENT_CA_KEY]));
        }
        if opts.require_tls {
            c.args.get_or_insert_default().push(proxy_flag::REQUIRE_TLS.into());
        }
    }
    if !mounts.is_empty() {
        c.volume_mounts = Some(mounts);
    }
    Ok((c, volumes))
}

fn container(namespace: &str, service: &str, upstream: u16, s: &InjectSettings, o: &SidecarOptions) -> Container {
    let index = portcullis_table::naming::index_name(service);
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    };
    let admin_ip = o.admin_address.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let mut args = vec![
        arg(proxy_flag::LISTEN, format!("0.0.0.0:{}", s.proxy_port)),
        arg(proxy_flag::ADMIN_LISTEN, SocketAddr::new(admin_ip, s.admin_port)),
        arg(proxy_flag::UPSTREAM, format!("127.0.0.1:{upstream}")),
        arg(proxy_flag::TABLES_FROM, format!("configmap/{namespace}/{index}")),
        arg(proxy_flag::LOG_FORMAT, "json"),
    ];
    if !o.trusted_proxies.is_empty() {
        args.push(arg(proxy_flag::TRUSTED_PROXIES, o.trusted_proxies.join(",")));
    }
    if o.proxy_protocol {
        args.push(proxy_flag::PROXY_PROTOCOL.into());
    }
    if let Some(w) = o.workers {
        args.push(arg(proxy_flag::WORKERS, w));
    }
    if let Some(l) = o.access_log {
        args.push(arg(proxy_flag::ACCESS_LOG, l));
    }
    if let Some(f) = &o.access_log_sample {
        args.push(arg(proxy_flag::ACCESS_LOG_SAMPLE, f));
    }
    if let Some(n) = o.client_metrics {
        args.push(arg(proxy_flag::CLIENT_METRICS, n));
    }
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        EnvVar { name: "PORTCULLIS_SERVICE".into(), value: Some(service.into()), ..Default::default() },
    ];
    if let Some(store) = &s.store {
        args.push(arg(proxy_flag::STORE_URL, &store.url));
        if let Some(t) = store.timeout {
            args.push(arg(proxy_flag::STORE_TIMEOUT, format!("{}ms", t.as_millis())));
        }
        // The pod's name, so each replica counts itself once in the store (`$(POD_NAME)`: the env var above).
        args.push(arg(proxy_flag::REPLICA_ID, "$(POD_NAME)"));
        let secret_env = |name: &str, key: &str| EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: crate::store::SIDECAR_CREDENTIALS_SECRET.into(),
                    key: key.into(),
                    optional: Some(true),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        env.push(secret_env(crate::store::ENV_USERNAME, crate::store::USERNAME_KEY));
        env.push(secret_env(crate::store::ENV_PASSWORD, crate::store::PASSWORD_KEY));
    }
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(s.sidecar_image.clone()),
        image_pull_policy: s.image_pull_policy.clone(),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(PROXY_PORT_NAME.into()),
                container_port: i32::from(s.proxy_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.into()),
                container_port: i32::from(s.admin_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 2)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: s.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT_ID),
            run_as_group: Some(NONROOT_ID),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A decimal port 1-65535, digits only (no sign, no spaces, no leading `+`).
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// RFC 1035 label as Kubernetes requires of Service names.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain, as Kubernetes requires of Secret names.
pub fn is_dns_subdomain(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 253
        && alnum(&b[0])
        && alnum(&b[b.len() - 1])
        && b.iter().all(|c| alnum(c) || *c == b'-' || *c == b'.')
        && s.split('.').all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::api::ObjectMeta;

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        Pod {
            metadata: ObjectMeta {
                name: Some("app-0".into()),
                labels: map(labels),
                annotations: map(annotations),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container { name: "app".into(), image: Some("app:1".into()), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn opted_in(service: &str, port: &str) -> Pod {
        pod(
            &[(INJECT_KEY, "true")],
            &[(INJECT_KEY, "true"), (ANNOTATION_SERVICE, service), (ANNOTATION_UPSTREAM_PORT, port)],
        )
    }

    fn settings() -> InjectSettings {
        InjectSettings::new("ghcr.io/portcullis/portcullis-proxy:0.1.0")
    }

    /// Applies the decision's patch to the pod, as the API server would.
    fn patched(pod: &Pod, d: &Decision) -> Pod {
        let Decision::Inject(patch) = d else { panic!("expected a patch, got {d:?}") };
        let mut v = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut v, patch).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_without_opt_in_are_untouched() {
        assert_eq!(decide(&pod(&[], &[]), "ns", &settings()), Decision::NotRequested);
        assert_eq!(decide(&pod(&[(INJECT_KEY, "false")], &[]), "ns", &settings()), Decision::NotRequested);
        assert_eq!(
            decide(&pod(&[("app", "x")], &[(ANNOTATION_SERVICE, "x")]), "ns", &settings()),
            Decision::NotRequested
        );
    }

    #[test]
    fn annotation_alone_opts_in() {
        let p = pod(&[], &[(INJECT_KEY, "true"), (ANNOTATION_SERVICE, "api"), (ANNOTATION_UPSTREAM_PORT, "8080")]);
        assert!(matches!(decide(&p, "ns", &settings()), Decision::Inject(_)));
    }

    #[test]
    fn injects_the_sidecar_with_args_ports_probes_and_hardening() {
        let p = opted_in("orders", "8080");
        let mut s = settings();
        s.resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), Quantity("50m".into()))].into()),
            ..Default::default()
        });
        let out = patched(&p, &decide(&p, "team-a", &s));
        let cs = &out.spec.as_ref().unwrap().containers;
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].name, "app", "the application container is kept first and unchanged");
        let c = &cs[1];
        assert_eq!(c.name, CONTAINER_NAME);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/portcullis/portcullis-proxy:0.1.0"));
        assert_eq!(
            c.args.as_deref().unwrap(),
            [
                "--listen=0.0.0.0:8443",
                "--admin-listen=0.0.0.0:9901",
                "--upstream=127.0.0.1:8080",
                "--tables-from=configmap/team-a/portcullis-table-orders",
                "--log-format=json"
            ]
        );
        let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, [8443, 9901]);
        let probe_path = |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert_eq!(probe_path(&c.readiness_probe), "/readyz");
        assert_eq!(probe_path(&c.liveness_probe), "/healthz");
        assert_eq!(
            c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port,
            IntOrString::String(ADMIN_PORT_NAME.into())
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(c.resources, s.resources);
        assert!(ADMIN_PORT_NAME.len() <= 15 && PROXY_PORT_NAME.len() <= 15, "port names are IANA_SVC_NAMEs");
    }

    #[test]
    fn a_configured_store_reaches_the_sidecar_with_credentials_from_the_namespace_secret() {
        let plain = out_pod(&opted_in("orders", "8080"));
        let c = plain.spec.unwrap().containers.into_iter().find(|c| c.name == CONTAINER_NAME).unwrap();
        assert!(!c.args.unwrap().iter().any(|a| a.starts_with("--store")), "no store, no store flags");
        let mut s = settings();
        s.store = Some(SidecarStore {
            url: "redis://redis.store:6379/0".into(),
            timeout: Some(std::time::Duration::from_millis(40)),
        });
        let pod = opted_in("orders", "8080");
        let pod = patched(&pod, &decide(&pod, "shop", &s));
        let c = pod.spec.unwrap().containers.into_iter().find(|c| c.name == CONTAINER_NAME).unwrap();
        let args = c.args.unwrap();
        for want in ["--store-url=redis://redis.store:6379/0", "--store-timeout=40ms", "--replica-id=$(POD_NAME)"] {
            assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
        }
        let env = c.env.unwrap();
        let pos = |n: &str| env.iter().position(|e| e.name == n).unwrap_or_else(|| panic!("{n} in {env:?}"));
        assert!(pos("POD_NAME") < pos("PORTCULLIS_STORE_USERNAME"), "defined before use");
        for (var, key) in [("PORTCULLIS_STORE_USERNAME", "username"), ("PORTCULLIS_STORE_PASSWORD", "password")] {
            let r = env[pos(var)].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
            assert_eq!(
                (r.name.as_str(), r.key.as_str(), r.optional),
                ("portcullis-store-credentials", key, Some(true))
            );
        }
    }

    #[test]
    fn custom_ports_are_used() {
        let mut s = settings();
        s.proxy_port = 7000;
        s.admin_port = 7001;
        let p = opted_in("orders", "8443");
        let out = patched(&p, &decide(&p, "ns", &s));
        let c = &out.spec.unwrap().containers[1];
        assert_eq!(c.args.as_ref().unwrap()[0], "--listen=0.0.0.0:7000");
        assert_eq!(c.args.as_ref().unwrap()[1], "--admin-listen=0.0.0.0:7001");
        assert_eq!(c.args.as_ref().unwrap()[2], "--upstream=127.0.0.1:8443");
    }

    #[test]
    fn injection_is_idempotent() {
        let p = opted_in("orders", "8080");
        let once = patched(&p, &decide(&p, "ns", &settings()));
        assert_eq!(decide(&once, "ns", &settings()), Decision::AlreadyInjected);
    }

    #[test]
    fn bad_annotations_are_refused_naming_annotation_and_value() {
        let cases: &[(Pod, &str, &str)] = &[
            (opted_in("orders", "http"), ANNOTATION_UPSTREAM_PORT, "\"http\""),
            (opted_in("orders", "0"), ANNOTATION_UPSTREAM_PORT, "\"0\""),
            (opted_in("orders", "65536"), ANNOTATION_UPSTREAM_PORT, "\"65536\""),
            (opted_in("orders", "-1"), ANNOTATION_UPSTREAM_PORT, "\"-1\""),
            (opted_in("orders", "8443"), ANNOTATION_UPSTREAM_PORT, "8443"),
            (opted_in("orders", "9901"), ANNOTATION_UPSTREAM_PORT, "9901"),
            (opted_in("Orders", "8080"), ANNOTATION_SERVICE, "\"Orders\""),
            (opted_in("", "8080"), ANNOTATION_SERVICE, "\"\""),
            (opted_in(&"a".repeat(64), "8080"), ANNOTATION_SERVICE, "aaaa"),
            (opted_in("orders-", "8080"), ANNOTATION_SERVICE, "\"orders-\""),
            (pod(&[(INJECT_KEY, "true")], &[(ANNOTATION_UPSTREAM_PORT, "8080")]), ANNOTATION_SERVICE, "required"),
            (pod(&[(INJECT_KEY, "true")], &[(ANNOTATION_SERVICE, "x")]), ANNOTATION_UPSTREAM_PORT, "required"),
        ];
        for (p, annotation, value) in cases {
            match decide(p, "ns", &settings()) {
                Decision::Deny(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(annotation) && msg.contains(value),
                        "{msg:?} should name {annotation} and {value}"
                    );
                }
                other => panic!("expected a denial naming {annotation}, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_container_using_the_proxy_port_is_refused() {
        let mut p = opted_in("orders", "8080");
        p.spec.as_mut().unwrap().containers[0].ports =
            Some(vec![ContainerPort { container_port: 8443, ..Default::default() }]);
        let Decision::Deny(e) = decide(&p, "ns", &settings()) else { panic!("expected a denial") };
        assert!(e.to_string().contains("\"app\"") && e.to_string().contains("8443"), "{e}");
    }

    #[test]
    fn port_parsing_is_strict() {
        assert_eq!(parse_port("1"), Some(1));
        assert_eq!(parse_port("65535"), Some(65535));
        for bad in ["", "0", "65536", "+80", " 80", "80a", "0x50", "999999"] {
            assert_eq!(parse_port(bad), None, "{bad:?}");
        }
    }

    fn with_tls(secret: &str) -> Pod {
        let mut p = opted_in("orders", "8080");
        p.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_TLS_SECRET.into(), secret.into());
        p
    }

    #[test]
    fn tls_secret_is_mounted_and_passed() {
        for existing_volumes in [false, true] {
            let mut p = with_tls("orders-tls");
            if existing_volumes {
                p.spec.as_mut().unwrap().volumes = Some(vec![Volume { name: "data".into(), ..Default::default() }]);
            }
            let out = patched(&p, &decide(&p, "ns", &settings()));
            let spec = out.spec.unwrap();
            let c = &spec.containers[1];
            let args = c.args.as_deref().unwrap();
            assert!(args.contains(&"--tls-cert=/etc/portcullis/tls/tls.crt".to_string()), "{args:?}");
            assert!(args.contains(&"--tls-key=/etc/portcullis/tls/tls.key".to_string()), "{args:?}");
            assert_eq!(args[0], "--listen=0.0.0.0:8443", "the proxy port stays, now speaking TLS");
            let m = &c.volume_mounts.as_deref().unwrap()[0];
            assert_eq!(
                (m.name.as_str(), m.mount_path.as_str(), m.read_only),
                (TLS_VOLUME_NAME, TLS_MOUNT_PATH, Some(true))
            );
            let vols = spec.volumes.unwrap();
            assert_eq!(vols.len(), if existing_volumes { 2 } else { 1 });
            let v = vols.last().unwrap();
            assert_eq!(v.name, TLS_VOLUME_NAME);
            let sec = v.secret.as_ref().unwrap();
            assert_eq!(sec.secret_name.as_deref(), Some("orders-tls"));
            let keys: Vec<&str> = sec.items.iter().flatten().map(|i| i.key.as_str()).collect();
            assert_eq!(keys, ["tls.crt", "tls.key"]);
            assert!(spec.containers[0].volume_mounts.is_none(), "the app container does not get the key");
            assert_eq!(decide(&out_pod(&p), "ns", &settings()), Decision::AlreadyInjected);
        }
        // Without the annotation: no TLS flags, no volume.
        let p = opted_in("orders", "8080");
        let out = patched(&p, &decide(&p, "ns", &settings()));
        assert!(
            !out.spec.as_ref().unwrap().containers[1].args.as_ref().unwrap().iter().any(|a| a.starts_with("--tls"))
        );
        assert!(out.spec.unwrap().volumes.is_none());
    }

    #[test]
    fn loopback_pods_get_their_probes_moved_and_the_originals_passed_to_the_sidecar() {
        use k8s_openapi::api::core::v1::TCPSocketAction;
        let mut p = opted_in("orders", "8080");
        p.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_APP_LOOPBACK.into(), "true".into());
        p.spec.as_mut().unwrap().containers[0].readiness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(8080), host: None }),
            ..Default::default()
        });
        let out = patched(&p, &decide(&p, "ns", &settings()));
        let cs = &out.spec.as_ref().unwrap().containers;
        let h = cs[0].readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(h.port, IntOrString::Int(9901));
        assert_eq!(h.path.as_deref(), Some("/app-health/app/readyz"));
        let env = cs[1].env.as_ref().unwrap();
        let probes = env.iter().find(|e| e.name == portcullis_table::sidecar::APP_PROBES_ENV).unwrap();
        assert!(probes.value.as_ref().unwrap().contains(r#""tcpSocket":{"port":8080}"#));
        assert_eq!(decide(&out, "ns", &settings()), Decision::AlreadyInjected, "idempotent");
        p.metadata.annotations.as_mut().unwrap().insert(ANNOTATION_APP_LOOPBACK.into(), "on".into());
        let Decision::Deny(e) = decide(&p, "ns", &settings()) else { panic!("expected a denial") };
        assert!(e.to_string().contains(ANNOTATION_APP_LOOPBACK) && e.to_string().contains("\"on\""), "{e}");
    }

    fn out_pod(p: &Pod) -> Pod {
        patched(p, &decide(p, "ns", &settings()))
    }

    #[test]
    fn bad_tls_secret_names_are_refused_naming_the_annotation() {
        for bad in ["Orders-TLS", "", "-tls", "tls-", "a..b", "tls_cert", "a/b", &"a".repeat(254)] {
            match decide(&with_tls(bad), "ns", &settings()) {
                Decision::Deny(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(ANNOTATION_TLS_SECRET), "{msg}");
                }
                other => panic!("{bad:?} should be refused, got {other:?}"),
            }
        }
        for good in ["tls", "orders.example-tls", "a1", &"a".repeat(63)] {
            assert!(matches!(decide(&with_tls(good), "ns", &settings()), Decision::Inject(_)), "{good:?}");
        }
        let mut p = with_tls("orders-tls");
        p.spec.as_mut().unwrap().volumes = Some(vec![Volume { name: TLS_VOLUME_NAME.into(), ..Default::default() }]);
        assert_eq!(decide(&p, "ns", &settings()), Decision::Deny(InjectError::TlsVolumeTaken));
    }

    fn with(extra: &[(&str, &str)]) -> Pod {
        let mut p = opted_in("orders", "8080");
        p.metadata.annotations.as_mut().unwrap().extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        p
    }

    fn args_of(p: &Pod, s: &InjectSettings) -> Vec<String> {
        let out = patched(p, &decide(p, "ns", s));
        out.spec.unwrap().containers.into_iter().find(|c| c.name == CONTAINER_NAME).unwrap().args.unwrap()
    }

    #[test]
    fn chart_wide_defaults_apply_and_annotations_override_them() {
        let mut s = settings();
        s.defaults = SidecarOptions {
            trusted_proxies: vec!["10.0.0.0/8".into()],
            proxy_protocol: true,
            client_ca_secret: Some("org-ca".into()),
            require_tls: true,
            workers: Some(4),
            admin_address: Some("::".parse().unwrap()),
            ..Default::default()
        };
        // Without TLS the TLS-only defaults (client CA, require-TLS) do not apply; the others do.
        let a = args_of(&opted_in("orders", "8080"), &s);
        for want in ["--trusted-proxies=10.0.0.0/8", "--proxy-protocol", "--workers=4", "--admin-listen=[::]:9901"] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--client-ca") || x == "--require-tls"), "{a:?}");
        // With TLS they do.
        let a = args_of(&with_tls("orders-tls"), &s);
        assert!(a.contains(&"--client-ca=/etc/portcullis/client-ca/ca.crt".to_string()), "{a:?}");
        assert!(a.contains(&"--require-tls".to_string()), "{a:?}");
        // Annotations override each default.
        let p = with(&[
            (ANNOTATION_TLS_SECRET, "orders-tls"),
            (ANNOTATION_TRUSTED_PROXIES, ""),
            (ANNOTATION_PROXY_PROTOCOL, "false"),
            (ANNOTATION_CLIENT_CA_SECRET, ""),
            (ANNOTATION_REQUIRE_TLS, "false"),
            (ANNOTATION_WORKERS, "0"),
            (ANNOTATION_ADMIN_ADDRESS, "0.0.0.0"),
        ]);
        let a = args_of(&p, &s);
        for gone in ["--trusted-proxies", "--proxy-protocol", "--client-ca", "--require-tls"] {
            assert!(!a.iter().any(|x| x.starts_with(gone)), "{gone} in {a:?}");
        }
        assert!(a.contains(&"--workers=0".to_string()) && a.contains(&"--admin-listen=0.0.0.0:9901".to_string()));
        // The access log and per-client metrics: absent unless annotated (the proxy's defaults apply).
        assert!(!a.iter().any(|x| x.starts_with("--access-log") || x.starts_with("--client-metrics")), "{a:?}");
        let a = args_of(
            &with(&[
                (ANNOTATION_ACCESS_LOG, "off"),
                (ANNOTATION_ACCESS_LOG_SAMPLE, "0.05"),
                (ANNOTATION_CLIENT_METRICS, "0"),
            ]),
            &s,
        );
        for want in ["--access-log=off", "--access-log-sample=0.05", "--client-metrics=0"] {
            assert!(a.contains(&want.to_string()), "{want} not in {a:?}");
        }
    }

    #[test]
    fn resource_annotations_override_one_by_one() {
        let mut s = settings();
        s.resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), Quantity("50m".into()))].into()),
            limits: Some([("memory".to_string(), Quantity("128Mi".into()))].into()),
            ..Default::default()
        });
        let p = with(&[(ANNOTATION_CPU_REQUEST, "200m"), (ANNOTATION_CPU_LIMIT, "1")]);
        let out = patched(&p, &decide(&p, "ns", &s));
        let r = out.spec.unwrap().containers[1].resources.clone().unwrap();
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("200m".into()));
        let l = r.limits.unwrap();
        assert_eq!((l["cpu"].0.as_str(), l["memory"].0.as_str()), ("1", "128Mi"));
        let Decision::Deny(e) = decide(&with(&[(ANNOTATION_MEMORY_REQUEST, "1Gi")]), "ns", &s) else { panic!() };
        assert!(e.to_string().contains(ANNOTATION_MEMORY_REQUEST) && e.to_string().contains("above"), "{e}");
        assert_eq!(quantity_value("1.5Gi"), Some(1.5 * 1024f64.powi(3)));
        assert_eq!(quantity_value("2e3"), Some(2000.0));
        assert_eq!(quantity_value("250m"), Some(0.25));
    }

    #[test]
    fn bad_setting_annotations_are_refused_naming_them() {
        let tls = (ANNOTATION_TLS_SECRET, "orders-tls");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[(ANNOTATION_TRUSTED_PROXIES, "10.0.0.0/40")], ANNOTATION_TRUSTED_PROXIES),
            (&[(ANNOTATION_ACCESS_LOG, "text")], ANNOTATION_ACCESS_LOG),
            (&[(ANNOTATION_ACCESS_LOG_SAMPLE, "1.5")], ANNOTATION_ACCESS_LOG_SAMPLE),
            (&[(ANNOTATION_ACCESS_LOG_SAMPLE, "half")], ANNOTATION_ACCESS_LOG_SAMPLE),
            (&[(ANNOTATION_CLIENT_METRICS, "100001")], ANNOTATION_CLIENT_METRICS),
            (&[(ANNOTATION_CLIENT_METRICS, "-1")], ANNOTATION_CLIENT_METRICS),
            (&[(ANNOTATION_PROXY_PROTOCOL, "on")], ANNOTATION_PROXY_PROTOCOL),
            (&[(ANNOTATION_PROXY_PROTOCOL, "true")], ANNOTATION_PROXY_PROTOCOL),
            (&[(ANNOTATION_CLIENT_CA_SECRET, "ca")], ANNOTATION_CLIENT_CA_SECRET),
            (&[tls, (ANNOTATION_CLIENT_CA_SECRET, "CA!")], ANNOTATION_CLIENT_CA_SECRET),
            (&[(ANNOTATION_REQUIRE_TLS, "true")], ANNOTATION_REQUIRE_TLS),
            (&[tls, (ANNOTATION_REQUIRE_TLS, "yes")], ANNOTATION_REQUIRE_TLS),
            (&[(ANNOTATION_WORKERS, "257")], ANNOTATION_WORKERS),
            (&[(ANNOTATION_WORKERS, "+2")], ANNOTATION_WORKERS),
            (&[(ANNOTATION_CPU_REQUEST, "fast")], ANNOTATION_CPU_REQUEST),
            (&[(ANNOTATION_MEMORY_LIMIT, "1GB")], ANNOTATION_MEMORY_LIMIT),
            (&[(ANNOTATION_ADMIN_ADDRESS, "::1")], ANNOTATION_ADMIN_ADDRESS),
            (&[(ANNOTATION_ADMIN_ADDRESS, "0.0.0.0:9901")], ANNOTATION_ADMIN_ADDRESS),
        ];
        for (extra, annotation) in cases {
            match decide(&with(extra), "ns", &settings()) {
                Decision::Deny(e) => assert!(e.to_string().contains(annotation), "{e} names {annotation}"),
                other => panic!("{extra:?} should be refused, got {other:?}"),
            }
        }
        let mut p = with(&[tls, (ANNOTATION_CLIENT_CA_SECRET, "ca")]);
        p.spec.as_mut().unwrap().volumes =
            Some(vec![Volume { name: CLIENT_CA_VOLUME_NAME.into(), ..Default::default() }]);
        assert_eq!(decide(&p, "ns", &settings()), Decision::Deny(InjectError::ClientCaVolumeTaken));
    }

    #[test]
    fn client_ca_and_tls_volumes_are_both_added() {
        let p = with(&[(ANNOTATION_TLS_SECRET, "orders-tls"), (ANNOTATION_CLIENT_CA_SECRET, "partners-ca")]);
        let out = patched(&p, &decide(&p, "ns", &settings()));
        let names: Vec<String> = out.spec.unwrap().volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, [TLS_VOLUME_NAME, CLIENT_CA_VOLUME_NAME]);
    }
}
