//! A konnectivity Proxy client written at the HTTP/2 frame level, to send exactly the header
//! blocks kube-apiserver's gRPC library sends, which no well-behaved HTTP/2 client library will:
//! `:authority` set to the Unix socket's path as it is (grpc-go before 1.58, Kubernetes up to
//! 1.28) or percent-encoded (grpc-go 1.58 and later, Kubernetes 1.29 and later).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cplink_proto::konnectivity::Packet;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The socket path Konnectivity's documentation and kubeadm use.
pub const SOCKET_PATH: &str = "/etc/kubernetes/konnectivity-server/konnectivity-server.socket";
/// [`SOCKET_PATH`] as grpc-go 1.58 and later encode it for `:authority`: every byte outside
/// RFC 3986's unreserved, sub-delims and `:[]@` becomes `%XX`.
pub const SOCKET_PATH_ENCODED: &str =
    "%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket";

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// How long one read from the server may take.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// The request header fields of a Proxy call, in the order grpc-go writes them (method, scheme,
/// path, authority, content type, user agent, te), as kube-apiserver sends them: no deadline,
/// no compression, plaintext over the socket.
pub fn proxy_request_headers(authority: &str, user_agent: &str) -> Vec<(String, String)> {
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/ProxyService/Proxy"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("user-agent", user_agent),
        ("te", "trailers"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.to_owned()))
    .collect()
}

/// What the server sent on one stream.
#[derive(Debug)]
pub enum Event {
    /// A response or trailer header block.
    Headers(Vec<(String, String)>),
    /// One whole gRPC message.
    Packet(Packet),
    /// The server reset the stream with this error code.
    Reset(u32),
    /// The server ended the stream (END_STREAM).
    End,
}

/// One HTTP/2 connection to a gRPC frontend's Unix socket.
pub struct WireClient {
    io: UnixStream,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    read: BytesMut,
    /// Partial gRPC messages per stream.
    partial: HashMap<u32, BytesMut>,
    /// Events decoded, not yet returned.
    events: VecDeque<(u32, Event)>,
    /// Control frames (acknowledgements, window updates) to write before the next read.
    control: Vec<u8>,
}

impl WireClient {
    /// Connects and sends the connection preface with empty SETTINGS, as grpc-go does.
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let mut io = UnixStream::connect(socket).await?;
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        io.write_all(&hello).await?;
        Ok(WireClient {
            io,
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
            read: BytesMut::new(),
            partial: HashMap::new(),
            events: VecDeque::new(),
            control: Vec::new(),
        })
    }

    /// Opens stream `stream_id` with exactly `headers`, in one HEADERS frame.
    pub async fn open(
        &mut self,
        stream_id: u32,
        headers: &[(String, String)],
    ) -> anyhow::Result<()> {
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        self.io
            .write_all(&frame(HEADERS, END_HEADERS, stream_id, &block))
            .await?;
        Ok(())
    }

    /// Sends `packet` as one gRPC message (uncompressed) in one DATA frame.
    pub async fn send(&mut self, stream_id: u32, packet: &Packet) -> anyhow::Result<()> {
        let body = packet.encode_to_vec();
        let mut message = Vec::with_capacity(5 + body.len());
        message.push(0);
        message.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
        message.extend_from_slice(&body);
        self.io
            .write_all(&frame(DATA, 0, stream_id, &message))
            .await?;
        Ok(())
    }

    /// The next event on any stream, answering SETTINGS and PING on the way; `None` once the
    /// server closed the connection. A GOAWAY is an error.
    pub async fn next(&mut self) -> anyhow::Result<Option<(u32, Event)>> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(Some(event));
            }
            if self.decode_one()? {
                continue;
            }
            if !self.control.is_empty() {
                let control = std::mem::take(&mut self.control);
                self.io.write_all(&control).await?;
            }
            let n = tokio::time::timeout(FRAME_WAIT, self.io.read_buf(&mut self.read)).await??;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// The next event on `stream_id`, skipping other streams' events.
    pub async fn next_on(&mut self, stream_id: u32) -> anyhow::Result<Event> {
        loop {
            match self.next().await? {
                Some((id, event)) if id == stream_id => return Ok(event),
                Some(_) => {}
                None => anyhow::bail!("connection closed while waiting on stream {stream_id}"),
            }
        }
    }

    /// The next packet on `stream_id`; response headers before it are checked for status 200,
    /// trailers are an error.
    pub async fn packet(&mut self, stream_id: u32) -> anyhow::Result<Packet> {
        loop {
            match self.next_on(stream_id).await? {
                Event::Packet(packet) => return Ok(packet),
                Event::Headers(headers) => {
                    let status = field(&headers, ":status");
                    anyhow::ensure!(
                        status.is_none() || status == Some("200"),
                        "response {headers:?}"
                    );
                    if let Some(code) = field(&headers, "grpc-status") {
                        anyhow::bail!("stream ended with grpc-status {code}: {headers:?}");
                    }
                }
                other => anyhow::bail!("expected a packet on stream {stream_id}, got {other:?}"),
            }
        }
    }

    /// Takes one whole frame from the bytes read so far, turning it into events or control
    /// answers; false when no whole frame is there.
    fn decode_one(&mut self) -> anyhow::Result<bool> {
        if self.read.len() < 9 {
            return Ok(false);
        }
        let len = usize::from(self.read[0]) << 16
            | usize::from(self.read[1]) << 8
            | usize::from(self.read[2]);
        if self.read.len() < 9 + len {
            return Ok(false);
        }
        let kind = self.read[3];
        let flags = self.read[4];
        let stream_id =
            u32::from_be_bytes([self.read[5], self.read[6], self.read[7], self.read[8]])
                & 0x7fff_ffff;
        self.read.advance(9);
        let mut payload = self.read.split_to(len);
        match kind {
            SETTINGS if flags & ACK == 0 => self.control.extend(frame(SETTINGS, ACK, 0, &[])),
            PING if flags & ACK == 0 => self.control.extend(frame(PING, ACK, 0, &payload)),
            GOAWAY => {
                let code = (payload.len() >= 8)
                    .then(|| u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
                anyhow::bail!(
                    "GOAWAY {code:?}: {}",
                    String::from_utf8_lossy(payload.get(8..).unwrap_or_default())
                );
            }
            RST_STREAM => {
                anyhow::ensure!(payload.len() == 4, "RST_STREAM of {} bytes", payload.len());
                self.events
                    .push_back((stream_id, Event::Reset(payload.get_u32())));
            }
            HEADERS => {
                anyhow::ensure!(
                    flags & END_HEADERS != 0,
                    "the server split a header block (CONTINUATION is not read here)"
                );
                strip_padding(&mut payload, flags)?;
                if flags & PRIORITY != 0 {
                    anyhow::ensure!(payload.len() >= 5, "HEADERS too short for its priority");
                    payload.advance(5);
                }
                let headers = self
                    .decoder
                    .decode(&payload)
                    .map_err(|e| anyhow::anyhow!("response header block: {e:?}"))?
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect();
                self.events.push_back((stream_id, Event::Headers(headers)));
                if flags & END_STREAM != 0 {
                    self.partial.remove(&stream_id);
                    self.events.push_back((stream_id, Event::End));
                }
            }
            DATA => {
                strip_padding(&mut payload, flags)?;
                if len > 0 {
                    // Give the flow-control credit back at once: the tests read everything.
                    let credit = u32::try_from(len)?.to_be_bytes();
                    self.control.extend(frame(WINDOW_UPDATE, 0, 0, &credit));
                    self.control
                        .extend(frame(WINDOW_UPDATE, 0, stream_id, &credit));
                }
                let buffer = self.partial.entry(stream_id).or_default();
                buffer.extend_from_slice(&payload);
                while let Some(packet) = take_message(buffer)? {
                    self.events.push_back((stream_id, Event::Packet(packet)));
                }
                if flags & END_STREAM != 0 {
                    self.events.push_back((stream_id, Event::End));
                }
            }
            CONTINUATION => anyhow::bail!("unexpected CONTINUATION"),
            _ => {}
        }
        Ok(true)
    }
}

fn strip_padding(payload: &mut BytesMut, flags: u8) -> anyhow::Result<()> {
    if flags & PADDED != 0 {
        anyhow::ensure!(!payload.is_empty(), "padded frame without a pad length");
        let pad = usize::from(payload.get_u8());
        anyhow::ensure!(pad <= payload.len(), "padding exceeds the frame");
        payload.truncate(payload.len() - pad);
    }
    Ok(())
}

/// The value of `name` in a header list.
pub fn field<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// One gRPC message from the front of `buffer`, if whole.
fn take_message(buffer: &mut BytesMut) -> anyhow::Result<Option<Packet>> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    anyhow::ensure!(buffer[0] == 0, "compressed message flag {}", buffer[0]);
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < 5 + len {
        return Ok(None);
    }
    buffer.advance(5);
    let body: Bytes = buffer.split_to(len).freeze();
    Ok(Some(Packet::decode(body)?))
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(9 + payload.len());
    let len = payload.len() as u32;
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
    out.put_slice(payload);
    out.to_vec()
}
