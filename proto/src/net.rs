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

/// [`abort_tcp`] for a stream that was split into owned halves.
pub fn abort_tcp_halves(read: OwnedReadHalf, write: OwnedWriteHalf) {
    match read.reunite(write) {
        Ok(stream) => abort_tcp(stream),
        // Halves of different streams cannot come from one split; dropping both still closes.
        Err(err) => drop(err),
    }
}
