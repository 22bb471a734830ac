//! konnectivity gRPC peers for tests: a Proxy client (what kube-apiserver is in `GRPC` mode)
//! and a scripted upstream agent, both built on tonic over the generated services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cplink_proto::konnectivity::{
    AGENT_ID, AGENT_IDENTIFIERS, AUTHORIZATION, AgentServiceClient, Packet, Payload,
    ProxyServiceClient, SERVER_COUNT, SERVER_ID,
};
use cplink_proto::tls::{self, Identity, TrustAnchors};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Streaming};

use crate::pki::CertFiles;

/// How long a test waits for one packet.
const PACKET_WAIT: Duration = Duration::from_secs(10);

/// A channel to a gRPC frontend on a Unix socket.
pub async fn uds_channel(path: &Path) -> anyhow::Result<Channel> {
    let path: PathBuf = path.to_owned();
    // The URI is required by tonic but unused: the connector decides where to connect.
    let channel = Endpoint::try_from("http://cplink.invalid")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(channel)
}

/// One Proxy stream: one tunneled connection.
pub struct ProxyStream {
    tx: mpsc::Sender<Packet>,
    rx: Streaming<Packet>,
}

/// What a dial request got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialAnswer {
    /// The connection's id.
    Connected(i64),
    /// The server's error text.
    Failed(String),
}

impl ProxyStream {
    /// Opens a Proxy stream on `channel` and sends DIAL_REQ for `address` with `random`.
    pub async fn open(channel: Channel, address: &str, random: i64) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(Packet::dial_request(address, random)).await?;
        let mut client = ProxyServiceClient::new(channel);
        let rx = client
            .proxy(Request::new(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        Ok(ProxyStream { tx, rx })
    }

    /// Sends a packet.
    pub async fn send(&self, packet: Packet) -> anyhow::Result<()> {
        self.tx.send(packet).await?;
        Ok(())
    }

    /// Ends the client's side of the stream.
    pub fn finish(self) -> Streaming<Packet> {
        self.rx
    }

    /// The next packet, `None` once the server ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        Ok(tokio::time::timeout(PACKET_WAIT, self.rx.message()).await??)
    }

    /// Waits for the dial answer.
    pub async fn answer(&mut self, random: i64) -> anyhow::Result<DialAnswer> {
        match self.next().await? {
            Some(Packet {
                payload: Some(Payload::DialResponse(rsp)),
                ..
            }) => {
                anyhow::ensure!(rsp.random == random, "answer for another dial: {rsp:?}");
                Ok(if rsp.error.is_empty() {
                    DialAnswer::Connected(rsp.connect_id)
                } else {
                    DialAnswer::Failed(rsp.error)
                })
            }
            other => anyhow::bail!("expected DIAL_RSP, got {other:?}"),
        }
    }

    /// Dials and fails unless the dial succeeded; returns the connection's id.
    pub async fn connect(channel: Channel, address: &str) -> anyhow::Result<(Self, i64)> {
        let mut stream = Self::open(channel, address, 7).await?;
        match stream.answer(7).await? {
            DialAnswer::Connected(id) => Ok((stream, id)),
            DialAnswer::Failed(error) => anyhow::bail!("dial {address} failed: {error}"),
        }
    }

    /// Reads DATA for `connect_id` until `len` bytes arrived.
    pub async fn read_exact(&mut self, connect_id: i64, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            match self.next().await? {
                Some(Packet {
                    payload: Some(Payload::Data(data)),
                    ..
                }) if data.connect_id == connect_id => out.extend_from_slice(&data.data),
                other => anyhow::bail!("expected DATA after {} bytes, got {other:?}", out.len()),
            }
        }
        Ok(out)
    }

    /// Sends `data` on connection `connect_id` in chunks.
    pub async fn write_all(&self, connect_id: i64, data: &[u8]) -> anyhow::Result<()> {
        self.writer().write_all(connect_id, data).await
    }

    /// The connection as a byte stream, for code written against sockets (benchmarks): bytes
    /// written become DATA packets, DATA packets become bytes to read; shutting down the write
    /// side sends CLOSE_REQ, and CLOSE_RSP or the end of the stream ends the read side. There
    /// is no half-close: CLOSE_REQ closes the whole connection, as konnectivity-client's does.
    pub fn into_io(self, connect_id: i64) -> DuplexStream {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            if let Err(err) = self.bridge(connect_id, theirs).await {
                tracing::debug!(%err, "gRPC byte stream ended with an error");
            }
        });
        ours
    }

    async fn bridge(mut self, connect_id: i64, io: DuplexStream) -> anyhow::Result<()> {
        let (mut reader, mut writer) = tokio::io::split(io);
        let tx = self.tx.clone();
        let up = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    let _ = tx.send(Packet::close_request(connect_id)).await;
                    return anyhow::Ok(());
                }
                tx.send(Packet::data(connect_id, Bytes::copy_from_slice(&buf[..n])))
                    .await?;
            }
        };
        let down = async move {
            loop {
                match self.rx.message().await? {
                    Some(Packet {
                        payload: Some(Payload::Data(data)),
                        ..
                    }) => writer.write_all(&data.data).await?,
                    Some(Packet {
                        payload: Some(Payload::CloseResponse(rsp)),
                        ..
                    }) => {
                        writer.shutdown().await?;
                        anyhow::ensure!(rsp.error.is_empty(), "closed: {}", rsp.error);
                        return Ok(());
                    }
                    Some(_) => {}
                    None => {
                        writer.shutdown().await?;
                        return Ok(());
                    }
                }
            }
        };
        tokio::try_join!(up, down)?;
        Ok(())
    }

    /// A sending half, to write while this stream reads.
    pub fn writer(&self) -> ProxyWriter {
        ProxyWriter(self.tx.clone())
    }
}

/// The sending half of a [`ProxyStream`].
pub struct ProxyWriter(mpsc::Sender<Packet>);

impl ProxyWriter {
    /// Sends `data` on connection `connect_id` in chunks.
    pub async fn write_all(&self, connect_id: i64, data: &[u8]) -> anyhow::Result<()> {
        for chunk in data.chunks(32 * 1024) {
            self.0
                .send(Packet::data(connect_id, Bytes::copy_from_slice(chunk)))
                .await?;
        }
        Ok(())
    }
}

/// A client TLS configuration for the agent port that negotiates `h2`, as upstream agents do.
pub fn agent_h2_tls(cert: &CertFiles, ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let identity = Identity::from_pem_files(&cert.cert, &cert.key)?;
    let anchors = TrustAnchors::from_pem_file(ca)?;
    let mut config = (*tls::link_client_config(&identity, &anchors)?).clone();
    config.alpn_protocols = vec![cplink_proto::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Like [`agent_h2_tls`] for an agent that authenticates with a token and presents no
/// certificate.
pub fn agent_h2_tls_without_certificate(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![cplink_proto::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A scripted upstream konnectivity agent: the test reads the server's packets and answers.
pub struct ScriptedAgent {
    /// Packets to the server.
    pub tx: mpsc::Sender<Packet>,
    /// Packets from the server.
    pub rx: Streaming<Packet>,
    /// The `serverid` response header.
    pub server_id: String,
    /// The `servercount` response header.
    pub server_count: u32,
}

impl ScriptedAgent {
    /// Links to the agent port at `addr` as agent `id` with `identifiers`.
    pub async fn link(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        id: &str,
        identifiers: &str,
    ) -> anyhow::Result<Self> {
        Self::link_with_token(addr, tls, id, identifiers, None).await
    }

    /// [`ScriptedAgent::link`], sending `authorization: Bearer <token>` when given. A refusal
    /// by the server comes back as the [`tonic::Status`] inside the error.
    pub async fn link_with_token(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        id: &str,
        identifiers: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let connector = TlsConnector::from(tls);
        let channel = Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                    connector.connect(name, tcp).await.map(TokioIo::new)
                }
            }))
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let mut request = Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(AGENT_ID, id.parse()?);
        request
            .metadata_mut()
            .insert(AGENT_IDENTIFIERS, identifiers.parse()?);
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert(AUTHORIZATION, format!("Bearer {token}").parse()?);
        }
        let response = AgentServiceClient::new(channel).connect(request).await?;
        let header = |key: &str| -> anyhow::Result<String> {
            Ok(response
                .metadata()
                .get(key)
                .ok_or_else(|| anyhow::anyhow!("no {key} header"))?
                .to_str()?
                .to_owned())
        };
        let server_id = header(SERVER_ID)?;
        let server_count = header(SERVER_COUNT)?.parse()?;
        Ok(ScriptedAgent {
            tx,
            rx: response.into_inner(),
            server_id,
            server_count,
        })
    }

    /// The next packet from the server.
    pub async fn next(&mut self) -> anyhow::Result<Packet> {
        tokio::time::timeout(PACKET_WAIT, self.rx.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("server ended the agent stream"))
    }

    /// Sends a packet.
    pub async fn send(&self, packet: Packet) -> anyhow::Result<()> {
        self.tx.send(packet).await?;
        Ok(())
    }
}

/// Port of a dial a [`CoupledAgent`] answers by echoing the connection's bytes.
pub const ECHO_PORT: u16 = 7;
/// Port of a dial a [`CoupledAgent`] answers by sending [`FLOOD_BYTES`] bytes at once, whatever
/// the client reads (chargen's port).
pub const FLOOD_PORT: u16 = 19;
/// How much a flooded connection is sent at most.
pub const FLOOD_BYTES: usize = 64 * 1024 * 1024;

/// A scripted agent serving dials the way an upstream `proxy-agent` does as far as the stream is
/// concerned: one loop reads the server's packets and sends the answers, so while one of its
/// sends waits for the server (HTTP/2 flow control), it reads nothing — its two directions are
/// coupled. A server that stops reading the agent for one connection then deadlocks with it.
///
/// Dials to port [`ECHO_PORT`] echo, dials to [`FLOOD_PORT`] flood; the destination lives in
/// the agent itself.
pub struct CoupledAgent {
    closed: Arc<std::sync::Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl CoupledAgent {
    /// Serves `agent`'s stream until the server ends it.
    pub fn serve(agent: ScriptedAgent) -> Self {
        let closed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn(coupled_loop(agent, closed.clone()));
        CoupledAgent { closed, task }
    }

    /// The connections the server closed (CLOSE_REQ), in order.
    pub fn closed_by_server(&self) -> Vec<i64> {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the agent's loop ended (the stream ended or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for CoupledAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn coupled_loop(
    mut agent: ScriptedAgent,
    closed: Arc<std::sync::Mutex<Vec<i64>>>,
) -> anyhow::Result<()> {
    let mut next_id = 0;
    while let Some(packet) = agent.rx.message().await? {
        match packet.payload {
            Some(Payload::DialRequest(dial)) => {
                next_id += 1;
                agent
                    .send(Packet::dial_established(dial.random, next_id))
                    .await?;
                if dial.address.ends_with(&format!(":{FLOOD_PORT}")) {
                    // From the loop too: nothing is read until the flood is out.
                    let chunk = Bytes::from(vec![0x46u8; 32 * 1024]);
                    for _ in 0..FLOOD_BYTES / chunk.len() {
                        agent.send(Packet::data(next_id, chunk.clone())).await?;
                    }
                }
            }
            // Echoed from the loop itself: while this send waits, nothing is read.
            Some(Payload::Data(data)) => {
                agent
                    .send(Packet::data(data.connect_id, Bytes::from(data.data)))
                    .await?;
            }
            Some(Payload::CloseRequest(close)) => {
                closed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(close.connect_id);
                agent
                    .send(Packet::close_response(close.connect_id, ""))
                    .await?;
            }
            _ => {}
        }
    }
    Ok(())
}
