//! Accept loops that survive hostile load: backoff on accept errors, a rate-limited error log,
//! and a cap on connections still in their handshake or header phase.
//!
//! A listener that accepts whatever arrives lets silent or slow clients pile up until the
//! process runs out of file descriptors; then every accept fails (EMFILE), established
//! connections cannot open their destination sockets and the admin port stops answering. A cap
//! per listener on connections that have not finished their handshake keeps the descriptors of
//! established traffic and of the admin port in reserve: a connection over the cap is closed at
//! once and counted. Silent clients then cost at most the cap, for at most the handshake or
//! header timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// First pause after a failed accept; doubles while accepts keep failing.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between failed accepts.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one accept-error line per listener in this period; the others are counted in it.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Connections in their handshake or header phase a listener takes at most, unless configured:
/// an eighth of the descriptor limit, at most 1024, so that four listeners at their cap leave
/// half the descriptors to established connections and the admin port.
pub fn default_max_pending() -> usize {
    match open_files_limit() {
        Some(limit) => (limit / 8).clamp(8, 1024) as usize,
        None => 1024,
    }
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Logs failed accepts of one listener: the first at once, then at most one line per
/// [`LOG_PERIOD`] with how many were left out.
#[derive(Debug)]
struct ErrorLog {
    listener: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn new(listener: &'static str) -> Self {
        ErrorLog {
            listener,
            last: None,
            suppressed: 0,
        }
    }

    fn failed(&mut self, err: &std::io::Error) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < LOG_PERIOD => self.suppressed += 1,
            _ => {
                tracing::warn!(
                    listener = self.listener,
                    %err,
                    suppressed = self.suppressed,
                    "accept failed (further failures of this listener are logged at most every 10s)"
                );
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

/// The accept side of one listener: backoff and logging of accept errors, and the cap on
/// connections in their handshake or header phase.
#[derive(Debug)]
pub struct Acceptor {
    listener: &'static str,
    pending: Arc<Semaphore>,
    max_pending: usize,
    shed: Counter,
    log: std::sync::Mutex<ErrorLog>,
}

/// Held by a connection until its handshake or header phase is over.
#[derive(Debug)]
pub struct Pending {
    _permit: OwnedSemaphorePermit,
}

impl Acceptor {
    /// An acceptor for `listener` (a name for logs) taking at most `max_pending` connections in
    /// their handshake phase; `shed` counts the connections closed over that cap.
    pub fn new(listener: &'static str, max_pending: usize, shed: Counter) -> Self {
        Acceptor {
            listener,
            pending: Arc::new(Semaphore::new(max_pending)),
            max_pending,
            shed,
            log: std::sync::Mutex::new(ErrorLog::new(listener)),
        }
    }

    /// Connections currently in their handshake phase.
    pub fn pending(&self) -> usize {
        self.max_pending - self.pending.available_permits()
    }

    /// Waits for the next connection that fits under the cap, closing those that do not;
    /// `None` once `stop` fires. Failed accepts (EMFILE, ENFILE, ...) pause the loop, longer
    /// while they keep failing, instead of spinning.
    pub async fn next<T, F, Fut>(
        &self,
        mut accept: F,
        stop: &CancellationToken,
    ) -> Option<(T, Pending)>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<T>>,
    {
        let mut pause = Backoff::doubling(FIRST_PAUSE, MAX_PAUSE);
        loop {
            let accepted = tokio::select! {
                accepted = accept() => accepted,
                () = stop.cancelled() => return None,
            };
            match accepted {
                Ok(conn) => match self.pending.clone().try_acquire_owned() {
                    Ok(permit) => return Some((conn, Pending { _permit: permit })),
                    Err(_) => {
                        // Closed at once: its descriptor goes back before the next accept.
                        drop(conn);
                        // Each listener has a counter of its own: it numbers this one's sheds.
                        let shed = self.shed.inc() + 1;
                        if shed.is_power_of_two() {
                            tracing::warn!(
                                listener = self.listener,
                                max_pending = self.max_pending,
                                shed,
                                "connection closed: too many connections still in their handshake"
                            );
                        }
                    }
                },
                Err(err) => {
                    lock(&self.log).failed(&err);
                    tokio::select! {
                        () = tokio::time::sleep(pause.next_delay()) => {}
                        () = stop.cancelled() => return None,
                    }
                    continue;
                }
            }
            pause.reset();
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The log state is two counters; a panic cannot leave it half updated.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        let shed = Counter::default();
        let acceptor = Acceptor::new("test", 2, shed.clone());
        let stop = CancellationToken::new();
        let mut next = 0;
        let first = acceptor
            .next(
                || {
                    next += 1;
                    std::future::ready(Ok(next))
                },
                &stop,
            )
            .await;
        let (one, first) = first.unwrap();
        let (two, _second) = acceptor
            .next(|| std::future::ready(Ok(2)), &stop)
            .await
            .unwrap();
        assert_eq!((one, two), (1, 2));
        assert_eq!(acceptor.pending(), 2);
        // Full: the next accepted connections are shed until a handshake finishes.
        let mut offered = 0;
        let mut finished = Some(first);
        let (third, _third) = acceptor
            .next(
                || {
                    offered += 1;
                    if offered == 3 {
                        // The first connection finishes its handshake.
                        finished.take();
                    }
                    std::future::ready(Ok(offered))
                },
                &stop,
            )
            .await
            .unwrap();
        assert_eq!(third, 3, "two were shed, the third fit");
        assert_eq!(shed.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_accepts_back_off_and_stop_with_the_listener() {
        let acceptor = Acceptor::new("test", 4, Counter::default());
        let stop = CancellationToken::new();
        let attempts = std::cell::Cell::new(0u32);
        let started = tokio::time::Instant::now();
        let stopper = stop.clone();
        let accept = || {
            attempts.set(attempts.get() + 1);
            if attempts.get() == 8 {
                stopper.cancel();
            }
            std::future::ready(Err::<(), _>(std::io::Error::from_raw_os_error(24)))
        };
        assert!(acceptor.next(accept, &stop).await.is_none());
        assert_eq!(attempts.get(), 8);
        // 10 + 20 + 40 + ... ms between attempts, not a spin.
        assert!(
            started.elapsed() >= Duration::from_millis(10 + 20 + 40 + 80 + 160 + 320),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn accept_pauses_double_and_start_over_after_a_connection() {
        // No room for any connection: an accepted one is shed and the loop goes on.
        let acceptor = Acceptor::new("test", 0, Counter::default());
        let stop = CancellationToken::new();
        let attempts = std::cell::RefCell::new(Vec::new());
        let stopper = stop.clone();
        let accept = || {
            let mut attempts = attempts.borrow_mut();
            attempts.push(tokio::time::Instant::now());
            let accepted = match attempts.len() {
                4 => Ok(()),
                7 => {
                    stopper.cancel();
                    Err(std::io::Error::from_raw_os_error(24))
                }
                _ => Err(std::io::Error::from_raw_os_error(24)),
            };
            std::future::ready(accepted)
        };
        assert!(acceptor.next(accept, &stop).await.is_none());
        let attempts = attempts.into_inner();
        let gaps: Vec<u128> = attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(gaps, [10, 20, 40, 0, 10, 20]);
    }

    #[test]
    fn the_default_cap_follows_the_descriptor_limit() {
        let cap = default_max_pending();
        assert!((8..=1024).contains(&cap), "{cap}");
        if let Some(limit) = open_files_limit() {
            assert!(cap as u64 <= (limit / 8).max(8), "{cap} of {limit}");
        }
    }
}
