//! Our own table writes coming back as watch events ("echoes").
//!
//! Every shard and index the table writer writes, and every stale shard it deletes, comes back through the
//! ConfigMap watch. Those events tell the writer nothing it does not know, but each used to queue the Service again:
//! one more reconcile per change (at 100 000 clients ≈ 0.4 s of deciding), and a table batch held open past the
//! next real change. So the writer marks, *before* each request (the event may arrive before the answer), what it
//! is about to write (a [`Fingerprint`]: data hash, labels, annotations, owners) or which object (uid) it is about to
//! delete, and drops the mark if the request fails; a watch event that matches its ConfigMap's mark is an echo and
//! triggers nothing.
//!
//! Anything else still triggers: an edit by someone else changes the fingerprint (data, labels, annotations or
//! owners), a deletion by someone else (or by garbage collection) names a uid we did not delete, and a relist hands
//! over objects as they are now, which match only if they are still what we wrote. One mark per ConfigMap name (the
//! last request wins), so the map is bounded by the table ConfigMaps that exist; a deletion's mark goes with its
//! echo.

use super::caches::{CACHED_DATA_SHA256, Change};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// What the table writer decides of a ConfigMap.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    data_sha256: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    owners: Vec<OwnerReference>,
}

impl Fingerprint {
    fn new(cm: &ConfigMap, data_sha256: Option<String>) -> Self {
        let mut annotations = cm.annotations().clone();
        annotations.remove(CACHED_DATA_SHA256);
        Self { data_sha256, labels: cm.labels().clone(), annotations, owners: cm.owner_references().to_vec() }
    }

    /// Of a ConfigMap about to be written (its one data entry hashed).
    pub fn of_request(cm: &ConfigMap) -> Self {
        let sha = cm.data.as_ref().and_then(|d| d.values().next()).map(|d| super::publish::data_sha256(d));
        Self::new(cm, sha)
    }

    /// Of a ConfigMap as the cache holds it (its data replaced by [`CACHED_DATA_SHA256`]).
    pub fn of_cached(cm: &ConfigMap) -> Self {
        Self::new(cm, cm.annotations().get(CACHED_DATA_SHA256).cloned())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Mark {
    Written(Fingerprint),
    /// We deleted the object with this uid.
    Deleted(String),
}

type Key = (String, String);

/// The last write or deletion of each ConfigMap by this controller.
#[derive(Debug, Default)]
pub struct Echoes {
    marks: Mutex<HashMap<Key, Mark>>,
}

impl Echoes {
    /// Marks `cm` (in `namespace`) as about to be written; returns the mark's key for [`Echoes::failed`].
    pub fn writing(&self, namespace: &str, cm: &ConfigMap) -> Key {
        let key = (namespace.to_string(), cm.name_any());
        self.marks.lock().expect("echoes lock").insert(key.clone(), Mark::Written(Fingerprint::of_request(cm)));
        key
    }

    /// Marks ConfigMap `name` (uid `uid`) as about to be deleted (no mark without a uid).
    pub fn deleting(&self, namespace: &str, name: &str, uid: Option<&str>) -> Key {
        let key = (namespace.to_string(), name.to_string());
        if let Some(uid) = uid {
            self.marks.lock().expect("echoes lock").insert(key.clone(), Mark::Deleted(uid.to_string()));
        }
        key
    }

    /// The request marked under `key` failed: its events (if any) are not ours to ignore.
    pub fn failed(&self, key: &Key) {
        self.marks.lock().expect("echoes lock").remove(key);
    }

    /// Whether this watch event (a cached ConfigMap) is our own write or deletion coming back (a deletion's mark is
    /// then dropped).
    pub fn is_echo(&self, cm: &ConfigMap, change: Change) -> bool {
        let key = (cm.namespace().unwrap_or_default(), cm.name_any());
        let mut marks = self.marks.lock().expect("echoes lock");
        match (marks.get(&key), change) {
            (Some(Mark::Written(fp)), Change::Applied) => *fp == Fingerprint::of_cached(cm),
            (Some(Mark::Deleted(uid)), Change::Deleted) if cm.uid().as_ref() == Some(uid) => {
                marks.remove(&key);
                true
            }
            _ => false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.marks.lock().expect("echoes lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::caches::trim_configmap;

    fn cm(name: &str, data: &str, uid: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.labels = Some(BTreeMap::from([("portcullis.dev/service".into(), "orders".into())]));
        c.metadata.annotations = Some(BTreeMap::from([("portcullis.dev/revision".into(), "r1".into())]));
        c.metadata.owner_references =
            Some(vec![OwnerReference { kind: "UsagePlan".into(), uid: "plan-1".into(), ..Default::default() }]);
        c.data = Some(BTreeMap::from([("shard.json".into(), data.into())]));
        c.metadata.uid = Some(uid.into());
        c
    }

    /// The request as sent, and the event as the cache hands it over (namespaced, versioned, data trimmed).
    fn event(sent: &ConfigMap, rv: &str) -> ConfigMap {
        let mut c = sent.clone();
        c.metadata.namespace = Some("shop".into());
        c.metadata.resource_version = Some(rv.into());
        trim_configmap(&mut c);
        c
    }

    #[test]
    fn our_write_is_an_echo_even_before_its_answer_and_a_later_edit_is_not() {
        let e = Echoes::default();
        let sent = cm("a", "{\"v\":1}", "u1");
        assert!(!e.is_echo(&event(&sent, "5"), Change::Applied), "nothing marked");
        e.writing("shop", &sent);
        assert!(e.is_echo(&event(&sent, "7"), Change::Applied));
        // Delivered again (a relist, nothing changed since): still ours.
        assert!(e.is_echo(&event(&sent, "7"), Change::Applied));
        type Edit<'a> = (&'a str, &'a dyn Fn(&mut ConfigMap));
        let edits: [Edit; 5] = [
            ("data", &|c| c.data = Some(BTreeMap::from([("shard.json".into(), "{\"v\":2}".into())]))),
            ("a label", &|c| {
                c.metadata.labels.as_mut().unwrap().insert("x".into(), "y".into());
            }),
            ("the revision annotation", &|c| c.metadata.annotations = None),
            ("the owners", &|c| c.metadata.owner_references = None),
            ("another owner uid", &|c| c.metadata.owner_references.as_mut().unwrap()[0].uid = "plan-2".into()),
        ];
        for (what, edit) in edits {
            let mut other = sent.clone();
            edit(&mut other);
            assert!(!e.is_echo(&event(&other, "8"), Change::Applied), "someone else's edit of {what}");
        }
        let mut other_ns = event(&sent, "7");
        other_ns.metadata.namespace = Some("other".into());
        assert!(!e.is_echo(&other_ns, Change::Applied), "same name in another namespace");
        assert!(!e.is_echo(&event(&sent, "9"), Change::Deleted), "a deletion we did not make");
    }

    #[test]
    fn a_failed_request_leaves_no_mark() {
        let e = Echoes::default();
        let sent = cm("a", "{}", "u1");
        let key = e.writing("shop", &sent);
        e.failed(&key);
        assert!(!e.is_echo(&event(&sent, "7"), Change::Applied));
        let key = e.deleting("shop", "a", Some("u1"));
        e.failed(&key);
        assert!(!e.is_echo(&event(&sent, "7"), Change::Deleted));
    }

    #[test]
    fn our_deletion_is_an_echo_once_and_another_deletion_is_not() {
        let e = Echoes::default();
        let sent = cm("a", "{}", "u1");
        e.writing("shop", &sent);
        e.deleting("shop", "a", Some("u1"));
        assert!(!e.is_echo(&event(&cm("a", "{}", "u0"), "9"), Change::Deleted), "an older object of that name");
        assert!(!e.is_echo(&event(&sent, "7"), Change::Applied), "re-created or edited after our delete");
        assert!(e.is_echo(&event(&sent, "8"), Change::Deleted));
        assert_eq!(e.len(), 0, "the mark goes with its echo");
        assert!(!e.is_echo(&event(&sent, "8"), Change::Deleted));
        // Without a uid nothing is marked.
        e.deleting("shop", "b", None);
        assert_eq!(e.len(), 0);
    }

    #[test]
    fn an_index_is_fingerprinted_by_its_data_too() {
        let e = Echoes::default();
        let mut sent = cm("portcullis-table-orders", "", "u1");
        sent.data = Some(BTreeMap::from([(portcullis_table::naming::INDEX_DATA_KEY.into(), "{\"r\":1}".into())]));
        e.writing("shop", &sent);
        assert!(e.is_echo(&event(&sent, "3"), Change::Applied));
        sent.data = Some(BTreeMap::from([(portcullis_table::naming::INDEX_DATA_KEY.into(), "{\"r\":2}".into())]));
        assert!(!e.is_echo(&event(&sent, "4"), Change::Applied));
    }
}
