//! `/AgentService/Connect`: upstream konnectivity agents.
//!
//! They reach the agent port like native agents (TLS with a client certificate signed by the
//! agent CA) but negotiate ALPN `h2` and open one gRPC stream that carries all their
//! connections. The agent names itself in the `agentid` metadata and describes what it reaches
//! in `agentidentifiers`; the server answers with `serverid` and `servercount` before any
//! packet, then registers the agent with the same registry, strategies and metrics as native
//! agents. Each upstream agent has its own tasks and queues, so a slow one never stalls another
//! agent's traffic.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use cplink_proto::konnectivity::mux::{CONN_BUDGET, Mux, MuxLimits, Role};
use cplink_proto::konnectivity::{
    self, AGENT_ID, AGENT_IDENTIFIERS, AUTHORIZATION, AgentService, AgentServiceServer, Packet,
    Payload, SERVER_COUNT, SERVER_ID,
};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::validate_agent_id;
use crate::Shared;
use crate::identity::tokens::AuthError;
use crate::identity::{Claim, Refusal};
use crate::metrics::LinkErrorLabels;
use crate::registry::{AgentLink, Carrier};

/// Packets queued towards one agent before its connections wait.
const OUTBOUND_QUEUE: usize = 64;

/// Serves one upstream agent's HTTP/2 connection until it ends or the server closes its link.
/// `certificate`: the leaf client certificate (DER) the agent presented and that verified;
/// without one it must
/// send a token the server's token authentication accepts.
pub(crate) async fn serve<IO>(
    shared: Arc<Shared>,
    io: IO,
    peer: SocketAddr,
    certificate: Option<Arc<[u8]>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stop = CancellationToken::new();
    let service = AgentServiceServer::new(UpstreamAgents {
        shared: shared.clone(),
        peer,
        certificate,
        stop: stop.clone(),
    })
    .max_decoding_message_size(crate::grpc::MAX_MESSAGE);
    crate::grpc::serve_connection(io, service, stop, Some(shared.config.keepalive)).await;
}

/// The gRPC status refusing an agent whose identity does not back its claims.
fn refusal_status(refusal: &Refusal) -> Status {
    match refusal {
        Refusal::Unavailable(_) => Status::unavailable(refusal.to_string()),
        Refusal::NoToken | Refusal::NoNodeCertificate | Refusal::Token(_) => {
            Status::unauthenticated(refusal.to_string())
        }
        _ => Status::permission_denied(refusal.to_string()),
    }
}

/// The Connect service of one agent connection.
#[derive(Clone)]
struct UpstreamAgents {
    shared: Arc<Shared>,
    peer: SocketAddr,
    certificate: Option<Arc<[u8]>>,
    /// Ends the connection once its agent is unlinked.
    stop: CancellationToken,
}

type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for UpstreamAgents {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let shared = &self.shared;
        let metadata = request.metadata();
        let authorization = metadata.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        if self.certificate.is_none() {
            // Without a certificate the TLS layer only let the agent in because token
            // authentication is configured.
            let checked = match &shared.config.token_auth {
                Some(auth) => auth.check(authorization).await.map(drop),
                None => Err(AuthError::Missing),
            };
            if let Err(err) = checked {
                shared
                    .metrics
                    .link_errors
                    .get_or_create(&LinkErrorLabels {
                        reason: "unauthenticated",
                    })
                    .inc();
                tracing::warn!(peer = %self.peer, %err, "konnectivity agent refused");
                return Err(err.status());
            }
        }
        let agent_id = single_value(metadata, AGENT_ID)?;
        validate_agent_id(&agent_id).map_err(Status::invalid_argument)?;
        let (node_name, identifiers) = match metadata.get(AGENT_IDENTIFIERS) {
            Some(value) => {
                let value = value.to_str().map_err(|_| {
                    Status::invalid_argument("agentidentifiers is not printable ASCII")
                })?;
                konnectivity::decode_identifiers(value)
                    .map_err(|e| Status::invalid_argument(format!("agentidentifiers: {e}")))?
            }
            None => Default::default(),
        };
        let claim = Claim {
            // Upstream agents choose their own ids (a random UUID by default).
            agent_id: None,
            node_name: node_name.as_deref(),
            identifiers: &identifiers,
        };
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let binding = shared
            .config
            .identity
            .verify(claim, token, self.certificate.as_deref())
            .await
            .map_err(|refusal| {
                super::count_refusal(shared, &refusal);
                tracing::warn!(peer = %self.peer, %agent_id, %refusal, "konnectivity agent refused");
                refusal_status(&refusal)
            })?;
        let (node_name, identifiers, verified) = match binding {
            Some(binding) => (
                Some(binding.verified.node.clone()),
                binding.identifiers,
                Some(binding.verified),
            ),
            None => (node_name, identifiers, None),
        };
        let inbound = request.into_inner();

        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let mux = Mux::with_limits(
            Role::Dialer,
            out_tx,
            MuxLimits {
                conn_budget: CONN_BUDGET,
                overflows: shared.metrics.konnectivity_overflows.clone(),
            },
        );
        let link = Arc::new(AgentLink::new(
            agent_id,
            shared.registry.next_link_id(),
            self.peer,
            node_name,
            identifiers,
            verified,
            Carrier::Konnectivity(mux.clone()),
        ));
        shared.link_up(&link).map_err(|refused| {
            shared.refuse_duplicate(&refused, self.peer);
            Status::already_exists(refused.to_string())
        })?;
        tracing::info!(
            agent_id = %link.id,
            node = link.node_name.as_deref().unwrap_or(""),
            peer = %self.peer,
            protocol = "konnectivity",
            "agent linked"
        );
        let span = tracing::info_span!("link", peer = %self.peer, agent_id = %link.id);
        tokio::spawn(
            receive(
                shared.clone(),
                link.clone(),
                mux,
                inbound,
                self.stop.clone(),
            )
            .instrument(span),
        );

        let outbound = ReceiverStream::new(out_rx)
            .map(Ok)
            .take_until(self.stop.clone().cancelled_owned());
        let mut response = Response::new(Box::pin(outbound) as PacketStream);
        let headers = response.metadata_mut();
        headers.insert(
            SERVER_ID,
            MetadataValue::try_from(shared.config.server_id.as_str())
                .map_err(|_| Status::internal("server id is not valid metadata"))?,
        );
        headers.insert(
            SERVER_COUNT,
            MetadataValue::from(shared.config.server_count),
        );
        Ok(response)
    }
}

/// Takes the agent's packets until its stream ends or the server closes the link.
///
/// Nothing in this loop waits for a connection or for the agent to read: dispatching queues
/// each connection's bytes (closing one that falls too far behind) and answers the agent
/// without waiting. An upstream agent stops reading our packets while its own sends are
/// blocked; a loop that waited for a slow connection stopped reading its sends, and both ends
/// then waited for each other for good.
async fn receive(
    shared: Arc<Shared>,
    link: Arc<AgentLink>,
    mux: Arc<Mux>,
    mut inbound: Streaming<Packet>,
    stop: CancellationToken,
) {
    let outcome = loop {
        let packet = tokio::select! {
            packet = inbound.message() => packet,
            () = link.closer.cancelled() => break Ok(()),
        };
        match packet {
            Ok(Some(packet)) => match mux.dispatch(packet) {
                Some(Packet {
                    payload: Some(Payload::Drain(_)),
                    ..
                }) => {
                    tracing::info!("agent is draining: no new dials routed to it");
                    link.mark_draining();
                }
                Some(packet) => {
                    tracing::debug!(
                        packet = packet.r#type().as_str_name(),
                        "unexpected packet ignored"
                    );
                }
                None => {}
            },
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    mux.close("agent link closed");
    shared.link_down(&link);
    match outcome {
        Ok(()) => tracing::info!("agent unlinked"),
        Err(status) => tracing::info!(%status, "agent link lost"),
    }
    stop.cancel();
}

fn single_value(metadata: &tonic::metadata::MetadataMap, key: &str) -> Result<String, Status> {
    let mut values = metadata.get_all(key).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value
            .to_str()
            .map(str::to_owned)
            .map_err(|_| Status::invalid_argument(format!("{key} is not printable ASCII"))),
        (None, _) => Err(Status::invalid_argument(format!(
            "{key} metadata is required"
        ))),
        (Some(_), Some(_)) => Err(Status::invalid_argument(format!(
            "{key} metadata must have exactly one value"
        ))),
    }
}
