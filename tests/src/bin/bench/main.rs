//! `cplink-bench`: the tunnel against direct TCP, measured in the same run.
//!
//! A destination runs in this process; a cplink-server and a cplink-agent run as child
//! processes (this binary, re-executed), linked over TLS on loopback. Every workload runs four
//! ways: straight to the destination, and through each of the server's frontends, the ones
//! kube-apiserver's egress selector can use:
//!
//! - the Unix socket CONNECT frontend (`HTTPConnect` over `UDS`);
//! - the TLS CONNECT frontend (`HTTPConnect` over `TCP`);
//! - the konnectivity gRPC frontend on a Unix socket (`GRPC` over `UDS`): one HTTP/2
//!   connection, a `/ProxyService/Proxy` stream per tunneled connection, as newer
//!   kube-apiservers do. Each stream is turned back into a byte stream in this process, as
//!   konnectivity-client does, so that the same workloads run over it.
//!
//! A fifth route is the baseline: OpenSSH's reverse dynamic forward (`ssh -R`, sshd's SOCKS
//! port), when OpenSSH is installed.
//!
//! The table shows each figure and its ratio to direct TCP, and the CPU time the tunnel's two
//! processes (server and agent, or sshd and ssh) spent per GiB moved and per dial, read from
//! `/proc/<pid>/stat`: time is noisy on a shared machine, CPU per unit of work far steadier.
//! Nothing is asserted: these are
//! measurements, and shared machines are noisy; run it a few times before drawing conclusions.
//! A workload that loses bytes on a route fails the run, though.
//!
//! ```text
//! cargo run --release -p cplink-e2e --bin cplink-bench -- [--quick] [--markdown]
//! ```

mod openssh;
mod procs;
mod report;
mod workloads;

use std::num::NonZeroUsize;

use anyhow::Context as _;
use clap::Parser;
use cplink_e2e::client::TlsClient;

use crate::openssh::OpenSsh;
use crate::procs::{Certificates, Cpu, Ends, ExtraFlags, Pair};
use crate::report::{Report, Stats};
use crate::workloads::{Direction, Route};

/// Benchmarks the cplink tunnel against direct TCP on loopback.
#[derive(Debug, Parser)]
#[command(name = "cplink-bench", version)]
struct Cli {
    /// Smaller workloads (64 MiB transfers, fewer samples): a smoke run, not a measurement.
    #[arg(long)]
    quick: bool,

    /// Print the table as Markdown, as recorded in the README.
    #[arg(long)]
    markdown: bool,

    /// Run only these workloads (comma-separated), for profiling one of them.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Workload>,

    /// Measure only these paths besides direct TCP (comma-separated), for profiling one of
    /// them.
    #[arg(long, value_enum, value_delimiter = ',')]
    through: Vec<Through>,

    /// A flag for every cplink-server the benchmark starts, after its own (repeatable), e.g.
    /// `--server-flag=--worker-threads=1`.
    #[arg(long = "server-flag", value_name = "FLAG", allow_hyphen_values = true)]
    server_flags: Vec<String>,

    /// A flag for every cplink-agent the benchmark starts, after its own (repeatable), e.g.
    /// `--agent-flag=--worker-threads=1`.
    #[arg(long = "agent-flag", value_name = "FLAG", allow_hyphen_values = true)]
    agent_flags: Vec<String>,

    /// Agents per server, each its own process with its own link: with more than one, the
    /// server spreads the tunnels over their links (the least loaded first), which measures
    /// what several links between one agent and one server would do. Their CPU, wake-ups and
    /// RSS are added up as the agent's.
    #[arg(long, value_name = "N", default_value = "1")]
    agents: NonZeroUsize,
}

/// The paths measured beside direct TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Through {
    /// cplink through its Unix socket (HTTP CONNECT) frontend.
    Uds,
    /// cplink through its TLS (HTTP CONNECT) frontend.
    Tls,
    /// cplink through its Konnectivity gRPC frontend.
    Grpc,
    /// OpenSSH's reverse dynamic forward.
    Openssh,
}

/// The workloads, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// RSS with idle connections held, and of a linked idle server and agent.
    Memory,
    /// One stream, client to destination.
    Upload,
    /// One stream, destination to client.
    Download,
    /// Several streams at once, both directions.
    Parallel,
    /// Small request/response round trips.
    Latency,
    /// New connections per second.
    Dials,
    /// Round trips during a bulk upload.
    Bulk,
}

/// How much work each measurement does.
struct Sizes {
    single: u64,
    parallel: u64,
    streams: usize,
    warmup: usize,
    samples: usize,
    bulk_samples: usize,
    dials: usize,
    dial_concurrency: usize,
    idle: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                single: 64 << 20,
                parallel: 64 << 20,
                streams: 8,
                warmup: 200,
                samples: 2_000,
                bulk_samples: 1_000,
                dials: 400,
                dial_concurrency: 8,
                idle: 1_000,
            }
        } else {
            Sizes {
                single: 1 << 30,
                parallel: 1 << 30,
                streams: 8,
                warmup: 2_000,
                samples: 20_000,
                bulk_samples: 10_000,
                dials: 3_000,
                dial_concurrency: 8,
                idle: 1_000,
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let plan = Plan {
        sizes: Sizes::new(cli.quick),
        workloads: cli.only,
        through: cli.through,
        extra: ExtraFlags {
            server: cli.server_flags,
            agent: cli.agent_flags,
            agents: cli.agents,
        },
    };
    let report = tokio::runtime::Runtime::new()?.block_on(run(&plan))?;
    print!("{}", report.render(cli.markdown));
    Ok(())
}

fn progress(what: &str) {
    eprintln!("cplink-bench: {what}");
}

/// What one run of the benchmark measures.
struct Plan {
    sizes: Sizes,
    /// Empty for all.
    workloads: Vec<Workload>,
    /// Empty for all.
    through: Vec<Through>,
    extra: ExtraFlags,
}

impl Plan {
    fn wanted(&self, workload: Workload) -> bool {
        self.workloads.is_empty() || self.workloads.contains(&workload)
    }

    fn through(&self, path: Through) -> bool {
        self.through.is_empty() || self.through.contains(&path)
    }

    fn frontends(&self) -> impl Iterator<Item = Frontend> + '_ {
        Frontend::ALL
            .into_iter()
            .filter(|frontend| self.through(frontend.path()))
    }
}

async fn run(plan: &Plan) -> anyhow::Result<Report> {
    let (sizes, extra) = (&plan.sizes, &plan.extra);
    let wanted = |w: Workload| plan.wanted(w);
    if cfg!(debug_assertions) {
        progress("debug build: figures are not representative, use `make bench`");
    }
    let certs = Certificates::new()?;
    let destination = workloads::destination().await?;
    let tunnel = Tunnel {
        client: TlsClient::new(&certs.frontend, certs.ca())?,
        target: destination.to_string(),
    };
    let mut report = Report::new(sizes.single, sizes.idle);

    // Memory first, each frontend on a fresh server and agent, so that none inherits another's
    // heap.
    for frontend in plan.frontends() {
        if !wanted(Workload::Memory) {
            break;
        }
        let pair = Pair::start(&certs, extra).await?;
        if !report.has_idle_rss() {
            // A linked pair before any connection: what an agent costs on every node.
            let (server, agent) = (pair.server.rss_kib()?, pair.agents_rss_kib()?);
            report.idle_rss(frontend.column(), server, agent);
        }
        let route = tunnel.route(&pair, frontend).await?;
        hold_idle(
            &mut report,
            frontend.column(),
            frontend.name(),
            &pair,
            &route,
            sizes,
        )
        .await?;
        drop(route);
        pair.stop().await;
    }
    if wanted(Workload::Memory)
        && plan.through(Through::Openssh)
        && let Some(ssh) = openssh().await?
    {
        let route = Route::Socks {
            proxy: ssh.socks,
            target: destination,
        };
        hold_idle(&mut report, report::OPENSSH, "OpenSSH", &ssh, &route, sizes).await?;
        ssh.stop().await;
    }

    let pair = Pair::start(&certs, extra).await?;
    let ssh = match plan.through(Through::Openssh) {
        true => openssh().await?,
        false => None,
    };
    let mut routes: Vec<(usize, Route, Option<&dyn Ends>)> =
        vec![(report::DIRECT, Route::Direct(destination), None)];
    for frontend in plan.frontends() {
        let route = tunnel.route(&pair, frontend).await?;
        routes.push((frontend.column(), route, Some(&pair)));
    }
    if let Some(ssh) = &ssh {
        let route = Route::Socks {
            proxy: ssh.socks,
            target: destination,
        };
        routes.push((report::OPENSSH, route, Some(ssh)));
    }

    if wanted(Workload::Upload) {
        progress(&format!(
            "single-stream upload of {} MiB",
            sizes.single >> 20
        ));
        for (column, route, ends) in &routes {
            let (took, cpu) = metered(*ends, workloads::upload(route, sizes.single)).await?;
            report.upload(*column, took, cpu);
        }
    }
    if wanted(Workload::Download) {
        progress(&format!(
            "single-stream download of {} MiB",
            sizes.single >> 20
        ));
        for (column, route, ends) in &routes {
            let (took, cpu) = metered(*ends, workloads::download(route, sizes.single)).await?;
            report.download(*column, took, cpu);
        }
    }
    for direction in [Direction::Up, Direction::Down] {
        if !wanted(Workload::Parallel) {
            break;
        }
        progress(&format!(
            "{} streams, {} MiB in all, {direction:?}",
            sizes.streams,
            sizes.parallel >> 20
        ));
        for (column, route, ends) in &routes {
            let work = workloads::parallel(route, sizes.streams, sizes.parallel, direction);
            let (took, cpu) = metered(*ends, work).await?;
            report.parallel(*column, direction, sizes.streams, sizes.parallel, took, cpu);
        }
    }
    if wanted(Workload::Latency) {
        progress(&format!("{} request/response round trips", sizes.samples));
        for (column, route, ends) in &routes {
            let work = workloads::round_trips(route, sizes.warmup, sizes.samples);
            let (times, cpu) = metered(*ends, work).await?;
            report.latency(*column, Stats::of(times), sizes.warmup + sizes.samples, cpu);
        }
    }
    if wanted(Workload::Dials) {
        progress(&format!(
            "{} new connections, {} at a time",
            sizes.dials, sizes.dial_concurrency
        ));
        for (column, route, ends) in &routes {
            let work = workloads::dial_rate(route, sizes.dials, sizes.dial_concurrency);
            let (rate, cpu) = metered(*ends, work).await?;
            report.dial_rate(*column, rate, sizes.dials, cpu);
        }
    }
    if wanted(Workload::Bulk) {
        progress(&format!(
            "{} round trips during a bulk upload",
            sizes.bulk_samples
        ));
        for (column, route, _) in &routes {
            let (times, rate) =
                workloads::round_trips_under_bulk(route, sizes.warmup, sizes.bulk_samples).await?;
            report.under_bulk(*column, Stats::of(times), rate);
        }
    }
    drop(routes);
    pair.stop().await;
    if let Some(ssh) = ssh {
        ssh.stop().await;
    }
    Ok(report)
}

/// OpenSSH's forward for the baseline column, or `None` with a word on the missing column.
async fn openssh() -> anyhow::Result<Option<OpenSsh>> {
    static TOLD: std::sync::Once = std::sync::Once::new();
    let ssh = OpenSsh::start().await?;
    if ssh.is_none() {
        TOLD.call_once(|| {
            progress("OpenSSH is not installed (scripts/setup.sh installs it): no baseline");
        });
    }
    Ok(ssh)
}

/// Holds `sizes.idle` idle connections over `route`, and records what they cost `ends`.
async fn hold_idle(
    report: &mut Report,
    column: usize,
    name: &str,
    ends: &dyn Ends,
    route: &Route,
    sizes: &Sizes,
) -> anyhow::Result<()> {
    progress(&format!("holding {} idle connections ({name})", sizes.idle));
    // Warm up lazily allocated state (TLS sessions, h2 buffers, metric series).
    workloads::close_all(workloads::hold_idle(route, 50).await?).await?;
    let (server, agent) = ends.rss_kib()?;
    let held = workloads::hold_idle(route, sizes.idle).await?;
    let (server_held, agent_held) = ends.rss_kib()?;
    report.held(column, server_held, agent_held, server + agent);
    workloads::close_all(held).await?;
    Ok(())
}

/// Runs `work` and, for a route through a tunnel, measures the CPU time its two `ends`
/// spent meanwhile. The client and the destination run in this process and are not counted:
/// they are the same for every route.
async fn metered<T>(
    ends: Option<&dyn Ends>,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Option<Cpu>)> {
    let before = ends.map(Ends::cpu).transpose()?;
    let done = work.await?;
    let used = match (ends, before) {
        (Some(ends), Some(before)) => Some(ends.cpu()?.since(before)),
        _ => None,
    };
    Ok((done, used))
}

/// The tunnel's frontends, each a column of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frontend {
    Uds,
    Tls,
    Grpc,
}

impl Frontend {
    const ALL: [Frontend; 3] = [Frontend::Uds, Frontend::Tls, Frontend::Grpc];

    fn name(self) -> &'static str {
        match self {
            Frontend::Uds => "Unix socket frontend",
            Frontend::Tls => "TLS frontend",
            Frontend::Grpc => "gRPC frontend",
        }
    }

    fn path(self) -> Through {
        match self {
            Frontend::Uds => Through::Uds,
            Frontend::Tls => Through::Tls,
            Frontend::Grpc => Through::Grpc,
        }
    }

    fn column(self) -> usize {
        match self {
            Frontend::Uds => report::UDS,
            Frontend::Tls => report::TLS,
            Frontend::Grpc => report::GRPC,
        }
    }
}

/// What every route through the tunnel shares.
struct Tunnel {
    /// The client certificate of the TLS frontend.
    client: TlsClient,
    /// The destination, as `host:port`.
    target: String,
}

impl Tunnel {
    /// The route to the destination through `frontend` of `pair`; for gRPC, with its
    /// connection open.
    async fn route(&self, pair: &Pair, frontend: Frontend) -> anyhow::Result<Route> {
        let target = self.target.clone();
        Ok(match frontend {
            Frontend::Uds => Route::Uds {
                socket: pair.uds.clone(),
                target,
            },
            Frontend::Tls => Route::Tls {
                client: self.client.clone(),
                frontend: pair.tls_addr,
                target,
            },
            Frontend::Grpc => Route::Grpc {
                channel: cplink_e2e::grpc::uds_channel(&pair.grpc)
                    .await
                    .with_context(|| format!("cannot connect to {}", pair.grpc.display()))?,
                target,
            },
        })
    }
}
