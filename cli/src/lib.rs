//! `kubectl cplink`: what a cplink link's servers and agents see, read through the
//! Kubernetes API server as the kubeconfig's user.
//!
//! Map of the crate, in layers: each module uses only modules listed above it.
//! - [`args`]: the command line (kubectl's global flags, `-o`, the commands).
//! - [`table`]: aligned tables, ages, latencies and sizes as kubectl prints them.
//! - [`cluster`]: the API server: links, pods, workloads, Nodes, Secrets, and the servers' and
//!   agents' debug views through the pod proxy.
//! - [`servers`]: asking every running server of a link the same question.
//! - [`status`], [`routes`], [`connections`], [`check`]: the commands, each gathering a
//!   report (printed as a table, or as JSON or YAML) and rendering it.
//! - [`run`]: a parsed command line to its output.

pub mod args;
pub mod check;
pub mod cluster;
pub mod connections;
pub mod routes;
pub mod servers;
pub mod status;
pub mod table;

use args::{Args, Command, Output};
use cluster::{Cluster, ReadError};
use serde::Serialize;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Reading from the cluster failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Encode(String),
}

/// What a command printed, and whether it found everything well (`check`: every server
/// reached the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The text to print.
    pub text: String,
    /// Whether the check it made passed; the exit status follows it.
    pub ok: bool,
}

/// Runs the command `args` names.
pub async fn run(args: &Args) -> Result<Outcome, CliError> {
    let cluster = Cluster::connect(args).await?;
    let link = args.link.as_deref();
    let wide = args.output == Output::Wide;
    match &args.command {
        Command::Status { link: named } => {
            let gathered = status::gather(&cluster, named.as_deref().or(link)).await?;
            let now = std::time::SystemTime::now();
            let report = status::StatusReport {
                links: gathered.iter().map(|g| status::analyse(g, now)).collect(),
            };
            print(args.output, &report, |r| status::render(r, wide), true)
        }
        Command::Routes { destination, port } => {
            let report = routes::run(&cluster, link, destination, *port).await?;
            print(args.output, &report, |r| routes::render(r, wide), true)
        }
        Command::Connections { node, limit } => {
            let report = connections::run(&cluster, link, node.as_deref(), *limit).await?;
            print(args.output, &report, |r| connections::render(r, wide), true)
        }
        Command::Check { node, port } => {
            let report = check::run(&cluster, link, node, *port).await?;
            let ok = report.all_ok();
            print(args.output, &report, |r| check::render(r, wide), ok)
        }
    }
}

fn print<T: Serialize>(
    output: Output,
    report: &T,
    table: impl Fn(&T) -> String,
    ok: bool,
) -> Result<Outcome, CliError> {
    let text = match output {
        Output::Table | Output::Wide => table(report),
        Output::Json => {
            let mut text = serde_json::to_string_pretty(report)
                .map_err(|e| CliError::Encode(e.to_string()))?;
            text.push('\n');
            text
        }
        Output::Yaml => {
            cplink_operator::yaml::to_string(report).map_err(|e| CliError::Encode(e.to_string()))?
        }
    };
    Ok(Outcome { text, ok })
}
