//! Keeping the links of one server address up, whatever the protocol: dial while the address
//! is short of servers (see [`crate::slots`]), pausing with backoff after failures and
//! duplicates; serve each link on its own task; when the address is no longer wanted, stop
//! dialing and let the links that are up run until their servers close them.

use std::future::Future;
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
            let protocol = Protocol(shared.clone());
            maintain(&shared, &protocol, target, context, until).await;
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

/// How [`maintain`] establishes and serves links: the agent's protocol, or a stand-in in tests.
trait Connector {
    /// An established link.
    type Link: Send + 'static;

    /// Establishes one link to `target`.
    fn connect(
        &self,
        target: &ServerSlot,
    ) -> impl Future<Output = Result<Self::Link, LinkError>> + Send;

    /// Whether `link` replaced an older link to the same server.
    fn replaced(link: &Self::Link) -> bool;

    /// Serves `link` until it ends; drains when `context` says so.
    fn serve(
        &self,
        link: Self::Link,
        context: LinkContext,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// The links of the protocol the agent is configured for.
struct Protocol(Arc<Shared>);

impl Connector for Protocol {
    type Link = Link;

    fn connect(&self, target: &ServerSlot) -> impl Future<Output = Result<Link, LinkError>> + Send {
        Link::connect(&self.0, target)
    }

    fn replaced(link: &Link) -> bool {
        link.replaced()
    }

    fn serve(&self, link: Link, context: LinkContext) -> impl Future<Output = ()> + Send + 'static {
        link.serve(self.0.clone(), context)
    }
}

/// Keeps links to every server behind `target` until shutdown (then waits for them to drain)
/// or until `stop` (then waits for their servers to close them).
async fn maintain<C: Connector>(
    shared: &Arc<Shared>,
    connector: &C,
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
                    attempt = connector.connect(&target).instrument(span.clone()) => attempt,
                    () = context.shutdown.cancelled() => break,
                };
                match attempt {
                    Ok(link) if C::replaced(&link) => {
                        link::count_attempt(shared, "duplicate");
                        let delay = backoff.next_delay();
                        span.in_scope(|| tracing::info!(
                            delay = %humantime::format_duration(delay),
                            "linked again to a server already linked through this address: \
                             the new link replaces the old one; dialing again after a pause \
                             for another server"
                        ));
                        next_attempt = Instant::now() + delay;
                        links.spawn(connector.serve(link, context.clone()).instrument(span));
                    }
                    Ok(link) => {
                        link::count_attempt(shared, "ok");
                        backoff.reset();
                        // More servers may be wanted: the next attempt may start at once.
                        next_attempt = Instant::now();
                        links.spawn(connector.serve(link, context.clone()).instrument(span));
                    }
                    Err(err) => {
                        link::count_attempt(shared, err.kind());
                        shared.links.failed(target.slot, err.to_string());
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::LinkInfo;
    use crate::config::BackoffConfig;
    use crate::slots::{HeldLink, OnDuplicate, Wants};

    /// What the stand-in server does with an attempt.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Refuse,
        Link,
        Silent,
    }

    /// A link of [`Scripted`]: held in the slots until the test closes it or the agent drains.
    struct FakeLink {
        held: HeldLink,
        closed: oneshot::Receiver<()>,
    }

    /// Answers attempts as scripted (refusing once the script runs out) and reports the time of
    /// each attempt.
    struct Scripted {
        shared: Arc<Shared>,
        answers: Mutex<VecDeque<Answer>>,
        attempts: mpsc::UnboundedSender<Instant>,
        /// Dropping one closes its link, as its server would.
        servers: Mutex<Vec<oneshot::Sender<()>>>,
    }

    impl Connector for Scripted {
        type Link = FakeLink;

        fn connect(
            &self,
            target: &ServerSlot,
        ) -> impl Future<Output = Result<FakeLink, LinkError>> + Send {
            let _ = self.attempts.send(Instant::now());
            let answer = self.answers.lock().unwrap().pop_front();
            let linked = match answer.unwrap_or(Answer::Refuse) {
                Answer::Refuse => Some(Err(LinkError::Connect(
                    std::io::ErrorKind::ConnectionRefused.into(),
                ))),
                Answer::Link => {
                    let info = LinkInfo {
                        server_id: "server-1".into(),
                        server_count: 1,
                    };
                    let (server, closed) = oneshot::channel();
                    self.servers.lock().unwrap().push(server);
                    Some(
                        self.shared
                            .links
                            .hold(target.slot, info, OnDuplicate::Refuse)
                            .map(|held| FakeLink { held, closed })
                            .map_err(LinkError::from),
                    )
                }
                Answer::Silent => None,
            };
            async move {
                match linked {
                    Some(linked) => linked,
                    None => std::future::pending().await,
                }
            }
        }

        fn replaced(_: &FakeLink) -> bool {
            false
        }

        fn serve(
            &self,
            link: FakeLink,
            context: LinkContext,
        ) -> impl Future<Output = ()> + Send + 'static {
            link.serve(context)
        }
    }

    impl FakeLink {
        /// Up until its server closes it or the agent drains; the slot holds it meanwhile.
        async fn serve(self, context: LinkContext) {
            let FakeLink { held, closed } = self;
            tokio::select! {
                _ = closed => {}
                () = context.shutdown.cancelled() => {}
            }
            drop(held);
        }
    }

    const BACKOFF: BackoffConfig = BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };

    /// The ceilings of the pauses after each of a row of failures, for [`BACKOFF`].
    const CEILINGS_MS: [u64; 7] = [100, 200, 400, 800, 1000, 1000, 1000];

    /// The timer's resolution: nothing that does not wait for a timer takes as long.
    const TICK: Duration = Duration::from_millis(1);

    /// An agent's loop keeping one server address linked through a [`Scripted`] server.
    struct LinkLoop {
        fake: Arc<Scripted>,
        attempts: mpsc::UnboundedReceiver<Instant>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl LinkLoop {
        fn start(script: &[Answer]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut config = crate::config::tests::config(dir.path(), &[]).unwrap();
            config.backoff = BACKOFF;
            let shared = crate::Agent::new(config).shared;
            let slot = shared.links.add("server:8091".into(), Wants::One);
            let target = ServerSlot {
                slot,
                endpoint: shared.config.servers[0].clone(),
            };
            let (report, attempts) = mpsc::unbounded_channel();
            let fake = Arc::new(Scripted {
                shared: shared.clone(),
                answers: Mutex::new(script.iter().copied().collect()),
                attempts: report,
                servers: Mutex::default(),
            });
            let shutdown = CancellationToken::new();
            let context = LinkContext {
                streams: TaskTracker::new(),
                shutdown: shutdown.clone(),
                force: CancellationToken::new(),
            };
            let connector = fake.clone();
            let task = tokio::spawn(async move {
                maintain(
                    &shared,
                    &*connector,
                    target,
                    context,
                    CancellationToken::new(),
                )
                .await;
            });
            LinkLoop {
                fake,
                attempts,
                shutdown,
                task,
            }
        }

        async fn next_attempt(&mut self) -> Instant {
            self.attempts.recv().await.unwrap()
        }

        /// Closes the link up, as its server would.
        fn close_link(&self) {
            self.fake.servers.lock().unwrap().pop().unwrap();
        }

        /// Shuts the agent down and tells whether the loop ended without waiting for any timer.
        async fn shut_down_promptly(self) -> bool {
            self.shutdown.cancel();
            let asked = Instant::now();
            let ended = tokio::time::timeout(TICK, self.task).await.is_ok();
            ended && asked.elapsed() < TICK
        }
    }

    fn assert_paused_within_ceiling(pause: Duration, ceiling: Duration) {
        assert!(
            pause >= ceiling / 2 && pause <= ceiling,
            "paused {pause:?}, outside [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_attempts_are_spaced_by_growing_pauses_up_to_the_cap() {
        let mut running = LinkLoop::start(&[]);
        let mut last = running.next_attempt().await;
        for ceiling in CEILINGS_MS {
            let attempt = running.next_attempt().await;
            assert_paused_within_ceiling(attempt - last, Duration::from_millis(ceiling));
            last = attempt;
        }
        assert!(running.shut_down_promptly().await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_that_came_up_resets_the_backoff() {
        use Answer::*;
        let mut running = LinkLoop::start(&[Refuse, Refuse, Refuse, Refuse, Refuse, Link]);
        for _ in 0..6 {
            running.next_attempt().await;
        }
        // Five failures brought the pause to its cap; the link came up, and ends a while later.
        tokio::time::advance(Duration::from_secs(10)).await;
        running.close_link();
        let closed = Instant::now();
        let relinked = running.next_attempt().await;
        assert_paused_within_ceiling(relinked - closed, BACKOFF.initial);
        assert!(running.shut_down_promptly().await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_up_is_not_dialed_again() {
        let mut running = LinkLoop::start(&[Answer::Link]);
        running.next_attempt().await;
        let quiet = tokio::time::timeout(Duration::from_secs(60), running.next_attempt()).await;
        assert!(quiet.is_err(), "dialed again while linked");
        assert!(running.shut_down_promptly().await);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_loop_at_once_while_pausing_dialing_or_linked() {
        for answer in [Answer::Refuse, Answer::Silent, Answer::Link] {
            let mut running = LinkLoop::start(&[answer]);
            running.next_attempt().await;
            assert!(
                running.shut_down_promptly().await,
                "still running after {answer:?}"
            );
        }
    }
}
