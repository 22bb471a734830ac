//! Many tunneled connections on one konnectivity stream.
//!
//! An upstream agent's `Connect` stream carries every connection of that agent, told apart by
//! connect ids. [`Mux`] is one end of such a stream: it hands each connection's inbound packets
//! to its [`MuxConn`] and funnels their outbound packets into the one stream. The server end
//! ([`Role::Dialer`]) asks for dials and closes with `CLOSE_REQ`; the agent end
//! ([`Role::Acceptor`]) numbers the connections it dialed and reports their end with
//! `CLOSE_RSP`.
//!
//! The protocol has no per-connection flow control, and the stream's receive loop must never
//! wait for one connection: when it did (a full per-connection queue), a single slow reader
//! stopped the whole stream, and with an upstream agent whose directions are coupled the two
//! ends then waited for each other for good. So [`Mux::dispatch`] never waits: each
//! connection queues what arrived for it, and a connection whose reader falls more than its
//! budget ([`CONN_BUDGET`] bytes) behind is closed, towards the peer and locally
//! ([`MuxError::Overflow`]), and counted. [`pump`] runs the two directions of a connection
//! independently, so a socket that is slow to take bytes never holds up the bytes it sends.
//! Native cplink links carry each connection on its own HTTP/2 stream with its own window and
//! need none of this.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Packet, Payload, UNRECOGNIZED_CONNECT_ID};
use crate::pump::{CountBytes, PumpStats, ReadChunk};

/// Bytes from the peer that may wait for one connection's reader before the connection is
/// closed with [`MuxError::Overflow`].
///
/// Why a byte budget, and why this one:
/// - The one `Connect` stream is drained into per-connection queues as fast as it arrives, so
///   that one slow reader cannot stop the others; without per-connection flow control in the
///   protocol, only a limit on what one connection may queue bounds memory. Counting bytes, not
///   packets, because a packet holds anything from one byte to a 4 MiB gRPC message.
/// - 4 MiB is 16 native stream windows ([`crate::STREAM_WINDOW`], 256 KiB): well above what a
///   live reader has in flight in socket and HTTP/2 buffers, so a reader that pauses briefly
///   (a full TCP buffer towards a distant client, a scheduling hiccup) catches up instead of
///   being cut. A reader that stays behind by that much is not keeping up with a sender that
///   cannot be slowed down, and closing its connection is the only thing that protects the
///   others (upstream servers stall the whole agent instead).
/// - Memory stays bounded by 4 MiB per open connection of a stream; a gRPC message (at most
///   4 MiB) always fits into an empty queue.
pub const CONN_BUDGET: usize = 4 * 1024 * 1024;

/// Largest chunk read from a socket and sent as one `DATA` packet.
const MAX_DATA: usize = 32 * 1024;

/// How many closed connect ids a mux remembers, so that the peer's packets still in flight for
/// them are dropped quietly instead of each being answered as unknown.
const RECENTLY_CLOSED: usize = 1024;

/// Which end of the stream this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends dial requests (a server towards an agent).
    Dialer,
    /// Answers dial requests (an agent towards a server).
    Acceptor,
}

/// What happens to one connection, from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes from the peer.
    Data(Bytes),
    /// The peer closed the connection; with an error when it failed.
    Closed(Option<String>),
}

/// Why a connection on a shared stream failed.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The stream carrying the connection is gone.
    #[error("konnectivity stream closed: {0}")]
    StreamClosed(String),
    /// The peer closed the connection with an error.
    #[error("peer closed the connection: {0}")]
    Remote(String),
    /// The peer did not confirm a close in time.
    #[error("peer did not confirm the close within {}", humantime::format_duration(*.0))]
    CloseTimeout(Duration),
    /// More than the budget (in bytes) waited for this end's socket: the connection was closed
    /// towards the peer, since konnectivity cannot slow one connection down.
    #[error("{}", overflow_reason(*.0))]
    Overflow(usize),
    /// Reading from the socket failed.
    #[error("socket read failed: {0}")]
    SocketRead(#[source] std::io::Error),
    /// Writing to the socket failed.
    #[error("socket write failed: {0}")]
    SocketWrite(#[source] std::io::Error),
}

/// The reason given, locally and to the peer, for closing a connection whose reader fell
/// `budget` bytes behind.
fn overflow_reason(budget: usize) -> String {
    format!(
        "connection closed: its reader fell more than {} behind \
         (konnectivity has no per-connection flow control)",
        format_bytes(budget)
    )
}

fn format_bytes(n: usize) -> String {
    const MIB: usize = 1024 * 1024;
    const KIB: usize = 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// Why a dial on a shared stream failed.
#[derive(Debug, thiserror::Error)]
pub enum MuxDialError {
    /// The peer answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The stream is gone.
    #[error("konnectivity stream closed: {0}")]
    StreamClosed(String),
}

/// How much a mux lets each connection queue, and where it counts the connections it closed
/// for it.
#[derive(Debug, Clone)]
pub struct MuxLimits {
    /// Bytes that may wait for one connection's reader; see [`CONN_BUDGET`].
    pub conn_budget: usize,
    /// Incremented for every connection closed because it went over `conn_budget`.
    pub overflows: Counter,
}

impl Default for MuxLimits {
    fn default() -> Self {
        MuxLimits {
            conn_budget: CONN_BUDGET,
            overflows: Counter::default(),
        }
    }
}

/// State of one connection shared by the mux (which fills its queue) and its [`MuxConn`].
#[derive(Debug, Default)]
struct ConnState {
    /// Bytes queued and not yet taken by the reader.
    queued: AtomicUsize,
    /// Cancelled when the connection went over budget.
    overflowed: CancellationToken,
    /// This end already told the peer the connection is over.
    closed_locally: AtomicBool,
}

/// The mux's handle on one connection.
#[derive(Debug, Clone)]
struct ConnEntry {
    events: mpsc::UnboundedSender<Event>,
    state: Arc<ConnState>,
}

/// A connection registered by [`Mux::dispatch`] when its dial was answered, so that the
/// peer's bytes right behind the answer find it.
#[derive(Debug)]
struct Registered {
    connect_id: i64,
    events: mpsc::UnboundedReceiver<Event>,
    state: Arc<ConnState>,
}

/// Connect ids closed lately, oldest first.
#[derive(Debug, Default)]
struct RecentlyClosed {
    order: VecDeque<i64>,
    ids: HashSet<i64>,
}

impl RecentlyClosed {
    fn insert(&mut self, connect_id: i64) {
        if !self.ids.insert(connect_id) {
            return;
        }
        self.order.push_back(connect_id);
        if self.order.len() > RECENTLY_CLOSED
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
    }

    fn contains(&self, connect_id: i64) -> bool {
        self.ids.contains(&connect_id)
    }
}

/// One end of a konnectivity stream carrying many connections.
#[derive(Debug)]
pub struct Mux {
    role: Role,
    out: mpsc::Sender<Packet>,
    conns: Mutex<HashMap<i64, ConnEntry>>,
    recently_closed: Mutex<RecentlyClosed>,
    pending: Mutex<HashMap<i64, oneshot::Sender<Result<Registered, String>>>>,
    next_id: AtomicI64,
    closed: CancellationToken,
    close_reason: Mutex<String>,
    limits: MuxLimits,
}

impl Mux {
    /// A mux whose outbound packets go to `out` (the stream's sender), with the default limits
    /// and an unregistered overflow counter.
    pub fn new(role: Role, out: mpsc::Sender<Packet>) -> Arc<Self> {
        Self::with_limits(role, out, MuxLimits::default())
    }

    /// A mux whose outbound packets go to `out`, with `limits`.
    pub fn with_limits(role: Role, out: mpsc::Sender<Packet>, limits: MuxLimits) -> Arc<Self> {
        Arc::new(Mux {
            role,
            out,
            conns: Mutex::default(),
            recently_closed: Mutex::default(),
            pending: Mutex::default(),
            next_id: AtomicI64::new(0),
            closed: CancellationToken::new(),
            close_reason: Mutex::default(),
            limits,
        })
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Dials requested and not yet answered.
    pub fn pending_dials(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Whether the stream is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Marks the stream gone: pending dials and open connections fail with `reason`.
    pub fn close(&self, reason: &str) {
        *lock(&self.close_reason) = reason.to_owned();
        self.closed.cancel();
        lock(&self.pending).clear();
        lock(&self.conns).clear();
    }

    fn close_reason(&self) -> String {
        lock(&self.close_reason).clone()
    }

    /// Sends a packet on the stream, waiting for room. Only a connection's own task may wait
    /// here; the stream's receive loop uses [`Mux::send_detached`].
    pub async fn send(&self, packet: Packet) -> Result<(), MuxError> {
        tokio::select! {
            sent = self.out.send(packet) => {
                sent.map_err(|_| MuxError::StreamClosed("stream ended".into()))
            }
            () = self.closed.cancelled() => Err(MuxError::StreamClosed(self.close_reason())),
        }
    }

    /// Sends a packet without waiting: queued at once when there is room, otherwise by a task
    /// of its own. For the stream's receive loop, which must never wait for the outbound queue
    /// (the peer may be waiting for this end to read before it reads), and for destructors.
    pub fn send_detached(&self, packet: Packet) {
        if self.closed.is_cancelled() {
            return;
        }
        match self.out.try_send(packet) {
            Err(mpsc::error::TrySendError::Full(packet)) => {
                let out = self.out.clone();
                let closed = self.closed.clone();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        tokio::select! {
                            _ = out.send(packet) => {}
                            () = closed.cancelled() => {}
                        }
                    });
                }
            }
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Asks the peer to dial `address` and waits for its answer (dialer end).
    ///
    /// Dropping the future before the answer cancels the dial with `DIAL_CLS`; an answer that
    /// arrives after that is closed at once.
    pub async fn dial(self: &Arc<Self>, address: &str) -> Result<MuxConn, MuxDialError> {
        let (random, answer) = {
            let mut pending = lock(&self.pending);
            let mut random = rand::random::<i64>();
            while pending.contains_key(&random) {
                random = rand::random::<i64>();
            }
            let (tx, rx) = oneshot::channel();
            pending.insert(random, tx);
            (random, rx)
        };
        let mut guard = PendingDial {
            mux: self,
            random,
            answered: false,
        };
        self.send(Packet::dial_request(address, random))
            .await
            .map_err(|e| MuxDialError::StreamClosed(e.to_string()))?;
        let answer = tokio::select! {
            answer = answer => answer,
            () = self.closed.cancelled() => {
                return Err(MuxDialError::StreamClosed(self.close_reason()));
            }
        };
        guard.answered = true;
        match answer {
            Ok(Ok(registered)) => Ok(MuxConn {
                sender: MuxSender {
                    connect_id: registered.connect_id,
                    mux: self.clone(),
                    state: registered.state,
                },
                events: registered.events,
                finished: false,
            }),
            Ok(Err(error)) => Err(MuxDialError::Refused(error)),
            Err(_) => Err(MuxDialError::StreamClosed(self.close_reason())),
        }
    }

    /// Numbers and registers a connection this end dialed for the peer (acceptor end).
    pub fn accept(self: &Arc<Self>) -> MuxConn {
        let connect_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.register(connect_id)
    }

    fn register(self: &Arc<Self>, connect_id: i64) -> MuxConn {
        let registered = self.register_entry(connect_id);
        MuxConn {
            sender: MuxSender {
                connect_id,
                mux: self.clone(),
                state: registered.state,
            },
            events: registered.events,
            finished: false,
        }
    }

    fn register_entry(&self, connect_id: i64) -> Registered {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(ConnState::default());
        let entry = ConnEntry {
            events: tx,
            state: state.clone(),
        };
        lock(&self.conns).insert(connect_id, entry);
        Registered {
            connect_id,
            events: rx,
            state,
        }
    }

    /// Forgets connection `connect_id`; the peer's packets still in flight for it are dropped.
    fn forget(&self, connect_id: i64) -> Option<ConnEntry> {
        let entry = lock(&self.conns).remove(&connect_id);
        lock(&self.recently_closed).insert(connect_id);
        entry
    }

    /// Routes one inbound packet to its connection. Packets that start something (a dial
    /// request, a dial cancel, a drain) are returned for the caller to act on.
    ///
    /// Never waits, by construction (it is not `async`): a connection's bytes are queued for
    /// it, a connection over its budget is closed, and answers to the peer are sent detached.
    /// The stream's receive loop therefore always drains the stream, whatever one connection
    /// or the peer's reading does.
    pub fn dispatch(&self, packet: Packet) -> Option<Packet> {
        match (packet.payload, self.role) {
            (Some(Payload::DialResponse(rsp)), Role::Dialer) => {
                let waiter = lock(&self.pending).remove(&rsp.random);
                let connect_id = rsp.connect_id;
                match (waiter, rsp.error.is_empty()) {
                    (Some(waiter), true) => {
                        // Registered here, not by the dialer's task: the peer's bytes may
                        // follow the answer at once.
                        let registered = self.register_entry(connect_id);
                        if waiter.send(Ok(registered)).is_err() {
                            // The dialer gave up between the answer and now.
                            self.forget(connect_id);
                            self.send_detached(Packet::close_request(connect_id));
                        }
                    }
                    (Some(waiter), false) => {
                        let _ = waiter.send(Err(rsp.error));
                    }
                    (None, true) => {
                        tracing::debug!(connect_id, "dial answered after it was cancelled");
                        lock(&self.recently_closed).insert(connect_id);
                        self.send_detached(Packet::close_request(connect_id));
                    }
                    (None, false) => {}
                }
                None
            }
            (Some(Payload::Data(data)), _) => {
                self.deliver(data.connect_id, Bytes::from(data.data));
                None
            }
            (Some(Payload::CloseResponse(rsp)), Role::Dialer) => {
                if let Some(conn) = self.forget(rsp.connect_id) {
                    let error = (!rsp.error.is_empty()).then_some(rsp.error);
                    let _ = conn.events.send(Event::Closed(error));
                }
                None
            }
            (Some(Payload::CloseRequest(req)), Role::Acceptor) => {
                let conn = lock(&self.conns).get(&req.connect_id).cloned();
                match conn {
                    Some(conn) => {
                        let _ = conn.events.send(Event::Closed(None));
                    }
                    None => {
                        let answer =
                            Packet::close_response(req.connect_id, UNRECOGNIZED_CONNECT_ID);
                        self.send_detached(answer);
                    }
                }
                None
            }
            (payload, _) => Some(Packet {
                r#type: packet.r#type,
                payload,
            }),
        }
    }

    /// Queues bytes for connection `connect_id`, or closes it when they would take it over its
    /// budget.
    fn deliver(&self, connect_id: i64, data: Bytes) {
        let conn = lock(&self.conns).get(&connect_id).cloned();
        let Some(conn) = conn else {
            if !lock(&self.recently_closed).contains(connect_id) {
                self.refuse_unknown(connect_id);
            }
            return;
        };
        let len = data.len();
        let queued = conn.state.queued.fetch_add(len, Ordering::AcqRel) + len;
        if queued <= self.limits.conn_budget {
            // Fails only when the connection's end is gone; its drop told the peer already.
            let _ = conn.events.send(Event::Data(data));
            return;
        }
        self.forget(connect_id);
        self.limits.overflows.inc();
        let reason = overflow_reason(self.limits.conn_budget);
        tracing::info!(connect_id, queued, %reason, "closing a connection whose reader fell behind");
        conn.state.overflowed.cancel();
        if !conn.state.closed_locally.swap(true, Ordering::AcqRel) {
            self.send_detached(match self.role {
                Role::Dialer => Packet::close_request(connect_id),
                Role::Acceptor => Packet::close_response(connect_id, reason),
            });
        }
    }

    fn refuse_unknown(&self, connect_id: i64) {
        tracing::debug!(connect_id, "packet for an unknown connection");
        let answer = match self.role {
            Role::Dialer => Packet::close_request(connect_id),
            Role::Acceptor => Packet::close_response(connect_id, UNRECOGNIZED_CONNECT_ID),
        };
        self.send_detached(answer);
    }
}

/// Removes an unanswered dial and tells the peer to drop it.
struct PendingDial<'a> {
    mux: &'a Mux,
    random: i64,
    answered: bool,
}

impl Drop for PendingDial<'_> {
    fn drop(&mut self) {
        if !self.answered && lock(&self.mux.pending).remove(&self.random).is_some() {
            self.mux.send_detached(Packet::close_dial(self.random));
        }
    }
}

/// One connection on a shared stream.
#[derive(Debug)]
pub struct MuxConn {
    sender: MuxSender,
    events: mpsc::UnboundedReceiver<Event>,
    finished: bool,
}

/// The sending half of a [`MuxConn`], for a task that sends while another receives.
#[derive(Debug, Clone)]
pub struct MuxSender {
    connect_id: i64,
    mux: Arc<Mux>,
    state: Arc<ConnState>,
}

impl MuxSender {
    /// The connection's id on the stream.
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }

    /// Sends bytes to the peer.
    pub async fn send(&self, data: Bytes) -> Result<(), MuxError> {
        if self.state.overflowed.is_cancelled() {
            return Err(MuxError::Overflow(self.mux.limits.conn_budget));
        }
        self.mux.send(Packet::data(self.connect_id, data)).await
    }

    /// Tells the peer this end is done: `CLOSE_REQ` from a dialer, `CLOSE_RSP` from an
    /// acceptor. An acceptor's connection is finished with it; a dialer waits for the answer.
    pub async fn close(&self) -> Result<(), MuxError> {
        if self.state.closed_locally.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match self.mux.role {
            Role::Dialer => self.mux.send(Packet::close_request(self.connect_id)).await,
            Role::Acceptor => {
                self.mux.forget(self.connect_id);
                self.mux
                    .send(Packet::close_response(self.connect_id, ""))
                    .await
            }
        }
    }

    fn is_closed_locally(&self) -> bool {
        self.state.closed_locally.load(Ordering::Acquire)
    }

    fn role(&self) -> Role {
        self.mux.role
    }
}

impl MuxConn {
    /// The connection's id on the stream.
    pub fn connect_id(&self) -> i64 {
        self.sender.connect_id
    }

    /// A sending half that can be used while this connection receives.
    pub fn sender(&self) -> MuxSender {
        self.sender.clone()
    }

    /// Sends bytes to the peer.
    pub async fn send(&self, data: Bytes) -> Result<(), MuxError> {
        self.sender.send(data).await
    }

    /// Closes this end; see [`MuxSender::close`].
    pub async fn close(&mut self) -> Result<(), MuxError> {
        if self.sender.mux.role == Role::Acceptor {
            self.finished = true;
        }
        if self.finished && self.sender.mux.role == Role::Dialer {
            // The peer closed first; nothing is left to close.
            return Ok(());
        }
        self.sender.close().await
    }

    /// The next event from the peer. A lost stream shows up as [`MuxError::StreamClosed`], a
    /// connection closed for falling behind as [`MuxError::Overflow`] (before whatever it still
    /// had queued: that memory is what the budget protects).
    pub async fn recv(&mut self) -> Result<Event, MuxError> {
        let mux = &self.sender.mux;
        let state = &self.sender.state;
        let event = tokio::select! {
            biased;
            () = state.overflowed.cancelled() => {
                self.finished = true;
                return Err(MuxError::Overflow(mux.limits.conn_budget));
            }
            event = self.events.recv() => event,
            () = mux.closed.cancelled() => None,
        };
        match event {
            Some(event) => {
                match &event {
                    Event::Data(data) => {
                        state.queued.fetch_sub(data.len(), Ordering::AcqRel);
                    }
                    Event::Closed(_) => self.finished = true,
                }
                Ok(event)
            }
            None => Err(MuxError::StreamClosed(mux.close_reason())),
        }
    }

    /// Bytes from the peer queued for this connection and not received yet.
    pub fn queued_bytes(&self) -> usize {
        self.sender.state.queued.load(Ordering::Acquire)
    }
}

impl Drop for MuxConn {
    fn drop(&mut self) {
        let MuxSender {
            connect_id, mux, ..
        } = &self.sender;
        mux.forget(*connect_id);
        if !self.finished && !self.sender.is_closed_locally() {
            let packet = match mux.role {
                Role::Dialer => Packet::close_request(*connect_id),
                Role::Acceptor => {
                    Packet::close_response(*connect_id, "connection closed by the agent")
                }
            };
            mux.send_detached(packet);
        }
    }
}

/// Moves bytes between a socket and a connection until either end closes it, or one fails.
///
/// The two directions run independently: a socket slow to take the peer's bytes never stops
/// its own bytes from being read and sent, and a stream slow to take them never stops the
/// peer's bytes from being written. (Serving both from one loop made each wait for the other,
/// and with the connection's queue full, for the whole stream.)
///
/// The protocol has no half-close: when the socket's reader ends, the connection is closed
/// towards the peer; a dialer then waits up to `linger` for the peer's confirmation, passing on
/// the bytes the peer sent before it, and an acceptor shuts its socket down at once. When the
/// peer closes, the socket is shut down after every byte was written.
pub async fn pump<R, W, C>(
    reader: &mut R,
    writer: &mut W,
    conn: &mut MuxConn,
    initial: Bytes,
    counters: &C,
    linger: Duration,
) -> Result<PumpStats, MuxError>
where
    R: ReadChunk,
    W: AsyncWrite + Unpin + Send,
    C: CountBytes,
{
    let sender = conn.sender();
    let role = sender.role();
    let mut stats = PumpStats::default();
    let ended = {
        let up = socket_to_peer(
            reader,
            &sender,
            initial,
            |n| counters.to_stream(n),
            &mut stats.socket_to_stream,
        );
        let down = peer_to_socket(
            conn,
            &mut *writer,
            |n| counters.to_socket(n),
            &mut stats.stream_to_socket,
        );
        tokio::pin!(up, down);
        tokio::select! {
            read = &mut up => match read {
                Err(err) => Err(err),
                // An acceptor is done once it has sent its CLOSE_RSP.
                Ok(()) if role == Role::Acceptor => Ok(Ended::ShutDown),
                Ok(()) => match tokio::time::timeout(linger, &mut down).await {
                    Ok(written) => written.map(|()| Ended::Written),
                    Err(_elapsed) => Err(MuxError::CloseTimeout(linger)),
                },
            },
            written = &mut down => written.map(|()| Ended::Written),
        }
    };
    if let Ended::ShutDown = ended? {
        let _ = writer.shutdown().await;
    }
    Ok(stats)
}

/// How a pump that did not fail ended.
enum Ended {
    /// The peer closed and every byte it sent was written; the socket is shut down.
    Written,
    /// This end closed; the socket still has to be shut down.
    ShutDown,
}

/// Reads the socket and sends its bytes until it ends, then closes the connection towards the
/// peer.
async fn socket_to_peer<R: ReadChunk>(
    reader: &mut R,
    sender: &MuxSender,
    initial: Bytes,
    counter: impl Fn(u64),
    total: &mut u64,
) -> Result<(), MuxError> {
    if !initial.is_empty() {
        count(&counter, total, initial.len());
        sender.send(initial).await?;
    }
    loop {
        let chunk = reader
            .read_chunk(MAX_DATA)
            .await
            .map_err(MuxError::SocketRead)?;
        if chunk.is_empty() {
            return sender.close().await;
        }
        count(&counter, total, chunk.len());
        sender.send(chunk).await?;
    }
}

/// Writes the peer's bytes to the socket until the peer closes the connection.
async fn peer_to_socket<W: AsyncWrite + Unpin>(
    conn: &mut MuxConn,
    writer: &mut W,
    counter: impl Fn(u64),
    total: &mut u64,
) -> Result<(), MuxError> {
    let state = conn.sender.state.clone();
    let budget = conn.sender.mux.limits.conn_budget;
    loop {
        match conn.recv().await? {
            Event::Data(data) => {
                let written = async {
                    writer.write_all(&data).await?;
                    writer.flush().await
                };
                // A socket that takes nothing is what puts a connection over its budget: the
                // write it is stuck in must end with the connection.
                tokio::select! {
                    written = written => written.map_err(MuxError::SocketWrite)?,
                    () = state.overflowed.cancelled() => return Err(MuxError::Overflow(budget)),
                }
                count(&counter, total, data.len());
            }
            Event::Closed(Some(error)) => return Err(MuxError::Remote(error)),
            Event::Closed(None) => {
                writer.shutdown().await.map_err(MuxError::SocketWrite)?;
                if conn.sender.role() == Role::Acceptor {
                    conn.close().await?;
                }
                return Ok(());
            }
        }
    }
}

fn count(counter: &impl Fn(u64), total: &mut u64, n: usize) {
    counter(n as u64);
    *total += n as u64;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation; a panic cannot leave one half done.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed step should panic with its location

    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::pump::Buffered;

    /// Long enough for anything that is not stuck, on paused time.
    const PATIENCE: Duration = Duration::from_secs(60);

    fn mux(role: Role, out_capacity: usize, budget: usize) -> (Arc<Mux>, mpsc::Receiver<Packet>) {
        let (tx, rx) = mpsc::channel(out_capacity);
        let limits = MuxLimits {
            conn_budget: budget,
            overflows: Counter::default(),
        };
        (Mux::with_limits(role, tx, limits), rx)
    }

    fn data(connect_id: i64, len: usize) -> Packet {
        Packet::data(connect_id, Bytes::from(vec![0x5a; len]))
    }

    async fn next(rx: &mut mpsc::Receiver<Packet>) -> Packet {
        tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("a packet to the peer")
            .expect("the outbound queue is open")
    }

    /// Dials through a dialer mux, answering as the peer with `connect_id`.
    async fn dialed(mux: &Arc<Mux>, rx: &mut mpsc::Receiver<Packet>, connect_id: i64) -> MuxConn {
        let dial = tokio::spawn({
            let mux = mux.clone();
            async move { mux.dial("node:10250").await }
        });
        let random = match next(rx).await.payload {
            Some(Payload::DialRequest(request)) => request.random,
            other => panic!("expected DIAL_REQ, got {other:?}"),
        };
        assert!(
            mux.dispatch(Packet::dial_established(random, connect_id))
                .is_none()
        );
        dial.await.unwrap().unwrap()
    }

    async fn recv_data(conn: &mut MuxConn) -> Bytes {
        match tokio::time::timeout(PATIENCE, conn.recv()).await.unwrap() {
            Ok(Event::Data(data)) => data,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dispatch_queues_for_a_connection_that_does_not_read_and_serves_the_others() {
        let (mux, mut out) = mux(Role::Acceptor, 4, CONN_BUDGET);
        let slow = mux.accept();
        let mut other = mux.accept();
        // Far more packets than any packet-counted queue held, within the byte budget.
        for _ in 0..100 {
            assert!(mux.dispatch(data(slow.connect_id(), 32 * 1024)).is_none());
        }
        assert_eq!(slow.queued_bytes(), 100 * 32 * 1024);
        mux.dispatch(Packet::data(other.connect_id(), Bytes::from_static(b"hi")));
        assert_eq!(recv_data(&mut other).await, Bytes::from_static(b"hi"));
        assert_eq!(other.queued_bytes(), 0, "received bytes leave the budget");
        assert!(out.try_recv().is_err(), "nothing was closed or refused");
        assert_eq!(mux.open_connections(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dispatch_never_waits_for_a_full_outbound_queue() {
        let (mux, mut out) = mux(Role::Acceptor, 1, CONN_BUDGET);
        mux.send(Packet::drain()).await.unwrap();
        // The peer is not reading: answers to unknown ids must not hold up the stream.
        assert!(mux.dispatch(data(77, 10)).is_none());
        assert!(mux.dispatch(Packet::close_request(78)).is_none());
        let mut conn = mux.accept();
        mux.dispatch(Packet::data(conn.connect_id(), Bytes::from_static(b"ok")));
        assert_eq!(recv_data(&mut conn).await, Bytes::from_static(b"ok"));
        // Once the peer reads, the answers follow.
        assert_eq!(next(&mut out).await, Packet::drain());
        let mut answered = vec![next(&mut out).await, next(&mut out).await];
        answered.sort_by_key(|p| match &p.payload {
            Some(Payload::CloseResponse(rsp)) => rsp.connect_id,
            _ => 0,
        });
        assert_eq!(
            answered,
            [
                Packet::close_response(77, UNRECOGNIZED_CONNECT_ID),
                Packet::close_response(78, UNRECOGNIZED_CONNECT_ID)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_acceptor_closes_only_the_connection_over_budget_and_tells_the_peer_why() {
        let (mux, mut out) = mux(Role::Acceptor, 8, 64 * 1024);
        let mut slow = mux.accept();
        let mut other = mux.accept();
        let slow_id = slow.connect_id();
        for _ in 0..2 {
            mux.dispatch(data(slow_id, 32 * 1024));
        }
        assert!(out.try_recv().is_err(), "exactly at the budget is fine");
        mux.dispatch(data(slow_id, 1));

        match next(&mut out).await.payload {
            Some(Payload::CloseResponse(rsp)) => {
                assert_eq!(rsp.connect_id, slow_id);
                assert!(rsp.error.contains("64 KiB"), "{}", rsp.error);
            }
            other => panic!("expected CLOSE_RSP, got {other:?}"),
        }
        let err = slow.recv().await.unwrap_err();
        assert!(matches!(err, MuxError::Overflow(65536)), "{err:?}");
        assert!(
            err.to_string().contains("fell more than 64 KiB behind"),
            "{err}"
        );
        assert_eq!(mux.limits.overflows.get(), 1);
        assert_eq!(mux.open_connections(), 1);

        // The peer's bytes still in flight are dropped quietly; closing is not repeated.
        mux.dispatch(data(slow_id, 10));
        drop(slow);
        tokio::task::yield_now().await;
        assert!(out.try_recv().is_err(), "{:?}", out.try_recv());

        mux.dispatch(Packet::data(other.connect_id(), Bytes::from_static(b"on")));
        assert_eq!(recv_data(&mut other).await, Bytes::from_static(b"on"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dialer_closes_a_connection_over_budget_with_close_req() {
        let (mux, mut out) = mux(Role::Dialer, 8, 64 * 1024);
        let mut slow = dialed(&mux, &mut out, 1).await;
        let mut other = dialed(&mux, &mut out, 2).await;
        mux.dispatch(data(1, 64 * 1024 + 1));
        assert_eq!(next(&mut out).await, Packet::close_request(1));
        assert!(matches!(slow.recv().await, Err(MuxError::Overflow(_))));
        assert!(
            matches!(
                slow.send(Bytes::from_static(b"x")).await,
                Err(MuxError::Overflow(_))
            ),
            "nothing more is sent for a closed connection"
        );
        // The agent's confirmation and late bytes find nothing and are not answered.
        mux.dispatch(Packet::close_response(1, ""));
        mux.dispatch(data(1, 10));
        drop(slow);
        tokio::task::yield_now().await;
        assert!(out.try_recv().is_err());
        mux.dispatch(data(2, 3));
        assert_eq!(recv_data(&mut other).await.len(), 3);
        assert_eq!(mux.limits.overflows.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_right_behind_a_dial_answer_reach_the_new_connection() {
        let (mux, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let dial = tokio::spawn({
            let mux = mux.clone();
            async move { mux.dial("node:22").await }
        });
        let random = match next(&mut out).await.payload {
            Some(Payload::DialRequest(request)) => request.random,
            other => panic!("expected DIAL_REQ, got {other:?}"),
        };
        // The answer and the peer's first bytes, dispatched before the dialer's task runs.
        mux.dispatch(Packet::dial_established(random, 3));
        mux.dispatch(Packet::data(3, Bytes::from_static(b"SSH-2.0")));
        let mut conn = dial.await.unwrap().unwrap();
        assert_eq!(recv_data(&mut conn).await, Bytes::from_static(b"SSH-2.0"));
        assert!(out.try_recv().is_err(), "nothing was refused");
    }

    /// Runs [`pump`] for `conn` over a socket with `buffer` bytes of room each way, sending
    /// `first` ahead; returns the test's end of the socket and the pump's task.
    fn pumped(
        mut conn: MuxConn,
        buffer: usize,
        first: Bytes,
        linger: Duration,
    ) -> (DuplexStream, JoinHandle<Result<PumpStats, MuxError>>) {
        let (test, socket) = tokio::io::duplex(buffer);
        let task = tokio::spawn(async move {
            let (reader, mut writer) = tokio::io::split(socket);
            let counters = crate::pump::ByteCounters::default();
            let mut reader = Buffered(reader);
            pump(
                &mut reader,
                &mut writer,
                &mut conn,
                first,
                &counters,
                linger,
            )
            .await
        });
        (test, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_does_not_read_does_not_stop_what_it_sends() {
        let (mux, mut out) = mux(Role::Acceptor, 64, CONN_BUDGET);
        let conn = mux.accept();
        let id = conn.connect_id();
        let (mut test, pump) = pumped(conn, 1024, Bytes::new(), Duration::ZERO);
        // The peer sends far more than the socket takes; the test does not read it.
        for _ in 0..8 {
            mux.dispatch(data(id, 32 * 1024));
        }
        // Only once the pump is stuck writing to the socket does the socket have bytes to read.
        let queued = || {
            lock(&mux.conns)
                .get(&id)
                .unwrap()
                .state
                .queued
                .load(Ordering::Acquire)
        };
        tokio::time::timeout(PATIENCE, async {
            while queued() == 8 * 32 * 1024 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the pump to take the peer's first bytes");
        test.write_all(b"still sending").await.unwrap();
        match next(&mut out).await.payload {
            Some(Payload::Data(sent)) => assert_eq!(sent.data, b"still sending"),
            other => panic!("expected DATA, got {other:?}"),
        }
        pump.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_does_not_take_bytes_does_not_stop_what_the_socket_receives() {
        // Room for one packet, which the test never takes: the pump's sends wait.
        let (mux, out) = mux(Role::Acceptor, 1, CONN_BUDGET);
        let conn = mux.accept();
        let id = conn.connect_id();
        let (mut test, pump) = pumped(conn, 64 * 1024, Bytes::new(), Duration::ZERO);
        let upload = vec![1u8; 256 * 1024];
        let (mut test_reader, mut test_writer) = tokio::io::split(&mut test);
        let written = async { test_writer.write_all(&upload).await };
        let received = async {
            // The peer's bytes come once the pump is stuck sending.
            while out.capacity() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            mux.dispatch(Packet::data(id, Bytes::from_static(b"answer")));
            let mut back = [0u8; 6];
            test_reader.read_exact(&mut back).await.unwrap();
            back
        };
        tokio::select! {
            back = received => assert_eq!(&back, b"answer"),
            _ = written => panic!("the stream cannot take 256 KiB"),
            () = tokio::time::sleep(PATIENCE) => panic!("the peer's bytes were held up"),
        }
        pump.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dialer_passes_on_the_peers_last_bytes_after_closing_then_ends_at_its_answer() {
        let (mux, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let conn = dialed(&mux, &mut out, 5).await;
        let (mut test, pump) = pumped(
            conn,
            64 * 1024,
            Bytes::from_static(b"GET"),
            Duration::from_secs(5),
        );
        test.shutdown().await.unwrap();
        assert_eq!(
            next(&mut out).await,
            Packet::data(5, Bytes::from_static(b"GET"))
        );
        assert_eq!(next(&mut out).await, Packet::close_request(5));
        mux.dispatch(Packet::data(5, Bytes::from_static(b"late")));
        mux.dispatch(Packet::close_response(5, ""));
        let stats = pump.await.unwrap().unwrap();
        assert_eq!((stats.socket_to_stream, stats.stream_to_socket), (3, 4));
        let mut back = Vec::new();
        test.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dialer_gives_up_when_the_close_is_not_confirmed_within_the_linger() {
        let (mux, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let conn = dialed(&mux, &mut out, 6).await;
        let (mut test, pump) = pumped(conn, 1024, Bytes::new(), Duration::from_secs(5));
        test.shutdown().await.unwrap();
        assert_eq!(next(&mut out).await, Packet::close_request(6));
        let started = tokio::time::Instant::now();
        let err = pump.await.unwrap().unwrap_err();
        assert!(matches!(err, MuxError::CloseTimeout(_)), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_acceptor_closes_with_close_rsp_and_shuts_its_socket_down() {
        let (mux, mut out) = mux(Role::Acceptor, 8, CONN_BUDGET);
        let conn = mux.accept();
        let id = conn.connect_id();
        let (mut test, pump) = pumped(conn, 1024, Bytes::new(), Duration::ZERO);
        test.write_all(b"bye").await.unwrap();
        test.shutdown().await.unwrap();
        assert_eq!(
            next(&mut out).await,
            Packet::data(id, Bytes::from_static(b"bye"))
        );
        assert_eq!(next(&mut out).await, Packet::close_response(id, ""));
        pump.await.unwrap().unwrap();
        let mut rest = Vec::new();
        test.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(mux.open_connections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pump_over_budget_ends_with_an_error_naming_it() {
        let (mux, mut out) = mux(Role::Dialer, 8, 64 * 1024);
        let conn = dialed(&mux, &mut out, 9).await;
        // A client that never reads: its socket takes 1 KiB, the rest queues.
        let (_test, pump) = pumped(conn, 1024, Bytes::new(), Duration::ZERO);
        for _ in 0..4 {
            mux.dispatch(data(9, 32 * 1024));
        }
        let err = tokio::time::timeout(PATIENCE, pump)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("64 KiB"), "{err}");
        assert_eq!(next(&mut out).await, Packet::close_request(9));
    }

    /// Starts a dial through a dialer mux; returns its task and the `random` of its DIAL_REQ.
    async fn dialing(
        mux: &Arc<Mux>,
        rx: &mut mpsc::Receiver<Packet>,
    ) -> (JoinHandle<Result<MuxConn, MuxDialError>>, i64) {
        let dial = tokio::spawn({
            let mux = mux.clone();
            async move { mux.dial("node:10250").await }
        });
        match next(rx).await.payload {
            Some(Payload::DialRequest(request)) => (dial, request.random),
            other => panic!("expected DIAL_REQ, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_given_up_is_cancelled_with_dial_cls_and_a_late_answer_is_closed() {
        let (mux, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let (dial, random) = dialing(&mux, &mut out).await;
        assert_eq!(mux.pending_dials(), 1);
        dial.abort();
        assert!(dial.await.unwrap_err().is_cancelled());
        assert_eq!(next(&mut out).await, Packet::close_dial(random));
        assert_eq!(mux.pending_dials(), 0);
        // The peer had dialed already: its answer is closed, its bytes dropped quietly.
        assert!(mux.dispatch(Packet::dial_established(random, 4)).is_none());
        assert_eq!(next(&mut out).await, Packet::close_request(4));
        assert!(mux.dispatch(data(4, 10)).is_none());
        tokio::task::yield_now().await;
        assert!(out.try_recv().is_err(), "{:?}", out.try_recv());
        assert_eq!(mux.open_connections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_dial_fails_with_the_peers_reason() {
        let (mux, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let (dial, random) = dialing(&mux, &mut out).await;
        assert!(
            mux.dispatch(Packet::dial_failed(random, "connection refused"))
                .is_none()
        );
        let err = dial.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, MuxDialError::Refused(reason) if reason == "connection refused"),
            "{err:?}"
        );
        assert_eq!((mux.pending_dials(), mux.open_connections()), (0, 0));
        assert!(out.try_recv().is_err(), "a refusal is not answered");
    }

    #[tokio::test(start_paused = true)]
    async fn an_acceptor_hands_dial_requests_dial_cancels_and_drains_to_its_caller() {
        let (mux, mut out) = mux(Role::Acceptor, 8, CONN_BUDGET);
        for packet in [
            Packet::dial_request("node:10250", 7),
            Packet::close_dial(7),
            Packet::drain(),
        ] {
            assert_eq!(mux.dispatch(packet.clone()), Some(packet));
        }
        assert!(out.try_recv().is_err(), "the caller answers them");
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_from_the_peer_ends_the_connection_with_its_error() {
        // Towards an acceptor: CLOSE_REQ, which the connection's end answers when it closes.
        let (acceptor, _out) = mux(Role::Acceptor, 8, CONN_BUDGET);
        let mut accepted = acceptor.accept();
        acceptor.dispatch(Packet::close_request(accepted.connect_id()));
        assert_eq!(accepted.recv().await.unwrap(), Event::Closed(None));
        // Towards a dialer: CLOSE_RSP, with the error the peer's side of the connection met.
        let (dialer, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let mut dialed = dialed(&dialer, &mut out, 8).await;
        dialer.dispatch(Packet::close_response(8, "reset by peer"));
        assert_eq!(
            dialed.recv().await.unwrap(),
            Event::Closed(Some("reset by peer".into()))
        );
        assert_eq!(dialer.open_connections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_stream_fails_pending_dials_and_open_connections() {
        let (mux, mut out) = mux(Role::Dialer, 8, CONN_BUDGET);
        let mut open = dialed(&mux, &mut out, 10).await;
        let (dial, _) = dialing(&mux, &mut out).await;
        mux.close("link lost");
        let err = dial.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, MuxDialError::StreamClosed(reason) if reason == "link lost"),
            "{err:?}"
        );
        assert!(
            open.recv().await.is_err(),
            "the connection saw its stream go"
        );
        assert!(mux.is_closed());
    }
}
