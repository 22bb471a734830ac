//! Command-line configuration and the operator's top-level `run`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use cplink_runtime::admin;
use cplink_runtime::args::LogArgs;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::reconciler::{self, Context};

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
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("connecting to Kubernetes: {0}")]
    Client(#[from] kube::Error),
    /// The admin server task panicked.
    #[error("admin server task: {0}")]
    AdminTask(#[from] tokio::task::JoinError),
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
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Context::new(client, metrics.clone(), config.default_image));
    tracing::info!(admin = %config.admin_address, "starting cplink-operator");
    // Ready once the controller's watches have synced.
    let readiness = admin::ready_when_set(ready.clone(), "controller not started");
    let admin_task = tokio::spawn(admin::serve(
        admin,
        metrics.registry(),
        Arc::new(readiness),
        shutdown.clone(),
    ));
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
    admin_task.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use cplink_runtime::telemetry::LogFormat;

    use super::*;

    #[test]
    fn flags_have_documented_defaults() {
        let config = Config::try_parse_from(["cplink-operator", "--default-image", "img:1"])
            .expect("parses");
        assert_eq!(config.default_image, "img:1");
        assert_eq!(config.admin_address, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(config.log.log_format, LogFormat::Text);
        assert_eq!(config.log.log_level, "info");
    }

    #[test]
    fn the_log_format_accepts_json() {
        let config = Config::try_parse_from([
            "cplink-operator",
            "--default-image=img",
            "--log-format=json",
        ])
        .expect("parses");
        assert_eq!(config.log.log_format, LogFormat::Json);
    }
}
