//! Keeping the links of one server address up, whatever the protocol: dial while the address
//! is short of servers (see [`crate::slots`]), pausing with backoff after failures and
//! duplicates; serve each link on its own task; when the address is no longer wanted, stop
//! dialing and let the links that are up run until their servers close them.

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::Shared;
use crate::config::ServerEndpoint;
use crate::link::{self, Link, LinkContext, LinkError, ServerSlot};
use crate::slots::{SlotId, Wants};

/// Starts and stops the tasks keeping server addresses linked.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    context: LinkContext,
}

/// A server address being dialed.
#[derive(Debug)]
pub(crate) struct Running {
    slot: SlotId,
    stop: CancellationToken,
}

impl Pool {
    /// Tasks spawned on `tracker`, links drained and closed with `context`.
    pub(crate) fn new(shared: Arc<Shared>, tracker: TaskTracker, context: LinkContext) -> Self {
        Pool {
            shared,
            tracker,
            context,
        }
    }

    /// Starts keeping `endpoint` linked.
    pub(crate) fn start(&self, endpoint: ServerEndpoint, wants: Wants) -> Running {
        let slot = self.shared.links.add(endpoint.address.clone(), wants);
        self.start_slot(slot, endpoint)
    }

    /// Starts keeping `endpoint` linked, in a slot already added for it.
    pub(crate) fn start_slot(&self, slot: SlotId, endpoint: ServerEndpoint) -> Running {
        let stop = CancellationToken::new();
        let target = ServerSlot { slot, endpoint };
        let (shared, context, until) = (self.shared.clone(), self.context.clone(), stop.clone());
        self.tracker.spawn(async move {
            maintain(&shared, target, context, until).await;
            shared.links.remove(slot);
        });
        Running { slot, stop }
    }

    /// Stops dialing an address started with [`Self::start`]; its links stay up until their
    /// servers close them, but no longer count for readiness.
    pub(crate) fn stop(&self, running: Running) {
        self.shared.links.retire(running.slot);
        running.stop.cancel();
    }
}

/// Keeps links to every server behind `target` until shutdown (then waits for them to drain)
/// or until `stop` (then waits for their servers to close them).
async fn maintain(
    shared: &Arc<Shared>,
    target: ServerSlot,
    context: LinkContext,
    stop: CancellationToken,
) {
    let address = target.endpoint.address.clone();
    let mut links = JoinSet::new();
    let mut backoff = shared.config.backoff.start();
    let mut next_attempt = Instant::now();
    let mut stopped = false;
    loop {
        let dial = !stopped && shared.links.short_of(target.slot);
        tokio::select! {
            () = context.shutdown.cancelled() => break,
            () = stop.cancelled(), if !stopped => {
                stopped = true;
                if links.is_empty() {
                    break;
                }
                tracing::info!(
                    server = %address,
                    links = links.len(),
                    "no longer dialing: links stay up until their servers close them"
                );
            }
            Some(_) = links.join_next() => {
                // A link ended (its task said why); a replacement waits for a pause.
                if stopped && links.is_empty() {
                    break;
                }
                next_attempt = Instant::now() + backoff.next_delay();
            }
            () = tokio::time::sleep_until(next_attempt), if dial => {
                let span = tracing::info_span!(
                    "link",
                    server = %address,
                    server_id = tracing::field::Empty,
                );
                let attempt = tokio::select! {
                    attempt = Link::connect(shared, &target).instrument(span.clone()) => attempt,
                    () = context.shutdown.cancelled() => break,
                };
                match attempt {
                    Ok(link) if link.replaced() => {
                        link::count_attempt(shared, "duplicate");
                        let delay = backoff.next_delay();
                        span.in_scope(|| tracing::info!(
                            delay = %humantime::format_duration(delay),
                            "linked again to a server already linked through this address: \
                             the new link replaces the old one; dialing again after a pause \
                             for another server"
                        ));
                        next_attempt = Instant::now() + delay;
                        links.spawn(link.serve(shared.clone(), context.clone()).instrument(span));
                    }
                    Ok(link) => {
                        link::count_attempt(shared, "ok");
                        backoff.reset();
                        // More servers may be wanted: the next attempt may start at once.
                        next_attempt = Instant::now();
                        links.spawn(link.serve(shared.clone(), context.clone()).instrument(span));
                    }
                    Err(err) => {
                        link::count_attempt(shared, err.kind());
                        let delay = backoff.next_delay();
                        let delay_text = humantime::format_duration(delay);
                        let _enter = span.enter();
                        if let LinkError::Duplicate(_) = err {
                            tracing::info!(
                                %err,
                                delay = %delay_text,
                                "link closed: dialing again after a pause for another server"
                            );
                        } else {
                            tracing::warn!(
                                %err,
                                delay = %delay_text,
                                "link failed; relinking after a pause"
                            );
                        }
                        next_attempt = Instant::now() + delay;
                    }
                }
            }
        }
    }
    // Each link drains on `shutdown` by itself, or closes on `force` or when its server
    // closes it.
    while links.join_next().await.is_some() {}
}
