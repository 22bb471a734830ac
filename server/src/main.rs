//! `cplink-server` binary.

use anyhow::Context as _;
use clap::Parser;
use cplink_server::{Args, Listeners, Server};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cplink_proto::telemetry::init(args.log_format, &args.log_level)?;
    let config = args.clone().into_config()?;
    let listeners = Listeners::bind(&args).await?;
    let shutdown = CancellationToken::new();
    cplink_proto::shutdown::cancel_on_signal(shutdown.clone())
        .context("cannot install signal handlers")?;
    Server::new(config).run(listeners, shutdown).await;
    Ok(())
}
