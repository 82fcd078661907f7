//! What one build of a Service's table keeps for the next, so that a change to one client among 100 000 does not
//! resolve, hash and serialise every other client again.
//!
//! Two things are reused, each only where it is provably what a fresh build would compute:
//! - **Resolved keys** of a client: reused while its ApiClient is the *same object* the reflector handed out then,
//!   or the same uid at the same generation (a status write replaces the object, a spec change bumps the
//!   generation), and every Secret its keys read is the same object (or still absent). Key resolution
//!   ([`crate::keys::resolve_keys`]) is a function of exactly those. The memo
//!   holds those `Arc`s, so an address can never be reused by another object while it is compared.
//! - **JSON of a table client**: reused when the freshly built client *equals* the one rendered last time (JSON is
//!   a function of the client alone), so the revision hash and the shard-size check need no serialisation.
//!
//! No I/O: lookups come in as closures; everything here is unit-tested.

use crate::crd::ApiClient;
use crate::keys::resolve_keys;
use crate::model::ResolvedClient;
use k8s_openapi::api::core::v1::Secret;
use portcullis_table::{Client, KeyEntry, Table};
use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::sync::Arc;

/// The resolved keys of one client and what they were resolved from (cheap to clone: shared).
#[derive(Debug, Clone)]
pub struct KeyMemo(Arc<Resolved>);

#[derive(Debug)]
struct Resolved {
    source: Arc<ApiClient>,
    /// Each Secret name the resolution looked up, and what it found.
    reads: Vec<(String, Option<Arc<Secret>>)>,
    entries: Vec<KeyEntry>,
}

impl KeyMemo {
    /// Resolves the keys of `client` through `lookup` (Secrets by name in its namespace), recording what was read.
    pub fn resolve(client: &Arc<ApiClient>, lookup: impl Fn(&str) -> Option<Arc<Secret>>) -> Self {
        let reads = RefCell::new(Vec::new());
        let entries = resolve_keys(client, |name| {
            let found = lookup(name);
            reads.borrow_mut().push((name.to_string(), found.clone()));
            found
        })
        .entries;
        Self(Arc::new(Resolved { source: client.clone(), reads: reads.into_inner(), entries }))
    }

    /// Whether this memo still holds the keys of `client`: the same ApiClient object or the same spec of it (see
    /// [`same_spec`]), and every Secret read the same object as then (or still absent).
    pub fn is_current(&self, client: &Arc<ApiClient>, lookup: impl Fn(&str) -> Option<Arc<Secret>>) -> bool {
        same_spec(&self.0.source, client)
            && self.0.reads.iter().all(|(name, then)| match (then, lookup(name)) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, &b),
                (None, None) => true,
                _ => false,
            })
    }

    /// This memo for `client`, current for it (see [`KeyMemo::is_current`]): when `client` is a newer object of the
    /// same spec (its status was written), the memo holds that object instead, so the store's replaced object is
    /// freed rather than kept alive beside it for every client whose status was written.
    fn for_object(&self, client: &Arc<ApiClient>) -> Self {
        if Arc::ptr_eq(&self.0.source, client) {
            return self.clone();
        }
        let Resolved { reads, entries, .. } = &*self.0;
        Self(Arc::new(Resolved { source: client.clone(), reads: reads.clone(), entries: entries.clone() }))
    }

    pub fn entries(&self) -> &[KeyEntry] {
        &self.0.entries
    }
}

/// Whether `a` and `b` are the same ApiClient with the same spec: the same object, or the same uid at the same
/// generation (the API server bumps `metadata.generation` on every spec change; a status write, such as this
/// controller's own after each change or the usage refresher's, replaces the object but keeps the generation).
/// Everything a build reads of a client is its name, uid and spec.
fn same_spec(a: &Arc<ApiClient>, b: &Arc<ApiClient>) -> bool {
    let (x, y) = (&a.metadata, &b.metadata);
    Arc::ptr_eq(a, b)
        || (x.generation.is_some()
            && x.uid.is_some()
            && x.generation == y.generation
            && x.uid == y.uid
            && x.name == y.name
            && x.namespace == y.namespace)
}

/// What a build of one Service's table keeps: the table, each client's JSON and resolved keys (in table order).
#[derive(Debug)]
pub struct TableMemo {
    pub table: Arc<Table>,
    json: Vec<Arc<str>>,
    keys: Vec<KeyMemo>,
}

impl TableMemo {
    /// The memo of `table`, whose clients' JSON is `json` and resolved keys `keys` (both in table order).
    pub fn new(table: Arc<Table>, json: Vec<Arc<str>>, keys: Vec<KeyMemo>) -> Self {
        assert_eq!(table.clients.len(), keys.len(), "one key memo per client");
        assert_eq!(table.clients.len(), json.len(), "one JSON string per client");
        Self { table, json, keys }
    }

    /// The JSON of each client, in table order.
    pub fn client_json(&self) -> &[Arc<str>] {
        &self.json
    }

    /// Lookups into this memo for one build: they come in id order, so each is tried at the position after the
    /// previous one before searching.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor { memo: self, next: Cell::new(0) }
    }

    /// The ids of the clients in which `table` differs from this memo's table: added, changed or removed. Entries
    /// `table` shares with it (reused by the build, see [`crate::model::ResolvedClient`]) are not compared.
    pub fn changed(&self, table: &Table) -> Vec<String> {
        let (old, new) = (&self.table.clients, &table.clients);
        let (mut i, mut j) = (0, 0);
        let mut changed = Vec::new();
        loop {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => (i, j) = (i + 1, j + 1),
                (Some(a), Some(b)) => match a.id.cmp(&b.id) {
                    Ordering::Less => (changed.push(a.id.clone()), i += 1).1,
                    Ordering::Greater => (changed.push(b.id.clone()), j += 1).1,
                    Ordering::Equal => {
                        if a != b {
                            changed.push(b.id.clone());
                        }
                        (i, j) = (i + 1, j + 1);
                    }
                },
                (Some(a), None) => (changed.push(a.id.clone()), i += 1).1,
                (None, Some(b)) => (changed.push(b.id.clone()), j += 1).1,
                (None, None) => return changed,
            }
        }
    }
}

/// See [`TableMemo::cursor`].
pub struct Cursor<'m> {
    memo: &'m TableMemo,
    next: Cell<usize>,
}

/// A client as one build resolved it: its keys (from the memo when still current), and the entry and JSON the
/// memo's table holds for it when the keys were current (same ApiClient object, same Secrets).
#[derive(Debug, Clone)]
pub struct Known<'m> {
    pub keys: KeyMemo,
    previous: Option<(&'m Arc<Client>, &'m Arc<str>)>,
}

impl ResolvedClient for Known<'_> {
    fn keys(&self) -> &[KeyEntry] {
        self.keys.entries()
    }

    fn previous(&self) -> Option<(&Arc<Client>, &Arc<str>)> {
        self.previous
    }
}

impl<'m> Cursor<'m> {
    /// Position of the client `cmp` finds (it orders a table client's id against the one looked for).
    fn position(&self, cmp: impl Fn(&str) -> Ordering) -> Option<usize> {
        let clients = &self.memo.table.clients;
        let hint = self.next.get();
        let at = match clients.get(hint) {
            Some(c) if cmp(&c.id) == Ordering::Equal => hint,
            _ => clients.binary_search_by(|c| cmp(&c.id)).ok()?,
        };
        self.next.set(at + 1);
        Some(at)
    }

    /// The JSON rendered last time for a client equal to `client`.
    pub fn json_of(&self, client: &Client) -> Option<Arc<str>> {
        let i = self.position(|id| id.cmp(&client.id))?;
        (*self.memo.table.clients[i] == *client).then(|| self.memo.json[i].clone())
    }

    /// `client` resolved: from the memo while current (see [`KeyMemo::is_current`]), with the entry built from it;
    /// else resolved again through `lookup`.
    pub fn known(&self, client: &Arc<ApiClient>, lookup: impl Fn(&str) -> Option<Arc<Secret>>) -> Known<'m> {
        let memo = self.memo;
        // The same object as the memo's next client is that client (the memo holds it: its address cannot be
        // reused), so its id need not be compared, nor the object read (at 100 000 clients each lies on its own
        // page: reading its name here was most of this function's time).
        let hint = self.next.get();
        let at = match memo.keys.get(hint) {
            Some(k) if Arc::ptr_eq(&k.0.source, client) => {
                self.next.set(hint + 1);
                Some(hint)
            }
            _ => {
                let ns = client.metadata.namespace.as_deref().unwrap_or_default();
                let name = client.metadata.name.as_deref().unwrap_or_default();
                self.position(|id| compare_id(id, ns, name))
            }
        };
        if let Some(i) = at
            && memo.keys[i].is_current(client, &lookup)
        {
            let keys = memo.keys[i].for_object(client);
            return Known { keys, previous: Some((&memo.table.clients[i], &memo.json[i])) };
        }
        Known { keys: KeyMemo::resolve(client, lookup), previous: None }
    }
}

/// `client` resolved without a memo.
pub fn resolve(client: &Arc<ApiClient>, lookup: impl Fn(&str) -> Option<Arc<Secret>>) -> Known<'static> {
    Known { keys: KeyMemo::resolve(client, lookup), previous: None }
}

/// `id` (`namespace/name`) against `ns` + `/` + `name`, without building the latter.
fn compare_id(id: &str, ns: &str, name: &str) -> Ordering {
    let (a, b) = id.as_bytes().split_at(id.len().min(ns.len()));
    a.cmp(ns.as_bytes())
        .then_with(|| b.first().cmp(&Some(&b'/')).then_with(|| b.get(1..).unwrap_or_default().cmp(name.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memo kept across a status write (same uid and generation, a new object) holds the new object, not the
    /// replaced one; a spec change (next generation) or another uid makes it stale.
    #[test]
    fn a_memo_follows_the_object_across_a_status_write() {
        let (_, clients, secret) = crate::fixtures::fixture(1);
        let secret = Arc::new(secret);
        let lookup = |name: &str| (name == "keys").then(|| secret.clone());
        let old = Arc::new(clients[0].clone());
        let memo = KeyMemo::resolve(&old, lookup);
        let mut status_written = (*old).clone();
        status_written.status = Some(Default::default());
        let new = Arc::new(status_written);
        assert!(memo.is_current(&new, lookup));
        let moved = memo.for_object(&new);
        assert!(Arc::ptr_eq(&moved.0.source, &new) && moved.entries() == memo.entries());
        assert!(Arc::ptr_eq(&memo.for_object(&old).0, &memo.0), "the same object: shared, not copied");
        let mut spec_changed = (*old).clone();
        spec_changed.metadata.generation = Some(spec_changed.metadata.generation.unwrap() + 1);
        assert!(!memo.is_current(&Arc::new(spec_changed), lookup));
        let mut recreated = (*old).clone();
        recreated.metadata.uid = Some("another".into());
        assert!(!memo.is_current(&Arc::new(recreated), lookup));
        let mut no_generation = (*old).clone();
        no_generation.metadata.generation = None;
        let unversioned = Arc::new(no_generation);
        let memo = KeyMemo::resolve(&unversioned, lookup);
        assert!(!memo.is_current(&Arc::new((*unversioned).clone()), lookup), "without a generation: same object only");
    }

    #[test]
    fn ids_compare_as_the_joined_string_would() {
        let cases = ["a/b", "a/c", "a/", "ab/c", "a", "b/a", "a/bc", "a-b/c", "a.b/c"];
        for id in cases {
            for (ns, name) in [("a", "b"), ("a", "bc"), ("ab", "c"), ("a", ""), ("b", "a"), ("a-b", "c")] {
                let joined = format!("{ns}/{name}");
                assert_eq!(compare_id(id, ns, name), id.cmp(joined.as_str()), "{id} vs {joined}");
            }
        }
    }
}
