//! Pure decision logic: no I/O, no clocks except those passed in.

pub mod certs;
pub mod cidr;
pub mod client_addr;
pub mod keys;
pub mod pipeline;
pub mod quota;
pub mod route;
pub mod throttle;

pub use certs::PeerCert;
pub use cidr::CidrSet;
pub use keys::{CompiledClient, CompiledPlan, CompiledTable};
pub use pipeline::{Decision, Denial, Reason, RequestFacts, decide};
