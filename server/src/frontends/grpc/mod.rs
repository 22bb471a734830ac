//! `/ProxyService/Proxy`: kube-apiserver's `GRPC` egress mode.
//!
//! Each Proxy stream carries one tunneled connection: the client sends DIAL_REQ, the server
//! routes and dials it exactly like a CONNECT and answers DIAL_RSP with a connect id or an
//! error; then DATA flows both ways until either end closes. Old clients (konnectivity-client
//! v0.0.14, in Kubernetes 1.20) open a new connection per dial, newer ones a stream per dial on
//! one connection; both are the same here.
//!
//! The two directions run concurrently, each flow-controlled on its own: a DATA packet is taken
//! from the client only once the agent's end has room for it, and the agent's bytes are
//! released only once they were queued for the client.
//!
//! Closing follows konnectivity-client, which has no half-close: its `Close` sends CLOSE_REQ
//! and waits up to 10 s for CLOSE_RSP, and reads nothing more. CLOSE_REQ is answered at once;
//! the agent's end is told after every byte the client sent, and is given [`CLOSE_LINGER`] to
//! finish (its bytes discarded) before it is reset. DIAL_CLS (v0.28 and later, when the dial
//! times out or the caller's context ends) cancels a pending dial at the agent; one that
//! crosses the dial's answer closes the connection that answer opened.

mod authority;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use cplink_proto::dial::DialFailure;
use cplink_proto::konnectivity::mux::{Event, MuxConn};
use cplink_proto::konnectivity::{
    DialRequest, PROTOCOL_TCP, Packet, Payload, ProxyService, ProxyServiceServer,
    UNRECOGNIZED_CONNECT_ID,
};
use cplink_proto::pump::{self, ActiveStream, CountBytes};
use cplink_proto::target::Target;
use h2::{RecvStream, SendStream};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::Shared;
use crate::frontends::count_request_error;
use crate::metrics::{FrontendLabels, ResultLabels};
use crate::tunnel::{self, CLOSE_LINGER, Carried};

/// Packets queued towards one client before the agent's end waits.
const OUTBOUND_QUEUE: usize = 4;

/// Accepts gRPC frontend connections on a Unix socket until `stop` is cancelled. A connection
/// gets GOAWAY when `stop` fires and ends once its streams have, or at once when `force` fires.
pub(crate) async fn accept_uds(
    listener: UnixListener,
    frontend: ProxyFrontend,
    connections: TaskTracker,
    stop: CancellationToken,
    force: CancellationToken,
) {
    // Only kube-apiserver can open this socket (mode 0660): its connections carry streams for
    // as long as they live and are not held to the handshake cap.
    let acceptor = frontend.shared.acceptor("grpc-uds");
    while let Some(((stream, _), _)) = acceptor.next(|| listener.accept(), &stop).await {
        let service = ProxyServiceServer::new(frontend.clone())
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE);
        let stop = stop.clone();
        let force = force.clone();
        connections.spawn(
            async move {
                tokio::select! {
                    () = crate::grpc::serve_connection(
                        authority::AuthorityFix::new(stream),
                        service,
                        stop,
                        None,
                    ) => {}
                    () = force.cancelled() => {}
                }
            }
            .instrument(tracing::info_span!("frontend", peer = "grpc-uds")),
        );
    }
}

/// The Proxy service, one task per stream.
#[derive(Clone)]
pub(crate) struct ProxyFrontend {
    shared: Arc<Shared>,
    streams: TaskTracker,
    force: CancellationToken,
    next_connect_id: Arc<AtomicI64>,
}

impl ProxyFrontend {
    /// A frontend whose stream tasks join `streams` and end when `force` fires.
    pub(crate) fn new(shared: Arc<Shared>, streams: TaskTracker, force: CancellationToken) -> Self {
        ProxyFrontend {
            shared,
            streams,
            force,
            next_connect_id: Arc::new(AtomicI64::new(0)),
        }
    }
}

type PacketStream = Pin<Box<ReceiverStream<Result<Packet, Status>>>>;

#[tonic::async_trait]
impl ProxyService for ProxyFrontend {
    type ProxyStream = PacketStream;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ProxyStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let shared = self.shared.clone();
        let force = self.force.clone();
        let connect_id = self.next_connect_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.streams.spawn(
            async move {
                let closing = tokio::select! {
                    closing = serve(&shared, inbound, &tx, connect_id) => closing,
                    () = force.cancelled() => {
                        tracing::info!("drain deadline reached: connection cut");
                        let _ = tx.try_send(Err(Status::unavailable(
                            "cplink-server shutting down: drain deadline reached",
                        )));
                        None
                    }
                };
                // The client's call ends here; a closing agent end finishes on its own.
                drop(tx);
                if let Some(closing) = closing {
                    tokio::select! {
                        () = closing.finish() => {}
                        () = force.cancelled() => {}
                    }
                }
            }
            .instrument(tracing::info_span!("stream", connect_id)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Outbound = mpsc::Sender<Result<Packet, Status>>;

/// Why a proxied connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("client stream failed: {0}")]
    Client(Status),
    #[error("client went away")]
    ClientGone,
    #[error("{0}")]
    Agent(String),
    #[error("the client cancelled the dial (DIAL_CLS) after it was answered")]
    DialCancelled,
}

/// How a relay that did not fail ended.
enum Ended {
    /// The agent's end finished first: the connection is over.
    ByAgent,
    /// The client closed: the agent's end still has to finish.
    ByClient(AgentEnd),
}

/// The agent's end of a connection whose client closed, with everything the connection holds
/// (its share of `--max-tunnels`, the link's stream count, the active-streams gauge) until it
/// has finished.
struct Closing<'a> {
    end: AgentEnd,
    _route: crate::registry::Route,
    _tracked: crate::connections::Tracked,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _active: ActiveStream<'a>,
}

/// The agent's end of a connection, by carrier.
enum AgentEnd {
    /// END_STREAM was queued behind the client's bytes.
    H2 {
        send: SendStream<Bytes>,
        recv: RecvStream,
    },
    /// CLOSE_REQ is still to be sent, behind the client's bytes.
    Mux(MuxConn),
}

impl Closing<'_> {
    /// Waits up to [`CLOSE_LINGER`] for the agent to finish, discarding what it still sends
    /// (the client reads nothing after its close), then resets what is left.
    async fn finish(self) {
        let mut discarded = 0usize;
        match self.end {
            AgentEnd::H2 { mut send, mut recv } => {
                let drain = async {
                    while let Some(data) = recv.data().await {
                        let Ok(data) = data else { return false };
                        discarded += data.len();
                        let _ = recv.flow_control().release_capacity(data.len());
                    }
                    true
                };
                let finished = tokio::time::timeout(CLOSE_LINGER, drain).await;
                if !matches!(finished, Ok(true)) {
                    send.send_reset(h2::Reason::CANCEL);
                }
                tracing::debug!(
                    discarded,
                    finished = finished.is_ok(),
                    "agent end closed after the client"
                );
            }
            AgentEnd::Mux(mut conn) => {
                let drain = async {
                    conn.close().await.ok()?;
                    loop {
                        match conn.recv().await.ok()? {
                            Event::Data(data) => discarded += data.len(),
                            Event::Closed(_) => return Some(()),
                        }
                    }
                };
                let finished = tokio::time::timeout(CLOSE_LINGER, drain).await;
                tracing::debug!(
                    discarded,
                    finished = matches!(finished, Ok(Some(()))),
                    "agent end closed after the client"
                );
                // Dropping the connection forgets it on the agent's stream.
            }
        }
    }
}

/// Serves one Proxy stream until the connection is over for the client; what is left to close
/// at the agent's end comes back, to finish after the client's call has ended.
async fn serve<'a>(
    shared: &'a Shared,
    mut inbound: Streaming<Packet>,
    tx: &Outbound,
    connect_id: i64,
) -> Option<Closing<'a>> {
    shared
        .metrics
        .frontend_connections
        .get_or_create(&FrontendLabels { frontend: "grpc" })
        .inc();
    let dial = match first_packet(shared, &mut inbound).await {
        Ok(Some(dial)) => dial,
        Ok(None) => return None,
        Err((reason, status)) => {
            count_request_error(shared, reason);
            tracing::info!(%status, "frontend request refused");
            let _ = tx.send(Err(status)).await;
            return None;
        }
    };
    let random = dial.random;
    let target = match parse_dial(&dial) {
        Ok(target) => target,
        Err(failure) => {
            count_request_error(shared, "bad_target");
            tracing::info!(%failure, "frontend request refused");
            let _ = tx
                .send(Ok(Packet::dial_failed(random, failure.reason_line())))
                .await;
            return None;
        }
    };

    let span = tracing::info_span!("dial", dest = %target, agent_id = tracing::field::Empty);
    async move {
        let dialed = tokio::select! {
            dialed = tunnel::open_counted(shared, &target, "grpc") => dialed,
            why = cancelled(&mut inbound, random) => {
                // Dropping the dial resets its stream at a native agent and sends DIAL_CLS to
                // an upstream one; the route and the tunnel permit go with it.
                shared
                    .metrics
                    .dials
                    .get_or_create(&ResultLabels { result: "cancelled" })
                    .inc();
                tracing::info!(why, "dial cancelled by the client");
                return None;
            }
        };
        let tunnel = match dialed {
            Ok(tunnel) => tunnel,
            Err(failure) => {
                let _ = tx
                    .send(Ok(Packet::dial_failed(random, failure.reason_line())))
                    .await;
                return None;
            }
        };
        if tx
            .send(Ok(Packet::dial_established(random, connect_id)))
            .await
            .is_err()
        {
            tracing::info!("frontend left before the tunnel was established");
            return None;
        }
        let active = ActiveStream::new(&shared.metrics.streams_active);
        let bytes = &tunnel::counted(&shared.metrics.bytes, &tunnel.tracked, &tunnel.route);
        let ids = Ids { connect_id, random };
        let result = match tunnel.carried {
            Carried::H2 { send, recv } => relay_h2(&mut inbound, tx, ids, send, recv, bytes).await,
            Carried::Mux(conn) => relay_mux(&mut inbound, tx, ids, conn, bytes).await,
        };
        match result {
            Ok(ended) => {
                // Answered before the agent's end has finished: the client waits for nothing
                // else, and reads nothing more.
                let _ = tx.send(Ok(Packet::close_response(connect_id, ""))).await;
                match ended {
                    Ended::ByAgent => tracing::debug!("tunnel closed by the destination"),
                    Ended::ByClient(end) => {
                        tracing::debug!("tunnel closed by the client");
                        return Some(Closing {
                            end,
                            _route: tunnel.route,
                            _tracked: tunnel.tracked,
                            _permit: tunnel._permit,
                            _active: active,
                        });
                    }
                }
            }
            Err(RelayError::DialCancelled) => {
                tracing::info!("dial cancelled by the client (DIAL_CLS) after its answer");
            }
            Err(err) => {
                tracing::info!(%err, "tunnel aborted");
                // Both signs of failure: the packet for clients that read it, the stream's
                // status for the others.
                let _ = tx
                    .send(Ok(Packet::close_response(connect_id, err.to_string())))
                    .await;
                let _ = tx.send(Err(Status::aborted(err.to_string()))).await;
            }
        }
        None
    }
    .instrument(span)
    .await
}

/// Waits for the dial request that opens every Proxy stream, within the header timeout.
async fn first_packet(
    shared: &Shared,
    inbound: &mut Streaming<Packet>,
) -> Result<Option<DialRequest>, (&'static str, Status)> {
    let budget = shared.config.header_timeout;
    let first = tokio::time::timeout(budget, inbound.message())
        .await
        .map_err(|_| {
            (
                "header_timeout",
                Status::deadline_exceeded(format!(
                    "no DIAL_REQ within {}",
                    humantime::format_duration(budget)
                )),
            )
        })?;
    match first {
        Ok(Some(Packet {
            payload: Some(Payload::DialRequest(dial)),
            ..
        })) => Ok(Some(dial)),
        Ok(Some(packet)) => Err((
            "not_dial",
            Status::invalid_argument(format!(
                "a Proxy stream must start with DIAL_REQ, not {}",
                packet_name(&packet)
            )),
        )),
        // The client left before asking for anything.
        Ok(None) | Err(_) => Ok(None),
    }
}

fn parse_dial(dial: &DialRequest) -> Result<Target, DialFailure> {
    if dial.protocol != PROTOCOL_TCP {
        return Err(DialFailure::BadTarget(format!(
            "protocol {:?} is not supported, only \"tcp\"",
            dial.protocol.chars().take(32).collect::<String>()
        )));
    }
    dial.address
        .parse()
        .map_err(|e: cplink_proto::target::TargetError| DialFailure::BadTarget(e.to_string()))
}

/// Resolves when the client cancels the dial `random` (DIAL_CLS) or leaves, saying which.
async fn cancelled(inbound: &mut Streaming<Packet>, random: i64) -> &'static str {
    loop {
        match inbound.message().await {
            Ok(Some(Packet {
                payload: Some(Payload::CloseDial(cancel)),
                ..
            })) if cancel.random == random => return "DIAL_CLS",
            Ok(Some(packet)) => {
                tracing::debug!(
                    packet = packet_name(&packet),
                    "ignored before the dial answer"
                );
            }
            Ok(None) => return "the client ended its stream",
            Err(_) => return "the client's stream failed",
        }
    }
}

/// The ids of one connection: the client's for its dial, the server's for the connection.
#[derive(Clone, Copy)]
struct Ids {
    connect_id: i64,
    random: i64,
}

/// What the client asked for next on an established connection.
enum FromClient {
    Data(Bytes),
    /// CLOSE_REQ, or the end of the client's stream.
    Close,
}

/// The next packet for this connection from the client, answering those for other ids.
async fn next_from_client(
    inbound: &mut Streaming<Packet>,
    tx: &Outbound,
    ids: Ids,
) -> Result<FromClient, RelayError> {
    loop {
        let packet = match inbound.message().await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(FromClient::Close),
            Err(status) => return Err(RelayError::Client(status)),
        };
        match packet.payload {
            Some(Payload::Data(data)) if data.connect_id == ids.connect_id => {
                return Ok(FromClient::Data(Bytes::from(data.data)));
            }
            Some(Payload::CloseRequest(close)) if close.connect_id == ids.connect_id => {
                return Ok(FromClient::Close);
            }
            // The client gave up on the dial as the answer crossed it: it will never use this
            // connection.
            Some(Payload::CloseDial(cancel)) if cancel.random == ids.random => {
                return Err(RelayError::DialCancelled);
            }
            Some(Payload::Data(data)) => unknown(tx, data.connect_id).await?,
            Some(Payload::CloseRequest(close)) => unknown(tx, close.connect_id).await?,
            other => {
                let packet = Packet {
                    r#type: packet.r#type,
                    payload: other,
                };
                tracing::debug!(
                    packet = packet_name(&packet),
                    "ignored on an established stream"
                );
            }
        }
    }
}

async fn unknown(tx: &Outbound, connect_id: i64) -> Result<(), RelayError> {
    tx.send(Ok(Packet::close_response(
        connect_id,
        UNRECOGNIZED_CONNECT_ID,
    )))
    .await
    .map_err(|_| RelayError::ClientGone)
}

async fn to_client(
    tx: &Outbound,
    connect_id: i64,
    data: Bytes,
    counters: &impl CountBytes,
) -> Result<(), RelayError> {
    // konnectivity-client's Read takes a DATA packet without bytes for the end of the
    // connection (its payload decodes to nil, its channel's closed value): the bytes behind it
    // would be lost without a word. An upstream agent may send one; it carries nothing.
    if data.is_empty() {
        return Ok(());
    }
    let len = data.len() as u64;
    tx.send(Ok(Packet::data(connect_id, data)))
        .await
        .map_err(|_| RelayError::ClientGone)?;
    counters.to_socket(len);
    Ok(())
}

/// Relays between the client and a native agent's HTTP/2 stream.
///
/// When the client closes, END_STREAM follows its last bytes to the agent, which finishes
/// writing and shuts its socket down; the rest is [`Closing::finish`]'s. When the agent
/// finishes first, the connection is over (konnectivity has no half-close).
async fn relay_h2(
    inbound: &mut Streaming<Packet>,
    tx: &Outbound,
    ids: Ids,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    counters: &impl CountBytes,
) -> Result<Ended, RelayError> {
    let result = {
        let up = async {
            loop {
                match next_from_client(inbound, tx, ids).await? {
                    FromClient::Data(data) => {
                        let len = data.len() as u64;
                        pump::send_all(&mut send, data)
                            .await
                            .map_err(|e| RelayError::Agent(e.to_string()))?;
                        counters.to_stream(len);
                    }
                    FromClient::Close => {
                        send.send_data(Bytes::new(), true)
                            .map_err(|e| RelayError::Agent(e.to_string()))?;
                        return Ok(());
                    }
                }
            }
        };
        let down = async {
            while let Some(data) = recv.data().await {
                let data = data.map_err(|e| RelayError::Agent(e.to_string()))?;
                let len = data.len();
                // An END_STREAM frame without payload has nothing to pass on.
                to_client(tx, ids.connect_id, data, counters).await?;
                recv.flow_control()
                    .release_capacity(len)
                    .map_err(|e| RelayError::Agent(e.to_string()))?;
            }
            // Every byte was passed on; a destination that failed still fails here.
            let trailers = std::future::poll_fn(|cx| recv.poll_trailers(cx))
                .await
                .map_err(|e| RelayError::Agent(e.to_string()))?;
            if let Some(abort) = trailers.as_ref().and_then(|t| t.get(pump::ABORT_TRAILER)) {
                return Err(RelayError::Agent(format!(
                    "the destination failed: {}",
                    String::from_utf8_lossy(abort.as_bytes())
                )));
            }
            Ok(())
        };
        first_to_end(up, down).await
    };
    match result {
        Ok(Side::Client) => Ok(Ended::ByClient(AgentEnd::H2 { send, recv })),
        // The agent finished: end ours too, without a reset.
        Ok(Side::Agent) => {
            let _ = send.send_data(Bytes::new(), true);
            Ok(Ended::ByAgent)
        }
        Err(err) => {
            send.send_reset(h2::Reason::CANCEL);
            Err(err)
        }
    }
}

/// Relays between the client and a connection on an upstream agent's shared stream. When the
/// client closes, CLOSE_REQ is [`Closing::finish`]'s to send, after the client's last bytes.
async fn relay_mux(
    inbound: &mut Streaming<Packet>,
    tx: &Outbound,
    ids: Ids,
    mut conn: MuxConn,
    counters: &impl CountBytes,
) -> Result<Ended, RelayError> {
    let sender = conn.sender();
    let agent = |e: cplink_proto::konnectivity::mux::MuxError| RelayError::Agent(e.to_string());
    let result = {
        let up = async {
            loop {
                match next_from_client(inbound, tx, ids).await? {
                    FromClient::Data(data) => {
                        let len = data.len() as u64;
                        sender.send(data).await.map_err(agent)?;
                        counters.to_stream(len);
                    }
                    FromClient::Close => return Ok(()),
                }
            }
        };
        let down = async {
            loop {
                match conn.recv().await.map_err(agent)? {
                    Event::Data(data) => {
                        to_client(tx, ids.connect_id, data, counters).await?;
                    }
                    Event::Closed(None) => return Ok(()),
                    Event::Closed(Some(error)) => return Err(RelayError::Agent(error)),
                }
            }
        };
        first_to_end(up, down).await
    };
    match result {
        Ok(Side::Client) => Ok(Ended::ByClient(AgentEnd::Mux(conn))),
        Ok(Side::Agent) => Ok(Ended::ByAgent),
        // Dropping the connection closes it towards the agent.
        Err(err) => Err(err),
    }
}

/// Which side of a relay ended it.
enum Side {
    Client,
    Agent,
}

/// Runs both directions of a relay until either ends or fails.
async fn first_to_end(
    up: impl Future<Output = Result<(), RelayError>>,
    down: impl Future<Output = Result<(), RelayError>>,
) -> Result<Side, RelayError> {
    tokio::select! {
        closed = up => closed.map(|()| Side::Client),
        finished = down => finished.map(|()| Side::Agent),
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    packet.r#type().as_str_name()
}
