//! Native agent links: the hello, identity checks, then HTTP/2 with this server as the client.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use cplink_proto::hello::{self, AgentHello, HelloError, HelloOutcome, ServerHello};
use cplink_proto::keepalive::{self, KeepaliveError};
use cplink_runtime::accept::Pending;
use cplink_runtime::readahead::ReadAhead;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::validate_agent_id;
use crate::Shared;
use crate::identity::{Binding, Claim, Refusal};
use crate::metrics::LinkErrorLabels;
use crate::registry::{AgentLink, Carrier};

/// Why an agent link could not be established or ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS handshake failed (for example an untrusted client certificate).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// A native agent came without a client certificate (tokens are for konnectivity agents).
    #[error("native agents must present a client certificate")]
    NoCertificate,
    /// The agent did not negotiate the cplink protocol.
    #[error("agent negotiated neither ALPN cplink/1 nor h2 (konnectivity)")]
    Alpn,
    /// The hello exchange failed.
    #[error("hello failed: {0}")]
    Hello(#[from] HelloError),
    /// The agent's hello was refused.
    #[error("agent refused: {0}")]
    Refused(String),
    /// The agent id is already linked from another address.
    #[error("{0}")]
    Duplicate(#[from] crate::registry::DuplicateAgent),
    /// The agent's proven identity does not back its hello.
    #[error("identity refused: {0}")]
    Identity(#[from] Refusal),
    /// TLS and hello did not complete in time.
    #[error("handshake not completed within {}", humantime::format_duration(*.0))]
    HandshakeTimeout(std::time::Duration),
    /// HTTP/2 failed.
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    /// The keepalive declared the link dead.
    #[error("{0}")]
    Keepalive(#[from] KeepaliveError),
}

impl LinkError {
    /// Whether the peer failed before proving who it is (TLS, ALPN, time limits).
    fn before_authentication(&self) -> bool {
        matches!(
            self,
            LinkError::Tls(_) | LinkError::Alpn | LinkError::HandshakeTimeout(_)
        )
    }

    fn kind(&self) -> &'static str {
        match self {
            LinkError::Tls(_) => "tls",
            LinkError::Alpn => "alpn",
            LinkError::NoCertificate => "no_certificate",
            LinkError::Hello(_) => "hello",
            LinkError::Refused(_) => "refused",
            LinkError::Duplicate(_) => "duplicate_id",
            LinkError::Identity(_) => "identity",
            LinkError::HandshakeTimeout(_) => "handshake_timeout",
            LinkError::H2(_) => "h2",
            LinkError::Keepalive(_) => "keepalive",
        }
    }
}

/// Accepts agent links until `stop` is cancelled.
pub(crate) async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    links: TaskTracker,
    stop: CancellationToken,
) {
    let acceptor = shared.acceptor("agent");
    while let Some(((tcp, peer), pending)) = acceptor.next(|| listener.accept(), &stop).await {
        let shared = shared.clone();
        links.spawn(
            async move {
                if let Err(err) = serve(shared.clone(), tcp, peer, pending).await {
                    shared
                        .metrics
                        .link_errors
                        .get_or_create(&LinkErrorLabels { reason: err.kind() })
                        .inc();
                    if err.before_authentication() {
                        // Anyone can cause these; a line each at WARN would let them flood
                        // the log.
                        tracing::info!(%err, "agent link failed");
                    } else {
                        tracing::warn!(%err, "agent link failed");
                    }
                }
            }
            .instrument(tracing::info_span!("link", %peer, agent_id = tracing::field::Empty)),
        );
    }
}

async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Pending,
) -> Result<(), LinkError> {
    cplink_runtime::net::tune_link(&tcp);
    let budget = shared.config.handshake_timeout;
    let acceptor = TlsAcceptor::from(shared.config.link_tls.clone());
    let mut tls = tokio::time::timeout(budget, acceptor.accept(ReadAhead::new(tcp)))
        .await
        .map_err(|_| LinkError::HandshakeTimeout(budget))?
        .map_err(LinkError::Tls)?;
    let certificate: Option<Arc<[u8]>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|der| Arc::from(der.as_ref()));
    let certified = certificate.is_some();
    match tls.get_ref().1.alpn_protocol() {
        Some(cplink_proto::ALPN_LINK) if certified => {}
        Some(cplink_proto::ALPN_LINK) => return Err(LinkError::NoCertificate),
        Some(cplink_proto::ALPN_H2) => {
            // gRPC from here on: the handshake phase is over.
            drop(pending);
            super::konnectivity::serve(shared, tls, peer, certificate).await;
            return Ok(());
        }
        _ => return Err(LinkError::Alpn),
    }
    let agent: AgentHello = tokio::time::timeout(budget, hello::read(&mut tls))
        .await
        .map_err(|_| LinkError::HandshakeTimeout(budget))??;
    let span = tracing::Span::current();
    span.record("agent_id", agent.agent_id.as_str());

    let admitted = match validate_agent_id(&agent.agent_id) {
        Ok(()) => verify(&shared, &agent, &tls, budget).await,
        Err(reason) => Err(LinkError::Refused(reason)),
    };
    let admitted = admitted.and_then(|binding| {
        shared
            .registry
            .admissible(
                &agent.agent_id,
                peer.ip(),
                binding.as_ref().map(|b| &b.verified),
            )
            .map(|()| binding)
            .map_err(LinkError::Duplicate)
    });
    let binding = match admitted {
        Ok(binding) => binding,
        Err(err) => {
            let reason = match &err {
                LinkError::Refused(reason) => reason.clone(),
                LinkError::Identity(refusal) => refusal.to_string(),
                other => other.to_string(),
            };
            let answer = server_hello(&shared, HelloOutcome::Rejected { reason });
            // Best effort: the agent learns why before the connection closes.
            let _ = hello::write(&mut tls, &answer).await;
            return Err(err);
        }
    };
    hello::write(&mut tls, &server_hello(&shared, HelloOutcome::Accepted)).await?;
    drop(pending);

    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(cplink_proto::STREAM_WINDOW)
        .initial_connection_window_size(cplink_proto::CONNECTION_WINDOW)
        .max_frame_size(cplink_proto::MAX_FRAME_SIZE)
        .max_send_buffer_size(cplink_proto::STREAM_WINDOW as usize / 2)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await?;
    let ping_pong = connection.ping_pong();

    let link = Arc::new(AgentLink::new(
        agent.agent_id.clone(),
        shared.registry.next_link_id(),
        peer,
        // A verified agent routes what its Node backs, under the Node's name.
        match &binding {
            Some(binding) => Some(binding.verified.node.clone()),
            None => agent.node_name.clone(),
        },
        match &binding {
            Some(binding) => binding.identifiers.clone(),
            None => agent.identifiers.clone(),
        },
        binding.map(|b| b.verified),
        Carrier::Native(sender),
    ));
    // Admitted above; a link from another address may have won the race since.
    shared.link_up(&link)?;
    tracing::info!(
        agent_id = %link.id,
        node = link.node_name.as_deref().unwrap_or(""),
        verified = link.verified.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        version = %agent.software_version,
        %peer,
        "agent linked"
    );

    let keepalive = async {
        match ping_pong {
            Some(ping_pong) => {
                keepalive::run_timed(ping_pong, shared.config.keepalive, |rtt| {
                    link.record_keepalive_rtt(rtt);
                })
                .await
            }
            // Only one PingPong exists per connection and it was just created.
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        result = &mut connection => match result {
            // After the agent's GOAWAY both ends close the TLS session; whichever closes
            // second may find the socket gone. The agent left as it should.
            Err(err) if err.is_io() && link.goaway_received() => {
                tracing::debug!(%err, "link closed after the agent's GOAWAY");
                Ok(())
            }
            result => result.map_err(LinkError::from),
        },
        err = keepalive => Err(LinkError::from(err)),
        () = link.closer.cancelled() => Ok(()),
    };

    shared.link_down(&link);
    match &outcome {
        Ok(()) => tracing::info!(agent_id = %link.id, "agent unlinked"),
        Err(err) => tracing::info!(agent_id = %link.id, %err, "agent link lost"),
    }
    outcome
}

/// Checks the agent's identity against its hello (nothing to check in declared mode), counting
/// refusals by reason. The API's answers count against the handshake budget.
async fn verify(
    shared: &Shared,
    agent: &AgentHello,
    tls: &tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>,
    budget: std::time::Duration,
) -> Result<Option<Binding>, LinkError> {
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|der| der.as_ref());
    let claim = Claim {
        agent_id: Some(&agent.agent_id),
        node_name: agent.node_name.as_deref(),
        identifiers: &agent.identifiers,
    };
    let token = agent.token.as_ref().map(|t| t.expose());
    let verifying = shared.config.identity.verify(claim, token, certificate);
    let verified = tokio::time::timeout(budget, verifying)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::Unavailable(format!(
                "no answer from the Kubernetes API within {}",
                humantime::format_duration(budget)
            )))
        });
    verified.map_err(|refusal| {
        super::count_refusal(shared, &refusal);
        if let Refusal::AgentId { agent_id, node } = &refusal {
            // Another node's id: name the agent it tried to pass for, if linked.
            for holder in shared
                .registry
                .agents()
                .iter()
                .filter(|l| l.id == *agent_id)
            {
                tracing::warn!(
                    claimed = %agent_id,
                    by_node = %node,
                    held_from = %holder.peer,
                    held_by = holder.verified.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                    "an agent claimed the id of a linked agent"
                );
            }
        }
        LinkError::Identity(refusal)
    })
}

fn server_hello(shared: &Shared, outcome: HelloOutcome) -> ServerHello {
    ServerHello {
        server_id: shared.config.server_id.clone(),
        server_count: shared.config.server_count,
        outcome,
    }
}
