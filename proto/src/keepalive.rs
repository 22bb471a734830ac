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
pub async fn run(ping_pong: PingPong, config: KeepaliveConfig) -> KeepaliveError {
    run_timed(ping_pong, config, |_| {}).await
}

/// [`run`], telling `answered` how long each PING took to be answered (the link's round trip,
/// as seen by whoever introspects it).
pub async fn run_timed(
    mut ping_pong: PingPong,
    config: KeepaliveConfig,
    answered: impl Fn(Duration),
) -> KeepaliveError {
    loop {
        tokio::time::sleep(config.interval).await;
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(config.timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => answered(sent.elapsed()),
            Ok(Err(err)) => return KeepaliveError::Closed(err),
            Err(_elapsed) => return KeepaliveError::Timeout(config.timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: KeepaliveConfig = KeepaliveConfig {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
    };

    type Server = h2::server::Connection<tokio::io::DuplexStream, bytes::Bytes>;
    type Client = h2::client::SendRequest<bytes::Bytes>;

    /// A client connection's PingPong and its request handle (dropping it would close the
    /// connection), and the server end (answering PINGs only while it is polled).
    async fn link() -> (PingPong, Client, Server) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(h2::server::handshake(b));
        let (client, mut conn) = h2::client::handshake(a).await.expect("client handshake");
        let ping_pong = conn.ping_pong().expect("the first PingPong");
        tokio::spawn(conn);
        let server = server.await.expect("joined").expect("server handshake");
        (ping_pong, client, server)
    }

    #[tokio::test(start_paused = true)]
    async fn an_answering_peer_keeps_the_link() {
        let (ping_pong, _client, mut server) = link().await;
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let watched = tokio::time::timeout(CONFIG.interval * 20, run(ping_pong, CONFIG)).await;
        assert!(
            watched.is_err(),
            "still alive after 20 intervals: {watched:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_answer_reports_its_round_trip() {
        let (ping_pong, _client, mut server) = link().await;
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let answers = std::sync::Mutex::new(Vec::new());
        let watched = tokio::time::timeout(
            CONFIG.interval * 3 + CONFIG.interval / 2,
            run_timed(ping_pong, CONFIG, |rtt| answers.lock().unwrap().push(rtt)),
        )
        .await;
        assert!(watched.is_err(), "still alive: {watched:?}");
        let answers = answers.into_inner().unwrap();
        assert_eq!(answers.len(), 3, "{answers:?}");
        assert!(
            answers.iter().all(|rtt| *rtt < CONFIG.timeout),
            "{answers:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_declared_dead_one_interval_and_one_timeout_later() {
        // The server end is held but never polled: PINGs go unanswered.
        let (ping_pong, _client, _silent) = link().await;
        let started = tokio::time::Instant::now();
        let err = run(ping_pong, CONFIG).await;
        assert!(
            matches!(err, KeepaliveError::Timeout(t) if t == CONFIG.timeout),
            "{err}"
        );
        assert_eq!(started.elapsed(), CONFIG.interval + CONFIG.timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_connection_ends_the_keepalive_at_its_next_ping() {
        let (ping_pong, _client, server) = link().await;
        drop(server);
        let err = run(ping_pong, CONFIG).await;
        assert!(matches!(err, KeepaliveError::Closed(_)), "{err}");
    }
}
