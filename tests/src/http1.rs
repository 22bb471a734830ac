//! Plain HTTP/1.1 requests without a client library: pods' and processes' admin endpoints
//! (`/metrics`). One request per connection (`Connection: close`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A `GET` with a 5 s timeout, for admin endpoints; returns the body of a 200.
pub async fn get(address: SocketAddr, path: &str) -> anyhow::Result<String> {
    request(address, "GET", path, None, Duration::from_secs(5)).await
}

/// A request with an optional `(content type, body)`; returns the body of a 200. Connecting
/// and reading the response each get `timeout`.
pub async fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
        .await
        .context("connect timed out")??;
    request_on(stream, address, method, path, body, timeout).await
}

/// A `GET` over a connection already open to `address`, with a 5 s timeout; returns the
/// body of a 200.
pub async fn get_on(
    stream: tokio::net::TcpStream,
    address: SocketAddr,
    path: &str,
) -> anyhow::Result<String> {
    request_on(stream, address, "GET", path, None, Duration::from_secs(5)).await
}

/// [`request`] over a connection already open to `address`.
pub async fn request_on(
    mut stream: tokio::net::TcpStream,
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some((content_type, body)) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    if let Some((_, body)) = body {
        stream.write_all(body).await?;
    }
    let mut response = String::new();
    tokio::time::timeout(timeout, stream.read_to_string(&mut response))
        .await
        .context("response timed out")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {head}");
    Ok(body.to_owned())
}
