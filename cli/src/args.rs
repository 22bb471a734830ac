//! The command line: kubectl's global flags, the output format and the four commands.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Command line of `kubectl cplink`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kubectl-cplink",
    bin_name = "kubectl cplink",
    version,
    about = "What a cplink link's servers and agents see: their state, routes, connections and \
             dials, read through the Kubernetes API server",
    long_about = "What a cplink link's servers and agents see: their state, routes, connections \
                  and dials. Everything is read through the Kubernetes API server, as the \
                  kubeconfig's user: links and pods, and the servers' and agents' read-only \
                  debug views through the pod proxy (get on pods/proxy in the link's \
                  namespace; the chart's cplink-viewer ClusterRole grants what is needed)."
)]
pub struct Args {
    /// The kubeconfig to use (else $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,

    /// The kubeconfig cluster to use.
    #[arg(long, global = true)]
    pub cluster: Option<String>,

    /// The kubeconfig user to use.
    #[arg(long, global = true)]
    pub user: Option<String>,

    /// The links' namespace (else the context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,

    /// The link, when the namespace has more than one.
    #[arg(long, global = true)]
    pub link: Option<String>,

    /// Output format: a table (`wide` adds columns), or the whole report as `json` or `yaml`.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    /// How long a request to the API server (and through it to a server or agent) may take.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    pub request_timeout: std::time::Duration,

    /// What to show.
    #[command(subcommand)]
    pub command: Command,
}

/// How to print a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables.
    #[value(name = "table", hide = true)]
    Table,
    /// Aligned tables with more columns.
    Wide,
    /// The report as JSON.
    Json,
    /// The report as YAML.
    Yaml,
}

/// The commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Each server replica and agent: ready or not and why, agents not linked to a server,
    /// nodes without an agent, certificate expiry, the egress mode.
    Status {
        /// The link (else every link in the namespace).
        link: Option<String>,
    },
    /// Which agent each server would pick for a node or an address, and by which strategy
    /// (nothing is dialed).
    Routes {
        /// A node name or an IP address.
        destination: String,
        /// The destination port.
        #[arg(long, default_value_t = 10250)]
        port: u16,
    },
    /// The tunneled connections open on each server.
    Connections {
        /// Only connections carried by this node's agent.
        #[arg(long)]
        node: Option<String>,
        /// Most connections listed per server.
        #[arg(long, default_value_t = 1000,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        limit: usize,
    },
    /// Dials the node's kubelet through each server and its agent, and closes at once: the
    /// latency, or the exact failure.
    Check {
        /// The node.
        node: String,
        /// The port (else the kubelet port the Node reports, else 10250).
        #[arg(long)]
        port: Option<u16>,
    },
}
