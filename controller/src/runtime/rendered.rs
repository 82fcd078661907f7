//! What this controller has rendered: per protected Service, the table it last wrote (or confirmed) and what went
//! into it. The triggers read it to find the Services an event may have left stale; the ApiClient reconciler reads
//! it to say whether a client is programmed.

use std::collections::{BTreeMap, HashMap};

/// A protected Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

/// What the current table of a Service holds (as last written or confirmed by this controller).
#[derive(Clone, Debug, Default)]
pub struct ServiceState {
    pub revision: String,
    /// The table in force (what the live index was rendered from): the next render skips its unchanged shards.
    pub table: Option<std::sync::Arc<portcullis_table::Table>>,
    /// What the build of `table` keeps for the next build of this Service ([`crate::memo`]).
    pub memo: Option<std::sync::Arc<crate::memo::TableMemo>>,
    pub shards: usize,
    /// ApiClient name → generation in the table.
    pub clients: HashMap<String, i64>,
    /// Granting UsagePlan name → (uid, generation). Empty for a deny-all table.
    pub plans: BTreeMap<String, (String, i64)>,
    /// ApiClient name → fingerprints of its keys left out as duplicates.
    pub duplicates: HashMap<String, Vec<String>>,
    /// ApiClient name → why it was left out of the table (it could not be rendered).
    pub excluded: BTreeMap<String, String>,
}

/// Rendered state of every Service this controller has a table for.
pub type Rendered = HashMap<ServiceKey, ServiceState>;
