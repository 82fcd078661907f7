//! Splitting a [`Table`] into an index and shards for ConfigMaps, and putting it back together.
//!
//! The index carries the revision, the plans and, per shard, its name, client count and the SHA-256 of its exact
//! data string. A reader fetches the shards the index names and accepts them only if every digest matches, so a
//! revision is applied complete or not at all (a shard overwritten mid-read is simply seen as "not yet").
//!
//! **Stable layout** (index `schemaVersion` [`STABLE_LAYOUT`], what [`render`] writes): a client's shard is
//! [`shard_of`] its id among the index's shard count, and a shard document carries no revision, so its text
//! depends on its clients only. A change to one client changes one shard: [`render`] reuses every other shard of
//! the previous index as it is (same ConfigMap, same digest), and a reader re-reads only the shards whose digest
//! changed ([`check_shard`]). Each changed shard is written into the slot its previous version is not in, so the
//! previous index stays whole for readers mid-read. Indexes of schema 1 (one revision, all shards in one slot,
//! clients packed in id order) are still read ([`assemble`]).

use crate::model::{check_schema, parse_json, validate_clients};
use crate::naming::{MAX_SHARDS, Slot, shard_name};
use crate::{Client, DenyAll, Plan, SCHEMA_VERSION, Table, TableError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Index `schemaVersion` of the stable layout (see the module docs). Shards of such an index carry the same.
pub const STABLE_LAYOUT: u32 = 2;

/// The shard (of `shards`) a client id belongs to in the stable layout: FNV-1a (64 bit) of the id, modulo
/// `shards`. Fixed by the format: a controller and its proxies must agree on it across versions.
pub fn shard_of(id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

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
    /// Length of the shard's data string (stable layout; 0 in schema 1 indexes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardDoc {
    pub schema_version: u32,
    pub service: String,
    /// The table revision the shard was written for (schema 1); empty and absent in the stable layout.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    pub shard: usize,
    pub clients: Vec<Client>,
}

/// A rendered table: shard documents to write first, then the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub index: IndexDoc,
    pub index_json: String,
    /// `(ConfigMap name, data string)` of the shards to write, in shard order: those whose content changed since
    /// the previous index (all of them without one). The others the index names are the previous index's.
    pub shards: Vec<(String, String)>,
}

/// What [`render`] builds on: the live index (its layout and shards are kept where they still fit) and, as a
/// shortcut, the table it was rendered from (shards whose clients are unchanged are then not even serialised).
#[derive(Debug, Clone, Copy, Default)]
pub struct Previous<'a> {
    pub index: Option<&'a IndexDoc>,
    /// Only used if its revision is the index's.
    pub table: Option<&'a Table>,
    /// Write every shard even where its content is unchanged (e.g. their ConfigMaps' owners change); the layout
    /// and slots still follow `index`.
    pub rewrite_all: bool,
    /// The ids of the clients in which the new table differs from `table` (added, removed or changed), if the
    /// caller knows them: then only their shards are compared and serialised, instead of comparing every client.
    /// Must be exact (a change left out is a shard not written); only used together with `table`.
    pub changed: Option<&'a [String]>,
}

impl<'a> Previous<'a> {
    pub const NONE: Previous<'static> = Previous { index: None, table: None, rewrite_all: false, changed: None };

    /// Successor of `index`, rendered from `table` if known.
    pub fn of(index: Option<&'a IndexDoc>, table: Option<&'a Table>) -> Self {
        Self { index, table, rewrite_all: false, changed: None }
    }
}

/// Renders `table` in the stable layout as a successor of `previous`, in shards of at most `max_bytes` each, named
/// for `index_name`; the index carries `sequence` (compute it with [`crate::sequence::next_sequence`]). A deny-all
/// table renders to an index without shards.
///
/// The shard count of a previous stable index is kept while every shard fits and they are not mostly empty (more
/// than one shard and under an eighth full on average); otherwise the smallest power of two is chosen at which
/// every shard fits with the shards half full on average.
pub fn render(
    table: &Table,
    index_name: &str,
    previous: Previous<'_>,
    sequence: u64,
    max_bytes: usize,
) -> Result<Rendered, TableError> {
    let slot = previous.index.map(|d| d.slot.other()).unwrap_or(Slot::A);
    if let Some(deny_all) = &table.deny_all {
        table.validate(&format!("table {}", table.service))?;
        let index = IndexDoc {
            schema_version: STABLE_LAYOUT,
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
    // Every shard carries this much; a table with no clients still renders one shard of exactly this size.
    let overhead = serde_json::to_string(&ShardDocRef {
        schema_version: STABLE_LAYOUT,
        service: &table.service,
        shard: MAX_SHARDS,
        clients: &[],
    })
    .expect("serialisable")
    .len();
    if overhead > max_bytes {
        return Err(TableError::ShardOverhead { service: table.service.clone(), bytes: overhead, max: max_bytes });
    }
    let stable = previous.index.filter(|d| d.schema_version == STABLE_LAYOUT && !d.shards.is_empty());
    if let Some(prev) = stable {
        let n = prev.shards.len();
        if let Some(r) = render_layout(table, index_name, previous, n, slot, sequence, max_bytes) {
            let bytes: usize = r.index.shards.iter().map(|s| s.bytes).sum();
            if n == 1 || bytes >= n * max_bytes / 8 {
                return Ok(r);
            }
        }
    }
    // A new layout: the smallest power of two at which every shard fits, starting from half-full shards.
    let budget = max_bytes - overhead;
    let mut lens = Vec::with_capacity(table.clients.len());
    for c in &table.clients {
        let len = serialised_len(c) + 1; // + comma
        if len > budget {
            return Err(TableError::ClientTooLarge { client: c.id.clone(), bytes: len, max: budget });
        }
        lens.push(len);
    }
    let total: usize = lens.iter().sum();
    let mut n = total.div_ceil(budget / 2).max(1).next_power_of_two();
    loop {
        let mut sizes = vec![0usize; n];
        for (c, len) in table.clients.iter().zip(&lens) {
            sizes[shard_of(&c.id, n)] += len;
        }
        if sizes.iter().all(|s| *s <= budget) {
            break;
        }
        n *= 2;
        if n > MAX_SHARDS {
            return Err(TableError::TooManyShards { service: table.service.clone(), needed: n, max: MAX_SHARDS });
        }
    }
    if n > MAX_SHARDS {
        return Err(TableError::TooManyShards { service: table.service.clone(), needed: n, max: MAX_SHARDS });
    }
    Ok(render_layout(table, index_name, previous, n, slot, sequence, max_bytes).expect("every shard fits at n"))
}

/// Bytes of a client's JSON, without building the string.
pub fn serialised_len(c: &Client) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, c).expect("serialisable");
    n.0
}

/// Renders `table` in `n` stable shards; `None` if one of the shards it had to serialise is over `max_bytes`.
fn render_layout(
    table: &Table,
    index_name: &str,
    previous: Previous<'_>,
    n: usize,
    slot: Slot,
    sequence: u64,
    max_bytes: usize,
) -> Option<Rendered> {
    let groups = group(&table.clients, n);
    let prev_index = previous.index.filter(|d| d.schema_version == STABLE_LAYOUT);
    // Which shards hold the same clients as the previous table's, if it is the one the previous index was rendered
    // from, at the same count: from the changed ids when given, else by comparing the groups.
    let unchanged: Option<Vec<bool>> = match (prev_index, previous.table) {
        (Some(d), Some(t)) if d.shards.len() == n && d.revision == t.revision && d.service == table.service => {
            Some(match previous.changed {
                Some(ids) => {
                    let mut same = vec![true; n];
                    for id in ids {
                        same[shard_of(id, n)] = false;
                    }
                    same
                }
                None => group(&t.clients, n).iter().zip(&groups).map(|(a, b)| a == b).collect(),
            })
        }
        _ => None,
    };
    let mut refs = Vec::with_capacity(n);
    let mut written = Vec::new();
    for (i, clients) in groups.iter().enumerate() {
        let prev_ref = prev_index.and_then(|d| d.shards.get(i));
        if let (Some(r), Some(same), false) = (prev_ref, &unchanged, previous.rewrite_all)
            && same[i]
            && r.clients == clients.len()
        {
            refs.push(r.clone());
            continue;
        }
        let doc = ShardDocRef { schema_version: STABLE_LAYOUT, service: &table.service, shard: i, clients };
        let json = serde_json::to_string(&doc).expect("serialisable");
        if json.len() > max_bytes {
            return None;
        }
        let sha256 = hex::encode(Sha256::digest(json.as_bytes()));
        if let Some(r) = prev_ref.filter(|r| r.sha256 == sha256 && !previous.rewrite_all) {
            refs.push(r.clone());
            continue;
        }
        // Into the slot the previous version of this shard is not in (any slot if the previous index has none).
        let shard_slot = match prev_index.and_then(|d| d.shards.get(i)) {
            Some(r) if r.name == shard_name(index_name, Slot::A, i) => Slot::B,
            Some(_) => Slot::A,
            None => Slot::A,
        };
        let name = shard_name(index_name, shard_slot, i);
        refs.push(ShardRef { name: name.clone(), clients: clients.len(), sha256, bytes: json.len() });
        written.push((name, json));
    }
    let index = IndexDoc {
        schema_version: STABLE_LAYOUT,
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
    Some(Rendered { index, index_json, shards: written })
}

/// `clients` (in id order) grouped by [`shard_of`] among `n`, each group still in id order.
fn group(clients: &[Arc<Client>], n: usize) -> Vec<Vec<&Client>> {
    let mut groups: Vec<Vec<&Client>> = (0..n).map(|_| Vec::with_capacity(clients.len() / n + 1)).collect();
    for c in clients {
        groups[shard_of(&c.id, n)].push(c);
    }
    groups
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShardDocRef<'a> {
    schema_version: u32,
    service: &'a str,
    shard: usize,
    clients: &'a [&'a Client],
}

impl IndexDoc {
    pub fn parse(json: &str, what: &str) -> Result<Self, TableError> {
        let doc: IndexDoc = parse_json(json, what)?;
        if doc.schema_version != STABLE_LAYOUT {
            check_schema(doc.schema_version, what)?;
        }
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

    /// Whether this index is in the stable layout (its shards can be read one by one: [`check_shard`]).
    pub fn is_stable(&self) -> bool {
        self.schema_version == STABLE_LAYOUT
    }
}

/// Reads shard `i` of a stable-layout `index` from its data string (`None`: not found): it must match the index's
/// digest, position, service and client count, every client must belong to this shard ([`shard_of`]), and the
/// clients must be valid on their own ([`validate_clients`] against the index's plans). What it cannot check is
/// across shards: a key digest or certificate identity listed in two shards (the reader checks that as it joins
/// them; [`assemble`] does too).
pub fn check_shard(index: &IndexDoc, i: usize, data: Option<&str>) -> Result<Vec<Client>, TableError> {
    let shard_err = |detail: String| TableError::Shard { revision: index.revision.clone(), index: i, detail };
    let (r, doc) = read_doc(index, i, data)?;
    if doc.schema_version != index.schema_version || !index.is_stable() {
        return Err(TableError::invalid(
            &r.name,
            format!("shard schemaVersion {} in an index of schemaVersion {}", doc.schema_version, index.schema_version),
        ));
    }
    if doc.shard != i || doc.service != index.service || doc.clients.len() != r.clients || !doc.revision.is_empty() {
        return Err(shard_err(format!("ConfigMap {} belongs to another table or position", r.name)));
    }
    let n = index.shards.len();
    if let Some(c) = doc.clients.iter().find(|c| shard_of(&c.id, n) != i) {
        return Err(shard_err(format!("client {} does not belong in shard {i} of {n}", c.id)));
    }
    validate_clients(&index.plans, &doc.clients, &format!("shard {}", r.name))?;
    Ok(doc.clients)
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
    let mut clients = Vec::with_capacity(index.clients);
    for (i, data) in shards.iter().enumerate() {
        if index.is_stable() {
            clients.extend(check_shard(index, i, *data)?.into_iter().map(Arc::new));
            continue;
        }
        let (r, doc) = read_doc(index, i, *data)?;
        check_schema(doc.schema_version, &r.name)?;
        if doc.revision != index.revision
            || doc.shard != i
            || doc.service != index.service
            || doc.clients.len() != r.clients
        {
            let detail = format!("ConfigMap {} belongs to another revision or position", r.name);
            return Err(TableError::Shard { revision: index.revision.clone(), index: i, detail });
        }
        clients.extend(doc.clients.into_iter().map(Arc::new));
    }
    if index.is_stable() {
        // Shards hold clients by hash; the table holds them in id order.
        clients.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let table = Table {
        schema_version: SCHEMA_VERSION,
        service: index.service.clone(),
        revision: index.revision.clone(),
        plans: index.plans.clone(),
        clients,
        deny_all: index.deny_all.clone(),
    };
    table.validate(&format!("table {} revision {}", index.service, index.revision))?;
    Ok(table)
}

/// Shard `i` of `index` from its data string: present, matching the index digest, parsed (nothing more checked).
fn read_doc<'i>(index: &'i IndexDoc, i: usize, data: Option<&str>) -> Result<(&'i ShardRef, ShardDoc), TableError> {
    let shard_err = |detail: String| TableError::Shard { revision: index.revision.clone(), index: i, detail };
    let r = index.shards.get(i).ok_or_else(|| shard_err(format!("the index names {} shards", index.shards.len())))?;
    let data = data.ok_or_else(|| shard_err(format!("ConfigMap {} is missing", r.name)))?;
    if hex::encode(Sha256::digest(data.as_bytes())) != r.sha256 {
        return Err(shard_err(format!(
            "ConfigMap {} does not match the index digest (not yet written, or corrupt)",
            r.name
        )));
    }
    Ok((r, parse_json(data, &format!("shard {}", r.name))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::sample;
    use crate::naming::index_name;
    use proptest::prelude::*;

    fn round_trip(t: &Table, max: usize) -> (Rendered, Table) {
        let r = render(t, &index_name("orders"), Previous::NONE, 7, max).unwrap();
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        let shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
        let back = assemble(&idx, &shards).unwrap();
        (r, back)
    }

    /// Every shard the index names, from `written` (newest first) by name.
    fn fetch<'a>(index: &IndexDoc, written: &[&'a Rendered]) -> Vec<Option<&'a str>> {
        index
            .shards
            .iter()
            .map(|r| {
                written
                    .iter()
                    .find_map(|w| w.shards.iter().find(|(n, s)| *n == r.name && sha(s) == r.sha256))
                    .map(|(_, s)| s.as_str())
            })
            .collect()
    }

    fn sha(s: &str) -> String {
        hex::encode(Sha256::digest(s.as_bytes()))
    }

    #[test]
    fn splits_into_shards_under_budget_and_reassembles() {
        let t = sample(20_000);
        let (r, back) = round_trip(&t, MAX_SHARD_BYTES);
        assert!(r.shards.len() > 1, "20 000 clients should need several shards");
        assert!(r.shards.iter().all(|(_, s)| s.len() <= MAX_SHARD_BYTES));
        assert!(r.index.shards.len().is_power_of_two());
        assert_eq!(r.index.clients, 20_000);
        assert_eq!(r.index.schema_version, STABLE_LAYOUT);
        assert_eq!(back, t);
    }

    #[test]
    fn empty_table_has_one_empty_shard() {
        let t = Table::new("a/b", BTreeMap::new(), Vec::<Client>::new());
        let (r, back) = round_trip(&t, MAX_SHARD_BYTES);
        assert_eq!(r.shards.len(), 1);
        assert_eq!(back, t);
    }

    #[test]
    fn a_change_to_one_client_rewrites_one_shard_into_its_other_slot() {
        let t1 = sample(6_000);
        let r1 = render(&t1, "idx", Previous::NONE, 1, 64 * 1024).unwrap();
        let n = r1.index.shards.len();
        assert!(n >= 8, "{n} shards");
        assert_eq!(r1.shards.len(), n, "a first render writes every shard");
        assert!(r1.shards.iter().all(|(name, _)| name.starts_with("idx-a-")));

        // One client's CIDRs change.
        let mut t2 = t1.clone();
        Arc::make_mut(&mut t2.clients[1234]).source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
        t2.revision = t2.compute_revision();
        let changed = shard_of(&t2.clients[1234].id, n);
        let ids = [t2.clients[1234].id.clone()];
        let cases = [
            Previous::of(Some(&r1.index), Some(&t1)),
            Previous::of(Some(&r1.index), None),
            Previous { changed: Some(&ids), ..Previous::of(Some(&r1.index), Some(&t1)) },
        ];
        for prev in cases {
            let prev_table = prev.table;
            let r2 = render(&t2, "idx", prev, 2, 64 * 1024).unwrap();
            assert_eq!(r2.index.shards.len(), n, "layout kept");
            assert_eq!(r2.shards.len(), 1, "one shard written ({:?} given the previous table)", prev_table.is_some());
            assert_eq!(r2.shards[0].0, shard_name("idx", Slot::B, changed));
            for (i, (a, b)) in r1.index.shards.iter().zip(&r2.index.shards).enumerate() {
                assert_eq!(a == b, i != changed, "shard {i}");
            }
            let idx = IndexDoc::parse(&r2.index_json, "index").unwrap();
            assert_eq!(assemble(&idx, &fetch(&idx, &[&r2, &r1])).unwrap(), t2);
            // Every shard but the changed one is read as it was; the changed one on its own.
            assert_eq!(check_shard(&idx, changed, Some(&r2.shards[0].1)).unwrap().len(), idx.shards[changed].clients);

            // And back: the shard goes into slot a again; slot b's copy is what the previous index names.
            let r3 = render(&t1, "idx", Previous::of(Some(&idx), Some(&t2)), 3, 64 * 1024).unwrap();
            assert_eq!(r3.shards.len(), 1);
            assert_eq!(r3.shards[0].0, shard_name("idx", Slot::A, changed));
            assert_eq!(r3.index.shards, r1.index.shards, "the same content, the same shards");
        }
        // Given changed ids, only their shards are considered: a client removed and one added.
        let mut t4 = t2.clone();
        let removed = t4.clients.remove(10);
        t4.clients.push(Arc::new(Client::builder("team-a/zz-new").key("new").plan("gold").build()));
        t4.revision = t4.compute_revision();
        let ids = [removed.id.clone(), "team-a/zz-new".to_string()];
        let r2 = render(&t2, "idx", Previous::of(Some(&r1.index), Some(&t1)), 2, 64 * 1024).unwrap();
        let by_ids = Previous { changed: Some(&ids), ..Previous::of(Some(&r2.index), Some(&t2)) };
        let by_compare = Previous::of(Some(&r2.index), Some(&t2));
        let (a, b) =
            (render(&t4, "idx", by_ids, 3, 64 * 1024).unwrap(), render(&t4, "idx", by_compare, 3, 64 * 1024).unwrap());
        assert_eq!(a, b);
        let want: std::collections::BTreeSet<usize> = ids.iter().map(|id| shard_of(id, n)).collect();
        assert_eq!(a.shards.len(), want.len());
    }

    #[test]
    fn the_layout_is_kept_while_it_fits_and_redone_when_a_shard_overflows_or_it_empties() {
        let max = 64 * 1024;
        let r1 = render(&sample(3_000), "idx", Previous::NONE, 1, max).unwrap();
        let n = r1.index.shards.len();
        // Growing by a little keeps the layout.
        let t2 = sample(3_300);
        let r2 = render(&t2, "idx", Previous::of(Some(&r1.index), None), 2, max).unwrap();
        assert_eq!(r2.index.shards.len(), n);
        // Growing far beyond it does not.
        let t3 = sample(12_000);
        let r3 = render(&t3, "idx", Previous::of(Some(&r2.index), Some(&t2)), 3, max).unwrap();
        assert!(r3.index.shards.len() > n, "{} shards", r3.index.shards.len());
        assert!(r3.shards.iter().all(|(_, s)| s.len() <= max));
        let idx = IndexDoc::parse(&r3.index_json, "i").unwrap();
        assert_eq!(assemble(&idx, &fetch(&idx, &[&r3])).unwrap(), t3);
        // Shrinking to almost nothing goes back to few shards.
        let t4 = sample(10);
        let r4 = render(&t4, "idx", Previous::of(Some(&r3.index), Some(&t3)), 4, max).unwrap();
        assert_eq!(r4.index.shards.len(), 1);
        let idx = IndexDoc::parse(&r4.index_json, "i").unwrap();
        assert_eq!(assemble(&idx, &fetch(&idx, &[&r4])).unwrap(), t4);
    }

    #[test]
    fn missing_stale_or_corrupt_shards_are_refused() {
        let t = sample(3000);
        let r = render(&t, "idx", Previous::NONE, 1, 64 * 1024).unwrap();
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        let mut shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
        shards[1] = None;
        assert!(assemble(&idx, &shards).unwrap_err().to_string().contains("missing"));

        let corrupt = r.shards[1].1.replacen("team-a", "team-b", 1);
        shards[1] = Some(&corrupt);
        assert!(assemble(&idx, &shards).unwrap_err().to_string().contains("does not match the index digest"));

        let other = render(&sample(2999), "idx", Previous::NONE, 1, 64 * 1024).unwrap();
        shards[1] = Some(&other.shards[0].1);
        assert!(assemble(&idx, &shards).is_err());
    }

    /// A shard whose digest the index vouches for (a writer's bug, or a forged index) is still checked.
    #[test]
    fn a_shard_is_checked_beyond_its_digest() {
        let t = sample(400);
        let r = render(&t, "idx", Previous::NONE, 1, 16 * 1024).unwrap();
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        assert!(idx.shards.len() >= 2);
        let vouched = |i: usize, text: &str| {
            let mut idx = idx.clone();
            idx.shards[i].sha256 = sha(text);
            check_shard(&idx, i, Some(text)).map(|_| ()).unwrap_err().to_string()
        };
        // Shard 0's text at position 1.
        assert!(vouched(1, &r.shards[0].1).contains("another table or position"));
        // A client moved into the wrong shard.
        let mut doc: ShardDoc = serde_json::from_str(&r.shards[0].1).unwrap();
        let stray = serde_json::from_str::<ShardDoc>(&r.shards[1].1).unwrap().clients[0].clone();
        doc.clients.push(stray);
        let mut idx2 = idx.clone();
        idx2.shards[0].clients += 1;
        let text = serde_json::to_string(&doc).unwrap();
        idx2.shards[0].sha256 = sha(&text);
        assert!(check_shard(&idx2, 0, Some(&text)).unwrap_err().to_string().contains("does not belong"));
        // A schema-1 shard (with a revision) inside a stable index.
        let mut doc: ShardDoc = serde_json::from_str(&r.shards[0].1).unwrap();
        doc.revision = idx.revision.clone();
        assert!(vouched(0, &serde_json::to_string(&doc).unwrap()).contains("another table or position"));
        doc.revision.clear();
        doc.schema_version = SCHEMA_VERSION;
        assert!(vouched(0, &serde_json::to_string(&doc).unwrap()).contains("schemaVersion"));
    }

    /// Indexes written before the stable layout (schema 1: one revision, shards packed in id order) still read.
    #[test]
    fn schema_1_indexes_still_assemble() {
        let t = sample(30);
        let (a, b) = t.clients.split_at(10);
        let shard = |i: usize, clients: &[Arc<Client>]| {
            serde_json::to_string(&ShardDoc {
                schema_version: SCHEMA_VERSION,
                service: t.service.clone(),
                revision: t.revision.clone(),
                shard: i,
                clients: clients.iter().map(|c| (**c).clone()).collect(),
            })
            .unwrap()
        };
        let (s0, s1) = (shard(0, a), shard(1, b));
        let idx = IndexDoc {
            schema_version: SCHEMA_VERSION,
            service: t.service.clone(),
            revision: t.revision.clone(),
            sequence: 3,
            slot: Slot::B,
            clients: 30,
            plans: t.plans.clone(),
            shards: vec![
                ShardRef { name: "i-b-0".into(), clients: 10, sha256: sha(&s0), bytes: 0 },
                ShardRef { name: "i-b-1".into(), clients: 20, sha256: sha(&s1), bytes: 0 },
            ],
            deny_all: None,
        };
        let idx = IndexDoc::parse(&serde_json::to_string(&idx).unwrap(), "v1").unwrap();
        assert!(!idx.is_stable());
        assert_eq!(assemble(&idx, &[Some(&s0), Some(&s1)]).unwrap(), t);
        assert!(check_shard(&idx, 0, Some(&s0)).is_err(), "schema 1 shards are read whole");
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
        let r = render(&t, &index_name("orders"), Previous::NONE, 9, MAX_SHARD_BYTES).unwrap();
        assert!(r.shards.is_empty());
        assert!(r.index_json.contains(r#""denyAll":{"reason":"no UsagePlan grants shop/orders"}"#));
        let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
        assert!(idx.is_deny_all());
        assert_eq!((idx.sequence, idx.clients, idx.shards.len()), (9, 0, 0));
        assert_eq!(assemble(&idx, &[]).unwrap(), t);

        // An ordinary index must name shards; a deny-all one must not.
        let ordinary = render(&sample(2), "i", Previous::NONE, 1, MAX_SHARD_BYTES).unwrap().index;
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
        assert!(matches!(render(&t, "i", Previous::NONE, 1, 4096), Err(TableError::TooManyShards { .. })));
    }

    #[test]
    fn shard_of_is_fixed_by_the_format() {
        // FNV-1a 64 of the id: these values must never change (controllers and proxies of different versions).
        assert_eq!(shard_of("", 1 << 20), 0xcbf2_9ce4_8422_2325 % (1 << 20));
        assert_eq!(shard_of("team-a/client-000001", 64), shard_of("team-a/client-000001", 64));
        let spread: std::collections::HashSet<usize> =
            (0..1000).map(|i| shard_of(&format!("team-a/client-{i:06}"), 16)).collect();
        assert_eq!(spread.len(), 16);
    }

    proptest! {
        #[test]
        fn any_table_round_trips_through_shards(n in 0usize..400, max in 2_000usize..40_000) {
            let t = sample(n);
            let r = render(&t, "i", Previous::NONE, 1, max);
            if let Ok(r) = r {
                let idx = IndexDoc::parse(&r.index_json, "index").unwrap();
                let shards: Vec<Option<&str>> = r.shards.iter().map(|(_, s)| Some(s.as_str())).collect();
                prop_assert_eq!(assemble(&idx, &shards).unwrap(), t.clone());
                prop_assert!(r.shards.iter().all(|(_, s)| s.len() <= max));
                // Determinism: rendering again gives byte-identical output.
                prop_assert_eq!(render(&t, "i", Previous::NONE, 1, max).unwrap(), r.clone());
                // Rendering the same table after itself writes nothing.
                let again = render(&t, "i", Previous::of(Some(&r.index), None), 2, max).unwrap();
                prop_assert!(again.shards.is_empty());
                prop_assert_eq!(again.index.shards, r.index.shards);
            }
        }
    }
}
