//! Command-line configuration and the operator's top-level `run`.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::reconciler::{self, Context};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `cplink-operator`; each also reads the `CPLINK_...` environment variable shown.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cplink-operator",
    version,
    about = "Runs cplink ControlPlaneLinks"
)]
pub struct Config {
    /// Image of servers and agents when a link names none (normally the operator's own image,
    /// which carries all three binaries).
    #[arg(long, env = "CPLINK_DEFAULT_IMAGE")]
    pub default_image: String,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "CPLINK_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub admin_address: SocketAddr,
    /// Log output format.
    #[arg(long, env = "CPLINK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "CPLINK_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("connecting to Kubernetes: {0}")]
    Client(#[from] kube::Error),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(#[from] std::io::Error),
    /// The admin server task panicked.
    #[error("admin server task: {0}")]
    AdminTask(#[from] tokio::task::JoinError),
    /// The log filter or format could not be installed.
    #[error("logging: {0}")]
    Logging(String),
}

/// Installs the global tracing subscriber, writing to stderr.
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<(), RunError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| RunError::Logging(format!("invalid log filter {filter:?}: {e}")))?;
    // Colour only on a terminal: container runtimes write stderr to files.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| RunError::Logging(e.to_string()))
}

/// Completes on the next SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the operator");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// How long running reconciles may take to finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Completes `SHUTDOWN_GRACE` after shutdown is requested, or at once if the watches never
/// synced: then no reconcile can be running, and kube-runtime would keep waiting for the sync.
async fn shutdown_deadline(shutdown: &CancellationToken, ready: &AtomicBool) {
    shutdown.cancelled().await;
    if ready.load(Ordering::Acquire) {
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    }
}

/// Runs the admin server on `admin` and the controller until `shutdown` is cancelled; returns
/// once in-flight reconciles have finished.
pub async fn run(
    config: Config,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let client = kube::Client::try_default().await?;
    let state = AdminState::default();
    let ctx = Arc::new(Context::new(
        client,
        state.metrics.clone(),
        config.default_image,
    ));
    tracing::info!(admin = %config.admin_address, "starting cplink-operator");
    let admin_task = tokio::spawn(admin::serve(
        admin,
        state.clone(),
        shutdown.clone().cancelled_owned(),
    ));
    let ready = state.ready.clone();
    let controller = reconciler::run(ctx, ready.clone(), shutdown.clone().cancelled_owned());
    tokio::select! {
        () = controller => {}
        () = shutdown_deadline(&shutdown, &ready) => {
            if ready.load(Ordering::Acquire) {
                tracing::warn!("reconciles did not finish in time; exiting anyway");
            } else {
                tracing::info!("watches never synced; nothing to wait for");
            }
        }
    }
    // The controller may also stop on its own (its watch streams ended): take the admin
    // server down with it so the pod restarts rather than lingering half-alive.
    shutdown.cancel();
    admin_task.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_have_documented_defaults() {
        let config = Config::try_parse_from(["cplink-operator", "--default-image", "img:1"])
            .expect("parses");
        assert_eq!(config.default_image, "img:1");
        assert_eq!(config.admin_address, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.log_level, "info");
    }

    #[test]
    fn the_log_format_accepts_json() {
        let config = Config::try_parse_from([
            "cplink-operator",
            "--default-image=img",
            "--log-format=json",
        ])
        .expect("parses");
        assert_eq!(config.log_format, LogFormat::Json);
    }
}
