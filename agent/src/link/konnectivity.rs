//! Links to konnectivity servers: the gRPC `AgentService/Connect` stream of apiserver-network-proxy
//! (and of cplink-server), over TLS with ALPN `h2`.
//!
//! A sole server address may hide several servers behind a load balancer, each answering with its
//! `serverid` and how many servers there are (`servercount`). The agent keeps dialing the
//! address until it holds links to that many distinct server ids, closing links that land on a
//! server it already has (see [`crate::pool`] and [`crate::slots`]).
//!
//! One link is one bidirectional stream carrying every tunneled connection, multiplexed by
//! [`Mux`]. Each dial request runs on its own task, so a slow dial never holds up the stream;
//! every outbound packet goes through one bounded queue feeding the request stream. The receive
//! loop never waits for one connection nor for the server to read (see [`Mux::dispatch`]).
//!
//! Liveness is HTTP/2 PING keepalive on the client connection. Upstream servers older than
//! v0.0.33 run grpc-go's default keepalive enforcement (`MinTime` 5 minutes, two strikes, the
//! strikes cleared only when the server sends something): an idle link pinged every 30 s gets
//! GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings" after about two minutes, and the server closes
//! the connection. As grpc-go's clients do, the agent then doubles its PING interval for that
//! server (see [`ping_backoff`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cplink_proto::dial::DialFailure;
use cplink_proto::hello::BearerToken;
use cplink_proto::konnectivity::mux::{self, CONN_BUDGET, Mux, MuxLimits, Role};
use cplink_proto::konnectivity::{self as wire, AgentServiceClient, DialRequest, Packet, Payload};
use cplink_proto::pump::ActiveStream;
use cplink_proto::target::Target;
use cplink_runtime::net::abort_tcp_halves;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tracing::Instrument;

use super::{LinkContext, LinkError, LinkTls, ServerSlot, connect_tcp, handshake_tls};
use crate::grpc_metadata::{agent_id_value, ascii_value, origin};
use crate::slots::{HeldLink, OnDuplicate, SlotId};
use crate::token::{self, TokenError};
use crate::{LinkInfo, Shared, dial};

/// Packets queued towards the server before the tasks sending them wait.
const OUT_QUEUE: usize = 128;

/// How long a drained link waits for the server to end the stream after the agent ended its
/// side, so that the DRAIN and the end of the stream are delivered rather than reset.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the agent answers a dial with while it drains.
const DRAINING: &str = "the agent is shutting down";

/// `token` as `authorization` metadata. Marked sensitive, which keeps it out of HPACK's dynamic
/// table and out of debug output.
fn bearer_value(path: &Path, token: &BearerToken) -> Result<MetadataValue<Ascii>, TokenError> {
    let mut value = ascii_value(&format!("Bearer {}", token.expose()))
        .map_err(|_| TokenError::Invalid(path.to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// tonic's client side over one hyper HTTP/2 connection: no pool and no reconnection, since a
/// link is exactly one connection.
#[derive(Debug, Clone)]
struct Http2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// An established link: its stream, and what keeps the connection under it alive.
pub(crate) struct Link {
    info: LinkInfo,
    /// The server slot, whose PING interval a `too_many_pings` doubles.
    slot: SlotId,
    /// The GOAWAY the server sent, if any.
    goaway: ping_backoff::GoAwayWatch,
    _held: HeldLink,
    /// Kept so that the connection stays open for the stream's lifetime.
    _client: AgentServiceClient<Http2>,
    connection: AbortOnDropHandle<Result<(), hyper::Error>>,
    out: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
}

/// Establishes one link: TCP, TLS, HTTP/2, then the `Connect` stream and its response headers.
pub(crate) async fn connect(shared: &Shared, target: &ServerSlot) -> Result<Link, LinkError> {
    let config = &shared.config;
    let endpoint = &target.endpoint;
    // Read before dialing: an unreadable token fails the attempt without bothering the server.
    let token = match &config.service_account_token_path {
        Some(path) => Some(bearer_value(path, &token::read(path).await?)?),
        None => None,
    };
    let tcp = connect_tcp(config, endpoint).await?;
    let budget = config.link_timeout;
    let handshake = async {
        let tls = handshake_tls(config, endpoint, tcp, cplink_proto::ALPN_H2).await?;
        open_stream(shared, target, tls, token).await
    };
    tokio::time::timeout(budget, handshake)
        .await
        .map_err(|_| LinkError::Timeout {
            step: "TLS, HTTP/2 and gRPC handshakes",
            budget,
        })?
}

async fn open_stream(
    shared: &Shared,
    target: &ServerSlot,
    tls: LinkTls,
    token: Option<MetadataValue<Ascii>>,
) -> Result<Link, LinkError> {
    let config = &shared.config;
    let ping_interval = ping_backoff::interval(shared, target.slot);
    let goaway = ping_backoff::GoAwayWatch::default();
    let tls = goaway.watch(tls);
    let (send_request, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // The one stream carries every connection of the link: give it the link's window.
        .initial_stream_window_size(cplink_proto::MUX_STREAM_WINDOW)
        .initial_connection_window_size(cplink_proto::MUX_STREAM_WINDOW)
        .max_frame_size(cplink_proto::MAX_FRAME_SIZE)
        .keep_alive_interval(ping_interval)
        .keep_alive_timeout(config.keepalive.timeout)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(LinkError::Http2)?;
    let connection = AbortOnDropHandle::new(tokio::spawn(connection));
    let origin = origin(&target.endpoint.address)
        .map_err(|e| LinkError::Header(format!("server address: {e}")))?;
    let mut client = AgentServiceClient::with_origin(Http2(send_request), origin);

    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let mut request = tonic::Request::new(ReceiverStream::new(out_rx));
    let metadata = request.metadata_mut();
    // Checked when the configuration was validated; the identifiers are percent-encoded.
    let agent_id = agent_id_value(&config.agent_id)
        .map_err(|e| LinkError::Header(format!("{}: {e}", wire::AGENT_ID)))?;
    metadata.insert(wire::AGENT_ID, agent_id);
    let identifiers = wire::encode_identifiers(config.node_name.as_deref(), shared.identifiers());
    let identifiers = ascii_value(&identifiers)
        .map_err(|e| LinkError::Header(format!("{}: {e}", wire::AGENT_IDENTIFIERS)))?;
    metadata.insert(wire::AGENT_IDENTIFIERS, identifiers);
    if let Some(token) = token {
        metadata.insert(wire::AUTHORIZATION, token);
    }

    let response = client
        .connect(request)
        .await
        .map_err(|status| LinkError::from_status(&status))?;
    let info = server_info(response.metadata())?;
    tracing::Span::current().record("server_id", info.server_id.as_str());
    shared
        .links
        .set_server_count(target.slot, info.server_count);
    // Konnectivity servers keep every link of an agent: a second link to the same server is
    // closed here.
    let held = shared
        .links
        .hold(target.slot, info.clone(), OnDuplicate::Refuse)?;
    Ok(Link {
        info,
        slot: target.slot,
        goaway,
        _held: held,
        _client: client,
        connection,
        out,
        inbound: response.into_inner(),
    })
}

/// The `serverid` and `servercount` response headers.
fn server_info(metadata: &MetadataMap) -> Result<LinkInfo, LinkError> {
    let text = |key: &str| -> Result<String, LinkError> {
        let value = metadata
            .get(key)
            .ok_or_else(|| LinkError::Header(format!("no {key}")))?;
        let text = value
            .to_str()
            .map_err(|_| LinkError::Header(format!("{key} is not printable ASCII")))?;
        Ok(text.trim().to_owned())
    };
    let server_id = text(wire::SERVER_ID)?;
    if server_id.is_empty() {
        return Err(LinkError::Header(format!("empty {}", wire::SERVER_ID)));
    }
    let count = text(wire::SERVER_COUNT)?;
    let server_count = count.parse().map_err(|_| {
        LinkError::Header(format!("{} {count:?} is not a count", wire::SERVER_COUNT))
    })?;
    Ok(LinkInfo {
        server_id,
        server_count,
    })
}

/// Serves one link until it ends, then says why.
pub(crate) async fn serve_link(shared: Arc<Shared>, link: Link, context: LinkContext) {
    tracing::info!(server_count = link.info.server_count, "linked");
    let LinkContext {
        streams,
        shutdown,
        force,
    } = &context;
    let (slot, goaway) = (link.slot, link.goaway.clone());
    let served = serve(&shared, link, streams, shutdown, force).await;
    if let Some(frame) = goaway.get() {
        if frame.is_too_many_pings() {
            ping_backoff::back_off(&shared, slot);
        } else {
            tracing::debug!(%frame, "the server sent GOAWAY");
        }
    }
    match served {
        Ok(()) if shutdown.is_cancelled() => tracing::info!("link closed"),
        Ok(()) => tracing::info!("link closed by the server"),
        Err(err) => {
            super::count_attempt(&shared, err.kind());
            tracing::warn!(%err, "link failed");
        }
    }
}

/// How a link's stream ended.
enum End {
    /// Drained: the DRAIN was sent and every connection finished.
    Drained,
    /// The server ended the stream, or shutdown forced it closed.
    Closed,
    /// The stream or its connection failed.
    Failed(LinkError),
}

async fn serve(
    shared: &Arc<Shared>,
    link: Link,
    streams: &TaskTracker,
    shutdown: &CancellationToken,
    force: &CancellationToken,
) -> Result<(), LinkError> {
    let Link {
        _held: held,
        _client,
        mut connection,
        out,
        mut inbound,
        ..
    } = link;
    let mux = Mux::with_limits(
        Role::Acceptor,
        out.clone(),
        MuxLimits {
            conn_budget: CONN_BUDGET,
            overflows: shared.metrics.konnectivity_overflows.clone(),
        },
    );
    let link = LinkTasks {
        shared: shared.clone(),
        held,
        mux: mux.clone(),
        pending: PendingDials::default(),
        tasks: TaskTracker::new(),
        streams: streams.clone(),
        cancel: CancellationToken::new(),
    };
    let _cancel_dials = link.cancel.clone().drop_guard();
    let mut draining = false;
    let mut connection_done = false;
    let end = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(packet)) => {
                    // Never waits: a connection whose destination falls too far behind is
                    // closed instead of holding up the stream (and with it the server, which
                    // may be waiting for this end to read before it reads our packets).
                    if let Some(packet) = mux.dispatch(packet) {
                        link.handle(packet, draining);
                    }
                }
                Ok(None) => break End::Closed,
                Err(status) if draining => {
                    tracing::debug!(%status, "stream ended while draining");
                    break End::Closed;
                }
                Err(status) => break End::Failed(LinkError::from_status(&status)),
            },
            ended = &mut connection, if !connection_done => match ended {
                Ok(Err(err)) => break End::Failed(LinkError::Http2(err)),
                // A GOAWAY from the server only stops new streams; this one goes on until the
                // server ends it or the connection drops, which the stream then reports.
                Ok(Ok(())) | Err(_) => {
                    tracing::debug!("the server accepts no new streams on this connection");
                    connection_done = true;
                }
            },
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                link.tasks.close();
                tracing::info!(
                    connections = mux.open_connections(),
                    dials = link.pending.len(),
                    "draining: sending DRAIN, refusing new dials"
                );
                // Not awaited: the loop keeps reading while the DRAIN waits for room.
                mux.send_detached(Packet::drain());
            }
            () = link.tasks.wait(), if draining => break End::Drained,
            () = force.cancelled() => break End::Closed,
        }
    };
    mux.close("link closed");
    link.cancel.cancel();
    match end {
        End::Drained => {
            // Ending the request stream (once every sender is gone) tells the server this side
            // is done; waiting for its end of the stream lets the DRAIN through before the
            // connection goes.
            drop((link, mux, out));
            let finished = async { while let Ok(Some(_)) = inbound.message().await {} };
            tokio::select! {
                ended = tokio::time::timeout(CLOSE_GRACE, finished) => if ended.is_err() {
                    tracing::debug!("the server did not end the stream; closing the link");
                },
                () = force.cancelled() => {}
            }
            Ok(())
        }
        End::Closed => Ok(()),
        End::Failed(err) => Err(err),
    }
}

/// What serves the dial requests of one link.
struct LinkTasks {
    shared: Arc<Shared>,
    /// The link's place in the agent's table, which counts its connections.
    held: HeldLink,
    mux: Arc<Mux>,
    pending: PendingDials,
    /// Dials and connections of this link, so that a drain can wait for them.
    tasks: TaskTracker,
    /// Every task of the agent's connections, so that shutdown can wait for them.
    streams: TaskTracker,
    /// Cancels the pending dials of this link when it ends.
    cancel: CancellationToken,
}

impl LinkTasks {
    /// Acts on a packet the mux did not consume.
    fn handle(&self, packet: Packet, draining: bool) {
        match packet.payload {
            Some(Payload::DialRequest(request)) => self.dial(request, draining),
            Some(Payload::CloseDial(close)) => {
                if self.pending.cancel(close.random) {
                    tracing::debug!(random = close.random, "dial cancelled by the server");
                } else {
                    tracing::debug!(random = close.random, "DIAL_CLS for no pending dial");
                }
            }
            payload => tracing::debug!(
                packet_type = packet.r#type,
                payload = payload.is_some(),
                "ignoring a packet an agent does not expect"
            ),
        }
    }

    /// Starts serving a dial request on its own task.
    fn dial(&self, request: DialRequest, draining: bool) {
        let random = request.random;
        let span = tracing::info_span!(
            "dial",
            dest = %request.address,
            random,
            connect_id = tracing::field::Empty,
        );
        let plan = if draining {
            Err(DialFailure::NoAgent(DRAINING.into()))
        } else {
            parse_request(&request).and_then(|target| {
                let pending = self.pending.register(random, &self.cancel).ok_or_else(|| {
                    DialFailure::BadTarget(format!("dial request {random} is already pending"))
                })?;
                Ok((target, pending))
            })
        };
        let counted = self.held.count_stream();
        let task = serve_dial(
            self.shared.clone(),
            self.mux.clone(),
            random,
            plan,
            self.cancel.clone(),
        );
        let task = async move {
            task.await;
            drop(counted);
        };
        let task = self.streams.track_future(self.tasks.track_future(task));
        tokio::spawn(task.instrument(span));
    }
}

/// The destination of a dial request; only TCP is supported.
fn parse_request(request: &DialRequest) -> Result<Target, DialFailure> {
    if request.protocol != wire::PROTOCOL_TCP {
        return Err(DialFailure::BadTarget(format!(
            "protocol {:?} is not supported, only {:?}",
            request.protocol,
            wire::PROTOCOL_TCP
        )));
    }
    request
        .address
        .parse()
        .map_err(|e: cplink_proto::target::TargetError| DialFailure::BadTarget(e.to_string()))
}

/// Serves one dial request: refuses it, or dials and pumps.
async fn serve_dial(
    shared: Arc<Shared>,
    mux: Arc<Mux>,
    random: i64,
    plan: Result<(Target, PendingDial), DialFailure>,
    link_closed: CancellationToken,
) {
    match plan {
        Ok((target, pending)) => {
            dial_and_pump(shared, mux, target, pending, link_closed).await;
        }
        Err(failure) => {
            dial::count(&shared, failure.kind());
            tracing::info!(%failure, "dial refused");
            answer(&mux, Packet::dial_failed(random, failure.reason_line())).await;
        }
    }
}

async fn answer(mux: &Mux, packet: Packet) {
    if let Err(err) = mux.send(packet).await {
        tracing::debug!(%err, "link gone before the dial was answered");
    }
}

/// Dials, answers, then pumps bytes until either end closes the connection.
async fn dial_and_pump(
    shared: Arc<Shared>,
    mux: Arc<Mux>,
    target: Target,
    pending: PendingDial,
    link_closed: CancellationToken,
) {
    let random = pending.random;
    let dialed = tokio::select! {
        dialed = dial::open(&shared, &target) => dialed,
        () = pending.cancel.cancelled() => {
            dial::count(&shared, "cancelled");
            tracing::info!("dial cancelled");
            return;
        }
    };
    // From here on a DIAL_CLS finds nothing: the server closes the answered connection instead.
    drop(pending);
    let tcp = match dialed {
        Ok(tcp) => tcp,
        Err(failure) => {
            return answer(&mux, Packet::dial_failed(random, failure.reason_line())).await;
        }
    };
    // Registered before the answer goes out, so that the server's first DATA finds it.
    let mut conn = mux.accept();
    let connect_id = conn.connect_id();
    tracing::Span::current().record("connect_id", connect_id);
    if let Err(err) = mux.send(Packet::dial_established(random, connect_id)).await {
        tracing::debug!(%err, "link gone before the dial was answered");
        return cplink_runtime::net::abort_tcp(tcp);
    }
    let _active = ActiveStream::new(&shared.metrics.streams_active);
    let (mut reader, mut writer) = tcp.into_split();
    // An acceptor never lingers: it is done once it has sent its CLOSE_RSP.
    let linger = Duration::ZERO;
    let pumped = tokio::select! {
        pumped = mux::pump(
            &mut reader,
            &mut writer,
            &mut conn,
            Bytes::new(),
            &shared.metrics.bytes,
            linger,
        ) => pumped,
        // A pump blocked writing to a stalled destination would otherwise outlive its link.
        () = link_closed.cancelled() => {
            tracing::info!("tunnel aborted: link closed");
            return abort_tcp_halves(reader, writer);
        }
    };
    match pumped {
        Ok(stats) => dial::closed(stats),
        Err(err) => dial::aborted(&err, reader, writer),
    }
}

/// Dials requested by the server and not answered yet, by their `random`.
#[derive(Debug, Clone, Default)]
struct PendingDials(Arc<Mutex<HashMap<i64, CancellationToken>>>);

/// A pending dial; dropping it forgets the dial, whatever became of it.
struct PendingDial {
    dials: PendingDials,
    random: i64,
    cancel: CancellationToken,
}

impl Drop for PendingDial {
    fn drop(&mut self) {
        self.dials.lock().remove(&self.random);
    }
}

impl PendingDials {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, CancellationToken>> {
        // Every critical section is a single map operation; a panic cannot leave one half done.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers dial `random`, cancelled with `link`; `None` if that dial is already pending.
    fn register(&self, random: i64, link: &CancellationToken) -> Option<PendingDial> {
        let mut dials = self.lock();
        if dials.contains_key(&random) {
            return None;
        }
        let cancel = link.child_token();
        dials.insert(random, cancel.clone());
        Some(PendingDial {
            dials: self.clone(),
            random,
            cancel,
        })
    }

    /// Cancels dial `random`; whether it was pending.
    fn cancel(&self, random: i64) -> bool {
        match self.lock().remove(&random) {
            Some(cancel) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Backing off PINGs for servers that answer them with GOAWAY `too_many_pings`.
///
/// grpc-go servers enforce a minimum PING interval (`MinTime`, 5 minutes by default in the
/// versions upstream konnectivity servers before v0.0.33 use). A PING earlier than that, while
/// the server has sent nothing since the last one, is a strike; the third strike gets GOAWAY
/// `ENHANCE_YOUR_CALM` with debug data "too_many_pings", and the server closes the connection
/// in the same step. grpc-go's own clients then double their keepalive time; the agent does the
/// same, per server slot and across relinks, up to [`MAX_INTERVAL`].
///
/// hyper reports neither the GOAWAY's code nor its debug data once the connection is gone (the
/// stream ends with a broken pipe), so [`GoAwayWatch`] reads them off the frames the server
/// sends, under the TLS layer's plaintext.
pub(crate) mod ping_backoff {
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex, Weak};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use crate::Shared;
    use crate::slots::{SlotId, Slots};

    /// The longest PING interval a server's `too_many_pings` can push the agent to. Above
    /// grpc-go's default `MinTime` of 5 minutes (doubling from 30 s gets there in four steps,
    /// at 8 minutes), and short enough that a dead link is still noticed within minutes.
    pub(crate) const MAX_INTERVAL: Duration = Duration::from_secs(10 * 60);

    /// GOAWAY error code `ENHANCE_YOUR_CALM` (RFC 9113, section 7).
    const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// The debug data grpc-go sends with a GOAWAY for too frequent PINGs.
    const TOO_MANY_PINGS: &[u8] = b"too_many_pings";

    /// HTTP/2 frame type of GOAWAY.
    const GOAWAY: u8 = 0x7;

    /// How much GOAWAY debug data is kept.
    const MAX_DEBUG_DATA: usize = 256;

    /// The PING interval of each server slot a `too_many_pings` lengthened, per agent.
    ///
    /// The agent's per-slot state lives in `Slots`, which knows nothing of keepalive; this table
    /// sits beside it, keyed by the agent's `Slots` (a `Weak`, which keeps its allocation, so a
    /// later agent can never be mistaken for a dropped one) and the slot.
    static INTERVALS: Mutex<Vec<SlotInterval>> = Mutex::new(Vec::new());

    struct SlotInterval {
        links: Weak<Slots>,
        slot: SlotId,
        interval: Duration,
    }

    fn table() -> std::sync::MutexGuard<'static, Vec<SlotInterval>> {
        // Every critical section leaves the table whole; a panic cannot leave one half done.
        INTERVALS.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The PING interval for links to `slot`: the configured one unless the server asked for
    /// less.
    pub(crate) fn interval(shared: &Shared, slot: SlotId) -> Duration {
        let links = Arc::downgrade(&shared.links);
        let configured = shared.config.keepalive.interval;
        let table = table();
        let interval = table
            .iter()
            .find(|entry| entry.slot == slot && entry.links.ptr_eq(&links))
            .map_or(configured, |entry| entry.interval);
        let longest = table
            .iter()
            .filter(|entry| entry.links.ptr_eq(&links))
            .map(|entry| entry.interval)
            .fold(configured, Duration::max);
        shared.metrics.keepalive_interval.set(longest.as_secs_f64());
        interval
    }

    /// Doubles the PING interval of `slot` after a `too_many_pings`; returns the new one.
    pub(crate) fn back_off(shared: &Shared, slot: SlotId) -> Duration {
        let links = Arc::downgrade(&shared.links);
        let configured = shared.config.keepalive.interval;
        let mut table = table();
        table.retain(|entry| entry.links.strong_count() > 0);
        let position = table
            .iter()
            .position(|entry| entry.slot == slot && entry.links.ptr_eq(&links));
        let current = position.map_or(configured, |i| table[i].interval);
        let doubled = doubled(current);
        match position {
            Some(i) => table[i].interval = doubled,
            None => table.push(SlotInterval {
                links,
                slot,
                interval: doubled,
            }),
        }
        drop(table);
        shared.metrics.keepalive_backoffs.inc();
        tracing::warn!(
            interval = %humantime::format_duration(doubled),
            previous = %humantime::format_duration(current),
            "the server closed the link for pinging too often (GOAWAY too_many_pings): \
             pinging it less often from the next link on"
        );
        doubled
    }

    /// Twice `interval`, but not above [`MAX_INTERVAL`] unless it already was.
    pub(crate) fn doubled(interval: Duration) -> Duration {
        interval.saturating_mul(2).min(MAX_INTERVAL.max(interval))
    }

    /// A GOAWAY frame as received.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct GoAwayFrame {
        /// The error code.
        pub(crate) code: u32,
        /// The debug data, truncated to [`MAX_DEBUG_DATA`] bytes.
        pub(crate) debug_data: Vec<u8>,
    }

    impl GoAwayFrame {
        /// Whether this is grpc-go's answer to too frequent PINGs.
        pub(crate) fn is_too_many_pings(&self) -> bool {
            self.code == ENHANCE_YOUR_CALM && self.debug_data == TOO_MANY_PINGS
        }
    }

    impl std::fmt::Display for GoAwayFrame {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "code {:#x}, debug data {:?}",
                self.code,
                String::from_utf8_lossy(&self.debug_data)
            )
        }
    }

    /// The last GOAWAY a server sent on one connection.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct GoAwayWatch(Arc<Mutex<Option<GoAwayFrame>>>);

    impl GoAwayWatch {
        /// `io`, with the frames read from it watched for GOAWAY.
        pub(crate) fn watch<IO>(&self, io: IO) -> Watched<IO> {
            Watched {
                io,
                frames: FrameReader::default(),
                watch: self.clone(),
            }
        }

        /// The last GOAWAY received.
        pub(crate) fn get(&self) -> Option<GoAwayFrame> {
            self.lock().clone()
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Option<GoAwayFrame>> {
            // A single assignment; a panic cannot leave it half done.
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    /// A connection whose inbound HTTP/2 frames are watched for GOAWAY.
    #[derive(Debug)]
    pub(crate) struct Watched<IO> {
        io: IO,
        frames: FrameReader,
        watch: GoAwayWatch,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = &mut *self;
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.io).poll_read(cx, buf);
            if let Some(frame) = this.frames.feed(&buf.filled()[before..]) {
                *this.watch.lock() = Some(frame);
            }
            polled
        }
    }

    impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
        cplink_runtime::forward_async_write!(io);
    }

    /// Follows the frame boundaries of a server's HTTP/2 byte stream (which, unlike a
    /// client's, starts with a frame) and collects GOAWAY payloads.
    #[derive(Debug, Default)]
    pub(crate) struct FrameReader {
        header: [u8; 9],
        header_len: usize,
        /// Payload bytes of the current frame still to come.
        remaining: usize,
        /// The current frame's payload, when it is a GOAWAY.
        goaway: Option<Vec<u8>>,
    }

    impl FrameReader {
        /// Takes the next bytes of the stream; returns a GOAWAY completed by them.
        pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Option<GoAwayFrame> {
            let mut found = None;
            while !bytes.is_empty() {
                if self.remaining == 0 {
                    let take = (9 - self.header_len).min(bytes.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&bytes[..take]);
                    self.header_len += take;
                    bytes = &bytes[take..];
                    if self.header_len < 9 {
                        break;
                    }
                    self.header_len = 0;
                    let [l0, l1, l2, kind, ..] = self.header;
                    self.remaining = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                    self.goaway = (kind == GOAWAY).then(Vec::new);
                    if self.remaining == 0 {
                        found = self.finish().or(found);
                    }
                    continue;
                }
                let take = self.remaining.min(bytes.len());
                if let Some(payload) = &mut self.goaway {
                    let room = (8 + MAX_DEBUG_DATA).saturating_sub(payload.len());
                    payload.extend_from_slice(&bytes[..take.min(room)]);
                }
                self.remaining -= take;
                bytes = &bytes[take..];
                if self.remaining == 0 {
                    found = self.finish().or(found);
                }
            }
            found
        }

        fn finish(&mut self) -> Option<GoAwayFrame> {
            let payload = self.goaway.take()?;
            // Last stream id (4 bytes), error code (4 bytes), debug data.
            let code = payload.get(4..8)?;
            Some(GoAwayFrame {
                code: u32::from_be_bytes([code[0], code[1], code[2], code[3]]),
                debug_data: payload[8..].to_vec(),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
            let len = payload.len();
            let mut out = vec![
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                0,
                0,
                0,
                0,
                0,
            ];
            out.extend_from_slice(payload);
            out
        }

        fn goaway(code: u32, debug: &[u8]) -> Vec<u8> {
            let mut payload = 1u32.to_be_bytes().to_vec();
            payload.extend_from_slice(&code.to_be_bytes());
            payload.extend_from_slice(debug);
            frame(GOAWAY, &payload)
        }

        #[test]
        fn a_too_many_pings_goaway_is_found_between_other_frames_however_the_bytes_are_cut() {
            let mut stream = frame(0x4, &[0; 12]); // SETTINGS
            stream.extend(frame(0x0, &[7; 40_000])); // DATA
            stream.extend(frame(0x6, &[1; 8])); // PING
            stream.extend(goaway(ENHANCE_YOUR_CALM, TOO_MANY_PINGS));
            for cut in [1, 3, 9, 10, 4096, stream.len()] {
                let mut reader = FrameReader::default();
                let found: Vec<_> = stream.chunks(cut).filter_map(|c| reader.feed(c)).collect();
                assert_eq!(found.len(), 1, "cut {cut}");
                assert!(found[0].is_too_many_pings(), "cut {cut}: {}", found[0]);
            }
        }

        #[test]
        fn other_goaways_are_not_too_many_pings() {
            let mut reader = FrameReader::default();
            let graceful = reader.feed(&goaway(0, b"")).unwrap();
            assert!(!graceful.is_too_many_pings());
            let calm = reader.feed(&goaway(ENHANCE_YOUR_CALM, b"other")).unwrap();
            assert!(!calm.is_too_many_pings());
            assert!(reader.feed(&frame(0x0, &[0; 9])).is_none());
        }

        #[test]
        fn the_interval_doubles_up_to_ten_minutes() {
            let mut interval = Duration::from_secs(30);
            let mut steps = Vec::new();
            for _ in 0..6 {
                interval = doubled(interval);
                steps.push(interval.as_secs());
            }
            assert_eq!(steps, [60, 120, 240, 480, 600, 600]);
            let long = Duration::from_secs(3600);
            assert_eq!(doubled(long), long, "a longer configured interval is kept");
        }
    }
}

#[cfg(test)]
mod tests {
    use cplink_proto::hello::Identifiers;

    use super::*;

    #[test]
    fn identifiers_use_the_upstream_keys_in_a_query_string() {
        let identifiers = Identifiers {
            host_ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            default_route: true,
        };
        let value = wire::encode_identifiers(Some("node-1"), &identifiers);
        assert_eq!(
            value,
            "host=node-1&ipv4=10.0.0.5&ipv6=fd00%3A%3A5&cidr=10.244.1.0%2F24&default-route=true"
        );
        assert!(ascii_value(&value).is_ok(), "fits in a header as is");
        assert_eq!(
            wire::decode_identifiers(&value).unwrap(),
            (Some("node-1".to_owned()), identifiers)
        );
        assert_eq!(wire::encode_identifiers(None, &Identifiers::default()), "");
    }

    #[test]
    fn identifier_values_that_would_break_the_query_are_escaped() {
        let value = wire::encode_identifiers(Some("a&b=c%é"), &Identifiers::default());
        assert_eq!(value, "host=a%26b%3Dc%25%C3%A9");
        let (node, _) = wire::decode_identifiers(&value).unwrap();
        assert_eq!(node.as_deref(), Some("a&b=c%é"));
    }

    #[test]
    fn response_headers_name_the_server_and_count_them() {
        let mut metadata = MetadataMap::new();
        metadata.insert(wire::SERVER_ID, "server-a".parse().unwrap());
        metadata.insert(wire::SERVER_COUNT, "3".parse().unwrap());
        let info = server_info(&metadata).unwrap();
        assert_eq!(
            info,
            LinkInfo {
                server_id: "server-a".into(),
                server_count: 3
            }
        );

        metadata.insert(wire::SERVER_COUNT, "three".parse().unwrap());
        let err = server_info(&metadata).unwrap_err();
        assert!(err.to_string().contains("servercount"), "{err}");
        metadata.remove(wire::SERVER_ID);
        let err = server_info(&metadata).unwrap_err();
        assert!(err.to_string().contains("no serverid"), "{err}");
    }

    #[test]
    fn dial_requests_must_be_tcp_to_a_host_and_port() {
        let request = |protocol: &str, address: &str| DialRequest {
            protocol: protocol.into(),
            address: address.into(),
            random: 1,
        };
        assert_eq!(
            parse_request(&request("tcp", "10.0.0.5:10250"))
                .unwrap()
                .to_string(),
            "10.0.0.5:10250"
        );
        let udp = parse_request(&request("udp", "10.0.0.5:53")).unwrap_err();
        assert_eq!(udp.kind(), "bad_target");
        assert!(udp.to_string().contains("udp"), "{udp}");
        let portless = parse_request(&request("tcp", "10.0.0.5")).unwrap_err();
        assert_eq!(portless.kind(), "bad_target");
    }

    #[test]
    fn tokens_are_sent_as_sensitive_bearer_metadata() {
        let value = bearer_value(Path::new("/token"), &BearerToken::new("abc.def\n")).unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer abc.def");
        assert!(value.is_sensitive());
    }

    #[test]
    fn a_dial_is_pending_until_answered_or_cancelled() {
        let dials = PendingDials::default();
        let link = CancellationToken::new();
        let first = dials.register(7, &link).unwrap();
        assert!(dials.register(7, &link).is_none(), "randoms are unique");
        assert!(dials.cancel(7));
        assert!(first.cancel.is_cancelled());
        assert!(!dials.cancel(7), "a dial is cancelled once");

        let second = dials.register(8, &link).unwrap();
        drop(second);
        assert_eq!(dials.len(), 0, "an answered dial is forgotten");
        let third = dials.register(9, &link).unwrap();
        link.cancel();
        assert!(
            third.cancel.is_cancelled(),
            "a link's end cancels its dials"
        );
    }
}
