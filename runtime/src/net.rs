//! Socket tuning and abortive close.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Unsent bytes a link or tunneled-connection socket may hold before it stops taking writes.
///
/// On a link, keeping the kernel's unsent queue short leaves queued frames in HTTP/2's
/// scheduler, which interleaves streams; a small request then waits behind at most this much
/// bulk data instead of the whole socket buffer. On a tunneled connection (a frontend client,
/// a destination) it bounds what a peer that stops reading holds in the kernel: without it the
/// send buffer grows to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) per connection, the
/// bytes leave the stream window behind, and the window no longer tells how much a stalled
/// connection holds.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Tunes a socket carrying one tunneled connection (frontend client or destination): no Nagle
/// delay, short unsent queue.
pub fn tune_stream(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "cannot set TCP_NODELAY");
    }
    if let Err(err) = SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(%err, "cannot set TCP_NOTSENT_LOWAT");
    }
}

/// Tunes a link socket: as [`tune_stream`], plus TCP keepalive as a backstop for the HTTP/2
/// PING liveness check.
pub fn tune_link(stream: &TcpStream) {
    tune_stream(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    if let Err(err) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%err, "cannot enable TCP keepalive");
    }
}

/// Closes a TCP connection with a reset, so that the peer sees an error instead of a clean end.
pub fn abort_tcp(stream: TcpStream) {
    if let Err(err) = SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(%err, "cannot set SO_LINGER for an abortive close");
    }
    drop(stream);
}

/// Resets a TCP connection once the bytes already written to it have left this host, or after
/// `budget` (a peer that reads nothing keeps them unsent): the peer receives them, then an
/// error instead of a clean end.
///
/// A reset discards what the kernel has not sent yet, so it waits for an empty unsent queue
/// first: with `TCP_NOTSENT_LOWAT` at 1 the socket turns writable only then, and registering it
/// anew makes that the first readiness it reports.
pub async fn abort_tcp_after_sent(stream: TcpStream, budget: Duration) {
    let std = match stream.into_std() {
        Ok(std) => std,
        Err(err) => {
            tracing::debug!(%err, "cannot take the socket out of the runtime");
            return;
        }
    };
    if let Err(err) = SockRef::from(&std).set_tcp_notsent_lowat(1) {
        tracing::debug!(%err, "cannot set TCP_NOTSENT_LOWAT");
    }
    let stream = match TcpStream::from_std(std) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(%err, "cannot register the socket again");
            return;
        }
    };
    if tokio::time::timeout(budget, stream.writable())
        .await
        .is_err()
    {
        tracing::debug!("bytes still unsent at the abort: the peer is not reading");
    }
    abort_tcp(stream);
}

/// [`abort_tcp_after_sent`] for a stream that was split into owned halves.
pub async fn abort_tcp_halves_after_sent(
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    budget: Duration,
) {
    match read.reunite(write) {
        Ok(stream) => abort_tcp_after_sent(stream, budget).await,
        Err(err) => drop(err),
    }
}

/// [`abort_tcp`] for a stream that was split into owned halves.
pub fn abort_tcp_halves(read: OwnedReadHalf, write: OwnedWriteHalf) {
    match read.reunite(write) {
        Ok(stream) => abort_tcp(stream),
        // Halves of different streams cannot come from one split; dropping both still closes.
        Err(err) => drop(err),
    }
}
