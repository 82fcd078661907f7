//! The shared store (Redis) as the controller sees it: its settings (`--store-*` flags, credentials from the
//! environment), what the last check found ([`StoreHealth`]), and how that becomes a plan's `GlobalLimits`
//! condition. No I/O: the checks run in [`crate::runtime::store`].

use crate::conditions::{Cond, reason, types};
use crate::model::StoreUse;
use portcullis_store::{ConfigError, StoreConfig};
use portcullis_table::StoreFallback;
use std::time::Duration;

/// Name of the Secret the controller writes into every namespace with a protected Service: the store credentials
/// (keys [`USERNAME_KEY`], [`PASSWORD_KEY`]) the injected sidecars read through `secretKeyRef`.
pub const SIDECAR_CREDENTIALS_SECRET: &str = "portcullis-store-credentials";
pub const USERNAME_KEY: &str = "username";
pub const PASSWORD_KEY: &str = "password";
/// Environment variables holding the store credentials, in the controller and in the sidecars alike.
pub const ENV_USERNAME: &str = "PORTCULLIS_STORE_USERNAME";
pub const ENV_PASSWORD: &str = "PORTCULLIS_STORE_PASSWORD";

/// Command-line settings of the shared store; `#[command(flatten)]` them into the controller's arguments.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct StoreArgs {
    /// URL of the shared store (Redis) that counts global throttles and quotas across proxy replicas:
    /// `redis://host:6379/0`, `redis+sentinel://s1:26379[,s2:26379]/MASTER[/db]`, `redis+cluster://n1:6379[,n2:6379]`
    /// (`rediss…` for TLS). No credentials in the URL: they come from the environment
    /// (`PORTCULLIS_STORE_USERNAME`, `PORTCULLIS_STORE_PASSWORD`). Unset: no store; quotas default to `Local` and
    /// plans asking for global counts report `StoreNotConfigured`.
    #[arg(long, env = "PORTCULLIS_STORE_URL")]
    pub store_url: Option<String>,
    /// Timeout of each of the controller's store commands (a duration: `500ms`, `2s`).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub store_timeout: Duration,
    /// Timeout of each store command of the injected sidecars (`--store-timeout` of the proxy). Unset: the proxy's
    /// default.
    #[arg(long, value_parser = parse_duration)]
    pub sidecar_store_timeout: Option<Duration>,
    /// A Secret in the controller's namespace with keys `username` and `password` for the store. The controller
    /// copies it as `portcullis-store-credentials` into every namespace with a protected Service, where the
    /// injected sidecars read it. Unset: the sidecars get no credentials.
    #[arg(long, env = "PORTCULLIS_STORE_CREDENTIALS_SECRET")]
    pub store_credentials_secret: Option<String>,
    /// How often the controller checks the store (the `GlobalLimits` conditions) and re-syncs the credential copies.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub store_check_seconds: u64,
    /// How often each ApiClient's `status.usage` is read from the store.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub usage_refresh_seconds: u64,
}

/// `500ms`, `2s`, `1m` → a [`Duration`].
fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::model::parse_per(s)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is not a duration like 500ms, 2s or 1m"))
}

/// A configured store: what the controller connects with and what it tells the sidecars.
#[derive(Clone, PartialEq)]
pub struct StoreSettings {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
    pub sidecar_timeout: Option<Duration>,
    pub credentials_secret: Option<String>,
    pub check_every: Duration,
    pub usage_every: Duration,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("sidecar_timeout", &self.sidecar_timeout)
            .field("credentials_secret", &self.credentials_secret)
            .finish_non_exhaustive()
    }
}

/// Why the store settings cannot be used (the controller refuses to start).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("--store-url / --store-timeout: {0}")]
    Store(#[from] ConfigError),
    #[error("--sidecar-store-timeout: {0}")]
    SidecarTimeout(ConfigError),
}

impl StoreSettings {
    /// The store client's settings.
    pub fn config(&self) -> StoreConfig {
        let mut c = StoreConfig::new(self.url.clone());
        c.username = self.username.clone();
        c.password = self.password.clone();
        c.timeout = self.timeout;
        c.connect_timeout = self.timeout;
        c
    }
}

impl StoreArgs {
    /// The settings, with credentials from `env` (`PORTCULLIS_STORE_USERNAME`, `PORTCULLIS_STORE_PASSWORD`);
    /// `Ok(None)` without `--store-url`.
    pub fn settings(&self, env: impl Fn(&str) -> Option<String>) -> Result<Option<StoreSettings>, SettingsError> {
        let Some(url) = self.store_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else { return Ok(None) };
        let nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
        let settings = StoreSettings {
            url: url.to_string(),
            username: nonempty(ENV_USERNAME),
            password: nonempty(ENV_PASSWORD),
            timeout: self.store_timeout,
            sidecar_timeout: self.sidecar_store_timeout,
            credentials_secret: self.store_credentials_secret.clone().filter(|s| !s.is_empty()),
            check_every: Duration::from_secs(self.store_check_seconds),
            usage_every: Duration::from_secs(self.usage_refresh_seconds),
        };
        // The store client's own checks: a redis://, redis+sentinel:// or redis+cluster:// URL (or rediss…) with
        // hosts, a master name for Sentinel, no database for Cluster, and no credentials in it (they
        // would be copied into every sidecar's pod spec), timeouts within 1 ms - 10 s.
        settings.config().validate()?;
        if let Some(t) = settings.sidecar_timeout {
            let mut c = settings.config();
            c.timeout = t;
            c.validate().map_err(SettingsError::SidecarTimeout)?;
        }
        Ok(Some(settings))
    }
}

/// What the controller's last check of the store found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreHealth {
    /// No store configured (`--store-url` unset).
    #[default]
    NotConfigured,
    /// Configured, not checked yet.
    Unknown,
    /// The last check (a PING with the configured credentials) succeeded.
    Reachable,
    /// Connecting or the PING failed or timed out.
    Unreachable(String),
    /// The store refused the credentials (or their permissions).
    AuthFailed(String),
    /// The store answered, but not as a usable Redis (TLS or protocol mismatch, bad database).
    Invalid(String),
}

impl StoreHealth {
    /// Short name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotConfigured => "not_configured",
            Self::Unknown => "unknown",
            Self::Reachable => "reachable",
            Self::Unreachable(_) => "unreachable",
            Self::AuthFailed(_) => "auth_failed",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// What the proxies do with shared counts while the store is not usable, in words.
pub fn fallback_words(f: StoreFallback) -> &'static str {
    match f {
        StoreFallback::Local => {
            "onStoreUnavailable: Local, counting per replica with the rate and quota divided by the number of \
             replicas each proxy knows of"
        }
        StoreFallback::FailOpen => "onStoreUnavailable: FailOpen, admitting those requests without counting them",
        StoreFallback::FailClosed => "onStoreUnavailable: FailClosed, refusing (503) the requests they would count",
    }
}

/// Which of the plan's counts are shared, in words.
fn what(u: StoreUse) -> &'static str {
    match (u.throttle, u.quota) {
        (true, true) => "the throttle (globalLimits) and the quota (quotaScope: Global)",
        (true, false) => "the throttle (globalLimits)",
        _ => "the quota (quotaScope: Global)",
    }
}

/// The `GlobalLimits` condition of a plan that counts `u` in the store, applying `fallback` when it cannot, with the
/// store in state `health`. A plan that counts nothing in the store gets True `Local`.
pub fn global_limits_condition(u: StoreUse, fallback: StoreFallback, health: &StoreHealth) -> Cond {
    let t = types::GLOBAL_LIMITS;
    if !u.any() {
        return Cond::new(t, true, reason::LOCAL, "throttle and quota (if any) are counted per proxy replica");
    }
    let (what, fb) = (what(u), fallback_words(fallback));
    match health {
        StoreHealth::Reachable => Cond::new(
            t,
            true,
            reason::STORE_REACHABLE,
            format!("{what} counted across replicas in the shared store, which the controller reaches"),
        ),
        StoreHealth::NotConfigured => Cond::new(
            t,
            false,
            reason::STORE_NOT_CONFIGURED,
            format!(
                "{what} must be counted in a shared store, and none is configured (controller flag --store-url, \
                 chart value store.url); clients keep access: until a store is configured the proxies count it per \
                 replica, each with the full limit ({fb} applies once a configured store is away)"
            ),
        ),
        StoreHealth::Unknown => {
            Cond::new(t, false, reason::PENDING, format!("{what} counted in the shared store; checking the store"))
        }
        StoreHealth::Unreachable(e) => Cond::new(
            t,
            false,
            reason::STORE_UNREACHABLE,
            format!("the controller cannot reach the shared store ({e}); proxies that cannot either apply {fb}"),
        ),
        StoreHealth::AuthFailed(e) => Cond::new(
            t,
            false,
            reason::STORE_AUTH_FAILED,
            format!("the shared store refused the credentials ({e}); proxies using them apply {fb}"),
        ),
        StoreHealth::Invalid(e) => Cond::new(
            t,
            false,
            reason::STORE_INVALID,
            format!("the shared store cannot be used ({e}); proxies apply {fb}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        s: StoreArgs,
    }

    fn args(a: &[&str]) -> StoreArgs {
        P::parse_from(std::iter::once("c").chain(a.iter().copied())).s
    }

    #[test]
    fn settings_come_from_flags_and_env() {
        assert_eq!(args(&[]).settings(|_| None), Ok(None));
        let env = |k: &str| match k {
            ENV_USERNAME => Some("portcullis".to_string()),
            ENV_PASSWORD => Some(String::new()),
            _ => None,
        };
        let s = args(&["--store-url=redis://r:6379/0", "--store-timeout=250ms", "--store-credentials-secret=creds"])
            .settings(env)
            .unwrap()
            .unwrap();
        assert_eq!(s.url, "redis://r:6379/0");
        assert_eq!(s.username.as_deref(), Some("portcullis"));
        assert_eq!(s.password, None, "an empty variable is no password");
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.credentials_secret.as_deref(), Some("creds"));
        assert_eq!(s.usage_every, Duration::from_secs(60));
        assert!(P::try_parse_from(["c", "--store-timeout=soon"]).is_err());
        assert!(!format!("{:?}", StoreSettings { password: Some("hunter2".into()), ..s }).contains("hunter2"));
    }

    #[test]
    fn bad_settings_stop_the_controller_with_a_clear_error() {
        for (bad, says) in [
            (vec!["--store-url=not a url"], "does not parse"),
            (vec!["--store-url=http://r"], "scheme"),
            (vec!["--store-url=redis://u:pw@r:6379"], "embeds credentials"),
            (vec!["--store-url=redis://r:6379", "--store-timeout=20s"], "timeout"),
            (vec!["--store-url=redis+sentinel://s1:26379"], "names no master"),
            (vec!["--store-url=redis+cluster://n1:6379/2"], "only database 0"),
        ] {
            let e = args(&bad).settings(|_| None).unwrap_err().to_string();
            assert!(e.starts_with("--store-url") && e.contains(says), "{bad:?}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
        let e = args(&["--store-url=redis://r", "--sidecar-store-timeout=1h"]).settings(|_| None).unwrap_err();
        assert!(e.to_string().starts_with("--sidecar-store-timeout"), "{e}");
    }

    #[test]
    fn global_limits_condition_per_store_state() {
        let both = StoreUse { throttle: true, quota: true };
        let local = global_limits_condition(StoreUse::default(), StoreFallback::FailClosed, &StoreHealth::Reachable);
        assert!(local.ok && local.reason == "Local", "{local:?}");
        let c = global_limits_condition(both, StoreFallback::Local, &StoreHealth::Reachable);
        assert!(c.ok && c.reason == "StoreReachable");
        let c = global_limits_condition(both, StoreFallback::Local, &StoreHealth::NotConfigured);
        assert!(!c.ok && c.reason == "StoreNotConfigured");
        assert!(
            c.message.contains("clients keep access: until a store is configured the proxies count it per replica"),
            "{}",
            c.message
        );
        let quota = StoreUse { throttle: false, quota: true };
        let c =
            global_limits_condition(quota, StoreFallback::FailClosed, &StoreHealth::Unreachable("timed out".into()));
        assert_eq!((c.ok, c.reason), (false, "StoreUnreachable"));
        assert!(c.message.contains("timed out") && c.message.contains("FailClosed, refusing (503)"), "{}", c.message);
        let c = global_limits_condition(quota, StoreFallback::FailOpen, &StoreHealth::AuthFailed("WRONGPASS".into()));
        assert_eq!((c.reason, c.message.contains("FailOpen")), ("StoreAuthFailed", true));
        let c = global_limits_condition(quota, StoreFallback::Local, &StoreHealth::Invalid("not Redis".into()));
        assert_eq!(c.reason, "StoreInvalid");
        let c = global_limits_condition(quota, StoreFallback::Local, &StoreHealth::Unknown);
        assert_eq!((c.ok, c.reason), (false, "Pending"));
    }
}
