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
        let mut changed = Vec::new();
        self.walk(other, |step| match step {
            Step::Left(i) => changed.push(self.name(i).to_string()),
            Step::Right(j) => changed.push(other.name(j).to_string()),
            Step::Both(i, j) if self.generations[i] != other.generations[j] => changed.push(self.name(i).to_string()),
            Step::Both(..) => {}
        });
        changed
    }

    fn name(&self, i: usize) -> &str {
        self.name_of(&self.clients()[i].id)
    }

    /// Walks `self` and `other` (of the same Service) in name order. Entries the two tables share (the same object:
    /// a build reuses the entries of clients that did not change) are matched without comparing their names, so
    /// two tables of 100 000 clients that differ in one compare in a walk over two arrays of pointers.
    fn walk(&self, other: &Generations, mut f: impl FnMut(Step)) {
        let (a, b) = (self.clients(), other.clients());
        let (mut i, mut j) = (0, 0);
        loop {
            let step = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if Arc::ptr_eq(x, y) => Step::Both(i, j),
                (Some(x), Some(y)) => match self.name_of(&x.id).cmp(other.name_of(&y.id)) {
                    Ordering::Less => Step::Left(i),
                    Ordering::Greater => Step::Right(j),
                    Ordering::Equal => Step::Both(i, j),
                },
                (Some(_), None) => Step::Left(i),
                (None, Some(_)) => Step::Right(j),
                (None, None) => return,
            };
            match step {
                Step::Left(_) => i += 1,
                Step::Right(_) => j += 1,
                Step::Both(..) => (i, j) = (i + 1, j + 1),
            }
            f(step);
        }
    }
}

/// One step of [`Generations::walk`]: a client only the first holds (its index), only the second, or both.
#[derive(Clone, Copy, Debug)]
enum Step {
    Left(usize),
    Right(usize),
    Both(usize, usize),
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
        self.generations.walk(current, |step| match step {
            Step::Left(_) => {}
            Step::Both(i, j) if self.generations.generations[i] == current.generations[j] => {
                revisions.push(Arc::clone(&self.revisions[i]))
            }
            Step::Right(j) | Step::Both(_, j) => {
                revisions.push(rev.clone());
                changed.push(current.name(j).to_string());
            }
        });
        self.generations = current.clone();
        self.revisions = revisions;
        changed
    }

    /// The distinct revisions the current clients entered in (compared by object first: a revision is shared by
    /// every client that entered in it).
    pub fn revisions(&self) -> Vec<&str> {
        let mut seen: Vec<&Arc<str>> = Vec::new();
        for r in &self.revisions {
            if seen.last().is_some_and(|s| Arc::ptr_eq(s, r)) {
                continue;
            }
            if !seen.iter().any(|s| Arc::ptr_eq(s, r)) && !seen.iter().any(|s| ***s == **r) {
                seen.push(r);
            }
        }
        seen.into_iter().map(|r| &**r).collect()
    }

    /// Names of the clients whose current generation entered in one of `revisions`.
    pub fn entered_in(&self, revisions: &[&str]) -> Vec<String> {
        let clients = self.generations.clients();
        self.revisions
            .iter()
            .enumerate()
            .filter(|(_, r)| revisions.contains(&&***r))
            .map(|(i, _)| self.generations.name_of(&clients[i].id).to_string())
            .collect()
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
        let mut revs = intro.revisions();
        revs.sort();
        assert_eq!(revs, ["r1", "r2", "r4"]);
        assert_eq!(intro.entered_in(&["r2", "r4"]), ["b", "c", "d"]);
        assert!(intro.entered_in(&["r3"]).is_empty());
        assert!(intro.record(&Generations::default(), "r5").is_empty());
        assert!(intro.get("a").is_none());
        assert!(intro.revisions().is_empty());
    }

    /// Tables that share entries (a build reuses those of unchanged clients) are walked by object where they share
    /// and by name elsewhere, with the same answers as tables that share nothing.
    #[test]
    fn tables_sharing_entries_compare_as_if_they_shared_nothing() {
        use portcullis_table::Client;
        let entry = |n: &str| Arc::new(Client::builder(format!("ns/{n}")).build());
        let old: Vec<Arc<Client>> = ["a", "b", "c", "e"].map(entry).to_vec();
        // b's entry rebuilt (same name, new object), c removed, d added, a and e shared.
        let new = vec![old[0].clone(), entry("b"), entry("d"), old[3].clone()];
        let gens = |clients: Vec<Arc<Client>>, g: Vec<i64>| {
            Generations::new(Arc::new(Table::new("ns/svc", BTreeMap::new(), clients)), g)
        };
        let (a, b) = (gens(old, vec![1, 1, 1, 1]), gens(new, vec![1, 2, 1, 1]));
        assert_eq!(a.changed(&b), ["b", "c", "d"]);
        assert_eq!(b.changed(&a), ["b", "c", "d"]);
        let unshared = |g: &Generations| g.iter().map(|(n, g)| (n.to_string(), g)).collect::<Generations>();
        assert_eq!(unshared(&a).changed(&unshared(&b)), a.changed(&b));
        let mut intro = Introduced::default();
        intro.record(&a, "r1");
        assert_eq!(intro.record(&b, "r2"), ["b", "d"]);
        assert_eq!(intro.iter().collect::<Vec<_>>(), [("a", "r1"), ("b", "r2"), ("d", "r2"), ("e", "r1")]);
    }
}
