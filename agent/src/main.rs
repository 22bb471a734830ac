//! `cplink-agent` binary.

use anyhow::Context as _;
use clap::Parser;
use cplink_agent::{Agent, Args};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    // Parsed before the runtime exists: --worker-threads sizes it.
    let args = Args::parse();
    args.log.init()?;
    cplink_runtime::executor::build(Some(args.worker_threads))
        .context("cannot start the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let admin_address = args.admin_address;
    let config = args.into_config()?;
    let admin = TcpListener::bind(admin_address)
        .await
        .with_context(|| format!("--admin-address {admin_address}: cannot listen"))?;
    let shutdown = CancellationToken::new();
    cplink_runtime::shutdown::cancel_on_signal(shutdown.clone())
        .context("cannot install signal handlers")?;
    Agent::new(config).run(Some(admin), shutdown).await;
    Ok(())
}
