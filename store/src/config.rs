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
    /// One of (`rediss…`: TLS, server certificates checked against the system roots; no user information):
    /// - `redis://host[:6379][/db]`: one server;
    /// - `redis+sentinel://host[:26379][,host2[:26379]…]/MASTER[/db]`: the master named `MASTER`, found through
    ///   the listed Sentinels (asked again after a failover);
    /// - `redis+cluster://host[:6379][,host2[:6379]…]`: a Redis Cluster, from any of the listed seed nodes
    ///   (database 0 only).
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
        "store URL scheme {0:?} is not supported: use redis://host:6379[/db], rediss:// (TLS), \
         redis+sentinel://host:26379[,host2:26379]/MASTER[/db] or redis+cluster://host:6379[,host2:6379] \
         (rediss+sentinel://, rediss+cluster:// for TLS)"
    )]
    Scheme(String),
    #[error("store URL {0:?} has no host")]
    NoHost(String),
    #[error("store URL {0:?}: {1:?} is not host[:port] ({2})")]
    Node(String, String, String),
    #[error(
        "store URL {0:?} lists several hosts: only redis+sentinel:// (Sentinels) and redis+cluster:// (seed nodes) take a list"
    )]
    SeveralHosts(String),
    #[error(
        "store URL embeds credentials: remove them from the URL and set PORTCULLIS_STORE_USERNAME / PORTCULLIS_STORE_PASSWORD (from a Secret) instead"
    )]
    EmbeddedCredentials,
    #[error("store URL path {0:?} is not a database number (redis://host:port/N)")]
    Database(String),
    #[error("Sentinel URL {0:?} names no master: use redis+sentinel://host:26379[,host2:26379]/MASTER_NAME[/db]")]
    NoMaster(String),
    #[error("Sentinel URL path {0:?} is not MASTER_NAME or MASTER_NAME/db")]
    SentinelPath(String),
    #[error("Redis Cluster has only database 0: remove the path {0:?} from the redis+cluster:// URL")]
    ClusterDatabase(String),
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

    /// The validated parts.
    pub(crate) fn parsed(&self) -> Result<Parsed, ConfigError> {
        let url = self.url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(ConfigError::Parse(redact_url(url), "no scheme (redis://…)".into()));
        };
        let (base, tls) = match scheme.strip_prefix("rediss") {
            Some(tail) => (format!("redis{tail}"), true),
            None => (scheme.to_string(), false),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(ConfigError::EmbeddedCredentials);
        }
        if let Some((_, q)) = path.split_once('?').or_else(|| authority.split_once('?')) {
            return Err(ConfigError::Query(q.to_string()));
        }
        if authority.contains('#') || path.contains('#') {
            return Err(ConfigError::Parse(redact_url(url), "a fragment (#…) is not part of a store URL".into()));
        }
        let (topology, default_port) = match base.as_str() {
            "redis" => (Topology::Single, 6379),
            "redis+sentinel" => (Topology::Sentinel { master: String::new() }, 26379),
            "redis+cluster" => (Topology::Cluster, 6379),
            other => return Err(ConfigError::Scheme(other.to_string())),
        };
        let nodes = authority.split(',').map(|n| node(url, n, default_port)).collect::<Result<Vec<_>, _>>()?;
        let path = path.trim_end_matches('/');
        let database = |p: &str| p.parse::<i64>().map_err(|_| ConfigError::Database(p.to_string()));
        let (topology, db) = match topology {
            Topology::Single => {
                if nodes.len() > 1 {
                    return Err(ConfigError::SeveralHosts(url.to_string()));
                }
                (Topology::Single, if path.is_empty() { 0 } else { database(path)? })
            }
            Topology::Sentinel { .. } => {
                let mut parts = path.split('/');
                let master = parts.next().unwrap_or_default().to_string();
                if master.is_empty() {
                    return Err(ConfigError::NoMaster(url.to_string()));
                }
                let db = match (parts.next(), parts.next()) {
                    (None, _) => 0,
                    (Some(d), None) => database(d)?,
                    _ => return Err(ConfigError::SentinelPath(path.to_string())),
                };
                (Topology::Sentinel { master }, db)
            }
            Topology::Cluster => {
                if !path.is_empty() && path != "0" {
                    return Err(ConfigError::ClusterDatabase(path.to_string()));
                }
                (Topology::Cluster, 0)
            }
        };
        for t in [self.timeout, self.connect_timeout] {
            if t < Duration::from_millis(1) || t > Duration::from_secs(10) {
                return Err(ConfigError::Timeout(t));
            }
        }
        if self.username.as_deref() == Some("") {
            return Err(ConfigError::EmptyUsername);
        }
        Ok(Parsed { tls, topology, nodes, db })
    }
}

/// One `host[:port]` of an authority (IPv6 in brackets).
fn node(url: &str, n: &str, default_port: u16) -> Result<(String, u16), ConfigError> {
    if n.is_empty() {
        return Err(ConfigError::NoHost(url.to_string()));
    }
    let u = url::Url::parse(&format!("redis://{n}"))
        .map_err(|e| ConfigError::Node(url.to_string(), n.to_string(), e.to_string()))?;
    let host = match u.host_str() {
        Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        _ => return Err(ConfigError::NoHost(url.to_string())),
    };
    if u.path() != "" && u.path() != "/" {
        return Err(ConfigError::Node(url.to_string(), n.to_string(), "unexpected path".into()));
    }
    Ok((host, u.port().unwrap_or(default_port)))
}

/// How the store is deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server (`redis://`).
    Single,
    /// A master found through Sentinels (`redis+sentinel://`): the nodes are the Sentinels.
    Sentinel { master: String },
    /// A Redis Cluster (`redis+cluster://`): the nodes are seeds.
    Cluster,
}

#[derive(Debug)]
pub(crate) struct Parsed {
    pub tls: bool,
    pub topology: Topology,
    /// (host, port): the server, the Sentinels or the Cluster seeds.
    pub nodes: Vec<(String, u16)>,
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
        assert_eq!((p.nodes, p.db, p.topology), (vec![("redis.example".to_string(), 6379)], 3, Topology::Single));
    }

    #[test]
    fn accepts_sentinel_and_cluster_urls() {
        let p = StoreConfig::new("redis+sentinel://s1,s2:26380,[::1]/mymaster/2").parsed().unwrap();
        assert_eq!(p.topology, Topology::Sentinel { master: "mymaster".into() });
        let nodes = vec![("s1".to_string(), 26379), ("s2".to_string(), 26380), ("::1".to_string(), 26379)];
        assert_eq!((p.nodes, p.db, p.tls), (nodes, 2, false));
        let p = StoreConfig::new("rediss+sentinel://s1/mymaster").parsed().unwrap();
        assert_eq!((p.db, p.tls), (0, true));
        let p = StoreConfig::new("redis+cluster://c1:7000,c2:7001/").parsed().unwrap();
        assert_eq!(p.topology, Topology::Cluster);
        assert_eq!(p.nodes, vec![("c1".to_string(), 7000), ("c2".to_string(), 7001)]);
        assert!(StoreConfig::new("rediss+cluster://c1").parsed().unwrap().tls);
    }

    #[test]
    fn malformed_sentinel_and_cluster_urls_say_what_to_change() {
        let err = |u: &str| StoreConfig::new(u).validate().unwrap_err();
        assert!(matches!(err("redis+sentinel://s1:26379"), ConfigError::NoMaster(_)));
        assert!(matches!(err("redis+sentinel://s1:26379/"), ConfigError::NoMaster(_)));
        assert!(matches!(err("redis+sentinel://s1/m/x"), ConfigError::Database(d) if d == "x"));
        assert!(matches!(err("redis+sentinel://s1/m/1/2"), ConfigError::SentinelPath(_)));
        assert!(matches!(err("redis+cluster://c1:7000/3"), ConfigError::ClusterDatabase(_)));
        assert!(matches!(err("redis+cluster://c1:7000,,c2"), ConfigError::NoHost(_)));
        assert!(matches!(err("redis+cluster://c1:notaport"), ConfigError::Node(..)));
        assert!(matches!(err("redis://a:6379,b:6379"), ConfigError::SeveralHosts(_)));
        assert!(matches!(err("redis+sentinel://u:pw@s1/m"), ConfigError::EmbeddedCredentials));
        assert!(matches!(err("redis+cluster://c1?tls=1"), ConfigError::Query(_)));
        assert!(matches!(err("redis+clusters://c1"), ConfigError::Scheme(s) if s == "redis+clusters"));
        let text = err("redis+sentinel://s1:26379").to_string();
        assert!(text.contains("redis+sentinel://host:26379[,host2:26379]/MASTER_NAME"), "{text}");
        let text = err("memcached://m").to_string();
        assert!(text.contains("redis+cluster://") && text.contains("redis+sentinel://"), "{text}");
    }

    #[test]
    fn refuses_with_a_reason() {
        let err = |u: &str| StoreConfig::new(u).validate().unwrap_err();
        assert_eq!(err("redis://:hunter2@r:6379"), ConfigError::EmbeddedCredentials);
        assert_eq!(err("redis://alice:hunter2@r:6379"), ConfigError::EmbeddedCredentials);
        assert_eq!(err("redis://alice@r:6379"), ConfigError::EmbeddedCredentials);
        assert!(matches!(err("http://r:6379"), ConfigError::Scheme(s) if s == "http"));
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
