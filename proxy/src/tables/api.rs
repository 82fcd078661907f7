//! `--tables-from configmap/NS/NAME`: the table watch on kube's client API (list + watch of the one index
//! ConfigMap by `metadata.name` field selector, get of its shards by name — so RBAC `resourceNames` suffices).
//!
//! One visible loop: [`IndexWatch`] decides, this module only performs the requests it asks for and feeds the
//! answers back. No `kube::runtime`: every event type, error and relist is handled here.

use super::TableStore;
use super::index_watch::{Effect, Failure, IndexObject, IndexWatch, Input, LoadOutcome, Request};
use crate::decision::CompiledTable;
use crate::decision::compiled::{Part, ShardInput};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use portcullis_table::Chain;
use portcullis_table::TableError;
use portcullis_table::naming::{INDEX_DATA_KEY, SHARD_DATA_KEY};
use portcullis_table::sequence::Verdict;
use portcullis_table::shard::{IndexDoc, assemble, check_shard};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest wait for the answer to one list, get or watch request (kube's client has no read timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than its `timeoutSeconds` a watch may stay silent before it is considered dead.
const WATCH_GRACE: Duration = Duration::from_secs(15);
/// How often an incomplete revision (a shard missing or not matching) is tried again while nothing changes.
const RETRY_PENDING: Duration = Duration::from_secs(3);
/// Attempts for a revision whose shards do not (yet) match the index, and the first backoff (doubling).
const SHARD_ATTEMPTS: u32 = 4;
const SHARD_BACKOFF: Duration = Duration::from_millis(100);
/// Shard reads of one revision in flight at once.
const SHARD_READS_IN_FLIGHT: usize = 4;

/// Watches the index ConfigMap `name` until `stop` flips, keeping `store` in step with it (see
/// [`super::index_watch`] for what each answer does). `rewatch`: the watch's `timeoutSeconds` — the stream is
/// re-established that often, and each new watch request is authorised afresh, so a lost permission is noticed
/// within about that time even when nothing changes (at least 1 s, whole seconds).
pub async fn watch_configmap(
    store: Arc<TableStore>,
    client: kube::Client,
    namespace: String,
    name: String,
    rewatch: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let what = format!("ConfigMap {namespace}/{name}");
    let selector = format!("metadata.name={name}");
    let lp = ListParams::default().fields(&selector);
    let timeout_secs = u32::try_from(rewatch.as_secs().max(1)).unwrap_or(u32::MAX);
    let wp = WatchParams::default().fields(&selector).timeout(timeout_secs);
    let idle = Duration::from_secs(u64::from(timeout_secs)) + WATCH_GRACE;
    let mut machine = IndexWatch::new();
    let driver = Driver { store: &store, api: &api, client: &client, what: &what, unreachable_at: Default::default() };
    let mut retry_at: Option<tokio::time::Instant> = None;

    loop {
        let Some((request, delay)) = machine.next_request() else { unreachable!("no stream is open between requests") };
        if !delay.is_zero() && until_stopped(&mut stop, tokio::time::sleep(jitter(delay))).await.is_none() {
            return;
        }
        match request {
            Request::List => {
                let Some(answer) = until_stopped(&mut stop, timed(api.list(&lp))).await else { return };
                let input = match answer {
                    Ok(list) => Input::Listed {
                        resource_version: list.metadata.resource_version.clone().unwrap_or_default(),
                        index: list.items.into_iter().find(|cm| cm.metadata.name.as_deref() == Some(&name)).map(object),
                    },
                    Err(f) => Input::Failed(f),
                };
                driver.drive(&mut machine, input).await;
            }
            Request::Watch { resource_version } => {
                let Some(answer) = until_stopped(&mut stop, timed(api.watch(&wp, &resource_version))).await else {
                    return;
                };
                let stream = match answer {
                    Ok(s) => s,
                    Err(f) => {
                        driver.drive(&mut machine, Input::Failed(f)).await;
                        continue;
                    }
                };
                driver.drive(&mut machine, Input::WatchOpened).await;
                let mut stream = std::pin::pin!(stream);
                while machine.is_streaming() {
                    // An absolute deadline: events (bookmarks, re-watches) must not keep postponing the retry.
                    retry_at = match (machine.pending(), retry_at) {
                        (None, _) => None,
                        (Some(_), None) => Some(tokio::time::Instant::now() + RETRY_PENDING),
                        (Some(_), at) => at,
                    };
                    let retry = async move {
                        match retry_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    use futures::StreamExt;
                    let input = tokio::select! {
                        ev = tokio::time::timeout(idle, stream.next()) => match ev {
                            Err(_) => Input::Failed(Failure::Transient(format!("watch silent for {idle:?}"))),
                            Ok(None) => Input::WatchEnded,
                            Ok(Some(Ok(ev))) => event(ev),
                            Ok(Some(Err(e))) => Input::Failed(classify(&e)),
                        },
                        _ = retry => {
                            retry_at = None;
                            Input::RetryPending
                        }
                        _ = stop.changed() => return,
                    };
                    driver.drive(&mut machine, input).await;
                }
            }
        }
    }
}

/// Runs `f` unless `stop` flips first (`None`).
async fn until_stopped<T>(stop: &mut watch::Receiver<bool>, f: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        v = f => Some(v),
        _ = stop.changed() => None,
    }
}

/// One request with [`REQUEST_TIMEOUT`], its error classified.
async fn timed<T>(f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Failure> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| classify(&e)),
        Err(_) => Err(Failure::Transient(format!("no answer within {REQUEST_TIMEOUT:?}"))),
    }
}

/// 50–100 % of `d`, so sidecars that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::time::Instant::now()) % 1000;
    d.mul_f64(0.5 + r as f64 / 2000.0)
}

fn object(cm: ConfigMap) -> IndexObject {
    let index = match cm.data.as_ref().and_then(|d| d.get(INDEX_DATA_KEY)) {
        Some(json) => IndexDoc::parse(json, "index").map_err(|e| e.to_string()),
        None => Err(format!("the ConfigMap has no {INDEX_DATA_KEY:?} data key")),
    };
    IndexObject {
        uid: cm.metadata.uid.unwrap_or_default(),
        resource_version: cm.metadata.resource_version.unwrap_or_default(),
        index,
    }
}

fn event(ev: WatchEvent<ConfigMap>) -> Input {
    match ev {
        WatchEvent::Added(cm) | WatchEvent::Modified(cm) => Input::Changed(object(cm)),
        WatchEvent::Deleted(cm) => Input::Deleted {
            uid: cm.metadata.uid.unwrap_or_default(),
            resource_version: cm.metadata.resource_version.unwrap_or_default(),
        },
        WatchEvent::Bookmark(b) => Input::Bookmark { resource_version: b.metadata.resource_version },
        WatchEvent::Error(status) => Input::Failed(classify_status(status.code, &status.message)),
    }
}

/// The one place that decides what an API error means: 401/403/404 are about access and revoke, 410 relists,
/// everything else (connection errors, timeouts, 5xx, 429, bad responses) is transient and keeps the table.
pub fn classify(e: &kube::Error) -> Failure {
    match e {
        kube::Error::Api(s) => classify_status(s.code, &s.message),
        other => Failure::Transient(other.to_string()),
    }
}

fn classify_status(code: u16, message: &str) -> Failure {
    let detail = || format!("{code}: {message}");
    match code {
        401 => Failure::Unauthorized(detail()),
        403 => Failure::Forbidden(detail()),
        404 => Failure::NotFound(detail()),
        410 => Failure::Gone,
        _ => Failure::Transient(detail()),
    }
}

struct Driver<'a> {
    store: &'a Arc<TableStore>,
    api: &'a Api<ConfigMap>,
    client: &'a kube::Client,
    what: &'a str,
    /// When the API server last could not be reached (a transient failure of our own requests; denials that were
    /// not believed do not count).
    unreachable_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How long after the API server was last unreachable a 401/403 is not believed (retried with backoff instead):
/// a restarted kube-apiserver may deny what RBAC allows for seconds, even once its `/readyz` says 200 (seen in
/// `faults::api_server_and_etcd_down_under_load`: 403 "cannot watch configmaps" with `/readyz` ready).
/// A RoleBinding really removed right after an outage is believed this much later.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(10);

/// Longest wait for the API server's `/readyz` when a denial is to be confirmed.
const READYZ_TIMEOUT: Duration = Duration::from_secs(3);

/// What the API server's `/readyz` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerReadiness {
    /// 200: its authenticator and authorizer work from synced caches; a 401/403 from it means what it says.
    Ready,
    /// 5xx (a check failing, e.g. `informer-sync` right after a restart), or no answer at all.
    NotReady(String),
    /// Anything else (e.g. `/readyz` itself forbidden): nothing learnt; the denial is believed.
    Unknown(String),
}

/// A 401/403 revokes the table only when the API server that answered it is ready and has been reachable for
/// [`RECOVERY_WINDOW`] (`recovering`: it was not). Right after kube-apiserver (re)starts it serves requests before
/// its caches are synced, and its RBAC authorizer denies what RBAC allows: the faults tests saw a sidecar refuse
/// every request for 2–4 s after etcd and the API server came back from an outage, once with `/readyz` already
/// answering 200. `/readyz` is exempt from authorization (`--authorization-always-allow-paths`), so any token may
/// ask it.
pub fn confirm_denial(failure: Failure, readiness: &ServerReadiness, recovering: bool) -> Failure {
    match (failure, readiness) {
        (Failure::Forbidden(d) | Failure::Unauthorized(d), ServerReadiness::NotReady(why)) => {
            Failure::Transient(format!("denied ({d}) by an API server that is not ready ({why}): not believed"))
        }
        (Failure::Forbidden(d) | Failure::Unauthorized(d), _) if recovering => Failure::Transient(format!(
            "denied ({d}) by an API server unreachable less than {RECOVERY_WINDOW:?} ago: not believed yet"
        )),
        (f, _) => f,
    }
}

async fn server_readiness(client: &kube::Client) -> ServerReadiness {
    let req = http::Request::get("/readyz").body(Vec::new()).expect("a valid request");
    match tokio::time::timeout(READYZ_TIMEOUT, client.request_text(req)).await {
        Ok(Ok(_)) => ServerReadiness::Ready,
        Ok(Err(kube::Error::Api(s))) if s.code >= 500 => {
            ServerReadiness::NotReady(format!("/readyz {}: {}", s.code, s.message.lines().last().unwrap_or_default()))
        }
        Ok(Err(kube::Error::Api(s))) => ServerReadiness::Unknown(format!("/readyz {}", s.code)),
        Ok(Err(e)) => ServerReadiness::NotReady(format!("/readyz: {e}")),
        Err(_) => ServerReadiness::NotReady(format!("/readyz: no answer within {READYZ_TIMEOUT:?}")),
    }
}

impl Driver<'_> {
    /// A 401/403 is checked against the API server's readiness before the machine sees it ([`confirm_denial`]).
    async fn confirmed(&self, input: Input) -> Input {
        let denied = |f: &Failure| matches!(f, Failure::Forbidden(_) | Failure::Unauthorized(_));
        match input {
            Input::Failed(f) if denied(&f) => {
                let readiness = server_readiness(self.client).await;
                Input::Failed(self.confirm(f, &readiness))
            }
            Input::Loaded { object, outcome: LoadOutcome::Failed(f) } if denied(&f) => {
                let readiness = server_readiness(self.client).await;
                Input::Loaded { object, outcome: LoadOutcome::Failed(self.confirm(f, &readiness)) }
            }
            other => other,
        }
    }

    fn confirm(&self, f: Failure, readiness: &ServerReadiness) -> Failure {
        let recovering =
            self.unreachable_at.lock().expect("driver lock").is_some_and(|at| at.elapsed() < RECOVERY_WINDOW);
        let confirmed = confirm_denial(f, readiness, recovering);
        if let Failure::Transient(detail) = &confirmed {
            tracing::warn!(what = %self.what, %detail, "access denial not believed; the table in force stays");
        }
        confirmed
    }

    /// Steps the machine with `input` and performs its effects (a load answers back with [`Input::Loaded`]).
    async fn drive(&self, machine: &mut IndexWatch, input: Input) {
        let mut next = Some(input);
        while let Some(input) = next.take() {
            if let Input::Failed(Failure::Transient(_))
            | Input::Loaded { outcome: LoadOutcome::Failed(Failure::Transient(_)), .. } = &input
            {
                *self.unreachable_at.lock().expect("driver lock") = Some(tokio::time::Instant::now());
            }
            let input = self.confirmed(input).await;
            if let Input::Failed(f) | Input::Loaded { outcome: LoadOutcome::Failed(f), .. } = &input {
                self.store.metrics().table_source_error(f.kind());
            }
            let effect = machine.step(input);
            self.store.metrics().table_watch_open.set(i64::from(machine.is_streaming()));
            match effect {
                Effect::Nothing => {}
                Effect::Load(object) => {
                    let started = std::time::Instant::now();
                    let outcome = self.load(&object).await;
                    if outcome == LoadOutcome::Applied {
                        self.store.metrics().table_load.observe(started.elapsed().as_secs_f64());
                    }
                    next = Some(Input::Loaded { object, outcome });
                }
                Effect::Revoke { cause, detail } => {
                    self.store.revoke(cause, &format!("{}: {detail}", self.what));
                }
                Effect::Keep { kind, detail } => {
                    tracing::warn!(what = %self.what, kind, %detail, "table source unavailable; the table in force stays");
                }
                Effect::Reject { detail } => {
                    self.store.metrics().table_rejected("configmap");
                    tracing::error!(what = %self.what, %detail, "index revision refused; the table in force stays");
                }
                Effect::OutOfOrder { verdict, candidate, applied } => {
                    self.store.metrics().tables_out_of_order.inc();
                    let why = match verdict {
                        Verdict::Conflict => "same sequence, other content (two writers)",
                        _ => "older than the revision applied, or of a deleted index",
                    };
                    tracing::error!(what = %self.what, why, ?candidate, ?applied,
                        "index revision refused: a proxy never goes back; the table in force stays");
                }
            }
        }
    }

    /// Fetches the shards `object`'s index names (by name, with `get`), checks them and applies the table. A shard
    /// missing or not matching its digest is usually one being written right now: retried with backoff, then the
    /// revision is incomplete.
    async fn load(&self, object: &IndexObject) -> LoadOutcome {
        let Ok(index) = &object.index else { return LoadOutcome::Invalid("unparsed index".into()) };
        // Stable layout: the parts the table in force can lend (decided once: the table in force only changes here).
        let keep: Option<Vec<Option<Arc<Part>>>> = (index.is_stable() && !index.is_deny_all()).then(|| {
            let current = self.store.current.load_full();
            (0..index.shards.len()).map(|i| current.as_ref().and_then(|c| c.reusable_part(index, i))).collect()
        });
        let mut backoff = SHARD_BACKOFF;
        for attempt in 1..=SHARD_ATTEMPTS {
            let read = match &keep {
                Some(keep) => self.read_stable(index, keep).await,
                None => self.read_whole(index).await,
            };
            match read {
                Ok(apply) => return self.apply(apply).await,
                Err(ReadError::Failed(f)) => return LoadOutcome::Failed(f),
                Err(ReadError::Table(e @ TableError::Shard { .. })) if attempt < SHARD_ATTEMPTS => {
                    tracing::debug!(what = %self.what, attempt, error = %e, "revision incomplete; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(ReadError::Table(e @ TableError::Shard { .. })) => return LoadOutcome::Incomplete(e.to_string()),
                Err(ReadError::Table(e)) => return LoadOutcome::Invalid(e.to_string()),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The data strings of the shards `names`, in order (`None`: not found), a few reads in flight (one after
    /// another they dominated a 100 000-client load).
    async fn fetch(&self, names: Vec<&str>) -> Result<Vec<Option<String>>, Failure> {
        use futures::{StreamExt, TryStreamExt};
        let reads: Vec<_> = names.into_iter().map(|name| timed(self.api.get_opt(name))).collect();
        let cms: Vec<Option<ConfigMap>> =
            futures::stream::iter(reads).buffered(SHARD_READS_IN_FLIGHT).try_collect().await?;
        Ok(cms.into_iter().map(|cm| cm.and_then(|c| c.data).and_then(|mut d| d.remove(SHARD_DATA_KEY))).collect())
    }

    /// Schema 1 (or deny-all): every shard, assembled and validated as one table.
    async fn read_whole(&self, index: &IndexDoc) -> Result<Apply, ReadError> {
        let shards = self.fetch(index.shards.iter().map(|r| r.name.as_str()).collect()).await?;
        let refs: Vec<Option<&str>> = shards.iter().map(|s| s.as_deref()).collect();
        let table = assemble(index, &refs)?;
        // The shards' text goes before the compiled table is built (it would add to the swap's peak).
        drop(refs);
        drop(shards);
        let (what, sequence) = (self.what.to_string(), index.sequence);
        Ok(Box::new(move |store: &TableStore| store.apply_owned(table, &what, Some(sequence))))
    }

    /// Stable layout: only the shards not in `keep` are read (each checked on its own: [`check_shard`]) and
    /// compiled; the others are shared with the table in force.
    async fn read_stable(&self, index: &IndexDoc, keep: &[Option<Arc<Part>>]) -> Result<Apply, ReadError> {
        let wanted: Vec<usize> = (0..index.shards.len()).filter(|i| keep[*i].is_none()).collect();
        let texts = self.fetch(wanted.iter().map(|i| index.shards[*i].name.as_str()).collect()).await?;
        let mut read = std::collections::HashMap::with_capacity(wanted.len());
        // Each shard's text goes as soon as it is parsed.
        for (i, text) in wanted.iter().zip(texts) {
            read.insert(*i, check_shard(index, *i, text.as_deref())?);
        }
        self.store.metrics().table_shards_read(read.len(), index.shards.len() - read.len());
        let inputs: Vec<ShardInput> = keep
            .iter()
            .enumerate()
            .map(|(i, kept)| match kept {
                Some(part) => ShardInput::Keep(part.clone()),
                None => ShardInput::New {
                    digest: index.shards[i].sha256.clone(),
                    clients: read.remove(&i).expect("every shard not kept was read"),
                },
            })
            .collect();
        let (what, index) = (self.what.to_string(), index.clone());
        Ok(Box::new(move |store: &TableStore| {
            store.apply_with(&index.service, &index.revision, &what, Some(index.sequence), |prev, clock| {
                CompiledTable::compile_stable(&index, inputs, prev, clock)
            })
        }))
    }

    /// Compiles and swaps in off the async threads; the freed memory goes back to the system after that, off the
    /// path of this revision (and of the next one: it does not wait for it).
    async fn apply(&self, apply: Apply) -> LoadOutcome {
        let store = self.store.clone();
        let applied = tokio::task::spawn_blocking(move || apply(&store)).await.expect("table loading does not panic");
        crate::heap::release_free_memory_soon();
        match applied {
            Ok(_) => LoadOutcome::Applied,
            Err(e) => LoadOutcome::Invalid(Chain(&e).to_string()),
        }
    }
}

/// A revision read and checked, ready to be compiled and swapped in.
type Apply = Box<dyn FnOnce(&TableStore) -> Result<bool, super::store::LoadError> + Send>;

/// Why reading a revision's shards failed: the API request, or the shards themselves.
enum ReadError {
    Failed(Failure),
    Table(TableError),
}

impl From<Failure> for ReadError {
    fn from(f: Failure) -> Self {
        Self::Failed(f)
    }
}

impl From<TableError> for ReadError {
    fn from(e: TableError) -> Self {
        Self::Table(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    #[test]
    fn api_errors_are_classified_by_what_they_say_about_access() {
        let api = |code| kube::Error::Api(Status::failure("m", "r").with_code(code).boxed());
        assert!(matches!(classify(&api(403)), Failure::Forbidden(_)));
        assert!(matches!(classify(&api(401)), Failure::Unauthorized(_)));
        assert!(matches!(classify(&api(404)), Failure::NotFound(_)));
        assert_eq!(classify(&api(410)), Failure::Gone);
        for code in [500, 503, 504, 429, 400, 0] {
            assert!(matches!(classify(&api(code)), Failure::Transient(_)), "{code}");
        }
        let io = kube::Error::ReadEvents(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(matches!(classify(&io), Failure::Transient(_)));
    }

    #[test]
    fn a_denial_from_an_api_server_that_is_not_ready_is_not_believed() {
        let not_ready = ServerReadiness::NotReady("/readyz 500: readyz check failed".into());
        let ready = ServerReadiness::Ready;
        let unknown = ServerReadiness::Unknown("/readyz 403".into());
        for denial in [Failure::Forbidden("403".into()), Failure::Unauthorized("401".into())] {
            assert!(matches!(confirm_denial(denial.clone(), &not_ready, false), Failure::Transient(_)), "{denial:?}");
            assert_eq!(confirm_denial(denial.clone(), &ready, false), denial);
            assert_eq!(confirm_denial(denial.clone(), &unknown, false), denial, "nothing learnt: believed");
            // Ready, but unreachable moments ago: not believed yet, whatever /readyz says.
            assert!(matches!(confirm_denial(denial.clone(), &ready, true), Failure::Transient(_)), "{denial:?}");
            assert!(matches!(confirm_denial(denial.clone(), &unknown, true), Failure::Transient(_)), "{denial:?}");
        }
        for other in [Failure::NotFound("404".into()), Failure::Gone, Failure::Transient("x".into())] {
            assert_eq!(confirm_denial(other.clone(), &not_ready, true), other);
        }
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000), "{d:?}");
        }
    }
}
