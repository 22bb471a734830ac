//! The `cplink-operator` binary: parses flags, sets up logging and signals, runs the operator.

use anyhow::Context as _;
use clap::Parser;
use cplink_operator::app::{self, Config};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    app::init_tracing(config.log_format, &config.log_level)?;
    let admin = tokio::net::TcpListener::bind(config.admin_address)
        .await
        .with_context(|| format!("binding admin address {}", config.admin_address))?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        app::wait_for_signal().await;
        tracing::info!("shutdown requested; a second signal exits at once");
        on_signal.cancel();
        app::wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting for reconciles");
        std::process::exit(1);
    });
    app::run(config, admin, shutdown).await?;
    tracing::info!("cplink-operator stopped");
    Ok(())
}
