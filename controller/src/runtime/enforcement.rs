//! Asking the sidecars which revision they serve (`GET /revision` on each running injected pod's IP and admin
//! port), for the `Enforced` condition ([`crate::enforcement`]).
//!
//! One task per protected Service, woken when its table is (re)confirmed or its pods change (both reach it through
//! the table writer), asks every sidecar not yet confirmed on the current revision: at most
//! [`Settings::concurrency`] requests in flight over all Services, each bounded by [`Settings::timeout`], and
//! retried with exponential backoff ([`Settings::retry_delay`]) until every sidecar serves the revision. A pod
//! confirmed on a revision is not asked again for it until its Pod object changes (a restarted container changes
//! its status) or [`Settings::resync`]. When what the sidecars say
//! changes, the UsagePlans and ApiClients concerned get their status rewritten. Sidecars need no permission for
//! this and the controller no more than reading Pods; the NetworkPolicy admits the controller to the admin port.
//!
//! Cost at 1 000 pods of one Service: one small HTTP/1.1 request per pod per revision (plus a re-ask of the
//! laggards at 0.1, 0.2, 0.4 … s), 32 in flight; measured: 1 000 requests and `Enforced=True` 0.4–0.5 s after the
//! sidecars serve a revision (`docs/ingress.md`, the ignored test `enforced_at_1000_pods`).

use super::caches::in_namespace;
use super::rendered::Introduced;
use super::tables::{Generations, ServiceKey};
use super::{Ctx, FIELD_MANAGER};
use crate::conditions::Cond;
use crate::enforcement::{
    HISTORY, PodState, ServiceReport, Settings, Target, condition_seen, service_verdict, targets,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use kube::runtime::reflector::ObjectRef;
use portcullis_table::sidecar::{REVISION_PATH, RevisionReport};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc};

/// Largest `/revision` answer read.
const MAX_ANSWER_BYTES: usize = 4096;
/// Quiet time after a wake-up before asking (pod events come in bursts during a rollout).
const SETTLE: Duration = Duration::from_millis(50);

/// The last report of each Service, when each client's current generation entered its table, and the wake-up
/// channel of the prober.
pub struct Enforcement {
    settings: Settings,
    reports: RwLock<HashMap<ServiceKey, ServiceReport>>,
    introduced: RwLock<HashMap<ServiceKey, Introduced>>,
    tx: mpsc::UnboundedSender<ServiceKey>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<ServiceKey>>>,
}

impl Enforcement {
    pub fn new(settings: Settings) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            settings,
            reports: RwLock::new(HashMap::new()),
            introduced: RwLock::new(HashMap::new()),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Asks the sidecars of `key` again (its table was written or confirmed, or its pods changed).
    pub fn request(&self, key: &ServiceKey) {
        let _ = self.tx.send(key.clone());
    }

    /// `Enforced` of a UsagePlan concerned with `services` of namespace `ns`, of which `unprogrammed` are not yet
    /// in a written table: every sidecar serves the current revision.
    pub fn condition(&self, ctx: &Ctx, ns: &str, services: &[String], unprogrammed: &[String]) -> Cond {
        self.condition_with(ctx, ns, services, unprogrammed, false, |_, current| Some((current.to_string(), false)))
    }

    /// `Enforced` of ApiClient `name` at `generation`: every sidecar serves the revision its generation entered
    /// the table in, or a later one.
    pub fn client_condition(
        &self,
        ctx: &Ctx,
        ns: &str,
        name: &str,
        generation: i64,
        services: &[String],
        unprogrammed: &[String],
    ) -> Cond {
        let introduced = self.introduced.read().expect("introduced lock");
        self.condition_with(ctx, ns, services, unprogrammed, true, |key, current| {
            match introduced.get(key).and_then(|m| m.get(name)) {
                Some((g, rev)) if g == generation => Some((rev.to_string(), true)),
                // Not yet recorded by the prober: the current revision, until it is.
                _ => Some((current.to_string(), false)),
            }
        })
    }

    fn condition_with(
        &self,
        ctx: &Ctx,
        ns: &str,
        services: &[String],
        unprogrammed: &[String],
        or_newer: bool,
        needed: impl Fn(&ServiceKey, &str) -> Option<(String, bool)>,
    ) -> Cond {
        let state = ctx.state.read().expect("state lock");
        let reports = self.reports.read().expect("reports lock");
        let rows: Vec<(String, Option<String>, Option<ServiceReport>, bool)> = services
            .iter()
            .map(|s| {
                let key = ServiceKey { namespace: ns.to_string(), name: s.clone() };
                let current = state.get(&key).filter(|_| !unprogrammed.contains(s)).map(|st| st.revision.clone());
                let need = current.and_then(|c| needed(&key, &c));
                let seen = need.as_ref().is_some_and(|(_, seen)| *seen);
                (s.clone(), need.map(|(r, _)| r), reports.get(&key).cloned(), seen)
            })
            .collect();
        condition_seen(&rows, or_newer)
    }

    /// Records which clients' current generation entered the table in `revision`; returns those that changed.
    fn record_revision(&self, ctx: &Ctx, key: &ServiceKey, revision: &str) -> Vec<String> {
        // Shared with the state, not copied (a table and one generation per client).
        let clients: Generations =
            ctx.state.read().expect("state lock").get(key).map(|st| st.clients.clone()).unwrap_or_default();
        self.introduced.write().expect("introduced lock").entry(key.clone()).or_default().record(&clients, revision)
    }

    /// Stores `report`; when it changes, rewrites the status of the plans granting the Service and of the clients
    /// whose verdict it changes (clients are grouped by the revision they need, so a new revision rewrites the
    /// clients it changed, not all of them), plus `changed_clients`.
    fn publish(&self, ctx: &Ctx, key: &ServiceKey, report: Option<ServiceReport>, changed_clients: Vec<String>) {
        let old = {
            let mut reports = self.reports.write().expect("reports lock");
            match &report {
                Some(r) => reports.insert(key.clone(), r.clone()),
                None => reports.remove(key),
            }
        };
        let mut notify: HashSet<String> = changed_clients.into_iter().collect();
        if old != report {
            // UsagePlans: through the table writer (one writer of their status), without re-deciding the table.
            tracing::debug!(service = %key.name, "plan status requested");
            let _ = ctx.plan_status_tx.send(key.clone());
            let introduced = self.introduced.read().expect("introduced lock");
            if let Some(introduced) = introduced.get(key) {
                let flipped: Vec<&str> = introduced
                    .revisions()
                    .into_iter()
                    .filter(|rev| {
                        service_verdict(&key.name, Some(rev), old.as_ref())
                            != service_verdict(&key.name, Some(rev), report.as_ref())
                    })
                    .collect();
                if !flipped.is_empty() {
                    notify.extend(introduced.entered_in(&flipped));
                }
            }
        }
        for c in notify {
            let _ = ctx.client_tx.send(ObjectRef::new(&c).within(&key.namespace));
        }
    }
}

/// Runs until the channel closes: one task per Service, all sharing one request budget. Dropping it (the leader
/// stopping) stops them all.
pub async fn run(ctx: Arc<Ctx>) {
    let Some(mut rx) = ctx.enforcement.rx.lock().expect("rx lock").take() else { return };
    let budget = Arc::new(Semaphore::new(ctx.enforcement.settings.concurrency.max(1)));
    let mut services: HashMap<ServiceKey, (Arc<Notify>, tokio::task::AbortHandle)> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(key) = rx.recv().await {
        while tasks.try_join_next().is_some() {}
        services.retain(|_, (_, h)| !h.is_finished());
        match services.get(&key) {
            Some((wake, _)) => wake.notify_one(),
            None => {
                let wake = Arc::new(Notify::new());
                let h = tasks.spawn(watch_service(ctx.clone(), key.clone(), wake.clone(), budget.clone()));
                services.insert(key, (wake, h));
            }
        }
    }
}

async fn watch_service(ctx: Arc<Ctx>, key: ServiceKey, wake: Arc<Notify>, budget: Arc<Semaphore>) {
    let settings = ctx.enforcement.settings.clone();
    let qualified = format!("{}/{}", key.namespace, key.name);
    // Revision being confirmed, since when, and which (pod, address) already serve it; the revisions seen.
    let mut history: Vec<String> = Vec::new();
    let mut revision = String::new();
    let mut since = Instant::now();
    let mut confirmed: HashSet<Target> = HashSet::new();
    let mut last_full = Instant::now();
    let mut attempt = 0u32;
    loop {
        tokio::time::sleep(SETTLE).await;
        let Some(current) = ctx.state.read().expect("state lock").get(&key).map(|s| s.revision.clone()) else {
            // No plan grants the Service any more.
            ctx.enforcement.introduced.write().expect("introduced lock").remove(&key);
            ctx.enforcement.publish(&ctx, &key, None, Vec::new());
            return;
        };
        let mut changed_clients = Vec::new();
        if current != revision {
            (revision, since, attempt) = (current, Instant::now(), 0);
            confirmed.clear();
            history.retain(|r| *r != revision);
            history.push(revision.clone());
            if history.len() > HISTORY {
                history.remove(0);
            }
            changed_clients = ctx.enforcement.record_revision(&ctx, &key, &revision);
        }
        if last_full.elapsed() >= settings.resync {
            confirmed.clear();
            last_full = Instant::now();
        }
        let pods = ctx.pods.state_filter(|p| in_namespace(p, &key.namespace));
        let targets = targets(pods.iter().map(|p| &**p), &key.name, &ctx.sidecar_ports);
        confirmed.retain(|t| targets.contains(t));
        let asked = ask_all(&targets, &confirmed, &qualified, &revision, &budget, settings.timeout).await;
        let mut states = Vec::with_capacity(targets.len());
        for (t, state) in targets.iter().zip(asked) {
            if state == PodState::Serving {
                confirmed.insert(t.clone());
            }
            states.push((t.pod.clone(), state));
        }
        let settled = since.elapsed() >= settings.grace;
        let report = ServiceReport { revision: revision.clone(), history: history.clone(), pods: states, settled };
        let done = report.all_serving();
        ctx.enforcement.publish(&ctx, &key, Some(report), changed_clients);
        let wait = if done {
            settings.resync
        } else {
            let retry = settings.retry_delay(attempt);
            attempt = attempt.saturating_add(1);
            // Wake up when the grace period ends, so Pending turns into what is wrong.
            let grace_left = settings.grace.saturating_sub(since.elapsed());
            if settled { retry } else { retry.min(grace_left.max(SETTLE)) }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// States of `targets`, in order: confirmed ones are not asked again.
async fn ask_all(
    targets: &[Target],
    confirmed: &HashSet<Target>,
    service: &str,
    revision: &str,
    budget: &Semaphore,
    timeout: Duration,
) -> Vec<PodState> {
    let asks = targets.iter().map(|t| async move {
        if confirmed.contains(t) {
            return PodState::Serving;
        }
        let Some(addr) = t.addr else { return PodState::NoSidecar };
        let _permit = budget.acquire().await.expect("the budget is never closed");
        match tokio::time::timeout(timeout, ask(addr)).await {
            Err(_) => PodState::Unreachable(format!("no answer from {addr} within {timeout:?}")),
            Ok(Err(e)) => PodState::Unreachable(e),
            Ok(Ok(report)) => PodState::from_report(&report, &t.pod, service, revision),
        }
    });
    futures::future::join_all(asks).await
}

/// One `GET /revision` to a sidecar's admin port.
async fn ask(addr: SocketAddr) -> Result<RevisionReport, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP to {addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(REVISION_PATH)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, FIELD_MANAGER)
        .body(Empty::<Bytes>::new())
        .expect("a static request is valid");
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| format!("HTTP to {addr}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {addr}: {e}"))?
            .to_bytes();
        // 200 with a table, 503 before the first one: both carry the report.
        serde_json::from_slice::<RevisionReport>(&body).map_err(|_| {
            format!("{addr}{REVISION_PATH} answered {status} without a revision report (a sidecar image without it?)")
        })
    }
    .await;
    conn.abort();
    result
}
