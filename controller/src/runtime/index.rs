//! Reverse indexes over watched objects: which ApiClients read a Secret, which generated key Secrets an ApiClient
//! owns. Without them a Secret event walked every ApiClient and every ApiClient reconcile walked every Secret: at
//! 100 000 clients with generated keys, creating them (or a restart, which hands every object over once) cost
//! 10¹⁰ comparisons.
//!
//! An index is kept from the watch stream itself, *before* the reflector stores each event
//! ([`super::caches`]), so it is never behind its store: whatever a handler or a reconcile finds in the store, the
//! index already files. During a relist it is a superset (old entries and newly listed ones) until `InitDone`,
//! when it becomes exactly the listed objects, as the store does. A lookup may name an object that has since
//! changed or gone: callers read the object from the store and check it again (over-approximate, never miss).

use kube::ResourceExt;
use kube::runtime::watcher::Event;
use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

/// `(namespace, name)` of a watched object.
type Ref = (String, String);

/// Objects of one kind filed under keys (say, the Secret names an ApiClient reads), looked up within a namespace.
pub struct Index<K> {
    keys_of: fn(&K) -> BTreeSet<String>,
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (namespace, key) → names of the objects filed under it.
    by_key: HashMap<Ref, BTreeSet<String>>,
    /// Object → the keys it is filed under (objects with none are not kept).
    of: HashMap<Ref, BTreeSet<String>>,
    /// During a relist: the objects listed so far, with their keys.
    listing: Option<HashMap<Ref, BTreeSet<String>>>,
}

impl Inner {
    fn unfile(&mut self, obj: &Ref, keys: &BTreeSet<String>) {
        for k in keys {
            let at = (obj.0.clone(), k.clone());
            if let Some(names) = self.by_key.get_mut(&at) {
                names.remove(&obj.1);
                if names.is_empty() {
                    self.by_key.remove(&at);
                }
            }
        }
    }

    fn file(&mut self, obj: &Ref, keys: &BTreeSet<String>) {
        for k in keys {
            self.by_key.entry((obj.0.clone(), k.clone())).or_default().insert(obj.1.clone());
        }
    }

    /// Files `obj` under exactly `keys`.
    fn set(&mut self, obj: Ref, keys: BTreeSet<String>) {
        if let Some(old) = self.of.remove(&obj) {
            self.unfile(&obj, &old);
        }
        if !keys.is_empty() {
            self.file(&obj, &keys);
            self.of.insert(obj, keys);
        }
    }

    /// Files `obj` under `keys` as well as under what it was filed under (a relist in progress).
    fn add(&mut self, obj: Ref, keys: &BTreeSet<String>) {
        if keys.is_empty() {
            return;
        }
        self.file(&obj, keys);
        self.of.entry(obj).or_default().extend(keys.iter().cloned());
    }
}

impl<K: ResourceExt> Index<K> {
    pub fn new(keys_of: fn(&K) -> BTreeSet<String>) -> Self {
        Self { keys_of, inner: RwLock::new(Inner::default()) }
    }

    fn reference(o: &K) -> Ref {
        (o.namespace().unwrap_or_default(), o.name_any())
    }

    /// Takes in one watch event (before the reflector stores it).
    pub fn observe(&self, ev: &Event<K>) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match ev {
            Event::Apply(o) => inner.set(Self::reference(o), (self.keys_of)(o)),
            Event::Delete(o) => inner.set(Self::reference(o), BTreeSet::new()),
            Event::Init => inner.listing = Some(HashMap::new()),
            Event::InitApply(o) => {
                let (obj, keys) = (Self::reference(o), (self.keys_of)(o));
                inner.add(obj.clone(), &keys);
                if !keys.is_empty() {
                    inner.listing.get_or_insert_default().insert(obj, keys);
                }
            }
            Event::InitDone => {
                let listed = inner.listing.take().unwrap_or_default();
                inner.by_key.clear();
                inner.of.clear();
                for (obj, keys) in listed {
                    inner.set(obj, keys);
                }
            }
        }
    }

    /// Names of the objects in `namespace` filed under `key`.
    pub fn lookup(&self, namespace: &str, key: &str) -> Vec<String> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .by_key
            .get(&(namespace.to_owned(), key.to_owned()))
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Objects filed under at least one key (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::collections::BTreeMap;

    /// A ConfigMap filed under the keys of its data.
    fn cm(ns: &str, name: &str, keys: &[&str]) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.namespace = Some(ns.into());
        c.metadata.name = Some(name.into());
        c.data = Some(keys.iter().map(|k| (k.to_string(), String::new())).collect::<BTreeMap<_, _>>());
        c
    }

    fn index() -> Index<ConfigMap> {
        Index::new(|c| c.data.iter().flatten().map(|(k, _)| k.clone()).collect())
    }

    #[test]
    fn applies_refile_and_deletes_unfile() {
        let ix = index();
        ix.observe(&Event::Apply(cm("a", "x", &["s1", "s2"])));
        ix.observe(&Event::Apply(cm("a", "y", &["s2"])));
        ix.observe(&Event::Apply(cm("b", "z", &["s2"])));
        assert_eq!(ix.lookup("a", "s2"), ["x", "y"]);
        assert_eq!(ix.lookup("b", "s2"), ["z"], "looked up within the namespace");
        ix.observe(&Event::Apply(cm("a", "x", &["s3"])));
        assert!(ix.lookup("a", "s1").is_empty(), "a key the object no longer names");
        assert_eq!(ix.lookup("a", "s2"), ["y"]);
        assert_eq!(ix.lookup("a", "s3"), ["x"]);
        ix.observe(&Event::Delete(cm("a", "y", &["s2"])));
        assert!(ix.lookup("a", "s2").is_empty());
        ix.observe(&Event::Apply(cm("a", "x", &[])));
        assert_eq!(ix.len(), 1, "only z is filed under a key");
    }

    #[test]
    fn a_relist_is_a_superset_until_done_then_exactly_the_list() {
        let ix = index();
        ix.observe(&Event::Apply(cm("a", "gone", &["s1"])));
        ix.observe(&Event::Apply(cm("a", "moved", &["s1"])));
        ix.observe(&Event::Init);
        ix.observe(&Event::InitApply(cm("a", "moved", &["s2"])));
        ix.observe(&Event::InitApply(cm("a", "new", &["s1"])));
        // The store still holds the old objects: the index names both the old and the new filings.
        assert_eq!(ix.lookup("a", "s1"), ["gone", "moved", "new"]);
        assert_eq!(ix.lookup("a", "s2"), ["moved"]);
        ix.observe(&Event::InitDone);
        assert_eq!(ix.lookup("a", "s1"), ["new"], "what vanished in the gap is gone, what moved moved");
        assert_eq!(ix.lookup("a", "s2"), ["moved"]);
        assert_eq!(ix.len(), 2);
        // An empty relist empties the index.
        ix.observe(&Event::Init);
        ix.observe(&Event::InitDone);
        assert!(ix.is_empty());
    }
}
