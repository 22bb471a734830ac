//! Bounded test runs: a test body under a deadline on a runtime of its own that is shut down
//! with a timeout, named steps so that a deadline failure says where the test was stuck, and
//! child processes stopped with bounded waits.
//!
//! `#[tokio::test]` drops its runtime at the end, and dropping a multi-thread runtime waits
//! for every worker to return from the task it is polling: one task that never yields (a
//! watch loop retrying a dead API server without pause, a blocking call) hangs the test after
//! its last assertion, until CI kills the whole run. [`run`] instead waits for the body on
//! the test's own thread, independent of the runtime's workers and timers, and then gives the
//! runtime [`SHUTDOWN`] to stop.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! #[test]
//! fn a_long_scenario() -> anyhow::Result<()> {
//!     cplink_e2e::harness::run("a_long_scenario", Duration::from_secs(300), |steps| async move {
//!         steps.enter("starting the control plane");
//!         // ...
//!         steps.enter("rolling restart of the servers");
//!         // ...
//!         Ok(())
//!     })
//! }
//! ```

use std::fmt::{self, Write as _};
use std::future::Future;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the runtime gets to stop once the body is done (or was abandoned at its deadline).
pub const SHUTDOWN: Duration = Duration::from_secs(10);

/// Worker threads of the test's runtime (the machines running CI have two cores).
const WORKERS: usize = 2;

/// The steps a test went through, with when it entered each; cheap to clone, shared by the
/// body and the harness.
#[derive(Clone)]
pub struct Steps {
    started: Instant,
    entered: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Steps {
    fn new() -> Self {
        Steps {
            started: Instant::now(),
            entered: Arc::default(),
        }
    }

    /// Marks the start of `step` (and so the end of the one before), printing it with the
    /// time since the test started.
    pub fn enter(&self, step: impl Into<String>) {
        let step = step.into();
        let now = Instant::now();
        println!(
            "[{:7.1}s] {step}",
            now.duration_since(self.started).as_secs_f64()
        );
        self.entered.lock().expect("steps").push((now, step));
    }

    /// The step entered last, and how long ago.
    pub fn current(&self) -> Option<(String, Duration)> {
        self.entered
            .lock()
            .expect("steps")
            .last()
            .map(|(at, step)| (step.clone(), at.elapsed()))
    }

    /// Every step with how long it took (the last one: until now).
    pub fn summary(&self) -> String {
        let entered = self.entered.lock().expect("steps");
        let mut out = String::new();
        for (i, (at, step)) in entered.iter().enumerate() {
            let until = entered
                .get(i + 1)
                .map_or_else(Instant::now, |(next, _)| *next);
            let _ = writeln!(
                out,
                "  [{:7.1}s] {step} ({:.1}s)",
                at.duration_since(self.started).as_secs_f64(),
                until.duration_since(*at).as_secs_f64()
            );
        }
        out
    }

    /// `"step" (for 12.3s)`, or that no step was entered.
    fn describe_current(&self) -> String {
        match self.current() {
            Some((step, since)) => format!("{step:?} (for {:.1}s)", since.as_secs_f64()),
            None => "no step entered yet".to_owned(),
        }
    }
}

/// A test body still running at its deadline.
#[derive(Debug)]
pub struct DeadlineExceeded {
    /// The test's name.
    pub test: String,
    /// The deadline it missed.
    pub deadline: Duration,
    /// The step it was in, if any was entered.
    pub step: Option<String>,
    /// Every step, with how long each took.
    pub steps: String,
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} did not finish within {:?}; stuck in step {}",
            self.test,
            self.deadline,
            self.step
                .as_deref()
                .map_or_else(|| "<none entered>".to_owned(), |step| format!("{step:?}")),
        )?;
        if !self.steps.is_empty() {
            write!(f, "\nsteps:\n{}", self.steps.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for DeadlineExceeded {}

/// How the body's task ended, as its guard reports it to the test thread.
enum Ended {
    Returned(anyhow::Result<()>),
    /// Dropped before returning: it panicked or was aborted.
    Dropped,
}

/// Reports [`Ended::Dropped`] unless the body returned.
struct Report(Option<mpsc::SyncSender<Ended>>);

impl Report {
    fn returned(mut self, result: anyhow::Result<()>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ended::Returned(result));
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ended::Dropped);
        }
    }
}

/// Runs the test body `body` on a multi-thread runtime of its own and fails if it has not
/// finished within `deadline`, naming the step it was in; then shuts the runtime down within
/// [`SHUTDOWN`], whatever tasks the body left behind. A panic of the body is resumed here.
pub fn run<F, Fut>(test: &str, deadline: Duration, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Steps) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    run_with(test, deadline, SHUTDOWN, body)
}

/// [`run`] with `shutdown` for the runtime's shutdown (and for the body to be dropped once
/// abandoned at its deadline).
pub fn run_with<F, Fut>(
    test: &str,
    deadline: Duration,
    shutdown: Duration,
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Steps) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    crate::init_logs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name(format!("test-{test}"))
        .enable_all()
        .build()?;
    let steps = Steps::new();
    let (tx, ended) = mpsc::sync_channel(1);
    let report = Report(Some(tx));
    let body = {
        let _entered = runtime.enter();
        body(steps.clone())
    };
    let task = runtime.spawn(async move {
        let report = report;
        let result = body.await;
        report.returned(result);
    });
    // Waiting here, not in the runtime: a deadline that needs a worker to fire it would not
    // fire while the workers are blocked or spinning.
    let outcome = match ended.recv_timeout(deadline) {
        Ok(Ended::Returned(Ok(()))) => Ok(()),
        Ok(Ended::Returned(Err(err))) => Err(err.context(format!(
            "{test} failed in step {}",
            steps.describe_current()
        ))),
        Ok(Ended::Dropped) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: its task is done, so joining it returns at once.
            let joined = runtime.block_on(task);
            runtime.shutdown_timeout(shutdown);
            match joined {
                Err(err) if err.is_panic() => {
                    eprintln!("{test} panicked in step {}", steps.describe_current());
                    std::panic::resume_unwind(err.into_panic());
                }
                _ => anyhow::bail!("{test}: the body's task ended without a result"),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let (step, _) = steps.current().unzip();
            let exceeded = DeadlineExceeded {
                test: test.to_owned(),
                deadline,
                step,
                steps: steps.summary(),
            };
            eprintln!("{exceeded}");
            // Dropping the body stops what it owns (processes, servers); a body blocked in a
            // call cannot be dropped until the call returns, so this wait is bounded too.
            task.abort();
            if ended.recv_timeout(shutdown).is_err() {
                eprintln!("{test}: the abandoned body was not dropped within {shutdown:?}");
            }
            Err(exceeded.into())
        }
    };
    let stopping = Instant::now();
    runtime.shutdown_timeout(shutdown);
    if stopping.elapsed() >= shutdown {
        eprintln!("{test}: the runtime did not stop within {shutdown:?}; left behind");
    }
    if outcome.is_ok() {
        print!("{test} passed in:\n{}", steps.summary());
    }
    outcome
}

/// How long a killed process gets to be reaped before it is left behind.
const REAP: Duration = Duration::from_secs(5);

/// Stops a child process without ever waiting unboundedly: SIGTERM and up to `grace` to exit
/// (no SIGTERM for a zero `grace`), then SIGKILL and up to 5 s to be reaped. Returns its exit
/// status, or `None` if it could not be reaped in time (stuck in the kernel) and was left.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if !grace.is_zero() {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(status) = wait_child(child, grace) {
            return Some(status);
        }
    }
    let _ = child.kill();
    let status = wait_child(child, REAP);
    if status.is_none() {
        tracing::warn!(
            pid = child.id(),
            "a killed process was not reaped in time; left"
        );
    }
    status
}

/// [`stop_child`] for a tokio child: SIGTERM and up to `grace` to exit, then SIGKILL and up
/// to 5 s to be reaped. Returns its exit status, or `None` if it could not be reaped in time.
pub async fn stop_child_async(
    child: &mut tokio::process::Child,
    grace: Duration,
) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if let Ok(Ok(status)) = tokio::time::timeout(grace, child.wait()).await {
            return Some(status);
        }
    }
    let _ = child.start_kill();
    match tokio::time::timeout(REAP, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            tracing::warn!(
                pid = child.id(),
                "a killed process was not reaped in time; left"
            );
            None
        }
    }
}

/// Spawns `command` from a thread that lives as long as this process, for children that
/// ask to be killed when their parent dies (`setpriv --pdeathsig KILL`, as the real nodes'
/// and containerd's `unshare` do, so that nothing outlives a killed test).
///
/// The kernel sends the parent-death signal when the *thread* that forked the child exits,
/// not the process, and a test's threads come and go: `tokio::task::block_in_place` hands a
/// worker's core to a new thread and the old one later ends as an idle blocking thread, and
/// idle blocking threads end after a few seconds. A node spawned from such a thread was
/// killed, with every container in it, seconds after a `block_in_place` in the test.
pub fn spawn_for_process_lifetime(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<mpsc::Sender<Request>> = std::sync::OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (requests, received) = mpsc::channel::<Request>();
        // Never joined: the thread ends with the process (its receiver never closes, since
        // the static keeps the sender).
        let spawned = std::thread::Builder::new()
            .name("child-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in received {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the child-spawner thread");
        }
        requests
    });
    let (reply, replied) = mpsc::channel();
    sender
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the child-spawner thread is gone"))?;
    replied
        .recv()
        .map_err(|_| std::io::Error::other("the child-spawner thread is gone"))?
}

/// Polls `child` until it exits, for at most `within`; `None` if it is still running.
pub fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let give_up = Instant::now() + within;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= give_up {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A token cancelled on SIGTERM or SIGINT, or when standard input closes: how a benchmark's
/// child process learns that its parent wants it to finish (see [`stop_by_closing_stdin`]).
pub fn shutdown_on_stdin_eof() -> anyhow::Result<tokio_util::sync::CancellationToken> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    cplink_runtime::shutdown::cancel_on_signal(shutdown.clone())?;
    let token = shutdown.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        token.cancel();
    });
    Ok(shutdown)
}

/// Stops a child started with a piped standard input the gentle way: closes that input (its
/// signal to finish, see [`shutdown_on_stdin_eof`]), gives it `grace` to exit, then kills it.
pub async fn stop_by_closing_stdin(child: &mut tokio::process::Child, grace: Duration) {
    drop(child.stdin.take());
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = tokio::time::timeout(REAP, child.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_millis(300);
    const SHUTDOWN: Duration = Duration::from_millis(300);
    /// Scheduling slack on a busy two-core machine.
    const SLACK: Duration = Duration::from_millis(700);

    #[test]
    fn tasks_that_never_end_and_ignore_cancellation_do_not_hold_up_the_end_of_a_test() {
        let started = Instant::now();
        let result = run_with("leaves tasks behind", DEADLINE * 10, SHUTDOWN, |steps| {
            async move {
                steps.enter("spawning tasks that never end");
                tokio::spawn(std::future::pending::<()>());
                tokio::spawn(async {
                    loop {
                        tokio::task::yield_now().await;
                    }
                });
                // A worker stuck in a blocking call for far longer than the shutdown timeout.
                tokio::spawn(async { std::thread::sleep(Duration::from_secs(3)) });
                Ok(())
            }
        });
        result.unwrap();
        assert!(
            started.elapsed() < SHUTDOWN + SLACK,
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_body_waiting_forever_fails_at_the_deadline_naming_its_step() {
        let started = Instant::now();
        let err = run_with("waits forever", DEADLINE, SHUTDOWN, |steps| async move {
            steps.enter("starting");
            steps.enter("waiting for Godot");
            std::future::pending::<()>().await;
            Ok(())
        })
        .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= DEADLINE && took < DEADLINE + SHUTDOWN + SLACK,
            "took {took:?}"
        );
        let exceeded = err.downcast_ref::<DeadlineExceeded>().expect("a deadline");
        assert_eq!(exceeded.step.as_deref(), Some("waiting for Godot"));
        let message = err.to_string();
        assert!(
            message.contains("waits forever") && message.contains("\"waiting for Godot\""),
            "{message}"
        );
        assert!(exceeded.steps.contains("starting"), "{}", exceeded.steps);
    }

    #[test]
    fn a_body_blocking_its_thread_still_fails_at_the_deadline() {
        let started = Instant::now();
        let err = run_with("blocks", DEADLINE, SHUTDOWN, |steps| async move {
            steps.enter("a blocking call");
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        })
        .unwrap_err();
        let took = started.elapsed();
        // The deadline, then the wait for the body to be dropped, then the runtime's shutdown.
        assert!(took < DEADLINE + 2 * SHUTDOWN + SLACK, "took {took:?}");
        assert!(err.to_string().contains("\"a blocking call\""), "{err}");
    }

    #[test]
    fn an_error_of_the_body_names_the_step_it_failed_in() {
        let err = run_with("fails", DEADLINE * 10, SHUTDOWN, |steps| async move {
            steps.enter("checking the answer");
            anyhow::bail!("wrong answer")
        })
        .unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("\"checking the answer\"") && message.contains("wrong answer"),
            "{message}"
        );
    }

    #[test]
    #[should_panic(expected = "an assertion of the body")]
    fn a_panic_of_the_body_reaches_the_test() {
        let _ = run_with("panics", DEADLINE * 10, SHUTDOWN, |_| async move {
            panic!("an assertion of the body");
        });
    }

    #[test]
    fn a_child_spawned_for_the_process_lifetime_outlives_the_thread_that_asked() {
        use std::os::unix::process::ExitStatusExt as _;
        // Both children ask to be killed when their parent dies; the thread asking ends.
        let sleeper = || {
            let mut command = Command::new("setpriv");
            command.args(["--pdeathsig", "KILL", "--", "sleep", "30"]);
            command
        };
        let asking = std::thread::spawn(move || {
            let direct = sleeper().spawn().expect("setpriv");
            let lasting = spawn_for_process_lifetime(sleeper()).expect("setpriv");
            // Once each runs `sleep`, setpriv has set its parent-death signal.
            for child in [&direct, &lasting] {
                let comm = format!("/proc/{}/comm", child.id());
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
                    assert!(Instant::now() < deadline, "setpriv never ran sleep");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            (direct, lasting)
        });
        let (mut direct, mut lasting) = asking.join().expect("the asking thread");
        // The control: the end of the thread that forked it killed the direct child.
        let status = wait_child(&mut direct, Duration::from_secs(10))
            .expect("the directly spawned child is killed when its thread ends");
        assert_eq!(status.signal(), Some(9), "{status:?}");
        // The other one's parent is the spawner thread, which lives on.
        assert_eq!(
            wait_child(&mut lasting, Duration::from_millis(500)),
            None,
            "the child spawned for the process lifetime was killed with the asking thread"
        );
        assert!(
            stop_child(&mut lasting, Duration::ZERO).is_some(),
            "not reaped"
        );
    }

    #[test]
    fn a_child_that_ignores_sigterm_is_killed_after_its_grace() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        // Give the shell time to install its trap.
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let status = stop_child(&mut child, Duration::from_millis(200)).expect("reaped");
        assert!(!status.success());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
}
