//! `cplink-rss`: how much memory cplink-server and cplink-agent give back after many TLS
//! tunnels close.
//!
//! Runs the real `cplink-server` and `cplink-agent` binaries as processes (found next to this
//! executable, where `cargo build --bins` puts them, or in `--bin-dir`), linked over mutual TLS
//! on loopback. Then, as kube-apiserver does, it opens `--tunnels` tunnels through the TLS
//! CONNECT frontend, one TLS connection per dial, `--wave` of them held open at once, each
//! used for one small echo; closes them; waits until the server reports no active stream; and
//! reads `VmRSS` and `VmHWM` from `/proc/<pid>/status`: idle before the load, peak, right after
//! the close and after `--settle`. A single-stream upload and the dial rate show what a
//! setting costs in throughput.
//!
//! Each `--variant` runs on fresh processes, one after the other in the same run: a label,
//! optionally `dir=PATH` (other binaries, e.g. built with another allocator), and environment
//! variables for both processes:
//!
//! ```text
//! cargo build --release -p cplink-server -p cplink-agent -p cplink-e2e --bin cplink-rss
//! target/release/cplink-rss --variant default --variant 'arena2 MALLOC_ARENA_MAX=2'
//! ```
//!
//! With `--idle`, no tunnel is opened: each variant's pair links, sits idle for `--idle-wait`,
//! and the table gives both processes' `VmRSS` and thread counts, which is what an agent costs
//! on each node of a cluster. The variables reach both processes, so
//! `CPLINK_WORKER_THREADS=N` sizes both runtimes:
//!
//! ```text
//! cargo build --release -p cplink-server -p cplink-agent -p cplink-e2e --bin cplink-rss
//! target/release/cplink-rss --idle --variant 'w1 CPLINK_WORKER_THREADS=1' --variant default
//! ```
//!
//! It prints a table (or JSON with `--json`) and asserts nothing: memory figures of debug and
//! release builds differ, and shared machines are noisy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cplink_e2e::client::TlsClient;
use cplink_e2e::pki::{CertFiles, Pki, Usage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Measures server and agent RSS before, during and after many TLS tunnels.
#[derive(Debug, Parser)]
#[command(name = "cplink-rss", version)]
struct Cli {
    /// Tunnels to open in all.
    #[arg(long, default_value_t = 10_000)]
    tunnels: usize,

    /// Tunnels held open at once: each wave opens this many, then closes them all.
    #[arg(long, default_value_t = 1_000)]
    wave: usize,

    /// Dials (TLS handshake and CONNECT) in flight at once.
    #[arg(long, default_value_t = 128)]
    dial_concurrency: usize,

    /// How long to wait after the last stream closed before the final reading.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    settle: Duration,

    /// Size of the single-stream upload after the readings, in MiB (0: none).
    #[arg(long, default_value_t = 256)]
    upload_mib: u64,

    /// Directory holding cplink-server and cplink-agent (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    /// `LABEL [dir=PATH] [KEY=VALUE ...]`: one configuration to measure (repeatable; default
    /// `default`, the binaries as built, in the environment as it is).
    #[arg(long)]
    variant: Vec<String>,

    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,

    /// Only the idle readings: link each variant's pair, wait --idle-wait, read both
    /// processes' memory and threads; no tunnel is opened.
    #[arg(long)]
    idle: bool,

    /// With --idle, how long the linked pair sits idle before the reading.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    idle_wait: Duration,
}

/// One configuration: which binaries, with which environment.
#[derive(Debug, Clone)]
struct Variant {
    label: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Variant {
    fn parse(spec: &str, default_dir: &Path) -> anyhow::Result<Self> {
        let mut words = spec.split_whitespace();
        let label = words.next().context("an empty --variant")?.to_owned();
        let mut dir = default_dir.to_owned();
        let mut env = Vec::new();
        for word in words {
            let (key, value) = word
                .split_once('=')
                .with_context(|| format!("--variant {spec:?}: {word:?} is not KEY=VALUE"))?;
            if key == "dir" {
                dir = PathBuf::from(value);
            } else {
                env.push((key.to_owned(), value.to_owned()));
            }
        }
        Ok(Variant { label, dir, env })
    }

    /// The environment as `KEY=VALUE` words.
    fn env_words(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

/// Memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    /// Linked, before any tunnel.
    idle: u64,
    /// Highest RSS seen by the kernel (`VmHWM`) by the end of the load.
    peak: u64,
    /// Right after the server reported no active stream.
    after_close: u64,
    /// After the settle time.
    settled: u64,
}

impl Memory {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "idle_kib": self.idle,
            "peak_kib": self.peak,
            "after_close_kib": self.after_close,
            "settled_kib": self.settled,
            "returned": self.returned(),
        })
    }

    /// The share of the growth from idle to peak given back by the settled reading.
    fn returned(&self) -> f64 {
        let growth = self.peak.saturating_sub(self.idle);
        if growth == 0 {
            return 1.0;
        }
        self.peak.saturating_sub(self.settled) as f64 / growth as f64
    }
}

/// The figures of one variant.
#[derive(Debug, Clone)]
struct Outcome {
    label: String,
    env: Vec<String>,
    server: Memory,
    agent: Memory,
    tunnels: usize,
    dials_per_second: f64,
    upload_mib_per_second: Option<f64>,
    server_binary_bytes: u64,
    agent_binary_bytes: u64,
}

impl Outcome {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "env": self.env,
            "server": self.server.json(),
            "agent": self.agent.json(),
            "tunnels": self.tunnels,
            "dials_per_second": self.dials_per_second,
            "upload_mib_per_second": self.upload_mib_per_second,
            "server_binary_bytes": self.server_binary_bytes,
            "agent_binary_bytes": self.agent_binary_bytes,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.wave > 0 && cli.dial_concurrency > 0,
        "--wave and --dial-concurrency must be positive"
    );
    // Each held tunnel takes two descriptors in this process.
    cplink_e2e::procfs::raise_open_files_limit();
    let default_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => find_bin_dir()?,
    };
    let specs = if cli.variant.is_empty() {
        vec!["default".to_owned()]
    } else {
        cli.variant.clone()
    };
    let variants = specs
        .iter()
        .map(|s| Variant::parse(s, &default_dir))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let certs = Certificates::new()?;
    if cli.idle {
        let mut outcomes = Vec::new();
        for variant in &variants {
            eprintln!(
                "cplink-rss: {} ({}), idle for {}",
                variant.label,
                variant.dir.display(),
                humantime::format_duration(cli.idle_wait)
            );
            outcomes.push(measure_idle(&cli, variant, &certs).await?);
        }
        if cli.json {
            let json: Vec<_> = outcomes.iter().map(IdleOutcome::json).collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            print!("{}", render_idle(&outcomes, cli.idle_wait));
        }
        return Ok(());
    }
    let echo = cplink_e2e::targets::echo().await?;
    let sink = sink().await?;
    let mut outcomes = Vec::new();
    for variant in &variants {
        eprintln!(
            "cplink-rss: {} ({}), {} tunnels, {} at a time",
            variant.label,
            variant.dir.display(),
            cli.tunnels,
            cli.wave
        );
        outcomes.push(measure(&cli, variant, &certs, echo.addr, sink).await?);
    }
    if cli.json {
        let json: Vec<_> = outcomes.iter().map(Outcome::json).collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", render(&outcomes, cli.settle));
    }
    Ok(())
}

/// The nearest directory above this executable holding cplink-server and cplink-agent.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        if ["cplink-server", "cplink-agent"]
            .iter()
            .all(|b| d.join(b).is_file())
        {
            return Ok(d.to_owned());
        }
        dir = d.parent();
    }
    anyhow::bail!(
        "cplink-server and cplink-agent not found next to {}: build them \
         (`cargo build --release -p cplink-server -p cplink-agent`) or pass --bin-dir",
        exe.display()
    )
}

async fn measure(
    cli: &Cli,
    variant: &Variant,
    certs: &Certificates,
    echo: SocketAddr,
    sink: SocketAddr,
) -> anyhow::Result<Outcome> {
    let pair = Pair::start(variant, certs).await?;
    let result = load(cli, variant, certs, &pair, echo, sink).await;
    let logs = pair.stop().await;
    result.with_context(|| format!("variant {}; process logs:\n{logs}", variant.label))
}

/// What a linked pair holds while nothing goes through it.
#[derive(Debug, Clone)]
struct IdleOutcome {
    label: String,
    env: Vec<String>,
    /// `VmRSS`, KiB.
    server_rss: u64,
    server_threads: u64,
    /// `VmRSS`, KiB.
    agent_rss: u64,
    /// The part of `agent_rss` that is anonymous memory (heap, stacks, relocated data), KiB;
    /// the rest is mapped files, mostly the binary's own code.
    agent_rss_anon: u64,
    agent_threads: u64,
    agent_binary_bytes: u64,
}

impl IdleOutcome {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "env": self.env,
            "server_rss_kib": self.server_rss,
            "server_threads": self.server_threads,
            "agent_rss_kib": self.agent_rss,
            "agent_rss_anon_kib": self.agent_rss_anon,
            "agent_threads": self.agent_threads,
            "agent_binary_bytes": self.agent_binary_bytes,
        })
    }
}

async fn measure_idle(
    cli: &Cli,
    variant: &Variant,
    certs: &Certificates,
) -> anyhow::Result<IdleOutcome> {
    let pair = Pair::start(variant, certs).await?;
    tokio::time::sleep(cli.idle_wait).await;
    let read = || -> anyhow::Result<IdleOutcome> {
        Ok(IdleOutcome {
            label: variant.label.clone(),
            env: variant.env_words(),
            server_rss: pair.server.status("VmRSS")?,
            server_threads: pair.server.status("Threads")?,
            agent_rss: pair.agent.status("VmRSS")?,
            agent_rss_anon: pair.agent.status("RssAnon")?,
            agent_threads: pair.agent.status("Threads")?,
            agent_binary_bytes: std::fs::metadata(variant.dir.join("cplink-agent"))?.len(),
        })
    };
    let result = read();
    let logs = pair.stop().await;
    result.with_context(|| format!("variant {}; process logs:\n{logs}", variant.label))
}

async fn load(
    cli: &Cli,
    variant: &Variant,
    certs: &Certificates,
    pair: &Pair,
    echo: SocketAddr,
    sink: SocketAddr,
) -> anyhow::Result<Outcome> {
    let mut server = Memory {
        idle: pair.server.status("VmRSS")?,
        ..Memory::default()
    };
    let mut agent = Memory {
        idle: pair.agent.status("VmRSS")?,
        ..Memory::default()
    };

    let client = TlsClient::new(&certs.frontend, certs.pki.ca_file())?;
    let target = echo.to_string();
    let dials = Arc::new(Semaphore::new(cli.dial_concurrency));
    let start = Instant::now();
    let mut opened = 0;
    while opened < cli.tunnels {
        let count = cli.wave.min(cli.tunnels - opened);
        let mut set = JoinSet::new();
        for _ in 0..count {
            let client = client.clone();
            let target = target.clone();
            let dials = dials.clone();
            let frontend = pair.frontend;
            set.spawn(async move {
                let permit = dials.acquire_owned().await?;
                let stream = echo_once(&client, frontend, &target).await;
                drop(permit);
                stream
            });
        }
        let mut held = Vec::with_capacity(count);
        while let Some(stream) = set.join_next().await {
            held.push(stream??);
        }
        opened += count;
        // Closed as kube-apiserver closes them: close_notify, then FIN.
        let mut closing = JoinSet::new();
        for mut stream in held {
            closing.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), stream.shutdown()).await;
            });
        }
        while closing.join_next().await.is_some() {}
    }
    let dials_per_second = cli.tunnels as f64 / start.elapsed().as_secs_f64();

    pair.wait_streams_closed(Duration::from_secs(60)).await?;
    server.after_close = pair.server.status("VmRSS")?;
    agent.after_close = pair.agent.status("VmRSS")?;
    tokio::time::sleep(cli.settle).await;
    server.settled = pair.server.status("VmRSS")?;
    agent.settled = pair.agent.status("VmRSS")?;
    server.peak = pair.server.status("VmHWM")?;
    agent.peak = pair.agent.status("VmHWM")?;

    let upload_mib_per_second = if cli.upload_mib > 0 {
        let bytes = cli.upload_mib << 20;
        let took = upload(&client, pair.frontend, &sink.to_string(), bytes).await?;
        Some(cli.upload_mib as f64 / took.as_secs_f64())
    } else {
        None
    };

    Ok(Outcome {
        label: variant.label.clone(),
        env: variant.env_words(),
        server,
        agent,
        tunnels: cli.tunnels,
        dials_per_second,
        upload_mib_per_second,
        server_binary_bytes: std::fs::metadata(variant.dir.join("cplink-server"))?.len(),
        agent_binary_bytes: std::fs::metadata(variant.dir.join("cplink-agent"))?.len(),
    })
}

/// One tunnel through the TLS frontend, used for a 64-byte echo, left open.
async fn echo_once(
    client: &TlsClient,
    frontend: SocketAddr,
    target: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut stream = client.tunnel(frontend, target).await?;
    let request = [0x42u8; 64];
    let mut response = [0u8; 64];
    stream.write_all(&request).await?;
    stream.flush().await?;
    stream.read_exact(&mut response).await?;
    anyhow::ensure!(response == request, "the echo returned other bytes");
    Ok(stream)
}

/// Sends `bytes` through one tunnel to the sink; returns the time until it confirmed them all.
async fn upload(
    client: &TlsClient,
    frontend: SocketAddr,
    target: &str,
    bytes: u64,
) -> anyhow::Result<Duration> {
    let mut stream = client.tunnel(frontend, target).await?;
    let start = Instant::now();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut remaining = bytes;
    while remaining > 0 {
        let n = chunk
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        stream.write_all(&chunk[..n]).await?;
        remaining -= n as u64;
    }
    stream.shutdown().await?;
    let received = stream.read_u64().await?;
    anyhow::ensure!(
        received == bytes,
        "upload truncated: {received} of {bytes} bytes arrived"
    );
    Ok(start.elapsed())
}

/// A destination that counts the bytes until end of stream, then answers the count.
async fn sink() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = stream.write_u64(total).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Certificates for the server, the agent and the frontend client.
struct Certificates {
    dir: tempfile::TempDir,
    pki: Pki,
    server: CertFiles,
    agent: CertFiles,
    frontend: CertFiles,
}

impl Certificates {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path(), "rss")?;
        let server = pki.issue("server", &["localhost", "127.0.0.1"], Usage::Server)?;
        let agent = pki.issue("agent", &["agent"], Usage::Client)?;
        let frontend = pki.issue("apiserver", &["kube-apiserver"], Usage::Client)?;
        Ok(Certificates {
            dir,
            pki,
            server,
            agent,
            frontend,
        })
    }
}

/// A free loopback port (bound, then released).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A server or agent process; killed when dropped.
struct Process {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Process {
    fn spawn(
        variant: &Variant,
        binary: &str,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        let exe = variant.dir.join(binary);
        let child = Command::new(&exe)
            .args(args)
            .envs(variant.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let pid = child.id().context("the child exited at once")?;
        Ok(Process { child, pid, log })
    }

    /// A `kB` field of `/proc/<pid>/status`, in KiB.
    fn status(&self, field: &str) -> anyhow::Result<u64> {
        cplink_e2e::procfs::status_kib(self.pid, field)
    }

    /// Stops the process with SIGTERM, or kills it after 10 s; returns its log.
    async fn stop(mut self) -> String {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A linked server and agent.
struct Pair {
    server: Process,
    agent: Process,
    frontend: SocketAddr,
    server_admin: SocketAddr,
}

impl Pair {
    /// Starts both and waits until the agent is linked and both are ready.
    async fn start(variant: &Variant, certs: &Certificates) -> anyhow::Result<Self> {
        let (agent_address, frontend, server_admin, agent_admin) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let server_args = [
            "--server-id",
            "rss-server",
            "--agent-address",
            &agent_address.to_string(),
            "--frontend-address",
            &frontend.to_string(),
            "--admin-address",
            &server_admin.to_string(),
            "--tls-cert",
            &path(&certs.server.cert),
            "--tls-key",
            &path(&certs.server.key),
            "--agent-ca",
            &path(certs.pki.ca_file()),
            "--frontend-ca",
            &path(certs.pki.ca_file()),
            "--log-level",
            "warn",
        ]
        .map(str::to_owned);
        let server = Process::spawn(
            variant,
            "cplink-server",
            &server_args,
            certs
                .dir
                .path()
                .join(format!("{}-server.log", variant.label)),
        )?;
        let agent_args = [
            "--agent-id",
            "rss-agent",
            "--node-name",
            "rss-node",
            "--server-address",
            &agent_address.to_string(),
            "--server-name",
            "localhost",
            "--tls-cert",
            &path(&certs.agent.cert),
            "--tls-key",
            &path(&certs.agent.key),
            "--server-ca",
            &path(certs.pki.ca_file()),
            "--allow",
            "127.0.0.0/8",
            "--admin-address",
            &agent_admin.to_string(),
            "--log-level",
            "warn",
        ]
        .map(str::to_owned);
        let agent = Process::spawn(
            variant,
            "cplink-agent",
            &agent_args,
            certs
                .dir
                .path()
                .join(format!("{}-agent.log", variant.label)),
        )?;
        let pair = Pair {
            server,
            agent,
            frontend,
            server_admin,
        };
        let linked = async {
            wait_metric(
                server_admin,
                "cplink_server_agents_linked",
                1,
                Duration::from_secs(30),
            )
            .await?;
            wait_metric(
                agent_admin,
                "cplink_agent_links_up",
                1,
                Duration::from_secs(30),
            )
            .await
        };
        match linked.await {
            Ok(()) => {
                // Let start-up work (first link handshake, lazily built state) finish.
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(pair)
            }
            Err(e) => {
                let logs = pair.stop().await;
                Err(e.context(format!("the pair never linked; logs:\n{logs}")))
            }
        }
    }

    async fn wait_streams_closed(&self, within: Duration) -> anyhow::Result<()> {
        wait_metric(self.server_admin, "cplink_server_streams_active", 0, within).await
    }

    /// Stops the agent, then the server; returns their logs.
    async fn stop(self) -> String {
        let agent = self.agent.stop().await;
        let server = self.server.stop().await;
        format!("--- agent\n{agent}--- server\n{server}")
    }
}

/// Polls `admin`'s `/metrics` until the unlabelled gauge `name` reads `value`.
async fn wait_metric(
    admin: SocketAddr,
    name: &str,
    value: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Ok(text) = get(admin, "/metrics").await {
            last = text.lines().find_map(|line| {
                let (metric, figure) = line.split_once(' ')?;
                (metric == name).then(|| figure.trim().parse::<f64>().ok())?
            });
            if last == Some(value as f64) {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{admin}: {name} still {last:?} after {within:?}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of a plain HTTP/1.1 GET.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let (head, body) = answer.split_once("\r\n\r\n").context("no answer head")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_owned())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn render_idle(outcomes: &[IdleOutcome], idle_wait: Duration) -> String {
    let mut out = format!(
        "| variant | agent RSS, idle {} | of which anonymous | agent threads | server RSS \
         | server threads | agent binary |\n|---|---:|---:|---:|---:|---:|---:|\n",
        humantime::format_duration(idle_wait)
    );
    for o in outcomes {
        let label = if o.env.is_empty() {
            o.label.clone()
        } else {
            format!("{} ({})", o.label, o.env.join(" "))
        };
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {:.2} MiB |\n",
            mib(o.agent_rss),
            mib(o.agent_rss_anon),
            o.agent_threads,
            mib(o.server_rss),
            o.server_threads,
            o.agent_binary_bytes as f64 / f64::from(1u32 << 20),
        ));
    }
    out
}

fn render(outcomes: &[Outcome], settle: Duration) -> String {
    let mut out = String::new();
    let first = outcomes.first();
    let relative = |value: f64, base: Option<f64>| match base {
        Some(base) if base > 0.0 => format!(" ({:.2}×)", value / base),
        _ => String::new(),
    };
    let settled = humantime::format_duration(settle);
    out.push_str(&format!(
        "| variant | server idle | server peak (VmHWM) | server after close | server after {settled} \
         | server growth returned | agent idle | agent peak | agent after {settled} \
         | agent growth returned | dials/s | upload, 1 stream | server binary |\n"
    ));
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for o in outcomes {
        let label = if o.env.is_empty() {
            o.label.clone()
        } else {
            format!("{} ({})", o.label, o.env.join(" "))
        };
        let upload = match o.upload_mib_per_second {
            Some(rate) => format!(
                "{rate:.0} MiB/s{}",
                relative(rate, first.and_then(|f| f.upload_mib_per_second))
            ),
            None => "—".to_owned(),
        };
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} ({:.2}× idle) | {:.0} % | {} | {} | {} ({:.2}× idle) \
             | {:.0} % | {:.0}{} | {upload} | {:.2} MiB{} |\n",
            mib(o.server.idle),
            mib(o.server.peak),
            mib(o.server.after_close),
            mib(o.server.settled),
            o.server.settled as f64 / o.server.idle.max(1) as f64,
            o.server.returned() * 100.0,
            mib(o.agent.idle),
            mib(o.agent.peak),
            mib(o.agent.settled),
            o.agent.settled as f64 / o.agent.idle.max(1) as f64,
            o.agent.returned() * 100.0,
            o.dials_per_second,
            relative(o.dials_per_second, first.map(|f| f.dials_per_second)),
            o.server_binary_bytes as f64 / f64::from(1u32 << 20),
            relative(
                o.server_binary_bytes as f64,
                first.map(|f| f.server_binary_bytes as f64)
            ),
        ));
    }
    out
}
