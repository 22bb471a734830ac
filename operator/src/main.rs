//! The `cplink-operator` binary: parses flags, sets up logging and signals, runs the operator.

use anyhow::Context as _;
use clap::Parser;
use cplink_operator::app::{self, Config};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.log.init()?;
    let admin = tokio::net::TcpListener::bind(config.admin_address)
        .await
        .with_context(|| format!("binding admin address {}", config.admin_address))?;
    let shutdown = CancellationToken::new();
    cplink_runtime::shutdown::cancel_on_signal(shutdown.clone())
        .context("cannot install signal handlers")?;
    app::run(config, admin, shutdown).await?;
    tracing::info!("cplink-operator stopped");
    Ok(())
}
