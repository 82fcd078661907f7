//! The Portcullis table format: what the controller renders for one protected Service and the proxy enforces.
//!
//! A [`Table`] is the logical table (plans + clients). For the Kubernetes API it is split into an index document
//! and shard documents ([`shard`]), so no ConfigMap nears the 1 MiB object limit and a proxy only ever applies a
//! complete revision. The same [`Table`] JSON is also the `--tables FILE` format of the proxy.
//!
//! [`sidecar`] holds the rest of the controller-sidecar contract: the admin `/revision` report and the rewritten
//! application probes.
//!
//! This crate does no I/O and has no Kubernetes dependency. The format is documented in `docs/tables.md`.

pub mod digest;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod model;
pub mod naming;
pub mod period;
pub mod sequence;
pub mod shard;
pub mod sidecar;
pub mod store_keys;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use digest::{KeyDigest, fingerprint, key_digest};
pub use error::{Chain, TableError};
pub use model::{
    CertIdentity, Client, DenyAll, KeyEntry, MAX_DENY_REASON, Period, Plan, Quota, QuotaScope, RouteScope,
    StoreFallback, Table, Throttle,
};
#[cfg(any(test, feature = "test-util"))]
pub use test_util::ClientBuilder;

/// The schema version this crate renders and accepts.
pub const SCHEMA_VERSION: u32 = 1;
