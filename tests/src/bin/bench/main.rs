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
//! The table shows each figure and its ratio to direct TCP. Nothing is asserted: these are
//! measurements, and shared machines are noisy; run it a few times before drawing conclusions.
//! A workload that loses bytes on a route fails the run, though.
//!
//! ```text
//! cargo run --release -p cplink-e2e --bin cplink-bench -- [--quick] [--markdown]
//! ```

mod procs;
mod report;
mod workloads;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cplink_e2e::client::TlsClient;

use crate::procs::{Certificates, Pair};
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

    #[command(subcommand)]
    role: Option<Role>,
}

/// The roles of the child processes.
#[derive(Debug, Subcommand)]
enum Role {
    /// Run a cplink-server (flags as `cplink-server`), then print the bound addresses.
    #[command(hide = true)]
    Server {
        /// cplink-server flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a cplink-agent (flags as `cplink-agent`), then print the admin address.
    #[command(hide = true)]
    Agent {
        /// cplink-agent flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Server { args }) => procs::run_server(args).await,
        Some(Role::Agent { args }) => procs::run_agent(args).await,
        None => {
            let report = run(&Sizes::new(cli.quick), &cli.only).await?;
            print!("{}", report.render(cli.markdown));
            Ok(())
        }
    }
}

fn progress(what: &str) {
    eprintln!("cplink-bench: {what}");
}

async fn run(sizes: &Sizes, only: &[Workload]) -> anyhow::Result<Report> {
    let wanted = |w: Workload| only.is_empty() || only.contains(&w);
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
    for frontend in Frontend::ALL {
        if !wanted(Workload::Memory) {
            break;
        }
        let pair = Pair::start(&certs).await?;
        if frontend == Frontend::Uds {
            report.idle_rss(pair.server.rss_kib()?, pair.agent.rss_kib()?);
        }
        let route = tunnel.route(&pair, frontend).await?;
        progress(&format!(
            "holding {} idle connections ({})",
            sizes.idle,
            frontend.name()
        ));
        // Warm up lazily allocated state (TLS sessions, h2 buffers, metric series).
        drop(workloads::hold_idle(&route, 50).await?);
        let before = pair.server.rss_kib()? + pair.agent.rss_kib()?;
        let held = workloads::hold_idle(&route, sizes.idle).await?;
        let server = pair.server.rss_kib()?;
        let agent = pair.agent.rss_kib()?;
        report.held(frontend.column(), server, agent, before);
        drop(held);
        drop(route);
        pair.stop().await;
    }

    let pair = Pair::start(&certs).await?;
    let mut routes = vec![(report::DIRECT, Route::Direct(destination))];
    for frontend in Frontend::ALL {
        routes.push((frontend.column(), tunnel.route(&pair, frontend).await?));
    }

    if wanted(Workload::Upload) {
        progress(&format!(
            "single-stream upload of {} MiB",
            sizes.single >> 20
        ));
        for (column, route) in &routes {
            report.upload(*column, workloads::upload(route, sizes.single).await?);
        }
    }
    if wanted(Workload::Download) {
        progress(&format!(
            "single-stream download of {} MiB",
            sizes.single >> 20
        ));
        for (column, route) in &routes {
            report.download(*column, workloads::download(route, sizes.single).await?);
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
        for (column, route) in &routes {
            let took = workloads::parallel(route, sizes.streams, sizes.parallel, direction).await?;
            report.parallel(*column, direction, sizes.streams, sizes.parallel, took);
        }
    }
    if wanted(Workload::Latency) {
        progress(&format!("{} request/response round trips", sizes.samples));
        for (column, route) in &routes {
            let times = workloads::round_trips(route, sizes.warmup, sizes.samples).await?;
            report.latency(*column, Stats::of(times));
        }
    }
    if wanted(Workload::Dials) {
        progress(&format!(
            "{} new connections, {} at a time",
            sizes.dials, sizes.dial_concurrency
        ));
        for (column, route) in &routes {
            let rate = workloads::dial_rate(route, sizes.dials, sizes.dial_concurrency).await?;
            report.dial_rate(*column, rate);
        }
    }
    if wanted(Workload::Bulk) {
        progress(&format!(
            "{} round trips during a bulk upload",
            sizes.bulk_samples
        ));
        for (column, route) in &routes {
            let (times, rate) =
                workloads::round_trips_under_bulk(route, sizes.warmup, sizes.bulk_samples).await?;
            report.under_bulk(*column, Stats::of(times), rate);
        }
    }
    drop(routes);
    pair.stop().await;
    Ok(report)
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
