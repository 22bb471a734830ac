//! Stalled streams never freeze a link.
//!
//! Many tunneled connections whose readers (or destinations) stop reading share one agent link
//! with a request/response connection. Each stalled connection may hold one stream window of
//! bytes and nothing more; the link keeps carrying the others, at close to their idle latency.
//! Once released, every stalled connection delivers all its bytes, checksummed.
//!
//! The numbers: links used to freeze at 133 stalled readers (a 32 MiB connection window is
//! 128 stream windows of 256 KiB), so the tests run twice that, and as many as the agent's
//! `--max-streams-per-link` allows, in each direction and through both CONNECT frontends.

use std::time::{Duration, Instant};

use anyhow::Context;
use cplink_e2e::client::TlsClient;
use cplink_e2e::fixture::{Loopback, RunningAgent, RunningServer};
use cplink_e2e::{client, targets, wait};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;

/// Stalled readers that froze a link with the old 32 MiB connection window.
const OLD_THRESHOLD: usize = 133;

/// Bytes each stalled connection carries: several stream windows plus what socket buffers hold
/// on the way, so that every one of them really fills its window.
const PER_STREAM: usize = 1024 * 1024;

/// One stream window: what a stalled connection may hold in the receiving end of the link.
const WINDOW: u64 = cplink_proto::STREAM_WINDOW as u64;

/// The stated bound: next to stalled streams, a request/response connection's median round
/// trip stays within this factor of its idle median, plus [`LATENCY_SLACK`] for scheduler noise
/// on a shared two-core machine. A frozen link misses it by seconds.
const LATENCY_FACTOR: u32 = 10;

/// Absolute slack added to the latency bound.
const LATENCY_SLACK: Duration = Duration::from_millis(5);

/// Round trips measured per sample.
const ROUNDS: u32 = 200;

/// How long any single round trip may take before the link counts as frozen.
const FROZEN: Duration = Duration::from_secs(10);

/// Which CONNECT frontend the clients use.
#[derive(Debug, Clone, Copy)]
enum Frontend {
    Uds,
    Tls,
}

/// The receiving end of the link whose buffers stalled connections fill.
#[derive(Debug, Clone, Copy)]
enum End {
    Server,
    Agent,
}

/// A tunneled connection through either frontend.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Duplex for T {}
type Conn = Box<dyn Duplex>;

struct Setup {
    _lo: Loopback,
    server: RunningServer,
    agent: RunningAgent,
    tls: TlsClient,
}

impl Setup {
    /// A server and one agent started with `agent_flags`, linked.
    async fn new(agent_flags: &[&str]) -> anyhow::Result<Self> {
        raise_fd_limit()?;
        let lo = Loopback::new()?;
        let server = lo.start_server(&[]).await?;
        let agent = lo.start_agent(&[server.agent_addr], agent_flags).await?;
        server.wait_for_agents(1).await?;
        agent.wait_ready().await?;
        let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
        Ok(Setup {
            _lo: lo,
            server,
            agent,
            tls,
        })
    }

    async fn tunnel(&self, frontend: Frontend, target: &str) -> anyhow::Result<Conn> {
        Ok(match frontend {
            Frontend::Uds => Box::new(client::tunnel_uds(&self.server.uds, target).await?),
            Frontend::Tls => Box::new(self.tls.tunnel(self.server.tls_addr, target).await?),
        })
    }

    /// Next to the stalled streams, the echo connection `probe` (and a new one to `echo`, when
    /// given) keeps its idle median round trip `idle` within the stated bound.
    async fn check_link_free(
        &self,
        what: &str,
        frontend: Frontend,
        probe: &mut Conn,
        idle: Duration,
        echo: Option<&targets::Target>,
    ) -> anyhow::Result<()> {
        let busy = echo_p50(probe).await?;
        check_latency(what, idle, busy)?;
        if let Some(echo) = echo {
            let mut fresh = self.tunnel(frontend, &echo.authority()).await?;
            let p50 = echo_p50(&mut fresh).await?;
            check_latency(&format!("{what}, a new connection"), idle, p50)?;
        }
        Ok(())
    }

    /// Bytes sent towards `end` that it has not yet written to its sockets: what stalled
    /// readers (at the server) or stalled destinations (at the agent) hold in that end of the
    /// link.
    fn held_by(&self, end: End) -> u64 {
        let (server, agent) = (
            self.server.handle.tunneled_bytes(),
            self.agent.handle.tunneled_bytes(),
        );
        let (sent, written) = match end {
            End::Server => (agent.socket_to_stream, server.stream_to_socket),
            End::Agent => (server.socket_to_stream, agent.stream_to_socket),
        };
        sent.saturating_sub(written)
    }

    /// Waits until `end` holds a full stream window for each of the `n` stalled connections.
    async fn wait_until_full(&self, what: &str, n: usize, end: End) -> anyhow::Result<()> {
        let full = n as u64 * WINDOW;
        wait::until(
            &format!("{what} holding a full stream window each in the {end:?}"),
            Duration::from_secs(60),
            || self.held_by(end) >= full,
        )
        .await
        .with_context(|| format!("the {end:?} holds {} KiB", self.held_by(end) / 1024))?;
        eprintln!(
            "{what}: the {end:?} holds {} KiB for them",
            self.held_by(end) / 1024
        );
        Ok(())
    }
}

/// Many connections use many descriptors: four per tunneled connection in one process.
fn raise_fd_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    anyhow::ensure!(
        soft >= 8192,
        "these tests need 8192 file descriptors, the limit is {soft}"
    );
    Ok(())
}

/// Median of `ROUNDS` 8-byte echo round trips; fails when one takes longer than [`FROZEN`].
async fn echo_p50(conn: &mut Conn) -> anyhow::Result<Duration> {
    let mut latencies = Vec::with_capacity(ROUNDS as usize);
    for i in 0..ROUNDS {
        let started = Instant::now();
        let round = async {
            conn.write_u64(u64::from(i)).await?;
            conn.flush().await?;
            anyhow::Ok(conn.read_u64().await?)
        };
        let back = tokio::time::timeout(FROZEN, round).await.map_err(|_| {
            anyhow::anyhow!("echo round trip {i} took over {FROZEN:?}: link frozen")
        })??;
        anyhow::ensure!(back == u64::from(i), "echo answered {back} to {i}");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    Ok(latencies[latencies.len() / 2])
}

fn check_latency(what: &str, idle: Duration, stalled: Duration) -> anyhow::Result<()> {
    let bound = idle * LATENCY_FACTOR + LATENCY_SLACK;
    eprintln!(
        "{what}: echo p50 idle {idle:?}, next to the stalled streams {stalled:?} ({:.1}x; bound {bound:?})",
        stalled.as_secs_f64() / idle.as_secs_f64().max(1e-9)
    );
    anyhow::ensure!(
        stalled <= bound,
        "{what}: p50 {stalled:?} next to stalled streams, over {LATENCY_FACTOR}x idle {idle:?} + {LATENCY_SLACK:?}"
    );
    Ok(())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `n` clients that never read while their destinations push [`PER_STREAM`] bytes at them;
/// meanwhile an echo connection keeps its latency; then every client reads all its bytes.
async fn stalled_readers(
    frontend: Frontend,
    n: usize,
    agent_flags: &[&str],
    fresh_dial: bool,
) -> anyhow::Result<()> {
    let what = format!("{n} stalled readers via {frontend:?}");
    let setup = Setup::new(agent_flags).await?;
    let source = targets::pattern_source(PER_STREAM).await?;
    let echo = targets::echo().await?;

    let mut probe = setup.tunnel(frontend, &echo.authority()).await?;
    let idle = echo_p50(&mut probe).await?;

    let mut stalled = Vec::with_capacity(n);
    for seed in 0..n as u64 {
        let mut conn = setup.tunnel(frontend, &source.authority()).await?;
        conn.write_u64(seed).await?;
        conn.flush().await?;
        stalled.push(conn);
    }
    setup.wait_until_full(&what, n, End::Server).await?;

    setup
        .check_link_free(
            &what,
            frontend,
            &mut probe,
            idle,
            fresh_dial.then_some(&echo),
        )
        .await?;

    let mut readers = JoinSet::new();
    for (seed, mut conn) in stalled.into_iter().enumerate() {
        readers.spawn(async move {
            let mut got = Vec::with_capacity(PER_STREAM);
            conn.read_to_end(&mut got).await?;
            anyhow::ensure!(
                got.len() == PER_STREAM,
                "connection {seed} delivered {} of {PER_STREAM} bytes",
                got.len()
            );
            anyhow::ensure!(
                digest(&got) == digest(&targets::pattern(seed as u64, PER_STREAM)),
                "connection {seed} delivered other bytes than were sent"
            );
            anyhow::Ok(())
        });
    }
    join_all(&what, readers).await
}

/// `n` clients that upload [`PER_STREAM`] bytes each to destinations that read nothing;
/// meanwhile an echo connection keeps its latency; then the destinations read everything and
/// answer with its checksum.
async fn stalled_writers(
    frontend: Frontend,
    n: usize,
    agent_flags: &[&str],
    fresh_dial: bool,
) -> anyhow::Result<()> {
    let what = format!("{n} stalled uploads via {frontend:?}");
    let setup = Setup::new(agent_flags).await?;
    let (release, gate) = tokio::sync::watch::channel(false);
    let sink = targets::gated_sink(gate).await?;
    let echo = targets::echo().await?;

    let mut probe = setup.tunnel(frontend, &echo.authority()).await?;
    let idle = echo_p50(&mut probe).await?;

    let mut writers = JoinSet::new();
    for seed in 0..n as u64 {
        let conn = setup.tunnel(frontend, &sink.authority()).await?;
        writers.spawn(async move {
            let (mut reader, mut writer) = tokio::io::split(conn);
            let data = targets::pattern(seed, PER_STREAM);
            writer.write_all(&data).await?;
            writer.shutdown().await?;
            let mut answer = [0u8; 32];
            reader.read_exact(&mut answer).await?;
            anyhow::ensure!(
                answer == digest(&data),
                "destination {seed} received other bytes than were sent"
            );
            anyhow::Ok(())
        });
    }
    setup.wait_until_full(&what, n, End::Agent).await?;

    setup
        .check_link_free(
            &what,
            frontend,
            &mut probe,
            idle,
            fresh_dial.then_some(&echo),
        )
        .await?;

    release.send(true)?;
    join_all(&what, writers).await
}

/// Waits for every task, failing with the first error, within a deadline.
async fn join_all(what: &str, mut tasks: JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    let total = tasks.len();
    let all = async {
        let mut done = 0;
        while let Some(result) = tasks.join_next().await {
            result??;
            done += 1;
        }
        anyhow::Ok(done)
    };
    let done = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: not every stream delivered its bytes in 120 s"))??;
    anyhow::ensure!(done == total, "{what}: {done} of {total} finished");
    Ok(())
}

/// The agent's limit in the "as many as allowed" tests: the stalled connections and the echo
/// connection use every stream of the link.
const CONFIGURED_MAX: usize = 400;

fn max_flags() -> Vec<String> {
    vec![
        "--max-streams-per-link".to_owned(),
        CONFIGURED_MAX.to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_old_threshold_of_stalled_readers_leave_the_link_free() -> anyhow::Result<()> {
    stalled_readers(Frontend::Uds, 2 * OLD_THRESHOLD, &[], true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_old_threshold_of_stalled_uploads_leave_the_link_free() -> anyhow::Result<()> {
    stalled_writers(Frontend::Tls, 2 * OLD_THRESHOLD, &[], true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_up_to_the_stream_limit_leave_the_link_free() -> anyhow::Result<()> {
    let flags = max_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    stalled_readers(Frontend::Tls, CONFIGURED_MAX - 1, &flags, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_up_to_the_stream_limit_leave_the_link_free() -> anyhow::Result<()> {
    let flags = max_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    stalled_writers(Frontend::Uds, CONFIGURED_MAX - 1, &flags, false).await
}
