//! Where the shared store is and how to log in: a URL without credentials, plus a username and password that come
//! from the environment (a Kubernetes Secret), never from the URL or a flag, and never in logs.

use std::fmt;
use std::time::Duration;

/// Environment variable with the store's ACL username (optional; Redis' `default` user when unset).
pub const USERNAME_ENV: &str = "PORTCULLIS_STORE_USERNAME";
/// Environment variable with the store's password (optional).
pub const PASSWORD_ENV: &str = "PORTCULLIS_STORE_PASSWORD";

/// Default time one store operation may take before the caller gives up on it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// Settings of the shared store (Redis).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS, server certificate checked against the
    /// system roots). No user information in the URL.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// How long one operation (a command or script, including waiting for the connection) may take.
    pub timeout: Duration,
    /// How long establishing a connection (TCP, TLS, AUTH) may take.
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("store URL {0:?} does not parse as a URL: {1}")]
    Parse(String, String),
    #[error(
        "store URL scheme {0:?} is not supported: use redis:// or rediss:// (TLS); Sentinel and Cluster URLs are not supported by this build"
    )]
    Scheme(String),
    #[error("store URL {0:?} has no host")]
    NoHost(String),
    #[error(
        "store URL embeds credentials: remove them from the URL and set PORTCULLIS_STORE_USERNAME / PORTCULLIS_STORE_PASSWORD (from a Secret) instead"
    )]
    EmbeddedCredentials,
    #[error("store URL path {0:?} is not a database number (redis://host:port/N)")]
    Database(String),
    #[error("store URL has query parameters ({0}); settings come from flags and the environment")]
    Query(String),
    #[error("store timeout must be between 1 ms and 10 s, got {0:?}")]
    Timeout(Duration),
    #[error("a store password is set without a username and the username is empty")]
    EmptyUsername,
}

impl StoreConfig {
    /// A config for `url` with no credentials and the default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// Reads [`USERNAME_ENV`] and [`PASSWORD_ENV`] (unset or empty: none).
    pub fn with_env_credentials(mut self) -> Self {
        let get = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        self.username = get(USERNAME_ENV);
        self.password = get(PASSWORD_ENV);
        self
    }

    /// Checks the URL and timeouts; the error says what to change (and never repeats a credential).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.parsed().map(|_| ())
    }

    /// The validated parts: (TLS, host, port, database).
    pub(crate) fn parsed(&self) -> Result<Parsed, ConfigError> {
        let u = url::Url::parse(&self.url).map_err(|e| ConfigError::Parse(redact_url(&self.url), e.to_string()))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err(ConfigError::EmbeddedCredentials);
        }
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(ConfigError::Scheme(other.to_string())),
        };
        let host = match u.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err(ConfigError::NoHost(self.url.clone())),
        };
        let port = u.port().unwrap_or(6379);
        let path = u.path().trim_start_matches('/');
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<i64>().map_err(|_| ConfigError::Database(path.to_string()))?
        };
        if let Some(q) = u.query() {
            return Err(ConfigError::Query(q.to_string()));
        }
        for t in [self.timeout, self.connect_timeout] {
            if t < Duration::from_millis(1) || t > Duration::from_secs(10) {
                return Err(ConfigError::Timeout(t));
            }
        }
        if self.username.as_deref() == Some("") {
            return Err(ConfigError::EmptyUsername);
        }
        Ok(Parsed { tls, host, port, db })
    }
}

pub(crate) struct Parsed {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
}

/// A URL as it may be logged: any user information replaced.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Safe to log: the URL (user information redacted), whether credentials are set, the timeouts.
impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", redact_url(&self.url))?;
        match &self.username {
            Some(u) => write!(f, " (user {u}")?,
            None => write!(f, " (default user")?,
        }
        let pw = if self.password.is_some() { "password set" } else { "no password" };
        write!(f, ", {pw}, timeout {:?})", self.timeout)
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreConfig({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_tls_urls() {
        for u in ["redis://127.0.0.1:6379", "rediss://redis.example:6380/2", "redis://[::1]:7000/", "redis://r"] {
            StoreConfig::new(u).validate().unwrap_or_else(|e| panic!("{u}: {e}"));
        }
        let p = StoreConfig::new("rediss://redis.example/3").parsed().unwrap();
        assert!(p.tls);
        assert_eq!((p.host.as_str(), p.port, p.db), ("redis.example", 6379, 3));
    }

    #[test]
    fn refuses_with_a_reason() {
        let err = |u: &str| StoreConfig::new(u).validate().unwrap_err();
        assert_eq!(err("redis://:hunter2@r:6379"), ConfigError::EmbeddedCredentials);
        assert_eq!(err("redis://alice:hunter2@r:6379"), ConfigError::EmbeddedCredentials);
        assert_eq!(err("redis://alice@r:6379"), ConfigError::EmbeddedCredentials);
        assert!(matches!(err("http://r:6379"), ConfigError::Scheme(s) if s == "http"));
        assert!(matches!(err("redis+sentinel://r:26379/m"), ConfigError::Scheme(_)));
        assert!(matches!(err("redis://r/x"), ConfigError::Database(_)));
        assert!(matches!(err("redis://r/0?protocol=resp3"), ConfigError::Query(_)));
        assert!(matches!(err("not a url"), ConfigError::Parse(..)));
        let mut c = StoreConfig::new("redis://r");
        c.timeout = Duration::ZERO;
        assert!(matches!(c.validate(), Err(ConfigError::Timeout(_))));
    }

    #[test]
    fn display_and_errors_never_show_a_password() {
        let mut c = StoreConfig::new("redis://r:6379");
        c.username = Some("proxy".into());
        c.password = Some("hunter2".into());
        let shown = format!("{c} {c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user proxy") && shown.contains("password set"), "{shown}");
        let bad = StoreConfig::new("redis://alice:hunter2@r:6379");
        assert!(!format!("{bad} {}", bad.validate().unwrap_err()).contains("hunter2"));
        let unparsable = StoreConfig::new("redis://alice:hunter2@r:notaport");
        assert!(!unparsable.validate().unwrap_err().to_string().contains("hunter2"));
    }
}
