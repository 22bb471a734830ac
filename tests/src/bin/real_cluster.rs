//! `cplink-real-cluster`: a control plane on loopback and real worker nodes (kubelet and
//! containerd in namespaces of their own, see `cplink_e2e::nodes`), kept running until
//! standard input closes or SIGTERM or SIGINT arrives; then everything is stopped. Prints
//! `ready <kubeconfig>` once every node is Ready (and the shell pods run, with
//! `--shell-pods`).
//!
//! ```text
//! cargo build --workspace --bins
//! sudo target/debug/cplink-real-cluster --nodes 3 --shell-pods
//! ```
//!
//! The sweep test kills it mid-run to prove that the next run removes what it left.

use clap::Parser;
use cplink_e2e::nodes::RealCluster;

/// Command line of `cplink-real-cluster`.
#[derive(Debug, Parser)]
#[command(
    name = "cplink-real-cluster",
    version,
    about = "Runs a control plane and real worker nodes until stdin closes"
)]
struct Args {
    /// Worker nodes.
    #[arg(long, default_value_t = cplink_e2e::nodes::DEFAULT_NODES)]
    nodes: usize,
    /// Run a busybox pod on every node (`shell-0`, ...).
    #[arg(long)]
    shell_pods: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cplink_e2e::init_logs();
    // The nodes' processes die with the thread that started them (their parent-death
    // signal): this one, which blocks on the cluster until the end.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = cplink_e2e::harness::shutdown_on_stdin_eof()?;
        let cluster = RealCluster::start(args.nodes).await?;
        if args.shell_pods {
            for (n, node) in cluster.nodes.names().iter().enumerate() {
                cluster
                    .run_shell_pod(&format!("shell-{n}"), node, "exec sleep 3600")
                    .await?;
            }
        }
        println!("ready {}", cluster.plane.kubeconfig.display());
        shutdown.cancelled().await;
        // The nodes first, with what their teardown left reported, then the control plane.
        let RealCluster { nodes, plane } = cluster;
        nodes.stop()?;
        drop(plane);
        anyhow::Ok(())
    })
}
