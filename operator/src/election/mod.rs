//! Leader election among the operator's replicas, on a `coordination.k8s.io/v1` Lease.
//!
//! The rules are client-go's (`k8s.io/client-go/tools/leaderelection`, which kube-controller-
//! manager and controller-runtime use), so the Lease reads as any controller's:
//! - A replica takes the Lease when it does not exist, has no holder (released), or has not
//!   changed for `leaseDurationSeconds` as measured by this replica's own clock since it first
//!   saw that record. Clocks of different machines are never compared: `renewTime` is for
//!   people to read.
//! - Every write replaces the Lease with the `resourceVersion` just read, so when two replicas
//!   race for one record, one wins and the other gets a conflict.
//! - The leader renews every retry period and stops leading once it has not renewed for the
//!   renew deadline, which is shorter than the lease duration: it has stopped before any other
//!   replica may take over.
//! - A leader that stops cleanly releases the Lease (no holder), so another replica takes over
//!   at its next retry instead of waiting for the lease to expire.
//!
//! It is written here rather than taken from a crate because the Lease crate built on kube 5,
//! kube-lease-manager, keeps reporting leadership while its renewals fail (it has no renew
//! deadline) and clears an expired Lease without a precondition before claiming it.
//!
//! The module holds the rules ([`Elector`]) and its timing ([`Timing`]); the Lease itself is
//! behind [`LeaseStore`] (the API server's is [`KubeLease`]).

mod store;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::store::{KubeLease, LeaseStore, StoreError};
use crate::metrics::Metrics;

/// Followers retry after the retry period stretched by a random factor in `[1, JITTER)`, so
/// that replicas started together do not ask in lockstep.
pub const JITTER: f64 = 1.2;

/// How long a Lease lasts and how often it is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease holds without renewal before another replica may take it
    /// (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops leading.
    pub renew_deadline: Duration,
    /// How often every replica tries to acquire or renew the Lease.
    pub retry_period: Duration,
}

/// Why a [`Timing`] cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// The Lease stores whole seconds.
    #[error("the lease duration must be a whole number of seconds, at least 1s: got {0:?}")]
    LeaseSeconds(Duration),
    /// The leader would still lead when others may take over.
    #[error(
        "the renew deadline ({renew:?}) must be shorter than the lease duration ({lease:?}): a \
         leader stops leading before another replica may take over"
    )]
    RenewDeadline {
        /// The renew deadline.
        renew: Duration,
        /// The lease duration.
        lease: Duration,
    },
    /// The leader would not get to retry a failed renewal.
    #[error(
        "the retry period ({retry:?}) must be positive and, stretched by {JITTER}, shorter than \
         the renew deadline ({renew:?})"
    )]
    RetryPeriod {
        /// The retry period.
        retry: Duration,
        /// The renew deadline.
        renew: Duration,
    },
}

impl Timing {
    /// controller-runtime's defaults: a 15 s lease, a 10 s renew deadline, a 2 s retry period.
    pub const DEFAULT: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    /// Checks that the leader stops before anyone may take over, with time to retry renewals.
    pub fn validate(&self) -> Result<(), TimingError> {
        let lease = self.lease_duration;
        if lease < Duration::from_secs(1)
            || lease.subsec_nanos() != 0
            || i32::try_from(lease.as_secs()).is_err()
        {
            return Err(TimingError::LeaseSeconds(lease));
        }
        if self.renew_deadline >= lease {
            return Err(TimingError::RenewDeadline {
                renew: self.renew_deadline,
                lease,
            });
        }
        if self.retry_period.is_zero() || self.retry_period.mul_f64(JITTER) >= self.renew_deadline {
            return Err(TimingError::RetryPeriod {
                retry: self.retry_period,
                renew: self.renew_deadline,
            });
        }
        Ok(())
    }

    /// `leaseDurationSeconds`, for a validated timing.
    fn lease_seconds(&self) -> i32 {
        // Validated to fit; saturate rather than fail if called on an unvalidated one.
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// The pause of a follower between attempts.
    fn jittered_retry(&self) -> Duration {
        self.retry_period.mul_f64(rand::random_range(1.0..JITTER))
    }
}

/// What this replica is in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It has not yet read the Lease.
    Candidate,
    /// Another replica leads (`holder`), or nobody does and this one is about to try.
    Follower {
        /// The holder of the Lease, if any.
        holder: Option<String>,
    },
    /// This replica holds the Lease.
    Leader,
}

/// The state of the election as this replica sees it, for readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This replica's role.
    pub role: Role,
    /// Why the last attempt to read or write the Lease failed, if it did.
    pub last_error: Option<String>,
}

/// What one attempt to acquire or renew the Lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease, written just now.
    Leading,
    /// Another replica holds the Lease and it has not expired.
    HeldBy(String),
    /// Another replica wrote the Lease between this replica's read and its write.
    Conflict,
}

/// Why the leader stopped leading on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostLeadership {
    /// Another replica holds the Lease now.
    #[error("{0} holds the leader Lease now")]
    TakenBy(String),
    /// No renewal succeeded within the renew deadline.
    #[error("the leader Lease was not renewed within the renew deadline ({0:?})")]
    RenewDeadline(Duration),
}

/// How [`Elector::renew`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Asked to stop; the Lease is still held, for [`Elector::release`].
    Stopped,
    /// Leadership is lost: whatever the leader did must stop now.
    Lost(LostLeadership),
}

/// A record of the Lease and when this replica first saw it.
#[derive(Debug)]
struct Observation {
    spec: LeaseSpec,
    at: Instant,
}

/// One replica's side of the election on one Lease.
pub struct Elector<S> {
    store: S,
    identity: String,
    timing: Timing,
    observed: Option<Observation>,
    /// When the last write that made or kept this replica leader was sent.
    renewed_at: Option<Instant>,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
}

impl<S: LeaseStore> Elector<S> {
    /// An elector for `identity` (unique among the replicas: the pod's name) on `store`'s
    /// Lease. `timing` should be validated ([`Timing::validate`]).
    pub fn new(store: S, identity: String, timing: Timing, metrics: Arc<Metrics>) -> Self {
        let (status, _) = watch::channel(Status {
            role: Role::Candidate,
            last_error: None,
        });
        metrics.leader.set(0);
        Elector {
            store,
            identity,
            timing,
            observed: None,
            renewed_at: None,
            status,
            metrics,
        }
    }

    /// The election as this replica sees it, updated after every attempt.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// This replica's identity, written as `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Reads the Lease and takes or renews it if this replica may: one round of client-go's
    /// `tryAcquireOrRenew`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, StoreError> {
        let started = Instant::now();
        let now = Timestamp::now();
        let Some(mut lease) = self.store.get().await? else {
            let spec = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.timing.lease_seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            return match self.store.create(spec).await {
                Ok(created) => {
                    self.observe(created.spec.unwrap_or_default());
                    self.renewed_at = Some(started);
                    Ok(Attempt::Leading)
                }
                Err(StoreError::Conflict) => Ok(Attempt::Conflict),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.take().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|seen| seen.spec != spec) {
            self.observe(spec.clone());
        }
        let holder = spec
            .holder_identity
            .as_deref()
            .filter(|holder| !holder.is_empty());
        let ours = holder == Some(self.identity.as_str());
        if let Some(holder) = holder
            && !ours
            && !self.observed_expired(&spec)
        {
            return Ok(Attempt::HeldBy(holder.to_owned()));
        }
        // Fields of the Lease this election does not use (a preferred holder, a strategy) are
        // kept as they are.
        let mut claim = spec.clone();
        claim.holder_identity = Some(self.identity.clone());
        claim.lease_duration_seconds = Some(self.timing.lease_seconds());
        claim.renew_time = Some(MicroTime(now));
        if !ours {
            claim.acquire_time = Some(MicroTime(now));
            claim.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        lease.spec = Some(claim);
        match self.store.replace(&lease).await {
            Ok(written) => {
                self.observe(written.spec.unwrap_or_default());
                self.renewed_at = Some(started);
                Ok(Attempt::Leading)
            }
            Err(StoreError::Conflict) => Ok(Attempt::Conflict),
            Err(err) => Err(err),
        }
    }

    /// Tries every retry period until this replica leads (`true`) or `shutdown` is cancelled
    /// (`false`).
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            let attempt = tokio::select! {
                biased;
                () = shutdown.cancelled() => return false,
                attempt = self.attempt() => attempt,
            };
            match attempt {
                Ok(Attempt::Leading) => {
                    tracing::info!(identity = %self.identity, "became the leader");
                    self.set_role(Role::Leader, None);
                    self.metrics.leader.set(1);
                    return true;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    let follower = Role::Follower {
                        holder: Some(holder),
                    };
                    if self.status.borrow().role != follower {
                        tracing::info!(role = ?follower, "following the leader");
                    }
                    self.set_role(follower, None);
                }
                Ok(Attempt::Conflict) => {
                    tracing::debug!("another replica wrote the leader Lease meanwhile");
                    let role = match &self.status.borrow().role {
                        Role::Candidate => Role::Follower { holder: None },
                        role => role.clone(),
                    };
                    self.set_role(role, None);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read or write the leader Lease");
                    let role = self.status.borrow().role.clone();
                    self.set_role(role, Some(err.to_string()));
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.timing.jittered_retry()) => {}
            }
        }
    }

    /// Renews the Lease every retry period while this replica leads, until `stop` is
    /// cancelled ([`Renewal::Stopped`]) or leadership is lost ([`Renewal::Lost`]): another
    /// replica took the Lease, or no renewal succeeded within the renew deadline.
    pub async fn renew(&mut self, stop: &CancellationToken) -> Renewal {
        loop {
            // Counted from when the last successful write was sent: the Lease was renewed no
            // earlier than that.
            let renewed = self.renewed_at.unwrap_or_else(Instant::now);
            let deadline = renewed + self.timing.renew_deadline;
            let next = (Instant::now() + self.timing.retry_period).min(deadline);
            tokio::select! {
                biased;
                () = stop.cancelled() => return Renewal::Stopped,
                () = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                return self.lose(LostLeadership::RenewDeadline(self.timing.renew_deadline));
            }
            let attempt = tokio::select! {
                biased;
                () = stop.cancelled() => return Renewal::Stopped,
                attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()) => attempt,
            };
            match attempt {
                Ok(Ok(Attempt::Leading)) => {
                    self.set_role(Role::Leader, None);
                }
                Ok(Ok(Attempt::HeldBy(holder))) => {
                    return self.lose(LostLeadership::TakenBy(holder));
                }
                Ok(Ok(Attempt::Conflict)) => {
                    tracing::debug!("the leader Lease changed under a renewal; retrying");
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "cannot renew the leader Lease; retrying");
                    self.set_role(Role::Leader, Some(err.to_string()));
                }
                Err(_elapsed) => {
                    return self.lose(LostLeadership::RenewDeadline(self.timing.renew_deadline));
                }
            }
        }
    }

    /// Gives the Lease up if this replica holds it, so that another takes over at once:
    /// clears the holder, keeping the transitions count. Returns whether it was released.
    pub async fn release(&mut self) -> Result<bool, StoreError> {
        self.metrics.leader.set(0);
        let Some(mut lease) = self.store.get().await? else {
            return Ok(false);
        };
        let spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            // client-go writes 1 s too: whoever reads the released record may take it.
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..spec
        });
        match self.store.replace(&lease).await {
            Ok(written) => {
                self.observe(written.spec.unwrap_or_default());
                self.set_role(Role::Follower { holder: None }, None);
                tracing::info!(identity = %self.identity, "released the leader Lease");
                Ok(true)
            }
            // Written by someone else since: no longer this replica's to release.
            Err(StoreError::Conflict) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// One attempt, bounded by the renew deadline so that a hung request cannot stall it.
    async fn attempt(&mut self) -> Result<Attempt, StoreError> {
        let limit = self.timing.renew_deadline;
        tokio::time::timeout(limit, self.try_acquire_or_renew())
            .await
            .unwrap_or(Err(StoreError::Timeout(limit)))
    }

    fn lose(&mut self, why: LostLeadership) -> Renewal {
        tracing::error!(reason = %why, "lost leadership");
        self.metrics.leader.set(0);
        // The new leader reports the links from now on; what this replica saw goes stale.
        self.metrics.forget_links();
        let holder = match &why {
            LostLeadership::TakenBy(holder) => Some(holder.clone()),
            LostLeadership::RenewDeadline(_) => None,
        };
        self.set_role(Role::Follower { holder }, Some(why.to_string()));
        Renewal::Lost(why)
    }

    fn observe(&mut self, spec: LeaseSpec) {
        self.metrics
            .leader_transitions
            .set(spec.lease_transitions.unwrap_or(0).into());
        self.observed = Some(Observation {
            spec,
            at: Instant::now(),
        });
    }

    /// Whether the record `spec` (already observed) has stood unchanged for its lease
    /// duration, by this replica's clock.
    fn observed_expired(&self, spec: &LeaseSpec) -> bool {
        let Some(seen) = &self.observed else {
            return false;
        };
        let lasts = spec
            .lease_duration_seconds
            .and_then(|seconds| u64::try_from(seconds).ok())
            .filter(|seconds| *seconds > 0)
            .map_or(self.timing.lease_duration, Duration::from_secs);
        Instant::now() >= seen.at + lasts
    }

    fn set_role(&self, role: Role, last_error: Option<String>) {
        self.status.send_replace(Status { role, last_error });
    }
}
