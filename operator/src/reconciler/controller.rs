//! The controller: which objects it watches, how its watches back off, and its run loop.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use kube::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher;

use super::{Context, error_policy, reconcile};
use crate::crd::ControlPlaneLink;
use crate::resources::MANAGED_BY;

/// Backoff of the controller's watches after an error.
///
/// kube-runtime pauses *all* of a controller's watches behind one backoff. After a
/// kube-apiserver restart every watch fails in turn (connection refused, then `410 Gone` while
/// the new watch cache fills), and its default (up to 30 s, reset after 2 minutes without
/// errors) compounds those into minutes of deafness. Short steps reconnect within seconds.
/// The steps are kube's own backon-based exponential backoff, without jitter: one operator
/// replica watches, there is no crowd to spread.
pub struct WatchBackoff(ResetTimerBackoff<watcher::ExponentialBackoff>);

impl WatchBackoff {
    /// The first pause.
    pub const MIN: Duration = Duration::from_millis(250);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(5);
    /// Quiet time after which the pauses start again from [`Self::MIN`].
    pub const RESET_AFTER: Duration = Duration::from_secs(30);

    /// The backoff the controller uses: doubling from [`Self::MIN`] to [`Self::MAX`], restarting
    /// after [`Self::RESET_AFTER`] without errors.
    pub fn for_controller() -> Self {
        let steps = backon::ExponentialBuilder::new()
            .with_min_delay(Self::MIN)
            .with_max_delay(Self::MAX)
            // Watches are retried for as long as the operator runs.
            .without_max_times();
        WatchBackoff(ResetTimerBackoff::new(steps.into(), Self::RESET_AFTER))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// Runs the controller until `shutdown` completes, then lets running reconciles finish.
/// `ready` is set once the ControlPlaneLink watch has synced.
pub async fn run(
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let controller = Controller::new(
        Api::<ControlPlaneLink>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .owns(Api::<Deployment>::all(client.clone()), children.clone())
    .owns(Api::<DaemonSet>::all(client.clone()), children.clone())
    .owns(Api::<Service>::all(client.clone()), children.clone())
    .owns(Api::<Secret>::all(client.clone()), children.clone())
    .owns(Api::<ServiceAccount>::all(client.clone()), children)
    .trigger_backoff(WatchBackoff::for_controller())
    .graceful_shutdown_on(shutdown);

    let store = controller.store();
    tokio::spawn(async move {
        // kube-runtime's "store ready" signal wakes only the last task waiting on it, and the
        // controller waits on it too: look again every second instead of relying on a wake-up.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::Release);
                    tracing::info!("controller watches synced");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });

    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((link, _)) => tracing::debug!(%link, "reconciled"),
                // Reconcile errors are logged by `error_policy`.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::QueueError(error)) => {
                    tracing::warn!(error = %error, "watch failed; retrying");
                }
                Err(error) => tracing::debug!(%error, "controller event"),
            }
        })
        .await;
    tracing::info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn watch_backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = WatchBackoff::for_controller();
        let pauses: Vec<Duration> = backoff.by_ref().take(7).collect();
        assert_eq!(pauses[0], WatchBackoff::MIN);
        assert_eq!(pauses[1], WatchBackoff::MIN * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[6], WatchBackoff::MAX);
        backoff.reset();
        assert_eq!(backoff.next(), Some(WatchBackoff::MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_backoff_starts_over_only_after_quiet_time() {
        let mut backoff = WatchBackoff::for_controller();
        assert_eq!(backoff.next(), Some(WatchBackoff::MIN));
        // Errors closer together than the quiet time keep the pauses growing.
        tokio::time::advance(WatchBackoff::RESET_AFTER - Duration::from_secs(1)).await;
        assert_eq!(backoff.next(), Some(WatchBackoff::MIN * 2));
        tokio::time::advance(WatchBackoff::RESET_AFTER + Duration::from_secs(1)).await;
        assert_eq!(backoff.next(), Some(WatchBackoff::MIN));
    }
}
