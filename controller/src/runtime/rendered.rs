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
    /// Length of `namespace/`, the prefix of every client id of the table (ids are `namespace/name`).
    prefix: usize,
}

impl Generations {
    /// `generations[i]` is the generation of `table.clients[i]`.
    pub fn new(table: Arc<Table>, generations: Vec<i64>) -> Self {
        assert_eq!(table.clients.len(), generations.len(), "one generation per table client");
        let prefix = table.service.split_once('/').map_or(0, |(ns, _)| ns.len() + 1);
        debug_assert!(table.clients.iter().all(|c| c.id.get(..prefix) == table.service.get(..prefix)));
        Self { table: Some(table), generations, prefix }
    }

    /// The ApiClient name of a table client id (`namespace/name`), without searching for the `/`.
    fn name_of<'a>(&self, id: &'a str) -> &'a str {
        id.get(self.prefix..).unwrap_or(id)
    }

    fn clients(&self) -> &[Arc<portcullis_table::Client>] {
        self.table.as_deref().map_or(&[][..], |t| &t.clients[..])
    }

    /// (name, generation) in name order (every id of one table has the same namespace: id order is name order).
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.clients().iter().map(|c| self.name_of(&c.id)).zip(self.generations.iter().copied())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(n, _)| n)
    }

    pub fn len(&self) -> usize {
        self.generations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// Where `name` is in name order.
    fn position(&self, name: &str) -> Option<usize> {
        self.clients().binary_search_by(|c| self.name_of(&c.id).cmp(name)).ok()
    }

    pub fn get(&self, name: &str) -> Option<i64> {
        self.position(name).map(|i| self.generations[i])
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

/// The revision in which each client's current generation entered one Service's table (for `Enforced` of an
/// ApiClient: every sidecar serves that revision or a newer one). Aligned with the table's [`Generations`]
/// (`revisions[i]` belongs to its `i`-th client), so moving to a new table is one ordered walk over both: no
/// names hashed, copied or searched per client (at 100 000 clients the map of names this replaces cost ≈ 0.3 s of
/// CPU per revision, on the runtime's threads).
#[derive(Clone, Debug, Default)]
pub struct Introduced {
    generations: Generations,
    revisions: Vec<Arc<str>>,
}

impl Introduced {
    /// Moves to `current`, the table first confirmed as `revision`: a client whose generation is unchanged keeps
    /// the revision it entered in; a new or changed one entered in `revision`. Returns the names of the latter.
    pub fn record(&mut self, current: &Generations, revision: &str) -> Vec<String> {
        let rev: Arc<str> = Arc::from(revision);
        let mut revisions = Vec::with_capacity(current.len());
        let mut changed = Vec::new();
        let mut old = self.generations.iter().zip(&self.revisions).peekable();
        for (name, generation) in current.iter() {
            while old.next_if(|((n, _), _)| *n < name).is_some() {}
            match old.peek() {
                Some(((n, g), r)) if *n == name && *g == generation => revisions.push(Arc::clone(r)),
                _ => {
                    revisions.push(rev.clone());
                    changed.push(name.to_string());
                }
            }
        }
        drop(old);
        self.generations = current.clone();
        self.revisions = revisions;
        changed
    }

    /// (generation, revision it entered in) of client `name`.
    pub fn get(&self, name: &str) -> Option<(i64, &str)> {
        let i = self.generations.position(name)?;
        Some((self.generations.generations[i], &self.revisions[i]))
    }

    /// (name, revision its current generation entered in), in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.generations.names().zip(self.revisions.iter().map(|r| &**r))
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
        assert_eq!((a.len(), Generations::default().is_empty()), (4, true));
        assert_eq!(Generations::default().changed(&a), ["a", "a-b", "b", "c"]);
        assert_eq!(a, generations(&[("a", 1), ("a-b", 7), ("b", 2), ("c", 3)]));
        assert_ne!(a, b);
    }

    #[test]
    fn introduced_keeps_the_revision_a_generation_entered_in() {
        let mut intro = Introduced::default();
        assert!(intro.get("a").is_none());
        let r1 = generations(&[("a", 1), ("b", 1), ("c", 1)]);
        assert_eq!(intro.record(&r1, "r1"), ["a", "b", "c"]);
        // b changed, c removed, d added: only b and d entered in r2.
        let r2 = generations(&[("a", 1), ("b", 2), ("d", 1)]);
        assert_eq!(intro.record(&r2, "r2"), ["b", "d"]);
        assert_eq!(
            (intro.get("a"), intro.get("b"), intro.get("c"), intro.get("d")),
            (Some((1, "r1")), Some((2, "r2")), None, Some((1, "r2")))
        );
        assert_eq!(intro.iter().collect::<Vec<_>>(), [("a", "r1"), ("b", "r2"), ("d", "r2")]);
        // The same table confirmed again (a new revision string, nothing changed): nothing moves.
        assert!(intro.record(&r2, "r3").is_empty());
        assert_eq!(intro.get("b"), Some((2, "r2")));
        // c comes back with its old generation: it is new to this table, so it entered now.
        let r4 = generations(&[("a", 1), ("b", 2), ("c", 1), ("d", 1)]);
        assert_eq!(intro.record(&r4, "r4"), ["c"]);
        assert_eq!(intro.get("c"), Some((1, "r4")));
        assert!(intro.record(&Generations::default(), "r5").is_empty());
        assert!(intro.get("a").is_none());
    }
}
