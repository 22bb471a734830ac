//! cplink-server and cplink-agent as child processes of the benchmark, so that each one's
//! memory and CPU can be measured on its own.
//!
//! They are the real binaries of the same build (next to the benchmark's executable), with
//! their own allocator and runtime settings. Each binds port 0 and logs JSON; the benchmark
//! reads the addresses from its "started" line and passes the rest of its log on.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use cplink_e2e::pki::{CertFiles, Pki};
use cplink_e2e::{binaries, harness, procfs};
use cplink_runtime::malloc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Flags added to the benchmark's own for every server and agent it starts, to measure a
/// setting (e.g. `--worker-threads`) against the defaults.
#[derive(Debug)]
pub struct ExtraFlags {
    /// For every `cplink-server`.
    pub server: Vec<String>,
    /// For every `cplink-agent`.
    pub agent: Vec<String>,
    /// How many agents each server gets, each its own process with its own link.
    pub agents: NonZeroUsize,
}

/// A cplink binary running as a child of the benchmark; killed when dropped.
pub struct Process {
    child: Child,
    pid: u32,
}

impl Process {
    /// Starts `binary` (a cplink binary of this build) with `args` and `env`, and waits up to 30 s for
    /// the JSON log line whose message starts with `started`, returned as its fields.
    async fn spawn(
        binary: &'static str,
        args: &[String],
        env: &[(&str, &str)],
        started: &str,
    ) -> anyhow::Result<(Self, serde_json::Map<String, serde_json::Value>)> {
        let path = binaries::binary(binary)?;
        let mut child = Command::new(&path)
            .args(args)
            .args(["--log-format", "json"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        let pid = child.id().context("child exited at once")?;
        let mut log = BufReader::new(child.stderr.take().context("stderr not piped")?).lines();
        let fields = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = log.next_line().await? {
                let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(&line) else {
                    eprintln!("{binary}: {line}");
                    continue;
                };
                let message = fields.get("message").and_then(|m| m.as_str());
                if message.is_some_and(|m| m.starts_with(started)) {
                    return Ok(fields);
                }
                eprintln!("{binary}: {line}");
            }
            anyhow::bail!("{binary} exited before it logged {started:?}")
        })
        .await
        .with_context(|| format!("{binary} did not log {started:?} within 30 s"))??;
        // The rest of its log (warnings and errors at the level the benchmark sets).
        tokio::spawn(async move {
            while let Ok(Some(line)) = log.next_line().await {
                eprintln!("{binary}: {line}");
            }
        });
        Ok((Process { child, pid }, fields))
    }

    /// Resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        procfs::rss_kib(self.pid)
    }

    /// CPU time the process has used so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        procfs::cpu(self.pid)
    }

    /// Wake-ups (voluntary context switches) of the process's threads so far.
    pub fn wake_ups(&self) -> anyhow::Result<u64> {
        procfs::wake_ups(self.pid)
    }

    /// Stops the process gracefully (by closing its standard input), or kills it after 10 s.
    pub async fn stop(mut self) {
        harness::stop_child_async(&mut self.child, Duration::from_secs(10)).await;
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

/// One server and its agents (one unless `--agents` says otherwise), each in its own process
/// with its own link. With several, the server spreads the tunnels over their links, the
/// least loaded first, as it would over several links of one agent.
pub struct Pair {
    /// The server process.
    pub server: Process,
    /// The agent processes.
    pub agents: Vec<Process>,
    /// The TLS CONNECT frontend.
    pub tls_addr: SocketAddr,
    /// The Unix socket CONNECT frontend.
    pub uds: PathBuf,
    /// The Unix socket konnectivity gRPC frontend.
    pub grpc: PathBuf,
}

impl Pair {
    /// Starts a server and its agents, and waits until all report ready.
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
        ]
        .map(str::to_owned);
        let server_args = [&server_args[..], &extra.server].concat();
        let (server, logged) =
            Process::spawn("cplink-server", &server_args, &[], "cplink-server started").await?;
        let [agent_addr, tls_addr, server_admin] =
            ["agents", "frontend", "admin"].map(|field| address(&logged, field));
        let (agent_addr, tls_addr, server_admin) = (agent_addr?, tls_addr?, server_admin?);
        let mut agents = Vec::with_capacity(extra.agents.get());
        let mut admins = vec![server_admin];
        for i in 0..extra.agents.get() {
            let (agent, admin) = start_agent(certs, extra, agent_addr, i).await?;
            agents.push(agent);
            admins.push(admin);
        }
        for admin in admins {
            wait_ready(admin).await?;
        }
        Ok(Pair {
            server,
            agents,
            tls_addr,
            uds,
            grpc,
        })
    }

    /// Stops every process.
    pub async fn stop(self) {
        for agent in self.agents {
            agent.stop().await;
        }
        self.server.stop().await;
    }

    /// The RSS of the agents together, in KiB.
    pub fn agents_rss_kib(&self) -> anyhow::Result<u64> {
        self.agents.iter().map(Process::rss_kib).sum()
    }
}

/// Starts agent number `i` (from 0), linked to the server at `server`, and returns it with its
/// admin address.
async fn start_agent(
    certs: &Certificates,
    extra: &ExtraFlags,
    server: SocketAddr,
    i: usize,
) -> anyhow::Result<(Process, SocketAddr)> {
    // The first keeps the names a single agent has always had.
    let suffix = if i == 0 {
        String::new()
    } else {
        format!("-{i}")
    };
    let agent_args = [
        &*format!("--agent-id=bench-agent{suffix}"),
        &*format!("--node-name=bench-node{suffix}"),
        "--server-address",
        &server.to_string(),
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
    ]
    .map(str::to_owned);
    let agent_args = [&agent_args[..], &extra.agent].concat();
    // With the environment the operator gives agents.
    let agent_env = [(malloc::GLIBC_TUNABLES, malloc::TUNABLES)];
    let (agent, logged) = Process::spawn(
        "cplink-agent",
        &agent_args,
        &agent_env,
        "cplink-agent started",
    )
    .await?;
    let admin = address(&logged, "admin")?;
    Ok((agent, admin))
}

/// The socket address in field `field` of a "started" log line.
fn address(
    logged: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> anyhow::Result<SocketAddr> {
    let value = logged
        .get(field)
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("the started line has no address in {field:?}: {logged:?}"))
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
        let mut cpu = Cpu {
            server: self.server.cpu()?,
            server_wake_ups: self.server.wake_ups()?,
            ..Cpu::default()
        };
        for agent in &self.agents {
            cpu.agent += agent.cpu()?;
            cpu.agent_wake_ups += agent.wake_ups()?;
        }
        Ok(cpu)
    }

    fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.server.rss_kib()?, self.agents_rss_kib()?))
    }
}

/// The two ends of a tunnel, as processes whose CPU time and memory the benchmark reads: the
/// control-plane end (cplink-server, sshd) and the node end (cplink-agent, ssh).
pub trait Ends {
    /// CPU time each end has used, and how often its threads were woken, so far.
    fn cpu(&self) -> anyhow::Result<Cpu>;
    /// Resident memory of each end in KiB: the control-plane end, then the node end.
    fn rss_kib(&self) -> anyhow::Result<(u64, u64)>;
}

/// CPU time and wake-ups of the server and of the agent: a reading, or the difference of two.
/// A wake-up is a thread that went to sleep, most often to wait for a socket, and was woken
/// (a voluntary context switch): what a tunnel adds to every hop beside the bytes' own work.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// The server process.
    pub server: Duration,
    /// The agent process.
    pub agent: Duration,
    /// Wake-ups of the server's threads.
    pub server_wake_ups: u64,
    /// Wake-ups of the agent's threads.
    pub agent_wake_ups: u64,
}

impl Cpu {
    /// What was used between the reading `earlier` and this one.
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            server: self.server.saturating_sub(earlier.server),
            agent: self.agent.saturating_sub(earlier.agent),
            server_wake_ups: self.server_wake_ups.saturating_sub(earlier.server_wake_ups),
            agent_wake_ups: self.agent_wake_ups.saturating_sub(earlier.agent_wake_ups),
        }
    }
}
