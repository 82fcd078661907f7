//! The proxy's integration tests: one test binary (one link step), a module per area. Only `api_mode` and
//! `revocation` need a Kubernetes control plane; they share one (`common::cluster`, `ControlPlane::shared`).
//!
//! A new area: add `foo.rs` here (with `use crate::common::*;` for the helpers) and a `mod foo;` line below;
//! run it alone with `cargo test -p portcullis-proxy --test integration foo::`.

mod common;

mod abuse;
mod access_log;
mod admin_endpoints;
mod api_mode;
mod client_certs;
mod connection_bounds;
mod faults;
mod global_limits;
mod hardening;
mod hot_swap;
mod limits;
mod requests;
mod revocation;
mod shutdown;
mod spoofing;
mod tls;
mod upstream_conns;
