//! The `portcullis.dev/v1alpha1` custom resources: [`UsagePlan`] and [`ApiClient`].
//!
//! Validation that needs no lookups lives in the schema (OpenAPI bounds, enums, CEL `x-kubernetes-validations`);
//! the checked-in YAML under `crds/` is generated from these types by the `crdgen` binary.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "portcullis.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "portcullis.dev/v1alpha1";

/// Which Services a plan grants, with which limits.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "UsagePlan",
    plural = "usageplans",
    shortname = "up",
    namespaced,
    status = "UsagePlanStatus",
    printcolumn = r#"{"name":"Rate","type":"integer","jsonPath":".spec.throttle.rate"}"#,
    printcolumn = r#"{"name":"Per","type":"string","jsonPath":".spec.throttle.per","priority":1}"#,
    printcolumn = r#"{"name":"Burst","type":"integer","jsonPath":".spec.throttle.burst"}"#,
    printcolumn = r#"{"name":"Quota","type":"integer","jsonPath":".spec.quota.limit"}"#,
    printcolumn = r#"{"name":"Period","type":"string","jsonPath":".spec.quota.period","priority":1}"#,
    printcolumn = r#"{"name":"Clients","type":"integer","jsonPath":".status.clients"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].status"}"#,
    printcolumn = r#"{"name":"Global","type":"string","jsonPath":".status.conditions[?(@.type==\"GlobalLimits\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlanSpec {
    /// Protected Services (in this namespace) the plan grants, each optionally limited to route scopes.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub services: Vec<ServiceGrant>,
    /// Rate limit per client (GCRA): `rate` requests per `per`, bursts up to `burst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    /// Request quota per client and calendar period (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSpec>,
    /// Count the throttle across proxy replicas, in the shared store (Redis), instead of per replica. Needs a store
    /// configured in the controller (`--store-url`, chart value `store.url`); without one the plan is not Ready
    /// (reason `StoreNotConfigured`) and the proxies count per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_limits: Option<bool>,
    /// Where the quota is counted: `Global` (across replicas in the shared store: exact, survives proxy restarts) or
    /// `Local` (per proxy replica, in memory). Unset: `Global` when the controller has a store configured, `Local`
    /// otherwise. An explicit `Global` without a store makes the plan not Ready (reason `StoreNotConfigured`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_scope: Option<QuotaScopeSpec>,
    /// What the proxies do with this plan's shared counts (a `globalLimits` throttle, a `Global` quota) while the
    /// configured store is unreachable or timing out: `Local` (the default: count per replica, with the rate
    /// and the quota divided by the number of replicas the proxy knows of), `FailOpen` (admit without counting) or
    /// `FailClosed` (refuse with 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_unavailable: Option<StoreFallbackSpec>,
    /// Write the NetworkPolicy `portcullis-<service>` admitting ingress to the Service's pods only on the sidecar's
    /// ports (the proxy port from anywhere, the admin port from the controller and scrapers). Unset: the
    /// controller's default, on (`--network-policy-default`, chart value `networkPolicy.enabled`). `false` opts
    /// this plan out; the policy is still written while another plan granting the Service wants it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceGrant {
    /// Name of a Service in the plan's namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Route scopes; absent or empty grants every path and method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub routes: Option<Vec<RouteSpec>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Segment-aware path prefix: `/v1` matches `/v1` and `/v1/x`, not `/v10`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path_prefix: String,
    /// HTTP methods allowed under the prefix; absent or empty allows all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 16), regex(pattern = "^[A-Z]+$")))]
    pub methods: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleSpec {
    /// Requests allowed per `per`.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub rate: u32,
    /// Window of `rate`: a duration such as `500ms`, `1s`, `1m`, `1h`.
    #[serde(default = "default_per")]
    #[schemars(length(max = 12), regex(pattern = "^[1-9][0-9]{0,8}(ms|s|m|h)$"))]
    pub per: String,
    /// Largest burst; defaults to `rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub burst: Option<u32>,
}

fn default_per() -> String {
    "1s".to_string()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSpec {
    /// Requests allowed per period.
    #[schemars(range(min = 1, max = 1_000_000_000_000_000u64))]
    pub limit: u64,
    pub period: QuotaPeriod,
}

/// UTC calendar periods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum QuotaPeriod {
    Day,
    Week,
    Month,
}

/// Where a quota is counted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum QuotaScopeSpec {
    Global,
    Local,
}

/// What proxies do with shared counts while the store is unavailable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StoreFallbackSpec {
    Local,
    FailOpen,
    FailClosed,
}

// Lists are always serialised (see `ApiClientStatus`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlanStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// ApiClients (in this namespace) naming this plan.
    #[serde(default)]
    pub clients: u32,
    /// Tables currently written for the plan's Services.
    #[serde(default)]
    pub tables: Vec<TableStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableStatus {
    pub service: String,
    pub revision: String,
    pub shards: u32,
}

/// A consumer of protected Services: its keys, source ranges and plans.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "ApiClient",
    plural = "apiclients",
    shortname = "ac",
    namespaced,
    status = "ApiClientStatus",
    printcolumn = r#"{"name":"Plans","type":"string","jsonPath":".spec.usagePlans"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].status"}"#,
    printcolumn = r#"{"name":"Keys","type":"integer","jsonPath":".status.keys"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.usedSummary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.keys) && size(self.keys) > 0) || (has(self.certificates) && size(self.certificates) > 0)",
     "message": "at least one of keys or certificates must be given"}
]))]
pub struct ApiClientSpec {
    /// Names of UsagePlans in this namespace; earlier plans take precedence.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub usage_plans: Vec<String>,
    /// Allowed source addresses (IPv4/IPv6 CIDRs). Empty admits no address; `0.0.0.0/0` and `::/0` must be explicit.
    #[serde(default)]
    #[schemars(length(max = 256), inner(length(max = 64)))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(c, isCIDR(c))", "message": "every sourceRanges entry must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32"}
    ]))]
    pub source_ranges: Vec<String>,
    /// API keys; several at once for rotation. May be empty when `certificates` identify the client.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(k, !has(k.name) || self.filter(j, has(j.name) && j.name == k.name).size() == 1)",
         "message": "key names must be unique within the ApiClient"}
    ]))]
    pub keys: Vec<KeySpec>,
    /// Client-certificate identities (TLS with `--client-ca` at the proxy): a verified certificate matching one of
    /// them identifies this client without a key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub certificates: Vec<CertificateSpec>,
    /// Require a matching client certificate in addition to the key (403 `certificate_required` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_certificate: Option<bool>,
    /// Reject every request of this client (403) while keeping it in the tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// One key: from an existing Secret, or generated by the controller into an owned Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.secretRef) != has(self.generate)", "message": "exactly one of secretRef or generate must be set"},
    {"rule": "!has(self.generate) || has(self.name)",
     "message": "a generated key needs a name (its Secret is <client>-key-<name>)"}
]))]
pub struct KeySpec {
    /// The key's identity within the ApiClient: a DNS label, unique among the client's keys. Required with
    /// `generate`: the generated Secret is named `<client>-key-<name>`, so reordering keys changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateSpec>,
    /// The key is refused from this instant on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// One accepted client-certificate identity: exactly one of the fields.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.subject), has(self.sanDNS), has(self.sanURI), has(self.sha256)].filter(x, x).size() == 1",
     "message": "exactly one of subject, sanDNS, sanURI or sha256 must be set"}
]))]
pub struct CertificateSpec {
    /// The certificate subject's Common Name (CN), compared exactly. Not a full distinguished name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub subject: Option<String>,
    /// A DNS subjectAltName, compared case-insensitively.
    #[serde(default, rename = "sanDNS", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub san_dns: Option<String>,
    /// A URI subjectAltName (e.g. a SPIFFE ID), compared exactly.
    #[serde(default, rename = "sanURI", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub san_uri: Option<String>,
    /// SHA-256 fingerprint of the certificate's DER encoding: 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
}

/// A key stored in a Secret of the ApiClient's namespace. The Secret must be labelled `portcullis.dev/api-key: "true"`
/// (opt-in) and must not be owned by another ApiClient.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Ask the controller to create a Secret `<client>-key-<name>` holding a fresh random key. The Secret is created once
/// and never rewritten; if it is deleted, a new (different) key is generated into a new Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GenerateSpec {}

// Lists are always serialised (empty as `[]`), so that a merge patch of the status clears a list that became empty
// instead of leaving the old entries in place.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiClientStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Short fingerprints (`sha256:` + 12 hex digits of the key's SHA-256) of the resolved keys, in spec order.
    #[serde(default)]
    pub key_fingerprints: Vec<String>,
    /// The generated keys in use: key name, Secret and fingerprint. A key whose Secret disappears is regenerated
    /// (a new key) and reported with a `KeyRegenerated` Event naming the old and new fingerprints.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub generated_keys: Vec<GeneratedKeyStatus>,
    /// Number of resolved, unexpired keys.
    #[serde(default)]
    pub keys: u32,
    /// Quota use in the current UTC period, per plan (in `spec.usagePlans` order) whose quota is counted in the
    /// shared store (`quotaScope: Global`), read from the store every `--usage-refresh-seconds`. Quotas counted per
    /// proxy replica (`Local`) are not listed: no single number describes them.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["plan"]))]
    pub usage: Vec<UsageStatus>,
    /// `used/limit` of each `usage` entry, comma-separated (the `Used` column of `kubectl get apiclients`).
    /// Always serialised (`null` when there is no entry), so a merge patch clears it.
    #[serde(default)]
    pub used_summary: Option<String>,
}

/// One plan's quota use in the current period.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageStatus {
    /// The UsagePlan.
    pub plan: String,
    /// Its quota period (UTC calendar `Day`, `Week` or `Month`).
    pub period: QuotaPeriod,
    /// Requests counted in the current period, across every proxy replica.
    pub used: u64,
    /// The plan's quota limit.
    pub limit: u64,
    /// When the current period ends and the count starts again at zero.
    pub resets_at: Time,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedKeyStatus {
    /// `spec.keys[].name`.
    pub name: String,
    /// The Secret holding the key (`<client>-key-<name>`).
    pub secret: String,
    /// `sha256:` + 12 hex digits of the key's SHA-256.
    pub fingerprint: String,
}

/// Both CRDs as a multi-document YAML stream (what `crdgen` prints).
pub fn crds_yaml() -> (String, String) {
    let to_yaml = |crd| serde_yaml::to_string(&crd).expect("CRDs serialise to YAML");
    (to_yaml(ApiClient::crd()), to_yaml(UsagePlan::crd()))
}

/// File names of the generated CRDs.
pub const API_CLIENTS_CRD_FILE: &str = "portcullis.dev_apiclients.yaml";
pub const USAGE_PLANS_CRD_FILE: &str = "portcullis.dev_usageplans.yaml";

/// Directories (relative to the workspace root) holding a checked-in copy of every generated CRD file: the one
/// `kubectl apply -f crds/` reads and the chart's (`files/crds/`, rendered by `templates/crds.yaml` when `crds.enabled`).
pub const CRD_DIRS: [&str; 2] = ["crds", "charts/portcullis/files/crds"];

/// The one command that regenerates every copy.
pub const REGENERATE: &str = "cargo xtask crdgen";

/// Header put at the top of the generated files.
pub const GENERATED_HEADER: &str = "# Generated by `cargo xtask crdgen`; do not edit.\n";

/// The generated files: (file name, content with [`GENERATED_HEADER`]); each is written into every [`CRD_DIRS`].
pub fn crd_files() -> [(&'static str, String); 2] {
    let (ac, up) = crds_yaml();
    [
        (API_CLIENTS_CRD_FILE, format!("{GENERATED_HEADER}{ac}")),
        (USAGE_PLANS_CRD_FILE, format!("{GENERATED_HEADER}{up}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
    }

    #[test]
    fn checked_in_crds_are_up_to_date() {
        for dir in CRD_DIRS {
            for (file, want) in crd_files() {
                let path = format!("{dir}/{file}");
                let have = std::fs::read_to_string(root().join(&path)).unwrap_or_default();
                assert!(have == want, "{path} is stale: regenerate every copy with `{REGENERATE}`");
            }
        }
    }

    #[test]
    fn schema_carries_cel_rules_bounds_and_list_maps() {
        let (ac, up) = crds_yaml();
        assert!(ac.contains("isCIDR(c)"));
        assert!(ac.contains("has(self.secretRef) != has(self.generate)"));
        assert!(ac.contains("maxItems: 256"));
        assert!(ac.contains("filter(x, x).size() == 1"));
        assert!(ac.contains("size(self.certificates) > 0"));
        assert!(ac.contains("^[0-9a-fA-F]{64}$"));
        assert!(ac.contains("!has(self.generate) || has(self.name)"));
        assert!(ac.contains("key names must be unique within the ApiClient"));
        assert!(ac.contains("x-kubernetes-list-type: map"));
        assert!(up.contains("- Day"));
        assert!(up.contains("minimum: 1"));
        assert!(up.contains("shortNames:\n    - up"));
    }

    #[test]
    fn empty_status_lists_are_written_so_a_merge_patch_clears_them() {
        let v = serde_json::to_value(ApiClientStatus::default()).unwrap();
        for field in ["conditions", "keyFingerprints", "generatedKeys"] {
            assert_eq!(v[field], serde_json::json!([]), "{field}: {v}");
        }
        let v = serde_json::to_value(UsagePlanStatus::default()).unwrap();
        for field in ["conditions", "tables"] {
            assert_eq!(v[field], serde_json::json!([]), "{field}: {v}");
        }
        // And the other way: status written by an older version (lists left out) still reads.
        let old: ApiClientStatus = serde_json::from_str(r#"{"keys": 1}"#).unwrap();
        assert!(old.generated_keys.is_empty() && old.conditions.is_empty());
    }
}
