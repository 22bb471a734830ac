//! The link preface and hello exchange.
//!
//! Right after the TLS handshake each side sends one frame:
//!
//! ```text
//! +--------+---------+----------------+------------------+
//! | CPLINK | version | length (u32 BE)| JSON payload     |
//! | 6 B    | 1 B     | 4 B            | <= 16 KiB        |
//! +--------+---------+----------------+------------------+
//! ```
//!
//! The agent speaks first ([`AgentHello`]); the server answers ([`ServerHello`]) and, when it
//! accepted, starts HTTP/2 as the client. Frames are read with exact-length reads so that not a
//! byte of the HTTP/2 preface that follows is consumed.

use std::net::IpAddr;

use bytes::{Buf, BufMut, BytesMut};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of every hello frame.
pub const MAGIC: &[u8; 6] = b"CPLINK";
/// Version of the link protocol this build speaks.
pub const VERSION: u8 = 1;
/// Largest payload a hello frame may carry.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 4;

/// Why a hello frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The peer does not speak the cplink link protocol.
    #[error("peer did not send the cplink preface")]
    BadMagic,
    /// The peer speaks a link protocol version this build does not.
    #[error("unsupported link protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The announced payload is larger than [`MAX_PAYLOAD`].
    #[error("hello of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(usize),
    /// The connection ended inside a frame.
    #[error("connection closed in the middle of the hello")]
    Truncated,
    /// The payload is not a valid hello.
    #[error("malformed hello: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The transport failed.
    #[error("i/o error during hello: {0}")]
    Io(#[source] std::io::Error),
}

/// What an agent tells a server about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// Stable id of the agent, unique among the server's agents.
    pub agent_id: String,
    /// Name of the node the agent runs on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// What the agent can reach, used for routing.
    #[serde(default)]
    pub identifiers: Identifiers,
    /// Software version of the agent.
    pub software_version: String,
    /// A service-account token proving which pod the agent is, for servers that bind agents to
    /// their nodes (`cplink-server --agent-identity token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<BearerToken>,
}

/// A credential carried in a hello. Its `Debug` output never shows the value, so a hello can be
/// logged whole.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps a token as read from its file; surrounding whitespace is not part of it.
    pub fn new(token: &str) -> Self {
        BearerToken(token.trim().to_owned())
    }

    /// The token itself, for the one place that checks it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BearerToken(<{} bytes>)", self.0.len())
    }
}

/// Routing identifiers of an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifiers {
    /// IP addresses of the agent's host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ips: Vec<IpAddr>,
    /// Pod address ranges served by the agent's node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<IpNet>,
    /// Whether the agent may carry traffic no other agent claims.
    #[serde(default)]
    pub default_route: bool,
}

/// A server's answer to an [`AgentHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// Stable id of the server replica.
    pub server_id: String,
    /// Number of server replicas the agent should link to.
    pub server_count: u32,
    /// Whether the link is accepted.
    pub outcome: HelloOutcome,
}

/// Whether the server accepted the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum HelloOutcome {
    /// The link is accepted; HTTP/2 follows.
    Accepted,
    /// The link is refused; the server closes the connection.
    Rejected {
        /// Human-readable reason.
        reason: String,
    },
}

/// Appends one hello frame carrying `msg` to `dst`.
pub fn encode<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), HelloError> {
    let payload = serde_json::to_vec(msg).map_err(HelloError::Malformed)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(HelloError::TooLarge(payload.len()));
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_slice(MAGIC);
    dst.put_u8(VERSION);
    // Cannot truncate: payload.len() <= MAX_PAYLOAD.
    dst.put_u32(payload.len() as u32);
    dst.put_slice(&payload);
    Ok(())
}

/// Decodes one frame from the front of `src`.
///
/// Returns `Ok(None)` when more bytes are needed, and an error as soon as the bytes present
/// cannot start a valid frame.
pub fn decode<T: DeserializeOwned>(src: &mut BytesMut) -> Result<Option<T>, HelloError> {
    let magic_seen = src.len().min(MAGIC.len());
    if src[..magic_seen] != MAGIC[..magic_seen] {
        return Err(HelloError::BadMagic);
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = payload_len(&src[..HEADER_LEN])?;
    if src.len() < HEADER_LEN + len {
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(len);
    serde_json::from_slice(&payload)
        .map(Some)
        .map_err(HelloError::Malformed)
}

/// Validates a frame header and returns the payload length it announces.
fn payload_len(header: &[u8]) -> Result<usize, HelloError> {
    if &header[..MAGIC.len()] != MAGIC {
        return Err(HelloError::BadMagic);
    }
    let version = header[MAGIC.len()];
    if version != VERSION {
        return Err(HelloError::UnsupportedVersion(version));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&header[MAGIC.len() + 1..HEADER_LEN]);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_PAYLOAD {
        return Err(HelloError::TooLarge(len));
    }
    Ok(len)
}

/// Reads exactly one frame from `io`, never consuming a byte past it.
pub async fn read<T, R>(io: &mut R) -> Result<T, HelloError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    read_exact(io, &mut header).await?;
    let len = payload_len(&header)?;
    let mut payload = vec![0u8; len];
    read_exact(io, &mut payload).await?;
    serde_json::from_slice(&payload).map_err(HelloError::Malformed)
}

/// Writes one frame to `io` and flushes it.
pub async fn write<T, W>(io: &mut W, msg: &T) -> Result<(), HelloError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    encode(msg, &mut buf)?;
    io.write_all(&buf).await.map_err(HelloError::Io)?;
    io.flush().await.map_err(HelloError::Io)
}

async fn read_exact<R: AsyncRead + Unpin>(io: &mut R, buf: &mut [u8]) -> Result<(), HelloError> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HelloError::Truncated),
        Err(e) => Err(HelloError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_hello() -> AgentHello {
        AgentHello {
            agent_id: "agent-1".into(),
            node_name: Some("node-a".into()),
            identifiers: Identifiers {
                host_ips: vec!["10.0.0.5".parse().unwrap()],
                pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                default_route: true,
            },
            software_version: "0.1.0".into(),
            token: Some(BearerToken::new("eyJhbGciOi.payload.signature\n")),
        }
    }

    #[test]
    fn a_token_travels_trimmed_and_never_shows_in_debug_output() {
        let hello = agent_hello();
        let mut buf = encoded(&hello);
        let decoded: AgentHello = decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            decoded.token.as_ref().map(BearerToken::expose),
            Some("eyJhbGciOi.payload.signature")
        );
        let shown = format!("{decoded:?}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert!(shown.contains("BearerToken(<28 bytes>)"), "{shown}");
    }

    #[test]
    fn a_hello_without_a_token_reads_as_before() {
        let old = br#"{"agent_id":"a","software_version":"0.1.0"}"#;
        let hello: AgentHello = serde_json::from_slice(old).unwrap();
        assert_eq!(hello.token, None);
    }

    fn encoded<T: Serialize>(msg: &T) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(msg, &mut buf).unwrap();
        buf
    }

    #[test]
    fn agent_hello_round_trips() {
        let mut buf = encoded(&agent_hello());
        let decoded: AgentHello = decode(&mut buf).unwrap().unwrap();
        assert_eq!(decoded, agent_hello());
        assert!(buf.is_empty(), "decode consumes exactly one frame");
    }

    #[test]
    fn server_hello_round_trips_both_outcomes() {
        for outcome in [
            HelloOutcome::Accepted,
            HelloOutcome::Rejected {
                reason: "duplicate".into(),
            },
        ] {
            let hello = ServerHello {
                server_id: "s1".into(),
                server_count: 3,
                outcome,
            };
            let decoded: ServerHello = decode(&mut encoded(&hello)).unwrap().unwrap();
            assert_eq!(decoded, hello);
        }
    }

    #[test]
    fn every_truncation_asks_for_more_bytes() {
        let full = encoded(&agent_hello());
        for cut in 0..full.len() {
            let mut partial = BytesMut::from(&full[..cut]);
            let result: Option<AgentHello> = decode(&mut partial).unwrap();
            assert!(result.is_none(), "prefix of {cut} bytes must be incomplete");
            assert_eq!(partial.len(), cut, "incomplete input is left untouched");
        }
    }

    #[test]
    fn bytes_after_the_frame_are_left_in_place() {
        let mut buf = encoded(&agent_hello());
        buf.extend_from_slice(b"PRI * HTTP/2.0");
        let _: AgentHello = decode(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], b"PRI * HTTP/2.0");
    }

    #[test]
    fn wrong_magic_is_rejected_from_the_first_byte() {
        let mut buf = BytesMut::from(&b"G"[..]);
        assert!(matches!(
            decode::<AgentHello>(&mut buf),
            Err(HelloError::BadMagic)
        ));
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            decode::<AgentHello>(&mut buf),
            Err(HelloError::BadMagic)
        ));
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut buf = encoded(&agent_hello());
        buf[MAGIC.len()] = 9;
        assert!(matches!(
            decode::<AgentHello>(&mut buf),
            Err(HelloError::UnsupportedVersion(9))
        ));
    }

    #[test]
    fn oversized_length_is_rejected_before_the_payload_arrives() {
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        buf.put_u8(VERSION);
        buf.put_u32(MAX_PAYLOAD as u32 + 1);
        assert!(matches!(
            decode::<AgentHello>(&mut buf),
            Err(HelloError::TooLarge(n)) if n == MAX_PAYLOAD + 1
        ));
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let mut hello = agent_hello();
        hello.agent_id = "x".repeat(MAX_PAYLOAD);
        assert!(matches!(
            encode(&hello, &mut BytesMut::new()),
            Err(HelloError::TooLarge(_))
        ));
    }

    #[test]
    fn malformed_payload_is_rejected() {
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        buf.put_u8(VERSION);
        buf.put_u32(3);
        buf.put_slice(b"{{{");
        assert!(matches!(
            decode::<AgentHello>(&mut buf),
            Err(HelloError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_fields_from_newer_peers_are_ignored() {
        let json = br#"{"agent_id":"a","software_version":"9","future":true}"#;
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        buf.put_u8(VERSION);
        buf.put_u32(json.len() as u32);
        buf.put_slice(json);
        let hello: AgentHello = decode(&mut buf).unwrap().unwrap();
        assert_eq!(hello.agent_id, "a");
        assert_eq!(hello.identifiers, Identifiers::default());
    }

    #[tokio::test]
    async fn async_read_stops_exactly_at_the_frame_end() {
        let mut wire = encoded(&agent_hello()).to_vec();
        wire.extend_from_slice(b"next");
        let mut reader = &wire[..];
        let hello: AgentHello = read(&mut reader).await.unwrap();
        assert_eq!(hello, agent_hello());
        assert_eq!(reader, b"next");
    }

    #[tokio::test]
    async fn async_read_reports_truncation() {
        let wire = encoded(&agent_hello());
        let mut reader = &wire[..wire.len() - 1];
        assert!(matches!(
            read::<AgentHello, _>(&mut reader).await,
            Err(HelloError::Truncated)
        ));
    }
}
