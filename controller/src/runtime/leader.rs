//! A small leader election on a `coordination.k8s.io/v1` Lease (kube-runtime 5 has no helper).
//!
//! The holder renews every `duration / 3`; a Lease whose `renewTime + leaseDurationSeconds` has passed (or that has
//! no holder) may be taken by anyone. Updates use `replace` with the read `resourceVersion`, so two candidates can
//! never both succeed. A holder that cannot renew within the lease duration, or finds another holder, steps down.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

pub struct LeaderLease {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

impl LeaderLease {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Self {
        Self { api: Api::namespaced(client, &cfg.namespace), cfg }
    }

    /// One attempt: `Ok(true)` if we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let secs = self.cfg.duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now())),
                    renew_time: Some(MicroTime(now())),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.cfg.identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(t), Some(d)) => t.0.as_second() + i64::from(d) < now().as_second(),
            _ => true,
        };
        if !ours && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(MicroTime(now()));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.cfg.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now()));
        spec.lease_duration_seconds = Some(secs);
        match self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
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
                Err(e) => tracing::warn!(lease = %self.cfg.name, error = %e, "Lease acquisition failed"),
            }
            tokio::time::sleep(self.cfg.duration / 3).await;
        }
    }

    /// Renews until it fails for a whole lease duration or another holder appears; returns then.
    pub async fn hold(&self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.duration / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.cfg.name, "another replica took the leader Lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.cfg.name, error = %e, "Lease renewal failed");
                    if last_ok.elapsed() >= self.cfg.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the Lease up (on graceful shutdown) so a standby can take over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let _ = self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await;
        }
    }
}
