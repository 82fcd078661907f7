//! The connection to the store and its operations, shared by every caller; each operation bounded by the timeout.
//! The connection is the `redis` crate's own for each topology ([`crate::conn`]): one multiplexed
//! `ConnectionManager` (one server), a multiplexed connection to the master the Sentinels name (Sentinel), or the
//! crate's cluster client (Cluster).

use crate::config::{ConfigError, StoreConfig};
use crate::conn::Conn;
use crate::scripts;
use redis::{ErrorKind, Script};
use std::collections::HashMap;
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
    conn: Conn,
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
        let conn = Conn::new(config)?;
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
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        if let Err(e) = &result {
            self.conn.failed(e);
        }
        result
    }

    /// `"single"`, `"sentinel"` or `"cluster"`.
    pub fn topology(&self) -> &'static str {
        self.conn.topology()
    }

    /// `PING`: the store is reachable and accepted the credentials.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let pong: String = self.bounded(redis::cmd("PING").query_async(&mut c)).await?;
        if pong == "PONG" { Ok(()) } else { Err(StoreError::Other(format!("PING answered {pong:?}"))) }
    }

    /// The counts under `keys` (quota keys), in order; a missing key counts 0. One `MGET` per call, or on Redis
    /// Cluster one per hash slot (a slot's keys live on one node: a client's keys share its `{client}` tag), sent
    /// together on the multiplexed connections.
    pub async fn quota_used(&self, keys: &[String]) -> Result<Vec<u64>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = vec![0; keys.len()];
        let batches = if self.conn.is_cluster() { per_slot(keys) } else { vec![(0..keys.len()).collect()] };
        let reads = batches.iter().map(|idx| {
            let mut c = self.conn.clone();
            let mut cmd = redis::cmd("MGET");
            for &i in idx {
                cmd.arg(&keys[i]);
            }
            async move { cmd.query_async::<Vec<Option<u64>>>(&mut c).await }
        });
        let results = self.bounded(futures::future::try_join_all(reads)).await?;
        for (idx, vals) in batches.iter().zip(results) {
            for (&i, v) in idx.iter().zip(vals) {
                out[i] = v.unwrap_or(0);
            }
        }
        Ok(out)
    }

    /// Takes throttle tokens and quota units in one atomic script ([`scripts::TAKE`]).
    pub async fn take(&self, t: &Take<'_>) -> Result<Granted, StoreError> {
        let mut c = self.conn.clone();
        let (tk, qk) = same_slot(t.throttle_key, t.quota_key);
        let mut inv = self.scripts.take.key(tk);
        inv.key(qk)
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
        let (tk, qk) = same_slot(throttle_key, quota_key);
        let mut inv = self.scripts.give_back.key(tk);
        inv.key(qk).arg(tokens).arg(interval_us.max(1)).arg(units);
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

/// A script's two keys, where an unused one (empty: no throttle, or no quota) is replaced by the other, so both
/// name one Redis Cluster slot (the script does not touch an unused key).
fn same_slot<'a>(throttle_key: &'a str, quota_key: &'a str) -> (&'a str, &'a str) {
    match (throttle_key.is_empty(), quota_key.is_empty()) {
        (false, true) => (throttle_key, throttle_key),
        (true, false) => (quota_key, quota_key),
        _ => (throttle_key, quota_key),
    }
}

/// The indices of `keys` grouped by Redis Cluster hash slot, in the order slots first appear.
fn per_slot(keys: &[String]) -> Vec<Vec<usize>> {
    let mut slots: HashMap<redis::cluster_routing::Slot, usize> = HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let slot = redis::cluster_routing::Slot::for_key(k.as_bytes());
        let at = *slots.entry(slot).or_insert_with(|| {
            out.push(Vec::new());
            out.len() - 1
        });
        out[at].push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_batched_per_slot_and_unused_keys_share_the_slot() {
        let keys: Vec<String> =
            ["portcullis:{ns/a}:gold:q:d1", "portcullis:{ns/b}:gold:q:d1", "portcullis:{ns/a}:free:q:m3", "other"]
                .map(String::from)
                .to_vec();
        let batches = per_slot(&keys);
        assert_eq!(batches[0], vec![0, 2], "one client's keys: one slot");
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 4);
        assert!(batches.iter().all(|b| !b.is_empty()));
        assert_eq!(same_slot("t", ""), ("t", "t"));
        assert_eq!(same_slot("", "q"), ("q", "q"));
        assert_eq!(same_slot("t", "q"), ("t", "q"));
    }
}
