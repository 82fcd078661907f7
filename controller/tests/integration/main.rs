//! The controller's integration tests: one test binary (one link step), a module per area, against a real local
//! control plane (`portcullis_testkit`). Modules that use `common::env` share the binary's control plane
//! (`ControlPlane::shared`), each test in a namespace of its own; `chart`, `webhook` and `no_crds` install
//! cluster-wide objects that would collide (or need the CRDs absent) and start their own (`ControlPlane::once`), as
//! do `lifecycle_tables`' relist test and `faults`' outage test, which restart or stop their API server. `scale`
//! runs alone (`common::env_exclusive`): its thousands of ApiClients would slow the timed revocations of the others.
//! One log capture serves the binary (`common::logs`); a test counting log lines counts its own controller's
//! (`common::controller_log_lines`), and `secret_hygiene` widens the capture to every crate at debug while it runs
//! (`common::capture_all_levels`).
//!
//! A new area: add `foo.rs` here (with `use crate::common::*;`) and a `mod foo;` line below; run it alone with
//! `cargo test -p portcullis-controller --test integration foo::`.

mod common;

mod chart;
mod cluster;
mod enforced;
mod exposure;
mod faults;
mod global_limits;
mod lifecycle_keys;
mod lifecycle_tables;
mod no_crds;
mod plugin;
mod readiness;
mod scale;
mod secret_hygiene;
mod webhook;
