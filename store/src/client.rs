//! The connection to the store and its operations. One multiplexed connection (`redis::aio::ConnectionManager`:
//! pipelined, reconnects in the background) shared by every caller; each operation bounded by the timeout.

use crate::config::{ConfigError, StoreConfig};
use crate::scripts;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisConnectionInfo, Script};
use std::sync::Arc;
use std::time::Duration;

/// Why a store operation failed. [`StoreError::kind`] is a short label for metrics.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store settings: {0}")]
    Config(#[from] ConfigError),
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store refused the credentials (check PORTCULLIS_STORE_USERNAME / PORTCULLIS_STORE_PASSWORD): {0}")]
    Auth(String),
    #[error("store unreachable: {0}")]
    Connection(String),
    #[error("store error: {0}")]
    Other(String),
}

impl StoreError {
    /// `config`, `timeout`, `auth`, `connection` or `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Config(_) => "config",
            StoreError::Timeout(_) => "timeout",
            StoreError::Auth(_) => "auth",
            StoreError::Connection(_) => "connection",
            StoreError::Other(_) => "other",
        }
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        let text = e.to_string();
        let auth = e.kind() == ErrorKind::AuthenticationFailed
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
            || text.contains("NOPERM");
        if auth {
            StoreError::Auth(text)
        } else if e.is_timeout() {
            StoreError::Other(format!("timed out: {text}"))
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            StoreError::Connection(text)
        } else {
            StoreError::Other(text)
        }
    }
}

/// What one [`Store::take`] asks for: throttle tokens and quota units of one client under one plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take<'a> {
    /// [`portcullis_table::store_keys::throttle_key`].
    pub throttle_key: &'a str,
    /// Tokens wanted (0: no throttle).
    pub tokens: u64,
    /// GCRA emission interval in microseconds (`per / rate`, rounded up).
    pub interval_us: u64,
    pub burst: u64,
    /// [`portcullis_table::store_keys::quota_key`] of the current period.
    pub quota_key: &'a str,
    /// Units wanted (0: no quota).
    pub units: u64,
    pub limit: u64,
    /// [`portcullis_table::store_keys::quota_key_expires_at`].
    pub expires_at: i64,
}

/// What the store granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Granted {
    pub tokens: u64,
    /// When no token was granted: microseconds until the next one.
    pub wait_us: u64,
    pub units: u64,
    /// The quota's count after this take (when units were asked for and the throttle did not refuse).
    pub used: u64,
}

/// A connection to the shared store. Cheap to clone (one multiplexed connection underneath).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    timeout: Duration,
    scripts: Arc<Scripts>,
}

struct Scripts {
    take: Script,
    give_back: Script,
    heartbeat: Script,
}

impl Store {
    /// Validates `config`, connects and authenticates: an unreachable store or refused credentials are errors.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(config)?;
        store.ping().await?;
        Ok(store)
    }

    /// Validates `config` and returns at once; the connection is made (and remade after a failure) in the
    /// background, and operations fail fast until it is up. For a proxy that must start while the store is down.
    pub fn connect_lazy(config: &StoreConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(connection_info(config)?)?;
        let mgr = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, mgr)?;
        Ok(Self {
            conn,
            timeout: config.timeout,
            scripts: Arc::new(Scripts {
                take: Script::new(scripts::TAKE),
                give_back: Script::new(scripts::GIVE_BACK),
                heartbeat: Script::new(scripts::HEARTBEAT),
            }),
        })
    }

    async fn bounded<T>(&self, f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// `PING`: the store is reachable and accepted the credentials.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let pong: String = self.bounded(redis::cmd("PING").query_async(&mut c)).await?;
        if pong == "PONG" { Ok(()) } else { Err(StoreError::Other(format!("PING answered {pong:?}"))) }
    }

    /// The counts under `keys` (quota keys), in order; a missing key counts 0. One `MGET` (use keys of one
    /// client per call on Redis Cluster: they share a hash slot).
    pub async fn quota_used(&self, keys: &[String]) -> Result<Vec<u64>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let vals: Vec<Option<u64>> = self.bounded(redis::cmd("MGET").arg(keys).query_async(&mut c)).await?;
        Ok(vals.into_iter().map(|v| v.unwrap_or(0)).collect())
    }

    /// Takes throttle tokens and quota units in one atomic script ([`scripts::TAKE`]).
    pub async fn take(&self, t: &Take<'_>) -> Result<Granted, StoreError> {
        let mut c = self.conn.clone();
        let mut inv = self.scripts.take.key(t.throttle_key);
        inv.key(t.quota_key)
            .arg(t.tokens)
            .arg(t.interval_us.max(1))
            .arg(t.burst.max(1))
            .arg(t.units)
            .arg(t.limit)
            .arg(t.expires_at);
        let (tokens, wait_us, units, used): (u64, u64, u64, u64) = self.bounded(inv.invoke_async(&mut c)).await?;
        Ok(Granted { tokens, wait_us, units, used })
    }

    /// Returns unused leases ([`scripts::GIVE_BACK`]).
    pub async fn give_back(
        &self,
        throttle_key: &str,
        tokens: u64,
        interval_us: u64,
        quota_key: &str,
        units: u64,
    ) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let mut inv = self.scripts.give_back.key(throttle_key);
        inv.key(quota_key).arg(tokens).arg(interval_us.max(1)).arg(units);
        let _: i64 = self.bounded(inv.invoke_async(&mut c)).await?;
        Ok(())
    }

    /// Records replica `id` as alive under `replicas_key` ([`portcullis_table::store_keys::replicas_key`]) and
    /// returns how many replicas heartbeat within `ttl`.
    pub async fn heartbeat(&self, replicas_key: &str, id: &str, ttl: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        let mut inv = self.scripts.heartbeat.key(replicas_key);
        inv.arg(id).arg(ttl.as_millis().max(1) as u64);
        self.bounded(inv.invoke_async(&mut c)).await
    }
}

fn connection_info(config: &StoreConfig) -> Result<ConnectionInfo, StoreError> {
    let p = config.parsed()?;
    let addr = if p.tls {
        ConnectionAddr::TcpTls { host: p.host, port: p.port, insecure: false, tls_params: None }
    } else {
        ConnectionAddr::Tcp(p.host, p.port)
    };
    let mut redis = RedisConnectionInfo::default().set_db(p.db);
    if let Some(u) = &config.username {
        redis = redis.set_username(u);
    }
    if let Some(pw) = &config.password {
        redis = redis.set_password(pw);
    }
    Ok(addr.into_connection_info()?.set_redis_settings(redis))
}

use redis::IntoConnectionInfo;
