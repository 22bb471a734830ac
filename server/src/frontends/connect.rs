//! The HTTP/1.1 CONNECT request kube-apiserver sends to an `HTTPConnect` egress proxy.
//!
//! kube-apiserver writes exactly `CONNECT host:port HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`: the
//! destination is the request-target, not `Host`. Parsing is split from I/O: [`parse`] works on
//! whatever bytes have arrived and tells "incomplete" from "invalid"; [`read_request`] feeds it.

use bytes::{Bytes, BytesMut};
use cplink_proto::target::{Target, TargetError};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head accepted, request line and headers together.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header fields accepted.
const MAX_HEADERS: usize = 64;

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where the client wants to go.
    pub target: Target,
    /// Bytes the client sent after the request head; they belong to the tunneled stream.
    pub leftover: Bytes,
}

/// Why a CONNECT request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The request head exceeds [`MAX_HEAD_BYTES`] or has too many fields.
    #[error("request head exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header fields")]
    TooLarge,
    /// The method is not CONNECT.
    #[error("method {0} not allowed: this proxy only accepts CONNECT")]
    NotConnect(String),
    /// The request is not valid HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request-target is not a valid `host:port`.
    #[error("{0}")]
    BadTarget(#[from] TargetError),
    /// The client did not finish its request head in time.
    #[error("request head not received within the header timeout")]
    Timeout,
    /// The client closed the connection before finishing the request head.
    #[error("client closed the connection before the request head was complete")]
    Closed,
    /// Reading from the client failed.
    #[error("i/o error while reading the request: {0}")]
    Io(#[source] std::io::Error),
}

impl ConnectError {
    /// The status to answer with, or `None` when the client is gone.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::TooLarge => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            ConnectError::NotConnect(_) => Some(StatusCode::METHOD_NOT_ALLOWED),
            ConnectError::Malformed(_) | ConnectError::BadTarget(_) => {
                Some(StatusCode::BAD_REQUEST)
            }
            ConnectError::Timeout => Some(StatusCode::REQUEST_TIMEOUT),
            ConnectError::Closed | ConnectError::Io(_) => None,
        }
    }

    /// Low-cardinality name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::TooLarge => "header_too_large",
            ConnectError::NotConnect(_) => "not_connect",
            ConnectError::Malformed(_) => "malformed",
            ConnectError::BadTarget(_) => "bad_target",
            ConnectError::Timeout => "header_timeout",
            ConnectError::Closed => "closed",
            ConnectError::Io(_) => "io_error",
        }
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns `Ok(None)` when the head is incomplete and may still become valid, and
/// `Ok(Some((target, head_len)))` once it is complete.
pub fn parse(buf: &[u8]) -> Result<Option<(Target, usize)>, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(status) => status,
        Err(httparse::Error::TooManyHeaders) => return Err(ConnectError::TooLarge),
        Err(err) => return Err(ConnectError::Malformed(err.to_string())),
    };
    // Refuse other methods as soon as the method is known, not after a full head arrived.
    if let Some(method) = req.method
        && method != "CONNECT"
        && (status.is_complete() || buf.len() > method.len())
    {
        return Err(ConnectError::NotConnect(truncate(method)));
    }
    match status {
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => Err(ConnectError::TooLarge),
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(head_len) if head_len > MAX_HEAD_BYTES => {
            Err(ConnectError::TooLarge)
        }
        httparse::Status::Complete(head_len) => {
            let path = req
                .path
                .ok_or_else(|| ConnectError::Malformed("missing request-target".into()))?;
            Ok(Some((path.parse()?, head_len)))
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// Reads one CONNECT request head from `io`.
///
/// Never reads more than [`MAX_HEAD_BYTES`] plus one read's worth; whatever follows the head is
/// returned in [`ConnectRequest::leftover`]. The caller bounds the time this may take.
pub async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<ConnectRequest, ConnectError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some((target, head_len)) = parse(&buf)? {
            let leftover = buf.split_off(head_len).freeze();
            return Ok(ConnectRequest { target, leftover });
        }
        let room = MAX_HEAD_BYTES + 1 - buf.len();
        let mut limited = (&mut *io).take(room as u64);
        match limited.read_buf(&mut buf).await {
            Ok(0) => return Err(ConnectError::Closed),
            Ok(_) => {}
            Err(err) => return Err(ConnectError::Io(err)),
        }
    }
}

/// Formats the proxy's answer for a failed request: status line, a one-line text body, close.
pub fn error_response(status: StatusCode, reason: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len(),
    )
    .into_bytes()
}

/// The answer written once the agent's dial succeeded.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    const APISERVER_REQUEST: &[u8] = b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    #[test]
    fn parses_what_kube_apiserver_sends() {
        let (target, len) = parse(APISERVER_REQUEST).unwrap().unwrap();
        assert_eq!(target.to_string(), "10.0.0.5:10250");
        assert_eq!(len, APISERVER_REQUEST.len());
    }

    #[test]
    fn every_prefix_is_incomplete_not_invalid() {
        for cut in 0..APISERVER_REQUEST.len() {
            assert!(
                parse(&APISERVER_REQUEST[..cut]).unwrap().is_none(),
                "prefix of {cut} bytes"
            );
        }
    }

    #[test]
    fn ipv6_targets_parse() {
        let (target, _) = parse(b"CONNECT [::1]:80 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(target.ip(), Some("::1".parse().unwrap()));
        assert_eq!(target.port, 80);
    }

    #[test]
    fn other_methods_are_refused_with_405() {
        let err = parse(b"GET / HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(matches!(err, ConnectError::NotConnect(ref m) if m == "GET"));
        assert_eq!(err.status(), Some(StatusCode::METHOD_NOT_ALLOWED));
        // Known before the head is complete.
        assert!(matches!(
            parse(b"POST /x"),
            Err(ConnectError::NotConnect(_))
        ));
    }

    #[test]
    fn targets_without_port_are_refused_with_400() {
        let err = parse(b"CONNECT example.com HTTP/1.1\r\n\r\n").unwrap_err();
        assert!(matches!(err, ConnectError::BadTarget(_)));
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn garbage_is_refused_with_400() {
        let err = parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").unwrap_err();
        assert!(matches!(err, ConnectError::Malformed(_)), "{err:?}");
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn heads_over_8_kib_are_refused_with_431() {
        let mut req = b"CONNECT a:1 HTTP/1.1\r\nX-Pad: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        // Incomplete but already too large.
        let err = parse(&req).unwrap_err();
        assert!(matches!(err, ConnectError::TooLarge));
        assert_eq!(
            err.status(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // Complete and too large.
        req.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse(&req), Err(ConnectError::TooLarge)));
    }

    #[test]
    fn too_many_headers_are_refused_with_431() {
        let mut req = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            req.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&req), Err(ConnectError::TooLarge)));
    }

    #[tokio::test]
    async fn partial_reads_are_reassembled_and_leftover_kept() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in APISERVER_REQUEST.chunks(3) {
                client.write_all(chunk).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"early bytes").await.unwrap();
            client
        });
        let request = read_request(&mut server).await.unwrap();
        assert_eq!(request.target.to_string(), "10.0.0.5:10250");
        let _client = writer.await.unwrap();
        // The early bytes may have arrived with the head or not; none is lost either way.
        let mut rest = request.leftover.to_vec();
        if rest.len() < b"early bytes".len() {
            let mut more = vec![0; b"early bytes".len() - rest.len()];
            server.read_exact(&mut more).await.unwrap();
            rest.extend(more);
        }
        assert_eq!(rest, b"early bytes");
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_head_is_reported_closed() {
        let mut io = &b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\n"[..];
        assert!(matches!(
            read_request(&mut io).await,
            Err(ConnectError::Closed)
        ));
    }

    #[tokio::test]
    async fn an_endless_head_stops_at_the_limit() {
        let endless = tokio::io::repeat(b'a');
        let mut io = tokio::io::AsyncReadExt::chain(&b"CONNECT a:1 HTTP/1.1\r\nX: "[..], endless);
        assert!(matches!(
            read_request(&mut io).await,
            Err(ConnectError::TooLarge)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_loris_is_cut_by_the_caller_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            read_request(&mut server),
        )
        .await;
        assert!(result.is_err(), "an unfinished head must not complete");
        drop(client);
    }

    #[test]
    fn error_responses_are_complete_http_messages() {
        let response = error_response(StatusCode::SERVICE_UNAVAILABLE, "no agent available");
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Content-Length: 19\r\n"));
        assert!(text.ends_with("\r\n\r\nno agent available\n"));
    }
}
