//! Where tables come from (a watched file, or ConfigMaps through the Kubernetes API) and the atomic swap.

use crate::decision::CompiledTable;
use crate::metrics::Metrics;
use arc_swap::ArcSwapOption;
use k8s_openapi::api::core::v1::ConfigMap;
use portcullis_table::naming::{INDEX_DATA_KEY, SHARD_DATA_KEY};
use portcullis_table::shard::{IndexDoc, assemble};
use portcullis_table::{Table, TableError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// The table the request path reads (`load()` per request) and the sources write.
pub struct TableStore {
    pub current: ArcSwapOption<CompiledTable>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("compiling table: {0}")]
    Compile(#[from] crate::decision::compiled::CompileError),
    #[error("ConfigMap {0} has no {1:?} data key")]
    MissingKey(String, &'static str),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl TableStore {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { current: ArcSwapOption::empty(), metrics }
    }

    pub fn revision(&self) -> Option<String> {
        self.current.load().as_ref().map(|t| t.revision.clone())
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Compiles `table` (carrying limiter state over from the current one) and swaps it in. Returns whether
    /// anything changed (an identical revision is not swapped).
    pub fn apply(&self, table: &Table, source: &str) -> Result<bool, LoadError> {
        let previous = self.current.load_full();
        if previous.as_ref().is_some_and(|p| p.revision == table.revision && p.service == table.service) {
            return Ok(false);
        }
        let clock = governor::clock::DefaultClock::default();
        let compiled = CompiledTable::compile(table, previous.as_deref(), clock)?;
        let clients = compiled.clients.len();
        if table.plans.values().any(|p| p.global_limits) {
            tracing::warn!(
                service = %table.service,
                "plans with globalLimits are counted per proxy replica in this build (no Redis backend)"
            );
        }
        self.current.store(Some(Arc::new(compiled)));
        self.metrics.table_applied(&table.service, &table.revision, clients);
        tracing::info!(%source, service = %table.service, revision = %table.revision, clients, "table applied");
        Ok(true)
    }

    pub fn reject(&self, source: &'static str, what: &str, err: &LoadError) {
        self.metrics.table_rejected(source);
        tracing::error!(%what, error = %err, "table rejected; the last good table stays in force");
    }
}

async fn apply_text(store: &Arc<TableStore>, path: &Path, text: String) -> Result<bool, LoadError> {
    let store = store.clone();
    let what = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let applied = Table::from_json(&text, &what).map_err(LoadError::from).and_then(|t| store.apply(&t, &what));
        // The parsed table, the text and (after a swap) the old compiled table are freed by now.
        drop(text);
        crate::heap::release_free_memory();
        applied
    })
    .await
    .expect("table loading does not panic")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
}

fn stamp(m: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    FileStamp { len: m.len(), modified: m.modified().ok(), ino: m.ino() }
}

/// Watches a table file by polling: metadata (size, mtime, inode, following symlinks, so Kubernetes' `..data`
/// symlink swap and editors' rename-into-place are seen) and, when that changed, the content hash. A file that
/// fails to parse or validate is rejected once per distinct content; the last good table stays. A missing or
/// unreadable file is logged (not counted as a rejected table) and also keeps the last good table.
pub struct FileWatcher {
    store: Arc<TableStore>,
    path: PathBuf,
    last_stamp: Option<FileStamp>,
    last_hash: Option<[u8; 32]>,
    last_failed: bool,
    missing_logged: bool,
}

impl FileWatcher {
    pub fn new(store: Arc<TableStore>, path: PathBuf) -> Self {
        Self { store, path, last_stamp: None, last_hash: None, last_failed: true, missing_logged: false }
    }

    /// One look at the file; applies it when its content changed.
    pub async fn check(&mut self) {
        let st = match tokio::fs::metadata(&self.path).await {
            Ok(m) => stamp(&m),
            Err(e) => {
                if !self.missing_logged {
                    tracing::warn!(path = %self.path.display(), error = %e, "table file not readable; keeping the last good table");
                    self.missing_logged = true;
                }
                self.last_stamp = None;
                return;
            }
        };
        self.missing_logged = false;
        if self.last_stamp.as_ref() == Some(&st) && !self.last_failed {
            return;
        }
        self.last_stamp = Some(st);
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "reading table file");
                self.last_failed = true;
                return;
            }
        };
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if self.last_hash == Some(hash) {
            return;
        }
        self.last_hash = Some(hash);
        match apply_text(&self.store, &self.path, text).await {
            Ok(_) => self.last_failed = false,
            Err(e) => {
                self.last_failed = true;
                self.store.reject("file", &self.path.display().to_string(), &e);
            }
        }
    }

    /// Checks every `interval` until `stop` flips.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.check().await,
                _ = stop.changed() => return,
            }
        }
    }
}

/// Watches the index ConfigMap `name` (by `metadata.name` field selector, so RBAC `resourceNames` suffices) and,
/// on each change, fetches the shards it names and applies the assembled table when it is complete and valid.
pub async fn watch_configmap(
    store: Arc<TableStore>,
    client: kube::Client,
    namespace: String,
    name: String,
    mut stop: watch::Receiver<bool>,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api.clone(), cfg).default_backoff().applied_objects());
    let what = format!("ConfigMap {namespace}/{name}");
    // The last index whose revision was refused: retried every RETRY_REJECTED (its shards may get repaired
    // without the index changing), counted as rejected once per revision.
    let mut pending: Option<ConfigMap> = None;
    let mut rejected_revision: Option<String> = None;
    loop {
        let retry = async {
            match &pending {
                Some(_) => tokio::time::sleep(RETRY_REJECTED).await,
                None => std::future::pending().await,
            }
        };
        let cm = tokio::select! {
            ev = events.next() => match ev {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(%namespace, %name, error = %e, "watching the table index");
                    continue;
                }
                Some(Ok(cm)) => cm,
            },
            _ = retry => pending.take().expect("retry only with a pending index"),
            _ = stop.changed() => return,
        };
        let revision = index_revision(&cm);
        match apply_index(&store, &api, &cm, &what).await {
            Ok(_) => {
                pending = None;
                rejected_revision = None;
            }
            Err(e) => {
                if rejected_revision.as_deref() == Some(revision.as_str()) {
                    tracing::debug!(%what, error = %e, "revision still refused");
                } else {
                    store.reject("configmap", &what, &e);
                    rejected_revision = Some(revision);
                }
                pending = Some(cm);
            }
        }
    }
}

/// How often a refused revision is tried again while no newer index arrives.
const RETRY_REJECTED: Duration = Duration::from_secs(5);

fn index_revision(cm: &ConfigMap) -> String {
    cm.data
        .as_ref()
        .and_then(|d| d.get(INDEX_DATA_KEY))
        .and_then(|j| IndexDoc::parse(j, "index").ok())
        .map(|i| i.revision)
        .unwrap_or_default()
}

/// Attempts for a revision whose shards do not (yet) match the index, and the first backoff (doubling).
const SHARD_ATTEMPTS: u32 = 5;
const SHARD_BACKOFF: Duration = Duration::from_millis(100);

async fn apply_index(
    store: &Arc<TableStore>,
    api: &kube::Api<ConfigMap>,
    cm: &ConfigMap,
    what: &str,
) -> Result<bool, LoadError> {
    let json = cm
        .data
        .as_ref()
        .and_then(|d| d.get(INDEX_DATA_KEY))
        .ok_or_else(|| LoadError::MissingKey(what.to_string(), INDEX_DATA_KEY))?;
    let index = IndexDoc::parse(json, what)?;
    if store.current.load().as_ref().is_some_and(|t| t.revision == index.revision && t.service == index.service) {
        return Ok(false);
    }
    let mut backoff = SHARD_BACKOFF;
    for attempt in 1..=SHARD_ATTEMPTS {
        let mut shards: Vec<Option<String>> = Vec::with_capacity(index.shards.len());
        for r in &index.shards {
            let cm = api.get_opt(&r.name).await?;
            shards.push(cm.and_then(|c| c.data).and_then(|mut d| d.remove(SHARD_DATA_KEY)));
        }
        let refs: Vec<Option<&str>> = shards.iter().map(|s| s.as_deref()).collect();
        match assemble(&index, &refs) {
            Ok(table) => {
                let store = store.clone();
                let what = what.to_string();
                return tokio::task::spawn_blocking(move || {
                    let applied = store.apply(&table, &what);
                    drop((table, shards));
                    crate::heap::release_free_memory();
                    applied
                })
                .await
                .expect("table loading does not panic");
            }
            // A shard missing or not matching its digest is usually one being written right now: retry.
            Err(e @ TableError::Shard { .. }) if attempt < SHARD_ATTEMPTS => {
                tracing::debug!(%what, attempt, error = %e, "revision incomplete; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
mod tests {
    use crate::decision::{CompiledTable, Reason, RequestFacts, decide};
    use governor::clock::FakeRelativeClock;
    use portcullis_table::Table;

    /// `examples/tables.json` is what docs/proxy.md walks through: keep it loading and deciding as documented.
    #[test]
    fn example_table_behaves_as_documented() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.json");
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.contains("demo-key-123"), "only digests in the file");
        let t = Table::from_json(&text, path).unwrap();
        let c = CompiledTable::compile(&t, None, FakeRelativeClock::default()).unwrap();
        let d = |key: &str, addr: &str, method: &str, path: &str| {
            let f = RequestFacts {
                addr: addr.parse().unwrap(),
                method,
                path,
                key: Some(key.as_bytes()),
                cert: None,
                now: jiff::Timestamp::now(),
            };
            decide(Some(&c), &f).reason()
        };
        assert_eq!(d("demo-key-123", "127.0.0.1", "GET", "/anything"), None);
        assert_eq!(d("demo-key-123", "127.0.0.2", "GET", "/"), Some(Reason::SourceNotAllowed));
        assert_eq!(d("wrong", "127.0.0.1", "GET", "/"), Some(Reason::InvalidKey));
        assert_eq!(d("partner-key-456", "127.0.0.2", "GET", "/v1/items"), None);
        assert_eq!(d("partner-key-456", "127.0.0.2", "POST", "/v1/items"), Some(Reason::RouteNotAllowed));
        assert_eq!(d("partner-key-456", "127.0.0.1", "GET", "/v1/items"), Some(Reason::SourceNotAllowed));
        assert_eq!(d("disabled-key-789", "127.0.0.1", "GET", "/"), Some(Reason::ClientDisabled));
        // burst 10: 9 more pass, then 429.
        for _ in 0..9 {
            assert_eq!(d("demo-key-123", "127.0.0.1", "GET", "/"), None);
        }
        assert_eq!(d("demo-key-123", "127.0.0.1", "GET", "/"), Some(Reason::RateLimited));
    }
}
