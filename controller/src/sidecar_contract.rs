//! The sidecar contract, in one place: what the injecting webhook ([`crate::webhook::inject`]), the NetworkPolicy
//! ([`crate::network_policy`]), the bypass guard ([`crate::exposure`]) and the `portcullis-proxy` command line agree
//! on — the container's name, its ports and port names, the pod annotations a workload sets, the proxy flags the
//! webhook writes and the controller flags that hold the chart-wide defaults.
//!
//! The controller does not link the proxy (docs/architecture.md); `tests::injected_args_parse_with_the_proxy_cli`
//! parses the injected arguments with the proxy's own clap `Cli` (a dev-dependency), so the two cannot drift.

/// Name of the injected container.
pub const CONTAINER_NAME: &str = "portcullis-proxy";
/// Default port of the proxy (the Service's `targetPort`).
pub const DEFAULT_PROXY_PORT: u16 = 8443;
/// Default admin port of the proxy (`/metrics`, `/healthz`, `/readyz`).
pub const DEFAULT_ADMIN_PORT: u16 = 9901;
/// Names of the sidecar's container ports: the proxy (the Service's `targetPort` may name it) and the admin port
/// (`/metrics`, `/healthz`, `/readyz`, `/revision`, `/app-health/...`). The NetworkPolicy admits these names.
pub const PROXY_PORT_NAME: &str = "portcullis";
pub const ADMIN_PORT_NAME: &str = "portcullis-adm";

/// Where the TLS Secret (`portcullis.dev/tls-secret`) is mounted in the sidecar, and its volume.
pub const TLS_MOUNT_PATH: &str = "/etc/portcullis/tls";
pub const TLS_VOLUME_NAME: &str = "portcullis-tls";
/// Where the client CA Secret (`portcullis.dev/client-ca-secret`) is mounted, its volume, and the Secret's key
/// holding the PEM CA certificate(s) (`ca.crt`, as cert-manager and `kubernetes.io/tls` Secrets name it).
pub const CLIENT_CA_MOUNT_PATH: &str = "/etc/portcullis/client-ca";
pub const CLIENT_CA_VOLUME_NAME: &str = "portcullis-client-ca";
pub const CLIENT_CA_KEY: &str = "ca.crt";

/// Label (what the webhook's `objectSelector` matches) and annotation (honoured too) that opt a pod in.
pub const INJECT_KEY: &str = "portcullis.dev/inject";
/// Annotation: name of the Service whose table the sidecar enforces (required).
pub const ANNOTATION_SERVICE: &str = "portcullis.dev/service";
/// Annotation: the application's port on loopback, where the sidecar forwards admitted requests (required).
pub const ANNOTATION_UPSTREAM_PORT: &str = "portcullis.dev/upstream-port";
/// Annotation: a `kubernetes.io/tls` Secret (in the pod's namespace) whose `tls.crt`/`tls.key` the sidecar serves
/// HTTPS with (optional; without it the sidecar speaks plain HTTP).
pub const ANNOTATION_TLS_SECRET: &str = "portcullis.dev/tls-secret";
/// Annotation: `"true"` when the application listens on loopback only (`127.0.0.1`), so nothing reaches it
/// except through the sidecar. The webhook then rewrites the app's HTTP and TCP probes to go through the sidecar's
/// admin port (the kubelet probes from the node, which cannot reach a loopback-only app).
pub const ANNOTATION_APP_LOOPBACK: &str = "portcullis.dev/app-loopback";
/// Annotation: comma-separated CIDRs (or addresses) of the proxies/load balancers in front of the pod whose
/// `X-Forwarded-For`/`Forwarded`/PROXY headers the sidecar believes (`--trusted-proxies`); `""` trusts none.
pub const ANNOTATION_TRUSTED_PROXIES: &str = "portcullis.dev/trusted-proxies";
/// Annotation: `"true"`/`"false"`: accept PROXY protocol v1/v2 headers from the trusted proxies
/// (`--proxy-protocol`). `"true"` needs trusted proxies (annotation or chart-wide default).
pub const ANNOTATION_PROXY_PROTOCOL: &str = "portcullis.dev/proxy-protocol";
/// Annotation: a Secret (in the pod's namespace) whose `ca.crt` holds the CA(s) client certificates are verified
/// against (`--client-ca`; ApiClient `spec.certificates`/`requireCertificate` need it). Needs `tls-secret`.
pub const ANNOTATION_CLIENT_CA_SECRET: &str = "portcullis.dev/client-ca-secret";
/// Annotation: `"true"`/`"false"`: refuse requests carrying the key header over plain HTTP (`--require-tls`).
/// `"true"` needs `tls-secret`.
pub const ANNOTATION_REQUIRE_TLS: &str = "portcullis.dev/require-tls";
/// Annotation: serving threads of the sidecar (`--workers`; `0` = one per CPU the container may use).
pub const ANNOTATION_WORKERS: &str = "portcullis.dev/workers";
/// Annotations: the sidecar container's CPU/memory requests and limits (Kubernetes quantities), each overriding
/// the chart-wide `--sidecar-cpu-request` etc.
pub const ANNOTATION_CPU_REQUEST: &str = "portcullis.dev/cpu-request";
pub const ANNOTATION_MEMORY_REQUEST: &str = "portcullis.dev/memory-request";
pub const ANNOTATION_CPU_LIMIT: &str = "portcullis.dev/cpu-limit";
pub const ANNOTATION_MEMORY_LIMIT: &str = "portcullis.dev/memory-limit";
/// Annotation: the IP address the sidecar's admin listener binds (`--admin-listen=ADDRESS:ADMIN_PORT`), e.g. `::`
/// on IPv6-only clusters or `0.0.0.0` (the default). Not loopback: the kubelet probes the admin port.
pub const ANNOTATION_ADMIN_ADDRESS: &str = "portcullis.dev/admin-address";

/// Annotation: the sidecar's access log, `json` or `off` (`--access-log`; docs/observability.md).
pub const ANNOTATION_ACCESS_LOG: &str = "portcullis.dev/access-log";
/// Annotation: the fraction of allowed requests in the access log, 0 to 1 (`--access-log-sample`; refusals are
/// always logged).
pub const ANNOTATION_ACCESS_LOG_SAMPLE: &str = "portcullis.dev/access-log-sample";
/// Annotation: clients with their own series in the sidecar's per-client metrics (`--client-metrics`, 0 = none).
pub const ANNOTATION_CLIENT_METRICS: &str = "portcullis.dev/client-metrics";

/// Every per-workload annotation the webhook reads (besides the opt-in [`INJECT_KEY`]).
pub const ANNOTATIONS: &[&str] = &[
    ANNOTATION_SERVICE,
    ANNOTATION_UPSTREAM_PORT,
    ANNOTATION_TLS_SECRET,
    ANNOTATION_APP_LOOPBACK,
    ANNOTATION_TRUSTED_PROXIES,
    ANNOTATION_PROXY_PROTOCOL,
    ANNOTATION_CLIENT_CA_SECRET,
    ANNOTATION_REQUIRE_TLS,
    ANNOTATION_WORKERS,
    ANNOTATION_CPU_REQUEST,
    ANNOTATION_MEMORY_REQUEST,
    ANNOTATION_CPU_LIMIT,
    ANNOTATION_MEMORY_LIMIT,
    ANNOTATION_ADMIN_ADDRESS,
    ANNOTATION_ACCESS_LOG,
    ANNOTATION_ACCESS_LOG_SAMPLE,
    ANNOTATION_CLIENT_METRICS,
];

/// The `portcullis-proxy` flags the webhook writes (each as `--flag=value`, or alone for booleans).
pub mod proxy_flag {
    pub const LISTEN: &str = "--listen";
    pub const ADMIN_LISTEN: &str = "--admin-listen";
    pub const UPSTREAM: &str = "--upstream";
    pub const TABLES_FROM: &str = "--tables-from";
    pub const LOG_FORMAT: &str = "--log-format";
    pub const TLS_CERT: &str = "--tls-cert";
    pub const TLS_KEY: &str = "--tls-key";
    pub const CLIENT_CA: &str = "--client-ca";
    pub const REQUIRE_TLS: &str = "--require-tls";
    pub const TRUSTED_PROXIES: &str = "--trusted-proxies";
    pub const PROXY_PROTOCOL: &str = "--proxy-protocol";
    pub const WORKERS: &str = "--workers";
    pub const STORE_URL: &str = "--store-url";
    pub const STORE_TIMEOUT: &str = "--store-timeout";
    pub const REPLICA_ID: &str = "--replica-id";
    pub const ACCESS_LOG: &str = "--access-log";
    pub const ACCESS_LOG_SAMPLE: &str = "--access-log-sample";
    pub const CLIENT_METRICS: &str = "--client-metrics";
}

/// The controller flags holding the chart-wide defaults of the per-workload settings (the chart's
/// `sidecar.*` values are passed through them; an annotation on the pod overrides each).
pub mod default_flag {
    pub const TRUSTED_PROXIES: &str = "--sidecar-trusted-proxies";
    pub const PROXY_PROTOCOL: &str = "--sidecar-proxy-protocol";
    pub const CLIENT_CA_SECRET: &str = "--sidecar-client-ca-secret";
    pub const REQUIRE_TLS: &str = "--sidecar-require-tls";
    pub const WORKERS: &str = "--sidecar-workers";
    pub const CPU_REQUEST: &str = "--sidecar-cpu-request";
    pub const MEMORY_REQUEST: &str = "--sidecar-memory-request";
    pub const CPU_LIMIT: &str = "--sidecar-cpu-limit";
    pub const MEMORY_LIMIT: &str = "--sidecar-memory-limit";
    pub const ADMIN_ADDRESS: &str = "--sidecar-admin-address";
    pub const IMAGE_PULL_POLICY: &str = "--sidecar-image-pull-policy";
    pub const PROXY_PORT: &str = "--sidecar-proxy-port";
    pub const ADMIN_PORT: &str = "--sidecar-admin-port";
}

/// `--flag=value`.
pub fn arg(flag: &str, value: impl std::fmt::Display) -> String {
    format!("{flag}={value}")
}

/// The value of `--flag=value` in `args`, if present (the last one wins, as with clap).
pub fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().rev().find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::inject::{Decision, InjectSettings, SidecarOptions, decide};
    use clap::{CommandFactory, Parser};
    use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
    use kube::api::ObjectMeta;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("app-0".into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container { name: "app".into(), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn injected_args(p: &Pod, s: &InjectSettings) -> Vec<String> {
        let Decision::Inject(patch) = decide(p, "ns", s) else { panic!("expected a patch for {p:?}") };
        let mut v = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut v, &patch).unwrap();
        let out: Pod = serde_json::from_value(v).unwrap();
        let c = out.spec.unwrap().containers.into_iter().find(|c| c.name == CONTAINER_NAME).unwrap();
        c.args.unwrap()
    }

    /// Every argument shape the webhook writes — defaults, every annotation set, chart-wide defaults, a store —
    /// parses with the proxy's own `Cli` into the values meant. `$(POD_NAME)` is expanded by the kubelet.
    #[test]
    fn injected_args_parse_with_the_proxy_cli() {
        let base = [(INJECT_KEY, "true"), (ANNOTATION_SERVICE, "orders"), (ANNOTATION_UPSTREAM_PORT, "8080")];
        let all: Vec<(&str, &str)> = base
            .iter()
            .copied()
            .chain([
                (ANNOTATION_TLS_SECRET, "orders-tls"),
                (ANNOTATION_TRUSTED_PROXIES, "10.0.0.0/8, 192.168.1.7"),
                (ANNOTATION_PROXY_PROTOCOL, "true"),
                (ANNOTATION_CLIENT_CA_SECRET, "partners-ca"),
                (ANNOTATION_REQUIRE_TLS, "true"),
                (ANNOTATION_WORKERS, "3"),
                (ANNOTATION_ADMIN_ADDRESS, "::"),
                (ANNOTATION_ACCESS_LOG, "off"),
                (ANNOTATION_ACCESS_LOG_SAMPLE, "0.25"),
                (ANNOTATION_CLIENT_METRICS, "500"),
            ])
            .collect();
        let mut with_store = InjectSettings::new("proxy:1");
        with_store.store = Some(crate::webhook::inject::SidecarStore {
            url: "redis://redis:6379/0".into(),
            timeout: Some(std::time::Duration::from_millis(40)),
        });
        let mut chart_defaults = InjectSettings::new("proxy:1");
        chart_defaults.proxy_port = 7443;
        chart_defaults.admin_port = 7901;
        chart_defaults.defaults = SidecarOptions {
            trusted_proxies: vec!["172.16.0.0/12".into()],
            proxy_protocol: true,
            client_ca_secret: None,
            require_tls: false,
            workers: Some(2),
            admin_address: Some("0.0.0.0".parse().unwrap()),
            ..Default::default()
        };
        let cases = [
            (pod(&base), InjectSettings::new("proxy:1")),
            (pod(&all), InjectSettings::new("proxy:1")),
            (pod(&base), with_store),
            (pod(&base), chart_defaults),
        ];
        for (i, (p, s)) in cases.iter().enumerate() {
            let args = injected_args(p, s);
            let argv = std::iter::once("portcullis-proxy".to_string())
                .chain(args.iter().map(|a| a.replace("$(POD_NAME)", "orders-0")));
            let cli = portcullis_proxy::Cli::try_parse_from(argv)
                .unwrap_or_else(|e| panic!("case {i}: the proxy refuses the injected args {args:?}: {e}"));
            assert_eq!(cli.listen.port(), s.proxy_port, "case {i}");
            assert_eq!(cli.admin_listen.port(), s.admin_port, "case {i}");
            assert_eq!(cli.upstream, "127.0.0.1:8080");
            assert_eq!(cli.tables_from.as_deref(), Some("configmap/ns/portcullis-table-orders"));
            let config = cli.into_config().unwrap_or_else(|e| panic!("case {i}: {e}"));
            let _ = config;
        }
        // The values of the all-annotations case, field by field.
        let args = injected_args(&cases[1].0, &cases[1].1);
        let cli = portcullis_proxy::Cli::try_parse_from(std::iter::once("p".to_string()).chain(args)).unwrap();
        assert_eq!(cli.trusted_proxies, "10.0.0.0/8,192.168.1.7");
        assert!(cli.proxy_protocol && cli.require_tls);
        assert_eq!(cli.client_ca.unwrap(), std::path::Path::new(CLIENT_CA_MOUNT_PATH).join(CLIENT_CA_KEY));
        assert_eq!(cli.tls_cert.unwrap(), std::path::Path::new(TLS_MOUNT_PATH).join("tls.crt"));
        assert_eq!(cli.workers, 3);
        assert_eq!(cli.admin_listen, "[::]:9901".parse().unwrap());
        let args = injected_args(&cases[3].0, &cases[3].1);
        let cli = portcullis_proxy::Cli::try_parse_from(std::iter::once("p".to_string()).chain(args)).unwrap();
        assert_eq!((cli.trusted_proxies.as_str(), cli.proxy_protocol, cli.workers), ("172.16.0.0/12", true, 2));
    }

    /// Every proxy flag named here exists on the proxy's command line.
    #[test]
    fn proxy_flags_exist_on_the_proxy_cli() {
        let cmd = portcullis_proxy::Cli::command();
        let longs: Vec<String> = cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect();
        for flag in [
            proxy_flag::LISTEN,
            proxy_flag::ADMIN_LISTEN,
            proxy_flag::UPSTREAM,
            proxy_flag::TABLES_FROM,
            proxy_flag::LOG_FORMAT,
            proxy_flag::TLS_CERT,
            proxy_flag::TLS_KEY,
            proxy_flag::CLIENT_CA,
            proxy_flag::REQUIRE_TLS,
            proxy_flag::TRUSTED_PROXIES,
            proxy_flag::PROXY_PROTOCOL,
            proxy_flag::WORKERS,
            proxy_flag::STORE_URL,
            proxy_flag::STORE_TIMEOUT,
            proxy_flag::REPLICA_ID,
        ] {
            assert!(longs.iter().any(|l| l == flag), "{flag} is not a portcullis-proxy flag");
        }
    }

    /// Every controller flag named here exists on the webhook's arguments.
    #[test]
    fn default_flags_exist_on_the_controller() {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: crate::webhook::WebhookArgs,
        }
        let cmd = P::command();
        let longs: Vec<String> = cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect();
        for flag in [
            default_flag::TRUSTED_PROXIES,
            default_flag::PROXY_PROTOCOL,
            default_flag::CLIENT_CA_SECRET,
            default_flag::REQUIRE_TLS,
            default_flag::WORKERS,
            default_flag::CPU_REQUEST,
            default_flag::MEMORY_REQUEST,
            default_flag::CPU_LIMIT,
            default_flag::MEMORY_LIMIT,
            default_flag::ADMIN_ADDRESS,
            default_flag::IMAGE_PULL_POLICY,
            default_flag::PROXY_PORT,
            default_flag::ADMIN_PORT,
        ] {
            assert!(longs.iter().any(|l| l == flag), "{flag} is not a controller flag");
        }
        assert!(ADMIN_PORT_NAME.len() <= 15 && PROXY_PORT_NAME.len() <= 15, "port names are IANA_SVC_NAMEs");
    }

    #[test]
    fn arg_value_reads_the_last_flag() {
        let args: Vec<String> = vec!["--client-ca=/a".into(), "--client-ca-x=1".into(), "--client-ca=/b".into()];
        assert_eq!(arg_value(&args, proxy_flag::CLIENT_CA), Some("/b"));
        assert_eq!(arg_value(&args, proxy_flag::WORKERS), None);
    }
}
