//! Names and labels of the table ConfigMaps. Names are fixed per Service so a sidecar's RBAC can list them with
//! `resourceNames`: the index, and two slots (`a`, `b`) of at most [`MAX_SHARDS`] shards each. A new revision is
//! written into the slot the current index does not point at, then the index is switched to it.

/// Upper bound of shards per slot. 64 × [`crate::shard::MAX_SHARD_BYTES`] ≈ 50 MiB, far above 100 000 clients.
pub const MAX_SHARDS: usize = 64;

/// ConfigMap data key of the index document.
pub const INDEX_DATA_KEY: &str = "index.json";
/// ConfigMap data key of a shard document.
pub const SHARD_DATA_KEY: &str = "shard.json";

/// Label on every table ConfigMap: the protected Service's name.
pub const LABEL_SERVICE: &str = "portcullis.dev/service";
/// Label on every table ConfigMap: `index` or `shard`.
pub const LABEL_ROLE: &str = "portcullis.dev/table-role";

/// Name of the index ConfigMap for a Service. Service names are DNS labels (≤ 63), so this stays ≤ 80.
pub fn index_name(service_name: &str) -> String {
    format!("portcullis-table-{service_name}")
}

/// Name of shard `i` of `slot` for the index `index_name`.
pub fn shard_name(index_name: &str, slot: Slot, i: usize) -> String {
    format!("{index_name}-{}-{i}", slot.as_str())
}

/// Every name a sidecar of this Service may need to read: for RBAC `resourceNames`.
pub fn all_names(service_name: &str) -> Vec<String> {
    let index = index_name(service_name);
    let mut v = Vec::with_capacity(1 + 2 * MAX_SHARDS);
    for slot in [Slot::A, Slot::B] {
        v.extend((0..MAX_SHARDS).map(|i| shard_name(&index, slot, i)));
    }
    v.insert(0, index);
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_fit_kubernetes_limits() {
        let svc = "a".repeat(63);
        let names = all_names(&svc);
        assert_eq!(names.len(), 1 + 2 * MAX_SHARDS);
        assert!(names.iter().all(|n| n.len() <= 253));
        assert_eq!(shard_name("portcullis-table-x", Slot::B, 3), "portcullis-table-x-b-3");
    }
}
