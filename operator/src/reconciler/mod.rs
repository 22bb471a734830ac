//! The ControlPlaneLink controller: `reconcile` wraps a finalizer around `apply` and `cleanup`.
//!
//! `apply` is one idempotent pass that server-side applies every child (so a conflict or a
//! transient error mid-pass is repaired by the next pass), reusing stored certificates unless
//! they are missing, invalid or due for renewal, then writes the status and publishes Events
//! for changes of state. With agents outside the cluster (`agent.authentication: certificate`)
//! `apply` also deletes what it ran for in-cluster agents, should the link have had them
//! before. `cleanup` removes the cluster-scoped RBAC that ownerReferences cannot cover;
//! everything namespaced is garbage-collected through its owner reference.
//!
//! This module holds the shared pieces ([`Context`], [`Error`], the intervals), `reconcile` and
//! `error_policy`; the rest is in:
//! - `apply`: the pass that makes the cluster match a link, its status and Events
//! - `certificates`: the CA and the leaves, reused or issued
//! - `cleanup`: deleting what owner references cannot cover
//! - `controller`: the watches, their backoff, and [`run`]

mod apply;
mod certificates;
mod cleanup;
mod controller;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::{Api, Client, ResourceExt};

pub use self::apply::next_check;
pub use self::controller::{WatchBackoff, run};
use crate::certs::CertError;
use crate::crd::ControlPlaneLink;
use crate::metrics::Metrics;
use crate::resources::PlanError;
use crate::resources::deployment::SERVER_ADMIN_PORT;

/// Finalizer that guards removal of the link's cluster-scoped objects.
pub const FINALIZER: &str = "cplink.dev/cleanup";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "cplink.dev/operator";
/// Name the operator publishes Events under.
pub const CONTROLLER_NAME: &str = "cplink-operator";

/// Re-check a healthy link this often (drift the watches missed, certificate expiry).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Re-check a link whose CA Secret is missing or unusable (that Secret is not watched).
pub const CA_RETRY_INTERVAL: Duration = Duration::from_secs(60);
/// Re-read the servers' linked agents this often until every server has every agent: links
/// come and go without any object changing.
pub const LINKS_RECHECK_INTERVAL: Duration = Duration::from_secs(15);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const ERROR_BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after failed reconciles.
pub const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);

/// [`SERVER_ADMIN_PORT`] as a port number, checked when compiling.
const SERVER_ADMIN_PORT_NUMBER: u16 = {
    assert!(SERVER_ADMIN_PORT > 0 && SERVER_ADMIN_PORT <= u16::MAX as i32);
    SERVER_ADMIN_PORT as u16
};

/// Why a reconcile failed. Every variant is retried with backoff by [`error_policy`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a child from the API failed.
    #[error("reading {kind} {name}: {source}")]
    Get {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Server-side applying a child failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a cluster-scoped child failed.
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the link's status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// The link lacks metadata every stored object has.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Generating or issuing a certificate failed.
    #[error("certificates: {0}")]
    Certificates(#[from] CertError),
    /// Rendering the egress selector configuration failed.
    #[error("rendering egress selector configuration: {0}")]
    Egress(#[from] crate::yaml::Error),
    /// Adding or removing the finalizer failed (or wraps a failure of apply/cleanup).
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// A fixed label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Get { .. } => "get",
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Status(_) => "status",
            Error::Plan(_) => "metadata",
            Error::Certificates(_) => "certificates",
            Error::Egress(_) => "egress",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
        }
    }
}

/// Shared state of all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on links.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Image for servers and agents when the spec names none (the operator's own image).
    pub default_image: String,
    /// Port of the server pods' admin endpoint, where their linked agents are counted.
    server_admin_port: u16,
    /// Consecutive failures per link (`namespace/name`), for retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context publishing Events as [`CONTROLLER_NAME`].
    pub fn new(client: Client, metrics: Arc<Metrics>, default_image: String) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.to_owned(),
            instance: None,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            default_image,
            server_admin_port: SERVER_ADMIN_PORT_NUMBER,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the servers' linked agents on `port` instead of their admin port (tests serve
    /// metrics on a port of their own).
    pub fn with_server_admin_port(mut self, port: u16) -> Self {
        self.server_admin_port = port;
        self
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic while holding this lock cannot leave the counts inconsistent; keep going.
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn key(link: &ControlPlaneLink) -> String {
    format!(
        "{}/{}",
        link.namespace().unwrap_or_default(),
        link.name_any()
    )
}

/// Reconciles one link: adds the finalizer, then applies or cleans up.
#[tracing::instrument(
    skip_all,
    fields(namespace = %link.namespace().unwrap_or_default(), name = %link.name_any())
)]
pub async fn reconcile(link: Arc<ControlPlaneLink>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = link
        .namespace()
        .ok_or(PlanError::MissingMetadata("namespace"))?;
    let links: Api<ControlPlaneLink> = Api::namespaced(ctx.client.clone(), &ns);
    let link_key = key(&link);
    tracing::info!(link = %link_key, "reconciling");
    let action = finalizer(&links, FINALIZER, link, |event| async {
        match event {
            Finalizer::Apply(link) => apply::apply(&link, &ctx).await,
            Finalizer::Cleanup(link) => cleanup::cleanup(&link, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures().remove(&link_key);
    Ok(action)
}

/// Logs and counts a failed reconcile, and retries with exponential backoff.
pub fn error_policy(link: Arc<ControlPlaneLink>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = error.metric_label();
    ctx.metrics.reconcile_failed(label);
    let failures = {
        let mut failures = ctx.failures();
        let count = failures.entry(key(&link)).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = backoff(failures);
    tracing::warn!(link = %key(&link), %error, kind = label, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `failures` (1-based).
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    ERROR_BACKOFF_BASE
        .saturating_mul(1 << exponent)
        .min(ERROR_BACKOFF_MAX)
}

#[cfg(test)]
mod tests;
