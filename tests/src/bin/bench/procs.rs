//! cplink-server and cplink-agent as child processes of the benchmark, so that each one's
//! memory can be measured on its own.
//!
//! The benchmark re-executes itself with a hidden `server` or `agent` subcommand; the child
//! runs the same library code as the real binaries, then prints the addresses it bound on its
//! first line of standard output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use cplink_e2e::pki::{CertFiles, Pki};
use cplink_e2e::{harness, procfs};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdout, Command};

/// Runs the server role: the body of `cplink-server`'s `main`, on the runtime its
/// `--worker-threads` asks for, plus the address report.
pub fn run_server(args: Vec<String>) -> anyhow::Result<()> {
    let args = cplink_server::Args::try_parse_from(
        std::iter::once("cplink-server".to_owned()).chain(args),
    )?;
    cplink_runtime::executor::build(args.worker_threads)?.block_on(serve(args))
}

async fn serve(args: cplink_server::Args) -> anyhow::Result<()> {
    args.log.init()?;
    let config = args.clone().into_config()?;
    let listeners = cplink_server::Listeners::bind(&args).await?;
    let frontend = listeners
        .frontend_tls
        .as_ref()
        .context("the benchmark needs --frontend-address")?
        .local_addr()?;
    let admin = listeners
        .admin
        .as_ref()
        .context("the benchmark needs --admin-address")?
        .local_addr()?;
    println!("{} {frontend} {admin}", listeners.agent.local_addr()?);
    let shutdown = harness::shutdown_on_stdin_eof()?;
    cplink_server::Server::new(config)
        .run(listeners, shutdown)
        .await;
    Ok(())
}

/// Runs the agent role: the body of `cplink-agent`'s `main`, on the runtime its
/// `--worker-threads` asks for, plus the address report.
pub fn run_agent(args: Vec<String>) -> anyhow::Result<()> {
    let args =
        cplink_agent::Args::try_parse_from(std::iter::once("cplink-agent".to_owned()).chain(args))?;
    cplink_runtime::executor::build(Some(args.worker_threads))?.block_on(link(args))
}

async fn link(args: cplink_agent::Args) -> anyhow::Result<()> {
    args.log.init()?;
    let admin = TcpListener::bind(args.admin_address).await?;
    println!("{}", admin.local_addr()?);
    let shutdown = harness::shutdown_on_stdin_eof()?;
    cplink_agent::Agent::new(args.into_config()?)
        .run(Some(admin), shutdown)
        .await;
    Ok(())
}

/// Flags added to the benchmark's own for every server and agent it starts, to measure a
/// setting (e.g. `--worker-threads`) against the defaults.
#[derive(Debug, Default)]
pub struct ExtraFlags {
    /// For every `cplink-server`.
    pub server: Vec<String>,
    /// For every `cplink-agent`.
    pub agent: Vec<String>,
}

/// A child process running one role; killed when dropped.
pub struct Process {
    child: Child,
    pid: u32,
    // Kept open so that a late write by the child never meets a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl Process {
    async fn spawn(role: &str, args: &[String]) -> anyhow::Result<(Self, Vec<String>)> {
        let exe = std::env::current_exe().context("cannot find the benchmark executable")?;
        let mut child = Command::new(exe)
            .arg(role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {role}"))?;
        let pid = child.id().context("child exited at once")?;
        let stdout = child.stdout.take().context("child stdout not piped")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
            .await
            .with_context(|| format!("the {role} did not report its addresses"))??;
        anyhow::ensure!(!line.is_empty(), "the {role} exited before it was ready");
        let words = line.split_whitespace().map(str::to_owned).collect();
        Ok((
            Process {
                child,
                pid,
                _stdout: stdout,
            },
            words,
        ))
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        procfs::rss_kib(self.pid)
    }

    /// CPU time the process has used so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        procfs::cpu(self.pid)
    }

    /// Stops the process gracefully (by closing its standard input), or kills it after 10 s.
    pub async fn stop(mut self) {
        harness::stop_by_closing_stdin(&mut self.child, Duration::from_secs(10)).await;
    }
}

/// Certificates shared by every server and agent of a run.
pub struct Certificates {
    dir: tempfile::TempDir,
    pki: Pki,
    server: CertFiles,
    agent: CertFiles,
    /// What kube-apiserver would present to the TLS frontend.
    pub frontend: CertFiles,
}

impl Certificates {
    /// A CA and the three leaf certificates, in a private directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path(), "bench")?;
        let server = pki.issue(
            "server",
            &["localhost", "127.0.0.1"],
            cplink_e2e::pki::Usage::Server,
        )?;
        let agent = pki.issue("agent", &["agent"], cplink_e2e::pki::Usage::Client)?;
        let frontend = pki.issue(
            "apiserver",
            &["kube-apiserver"],
            cplink_e2e::pki::Usage::Client,
        )?;
        Ok(Certificates {
            dir,
            pki,
            server,
            agent,
            frontend,
        })
    }

    /// The CA certificate file.
    pub fn ca(&self) -> &Path {
        self.pki.ca_file()
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// One server and one agent linked to it, each in its own process.
pub struct Pair {
    /// The server process.
    pub server: Process,
    /// The agent process.
    pub agent: Process,
    /// The TLS CONNECT frontend.
    pub tls_addr: SocketAddr,
    /// The Unix socket CONNECT frontend.
    pub uds: PathBuf,
    /// The Unix socket konnectivity gRPC frontend.
    pub grpc: PathBuf,
}

impl Pair {
    /// Starts a server and an agent, and waits until both report ready.
    pub async fn start(certs: &Certificates, extra: &ExtraFlags) -> anyhow::Result<Self> {
        // Sockets of its own, so that no pair meets one left behind by an earlier pair.
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let uds = certs.dir.path().join(format!("frontend-{n}.sock"));
        let grpc = certs.dir.path().join(format!("grpc-{n}.sock"));
        let server_args = [
            "--server-id",
            "bench-server",
            "--agent-address",
            "127.0.0.1:0",
            "--frontend-address",
            "127.0.0.1:0",
            "--frontend-uds",
            &path(&uds),
            "--grpc-uds",
            &path(&grpc),
            "--admin-address",
            "127.0.0.1:0",
            "--tls-cert",
            &path(&certs.server.cert),
            "--tls-key",
            &path(&certs.server.key),
            "--agent-ca",
            &path(certs.ca()),
            "--frontend-ca",
            &path(certs.ca()),
            "--log-level",
            "warn",
        ]
        .map(str::to_owned);
        let server_args = [&server_args[..], &extra.server].concat();
        let (server, addrs) = Process::spawn("server", &server_args).await?;
        let [agent_addr, tls_addr, server_admin] = addrs.as_slice() else {
            anyhow::bail!("the server reported {addrs:?}");
        };
        let agent_args = [
            "--agent-id",
            "bench-agent",
            "--node-name",
            "bench-node",
            "--server-address",
            agent_addr,
            "--server-name",
            "localhost",
            "--tls-cert",
            &path(&certs.agent.cert),
            "--tls-key",
            &path(&certs.agent.key),
            "--server-ca",
            &path(certs.ca()),
            "--allow",
            "127.0.0.0/8",
            "--admin-address",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ]
        .map(str::to_owned);
        let agent_args = [&agent_args[..], &extra.agent].concat();
        let (agent, addrs) = Process::spawn("agent", &agent_args).await?;
        let [agent_admin] = addrs.as_slice() else {
            anyhow::bail!("the agent reported {addrs:?}");
        };
        for admin in [server_admin, agent_admin] {
            wait_ready(admin.parse()?).await?;
        }
        Ok(Pair {
            server,
            agent,
            tls_addr: tls_addr.parse()?,
            uds,
            grpc,
        })
    }

    /// Stops both processes.
    pub async fn stop(self) {
        self.agent.stop().await;
        self.server.stop().await;
    }
}

/// Polls `/readyz` until it answers 200, for at most 30 s.
async fn wait_ready(admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match readyz(admin).await {
            Ok(true) => return Ok(()),
            Ok(false) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(false) => anyhow::bail!("{admin}/readyz never answered 200"),
            Err(e) => return Err(e.context(format!("{admin}/readyz"))),
        }
    }
}

async fn readyz(admin: SocketAddr) -> anyhow::Result<bool> {
    let mut stream = TcpStream::connect(admin).await?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer.starts_with("HTTP/1.1 200"))
}

impl Ends for Pair {
    fn cpu(&self) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            server: self.server.cpu()?,
            agent: self.agent.cpu()?,
        })
    }

    fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.server.rss_kib()?, self.agent.rss_kib()?))
    }
}

/// The two ends of a tunnel, as processes whose CPU time and memory the benchmark reads: the
/// control-plane end (cplink-server, sshd) and the node end (cplink-agent, ssh).
pub trait Ends {
    /// CPU time each end has used so far.
    fn cpu(&self) -> anyhow::Result<Cpu>;
    /// Resident memory of each end in KiB: the control-plane end, then the node end.
    fn rss_kib(&self) -> anyhow::Result<(u64, u64)>;
}

/// CPU time of the server and of the agent: a reading, or the difference of two.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// The server process.
    pub server: Duration,
    /// The agent process.
    pub agent: Duration,
}

impl Cpu {
    /// What was used between the reading `earlier` and this one.
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            server: self.server.saturating_sub(earlier.server),
            agent: self.agent.saturating_sub(earlier.agent),
        }
    }
}
