//! Links to servers, in either protocol, behind one [`Link`] type: connect (TCP, TLS, and the
//! protocol's handshake), then serve until the server closes the link, the agent drains, or the
//! drain deadline cuts it.
//!
//! - `native`: cplink's own links: a hello, then HTTP/2 with the agent as the server, one stream
//!   per tunneled connection.
//! - `konnectivity`: the gRPC `AgentService/Connect` stream of apiserver-network-proxy servers
//!   (and of cplink-server), every connection multiplexed on it.

pub(crate) mod konnectivity;
pub(crate) mod native;

use std::sync::Arc;
use std::time::Duration;

use cplink_proto::hello::HelloError;
use cplink_proto::keepalive::KeepaliveError;
use cplink_runtime::readahead::ReadAhead;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::config::{Config, Protocol, ServerEndpoint};
use crate::metrics::ResultLabels;
use crate::slots::{AlreadyLinked, SlotId};
use crate::token::TokenError;

/// A link's TLS stream, over a read-ahead buffer.
pub(crate) type LinkTls = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// A server address and its slot in [`crate::links::Links`].
#[derive(Debug, Clone)]
pub(crate) struct ServerSlot {
    pub(crate) slot: SlotId,
    pub(crate) endpoint: ServerEndpoint,
}

/// What every link of the agent shares: the tracker of tunneled connections, the signal to
/// drain and the signal to close at once.
#[derive(Debug, Clone)]
pub(crate) struct LinkContext {
    pub(crate) streams: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) force: CancellationToken,
}

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
    cplink_runtime::net::tune_link(&tcp);
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

/// An established link, of the protocol the agent speaks.
pub(crate) enum Link {
    // Boxed: both hold large connection state, and a link is moved into its task once.
    Native(Box<native::Link>),
    Konnectivity(Box<konnectivity::Link>),
}

impl Link {
    /// Establishes one link to `target` in the configured protocol.
    pub(crate) async fn connect(shared: &Shared, target: &ServerSlot) -> Result<Link, LinkError> {
        match shared.config.protocol {
            Protocol::Cplink => native::connect(shared, target)
                .await
                .map(|link| Link::Native(Box::new(link))),
            Protocol::Konnectivity => konnectivity::connect(shared, target)
                .await
                .map(|link| Link::Konnectivity(Box::new(link))),
        }
    }

    /// Whether the link replaced an older link to the same server.
    pub(crate) fn replaced(&self) -> bool {
        match self {
            Link::Native(link) => link.replaced(),
            // Konnectivity duplicates are refused instead.
            Link::Konnectivity(_) => false,
        }
    }

    /// Serves tunneled connections until the link ends; drains when `context` says so.
    pub(crate) async fn serve(self, shared: Arc<Shared>, context: LinkContext) {
        match self {
            Link::Native(link) => native::serve_link(shared, *link, context).await,
            Link::Konnectivity(link) => konnectivity::serve_link(shared, *link, context).await,
        }
    }
}
