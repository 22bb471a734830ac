//! Destinations for tunneled connections, on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running destination; stops when dropped.
pub struct Target {
    /// Its address.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Target {
    /// `host:port` as written in a CONNECT request.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }
}

async fn serve<F, Fut>(handler: F) -> anyhow::Result<Target>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handler(stream));
        }
    });
    Ok(Target { addr, task })
}

/// Echoes every byte back; half-closes after the client half-closed.
pub async fn echo() -> anyhow::Result<Target> {
    serve(|mut stream| async move {
        let (mut r, mut w) = stream.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
    .await
}

/// Reads until the client half-closes, then answers with the number of bytes read, as text,
/// and closes: proves that a half-closed client still receives its answer.
pub async fn count_then_answer() -> anyhow::Result<Target> {
    serve(|mut stream| async move {
        let mut buf = Vec::new();
        if stream.read_to_end(&mut buf).await.is_ok() {
            let _ = stream
                .write_all(format!("read {} bytes", buf.len()).as_bytes())
                .await;
            let _ = stream.shutdown().await;
        }
    })
    .await
}

/// Writes `total` bytes as fast as the reader takes them, reporting progress in `written`.
pub async fn source(
    total: u64,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Target> {
    serve(move |mut stream| {
        let written = written.clone();
        async move {
            let chunk = vec![0x5a_u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < total {
                let n = chunk.len().min((total - sent) as usize);
                if stream.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
                written.store(sent, std::sync::atomic::Ordering::Relaxed);
            }
            let _ = stream.shutdown().await;
        }
    })
    .await
}

/// Accepts, then resets the connection at once.
pub async fn resetter() -> anyhow::Result<Target> {
    serve(|stream| async move {
        // Wait for the client's first byte so the reset hits an established tunnel.
        let mut byte = [0u8; 1];
        let _ = stream.peek(&mut byte).await;
        cplink_runtime::net::abort_tcp(stream);
    })
    .await
}

/// Records how each connection ended: `Ok(bytes)` on a clean end, `Err(kind)` on an error.
pub async fn recorder() -> anyhow::Result<(
    Target,
    tokio::sync::mpsc::UnboundedReceiver<Result<usize, std::io::ErrorKind>>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let target = serve(move |mut stream| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let result = stream.read_to_end(&mut buf).await.map_err(|e| e.kind());
            let _ = tx.send(result);
        }
    })
    .await?;
    Ok((target, rx))
}

/// An address where nothing listens.
pub fn closed_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(addr)
}

/// A listener whose accept queue is full and which never accepts: connections to it hang in
/// SYN-SENT, like a destination behind a firewall that drops packets.
pub struct BlackHole {
    /// Its address.
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

impl BlackHole {
    /// How many connection attempts to it are hanging (SYN-SENT), from `/proc/net/tcp`: a dial
    /// under way, seen from outside the dialer.
    pub fn hanging_dials(&self) -> usize {
        let std::net::IpAddr::V4(ip) = self.addr.ip() else {
            return 0;
        };
        // The kernel prints the address as the in-memory u32 (little-endian here) and the port.
        let remote = format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(ip.octets()),
            self.addr.port()
        );
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // sl, local_address, rem_address, st: 02 is SYN_SENT.
                fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"02")
            })
            .count()
    }
}

/// Creates a [`BlackHole`].
pub fn black_hole() -> anyhow::Result<BlackHole> {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    listener.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    listener.listen(0)?;
    let addr = listener
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow::anyhow!("not an inet socket"))?;
    let mut queued = Vec::new();
    // Fill the accept queue until a connection attempt no longer completes.
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(queued.len() < 64, "accept queue never filled");
    }
    Ok(BlackHole {
        addr,
        _listener: listener,
        _queued: queued,
    })
}

/// `len` bytes that depend on `seed` and on their offset, so that a lost, repeated or
/// misplaced chunk changes the checksum.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    // xorshift64*: cheap, and every seed gives its own sequence.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads an 8-byte seed from each client, then writes `len` bytes of [`pattern`] for that seed
/// as fast as the reader takes them, and closes.
pub async fn pattern_source(len: usize) -> anyhow::Result<Target> {
    serve(move |mut stream| async move {
        let Ok(seed) = stream.read_u64().await else {
            return;
        };
        if stream.write_all(&pattern(seed, len)).await.is_ok() {
            let _ = stream.shutdown().await;
        }
    })
    .await
}

/// A loopback listener whose accepted sockets have a small receive buffer, so that a writer
/// to a destination that does not read stalls at once instead of filling the kernel's buffers.
fn small_buffer_listener(backlog: u32) -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Inherited by accepted sockets; the kernel doubles it and keeps a floor.
    socket.set_recv_buffer_size(4096)?;
    socket.bind("127.0.0.1:0".parse()?)?;
    Ok(socket.listen(backlog)?)
}

/// Accepts and reads nothing until `release` turns true; then reads to the end, answers with
/// the SHA-256 of what it read (32 bytes) and closes. Its sockets have a small receive buffer,
/// so that a writer stalls at once instead of filling the kernel's buffers.
pub async fn gated_sink(release: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<Target> {
    use sha2::Digest;
    let listener = small_buffer_listener(1024)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut release = release.clone();
            tokio::spawn(async move {
                if release.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let mut hasher = sha2::Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => hasher.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                if stream.write_all(&hasher.finalize()).await.is_ok() {
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    Ok(Target { addr, task })
}

/// Accepts and reads nothing until `release` turns true; then reads to the end and reports how
/// many bytes arrived and how the connection ended (`None` for a clean end). Small receive
/// buffers, as with [`gated_sink`].
pub async fn gated_tally(
    release: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(
    Target,
    tokio::sync::mpsc::UnboundedReceiver<(usize, Option<std::io::ErrorKind>)>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = small_buffer_listener(64)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut release = release.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if release.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let mut total = 0;
                let mut buf = vec![0u8; 64 * 1024];
                let end = loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break None,
                        Ok(n) => total += n,
                        Err(e) => break Some(e.kind()),
                    }
                };
                let _ = tx.send((total, end));
            });
        }
    });
    Ok((Target { addr, task }, rx))
}

/// Writes `len` bytes of [`pattern`] (seed 0) to each client, then resets the connection.
pub async fn source_then_reset(len: usize) -> anyhow::Result<Target> {
    serve(move |mut stream| async move {
        if stream.write_all(&pattern(0, len)).await.is_ok() && stream.flush().await.is_ok() {
            cplink_runtime::net::abort_tcp_after_sent(stream, Duration::from_secs(5)).await;
        }
    })
    .await
}
