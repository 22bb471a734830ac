//! Native links to servers: dial, TLS, hello, then HTTP/2 with the agent as the server; the
//! backoff between attempts and the link errors both protocols share.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cplink_proto::hello::{self, AgentHello, HelloError, HelloOutcome, ServerHello};
use cplink_proto::keepalive::{self, KeepaliveError};
use cplink_proto::readahead::ReadAhead;
use rand::Rng;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{BackoffConfig, Config, ServerEndpoint};
use crate::links::{AlreadyLinked, HeldLink, OnDuplicate};
use crate::metrics::ResultLabels;
use crate::pool::{LinkContext, ServerSlot};
use crate::token::{self, TokenError};
use crate::{LinkInfo, Shared, dial};

/// A link's TLS stream, over a read-ahead buffer.
pub(crate) type LinkTls = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// Why a link could not be established or ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TCP connect failed.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// TLS handshake failed (for example an untrusted server certificate).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// The server did not negotiate the protocol's ALPN id.
    #[error("server did not negotiate ALPN {}", String::from_utf8_lossy(.0))]
    Alpn(&'static [u8]),
    /// A step did not complete in time.
    #[error("{step} did not complete within {}", humantime::format_duration(*.budget))]
    Timeout {
        /// The step that timed out.
        step: &'static str,
        /// Its budget.
        budget: Duration,
    },
    /// The hello exchange failed.
    #[error("hello failed: {0}")]
    Hello(#[from] HelloError),
    /// The server refused the agent.
    #[error("server refused the link: {0}")]
    Rejected(String),
    /// HTTP/2 failed.
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    /// The keepalive declared the link dead.
    #[error("{0}")]
    Keepalive(#[from] KeepaliveError),
    /// The HTTP/2 client connection of a konnectivity link failed (a keepalive timeout
    /// included).
    #[error("HTTP/2 connection failed: {0}")]
    Http2(#[source] hyper::Error),
    /// The konnectivity gRPC stream failed.
    #[error("gRPC stream failed: {code}: {message}")]
    Grpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// A konnectivity server's response headers are missing or invalid.
    #[error("invalid response header: {0}")]
    Header(String),
    /// The service-account token cannot be sent.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The link reached a server the agent is already linked to through the same address.
    #[error("{0}")]
    Duplicate(#[from] AlreadyLinked),
}

impl LinkError {
    /// Fixed metric label of the failure.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            LinkError::Connect(_) => "connect",
            LinkError::Tls(_) => "tls",
            LinkError::Alpn(_) => "alpn",
            LinkError::Timeout { .. } => "timeout",
            LinkError::Hello(_) => "hello",
            LinkError::Rejected(_) => "rejected",
            LinkError::H2(_) | LinkError::Http2(_) => "h2",
            LinkError::Keepalive(_) => "keepalive",
            LinkError::Grpc { .. } => "grpc",
            LinkError::Header(_) => "header",
            LinkError::Token(_) => "token",
            LinkError::Duplicate(_) => "duplicate",
        }
    }

    /// A gRPC status ending a konnectivity stream; authentication failures are refusals.
    pub(crate) fn from_status(status: &tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                LinkError::Rejected(format!("{}: {}", status.code(), status.message()))
            }
            code => LinkError::Grpc {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// Exponential backoff with jitter between link attempts.
#[derive(Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// The pause before the next attempt: doubling from the initial pause up to the cap, each
    /// drawn uniformly from its upper half so that agents do not redial in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .config
            .initial
            .saturating_mul(2u32.saturating_pow(self.attempt))
            .min(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Starts over after a link came up.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Counts a link attempt by result: `ok` or a [`LinkError::kind`].
pub(crate) fn count_attempt(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .link_attempts
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Connects to `endpoint` within the link budget and tunes the socket for a link.
pub(crate) async fn connect_tcp(
    config: &Config,
    endpoint: &ServerEndpoint,
) -> Result<TcpStream, LinkError> {
    let budget = config.link_timeout;
    let tcp = tokio::time::timeout(budget, TcpStream::connect(endpoint.address.as_str()))
        .await
        .map_err(|_| LinkError::Timeout {
            step: "TCP connect",
            budget,
        })?
        .map_err(LinkError::Connect)?;
    cplink_proto::net::tune_link(&tcp);
    Ok(tcp)
}

/// Runs the TLS handshake of a link (no time limit: callers bound it together with what
/// follows) and checks that the server agreed on `alpn`.
pub(crate) async fn handshake_tls(
    config: &Config,
    endpoint: &ServerEndpoint,
    tcp: TcpStream,
    alpn: &'static [u8],
) -> Result<LinkTls, LinkError> {
    let connector = TlsConnector::from(config.tls.clone());
    let tls = connector
        .connect(endpoint.server_name.clone(), ReadAhead::new(tcp))
        .await
        .map_err(LinkError::Tls)?;
    if tls.get_ref().1.alpn_protocol() != Some(alpn) {
        return Err(LinkError::Alpn(alpn));
    }
    Ok(tls)
}

/// TCP, TLS and the hello exchange, within the link budget.
async fn handshake(
    shared: &Shared,
    target: &ServerSlot,
) -> Result<(LinkTls, ServerHello), LinkError> {
    let config = &shared.config;
    let endpoint = &target.endpoint;
    let budget = config.link_timeout;
    // Read before dialing: an unreadable token fails the attempt without bothering the server.
    let token = match &config.service_account_token_path {
        Some(path) => Some(token::read(path).await?),
        None => None,
    };
    let tcp = connect_tcp(config, endpoint).await?;
    let handshake = async {
        let mut tls = handshake_tls(config, endpoint, tcp, cplink_proto::ALPN_LINK).await?;
        let ours = AgentHello {
            agent_id: config.agent_id.clone(),
            node_name: config.node_name.clone(),
            identifiers: shared.identifiers().clone(),
            software_version: cplink_proto::SOFTWARE_VERSION.to_owned(),
            token,
        };
        hello::write(&mut tls, &ours).await?;
        let theirs: ServerHello = hello::read(&mut tls).await?;
        Ok((tls, theirs))
    };
    tokio::time::timeout(budget, handshake)
        .await
        .map_err(|_| LinkError::Timeout {
            step: "TLS handshake and hello",
            budget,
        })?
}

/// An established native link: the HTTP/2 connection on which the server opens streams.
pub(crate) struct Link {
    info: LinkInfo,
    held: HeldLink,
    connection: h2::server::Connection<LinkTls, Bytes>,
}

impl Link {
    /// Whether this link replaced an older link to the same server.
    pub(crate) fn replaced(&self) -> bool {
        self.held.replaced()
    }
}

/// Establishes one link: TCP, TLS, hello, HTTP/2. A link reaching a server already linked
/// through the same address replaces the older link: the server has already dropped it.
pub(crate) async fn connect(shared: &Shared, target: &ServerSlot) -> Result<Link, LinkError> {
    let (tls, server) = handshake(shared, target).await?;
    if let HelloOutcome::Rejected { reason } = server.outcome {
        return Err(LinkError::Rejected(reason));
    }
    let connection = h2::server::Builder::new()
        .initial_window_size(cplink_proto::STREAM_WINDOW)
        .initial_connection_window_size(cplink_proto::CONNECTION_WINDOW)
        .max_frame_size(cplink_proto::MAX_FRAME_SIZE)
        // The connection window never binds; the stream limit bounds what the link buffers
        // (see `cplink_proto::CONNECTION_WINDOW`).
        .max_concurrent_streams(shared.config.max_streams_per_link)
        .max_send_buffer_size(cplink_proto::STREAM_WINDOW as usize / 2)
        .handshake::<_, Bytes>(tls)
        .await?;

    tracing::Span::current().record("server_id", server.server_id.as_str());
    let info = LinkInfo {
        server_id: server.server_id,
        server_count: server.server_count,
    };
    shared
        .links
        .set_server_count(target.slot, info.server_count);
    let held = shared
        .links
        .hold(target.slot, info.clone(), OnDuplicate::Replace)?;
    Ok(Link {
        info,
        held,
        connection,
    })
}

/// Serves one link until it ends, then says why.
pub(crate) async fn serve_link(shared: Arc<Shared>, link: Link, context: LinkContext) {
    tracing::info!(server_count = link.info.server_count, "linked");
    match serve(&shared, link, &context).await {
        Ok(()) if context.shutdown.is_cancelled() => tracing::info!("link closed"),
        Ok(()) => tracing::info!("link closed by the server"),
        Err(err) => {
            count_attempt(&shared, err.kind());
            tracing::warn!(%err, "link failed");
        }
    }
}

async fn serve(shared: &Arc<Shared>, link: Link, context: &LinkContext) -> Result<(), LinkError> {
    let Link {
        held,
        mut connection,
        ..
    } = link;
    let superseded = held.superseded().clone();
    let ping_pong = connection.ping_pong();
    let keepalive = async {
        match ping_pong {
            Some(ping_pong) => keepalive::run(ping_pong, shared.config.keepalive).await,
            // Only one PingPong exists per connection and it was just created.
            None => std::future::pending().await,
        }
    };
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let shared = shared.clone();
                    context
                        .streams
                        .spawn(async move { dial::serve(&shared, request, respond).await });
                }
                // While draining, the server may close the link as soon as it has seen the
                // GOAWAY, before h2 finishes its closing handshake: that is the expected end.
                Some(Err(err)) if draining => {
                    tracing::debug!(%err, "link closed by the server while draining");
                    return Ok(());
                }
                Some(Err(err)) => return Err(err.into()),
                None => return Ok(()),
            },
            err = &mut keepalive => return Err(err.into()),
            () = context.shutdown.cancelled(), if !draining => {
                // GOAWAY: the server routes new dials elsewhere; streams in flight finish.
                draining = true;
                connection.graceful_shutdown();
                tracing::info!("draining: no new streams accepted");
            }
            () = superseded.cancelled(), if !draining => {
                draining = true;
                connection.graceful_shutdown();
                tracing::info!("a newer link to the same server replaced this one: draining");
            }
            () = context.force.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut backoff = Backoff::new(config);
        let ceilings = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for ceiling in ceilings {
            let ceiling = Duration::from_millis(ceiling);
            let delay = backoff.next_delay();
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn backoff_never_overflows() {
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        });
        for _ in 0..200 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
    }
}
