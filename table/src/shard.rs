//! Splitting a [`Table`] into an index and shards for ConfigMaps, and putting it back together.
//!
//! The index carries the revision, the plans and, per shard, its name, client count and the SHA-256 of its exact
//! data string. A reader fetches the shards the index names and accepts them only if every digest matches, so a
//! revision is applied complete or not at all (a shard overwritten mid-read is simply seen as "not yet").

use crate::model::{check_schema, parse_json};
use crate::naming::{MAX_SHARDS, Slot, shard_name};
use crate::{Client, DenyAll, Plan, SCHEMA_VERSION, Table, TableError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Budget for one shard's data string. ConfigMaps are limited to 1 MiB in total; this leaves room for metadata.
pub const MAX_SHARD_BYTES: usize = 900 * 1024 - 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexDoc {
    pub schema_version: u32,
    pub service: String,
    pub revision: String,
    /// Orders the revisions of one index object (see [`crate::sequence`]). Absent in indexes written before it
    /// existed: read as 0.
    #[serde(default)]
    pub sequence: u64,
    pub slot: Slot,
    pub clients: usize,
    pub plans: BTreeMap<String, Plan>,
    /// Empty for a deny-all table, which has no shards.
    pub shards: Vec<ShardRef>,
    /// Set on the index of a deny-all table ([`Table::deny_all`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_all: Option<DenyAll>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardRef {
    pub name: String,
    pub clients: usize,
    /// Hex SHA-256 of the shard's data string.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardDoc {
    pub schema_version: u32,
    pub service: String,
    pub revision: String,
    pub shard: usize,
    pub clients: Vec<Client>,
}

/// A rendered table: shard documents to write first, then the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub index: IndexDoc,
    pub index_json: String,
    /// `(ConfigMap name, data string)` in shard order.
    pub shards: Vec<(String, String)>,
}

/// Splits `table` into shards of at most `max_bytes` each, named for `slot` of `index_name`; the index carries
/// `sequence` (compute it with [`crate::sequence::next_sequence`]). A deny-all table renders to an index without
/// shards.
pub fn render(
    table: &Table,
    index_name: &str,
    slot: Slot,
    sequence: u64,
    max_bytes: usize,
) -> Result<Rendered, TableError> {
    if let Some(deny_all) = &table.deny_all {
        table.validate(&format!("table {}", table.service))?;
        let index = IndexDoc {
            schema_version: SCHEMA_VERSION,
            service: table.service.clone(),
            revision: table.revision.clone(),
            sequence,
            slot,
            clients: 0,
            plans: BTreeMap::new(),
            shards: Vec::new(),
            deny_all: Some(deny_all.clone()),
        };
        let index_json = serde_json::to_string(&index).expect("serialisable");
        return Ok(Rendered { index, index_json, shards: Vec::new() });
    }
    // Serialise each client once; pack greedily in id order (deterministic).
    let overhead = serde_json::to_string(&ShardDoc {
        schema_version: SCHEMA_VERSION,
        service: table.service.clone(),
        revision: table.revision.clone(),
        shard: MAX_SHARDS,
        clients: vec![],
    })
    .expect("serialisable")
    .len();
    // Every shard carries this much; a table with no clients still renders one shard of exactly this size.
    if overhead > max_bytes {
        return Err(TableError::ShardOverhead { service: table.service.clone(), bytes: overhead, max: max_bytes });
    }
    let budget = max_bytes - overhead;
    let mut groups: Vec<(usize, usize)> = Vec::new(); // (start, end) client ranges
    let (mut start, mut size) = (0usize, 0usize);
    for (i, c) in table.clients.iter().enumerate() {
        let len = serde_json::to_string(c).expect("serialisable").len() + 1; // + comma
        if len > budget {
            return Err(TableError::ClientTooLarge { client: c.id.clone(), bytes: len, max: budget });
        }
        if size + len > budget && i > start {
            groups.push((start, i));
            start = i;
            size = 0;
        }
        size += len;
    }
    if start < table.clients.len() || groups.is_empty() {
        groups.push((start, table.clients.len()));
    }
    if groups.len() > MAX_SHARDS {
        return Err(TableError::TooManyShards {
            service: table.service.clone(),
            needed: groups.len(),
            max: MAX_SHARDS,
        });
    }

    let mut shards = Vec::with_capacity(groups.len());
    let mut refs = Vec::with_capacity(groups.len());
    for (n, (s, e)) in groups.into_iter().enumerate() {
        let doc = ShardDocRef {
            schema_version: SCHEMA_VERSION,
            service: &table.service,
            revision: &table.revision,
            shard: n,
            clients: &table.clients[s..e],
        };
        let json = serde_json::to_string(&doc).expect("serialisable");
        let name = shard_name(index_name, slot, n);
        refs.push(ShardRef {
            name: name.clone(),
            clients: e - s,
            sha256: hex::encode(Sha256::digest(json.as_bytes())),
        });
        shards.push((name, json));
    }
    let index = IndexDoc {
        schema_version: SCHEMA_VERSION,
        service: table.service.clone(),
        revision: table.revision.clone(),
        sequence,
        slot,
        clients: table.clients.len(),
        plans: table.plans.clone(),
        shards: refs,
        deny_all: None,
    };
    let index_json = serde_json::to_string(&index).expect("serialisable");
    Ok(Rendered { index, index_json, shards })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShardDocRef<'a> {
    schema_version: u32,
    service: &'a str,
    revision: &'a str,
    shard: usize,
    clients: &'a [Client],
}

impl IndexDoc {
    pub fn parse(json: &str, what: &str) -> Result<Self, TableError> {
        let doc: IndexDoc = parse_json(json, what)?;
        check_schema(doc.schema_version, what)?;
        if let Some(d) = &doc.deny_all {
            d.validate(what)?;
            if !doc.shards.is_empty() || !doc.plans.is_empty() || doc.clients != 0 {
                return Err(TableError::invalid(what, "a denyAll index has no shards, plans or clients"));
            }
        } else if doc.shards.is_empty() || doc.shards.len() > MAX_SHARDS {
            return Err(TableError::invalid(
                what,
                format!("index names {} shards (1..={MAX_SHARDS})", doc.shards.len()),
            ));
        }
        Ok(doc)
    }

    /// Whether this is the index of a deny-all table (nothing to fetch: [`assemble`] it with no shards).
    pub fn is_deny_all(&self) -> bool {
        self.deny_all.is_some()
    }
}

/// Rebuilds the table from an index and the shards' data strings (in the index's order; `None` = not found).
/// Fails unless every shard is present, matches its digest, and the assembled table validates.
pub fn assemble(index: &IndexDoc, shards: &[Option<&str>]) -> Result<Table, TableError> {
    if shards.len() != index.shards.len() {
        return Err(TableError::invalid(
            format!("index of {}", index.service),
            format!("{} shards given, index names {}", shards.len(), index.shards.len()),
        ));
    }
    let shard_err = |i: usize, detail: String| TableError::Shard { revision: index.revision.clone(), index: i, detail };
    let mut clients = Vec::with_capacity(index.clients);
    for (i, (r, data)) in index.shards.iter().zip(shards).enumerate() {
        let data = data.ok_or_else(|| shard_err(i, format!("ConfigMap {} is missing", r.name)))?;
        let digest = hex::encode(Sha256::digest(data.as_bytes()));
        if digest != r.sha256 {
            return Err(shard_err(
                i,
                format!("ConfigMap {} does not match the index digest (not yet written, or corrupt)", r.name),
            ));
        }
        let doc: ShardDoc = parse_json(data, &format!("shard {}", r.name))?;
        check_schema(doc.schema_version, &r.name)?;
        if doc.revision != index.revision
            || doc.shard != i
            || doc.service != index.service
            || doc.clients.len() != r.clients
        {
            return Err(shard_err(i, format!("ConfigMap {} belongs to another revision or position", r.name)));
        }
        clients.extend(doc.clients);
    }
    let table = Table {
        schema_version: index.schema_version,
        service: index.service.clone(),
        revision: index.revision.clone(),
        plans: index.plans.clone(),
        clients,
        deny_all: index.deny_all.clone(),
    };
    table.validate(&format!("table {} revision {}", index.service, index.revision))?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;
    use crate::naming::index_name;
    use proptest::prelude::*;

    fn round_trip(t: &Table, max: usize) -> (Rendered, Table) {
        let r = render(t, &index_name("orders"), Slot::A, 7, max).unwrap();
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        let shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
        let back = assemble(&idx, &shards).unwrap();
        (r, back)
    }

    #[test]
    fn splits_into_shards_under_budget_and_reassembles() {
        let t = sample(20_000);
        let (r, back) = round_trip(&t, MAX_SHARD_BYTES);
        assert!(r.shards.len() > 1, "20 000 clients should need several shards");
        assert!(r.shards.iter().all(|(_, s)| s.len() <= MAX_SHARD_BYTES));
        assert_eq!(r.index.clients, 20_000);
        assert_eq!(back, t);
    }

    #[test]
    fn empty_table_has_one_empty_shard() {
        let t = Table::new("a/b", BTreeMap::new(), vec![]);
        let (r, back) = round_trip(&t, MAX_SHARD_BYTES);
        assert_eq!(r.shards.len(), 1);
        assert_eq!(back, t);
    }

    #[test]
    fn missing_stale_or_corrupt_shards_are_refused() {
        let t = sample(3000);
        let r = render(&t, "idx", Slot::B, 1, 64 * 1024).unwrap();
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        let mut shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
        shards[1] = None;
        assert!(assemble(&idx, &shards).unwrap_err().to_string().contains("missing"));

        let corrupt = r.shards[1].1.replacen("team-a", "team-b", 1);
        shards[1] = Some(&corrupt);
        assert!(assemble(&idx, &shards).unwrap_err().to_string().contains("does not match the index digest"));

        let other = render(&sample(2999), "idx", Slot::B, 1, 64 * 1024).unwrap();
        shards[1] = Some(&other.shards[1].1);
        assert!(assemble(&idx, &shards).is_err());
    }

    #[test]
    fn index_carries_the_sequence_and_old_indexes_read_as_zero() {
        let (r, _) = round_trip(&sample(3), MAX_SHARD_BYTES);
        assert_eq!(r.index.sequence, 7);
        assert!(r.index_json.contains(r#""sequence":7"#), "{}", r.index_json);
        let legacy = r.index_json.replace(r#""sequence":7,"#, "");
        assert!(!legacy.contains("sequence"));
        assert_eq!(IndexDoc::parse(&legacy, "index").unwrap().sequence, 0);
    }

    #[test]
    fn deny_all_table_renders_to_an_index_without_shards() {
        let t = Table::deny_all("shop/orders", "no UsagePlan grants shop/orders");
        let r = render(&t, &index_name("orders"), Slot::B, 9, MAX_SHARD_BYTES).unwrap();
        assert!(r.shards.is_empty());
        assert!(r.index_json.contains(r#""denyAll":{"reason":"no UsagePlan grants shop/orders"}"#));
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        assert!(idx.is_deny_all());
        assert_eq!((idx.sequence, idx.clients, idx.shards.len()), (9, 0, 0));
        assert_eq!(assemble(&idx, &[]).unwrap(), t);

        // An ordinary index must name shards; a deny-all one must not.
        let ordinary = render(&sample(2), "i", Slot::A, 1, MAX_SHARD_BYTES).unwrap().index;
        let no_shards = IndexDoc { shards: vec![], ..ordinary.clone() };
        let json = serde_json::to_string(&no_shards).unwrap();
        assert!(IndexDoc::parse(&json, "i").unwrap_err().to_string().contains("shards"));
        let with_shard = IndexDoc { deny_all: Some(DenyAll { reason: "x".into() }), ..ordinary };
        let with_shard = serde_json::to_string(&with_shard).unwrap();
        assert!(IndexDoc::parse(&with_shard, "i").unwrap_err().to_string().contains("no shards"));
    }

    #[test]
    fn too_many_shards_is_an_error_not_a_truncation() {
        let t = sample(5000);
        assert!(matches!(render(&t, "i", Slot::A, 1, 4096), Err(TableError::TooManyShards { .. })));
    }

    proptest! {
        #[test]
        fn any_table_round_trips_through_shards(n in 0usize..400, max in 2_000usize..40_000) {
            let t = sample(n);
            let r = render(&t, "i", Slot::A, 1, max);
            if let Ok(r) = r {
                let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
                let shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
                prop_assert_eq!(assemble(&idx, &shards).unwrap(), t.clone());
                prop_assert!(r.shards.iter().all(|(_, s)| s.len() <= max));
                // Determinism: rendering again gives byte-identical output.
                prop_assert_eq!(render(&t, "i", Slot::A, 1, max).unwrap(), r);
            }
        }
    }
}
