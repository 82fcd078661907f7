//! The table the request path reads, the atomic swap, and what the proxy is enforcing right now
//! ([`TableState`]: serving, deny-all, revoked or nothing yet), for `/readyz`, metrics and the deny reason.

use crate::decision::compiled::CompileError;
use crate::decision::{CompiledTable, Reason};
use crate::global::GlobalLimits;
use crate::metrics::Metrics;
use arc_swap::ArcSwapOption;
use governor::clock::DefaultClock;
use portcullis_table::Chain;
use portcullis_table::{Table, TableError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The table the request path reads (`load()` per request) and the sources write.
pub struct TableStore {
    /// The table in force: `None` before the first one and while revoked.
    pub current: ArcSwapOption<CompiledTable>,
    /// Set once a table has been enforced: from then on, no table means "revoked", not "not loaded yet".
    revoked: AtomicBool,
    state: Mutex<TableState>,
    metrics: Arc<Metrics>,
    /// The shared store's counts (`--store-url`), set once at start; unset: every count is per proxy.
    global: OnceLock<Arc<GlobalLimits>>,
}

/// What the proxy enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// No table yet (starting): every request gets 503 `no_table`. `detail`: what the source last said, if
    /// anything (e.g. "index ConfigMap not found").
    NoTable { detail: Option<String> },
    /// An ordinary table.
    Serving { revision: String, sequence: Option<u64> },
    /// A deny-all table: every request gets 403 `service_not_granted`.
    DenyAll { revision: String, sequence: Option<u64>, reason: String },
    /// The table was taken away: every request gets 503 `table_revoked`.
    Revoked { cause: Revocation, detail: String, last_revision: Option<String> },
}

impl TableState {
    /// The `state` label of `portcullis_proxy_table_state`.
    pub fn label(&self) -> &'static str {
        match self {
            TableState::NoTable { .. } => "no_table",
            TableState::Serving { .. } => "serving",
            TableState::DenyAll { .. } => "deny_all",
            TableState::Revoked { .. } => "revoked",
        }
    }

    /// Ready means: enforcing a table that can admit someone.
    pub fn is_ready(&self) -> bool {
        matches!(self, TableState::Serving { .. })
    }

    /// One line for `/readyz`.
    pub fn describe(&self) -> String {
        let seq = |s: &Option<u64>| s.map(|s| format!(" sequence {s}")).unwrap_or_default();
        match self {
            TableState::NoTable { detail: None } => "no table loaded yet".into(),
            TableState::NoTable { detail: Some(d) } => format!("no table loaded yet: {d}"),
            TableState::Serving { revision, sequence } => format!("ok revision {revision}{}", seq(sequence)),
            TableState::DenyAll { revision, sequence, reason } => {
                format!("denying every request: deny-all table revision {revision}{}: {reason}", seq(sequence))
            }
            TableState::Revoked { cause, detail, last_revision } => format!(
                "denying every request: table revoked ({}): {detail}{}",
                cause.code(),
                last_revision.as_ref().map(|r| format!(" (was revision {r})")).unwrap_or_default()
            ),
        }
    }
}

/// Why a proxy stopped enforcing the table it had (see docs/proxy.md "Table states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Revocation {
    /// The watch reported the index ConfigMap deleted.
    IndexDeleted,
    /// A (re)list did not contain the index ConfigMap, or the API server answered 404.
    IndexNotFound,
    /// The API server answered 403 to a list, watch or get of the table (RBAC removed).
    Forbidden,
    /// The API server answered 401 (the ServiceAccount or its token is no longer valid).
    Unauthorized,
    /// `--tables FILE`: the file does not exist (any more).
    FileMissing,
    /// `--tables FILE`: the file exists but cannot be read (permissions, a directory, I/O error).
    FileUnreadable,
}

impl Revocation {
    /// The `cause` label of `portcullis_proxy_table_revocations_total`.
    pub fn code(self) -> &'static str {
        match self {
            Revocation::IndexDeleted => "index_deleted",
            Revocation::IndexNotFound => "index_not_found",
            Revocation::Forbidden => "forbidden",
            Revocation::Unauthorized => "unauthorized",
            Revocation::FileMissing => "file_missing",
            Revocation::FileUnreadable => "file_unreadable",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}")]
    Read { path: String, source: std::io::Error },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("compiling table")]
    Compile(#[from] crate::decision::compiled::CompileError),
}

impl TableStore {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            revoked: AtomicBool::new(false),
            state: Mutex::new(TableState::NoTable { detail: None }),
            metrics,
            global: OnceLock::new(),
        }
    }

    /// Counts global limits in the shared store from now on (set once, at start, before any table is applied).
    pub fn set_global(&self, global: Arc<GlobalLimits>) {
        let _ = self.global.set(global);
    }

    /// The shared store's counts, when a store is configured.
    pub fn global(&self) -> Option<&Arc<GlobalLimits>> {
        self.global.get()
    }

    /// The `/readyz` line about the shared store: its state, or — without one — whether plans asked for it.
    pub fn store_detail(&self) -> Option<String> {
        if let Some(g) = self.global() {
            return Some(g.describe());
        }
        let n = self.current.load().as_ref().map_or(0, |t| t.global_plans);
        (n > 0).then(|| {
            format!(
                "store: not configured (no --store-url); {n} plan(s) ask for counts shared across replicas \
                 (globalLimits or quotaScope Global): counted per replica, as 1 replica"
            )
        })
    }

    /// The revision in force (also for a deny-all table); `None` when nothing is.
    pub fn revision(&self) -> Option<String> {
        self.current.load().as_ref().map(|t| t.revision.clone())
    }

    /// Whether an ordinary table is enforced (see [`TableState::is_ready`]).
    pub fn is_ready(&self) -> bool {
        self.state().is_ready()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn state(&self) -> TableState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why a request is refused when there is no table: `table_revoked` once a table was enforced and taken
    /// away, `no_table` before the first.
    pub fn missing_reason(&self) -> Reason {
        if self.revoked.load(Ordering::Acquire) { Reason::TableRevoked } else { Reason::NoTable }
    }

    /// Compiles `table` (carrying limiter state over from the current one) and swaps it in. Returns whether
    /// anything changed (the revision in force is not swapped again). `sequence`: of the index it came from.
    pub fn apply(&self, table: &Table, source: &str, sequence: Option<u64>) -> Result<bool, LoadError> {
        self.apply_owned(table.clone(), source, sequence)
    }

    /// [`TableStore::apply`], consuming the table: its parsed form is freed client by client while the new one is
    /// compiled (what the table sources use: it lowers the peak memory of a large swap).
    pub fn apply_owned(&self, table: Table, source: &str, sequence: Option<u64>) -> Result<bool, LoadError> {
        let (service, revision) = (table.service.clone(), table.revision.clone());
        self.apply_with(&service, &revision, source, sequence, |previous, clock| {
            CompiledTable::compile_owned(table, previous, clock)
        })
    }

    /// Swaps in the table of `service` at `revision` that `compile` builds from the table in force (carrying its
    /// limiter state over, or sharing its unchanged parts), unless that revision is in force already.
    pub fn apply_with(
        &self,
        service: &str,
        revision: &str,
        source: &str,
        sequence: Option<u64>,
        compile: impl FnOnce(Option<&CompiledTable>, DefaultClock) -> Result<CompiledTable, CompileError>,
    ) -> Result<bool, LoadError> {
        let previous = self.current.load_full();
        if previous.as_ref().is_some_and(|p| p.revision == revision && p.service == service) {
            // The same content (e.g. from a recreated index): only the sequence shown may differ.
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let TableState::Serving { sequence: s, .. } | TableState::DenyAll { sequence: s, .. } = &mut *state {
                *s = sequence;
            }
            return Ok(false);
        }
        let mut compiled = compile(previous.as_deref(), DefaultClock::default())?;
        drop(previous);
        compiled.store_counts = self.global.get().is_some();
        let clients = compiled.client_count();
        let (service, revision) = (compiled.service.clone(), compiled.revision.clone());
        let deny_all = compiled.deny_all.clone();
        let state = match &deny_all {
            Some(reason) => TableState::DenyAll { revision: revision.clone(), sequence, reason: reason.clone() },
            None => TableState::Serving { revision: revision.clone(), sequence },
        };
        self.current.store(Some(Arc::new(compiled)));
        self.metrics.table_applied(&service, &revision, clients);
        match &deny_all {
            Some(reason) => tracing::warn!(%source, %service, %revision, ?sequence, %reason,
                "deny-all table applied: every request is refused (service_not_granted)"),
            None => tracing::info!(%source, %service, %revision, ?sequence, clients, "table applied"),
        }
        self.set_state(state);
        self.revoked.store(false, Ordering::Release);
        Ok(true)
    }

    /// Stops enforcing the current table: every request is refused from now on (`table_revoked`, or `no_table`
    /// if no table was ever enforced). Idempotent; a change of cause is logged and counted again.
    pub fn revoke(&self, cause: Revocation, detail: &str) {
        let before = self.state();
        let last_revision = match &before {
            TableState::Serving { revision, .. } | TableState::DenyAll { revision, .. } => Some(revision.clone()),
            TableState::Revoked { last_revision, .. } => last_revision.clone(),
            TableState::NoTable { .. } => None,
        };
        let next = match before {
            TableState::NoTable { .. } => TableState::NoTable { detail: Some(format!("{}: {detail}", cause.code())) },
            _ => TableState::Revoked { cause, detail: detail.to_string(), last_revision: last_revision.clone() },
        };
        let newly = match (&before, &next) {
            (TableState::Revoked { cause: a, .. }, TableState::Revoked { cause: b, .. }) => a != b,
            (TableState::NoTable { detail: a }, TableState::NoTable { detail: b }) => a != b,
            _ => true,
        };
        if matches!(next, TableState::Revoked { .. }) {
            // Flag first, then drop the table: a request in between still finds a table or is refused.
            self.revoked.store(true, Ordering::Release);
        }
        self.current.store(None);
        if newly {
            if matches!(next, TableState::Revoked { .. }) {
                self.metrics.table_revoked(cause.code());
                self.metrics.table_dropped();
                tracing::error!(cause = cause.code(), %detail, ?last_revision,
                    "table revoked: every request is refused (table_revoked) until a table can be read again");
            } else {
                tracing::warn!(cause = cause.code(), %detail, "no table to enforce yet");
            }
        }
        self.set_state(next);
    }

    pub fn reject(&self, source: &'static str, what: &str, err: &LoadError) {
        self.metrics.table_rejected(source);
        tracing::error!(%what, error = %Chain(err), "table rejected; the table in force stays");
    }

    fn set_state(&self, state: TableState) {
        self.metrics.set_table_state(state.label());
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn store() -> TableStore {
        TableStore::new(Arc::new(Metrics::new()))
    }

    #[test]
    fn states_follow_apply_and_revoke() {
        let s = store();
        assert_eq!(s.state(), TableState::NoTable { detail: None });
        assert_eq!(s.missing_reason(), Reason::NoTable);

        // Before any table, losing the source keeps "no table" (with the detail), not "revoked".
        s.revoke(Revocation::IndexNotFound, "index ConfigMap shop/x not found");
        assert_eq!(s.state().label(), "no_table");
        assert!(s.state().describe().contains("index_not_found"), "{}", s.state().describe());
        assert_eq!(s.missing_reason(), Reason::NoTable);

        let t = Table::new("a/b", BTreeMap::new(), Vec::<portcullis_table::Client>::new());
        assert!(s.apply(&t, "test", Some(3)).unwrap());
        assert!(!s.apply(&t, "test", Some(3)).unwrap(), "same revision: nothing to swap");
        assert!(s.is_ready());
        assert_eq!(s.state().describe(), format!("ok revision {} sequence 3", t.revision));

        s.revoke(Revocation::IndexDeleted, "watch: Deleted");
        assert!(s.current.load().is_none());
        assert_eq!(s.missing_reason(), Reason::TableRevoked);
        assert!(!s.is_ready());
        let d = s.state().describe();
        assert!(d.contains("table revoked (index_deleted)") && d.contains(&t.revision), "{d}");
        s.revoke(Revocation::IndexDeleted, "again");
        s.revoke(Revocation::Forbidden, "403");
        let m = s.metrics.encode();
        assert!(m.contains(r#"portcullis_proxy_table_revocations_total{cause="index_deleted"} 1"#), "{m}");
        assert!(m.contains(r#"portcullis_proxy_table_revocations_total{cause="forbidden"} 1"#), "{m}");
        assert!(m.contains(r#"portcullis_proxy_table_state{state="revoked"} 1"#), "{m}");
        assert!(m.contains(r#"portcullis_proxy_table_state{state="serving"} 0"#), "{m}");
        assert!(!m.contains("portcullis_proxy_table_info{"), "the revoked revision is not reported as enforced");

        // The same revision applies again after a revocation.
        assert!(s.apply(&t, "test", Some(3)).unwrap());
        assert_eq!(s.missing_reason(), Reason::NoTable);
        assert!(s.is_ready());
        // The same content from a recreated index (a new sequence order): nothing swapped, the sequence shown.
        assert!(!s.apply(&t, "test", Some(1)).unwrap());
        assert_eq!(s.state().describe(), format!("ok revision {} sequence 1", t.revision));
    }

    #[test]
    fn a_deny_all_table_is_enforced_but_not_ready() {
        let s = store();
        let t = Table::deny_all("a/b", "no UsagePlan grants a/b");
        assert!(s.apply(&t, "test", Some(8)).unwrap());
        assert!(s.current.load().as_ref().unwrap().deny_all.is_some());
        assert!(!s.is_ready());
        let d = s.state().describe();
        assert!(d.contains("deny-all table") && d.contains("no UsagePlan grants a/b"), "{d}");
        assert!(s.metrics.encode().contains(r#"portcullis_proxy_table_state{state="deny_all"} 1"#));
    }
}
