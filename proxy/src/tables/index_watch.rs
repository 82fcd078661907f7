//! The table watch as a state machine without I/O: what the API server said ([`Input`]) in, what to do
//! ([`Effect`]) and what to ask next ([`IndexWatch::next_request`]) out. `super::api` drives it with real list,
//! watch and get calls; the unit tests below drive it with made-up answers.
//!
//! The rule it implements (docs/proxy.md, "Table states"): **the API server being unavailable never revokes;
//! losing permission or the object always does.**
//!
//! | Input | Effect | Next request |
//! |---|---|---|
//! | list: the index | load it (sequence rule) | watch from the list's resourceVersion |
//! | list: no index (or 404) | revoke `index_not_found` | watch (a later Added brings it back) |
//! | Added / Modified | load it (sequence rule) | keep watching |
//! | Deleted | revoke `index_deleted` | keep watching |
//! | Bookmark | — | keep watching (resourceVersion advanced) |
//! | watch ended (server timeout) | — | watch again from the last resourceVersion (re-authorised) |
//! | 403 / 401 on list, watch or a shard get | revoke `forbidden` / `unauthorized` | list again, with backoff |
//! | 410 Gone | — | list again (at once the first time) |
//! | transient (connection, timeout, 5xx, 429, …) | keep the table | retry the same request with backoff |
//! | shard missing / not matching (revision incomplete) | keep the table, retry the index every few seconds | — |
//! | index or table invalid | keep the table (rejected) | — |
//! | older sequence / same sequence other revision | keep the table (refused) | — |

use super::Revocation;
use portcullis_table::sequence::{Seen, Verdict, judge};
use portcullis_table::shard::IndexDoc;
use std::time::Duration;

/// The index ConfigMap as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexObject {
    pub uid: String,
    pub resource_version: String,
    /// The parsed `index.json`, or why it could not be.
    pub index: Result<IndexDoc, String>,
}

impl IndexObject {
    fn seen(&self, doc: &IndexDoc) -> Seen {
        Seen { uid: self.uid.clone(), sequence: doc.sequence, revision: doc.revision.clone() }
    }
}

/// What the API server answered, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 403: RBAC no longer lets this proxy read its table.
    Forbidden(String),
    /// 401: the credentials are no longer accepted.
    Unauthorized(String),
    /// 404 on a list or watch.
    NotFound(String),
    /// 410: the resourceVersion is too old to resume from.
    Gone,
    /// Anything else: the API server is unreachable, slow or failing. Says nothing about access.
    Transient(String),
}

impl Failure {
    /// The `kind` label of `portcullis_proxy_table_source_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Forbidden(_) => "forbidden",
            Failure::Unauthorized(_) => "unauthorized",
            Failure::NotFound(_) => "not_found",
            Failure::Gone => "gone",
            Failure::Transient(_) => "transient",
        }
    }
}

/// How loading an index (fetching its shards, assembling, compiling, swapping) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Swapped in (or already in force).
    Applied,
    /// A shard is missing or does not match the index (usually: still being written).
    Incomplete(String),
    /// The index or the assembled table is invalid.
    Invalid(String),
    /// Fetching a shard failed.
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A (re)list answered: the index, or `None` when it does not exist.
    Listed {
        resource_version: String,
        index: Option<IndexObject>,
    },
    /// A watch request was accepted; events follow.
    WatchOpened,
    /// Added or Modified.
    Changed(IndexObject),
    Deleted {
        uid: String,
        resource_version: String,
    },
    Bookmark {
        resource_version: String,
    },
    /// The watch stream ended cleanly (the server's timeout).
    WatchEnded,
    /// A list or watch failed, or the watch stream carried an error.
    Failed(Failure),
    /// The answer to an [`Effect::Load`].
    Loaded {
        object: IndexObject,
        outcome: LoadOutcome,
    },
    /// The timer of an incomplete revision fired ([`IndexWatch::pending`]).
    RetryPending,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Nothing,
    /// Fetch the shards of this index, apply the table, and report back with [`Input::Loaded`].
    Load(IndexObject),
    /// Deny every request.
    Revoke {
        cause: Revocation,
        detail: String,
    },
    /// The table in force stays; report why (log, count `kind`).
    Keep {
        kind: &'static str,
        detail: String,
    },
    /// An index refused as invalid or incomplete (count once per revision): the table in force stays.
    Reject {
        detail: String,
    },
    /// An index refused by the sequence rule: the table in force stays.
    OutOfOrder {
        verdict: Verdict,
        candidate: Seen,
        applied: Option<Seen>,
    },
}

/// The next API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    List,
    Watch { resource_version: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    NeedList,
    NeedWatch {
        resource_version: String,
    },
    /// A watch stream is open at this resourceVersion.
    Streaming {
        resource_version: String,
    },
}

/// Exponential backoff: `BACKOFF_FIRST` doubling up to `BACKOFF_MAX`, reset by success.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Most deleted index uids remembered (an object seen deleted is never accepted again).
const TOMBSTONES: usize = 8;

#[derive(Debug)]
pub struct IndexWatch {
    phase: Phase,
    /// Consecutive failures (for the backoff) since the last success.
    failures: u32,
    /// The index revision in force (or last in force, while revoked by a permission error).
    applied: Option<Seen>,
    /// Whether `applied` is enforced right now (false after a revocation).
    enforcing: bool,
    /// uids of index objects seen deleted.
    tombstones: Vec<String>,
    /// An index whose revision was incomplete, tried again on [`Input::RetryPending`].
    pending: Option<IndexObject>,
    /// The revision last reported through [`Effect::Reject`] (reported once).
    rejected: Option<(String, String)>,
}

impl Default for IndexWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl IndexWatch {
    pub fn new() -> Self {
        Self {
            phase: Phase::NeedList,
            failures: 0,
            applied: None,
            enforcing: false,
            tombstones: Vec::new(),
            pending: None,
            rejected: None,
        }
    }

    /// What to ask the API server next, and how long to wait first. `None` while a watch stream is open.
    pub fn next_request(&self) -> Option<(Request, Duration)> {
        let req = match &self.phase {
            Phase::NeedList => Request::List,
            Phase::NeedWatch { resource_version } => Request::Watch { resource_version: resource_version.clone() },
            Phase::Streaming { .. } => return None,
        };
        Some((req, self.backoff()))
    }

    /// Whether the watch stream opened last is still the one to read.
    pub fn is_streaming(&self) -> bool {
        matches!(self.phase, Phase::Streaming { .. })
    }

    /// An index waiting for its shards; the driver sends [`Input::RetryPending`] every few seconds while set.
    pub fn pending(&self) -> Option<&IndexObject> {
        self.pending.as_ref()
    }

    /// The revision in force (`None` before the first and while revoked).
    pub fn enforcing(&self) -> Option<&Seen> {
        self.applied.as_ref().filter(|_| self.enforcing)
    }

    fn backoff(&self) -> Duration {
        match self.failures {
            0 => Duration::ZERO,
            n => BACKOFF_FIRST.saturating_mul(1 << (n - 1).min(8)).min(BACKOFF_MAX),
        }
    }

    fn resource_version(&self) -> Option<&str> {
        match &self.phase {
            Phase::NeedList => None,
            Phase::NeedWatch { resource_version } | Phase::Streaming { resource_version } => Some(resource_version),
        }
    }

    fn advance(&mut self, resource_version: String) {
        if let Phase::Streaming { resource_version: rv } = &mut self.phase {
            *rv = resource_version;
        }
    }

    pub fn step(&mut self, input: Input) -> Effect {
        match input {
            Input::Listed { resource_version, index } => {
                self.failures = 0;
                self.phase = Phase::NeedWatch { resource_version };
                match index {
                    Some(object) => self.observe(object),
                    None => {
                        // Whatever was applied is gone: never accept that object again.
                        if let Some(a) = self.applied.take() {
                            self.bury(a.uid);
                        }
                        self.absent(Revocation::IndexNotFound, "the index ConfigMap does not exist".into())
                    }
                }
            }
            Input::WatchOpened => {
                let rv = self.resource_version().unwrap_or_default().to_string();
                self.phase = Phase::Streaming { resource_version: rv };
                Effect::Nothing
            }
            Input::Changed(object) => {
                self.failures = 0;
                self.advance(object.resource_version.clone());
                self.observe(object)
            }
            Input::Deleted { uid, resource_version } => {
                self.failures = 0;
                self.advance(resource_version);
                if self.applied.as_ref().is_some_and(|a| a.uid == uid) {
                    self.applied = None;
                }
                self.bury(uid);
                self.absent(Revocation::IndexDeleted, "the index ConfigMap was deleted".into())
            }
            Input::Bookmark { resource_version } => {
                self.failures = 0;
                self.advance(resource_version);
                Effect::Nothing
            }
            Input::WatchEnded => {
                let rv = self.resource_version().map(str::to_string);
                self.phase = match rv {
                    Some(resource_version) => Phase::NeedWatch { resource_version },
                    None => Phase::NeedList,
                };
                Effect::Nothing
            }
            Input::Failed(f) => self.failed(f),
            Input::Loaded { object, outcome } => self.loaded(object, outcome),
            Input::RetryPending => match self.pending.take() {
                Some(object) => self.observe(object),
                None => Effect::Nothing,
            },
        }
    }

    fn failed(&mut self, f: Failure) -> Effect {
        self.failures = self.failures.saturating_add(1);
        match f {
            Failure::Gone => {
                // Relist at once the first time; a second Gone in a row backs off.
                if self.failures == 1 {
                    self.failures = 0;
                }
                self.phase = Phase::NeedList;
                Effect::Keep { kind: "gone", detail: "resourceVersion too old (410 Gone): listing again".into() }
            }
            Failure::Transient(detail) => {
                // Resume where we were: re-watch from the last resourceVersion, or list again.
                let rv = self.resource_version().map(str::to_string);
                self.phase = match rv {
                    Some(resource_version) => Phase::NeedWatch { resource_version },
                    None => Phase::NeedList,
                };
                Effect::Keep { kind: "transient", detail }
            }
            Failure::Forbidden(detail) => self.lost_access(Revocation::Forbidden, detail),
            Failure::Unauthorized(detail) => self.lost_access(Revocation::Unauthorized, detail),
            Failure::NotFound(detail) => {
                self.phase = Phase::NeedList;
                self.absent(Revocation::IndexNotFound, detail)
            }
        }
    }

    /// Permission lost: deny, drop the stream (it was authorised before), and list again until allowed.
    fn lost_access(&mut self, cause: Revocation, detail: String) -> Effect {
        self.phase = Phase::NeedList;
        self.pending = None;
        self.enforcing = false;
        Effect::Revoke { cause, detail }
    }

    fn absent(&mut self, cause: Revocation, detail: String) -> Effect {
        self.pending = None;
        self.enforcing = false;
        Effect::Revoke { cause, detail }
    }

    fn bury(&mut self, uid: String) {
        if !self.tombstones.contains(&uid) {
            if self.tombstones.len() == TOMBSTONES {
                self.tombstones.remove(0);
            }
            self.tombstones.push(uid);
        }
    }

    /// An index object as listed or watched: load it unless it is invalid, older, or already in force.
    fn observe(&mut self, object: IndexObject) -> Effect {
        let doc = match &object.index {
            Ok(doc) => doc,
            Err(e) => {
                self.pending = None;
                return self.reject_once(&object, "", e.clone());
            }
        };
        let candidate = object.seen(doc);
        if self.tombstones.contains(&candidate.uid) {
            self.pending = None;
            return Effect::OutOfOrder { verdict: Verdict::Older, candidate, applied: self.applied.clone() };
        }
        match judge(self.applied.as_ref(), &candidate) {
            Verdict::Same if self.enforcing => {
                self.pending = None;
                Effect::Nothing
            }
            Verdict::Newer | Verdict::Same => Effect::Load(object),
            verdict @ (Verdict::Older | Verdict::Conflict) => {
                self.pending = None;
                Effect::OutOfOrder { verdict, candidate, applied: self.applied.clone() }
            }
        }
    }

    fn loaded(&mut self, object: IndexObject, outcome: LoadOutcome) -> Effect {
        let Ok(doc) = &object.index else { return Effect::Nothing };
        let seen = object.seen(doc);
        match outcome {
            LoadOutcome::Applied => {
                self.applied = Some(seen);
                self.enforcing = true;
                self.pending = None;
                self.rejected = None;
                Effect::Nothing
            }
            LoadOutcome::Incomplete(detail) => {
                self.pending = Some(object.clone());
                self.reject_once(&object, &doc.revision, detail)
            }
            LoadOutcome::Invalid(detail) => {
                self.pending = None;
                self.reject_once(&object, &doc.revision, detail)
            }
            LoadOutcome::Failed(f @ (Failure::Forbidden(_) | Failure::Unauthorized(_))) => self.failed(f),
            LoadOutcome::Failed(f) => {
                // The API server failed us mid-load: try this index again later, keep the table.
                self.pending = Some(object);
                Effect::Keep { kind: f.kind(), detail: format!("fetching shards: {f:?}") }
            }
        }
    }

    fn reject_once(&mut self, object: &IndexObject, revision: &str, detail: String) -> Effect {
        let key = (object.resource_version.clone(), revision.to_string());
        if self.rejected.as_ref() == Some(&key) {
            return Effect::Nothing;
        }
        self.rejected = Some(key);
        Effect::Reject { detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_table::shard::{MAX_SHARD_BYTES, render};
    use portcullis_table::{Table, TableError};
    use std::collections::BTreeMap;

    fn doc(sequence: u64, tag: &str) -> IndexDoc {
        let t = Table::new(format!("shop/{tag}"), BTreeMap::new(), Vec::<portcullis_table::Client>::new());
        render(&t, "portcullis-table-orders", portcullis_table::shard::Previous::NONE, sequence, MAX_SHARD_BYTES)
            .unwrap()
            .index
    }

    fn obj(uid: &str, rv: u32, sequence: u64, tag: &str) -> IndexObject {
        IndexObject { uid: uid.into(), resource_version: rv.to_string(), index: Ok(doc(sequence, tag)) }
    }

    /// Steps `input`; when the effect is a load, answers it with `outcome` and returns both effects.
    fn load(w: &mut IndexWatch, input: Input, outcome: LoadOutcome) -> (Effect, Effect) {
        let e = w.step(input);
        let Effect::Load(object) = e.clone() else { return (e, Effect::Nothing) };
        let after = w.step(Input::Loaded { object, outcome });
        (e, after)
    }

    fn serving(w: &mut IndexWatch, object: IndexObject) {
        let (e, after) = load(w, Input::Changed(object), LoadOutcome::Applied);
        assert!(matches!(e, Effect::Load(_)), "{e:?}");
        assert_eq!(after, Effect::Nothing);
    }

    fn streaming(w: &mut IndexWatch, rv: &str) {
        assert_eq!(
            w.next_request(),
            Some((Request::Watch { resource_version: rv.into() }, Duration::ZERO)),
            "should watch from {rv}"
        );
        w.step(Input::WatchOpened);
        assert!(w.is_streaming());
    }

    fn started(index: Option<IndexObject>) -> (IndexWatch, Effect) {
        let mut w = IndexWatch::new();
        assert_eq!(w.next_request(), Some((Request::List, Duration::ZERO)));
        let (e, after) = load(&mut w, Input::Listed { resource_version: "10".into(), index }, LoadOutcome::Applied);
        assert_eq!(after, Effect::Nothing);
        streaming(&mut w, "10");
        (w, e)
    }

    #[test]
    fn list_then_watch_loads_newer_revisions_and_skips_the_one_in_force() {
        let (mut w, e) = started(Some(obj("u1", 10, 1, "a")));
        assert!(matches!(e, Effect::Load(_)));
        assert_eq!(w.enforcing().unwrap().sequence, 1);
        assert_eq!(w.step(Input::Changed(obj("u1", 11, 1, "a"))), Effect::Nothing, "same revision: nothing to do");
        serving(&mut w, obj("u1", 12, 2, "b"));
        assert_eq!(w.enforcing().unwrap().revision, doc(2, "b").revision);
        assert_eq!(w.step(Input::Bookmark { resource_version: "20".into() }), Effect::Nothing);
        // The server ends the watch: resume from the bookmark, without a relist and without waiting.
        w.step(Input::WatchEnded);
        streaming(&mut w, "20");
    }

    #[test]
    fn deleted_index_revokes_and_a_recreated_one_serves_again() {
        let (mut w, _) = started(Some(obj("u1", 10, 5, "a")));
        let e = w.step(Input::Deleted { uid: "u1".into(), resource_version: "11".into() });
        assert!(matches!(e, Effect::Revoke { cause: Revocation::IndexDeleted, .. }), "{e:?}");
        assert!(w.enforcing().is_none());
        assert!(w.is_streaming(), "a deletion is news, not an error: keep watching");
        // A lagging API server still showing the deleted object: refused.
        let e = w.step(Input::Changed(obj("u1", 9, 5, "a")));
        assert!(matches!(e, Effect::OutOfOrder { verdict: Verdict::Older, .. }), "{e:?}");
        // Recreated (a new object) with a fresh sequence: a new order, accepted.
        serving(&mut w, obj("u2", 12, 1, "c"));
        assert_eq!(w.enforcing().unwrap().uid, "u2");
    }

    #[test]
    fn an_initial_list_without_the_index_denies() {
        let (mut w, e) = started(None);
        assert!(matches!(e, Effect::Revoke { cause: Revocation::IndexNotFound, .. }), "{e:?}");
        serving(&mut w, obj("u1", 11, 1, "a"));
        // A relist (after 410) that no longer contains it denies, and that object never comes back.
        w.step(Input::Failed(Failure::Gone));
        assert_eq!(w.next_request(), Some((Request::List, Duration::ZERO)), "410: relist at once");
        let e = w.step(Input::Listed { resource_version: "30".into(), index: None });
        assert!(matches!(e, Effect::Revoke { cause: Revocation::IndexNotFound, .. }), "{e:?}");
        streaming(&mut w, "30");
        assert!(matches!(w.step(Input::Changed(obj("u1", 31, 9, "z"))), Effect::OutOfOrder { .. }));
    }

    #[test]
    fn forbidden_revokes_drops_the_stream_and_lists_again_until_allowed() {
        let (mut w, _) = started(Some(obj("u1", 10, 3, "a")));
        let e = w.step(Input::Failed(Failure::Forbidden("configmaps is forbidden".into())));
        assert!(matches!(e, Effect::Revoke { cause: Revocation::Forbidden, .. }), "{e:?}");
        assert!(!w.is_streaming(), "the open stream was authorised before the change: stop reading it");
        assert_eq!(w.next_request(), Some((Request::List, BACKOFF_FIRST)));
        // Still forbidden: backs off further.
        w.step(Input::Failed(Failure::Forbidden("still".into())));
        assert_eq!(w.next_request(), Some((Request::List, BACKOFF_FIRST * 2)));
        // Allowed again, same index: applied again (it was revoked), and the backoff is reset.
        let (e, _) = load(
            &mut w,
            Input::Listed { resource_version: "40".into(), index: Some(obj("u1", 10, 3, "a")) },
            LoadOutcome::Applied,
        );
        assert!(matches!(e, Effect::Load(_)), "{e:?}");
        assert!(w.enforcing().is_some());
        streaming(&mut w, "40");
        // 401 likewise.
        let e = w.step(Input::Failed(Failure::Unauthorized("token rejected".into())));
        assert!(matches!(e, Effect::Revoke { cause: Revocation::Unauthorized, .. }), "{e:?}");
    }

    #[test]
    fn forbidden_shard_revokes_but_missing_shard_keeps_the_table() {
        let (mut w, _) = started(Some(obj("u1", 10, 1, "a")));
        let (_, after) = load(&mut w, Input::Changed(obj("u1", 11, 2, "b")), LoadOutcome::Incomplete("shard 1".into()));
        assert_eq!(after, Effect::Reject { detail: "shard 1".into() });
        assert_eq!(w.enforcing().unwrap().sequence, 1, "the table in force stays");
        assert!(w.pending().is_some());
        // Retried: still incomplete, reported once only.
        let (e, after) = load(&mut w, Input::RetryPending, LoadOutcome::Incomplete("shard 1".into()));
        assert!(matches!(e, Effect::Load(_)));
        assert_eq!(after, Effect::Nothing);
        // Repaired.
        let (_, after) = load(&mut w, Input::RetryPending, LoadOutcome::Applied);
        assert_eq!(after, Effect::Nothing);
        assert_eq!(w.enforcing().unwrap().sequence, 2);
        assert!(w.pending().is_none());

        let (_, after) = load(
            &mut w,
            Input::Changed(obj("u1", 12, 3, "c")),
            LoadOutcome::Failed(Failure::Forbidden("shard forbidden".into())),
        );
        assert!(matches!(after, Effect::Revoke { cause: Revocation::Forbidden, .. }), "{after:?}");
        assert_eq!(w.next_request(), Some((Request::List, BACKOFF_FIRST)));
    }

    #[test]
    fn the_api_server_being_down_never_revokes() {
        let (mut w, _) = started(Some(obj("u1", 10, 1, "a")));
        w.step(Input::Bookmark { resource_version: "15".into() });
        let mut expected = BACKOFF_FIRST;
        for _ in 0..12 {
            let e = w.step(Input::Failed(Failure::Transient("connection refused".into())));
            assert!(matches!(e, Effect::Keep { kind: "transient", .. }), "{e:?}");
            assert!(w.enforcing().is_some(), "still enforcing the table");
            // Resume the watch where it was, with growing, capped backoff.
            assert_eq!(w.next_request(), Some((Request::Watch { resource_version: "15".into() }, expected)));
            expected = (expected * 2).min(BACKOFF_MAX);
        }
        // A shard get failing transiently keeps the table and retries the index later.
        let (_, after) = load(
            &mut w,
            Input::Changed(obj("u1", 16, 2, "b")),
            LoadOutcome::Failed(Failure::Transient("timeout".into())),
        );
        assert!(matches!(after, Effect::Keep { .. }));
        assert_eq!(w.enforcing().unwrap().sequence, 1);
        assert!(w.pending().is_some());
        // Transient before the first list: list again.
        let mut fresh = IndexWatch::new();
        fresh.step(Input::Failed(Failure::Transient("refused".into())));
        assert_eq!(fresh.next_request(), Some((Request::List, BACKOFF_FIRST)));
    }

    #[test]
    fn older_or_conflicting_sequences_are_refused_and_the_newer_stays() {
        let (mut w, _) = started(Some(obj("u1", 10, 7, "a")));
        let e = w.step(Input::Changed(obj("u1", 11, 6, "old")));
        assert!(matches!(e, Effect::OutOfOrder { verdict: Verdict::Older, .. }), "{e:?}");
        let e = w.step(Input::Changed(obj("u1", 12, 7, "other")));
        assert!(matches!(e, Effect::OutOfOrder { verdict: Verdict::Conflict, .. }), "{e:?}");
        assert_eq!(w.enforcing().unwrap().sequence, 7);
        serving(&mut w, obj("u1", 13, 8, "new"));
    }

    #[test]
    fn an_invalid_index_is_rejected_once_and_keeps_the_table() {
        let (mut w, _) = started(Some(obj("u1", 10, 1, "a")));
        let bad = IndexObject {
            uid: "u1".into(),
            resource_version: "11".into(),
            index: Err(TableError::Malformed { what: "index".into(), detail: "eof".into() }.to_string()),
        };
        assert!(matches!(w.step(Input::Changed(bad.clone())), Effect::Reject { .. }));
        assert_eq!(w.step(Input::Changed(bad)), Effect::Nothing);
        assert!(w.enforcing().is_some());
        assert!(w.is_streaming());
    }

    #[test]
    fn a_second_gone_in_a_row_backs_off() {
        let (mut w, _) = started(Some(obj("u1", 10, 1, "a")));
        w.step(Input::Failed(Failure::Gone));
        assert_eq!(w.next_request(), Some((Request::List, Duration::ZERO)));
        w.step(Input::Failed(Failure::Transient("x".into())));
        w.step(Input::Failed(Failure::Gone));
        assert!(w.next_request().unwrap().1 > Duration::ZERO);
    }
}
