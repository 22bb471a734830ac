//! HTTP/2 PING liveness for links.
//!
//! TCP alone notices a vanished peer only after minutes; a link that silently stopped answering
//! must be torn down (and redialed) quickly so dials stop going into a black hole.

use std::time::Duration;

use h2::{Ping, PingPong};

/// How often to ping and how long to wait for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveConfig {
    /// Pause between two PINGs.
    pub interval: Duration,
    /// How long a PING may stay unanswered before the link is declared dead.
    pub timeout: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Why a link's keepalive stopped.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// A PING went unanswered.
    #[error("no PING answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed or closed.
    #[error("connection closed: {0}")]
    Closed(#[source] h2::Error),
}

/// Pings forever; returns only when the link must be considered dead.
pub async fn run(mut ping_pong: PingPong, config: KeepaliveConfig) -> KeepaliveError {
    loop {
        tokio::time::sleep(config.interval).await;
        match tokio::time::timeout(config.timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(err)) => return KeepaliveError::Closed(err),
            Err(_elapsed) => return KeepaliveError::Timeout(config.timeout),
        }
    }
}
