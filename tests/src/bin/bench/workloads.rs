//! The benchmark's destination and the workloads run against it, each over a [`Route`]:
//! straight to the destination, or through a frontend of the tunnel (CONNECT or gRPC).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cplink_e2e::client::TlsClient;
use cplink_e2e::grpc::ProxyStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Size of the reads and writes of bulk transfers.
const CHUNK: usize = 256 * 1024;
/// Size of a request and of its response in latency measurements.
pub const MESSAGE: usize = 64;

/// What the destination does with a connection, chosen by the client's first byte.
mod op {
    /// Read frames (a big-endian u32 length, then that many bytes) until an empty one, then
    /// answer the byte count as a big-endian u64. The end is in the stream, not a half-close:
    /// the gRPC frontend's close (CLOSE_REQ) ends the whole connection, as konnectivity's does.
    pub const UPLOAD: u8 = b'U';
    /// Followed by a big-endian u64: send that many bytes, then end the stream.
    pub const DOWNLOAD: u8 = b'D';
    /// Echo every byte until end of stream.
    pub const ECHO: u8 = b'E';
}

/// A stream the workloads can use, whatever carries it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Starts the destination on `127.0.0.1:0`; it runs until the process ends.
pub async fn destination() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Err(e) = serve(stream).await {
                    tracing::debug!(error = %e, "destination connection failed");
                }
            });
        }
    });
    Ok(addr)
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    match stream.read_u8().await? {
        op::UPLOAD => {
            let total = count_frames(&mut stream).await?;
            stream.write_u64(total).await?;
            stream.shutdown().await
        }
        op::DOWNLOAD => {
            let bytes = stream.read_u64().await?;
            write_filler(&mut stream, 0xa5, bytes).await?;
            stream.shutdown().await
        }
        op::ECHO => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf).await? {
                    0 => return stream.shutdown().await,
                    n => stream.write_all(&buf[..n]).await?,
                }
            }
        }
        other => Err(std::io::Error::other(format!("unknown operation {other}"))),
    }
}

/// How a workload reaches the destination.
#[derive(Clone)]
pub enum Route {
    /// Plain TCP to the destination.
    Direct(SocketAddr),
    /// CONNECT through the server's Unix socket frontend.
    Uds {
        /// The frontend socket.
        socket: PathBuf,
        /// The destination, as `host:port`.
        target: String,
    },
    /// CONNECT through the server's TLS frontend, with a client certificate.
    Tls {
        /// Client configuration.
        client: TlsClient,
        /// The frontend address.
        frontend: SocketAddr,
        /// The destination, as `host:port`.
        target: String,
    },
    /// SOCKS5 through OpenSSH's reverse dynamic forward (`ssh -R`), the baseline.
    Socks {
        /// The SOCKS port sshd listens on.
        proxy: SocketAddr,
        /// The destination.
        target: SocketAddr,
    },
    /// A konnectivity Proxy stream per connection, all on one HTTP/2 connection to the
    /// server's gRPC frontend, as newer kube-apiservers do.
    Grpc {
        /// The shared connection; a clone opens a stream on it.
        channel: Channel,
        /// The destination, as `host:port`.
        target: String,
    },
}

impl Route {
    /// Opens a connection to the destination, ready for the operation byte.
    pub async fn dial(&self) -> anyhow::Result<Box<dyn Io>> {
        Ok(match self {
            Route::Direct(addr) => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Route::Uds { socket, target } => {
                let mut stream = UnixStream::connect(socket).await?;
                connect(&mut stream, target).await?;
                Box::new(stream)
            }
            Route::Tls {
                client,
                frontend,
                target,
            } => {
                let mut stream = client.connect(*frontend).await?;
                connect(&mut stream, target).await?;
                Box::new(stream)
            }
            Route::Grpc { channel, target } => {
                let (stream, connect_id) = ProxyStream::connect(channel.clone(), target).await?;
                Box::new(stream.into_io(connect_id))
            }
            Route::Socks { proxy, target } => {
                let mut stream = TcpStream::connect(proxy).await?;
                stream.set_nodelay(true)?;
                socks_connect(&mut stream, *target).await?;
                Box::new(stream)
            }
        })
    }
}

/// A SOCKS5 CONNECT without authentication (RFC 1928), as a client of a SOCKS proxy sends it.
async fn socks_connect(stream: &mut TcpStream, target: SocketAddr) -> anyhow::Result<()> {
    // Version 5, one method offered: 0, no authentication.
    stream.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    anyhow::ensure!(choice == [5, 0], "SOCKS proxy chose {choice:?}");
    // Version, CONNECT, reserved, then the address type and the address.
    let mut request = vec![5, 1, 0];
    match target.ip() {
        std::net::IpAddr::V4(ip) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
    }
    request.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    anyhow::ensure!(head[1] == 0, "SOCKS CONNECT {target}: reply {}", head[1]);
    // The bound address that follows: IPv4, a name with its length byte first, or IPv6;
    // then the port.
    let address = match head[3] {
        1 => 4,
        3 => usize::from(stream.read_u8().await?),
        4 => 16,
        other => anyhow::bail!("SOCKS reply with address type {other}"),
    };
    let mut bound = vec![0u8; address + 2];
    stream.read_exact(&mut bound).await?;
    Ok(())
}

/// Sends a CONNECT and reads the answer in one buffered read, as an HTTP client does. The
/// destination never speaks first, so nothing may follow the answer head.
async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &str,
) -> anyhow::Result<()> {
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    stream.flush().await?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the frontend closed before answering");
        head.extend_from_slice(&buf[..n]);
        anyhow::ensure!(head.len() < 8192, "answer head too long");
        anyhow::ensure!(
            !head.windows(4).any(|w| w == b"\r\n\r\n") || head.ends_with(b"\r\n\r\n"),
            "bytes after the CONNECT answer"
        );
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "CONNECT {target}: {}",
        String::from_utf8_lossy(&head).trim_end()
    );
    Ok(())
}

/// Sends `bytes` on a fresh connection; returns the time until the destination confirmed
/// every byte.
pub async fn upload(route: &Route, bytes: u64) -> anyhow::Result<Duration> {
    let mut stream = route.dial().await?;
    let start = Instant::now();
    send_upload(&mut stream, bytes).await?;
    Ok(start.elapsed())
}

/// Reads frames until an empty one, [`CHUNK`] bytes at a time; returns how many bytes came.
async fn count_frames<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let mut left = stream.read_u32().await? as usize;
        if left == 0 {
            return Ok(total);
        }
        while left > 0 {
            let want = left.min(buf.len());
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
            total += n as u64;
        }
    }
}

/// Reads until end of stream, [`CHUNK`] bytes at a time; returns how many bytes came.
async fn count_to_end<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf).await? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// Writes `data` as one upload frame.
async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, data: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(data.len()).map_err(std::io::Error::other)?;
    stream.write_u32(len).await?;
    stream.write_all(data).await
}

/// Writes `bytes` copies of `byte`, [`CHUNK`] bytes at a time.
async fn write_filler<S: AsyncWrite + Unpin>(
    stream: &mut S,
    byte: u8,
    bytes: u64,
) -> std::io::Result<()> {
    let buf = vec![byte; CHUNK];
    let mut remaining = bytes;
    while remaining > 0 {
        let n = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        stream.write_all(&buf[..n]).await?;
        remaining -= n as u64;
    }
    Ok(())
}

async fn send_upload(stream: &mut Box<dyn Io>, bytes: u64) -> anyhow::Result<()> {
    stream.write_u8(op::UPLOAD).await?;
    let buf = vec![0x5au8; CHUNK];
    let mut remaining = bytes;
    while remaining > 0 {
        let n = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        write_frame(stream, &buf[..n]).await?;
        remaining -= n as u64;
    }
    stream.write_u32(0).await?;
    // A TLS or gRPC client may still hold the last frames: send them before waiting.
    stream.flush().await?;
    let received = stream.read_u64().await?;
    anyhow::ensure!(
        received == bytes,
        "upload truncated: {received} of {bytes} bytes arrived"
    );
    Ok(())
}

/// Receives `bytes` on a fresh connection; returns the time until the last one arrived.
pub async fn download(route: &Route, bytes: u64) -> anyhow::Result<Duration> {
    let mut stream = route.dial().await?;
    let start = Instant::now();
    receive_download(&mut stream, bytes).await?;
    Ok(start.elapsed())
}

async fn receive_download(stream: &mut Box<dyn Io>, bytes: u64) -> anyhow::Result<()> {
    stream.write_u8(op::DOWNLOAD).await?;
    stream.write_u64(bytes).await?;
    stream.flush().await?;
    let received = count_to_end(stream).await?;
    anyhow::ensure!(
        received == bytes,
        "download truncated: {received} of {bytes} bytes arrived"
    );
    Ok(())
}

/// Direction of a bulk transfer.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Client to destination.
    Up,
    /// Destination to client.
    Down,
}

/// Moves `total` bytes split over `streams` concurrent connections, all dialed before the
/// clock starts; returns the time until every one finished.
pub async fn parallel(
    route: &Route,
    streams: usize,
    total: u64,
    direction: Direction,
) -> anyhow::Result<Duration> {
    let share = total / streams as u64;
    let mut dialed = Vec::with_capacity(streams);
    for _ in 0..streams {
        dialed.push(route.dial().await?);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut stream in dialed {
        set.spawn(async move {
            match direction {
                Direction::Up => send_upload(&mut stream, share).await,
                Direction::Down => receive_download(&mut stream, share).await,
            }
        });
    }
    while let Some(result) = set.join_next().await {
        result??;
    }
    Ok(start.elapsed())
}

/// Round trips of a [`MESSAGE`]-byte request and response on one connection, after `warmup`
/// unmeasured ones.
pub async fn round_trips(
    route: &Route,
    warmup: usize,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut stream = route.dial().await?;
    stream.write_u8(op::ECHO).await?;
    let request = [0x42u8; MESSAGE];
    let mut response = [0u8; MESSAGE];
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let start = Instant::now();
        stream.write_all(&request).await?;
        stream.flush().await?;
        stream.read_exact(&mut response).await?;
        if i >= warmup {
            times.push(start.elapsed());
        }
    }
    anyhow::ensure!(response == request, "echo returned different bytes");
    Ok(times)
}

/// New connections per second: `total` connections, `concurrency` at a time, each dialed,
/// used for one round trip and closed.
pub async fn dial_rate(route: &Route, total: usize, concurrency: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut set = JoinSet::new();
    for worker in 0..concurrency {
        let route = route.clone();
        let count = total / concurrency + usize::from(worker < total % concurrency);
        set.spawn(async move {
            for _ in 0..count {
                // Closed as kube-apiserver closes: Go's `tls.Conn.Close` sends close_notify
                // first, so the tunnel ends cleanly rather than as a truncated stream.
                echo_once(&route).await?.shutdown().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = set.join_next().await {
        result??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Round trips (as [`round_trips`]) while another connection of the same route uploads as fast
/// as it can; returns the samples and the bulk throughput in bytes per second.
pub async fn round_trips_under_bulk(
    route: &Route,
    warmup: usize,
    samples: usize,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (filled, full) = tokio::sync::oneshot::channel();
    let mut bulk = route.dial().await?;
    let started = Instant::now();
    let uploader = {
        let stop = stop.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            bulk.write_u8(op::UPLOAD).await?;
            let buf = vec![0x5au8; CHUNK];
            let mut filled = Some(filled);
            while !stop.load(Ordering::Relaxed) {
                write_frame(&mut bulk, &buf).await?;
                let total = sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
                // Every buffer on the way is full long before 16 MiB went through.
                if total >= 16 << 20
                    && let Some(filled) = filled.take()
                {
                    let _ = filled.send(());
                }
            }
            bulk.write_u32(0).await?;
            bulk.flush().await?;
            let received = bulk.read_u64().await?;
            let total = sent.load(Ordering::Relaxed);
            anyhow::ensure!(
                received == total,
                "bulk upload truncated: {received} of {total} bytes arrived"
            );
            anyhow::Ok(())
        })
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(30), full).await,
        Ok(Ok(()))
    ) {
        stop.store(true, Ordering::Relaxed);
        uploader.await.context("bulk uploader panicked")??;
        anyhow::bail!("the bulk upload did not get going within 30 s");
    }
    let times = round_trips(route, warmup, samples).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    uploader.await.context("bulk uploader panicked")??;
    let rate = sent.load(Ordering::Relaxed) as f64 / elapsed;
    Ok((times?, rate))
}

/// Opens `count` connections, each used for one round trip, and keeps them open.
pub async fn hold_idle(route: &Route, count: usize) -> anyhow::Result<Vec<Box<dyn Io>>> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(echo_once(route).await?);
    }
    Ok(held)
}

/// Closes connections [`hold_idle`] held as a client should: a TLS client sends its
/// close_notify, so that the server sees an orderly end rather than an aborted tunnel.
pub async fn close_all(held: Vec<Box<dyn Io>>) -> anyhow::Result<()> {
    for mut stream in held {
        stream.shutdown().await?;
    }
    Ok(())
}

/// Dials, does one [`MESSAGE`]-byte round trip, and returns the open connection.
async fn echo_once(route: &Route) -> anyhow::Result<Box<dyn Io>> {
    let request = [0x42u8; MESSAGE];
    let mut response = [0u8; MESSAGE];
    let mut stream = route.dial().await?;
    stream.write_u8(op::ECHO).await?;
    stream.write_all(&request).await?;
    stream.flush().await?;
    stream.read_exact(&mut response).await?;
    anyhow::ensure!(response == request, "echo returned different bytes");
    Ok(stream)
}
