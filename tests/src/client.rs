//! CONNECT clients, as kube-apiserver's egress dialer behaves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use cplink_proto::tls::{self, Identity, TrustAnchors};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::pki::CertFiles;

/// The proxy's answer to a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAnswer {
    /// HTTP status.
    pub status: u16,
    /// The whole response head.
    pub head: String,
    /// Body of an error answer (read to the end); empty on 200.
    pub body: String,
}

/// Sends `CONNECT target` and reads the answer head byte by byte, so that no tunneled byte is
/// consumed. On an error status the body is read until the proxy closes.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &str,
) -> anyhow::Result<ProxyAnswer> {
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    stream.flush().await?;
    read_answer(stream).await
}

/// Reads a proxy answer (see [`handshake`]).
pub async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<ProxyAnswer> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await?;
        head.push(byte);
        anyhow::ensure!(head.len() < 16 * 1024, "answer head too long");
    }
    let head = String::from_utf8(head)?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("malformed answer {head:?}"))?
        .parse()?;
    let mut body = String::new();
    if status != 200 {
        stream.read_to_string(&mut body).await?;
    }
    Ok(ProxyAnswer { status, head, body })
}

/// Opens a tunnel through the Unix socket frontend; fails unless the answer is 200.
pub async fn tunnel_uds(path: &Path, target: &str) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(path).await?;
    let answer = handshake(&mut stream, target).await?;
    anyhow::ensure!(answer.status == 200, "CONNECT {target}: {answer:?}");
    Ok(stream)
}

/// A TLS client for the TCP frontend.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
}

impl TlsClient {
    /// A client presenting `cert`, trusting `ca`.
    pub fn new(cert: &CertFiles, ca: &Path) -> anyhow::Result<Self> {
        let identity = Identity::from_pem_files(&cert.cert, &cert.key)?;
        let anchors = TrustAnchors::from_pem_file(ca)?;
        let config: Arc<rustls::ClientConfig> = tls::frontend_client_config(&identity, &anchors)?;
        Ok(TlsClient {
            connector: TlsConnector::from(config),
        })
    }

    /// Connects and completes the TLS handshake.
    pub async fn connect(&self, addr: SocketAddr) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost")?;
        Ok(self.connector.connect(name, tcp).await?)
    }

    /// Opens a tunnel through the TLS frontend; fails unless the answer is 200.
    pub async fn tunnel(
        &self,
        addr: SocketAddr,
        target: &str,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let mut stream = self.connect(addr).await?;
        let answer = handshake(&mut stream, target).await?;
        anyhow::ensure!(answer.status == 200, "CONNECT {target}: {answer:?}");
        Ok(stream)
    }
}
