//! Portcullis controller: CRD types, pure table/condition/key logic, and the reconcilers.

pub mod crd;
