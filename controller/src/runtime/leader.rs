//! Leader election on a `coordination.k8s.io/v1` Lease, built so that at most one replica believes it leads.
//!
//! Three timings, checked at start ([`LeaseConfig::check`]): `retry_period < renew_deadline < duration`.
//! - The holder renews every `retry_period`. Every API call is bounded by a per-call timeout (`retry_period`):
//!   kube's client has no read timeout of its own and retries, so an unbounded renew could outlive the lease.
//! - The holder leads only until `renew_deadline` after the *start* of its last successful renewal, measured on its
//!   own monotonic clock ([`LeaderLease::is_leader`]). Past that it stops writing and [`LeaderLease::hold`]
//!   returns, whatever the API server says later (a process resumed from SIGSTOP finds its deadline long gone).
//! - A candidate judges expiry by *local observation time*: the Lease is expired once this replica has seen the
//!   same record (holder, renewTime, resourceVersion) unchanged for `duration` on its own monotonic clock. The
//!   holder's `renewTime` is never compared with the local wall clock, so clock skew between nodes cannot shorten
//!   a lease. Since the candidate saw the last renewal no earlier than the holder started it, the candidate takes
//!   over no earlier than `duration` after that start, when the holder has already stepped down (`renew_deadline
//!   < duration`), up to the difference in clock rates.
//! - Updates are `replace` with the read `resourceVersion`, so two candidates can never both take the Lease.
//!
//! Writes of tables are fenced on top of this (see `tables.rs`): the index is replaced with a resourceVersion
//! precondition and only while [`LeaderLease::is_leader`] holds.
//!
//! `kube-lease-manager` (0.12) was considered: it judges expiry from `renewTime + leaseDurationSeconds` against the
//! local wall clock, renews with a strategic-merge patch without a resourceVersion precondition, and depends on
//! kube 4 (this workspace uses kube 5), so it is not used.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use portcullis_table::Chain;
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// `leaseDurationSeconds`: how long candidates wait after the last renewal they saw.
    pub duration: Duration,
    /// How long the holder keeps leading after the start of its last successful renewal.
    pub renew_deadline: Duration,
    /// Interval between renewals and acquisition attempts; also the timeout of each API call.
    pub retry_period: Duration,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseConfigError {
    #[error(
        "leader election timings must satisfy retry period ({retry:?}) < renew deadline ({deadline:?}) < lease duration ({duration:?}), and the duration must be whole seconds of at least 1 s"
    )]
    Order { retry: Duration, deadline: Duration, duration: Duration },
}

impl LeaseConfig {
    /// Refuses timings that cannot keep one writer.
    pub fn check(&self) -> Result<(), LeaseConfigError> {
        let ok = !self.retry_period.is_zero()
            && self.retry_period < self.renew_deadline
            && self.renew_deadline < self.duration
            && self.duration.subsec_nanos() == 0;
        if ok {
            Ok(())
        } else {
            Err(LeaseConfigError::Order {
                retry: self.retry_period,
                deadline: self.renew_deadline,
                duration: self.duration,
            })
        }
    }
}

/// What this replica last saw of the Lease, and when (monotonic).
#[derive(Debug, Clone)]
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<String>),
    at: Instant,
}

#[derive(Debug, Default)]
struct Local {
    observed: Option<Observed>,
    /// While `Instant::now()` is before this, we lead.
    leading_until: Option<Instant>,
}

pub struct LeaderLease {
    api: Api<Lease>,
    cfg: LeaseConfig,
    local: Mutex<Local>,
}

/// Why one attempt did not end with us holding the Lease.
#[derive(Debug, Error)]
pub enum AttemptError {
    #[error("Lease API")]
    Kube(#[from] kube::Error),
    #[error("Lease API call timed out after {0:?}")]
    Timeout(Duration),
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Whether a Lease whose `record` this replica has seen unchanged since `observed_at` is free to take at `now`.
pub fn expired(holder: Option<&str>, observed_at: Instant, duration: Duration, now: Instant) -> bool {
    holder.is_none_or(str::is_empty) || now.saturating_duration_since(observed_at) >= duration
}

impl LeaderLease {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Self {
        Self { api: Api::namespaced(client, &cfg.namespace), cfg, local: Mutex::new(Local::default()) }
    }

    /// Whether this replica may write now: it renewed successfully less than `renew_deadline` ago.
    pub fn is_leader(&self) -> bool {
        self.local.lock().expect("lease lock").leading_until.is_some_and(|t| Instant::now() < t)
    }

    async fn call<T>(&self, f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, AttemptError> {
        tokio::time::timeout(self.cfg.retry_period, f)
            .await
            .map_err(|_| AttemptError::Timeout(self.cfg.retry_period))?
            .map_err(AttemptError::from)
    }

    /// One attempt: `Ok(true)` if we hold the Lease afterwards (and lead until `renew_deadline` from now).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, AttemptError> {
        let started = Instant::now();
        let secs = self.cfg.duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.call(self.api.get_opt(&self.cfg.name)).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.call(self.api.create(&PostParams::default(), &lease)).await {
                Ok(created) => Ok(self.won(started, &created)),
                Err(AttemptError::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let record = record_of(&lease);
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.cfg.identity.as_str());
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.duration);
        let observed_at = {
            let mut local = self.local.lock().expect("lease lock");
            match &local.observed {
                Some(o) if o.record == record => o.at,
                _ => {
                    let at = Instant::now();
                    local.observed = Some(Observed { record: record.clone(), at });
                    at
                }
            }
        };
        if !ours && !expired(holder.as_deref(), observed_at, their_duration, Instant::now()) {
            return Ok(false);
        }
        if ours && !self.is_leader() && self.local.lock().expect("lease lock").leading_until.is_some() {
            // We held it but our deadline passed (paused, or renewals failed): we already stopped leading and
            // must not resume silently. The caller steps down; the process restarts as a candidate.
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now_micro());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.cfg.identity.clone());
        }
        spec.renew_time = Some(now_micro());
        spec.lease_duration_seconds = Some(secs);
        match self.call(self.api.replace(&self.cfg.name, &PostParams::default(), &lease)).await {
            Ok(written) => Ok(self.won(started, &written)),
            Err(AttemptError::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn won(&self, started: Instant, written: &Lease) -> bool {
        let mut local = self.local.lock().expect("lease lock");
        local.leading_until = Some(started + self.cfg.renew_deadline);
        local.observed = Some(Observed { record: record_of(written), at: started });
        true
    }

    /// Waits until we hold the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, "acquired leader Lease");
                    return;
                }
                Ok(false) => tracing::debug!(lease = %self.cfg.name, "Lease held by another replica; waiting"),
                Err(e) => tracing::warn!(lease = %self.cfg.name, error = %Chain(&e), "Lease acquisition failed"),
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Renews every `retry_period`; returns as soon as we no longer lead (another holder, or no successful renewal
    /// within `renew_deadline`).
    pub async fn hold(&self) {
        loop {
            let deadline = self.local.lock().expect("lease lock").leading_until;
            let Some(deadline) = deadline else { return };
            // Wake at the next renewal, or at the deadline if that comes first.
            tokio::time::sleep_until((Instant::now() + self.cfg.retry_period).min(deadline)).await;
            if !self.is_leader() {
                tracing::error!(lease = %self.cfg.name, "no successful Lease renewal within the renew deadline; stepping down");
                return;
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(lease = %self.cfg.name, "another replica took the leader Lease");
                    self.step_down();
                    return;
                }
                Err(e) => tracing::warn!(lease = %self.cfg.name, error = %Chain(&e), "Lease renewal failed"),
            }
        }
    }

    fn step_down(&self) {
        self.local.lock().expect("lease lock").leading_until = None;
    }

    /// Gives the Lease up (on graceful shutdown) so a standby can take over at once.
    pub async fn release(&self) {
        let was_leader = self.is_leader();
        self.step_down();
        if !was_leader {
            return;
        }
        if let Ok(Some(mut lease)) = self.call(self.api.get_opt(&self.cfg.name)).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = self.call(self.api.replace(&self.cfg.name, &PostParams::default(), &lease)).await;
        }
    }
}

fn record_of(lease: &Lease) -> (Option<String>, Option<MicroTime>, Option<String>) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone()),
        spec.and_then(|s| s.renew_time.clone()),
        lease.metadata.resource_version.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(retry: u64, deadline: u64, duration: u64) -> LeaseConfig {
        LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(duration),
            renew_deadline: Duration::from_secs(deadline),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn timings_must_keep_one_writer() {
        assert!(cfg(2, 10, 15).check().is_ok());
        assert!(cfg(2, 15, 15).check().is_err(), "deadline must be below the duration");
        assert!(cfg(10, 10, 15).check().is_err(), "retry must be below the deadline");
        assert!(cfg(0, 10, 15).check().is_err());
        let mut c = cfg(1, 2, 3);
        c.duration = Duration::from_millis(3500);
        assert!(c.check().is_err(), "leaseDurationSeconds is whole seconds");
    }

    #[test]
    fn expiry_is_judged_by_local_observation() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        assert!(!expired(Some("other"), t0, d, t0 + Duration::from_secs(14)));
        assert!(expired(Some("other"), t0, d, t0 + d));
        assert!(expired(None, t0, d, t0));
        assert!(expired(Some(""), t0, d, t0));
    }
}
