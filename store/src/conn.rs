//! One connection type over the three topologies, each through the `redis` crate's own support, so the scripts and
//! commands in [`crate::client`] are written once (`redis::aio::ConnectionLike`):
//!
//! - one server: `ConnectionManager` (multiplexed, pipelined, reconnects in the background);
//! - Sentinel: the crate's `SentinelClient` finds the master; one multiplexed connection to it is kept until a
//!   command fails for a reason that may mean a failover (I/O error, timeout, `READONLY` from a demoted master),
//!   after which the next command asks the Sentinels again;
//! - Cluster: the crate's async cluster client (slot map, `MOVED`/`ASK` redirections, reconnects); scripts are
//!   routed by their first key, and every key of one call shares a slot ([`portcullis_table::store_keys`]).

use crate::config::{Parsed, StoreConfig, Topology};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisError, RedisFuture, RedisResult, TlsMode, Value,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::StoreError;

#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Sentinel(Arc<SentinelConn>),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Builds the connection for `config` without waiting for it: it is made on first use (and remade after a
    /// failure), so a store that is down at start only fails operations.
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        let p = config.parsed()?;
        let redis = redis_info(config, p.db);
        match &p.topology {
            Topology::Single => {
                let (host, port) = p.nodes[0].clone();
                let info = addr(p.tls, host, port).into_connection_info()?.set_redis_settings(redis);
                let mgr = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(500));
                Ok(Conn::Single(ConnectionManager::new_lazy_with_config(redis::Client::open(info)?, mgr)?))
            }
            Topology::Sentinel { master } => Ok(Conn::Sentinel(Arc::new(SentinelConn::new(config, &p, master)?))),
            Topology::Cluster => {
                let nodes: Vec<ConnectionInfo> = p
                    .nodes
                    .iter()
                    .map(|(h, port)| addr(p.tls, h.clone(), *port).into_connection_info())
                    .collect::<RedisResult<_>>()?;
                let mut b = ClusterClientBuilder::new(nodes)
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.timeout)
                    .retries(1);
                if let Some(u) = &config.username {
                    b = b.username(u);
                }
                if let Some(pw) = &config.password {
                    b = b.password(pw);
                }
                if p.tls {
                    b = b.tls(TlsMode::Secure);
                }
                let cluster = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(config.connect_timeout)
                    .set_response_timeout(config.timeout);
                Ok(Conn::Cluster(b.build()?.get_pending_async_connection_with_config(cluster)))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    pub fn topology(&self) -> &'static str {
        match self {
            Conn::Single(_) => "single",
            Conn::Sentinel(_) => "sentinel",
            Conn::Cluster(_) => "cluster",
        }
    }

    /// An operation failed with `e`: a Sentinel connection that may point at a former master is dropped.
    pub fn failed(&self, e: &StoreError) {
        if let Conn::Sentinel(s) = self
            && !matches!(e, StoreError::Auth(_) | StoreError::Config(_))
        {
            s.forget();
        }
    }
}

fn addr(tls: bool, host: String, port: u16) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }
    } else {
        ConnectionAddr::Tcp(host, port)
    }
}

fn redis_info(config: &StoreConfig, db: i64) -> RedisConnectionInfo {
    let mut redis = RedisConnectionInfo::default().set_db(db);
    if let Some(u) = &config.username {
        redis = redis.set_username(u);
    }
    if let Some(pw) = &config.password {
        redis = redis.set_password(pw);
    }
    redis
}

/// The master that the Sentinels name, and the connection to it while it works.
pub(crate) struct SentinelConn {
    client: tokio::sync::Mutex<SentinelClient>,
    conn: Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
    db: i64,
}

impl SentinelConn {
    /// The credentials and database are the master's; the Sentinels are asked without credentials (Sentinels
    /// have their own ACL, usually open on the internal network) but over TLS with `rediss+sentinel://`.
    fn new(config: &StoreConfig, p: &Parsed, master: &str) -> Result<Self, StoreError> {
        let sentinels = p.nodes.iter().map(|(h, port)| addr(false, h.clone(), *port));
        let mut b =
            SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)?.set_client_to_redis_db(p.db);
        if let Some(u) = &config.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(pw) = &config.password {
            b = b.set_client_to_redis_password(pw);
        }
        if p.tls {
            b = b.set_client_to_redis_tls_mode(TlsMode::Secure).set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        Ok(Self {
            client: tokio::sync::Mutex::new(b.build()?),
            conn: Mutex::new(None),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(config.timeout)),
            db: p.db,
        })
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The connection to the current master, asking the Sentinels when there is none.
    async fn get(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let mut client = self.client.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let c = client.get_async_connection_with_config(&self.config).await?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn forget(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn forget_after(&self, e: &RedisError) {
        let failover = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.code() == Some("READONLY");
        if failover {
            self.forget();
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.get().await?;
                let r = c.req_packed_command(cmd).await;
                if let Err(e) = &r {
                    s.forget_after(e);
                }
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.get().await?;
                let r = c.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &r {
                    s.forget_after(e);
                }
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => s.db,
        }
    }
}
