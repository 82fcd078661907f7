//! What this controller has rendered: per protected Service, the table it last wrote (or confirmed) and what went
//! into it. The triggers read it to find the Services an event may have left stale; the ApiClient reconciler reads
//! it to say whether a client is programmed.

use portcullis_table::Table;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
    pub clients: Generations,
    /// Granting UsagePlan name → (uid, generation). Empty for a deny-all table.
    pub plans: BTreeMap<String, (String, i64)>,
    /// ApiClient name → fingerprints of its keys left out as duplicates.
    pub duplicates: HashMap<String, Vec<String>>,
    /// ApiClient name → why it was left out of the table (it could not be rendered).
    pub excluded: BTreeMap<String, String>,
}

/// Rendered state of every Service this controller has a table for.
pub type Rendered = HashMap<ServiceKey, ServiceState>;

/// ApiClient name → generation rendered into one Service's table. Kept beside the table (one generation per table
/// client, in table order) rather than as a map of names, so a build among 100 000 clients copies no names and two
/// builds compare in one ordered walk.
#[derive(Clone, Debug, Default)]
pub struct Generations {
    table: Option<Arc<Table>>,
    generations: Vec<i64>,
}

/// The ApiClient name of a table client id (`namespace/name`).
fn name_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(_, name)| name)
}

impl Generations {
    /// `generations[i]` is the generation of `table.clients[i]`.
    pub fn new(table: Arc<Table>, generations: Vec<i64>) -> Self {
        assert_eq!(table.clients.len(), generations.len(), "one generation per table client");
        Self { table: Some(table), generations }
    }

    /// (name, generation) in name order (every id of one table has the same namespace: id order is name order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        let clients = self.table.as_deref().map_or(&[][..], |t| &t.clients[..]);
        clients.iter().map(|c| name_of(&c.id)).zip(self.generations.iter().copied())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(n, _)| n)
    }

    pub fn get(&self, name: &str) -> Option<i64> {
        let t = self.table.as_deref()?;
        let i = t.clients.binary_search_by(|c| name_of(&c.id).cmp(name)).ok()?;
        Some(self.generations[i])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Names whose generation differs between `self` and `other`, or that only one of them holds.
    pub fn changed(&self, other: &Generations) -> Vec<String> {
        let (mut a, mut b) = (self.iter().peekable(), other.iter().peekable());
        let mut changed = Vec::new();
        loop {
            match (a.peek(), b.peek()) {
                (Some(&(x, gx)), Some(&(y, gy))) => match x.cmp(y) {
                    Ordering::Less => (changed.push(x.to_string()), a.next()).1,
                    Ordering::Greater => (changed.push(y.to_string()), b.next()).1,
                    Ordering::Equal => {
                        if gx != gy {
                            changed.push(x.to_string());
                        }
                        (a.next(), b.next()).0
                    }
                },
                (Some(&(x, _)), None) => (changed.push(x.to_string()), a.next()).1,
                (None, Some(&(y, _))) => (changed.push(y.to_string()), b.next()).1,
                (None, None) => return changed,
            };
        }
    }
}

impl PartialEq for Generations {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

/// Test input: (name, generation) pairs in any order, as clients `ns/name` of a table without plans.
#[cfg(test)]
impl FromIterator<(String, i64)> for Generations {
    fn from_iter<I: IntoIterator<Item = (String, i64)>>(pairs: I) -> Self {
        let mut pairs: Vec<(String, i64)> = pairs.into_iter().collect();
        pairs.sort();
        let clients = pairs.iter().map(|(n, _)| portcullis_table::Client::builder(format!("ns/{n}")).build());
        let table = Table::new("ns/svc", BTreeMap::new(), clients.collect());
        Generations::new(Arc::new(table), pairs.iter().map(|(_, g)| *g).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generations(clients: &[(&str, i64)]) -> Generations {
        clients.iter().map(|(n, g)| (n.to_string(), *g)).collect()
    }

    #[test]
    fn generations_look_up_by_name_and_name_what_changed() {
        let a = generations(&[("b", 2), ("a", 1), ("c", 3), ("a-b", 7)]);
        assert_eq!((a.get("a"), a.get("b"), a.get("a-b"), a.get("d")), (Some(1), Some(2), Some(7), None));
        assert_eq!(a.names().collect::<Vec<_>>(), ["a", "a-b", "b", "c"]);
        assert!(Generations::default().get("a").is_none());
        let b = generations(&[("a", 1), ("b", 5), ("d", 1), ("a-b", 7)]);
        assert_eq!(a.changed(&b), ["b", "c", "d"]);
        assert_eq!(b.changed(&a), ["b", "c", "d"]);
        assert!(a.changed(&a).is_empty());
        assert_eq!(Generations::default().changed(&a), ["a", "a-b", "b", "c"]);
        assert_eq!(a, generations(&[("a", 1), ("a-b", 7), ("b", 2), ("c", 3)]));
        assert_ne!(a, b);
    }
}
