//! `cplink-scale`: one cplink-server and thousands of linked agents on one machine.
//!
//! The server is the real `cplink-server` binary (found next to this executable, where
//! `cargo build --bins` puts it), so that its memory and CPU are its own. The agents run in
//! `--agent-processes` child processes (this binary, re-executed), each running its share of
//! `--agents` agents through the agent library, with the identifiers a node's agent announces:
//! agent `i` is `node-<i>` with host IP `127.64.<i/256>.<i%256>` and pod range
//! `127.<128+i/256>.<i%256>.0/24`, all on loopback. Each agent process also runs a destination
//! that accepts connections and holds them.
//!
//! It measures, in order:
//!
//! 1. the server's memory per linked agent, and how long the agents take to link from cold;
//! 2. the server's idle CPU with every agent linked (keepalives), and its CPU per dial for each
//!    routing strategy (node by host IP, pod CIDR, and `any` for an address no agent claims),
//!    with one agent linked and then with all of them, less that idle share: the dials go
//!    through the Unix socket frontend to a closed port, so each ends in the agent's `502` and
//!    the figure is the server's routing and stream work;
//! 3. `--streams` idle tunneled connections over konnectivity's gRPC frontend (a Proxy stream
//!    each, `--grpc-connections` HTTP/2 connections), spread over the agents by `any`: the
//!    server's memory per connection and its CPU while they idle;
//! 4. the reconnect storm: the server is killed and started again on the same addresses, and
//!    the time until every agent linked again, with how many relinked in each second (the
//!    agents' backoff jitter spreads them).
//!
//! ```text
//! make bench-scale
//! cargo run --release -p cplink-e2e --bin cplink-scale -- --agents 5000 --streams 100000
//! ```
//!
//! It prints figures and asserts nothing: they depend on the machine and its load.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cplink_e2e::client;
use cplink_e2e::grpc::ProxyStream;
use cplink_e2e::pki::{Pki, Usage};
use cplink_e2e::{harness, http1, metrics, procfs};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

/// Drives one cplink-server with thousands of agents and idle tunneled connections.
#[derive(Debug, Parser)]
#[command(name = "cplink-scale", version)]
struct Cli {
    /// Agents to link (at most 32768: their pod ranges are /24s of 127.128.0.0/9).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=32_768))]
    agents: u32,

    /// Processes the agents run in (each holds its agents' links and destination sockets,
    /// within its open-files limit).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=256))]
    agent_processes: u32,

    /// Idle tunneled connections to hold.
    #[arg(long, default_value_t = 100_000)]
    streams: usize,

    /// HTTP/2 connections to the gRPC frontend the idle connections are spread over.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    grpc_connections: u32,

    /// Dials per routing strategy.
    #[arg(long, default_value_t = 2_000)]
    dials: usize,

    /// How long the server's idle CPU is watched (with the agents linked, and again with the
    /// idle connections held).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle_for: Duration,

    /// Where `cplink-server` is (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    #[command(subcommand)]
    role: Option<Role>,
}

/// The child processes' role.
#[derive(Debug, Subcommand)]
enum Role {
    /// Run agents `first..first+count` and a destination, print its port, stop when standard
    /// input closes.
    #[command(hide = true)]
    Agents {
        #[arg(long)]
        first: u32,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

/// How long any one phase may take before the run fails, naming it.
const PHASE: Duration = Duration::from_secs(600);
/// The closed port the routing dials go to.
const CLOSED_PORT: u16 = 1;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    procfs::raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = match cli.role {
        Some(Role::Agents {
            first,
            count,
            server,
            ref ca,
            ref cert,
            ref key,
        }) => runtime.block_on(run_agents(first, count, server, ca, cert, key)),
        None => runtime.block_on(run(&cli)),
    };
    // Tasks of links and held connections end with their sockets; do not wait on them.
    runtime.shutdown_timeout(Duration::from_secs(5));
    outcome
}

fn progress(what: &str) {
    eprintln!("cplink-scale: {what}");
}

/// Agent `i`'s host IP.
fn host_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 64, (i / 256) as u8, (i % 256) as u8)
}

/// Agent `i`'s pod range, a /24.
fn pod_cidr(i: u32) -> (Ipv4Addr, u8) {
    (
        Ipv4Addr::new(127, 128 + (i / 256) as u8, (i % 256) as u8, 0),
        24,
    )
}

async fn run_agents(
    first: u32,
    count: u32,
    server: SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<()> {
    let destination = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", destination.local_addr()?.port());
    let shutdown = harness::shutdown_on_stdin_eof()?;
    let holder = shutdown.clone();
    tokio::spawn(async move {
        // Accept and hold every connection until it ends; errors (EMFILE) pause the loop.
        loop {
            tokio::select! {
                () = holder.cancelled() => return,
                accepted = destination.accept() => match accepted {
                    Ok((mut stream, _)) => {
                        tokio::spawn(async move {
                            let mut buf = [0u8; 512];
                            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
            }
        }
    });
    let mut agents = JoinSet::new();
    for i in first..first + count {
        let (cidr, bits) = pod_cidr(i);
        let args = [
            "cplink-agent".to_owned(),
            format!("--agent-id=node-{i}"),
            format!("--node-name=node-{i}"),
            format!("--host-ip={}", host_ip(i)),
            format!("--pod-cidr={cidr}/{bits}"),
            format!("--server-address={server}"),
            "--server-name=localhost".to_owned(),
            format!("--server-ca={}", ca.display()),
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
            "--allow=127.0.0.0/8".to_owned(),
        ];
        let args = cplink_agent::Args::try_parse_from(args)?;
        if i == first {
            // Link failures during the reconnect storm are expected; errors only.
            let mut log = args.log.clone();
            log.log_level = "error".to_owned();
            log.init()?;
        }
        let agent = cplink_agent::Agent::new(args.into_config()?);
        agents.spawn(agent.run(None, shutdown.clone()));
    }
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while agents.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// The server process, with the arguments to start it again on the same addresses.
struct Server {
    child: Child,
    pid: u32,
    binary: PathBuf,
    args: Vec<String>,
    agent_address: SocketAddr,
    admin: SocketAddr,
    uds: PathBuf,
    grpc: PathBuf,
}

impl Server {
    async fn start(bin_dir: &Path, dir: &Path, pki: &Pki, capacity: usize) -> anyhow::Result<Self> {
        let binary = bin_dir.join("cplink-server");
        anyhow::ensure!(
            binary.is_file(),
            "{} not found: build it (`cargo build --release -p cplink-server`) or pass --bin-dir",
            binary.display()
        );
        let cert = pki.issue("server", &["localhost", "127.0.0.1"], Usage::Server)?;
        let free = || -> anyhow::Result<SocketAddr> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let (agent_address, admin) = (free()?, free()?);
        let uds = dir.join("frontend.sock");
        let grpc = dir.join("grpc.sock");
        let args = vec![
            "--server-id=scale".to_owned(),
            format!("--agent-address={agent_address}"),
            format!("--admin-address={admin}"),
            format!("--frontend-uds={}", uds.display()),
            format!("--grpc-uds={}", grpc.display()),
            format!("--tls-cert={}", cert.cert.display()),
            format!("--tls-key={}", cert.key.display()),
            format!("--agent-ca={}", pki.ca_file().display()),
            format!("--max-tunnels={capacity}"),
            "--strategies=node,cidr,any".to_owned(),
            "--shutdown-delay=0s".to_owned(),
            "--log-level=error".to_owned(),
        ];
        let (child, pid) = spawn_server(&binary, &args)?;
        let server = Server {
            child,
            pid,
            binary,
            args,
            agent_address,
            admin,
            uds,
            grpc,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let admin = self.admin;
        cplink_e2e::wait::until_async(
            "the server's /healthz",
            Duration::from_secs(30),
            || async move { http1::get(admin, "/healthz").await.is_ok() },
        )
        .await
    }

    /// Kills the server (as a crash would) and starts it again on the same addresses.
    async fn restart(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        for socket in [&self.uds, &self.grpc] {
            let _ = std::fs::remove_file(socket);
        }
        let (child, pid) = spawn_server(&self.binary, &self.args)?;
        self.child = child;
        self.pid = pid;
        self.wait_healthy().await
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        procfs::rss_kib(self.pid)
    }

    fn cpu(&self) -> anyhow::Result<Duration> {
        procfs::cpu(self.pid)
    }

    /// The server's CPU use over `window` (a measurement, not a wait), as a share of a core.
    async fn cpu_rate(&self, window: Duration) -> anyhow::Result<f64> {
        let before = self.cpu()?;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let spent = self.cpu()?.saturating_sub(before);
        Ok(spent.as_secs_f64() / started.elapsed().as_secs_f64())
    }

    /// Agents linked now.
    async fn linked(&self) -> anyhow::Result<u64> {
        let text = http1::get(self.admin, "/metrics").await?;
        Ok(metrics::counter(&text, "cplink_server_agents_linked ", "") as u64)
    }

    /// Polls until `agents` are linked; returns how many had linked at each poll.
    async fn wait_linked(&self, agents: u64) -> anyhow::Result<Vec<(Duration, u64)>> {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let linked = self.linked().await.unwrap_or(0);
            seen.push((start.elapsed(), linked));
            if linked >= agents {
                return Ok(seen);
            }
            anyhow::ensure!(
                start.elapsed() < PHASE,
                "only {linked} of {agents} agents linked after {PHASE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn spawn_server(binary: &Path, args: &[String]) -> anyhow::Result<(Child, u32)> {
    let child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let pid = child.id().context("the server exited at once")?;
    Ok((child, pid))
}

/// A child process running agents; stopped by closing its standard input.
struct Agents {
    child: Child,
    /// Its destination's port on 127.0.0.1.
    destination: u16,
}

impl Agents {
    async fn start(
        first: u32,
        count: u32,
        server: SocketAddr,
        pki: &Pki,
        cert: &cplink_e2e::pki::CertFiles,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("agents")
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--server", &server.to_string()])
            .arg("--ca")
            .arg(pki.ca_file())
            .arg("--cert")
            .arg(&cert.cert)
            .arg("--key")
            .arg(&cert.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start an agent process")?;
        let stdout = child.stdout.take().context("stdout not piped")?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .context("an agent process did not report its destination")??;
        let destination = line
            .trim()
            .parse()
            .with_context(|| format!("an agent process reported {line:?}"))?;
        Ok(Agents { child, destination })
    }

    async fn stop(mut self) {
        harness::stop_by_closing_stdin(&mut self.child, Duration::from_secs(15)).await;
    }
}

/// The figures of a run.
#[derive(Default)]
struct Figures {
    lines: Vec<(String, String)>,
}

impl Figures {
    fn add(&mut self, what: impl Into<String>, figure: impl Into<String>) {
        let (what, figure) = (what.into(), figure.into());
        progress(&format!("{what}: {figure}"));
        self.lines.push((what, figure));
    }

    fn print(&self) {
        let width = self
            .lines
            .iter()
            .map(|(w, _)| w.chars().count())
            .max()
            .unwrap_or(0);
        for (what, figure) in &self.lines {
            let pad = width - what.chars().count();
            println!("{what}{}  {figure}", " ".repeat(pad));
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        progress("debug build: figures are not representative, use `make bench-scale`");
    }
    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this executable has no directory")?
            .to_owned(),
    };
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "scale")?;
    let agent_cert = pki.issue("agent", &["agent"], Usage::Client)?;
    let capacity = cli.streams + cli.dials * 4 + 1024;
    let mut server = Server::start(&bin_dir, dir.path(), &pki, capacity).await?;
    let mut figures = Figures::default();
    let agents = cli.agents;

    progress("one agent: routing cost");
    let idle = server.rss_kib()?;
    let mut processes = vec![Agents::start(0, 1, server.agent_address, &pki, &agent_cert).await?];
    server.wait_linked(1).await?;
    let one = routing(&server, 1, cli.dials, 0.0).await?;

    progress(&format!("linking {agents} agents"));
    let before = server.rss_kib()?;
    let started = Instant::now();
    let per_process = (agents - 1).div_ceil(cli.agent_processes).max(1);
    let mut first = 1;
    while first < agents {
        let count = per_process.min(agents - first);
        processes.push(Agents::start(first, count, server.agent_address, &pki, &agent_cert).await?);
        first += count;
    }
    server.wait_linked(u64::from(agents)).await?;
    let took = started.elapsed();
    let linked = server.rss_kib()?;
    figures.add("server RSS, no agent", mib(idle));
    figures.add(
        format!("server RSS, {agents} agents linked"),
        format!(
            "{} ({:.1} KiB per agent)",
            mib(linked),
            linked.saturating_sub(before) as f64 / f64::from(agents - 1).max(1.0)
        ),
    );
    figures.add(
        format!("{agents} agents linked from cold in"),
        format!("{:.1} s", took.as_secs_f64()),
    );

    // Linked agents cost the server CPU of their own (keepalives); measured apart, and taken
    // out of the dials' figures.
    let background = server.cpu_rate(cli.idle_for).await?;
    figures.add(
        format!("server CPU, {agents} agents linked, idle"),
        format!("{:.1} % of a core", background * 100.0),
    );
    let many = routing(&server, agents, cli.dials, background).await?;
    for ((strategy, cost_one), (_, cost_many)) in one.iter().zip(&many) {
        figures.add(
            format!("server CPU per dial, {strategy}"),
            format!(
                "{:.0} µs with {agents} agents, {:.0} µs with 1",
                cost_many.as_secs_f64() * 1e6,
                cost_one.as_secs_f64() * 1e6
            ),
        );
    }

    idle_streams(cli, &server, &processes, &mut figures).await?;

    progress("reconnect storm: killing and restarting the server");
    server.restart().await?;
    let relinked = server.wait_linked(u64::from(agents)).await?;
    storm(&relinked, agents, &mut figures);

    for process in processes {
        process.stop().await;
    }
    let _ = server.child.start_kill();
    let _ = server.child.wait().await;
    figures.print();
    Ok(())
}

/// The server's CPU per dial for each strategy, with agents `0..agents` linked, less its
/// `background` CPU (a share of a core).
async fn routing(
    server: &Server,
    agents: u32,
    dials: usize,
    background: f64,
) -> anyhow::Result<Vec<(&'static str, Duration)>> {
    let uds = Arc::new(server.uds.clone());
    let mut costs = Vec::new();
    type Target = fn(u32) -> String;
    let strategies: [(&str, Target); 3] = [
        ("node (host IP)", |i| {
            format!("{}:{CLOSED_PORT}", host_ip(i))
        }),
        ("pod CIDR", |i| {
            let (net, _) = pod_cidr(i);
            let [a, b, c, _] = net.octets();
            format!("{a}.{b}.{c}.7:{CLOSED_PORT}")
        }),
        ("any", |_| format!("127.0.0.1:{CLOSED_PORT}")),
    ];
    for (name, target) in strategies {
        let before = server.cpu()?;
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        let per_task = dials.div_ceil(8);
        for t in 0..8u32 {
            let uds = uds.clone();
            tasks.spawn(async move {
                for n in 0..per_task {
                    // Spread over every agent, deterministically.
                    let i = (t as usize * per_task + n) as u32 * 7919 % agents;
                    let mut stream = tokio::net::UnixStream::connect(uds.as_path()).await?;
                    let answer = client::handshake(&mut stream, &target(i)).await?;
                    // The closed port makes every dial end in the agent's 502.
                    anyhow::ensure!(
                        answer.status == 502,
                        "CONNECT {}: {} {}",
                        target(i),
                        answer.status,
                        answer.body
                    );
                }
                Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let spent = server.cpu()?.saturating_sub(before);
        let idle = started.elapsed().mul_f64(background);
        costs.push((name, spent.saturating_sub(idle) / (per_task * 8) as u32));
    }
    Ok(costs)
}

/// Holds `cli.streams` idle tunneled connections over the gRPC frontend and measures them.
async fn idle_streams(
    cli: &Cli,
    server: &Server,
    processes: &[Agents],
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let streams = cli.streams;
    progress(&format!("opening {streams} idle tunneled connections"));
    let mut channels = Vec::new();
    for _ in 0..cli.grpc_connections {
        channels.push(cplink_e2e::grpc::uds_channel(&server.grpc).await?);
    }
    let destinations: Arc<Vec<u16>> = Arc::new(processes.iter().map(|p| p.destination).collect());
    let before = server.rss_kib()?;
    let cpu_before = server.cpu()?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let workers = 64usize;
    for w in 0..workers {
        let channels = channels.clone();
        let destinations = destinations.clone();
        tasks.spawn(async move {
            let mut held = Vec::new();
            let mut n = w;
            while n < streams {
                let channel = channels[n % channels.len()].clone();
                let port = destinations[n % destinations.len()];
                let (stream, id) = ProxyStream::connect(channel, &format!("127.0.0.1:{port}"))
                    .await
                    .with_context(|| format!("idle connection {n}"))?;
                held.push((stream, id));
                n += workers;
            }
            anyhow::Ok(held)
        });
    }
    let mut held = Vec::with_capacity(streams);
    while let Some(done) = tasks.join_next().await {
        held.extend(done??);
    }
    let opened = started.elapsed();
    let open_cpu = server.cpu()?.saturating_sub(cpu_before);
    let holding = server.rss_kib()?;
    let idle = server.cpu_rate(cli.idle_for).await?;
    figures.add(
        format!("{streams} idle connections opened in"),
        format!(
            "{:.1} s ({:.0}/s, server CPU {:.0} µs each)",
            opened.as_secs_f64(),
            streams as f64 / opened.as_secs_f64(),
            open_cpu.as_secs_f64() * 1e6 / streams as f64
        ),
    );
    figures.add(
        format!("server RSS, {streams} idle connections"),
        format!(
            "{} ({:.1} KiB per connection)",
            mib(holding),
            holding.saturating_sub(before) as f64 / streams as f64
        ),
    );
    figures.add(
        "server CPU while they idle",
        format!("{:.1} % of a core", 100.0 * idle),
    );
    drop(held);
    drop(channels);
    Ok(())
}

/// Prints how the agents came back after the restart: time to half, nine in ten and all, and
/// the busiest second.
fn storm(seen: &[(Duration, u64)], agents: u32, figures: &mut Figures) {
    let when = |share: f64| {
        seen.iter()
            .find(|(_, n)| *n as f64 >= share * f64::from(agents))
            .map_or(f64::NAN, |(t, _)| t.as_secs_f64())
    };
    let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last = 0;
    for (t, n) in seen {
        *per_second.entry(t.as_secs()).or_default() += n.saturating_sub(last);
        last = last.max(*n);
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    figures.add(
        format!("relinked after a server restart, {agents} agents"),
        format!(
            "half in {:.1} s, 90 % in {:.1} s, all in {:.1} s; at most {busiest} in one second",
            when(0.5),
            when(0.9),
            when(1.0)
        ),
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
