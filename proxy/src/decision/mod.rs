//! Pure decision logic: no I/O, no clocks except those passed in.
//!
//! - [`decide`]: the decision for one request ([`RequestFacts`] → [`Decision`]);
//! - [`reason`]: why a request was refused (status, code, body);
//! - [`compiled`]: the table as the request path reads it (key digests, clients, plans with their limiter state);
//! - [`path`]: the request path, normalised once for the decision and the application;
//! - [`client_addr`]: which address a request comes from (`--trusted-proxies`);
//! - [`route`], [`cidr`], [`certs`], [`throttle`], [`quota`]: the individual checks.

pub mod certs;
pub mod cidr;
pub mod client_addr;
pub mod compiled;
pub mod decide;
pub mod path;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod path_reference;
pub mod quota;
pub mod reason;
pub mod route;
pub mod throttle;

pub use certs::PeerCert;
pub use cidr::CidrSet;
pub use compiled::{CompiledClient, CompiledPlan, CompiledTable, PlanSpec};
pub use decide::{Decision, Denial, RequestFacts, decide, decide_identified, quota_exceeded, rate_limited};
pub use reason::Reason;
