//! Many tunneled connections on one konnectivity stream.
//!
//! An upstream agent's `Connect` stream carries every connection of that agent, told apart by
//! connect ids. [`Mux`] is one end of such a stream: it hands each connection's inbound packets
//! to its [`MuxConn`] and funnels their outbound packets into the one stream. The server end
//! ([`Role::Dialer`]) asks for dials and closes with `CLOSE_REQ`; the agent end
//! ([`Role::Acceptor`]) numbers the connections it dialed and reports their end with
//! `CLOSE_RSP`.
//!
//! The protocol has no per-connection flow control: a connection whose reader is slow fills its
//! queue of [`CONN_QUEUE`] packets, and then the whole stream waits for it, as upstream's does.
//! Native cplink links carry each connection on its own HTTP/2 stream and do not share this
//! limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Packet, Payload, UNRECOGNIZED_CONNECT_ID};
use crate::pump::{ByteCounters, PumpStats, ReadChunk};

/// Inbound packets queued per connection before the stream waits for its reader.
pub const CONN_QUEUE: usize = 16;

/// Largest chunk read from a socket and sent as one `DATA` packet.
const MAX_DATA: usize = 32 * 1024;

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
    /// Reading from the socket failed.
    #[error("socket read failed: {0}")]
    SocketRead(#[source] std::io::Error),
    /// Writing to the socket failed.
    #[error("socket write failed: {0}")]
    SocketWrite(#[source] std::io::Error),
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

/// One end of a konnectivity stream carrying many connections.
#[derive(Debug)]
pub struct Mux {
    role: Role,
    out: mpsc::Sender<Packet>,
    conns: Mutex<HashMap<i64, mpsc::Sender<Event>>>,
    pending: Mutex<HashMap<i64, oneshot::Sender<Result<i64, String>>>>,
    next_id: AtomicI64,
    closed: CancellationToken,
    close_reason: Mutex<String>,
}

impl Mux {
    /// A mux whose outbound packets go to `out` (the stream's sender).
    pub fn new(role: Role, out: mpsc::Sender<Packet>) -> Arc<Self> {
        Arc::new(Mux {
            role,
            out,
            conns: Mutex::default(),
            pending: Mutex::default(),
            next_id: AtomicI64::new(0),
            closed: CancellationToken::new(),
            close_reason: Mutex::default(),
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

    /// Sends a packet on the stream, waiting for room.
    pub async fn send(&self, packet: Packet) -> Result<(), MuxError> {
        tokio::select! {
            sent = self.out.send(packet) => {
                sent.map_err(|_| MuxError::StreamClosed("stream ended".into()))
            }
            () = self.closed.cancelled() => Err(MuxError::StreamClosed(self.close_reason())),
        }
    }

    /// Sends a packet from a context that cannot wait (a destructor).
    fn send_later(&self, packet: Packet) {
        if self.closed.is_cancelled() {
            return;
        }
        match self.out.try_send(packet) {
            Err(mpsc::error::TrySendError::Full(packet)) => {
                let out = self.out.clone();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        let _ = out.send(packet).await;
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
            Ok(Ok(connect_id)) => Ok(self.register(connect_id)),
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
        let (tx, rx) = mpsc::channel(CONN_QUEUE);
        lock(&self.conns).insert(connect_id, tx);
        MuxConn {
            sender: MuxSender {
                connect_id,
                mux: self.clone(),
                closed_locally: Arc::new(AtomicBool::new(false)),
            },
            events: rx,
            finished: false,
        }
    }

    /// Routes one inbound packet to its connection. Packets that start something (a dial
    /// request, a dial cancel, a drain) are returned for the caller to act on.
    pub async fn dispatch(&self, packet: Packet) -> Option<Packet> {
        match (packet.payload, self.role) {
            (Some(Payload::DialResponse(rsp)), Role::Dialer) => {
                let waiter = lock(&self.pending).remove(&rsp.random);
                let result = if rsp.error.is_empty() {
                    Ok(rsp.connect_id)
                } else {
                    Err(rsp.error)
                };
                match (waiter, result) {
                    (Some(waiter), result) => {
                        if let Err(Ok(connect_id)) = waiter.send(result) {
                            // The dialer gave up between the answer and now.
                            self.send_later(Packet::close_request(connect_id));
                        }
                    }
                    (None, Ok(connect_id)) => {
                        tracing::debug!(connect_id, "dial answered after it was cancelled");
                        self.send_later(Packet::close_request(connect_id));
                    }
                    (None, Err(_)) => {}
                }
                None
            }
            (Some(Payload::Data(data)), _) => {
                let conn = lock(&self.conns).get(&data.connect_id).cloned();
                match conn {
                    // A full queue makes the whole stream wait: the protocol has no window.
                    Some(conn) => {
                        let _ = conn.send(Event::Data(Bytes::from(data.data))).await;
                    }
                    None => self.refuse_unknown(data.connect_id).await,
                }
                None
            }
            (Some(Payload::CloseResponse(rsp)), Role::Dialer) => {
                let conn = lock(&self.conns).remove(&rsp.connect_id);
                if let Some(conn) = conn {
                    let error = (!rsp.error.is_empty()).then_some(rsp.error);
                    let _ = conn.send(Event::Closed(error)).await;
                }
                None
            }
            (Some(Payload::CloseRequest(req)), Role::Acceptor) => {
                let conn = lock(&self.conns).get(&req.connect_id).cloned();
                match conn {
                    Some(conn) => {
                        let _ = conn.send(Event::Closed(None)).await;
                    }
                    None => {
                        let answer =
                            Packet::close_response(req.connect_id, UNRECOGNIZED_CONNECT_ID);
                        let _ = self.send(answer).await;
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

    async fn refuse_unknown(&self, connect_id: i64) {
        tracing::debug!(connect_id, "packet for an unknown connection");
        let answer = match self.role {
            Role::Dialer => Packet::close_request(connect_id),
            Role::Acceptor => Packet::close_response(connect_id, UNRECOGNIZED_CONNECT_ID),
        };
        let _ = self.send(answer).await;
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
            self.mux.send_later(Packet::close_dial(self.random));
        }
    }
}

/// One connection on a shared stream.
#[derive(Debug)]
pub struct MuxConn {
    sender: MuxSender,
    events: mpsc::Receiver<Event>,
    finished: bool,
}

/// The sending half of a [`MuxConn`], for a task that sends while another receives.
#[derive(Debug, Clone)]
pub struct MuxSender {
    connect_id: i64,
    mux: Arc<Mux>,
    closed_locally: Arc<AtomicBool>,
}

impl MuxSender {
    /// The connection's id on the stream.
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }

    /// Sends bytes to the peer.
    pub async fn send(&self, data: Bytes) -> Result<(), MuxError> {
        self.mux.send(Packet::data(self.connect_id, data)).await
    }

    /// Tells the peer this end is done: `CLOSE_REQ` from a dialer, `CLOSE_RSP` from an
    /// acceptor. An acceptor's connection is finished with it; a dialer waits for the answer.
    pub async fn close(&self) -> Result<(), MuxError> {
        if self.closed_locally.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        match self.mux.role {
            Role::Dialer => self.mux.send(Packet::close_request(self.connect_id)).await,
            Role::Acceptor => {
                lock(&self.mux.conns).remove(&self.connect_id);
                self.mux
                    .send(Packet::close_response(self.connect_id, ""))
                    .await
            }
        }
    }

    fn is_closed_locally(&self) -> bool {
        self.closed_locally.load(Ordering::Relaxed)
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

    /// The next event from the peer; a lost stream shows up as [`MuxError::StreamClosed`].
    pub async fn recv(&mut self) -> Result<Event, MuxError> {
        let mux = &self.sender.mux;
        let event = tokio::select! {
            biased;
            event = self.events.recv() => event,
            () = mux.closed.cancelled() => None,
        };
        match event {
            Some(event) => {
                if matches!(event, Event::Closed(_)) {
                    self.finished = true;
                }
                Ok(event)
            }
            None => Err(MuxError::StreamClosed(mux.close_reason())),
        }
    }

    fn role(&self) -> Role {
        self.sender.mux.role
    }
}

impl Drop for MuxConn {
    fn drop(&mut self) {
        let MuxSender {
            connect_id, mux, ..
        } = &self.sender;
        lock(&mux.conns).remove(connect_id);
        if !self.finished && !self.sender.is_closed_locally() {
            let packet = match mux.role {
                Role::Dialer => Packet::close_request(*connect_id),
                Role::Acceptor => {
                    Packet::close_response(*connect_id, "connection closed by the agent")
                }
            };
            mux.send_later(packet);
        }
    }
}

/// Moves bytes between a socket and a connection until either end closes it, or one fails.
///
/// The protocol has no half-close: when the socket's reader ends, the connection is closed
/// towards the peer; a dialer then waits up to `linger` for the peer's confirmation, passing on
/// the bytes the peer sent before it. When the peer closes, the socket is shut down after every
/// byte was written.
pub async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    conn: &mut MuxConn,
    initial: Bytes,
    counters: &ByteCounters,
    linger: Duration,
) -> Result<PumpStats, MuxError>
where
    R: ReadChunk,
    W: AsyncWrite + Unpin + Send,
{
    let mut stats = PumpStats::default();
    if !initial.is_empty() {
        count(
            &counters.socket_to_stream,
            &mut stats.socket_to_stream,
            initial.len(),
        );
        conn.send(initial).await?;
    }
    let mut reading = true;
    let linger_deadline = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(linger_deadline);
    loop {
        tokio::select! {
            chunk = reader.read_chunk(MAX_DATA), if reading => {
                let chunk = chunk.map_err(MuxError::SocketRead)?;
                if chunk.is_empty() {
                    reading = false;
                    conn.close().await?;
                    if conn.role() == Role::Acceptor {
                        let _ = writer.shutdown().await;
                        return Ok(stats);
                    }
                    linger_deadline.as_mut().reset(tokio::time::Instant::now() + linger);
                    continue;
                }
                count(&counters.socket_to_stream, &mut stats.socket_to_stream, chunk.len());
                conn.send(chunk).await?;
            }
            event = conn.recv() => match event? {
                Event::Data(data) => {
                    writer.write_all(&data).await.map_err(MuxError::SocketWrite)?;
                    writer.flush().await.map_err(MuxError::SocketWrite)?;
                    count(&counters.stream_to_socket, &mut stats.stream_to_socket, data.len());
                }
                Event::Closed(Some(error)) => return Err(MuxError::Remote(error)),
                Event::Closed(None) => {
                    writer.shutdown().await.map_err(MuxError::SocketWrite)?;
                    if conn.role() == Role::Acceptor {
                        conn.close().await?;
                    }
                    return Ok(stats);
                }
            },
            () = &mut linger_deadline, if !reading => return Err(MuxError::CloseTimeout(linger)),
        }
    }
}

fn count(counter: &Counter, total: &mut u64, n: usize) {
    counter.inc_by(n as u64);
    *total += n as u64;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation; a panic cannot leave one half done.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
