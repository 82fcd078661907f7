//! `Enforced`: what the sidecars say they serve, as a condition. Pure: no I/O (the asking is in
//! `runtime::enforcement`).
//!
//! `Programmed` means a revision is written; `Enforced` means every running replica serves it. For each protected
//! Service the controller asks the sidecar of every running injected pod (`GET /revision` on the pod IP and the
//! sidecar's admin port, [`portcullis_table::sidecar::RevisionReport`]) and compares the answer with the revision
//! it wrote. A plan or client is `Enforced=True` when, for every Service concerned, it is in the current table and
//! every running injected pod serves that revision — `"3/3 sidecars serve revision 1f0c…"`. Otherwise `False`,
//! naming the pods that are behind, have no table, cannot be reached or run no sidecar. A Service with no running
//! injected pod is not enforced by anyone: `False`, `NoSidecars`.
//!
//! Sidecars need a moment to pick a revision up (≈ 0.2 s), so for [`Settings::grace`] after a revision appears the
//! reason is `Pending` (no Warning Event); after that it says what is wrong.

use crate::conditions::{Cond, types};
use crate::network_policy::SidecarPorts;
use crate::webhook::inject::{ANNOTATION_SERVICE, CONTAINER_NAME};
use k8s_openapi::api::core::v1::Pod;
use portcullis_table::sidecar::RevisionReport;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub mod reason {
    pub const ENFORCED: &str = "Enforced";
    /// Not yet known: the table is being written, or sidecars are being asked (within the grace period).
    pub const PENDING: &str = crate::conditions::reason::PENDING;
    pub const NO_SERVICES: &str = crate::conditions::reason::NO_SERVICES;
    /// No running pod of the Service carries the sidecar.
    pub const NO_SIDECARS: &str = "NoSidecars";
    /// Some sidecar serves another revision, or none.
    pub const SIDECARS_BEHIND: &str = "SidecarsBehind";
    /// Some sidecar could not be asked (or is not one: no sidecar container, another pod at that IP).
    pub const SIDECARS_UNREACHABLE: &str = "SidecarsUnreachable";
}

/// How the sidecars are asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Requests in flight at once, over all Services.
    pub concurrency: usize,
    /// Bound on one request (connect + answer).
    pub timeout: Duration,
    /// How long after a revision appears a lagging sidecar is reported as `Pending` rather than a problem.
    pub grace: Duration,
    /// First retry delay for sidecars not yet serving the revision; doubled up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Sidecars confirmed on the current revision are asked again this often (a container restart in place is
    /// not a pod event).
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            timeout: Duration::from_secs(2),
            grace: Duration::from_secs(10),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            resync: Duration::from_secs(300),
        }
    }
}

impl Settings {
    /// Delay before retry number `attempt` (0-based) of sidecars not yet confirmed.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        self.backoff.saturating_mul(1u32 << attempt.min(16)).min(self.max_backoff)
    }
}

/// A sidecar to ask: pod name, and where (`None`: the pod runs no sidecar, or has no IP yet). `version` is the
/// Pod's resourceVersion: a confirmation holds for one version of the Pod (a restarted container changes it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub pod: String,
    pub addr: Option<SocketAddr>,
    pub version: String,
}

/// The running, not terminating, injected pods of Service `service` among `pods` (one namespace), with the address
/// of their sidecar's admin port (the port the pod declares, else `default_ports.admin`).
pub fn targets<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    service: &str,
    default_ports: &SidecarPorts,
) -> Vec<Target> {
    let mut out: Vec<Target> = pods
        .into_iter()
        .filter(|p| {
            p.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_SERVICE)).map(String::as_str) == Some(service)
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| {
            let has_sidecar = p.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == CONTAINER_NAME));
            let ip: Option<IpAddr> = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok());
            let port = u16::try_from(SidecarPorts::of(p, default_ports).admin).ok();
            let addr = match (has_sidecar, ip, port) {
                (true, Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
                _ => None,
            };
            Target {
                pod: p.metadata.name.clone().unwrap_or_default(),
                addr,
                version: p.metadata.resource_version.clone().unwrap_or_default(),
            }
        })
        .collect();
    out.sort();
    out
}

/// What one sidecar said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    Serving,
    /// Serves another revision.
    Behind(String),
    /// Has loaded no table yet.
    NoTable,
    /// The pod runs no `portcullis-proxy` container, or has no pod IP.
    NoSidecar,
    /// Could not be asked, or answered something that is not a report about this pod and Service.
    Unreachable(String),
    /// Not asked yet.
    Unknown,
}

impl PodState {
    /// Judges `answer` from the sidecar of `pod` for Service `namespace/service` against `revision`.
    pub fn from_report(answer: &RevisionReport, pod: &str, qualified_service: &str, revision: &str) -> PodState {
        if let Some(p) = answer.pod.as_deref().filter(|p| *p != pod) {
            return PodState::Unreachable(format!("its IP answers for pod {p}"));
        }
        match (&answer.service, &answer.revision) {
            (_, None) => PodState::NoTable,
            (Some(s), Some(_)) if s != qualified_service => {
                PodState::Unreachable(format!("its sidecar serves the table of {s}"))
            }
            (_, Some(r)) if r == revision => PodState::Serving,
            (_, Some(r)) => PodState::Behind(r.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            PodState::Serving => "serves it".into(),
            PodState::Behind(r) => format!("serves revision {}", short(r)),
            PodState::NoTable => "has no table loaded".into(),
            PodState::NoSidecar => "runs no portcullis-proxy sidecar (or has no pod IP)".into(),
            PodState::Unreachable(e) => format!("unreachable: {e}"),
            PodState::Unknown => "not asked yet".into(),
        }
    }
}

/// The last answers of one Service's sidecars about `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceReport {
    pub revision: String,
    /// Revisions of the Service in the order this controller saw them, oldest first, ending with `revision`
    /// (at most [`HISTORY`]): "newer" means later in this list.
    pub history: Vec<String>,
    /// Pod name → state, sorted by pod name.
    pub pods: Vec<(String, PodState)>,
    /// The grace period of this revision is over: laggards are problems, not `Pending`.
    pub settled: bool,
}

/// Revisions remembered per Service for "this revision or newer".
pub const HISTORY: usize = 64;

impl ServiceReport {
    pub fn serving(&self) -> usize {
        self.pods.iter().filter(|(_, s)| *s == PodState::Serving).count()
    }

    pub fn all_serving(&self) -> bool {
        !self.pods.is_empty() && self.serving() == self.pods.len()
    }

    fn rank(&self, revision: &str) -> Option<usize> {
        self.history.iter().rposition(|r| r == revision)
    }

    /// Whether a pod in `state` serves revision rank `needed` or a later one.
    fn satisfies(&self, state: &PodState, needed: usize) -> bool {
        match state {
            PodState::Serving => true,
            PodState::Behind(r) => self.rank(r).is_some_and(|have| have >= needed),
            _ => false,
        }
    }
}

/// Shown revisions are cut to 12 hex digits, like the key fingerprints.
fn short(revision: &str) -> &str {
    revision.get(..12).unwrap_or(revision)
}

/// The state of one Service for `Enforced`. `needed`: the revision that first held the object as it is now
/// (`None`: not in a written table yet); a sidecar serving it or a later one enforces the object. `seen`: the prober
/// has seen `needed` (it recorded it for the object), so when the report's history (the last [`HISTORY`]
/// revisions) no longer holds it, it is older than all of them and any of them satisfies it. Without that, every
/// object whose revision was pushed out of the history flipped to `Pending` (and had its status rewritten) one
/// revision after another, though its sidecars serve a later revision.
fn service_cond(
    service: &str,
    needed: Option<&str>,
    report: Option<&ServiceReport>,
    or_newer: bool,
    seen: bool,
) -> (bool, &'static str, String) {
    let Some(needed) = needed else {
        return (false, reason::PENDING, format!("{service}: waiting for its table to be written"));
    };
    let asking =
        || (false, reason::PENDING, format!("{service}: asking its sidecars about revision {}", short(needed)));
    let Some(report) = report else { return asking() };
    let Some(rank) = report.rank(needed).or(seen.then_some(0)) else { return asking() };
    let total = report.pods.len();
    let ok = report.pods.iter().filter(|(_, s)| report.satisfies(s, rank)).count();
    // The grace period is the newest revision's; one already superseded has had its chance (and its verdict
    // must not flip to Pending and back whenever another object's change brings a revision).
    let settled = report.settled || needed != report.revision;
    let newer = if or_newer { " or newer" } else { "" };
    let head = format!("{service}: {ok}/{total} sidecars serve revision {}{newer}", short(needed));
    if total == 0 {
        let why = if settled { reason::NO_SIDECARS } else { reason::PENDING };
        return (
            false,
            why,
            format!(
                "{service}: no running pod carries the portcullis-proxy sidecar, so nothing enforces revision {} (pods \
                 need the label portcullis.dev/inject=true and the annotation {ANNOTATION_SERVICE}: {service})",
                short(needed)
            ),
        );
    }
    if ok == total {
        return (true, reason::ENFORCED, head);
    }
    const LISTED: usize = 5;
    let laggards: Vec<&(String, PodState)> = report.pods.iter().filter(|(_, s)| !report.satisfies(s, rank)).collect();
    let mut listed: Vec<String> =
        laggards.iter().take(LISTED).map(|(p, s)| format!("pod {p} {}", s.describe())).collect();
    if laggards.len() > LISTED {
        listed.push(format!("and {} more", laggards.len() - LISTED));
    }
    let why = if !settled {
        reason::PENDING
    } else if laggards.iter().any(|(_, s)| matches!(s, PodState::Unreachable(_) | PodState::NoSidecar)) {
        reason::SIDECARS_UNREACHABLE
    } else {
        reason::SIDECARS_BEHIND
    };
    (false, why, format!("{head}; {}", listed.join(", ")))
}

/// The `Enforced` verdict of one Service for objects needing `needed` (see [`condition`]): used to tell which
/// ApiClients a new report changes anything for.
pub fn service_verdict(
    service: &str,
    needed: Option<&str>,
    report: Option<&ServiceReport>,
) -> (bool, &'static str, String) {
    // The revisions asked about here are those the prober recorded for ApiClients: seen.
    service_cond(service, needed, report, true, true)
}

/// `Enforced` of a plan or client concerned with `services`: `(service, revision that first held the object as it
/// is now, last report)`. A UsagePlan needs the current revision; an ApiClient the revision its current
/// generation entered the table in, so other clients' changes do not touch its status (`or_newer`: the message
/// says "revision X or newer", which stays true while later revisions come). The Service prefix is left out of
/// the message when there is one Service.
pub fn condition(services: &[(String, Option<String>, Option<ServiceReport>)], or_newer: bool) -> Cond {
    let rows: Vec<_> = services.iter().map(|(s, n, r)| (s.clone(), n.clone(), r.clone(), false)).collect();
    condition_seen(&rows, or_newer)
}

/// [`condition`], each Service with whether the prober has seen its needed revision (see [`service_cond`]).
pub fn condition_seen(services: &[(String, Option<String>, Option<ServiceReport>, bool)], or_newer: bool) -> Cond {
    if services.is_empty() {
        return Cond::new(types::ENFORCED, false, reason::NO_SERVICES, "no UsagePlan grants a Service");
    }
    let parts: Vec<(bool, &'static str, String)> = services
        .iter()
        .map(|(s, cur, rep, seen)| service_cond(s, cur.as_deref(), rep.as_ref(), or_newer, *seen))
        .collect();
    let strip = |m: &str| -> String {
        if services.len() == 1 {
            m.split_once(": ").map(|(_, r)| r.to_string()).unwrap_or_else(|| m.into())
        } else {
            m.into()
        }
    };
    match parts.iter().find(|(ok, _, _)| !ok) {
        None => Cond::new(
            types::ENFORCED,
            true,
            reason::ENFORCED,
            strip(&parts.iter().map(|(_, _, m)| m.as_str()).collect::<Vec<_>>().join("; ")),
        ),
        Some((_, first_reason, _)) => {
            // A real problem anywhere outranks waiting elsewhere.
            let reason = parts.iter().find(|(ok, r, _)| !ok && *r != reason::PENDING).map_or(*first_reason, |p| p.1);
            let msg: Vec<&str> = parts.iter().map(|(_, _, m)| m.as_str()).collect();
            Cond::new(types::ENFORCED, false, reason, strip(&msg.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(name: &str, service: &str, phase: &str, ip: Option<&str>, admin: Option<i32>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some([(ANNOTATION_SERVICE.to_string(), service.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: admin
                    .map(|port| Container {
                        name: CONTAINER_NAME.into(),
                        ports: Some(vec![ContainerPort {
                            name: Some("portcullis-adm".into()),
                            container_port: port,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            status: Some(PodStatus { phase: Some(phase.into()), pod_ip: ip.map(Into::into), ..Default::default() }),
        }
    }

    #[test]
    fn targets_are_the_running_injected_pods_at_their_admin_port() {
        let mut terminating = pod("d", "orders", "Running", Some("10.0.0.4"), Some(9901));
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        let pods = [
            pod("b", "orders", "Running", Some("10.0.0.2"), Some(7001)),
            pod("a", "orders", "Running", Some("10.0.0.1"), Some(9901)),
            pod("c", "orders", "Pending", None, Some(9901)),
            terminating,
            pod("e", "billing", "Running", Some("10.0.0.5"), Some(9901)),
            pod("f", "orders", "Running", Some("10.0.0.6"), None),
        ];
        let t = targets(pods.iter(), "orders", &SidecarPorts::default());
        let got: Vec<(&str, Option<String>)> =
            t.iter().map(|t| (t.pod.as_str(), t.addr.map(|a| a.to_string()))).collect();
        assert_eq!(got, [("a", Some("10.0.0.1:9901".into())), ("b", Some("10.0.0.2:7001".into())), ("f", None)]);
    }

    #[test]
    fn answers_are_judged_against_pod_service_and_revision() {
        let r = |svc: Option<&str>, rev: Option<&str>, pod: Option<&str>| RevisionReport {
            service: svc.map(Into::into),
            revision: rev.map(Into::into),
            pod: pod.map(Into::into),
        };
        let judge = |a: &RevisionReport| PodState::from_report(a, "orders-0", "shop/orders", "r2");
        assert_eq!(judge(&r(Some("shop/orders"), Some("r2"), Some("orders-0"))), PodState::Serving);
        assert_eq!(judge(&r(Some("shop/orders"), Some("r2"), None)), PodState::Serving);
        assert_eq!(judge(&r(Some("shop/orders"), Some("r1"), None)), PodState::Behind("r1".into()));
        assert_eq!(judge(&r(None, None, None)), PodState::NoTable);
        assert!(
            matches!(judge(&r(Some("shop/billing"), Some("r2"), None)), PodState::Unreachable(e) if e.contains("shop/billing"))
        );
        assert!(
            matches!(judge(&r(Some("shop/orders"), Some("r2"), Some("orders-9"))), PodState::Unreachable(e) if e.contains("orders-9"))
        );
    }

    fn report(states: &[PodState], settled: bool) -> ServiceReport {
        ServiceReport {
            revision: "0123456789abcdef".into(),
            history: vec!["fedcba9876543210".into(), "0123456789abcdef".into()],
            pods: states.iter().enumerate().map(|(i, s)| (format!("orders-{i}"), s.clone())).collect(),
            settled,
        }
    }

    fn cond(rep: Option<ServiceReport>) -> Cond {
        condition(&[("orders".into(), Some("0123456789abcdef".into()), rep)], false)
    }

    #[test]
    fn all_serving_is_enforced_with_a_count() {
        let c = cond(Some(report(&vec![PodState::Serving; 3], false)));
        assert_eq!((c.ok, c.reason), (true, "Enforced"));
        assert_eq!(c.message, "3/3 sidecars serve revision 0123456789ab");
    }

    #[test]
    fn laggards_are_pending_then_named() {
        let states = [PodState::Serving, PodState::Behind("fedcba9876543210".into()), PodState::NoTable];
        let c = cond(Some(report(&states, false)));
        assert_eq!((c.ok, c.reason), (false, "Pending"));
        let c = cond(Some(report(&states, true)));
        assert_eq!((c.ok, c.reason), (false, "SidecarsBehind"));
        assert!(c.message.starts_with("1/3 sidecars serve revision 0123456789ab; "), "{}", c.message);
        assert!(c.message.contains("pod orders-1 serves revision fedcba987654"), "{}", c.message);
        assert!(c.message.contains("pod orders-2 has no table loaded"), "{}", c.message);
        let c = cond(Some(report(&[PodState::Serving, PodState::Unreachable("connection refused".into())], true)));
        assert_eq!(c.reason, "SidecarsUnreachable");
        assert!(c.message.contains("pod orders-1 unreachable: connection refused"), "{}", c.message);
        let many = vec![PodState::NoTable; 8];
        assert!(cond(Some(report(&many, true))).message.ends_with("and 3 more"));
    }

    #[test]
    fn nothing_to_ask_or_not_asked_yet() {
        let c = cond(Some(report(&[], true)));
        assert_eq!((c.ok, c.reason), (false, "NoSidecars"));
        assert!(c.message.contains("portcullis.dev/inject=true"), "{}", c.message);
        assert_eq!(cond(Some(report(&[], false))).reason, "Pending");
        assert_eq!(cond(None).reason, "Pending");
        let mut old = report(&[PodState::Serving], true);
        (old.revision, old.history) = ("another".into(), vec!["another".into()]);
        assert_eq!(cond(Some(old)).reason, "Pending", "a report that does not know the revision says nothing");
        let c = condition(&[("orders".into(), None, None)], false);
        assert_eq!((c.ok, c.reason), (false, "Pending"));
        assert!(c.message.contains("table"));
        assert_eq!(condition(&[], false).reason, "NoServices");
    }

    #[test]
    fn an_object_from_an_older_revision_is_enforced_by_sidecars_serving_it_or_newer() {
        // The client entered the table in the older revision; one sidecar still serves that one, one the current.
        let rep = report(&[PodState::Behind("fedcba9876543210".into()), PodState::Serving], true);
        let c = condition(&[("orders".into(), Some("fedcba9876543210".into()), Some(rep.clone()))], true);
        assert_eq!((c.ok, c.message.as_str()), (true, "2/2 sidecars serve revision fedcba987654 or newer"));
        // For the current revision the laggard counts.
        assert_eq!(cond(Some(rep.clone())).reason, "SidecarsBehind");
        // A new revision in its grace period does not turn an older object's verdict into Pending.
        let mut fresh = report(&[], false);
        fresh.pods.clear();
        let older = condition(&[("orders".into(), Some("fedcba9876543210".into()), Some(fresh))], true);
        assert_eq!(older.reason, "NoSidecars");
        // A revision not in the history is older than anything known.
        let stale = report(&[PodState::Behind("0000000000000000".into()), PodState::Serving], true);
        let c = condition(&[("orders".into(), Some("fedcba9876543210".into()), Some(stale))], true);
        assert_eq!((c.ok, c.reason), (false, "SidecarsBehind"));
    }

    #[test]
    fn a_seen_revision_pushed_out_of_the_history_is_older_than_all_of_it() {
        // The client entered the table in "0ld…", which 64 later revisions pushed out of the report's history.
        let mut rep = report(&[PodState::Serving, PodState::Behind("fedcba9876543210".into())], true);
        rep.history = (0..HISTORY).map(|i| format!("{i:016x}")).collect();
        rep.history.push("fedcba9876543210".into());
        rep.history.push("0123456789abcdef".into());
        rep.history.drain(..rep.history.len() - HISTORY);
        let old = "0ld0000000000000";
        let seen = condition_seen(&[("orders".into(), Some(old.into()), Some(rep.clone()), true)], true);
        assert_eq!((seen.ok, seen.message.as_str()), (true, "2/2 sidecars serve revision 0ld000000000 or newer"));
        assert!(service_verdict("orders", Some(old), Some(&rep)).0, "the verdict publish compares");
        // Without sidecars the verdict stays what it was while its revision was remembered (no flip to Pending).
        let mut none = rep.clone();
        none.pods.clear();
        let c = condition_seen(&[("orders".into(), Some(old.into()), Some(none.clone()), true)], true);
        assert_eq!(c.reason, "NoSidecars");
        // A sidecar serving a revision nobody remembers either is not taken for one serving it.
        let mut lost = rep.clone();
        lost.pods[1].1 = PodState::Behind("ffffffffffffffff".into());
        let c = condition_seen(&[("orders".into(), Some(old.into()), Some(lost), true)], true);
        assert_eq!((c.ok, c.reason), (false, "SidecarsBehind"));
        // A revision the prober has not seen (a client's current revision before it is recorded) is asked about.
        let unseen = condition_seen(&[("orders".into(), Some(old.into()), Some(rep), false)], true);
        assert_eq!((unseen.ok, unseen.reason), (false, "Pending"));
        assert!(unseen.message.contains("asking its sidecars about revision 0ld000000000"), "{}", unseen.message);
    }

    #[test]
    fn several_services_are_each_named_and_problems_outrank_waiting() {
        let c = condition(
            &[
                ("orders".into(), Some("0123456789abcdef".into()), Some(report(&vec![PodState::Serving; 2], true))),
                ("billing".into(), None, None),
            ],
            false,
        );
        assert_eq!(c.reason, "Pending");
        assert!(
            c.message.starts_with("orders: 2/2 sidecars") && c.message.contains("billing: waiting"),
            "{}",
            c.message
        );
        let c = condition(
            &[
                ("orders".into(), Some("0123456789abcdef".into()), Some(report(&[], true))),
                ("billing".into(), None, None),
            ],
            false,
        );
        assert_eq!(c.reason, "NoSidecars");
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        let s = Settings::default();
        assert_eq!(s.retry_delay(0), Duration::from_millis(100));
        assert_eq!(s.retry_delay(3), Duration::from_millis(800));
        assert_eq!(s.retry_delay(40), Duration::from_secs(30));
    }
}
