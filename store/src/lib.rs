//! The shared store (Redis) where Portcullis proxies count throttles (`globalLimits`) and quotas across replicas,
//! and where the controller reads each client's quota use. Key names come from
//! [`portcullis_table::store_keys`]; the Lua scripts are in [`scripts`].
//!
//! ```no_run
//! # async fn t() -> Result<(), portcullis_store::StoreError> {
//! use portcullis_store::{Store, StoreConfig};
//! let config = StoreConfig::new("redis://127.0.0.1:6379").with_env_credentials();
//! config.validate()?;
//! let store = Store::connect(&config).await?;
//! store.ping().await?;
//! let used = store.quota_used(&["portcullis:{ns/acme}:gold:q:m673".to_string()]).await?;
//! # Ok(()) }
//! ```

mod client;
mod config;
mod conn;
pub mod scripts;

pub use client::{Granted, Store, StoreError, Take};
pub use config::{ConfigError, DEFAULT_TIMEOUT, PASSWORD_ENV, StoreConfig, USERNAME_ENV};
