//! Portcullis controller: CRD types, pure table/condition/key logic, and the reconcilers.

pub mod conditions;
pub mod crd;
pub mod enforcement;
pub mod events;
pub mod exposure;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod keygen;
pub mod keys;
pub mod memo;
pub mod model;
pub mod network_policy;
pub mod runtime;
pub mod sidecar_contract;
pub mod store;

pub use runtime::{Config, Error, run};
pub mod webhook;
