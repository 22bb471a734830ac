//! Moves the bytes of one tunneled connection between a socket and an HTTP/2 stream.
//!
//! Each direction is flow-controlled on its own: bytes are read from the socket only when the
//! stream has send capacity, and stream capacity is released to the peer only after the bytes were
//! written to the socket. A reader that stops reading therefore stalls its own stream and nothing
//! else. An idle connection holds no buffer: sockets are read only once they are readable.
//!
//! Half-close maps to END_STREAM and back. A socket that fails while reading (a reset, a TLS
//! peer gone without close_notify) has its bytes delivered first: they were sent before, and the
//! stream ends with an [`ABORT_TRAILER`] instead of a plain END_STREAM, so that the other end
//! writes them out and then aborts its socket. A socket that fails while writing (its peer
//! closed, often right after writing its last bytes, and answers what still arrives with a
//! reset) is still read to its end: what its peer sent before closing is delivered, then the
//! stream ends with the [`ABORT_TRAILER`]; what the stream carries meanwhile is dropped, as the
//! closed peer would have. Any other failure resets the stream (RST_STREAM CANCEL), which drops
//! what is still buffered. Either way the error is returned so that the caller closes its socket
//! abortively. A stream either delivers every byte or fails visibly.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::Poll;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Trailer ending a stream whose sending socket failed after the bytes before it were sent; its
/// value says why. The receiving end writes every byte, then aborts its socket.
pub const ABORT_TRAILER: &str = "cplink-abort";

/// How long an end that sent an [`ABORT_TRAILER`] waits for the other end to finish the
/// stream, so that the bytes and the trailer are not dropped with the stream.
pub const ABORT_LINGER: Duration = Duration::from_secs(5);

/// Smallest read issued on a socket.
const MIN_READ: usize = 4 * 1024;
/// Size of an HTTP/2 frame head.
const FRAME_HEAD: usize = 9;
/// Largest read issued on a socket: 64 KiB with the head of the DATA frame that carries it.
///
/// A link sends such a frame as exactly four full TLS records (16 KiB each), which rustls takes
/// in one write (its outgoing buffer holds 64 KiB). A 64 KiB read made a frame 9 bytes longer:
/// rustls took 64 KiB of it, wrote them, then sent the frame's last 9 bytes as a record and a
/// `writev` of their own, one more of each per frame.
const MAX_READ: usize = 64 * 1024 - FRAME_HEAD;

/// A socket half that yields whole chunks of bytes; an empty chunk means end of stream.
pub trait ReadChunk: Send {
    /// Reads at most `max` bytes, waiting until at least one is available or the peer closed.
    fn read_chunk(&mut self, max: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
}

macro_rules! readiness_read_chunk {
    ($ty:ty) => {
        impl ReadChunk for $ty {
            async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
                loop {
                    // Wait for readiness first so that an idle connection holds no buffer.
                    self.readable().await?;
                    let mut buf = BytesMut::with_capacity(max);
                    // Read through `AsyncRead`, not `try_read_buf`: tokio then takes a short
                    // read as proof that the socket is drained and waits for the next event,
                    // where `try_read_buf` would cost one more `recv` (answering EAGAIN) after
                    // every message of a chatty connection.
                    let read = poll_fn(|cx| {
                        match tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, &mut buf) {
                            Poll::Pending => Poll::Ready(None),
                            Poll::Ready(result) => Poll::Ready(Some(result)),
                        }
                    })
                    .await;
                    match read {
                        Some(Ok(_)) => return Ok(buf.freeze()),
                        Some(Err(e)) => return Err(e),
                        // The readiness was stale: drop the buffer and wait again.
                        None => continue,
                    }
                }
            }
        }
    };
}

readiness_read_chunk!(tokio::net::tcp::OwnedReadHalf);
readiness_read_chunk!(tokio::net::unix::OwnedReadHalf);

/// Adapts any [`AsyncRead`] (a TLS stream, for instance) to [`ReadChunk`].
///
/// Such a reader offers no readiness to wait on, so it waits for a single byte and only then
/// allocates the chunk, filled with whatever else is already available: an idle connection holds
/// one byte instead of a buffer.
#[derive(Debug)]
pub struct Buffered<R>(pub R);

impl<R: AsyncRead + Unpin + Send> ReadChunk for Buffered<R> {
    async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let mut first = [0u8; 1];
        if self.0.read(&mut first).await? == 0 {
            return Ok(Bytes::new());
        }
        let mut buf = BytesMut::with_capacity(max.max(1));
        buf.extend_from_slice(&first);
        // Whatever else is already there, without waiting; an end of stream shows up again on
        // the next call.
        poll_fn(|cx| {
            let mut rest = (&mut buf).limit(max.saturating_sub(1));
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.0), cx, &mut rest) {
                Poll::Pending => Poll::Ready(Ok(0)),
                ready => ready,
            }
        })
        .await?;
        Ok(buf.freeze())
    }
}

/// Counters of the bytes a pump moves, by direction.
#[derive(Debug, Clone, Default)]
pub struct ByteCounters {
    /// Bytes read from the socket and sent on the stream.
    pub socket_to_stream: Counter,
    /// Bytes received on the stream and written to the socket.
    pub stream_to_socket: Counter,
}

impl From<[Counter; 2]> for ByteCounters {
    /// Counters in the order `[socket_to_stream, stream_to_socket]`.
    fn from([socket_to_stream, stream_to_socket]: [Counter; 2]) -> Self {
        ByteCounters {
            socket_to_stream,
            stream_to_socket,
        }
    }
}

/// Where a pump counts the bytes it moves, as it moves them: metrics, and wherever else a
/// caller keeps count (a server counts each connection and each agent link too).
pub trait CountBytes: Sync {
    /// `n` bytes read from the socket and sent on the stream.
    fn to_stream(&self, n: u64);
    /// `n` bytes received on the stream and written to the socket.
    fn to_socket(&self, n: u64);
}

impl CountBytes for ByteCounters {
    fn to_stream(&self, n: u64) {
        self.socket_to_stream.inc_by(n);
    }

    fn to_socket(&self, n: u64) {
        self.stream_to_socket.inc_by(n);
    }
}

impl ByteCounters {
    /// The bytes counted so far, by direction.
    pub fn totals(&self) -> PumpStats {
        PumpStats {
            socket_to_stream: self.socket_to_stream.get(),
            stream_to_socket: self.stream_to_socket.get(),
        }
    }
}

/// Bytes moved by a pump that finished cleanly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    /// Bytes read from the socket and sent on the stream.
    pub socket_to_stream: u64,
    /// Bytes received on the stream and written to the socket.
    pub stream_to_socket: u64,
}

/// Why a tunneled connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading from the socket failed.
    #[error("socket read failed: {0}")]
    SocketRead(#[source] io::Error),
    /// Writing to the socket failed.
    #[error("socket write failed: {0}")]
    SocketWrite(#[source] io::Error),
    /// The HTTP/2 stream failed or was reset by the peer.
    #[error("tunnel stream failed: {0}")]
    Stream(#[source] h2::Error),
    /// The peer reset the HTTP/2 stream.
    #[error("tunnel stream reset by peer ({0:?})")]
    Reset(Reason),
    /// The other end's socket failed after sending what arrived here, all of which was written
    /// to the socket.
    #[error("the other end of the tunnel failed: {0}")]
    PeerAborted(String),
}

impl PumpError {
    /// Whether every byte that arrived was written out before the failure: the socket should
    /// be aborted only once its kernel has sent them.
    pub fn delivered_then_aborted(&self) -> bool {
        matches!(self, PumpError::PeerAborted(_))
    }
}

/// Pumps bytes both ways until both directions ended cleanly or one failed.
///
/// `initial` holds bytes already read from the socket (for example right behind a CONNECT
/// request); they are sent first. On failure the stream is reset before returning; the caller
/// closes the socket abortively.
pub async fn pump<R, W, C>(
    reader: &mut R,
    writer: &mut W,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    initial: Bytes,
    counters: &C,
) -> Result<PumpStats, PumpError>
where
    R: ReadChunk,
    W: AsyncWrite + Unpin + Send,
    C: CountBytes,
{
    // Why the socket stopped taking bytes, once it did: its own bytes are still read to their
    // end, and the stream then ends with the abort trailer.
    let write_failed = OnceLock::new();
    // One waiter, told once: the permit `notify_one` stores if it is not waiting yet is enough.
    // Unlike a cancellation token it allocates nothing, for every tunnel's life.
    let socket_done = Notify::new();
    let result = tokio::try_join!(
        async {
            let sent = socket_to_stream(reader, &mut send, initial, counters, &write_failed).await;
            socket_done.notify_one();
            sent
        },
        async {
            match stream_to_socket(&mut recv, writer, counters).await {
                Err(PumpError::SocketWrite(err)) => {
                    let _ = write_failed.set(one_line(&format!("socket write failed: {err}")));
                    // The socket's peer closed, usually right after its last bytes, which may
                    // still wait to be read: ending here would reset the stream and drop them.
                    // The stream's bytes are taken and dropped meanwhile (holding them would
                    // hold up the link's other streams), until the other end finishes or for
                    // the linger after the socket's end.
                    let lingered = async {
                        socket_done.notified().await;
                        tokio::time::sleep(ABORT_LINGER).await;
                    };
                    tokio::select! {
                        discarded = discard(&mut recv) => discarded?,
                        () = lingered => {}
                    }
                    Ok(Err(err))
                }
                other => other.map(Ok),
            }
        },
    );
    match result {
        Ok((socket_to_stream, Ok(stream_to_socket))) => Ok(PumpStats {
            socket_to_stream,
            stream_to_socket,
        }),
        // Every byte the socket sent is on the stream, ended with the abort trailer unless it
        // had ended before the write failed.
        Ok((_, Err(err))) => Err(PumpError::SocketWrite(err)),
        Err(PumpError::SocketRead(err)) => {
            // Everything read before the failure is on the stream; end it with the abort
            // trailer and keep the stream until the other end has taken it and finished
            // (dropping it sooner would reset it and discard the queued bytes).
            let trailers = send.send_trailers(abort_trailers(&one_line(&err.to_string())));
            if trailers.is_err()
                || tokio::time::timeout(ABORT_LINGER, discard(&mut recv))
                    .await
                    .is_err()
            {
                send.send_reset(Reason::CANCEL);
            }
            Err(PumpError::SocketRead(err))
        }
        Err(err) => {
            send.send_reset(Reason::CANCEL);
            Err(err)
        }
    }
}

/// Trailers that end a stream with [`ABORT_TRAILER`] saying `reason` (from [`one_line`]).
fn abort_trailers(reason: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    let reason = http::HeaderValue::from_str(reason)
        .unwrap_or_else(|_| http::HeaderValue::from_static("socket failed"));
    trailers.insert(ABORT_TRAILER, reason);
    trailers
}

/// `text` on one line, printable ASCII only, bounded: fit for a header value.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
        .take(256)
        .collect()
}

async fn socket_to_stream<R: ReadChunk>(
    reader: &mut R,
    send: &mut SendStream<Bytes>,
    initial: Bytes,
    counters: &impl CountBytes,
    write_failed: &OnceLock<String>,
) -> Result<u64, PumpError> {
    let mut total = initial.len() as u64;
    counters.to_stream(total);
    send_all(send, initial).await?;
    let mut read_size = MIN_READ;
    loop {
        let chunk = tokio::select! {
            chunk = reader.read_chunk(read_size) => chunk.map_err(PumpError::SocketRead)?,
            // Notice a reset while the socket is idle instead of at its next byte.
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                return Err(match reset {
                    Ok(reason) => PumpError::Reset(reason),
                    Err(err) => PumpError::Stream(err),
                });
            }
        };
        if chunk.is_empty() {
            match write_failed.get() {
                None => send.send_data(Bytes::new(), true),
                Some(reason) => send.send_trailers(abort_trailers(reason)),
            }
            .map_err(PumpError::Stream)?;
            return Ok(total);
        }
        // Grow reads for bulk transfers, shrink them again for chatty ones.
        if chunk.len() == read_size {
            read_size = (read_size * 2).min(MAX_READ);
        } else if chunk.len() < read_size / 4 {
            read_size = (read_size / 2).max(MIN_READ);
        }
        total += chunk.len() as u64;
        counters.to_stream(chunk.len() as u64);
        send_all(send, chunk).await?;
    }
}

/// Sends `data` on the stream, never buffering more than the capacity the peer granted.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), PumpError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(granted)) => {
                let part = data.split_to(granted.min(data.len()));
                send.send_data(part, false).map_err(PumpError::Stream)?;
            }
            Some(Err(err)) => return Err(PumpError::Stream(err)),
            // The stream is gone; find out why.
            None => {
                return Err(match poll_fn(|cx| send.poll_reset(cx)).await {
                    Ok(reason) => PumpError::Reset(reason),
                    Err(err) => PumpError::Stream(err),
                });
            }
        }
    }
    Ok(())
}

/// A failure of the stream's receiving half: a reset by the peer, or another stream error.
fn recv_error(err: h2::Error) -> PumpError {
    match err.reason() {
        Some(reason) if err.is_reset() => PumpError::Reset(reason),
        _ => PumpError::Stream(err),
    }
}

/// Takes the stream's bytes and drops them until the peer ends the stream, giving their room
/// back as they come.
async fn discard(recv: &mut RecvStream) -> Result<(), PumpError> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(recv_error)?;
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(PumpError::Stream)?;
    }
    Ok(())
}

async fn stream_to_socket<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    writer: &mut W,
    counters: &impl CountBytes,
) -> Result<u64, PumpError> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(recv_error)?;
        let len = data.len();
        writer
            .write_all(&data)
            .await
            .map_err(PumpError::SocketWrite)?;
        writer.flush().await.map_err(PumpError::SocketWrite)?;
        // Capacity goes back to the peer only once the socket took the bytes: a slow reader
        // throttles its own stream and no other.
        recv.flow_control()
            .release_capacity(len)
            .map_err(PumpError::Stream)?;
        total += len as u64;
        counters.to_socket(len as u64);
    }
    let trailers = poll_fn(|cx| recv.poll_trailers(cx))
        .await
        .map_err(recv_error)?;
    if let Some(abort) = trailers.as_ref().and_then(|t| t.get(ABORT_TRAILER)) {
        return Err(PumpError::PeerAborted(
            String::from_utf8_lossy(abort.as_bytes()).into_owned(),
        ));
    }
    writer.shutdown().await.map_err(PumpError::SocketWrite)?;
    Ok(total)
}

/// Counts an open tunneled connection in a gauge for as long as it lives, also when the task
/// carrying it is cancelled.
#[derive(Debug)]
pub struct ActiveStream<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> ActiveStream<'a> {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        ActiveStream(gauge)
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Both ends of one HTTP/2 stream over an in-memory connection, as a link carries a tunnel:
    /// (send, recv) of the client (server side of a link) and of the server (agent side).
    async fn stream_pair() -> (
        (SendStream<Bytes>, RecvStream),
        (SendStream<Bytes>, RecvStream),
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let accepting = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.expect("server handshake");
            let (request, mut respond) = conn.accept().await.expect("a stream").expect("a request");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("response");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (send, request.into_body())
        });
        let (client, conn) = h2::client::handshake(a).await.expect("client handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let (response, send) = client
            .send_request(http::Request::new(()), false)
            .expect("request");
        let server_end = accepting.await.expect("accepted");
        let recv = response.await.expect("response").into_body();
        ((send, recv), server_end)
    }

    /// A socket as the pump sees it, and the peer's end of it.
    fn socket() -> (
        (
            Buffered<tokio::io::ReadHalf<DuplexStream>>,
            tokio::io::WriteHalf<DuplexStream>,
        ),
        DuplexStream,
    ) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (read, write) = tokio::io::split(ours);
        ((Buffered(read), write), theirs)
    }

    /// Runs [`pump`] between a socket (`reader`, `writer`) and a stream on a task of its own.
    fn spawn_pump<R: ReadChunk + Send + 'static>(
        mut reader: R,
        mut writer: tokio::io::WriteHalf<DuplexStream>,
        (send, recv): (SendStream<Bytes>, RecvStream),
        initial: Bytes,
    ) -> tokio::task::JoinHandle<Result<PumpStats, PumpError>> {
        tokio::spawn(async move {
            let counters = ByteCounters::default();
            pump(&mut reader, &mut writer, send, recv, initial, &counters).await
        })
    }

    /// A socket that yields `data`, then fails as a reset connection does.
    struct FailsAfter(Option<Bytes>);

    impl ReadChunk for FailsAfter {
        async fn read_chunk(&mut self, _max: usize) -> io::Result<Bytes> {
            match self.0.take() {
                Some(data) => Ok(data),
                None => Err(io::Error::from(io::ErrorKind::ConnectionReset)),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_cross_both_ways_and_half_closes_follow() {
        let ((send_a, recv_a), (send_b, recv_b)) = stream_pair().await;
        let ((read_a, write_a), mut peer_a) = socket();
        let ((read_b, write_b), mut peer_b) = socket();
        let a = spawn_pump(
            read_a,
            write_a,
            (send_a, recv_a),
            Bytes::from_static(b"early "),
        );
        let b = spawn_pump(read_b, write_b, (send_b, recv_b), Bytes::new());
        let upload = vec![7u8; 300 * 1024];
        peer_a.write_all(&upload).await.unwrap();
        peer_a.shutdown().await.unwrap();
        peer_b.write_all(b"answer").await.unwrap();
        peer_b.shutdown().await.unwrap();

        let mut at_b = Vec::new();
        peer_b.read_to_end(&mut at_b).await.unwrap();
        assert_eq!(&at_b[..6], b"early ");
        assert_eq!(&at_b[6..], &upload[..], "every byte, larger than a window");
        let mut at_a = Vec::new();
        peer_a.read_to_end(&mut at_a).await.unwrap();
        assert_eq!(at_a, b"answer");

        let stats_a = a.await.unwrap().unwrap();
        assert_eq!(stats_a.socket_to_stream, 6 + upload.len() as u64);
        assert_eq!(stats_a.stream_to_socket, 6);
        let stats_b = b.await.unwrap().unwrap();
        assert_eq!(stats_b.stream_to_socket, stats_a.socket_to_stream);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_socket_delivers_its_bytes_then_aborts_the_other_end() {
        let ((send_a, recv_a), (send_b, recv_b)) = stream_pair().await;
        let ((_, write_a), _peer_a) = socket();
        let ((read_b, write_b), mut peer_b) = socket();
        let failing = FailsAfter(Some(Bytes::from_static(b"last words")));
        let a = spawn_pump(failing, write_a, (send_a, recv_a), Bytes::new());
        let b = spawn_pump(read_b, write_b, (send_b, recv_b), Bytes::new());
        let mut delivered = [0u8; 10];
        peer_b.read_exact(&mut delivered).await.unwrap();
        assert_eq!(&delivered, b"last words");
        let err = b.await.unwrap().unwrap_err();
        assert!(err.delivered_then_aborted(), "{err}");
        assert!(err.to_string().contains("reset"), "{err}");
        drop(peer_b);
        let err = a.await.unwrap().unwrap_err();
        assert!(matches!(err, PumpError::SocketRead(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_nobody_takes_is_reset_after_the_linger() {
        let ((send_a, recv_a), other_end) = stream_pair().await;
        let ((_, write_a), _peer_a) = socket();
        let started = tokio::time::Instant::now();
        // The other end never reads nor finishes its stream.
        let _held = other_end;
        let pump = spawn_pump(FailsAfter(None), write_a, (send_a, recv_a), Bytes::new());
        let err = pump.await.unwrap().unwrap_err();
        assert!(matches!(err, PumpError::SocketRead(_)), "{err}");
        assert_eq!(started.elapsed(), ABORT_LINGER);
    }

    /// A socket whose peer has closed: every write fails as the peer's reset makes it.
    struct ClosedByPeer;

    impl AsyncWrite for ClosedByPeer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// kubelet ends an exec by closing its connection right after its last bytes, which may
    /// still wait in the socket, while what the client still sends (kubectl pings every 5 s)
    /// cannot be written: the bytes are delivered all the same, and the stream ends telling of
    /// the failed write. Resetting the stream at the failed write dropped them.
    #[tokio::test(start_paused = true)]
    async fn a_socket_closed_right_after_writing_delivers_every_byte_though_writes_to_it_fail() {
        const WRITTEN: usize = 1 << 20;
        let ((mut send, mut recv), agent_end) = stream_pair().await;
        let (socket, mut peer) = tokio::io::duplex(2 * WRITTEN);
        peer.write_all(&vec![7u8; WRITTEN]).await.unwrap();
        drop(peer);
        let pump = tokio::spawn(async move {
            let counters = ByteCounters::default();
            let mut reader = Buffered(socket);
            pump(
                &mut reader,
                &mut ClosedByPeer,
                agent_end.0,
                agent_end.1,
                Bytes::new(),
                &counters,
            )
            .await
        });
        // A ping from the other end, which the socket cannot take, before any byte is read.
        send.send_data(Bytes::from_static(b"ping"), false).unwrap();

        let mut received = 0usize;
        while let Some(data) = recv.data().await {
            let data = data.unwrap_or_else(|err| {
                panic!("the stream failed after {received} of {WRITTEN} bytes: {err}")
            });
            received += data.len();
            recv.flow_control().release_capacity(data.len()).unwrap();
        }
        assert_eq!(received, WRITTEN, "every byte the socket's peer wrote");
        let trailers = poll_fn(|cx| recv.poll_trailers(cx)).await.unwrap();
        let abort = trailers.as_ref().and_then(|t| t.get(ABORT_TRAILER));
        assert_eq!(
            abort.map(|reason| reason.to_str().unwrap()),
            Some("socket write failed: connection reset"),
            "the failed write is told"
        );
        send.send_data(Bytes::new(), true).unwrap();
        let err = pump.await.unwrap().unwrap_err();
        assert!(matches!(err, PumpError::SocketWrite(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_from_the_peer_ends_an_idle_pump_at_once() {
        let ((send_a, recv_a), (mut send_b, _recv_b)) = stream_pair().await;
        let ((read_a, write_a), _peer_a) = socket();
        let a = spawn_pump(read_a, write_a, (send_a, recv_a), Bytes::new());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!a.is_finished(), "an idle tunnel stays up");
        send_b.send_reset(Reason::CANCEL);
        let err = a.await.unwrap().unwrap_err();
        assert!(matches!(err, PumpError::Reset(Reason::CANCEL)), "{err}");
    }
}
