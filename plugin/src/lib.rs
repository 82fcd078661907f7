//! `kubectl portcullis`: a kubectl plugin for Portcullis.
//!
//! - `keys create|rotate|show|revoke` edit an ApiClient's `spec.keys` (with its resourceVersion) and wait until
//!   every sidecar enforces the change (`Enforced=True` for the new generation);
//! - `check` answers "would this request pass right now, and which rule decides?" with the sidecar's own decision
//!   code against the live table ([`check`]);
//! - `status` and `usage` show per Service what the controller wrote and what it sees the sidecars serve, and quota
//!   use per client.
//!
//! [`check`], [`keys`] and [`report`] are pure; [`objects`] talks to the API server; [`commands`] ties them.

pub mod check;
pub mod cli;
pub mod commands;
pub mod keys;
pub mod objects;
pub mod report;
