//! Termination signals.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT; a second signal exits the process at once.
///
/// Fails only when the signal handlers cannot be installed.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for round in 0.. {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if round == 0 {
                tracing::info!(signal = name, "shutting down: draining");
                token.cancel();
            } else {
                tracing::warn!(
                    signal = name,
                    "second signal: exiting without waiting for the drain"
                );
                std::process::exit(1);
            }
        }
    });
    Ok(())
}
