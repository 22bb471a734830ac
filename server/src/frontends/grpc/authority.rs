//! Normalizes the `:authority` of gRPC frontend requests before the HTTP/2 server reads them.
//!
//! kube-apiserver names the Unix socket's path as the authority of its Proxy requests: as it is
//! up to 1.28 (`/etc/kubernetes/…/konnectivity-server.socket`), percent-encoded from 1.29 on,
//! whose grpc-go (1.58 and later) escapes every byte an authority may not hold
//! (`%2Fetc%2Fkubernetes%2F…`). Neither is a valid authority (a `%` may not appear in a host),
//! and h2 refuses every such stream as malformed. [`AuthorityFix`] sits
//! between the socket and the HTTP/2 server: it passes every frame through unchanged except
//! header blocks, which it decodes (HPACK, keeping the client's dynamic table), rewrites an
//! invalid `:authority` to `localhost`, and encodes again (keeping the server's table in step).
//! Nothing routes on the authority: the destination travels in the DIAL_REQ packet.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames this adapter writes carry at most this much: the size every HTTP/2 peer accepts.
const MAX_OUT_FRAME: usize = 16 * 1024;
/// Largest header block accepted, all its frames together.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest frame payload passed through (the server's SETTINGS_MAX_FRAME_SIZE is lower).
const MAX_FRAME: usize = 1 << 20;
/// What an invalid authority becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// A header block being collected across HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
}

/// Reads from `inner` with invalid `:authority` values replaced; writes pass through.
pub(crate) struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from the client, not yet a whole frame.
    raw: BytesMut,
    /// Bytes ready for the server.
    out: BytesMut,
    preface_left: usize,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub(crate) fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            preface_left: PREFACE.len(),
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            eof: false,
        }
    }

    /// Moves every complete unit (preface bytes, frames) from `raw` to `out`.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            self.out.extend_from_slice(&self.raw.split_to(n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.raw.len() >= FRAME_HEADER_LEN {
            let len = usize::from(self.raw[0]) << 16
                | usize::from(self.raw[1]) << 8
                | usize::from(self.raw[2]);
            if len > MAX_FRAME {
                return Err(invalid(format!("frame of {len} bytes")));
            }
            if self.raw.len() < FRAME_HEADER_LEN + len {
                self.raw.reserve(FRAME_HEADER_LEN + len - self.raw.len());
                return Ok(());
            }
            let kind = self.raw[3];
            let flags = self.raw[4];
            let stream_id =
                u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                    & 0x7fff_ffff;
            let mut frame = self.raw.split_to(FRAME_HEADER_LEN + len);
            match (kind, &mut self.pending) {
                (HEADERS, None) => {
                    frame.advance(FRAME_HEADER_LEN);
                    self.start_block(frame, flags, stream_id)?;
                }
                (CONTINUATION, Some(block)) if block.stream_id == stream_id => {
                    frame.advance(FRAME_HEADER_LEN);
                    if block.fragment.len() + frame.len() > MAX_HEADER_BLOCK {
                        return Err(invalid("header block too large".into()));
                    }
                    block.fragment.extend_from_slice(&frame);
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                (_, Some(_)) => {
                    return Err(invalid("header block interrupted by another frame".into()));
                }
                (_, None) => self.out.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    fn start_block(&mut self, mut payload: BytesMut, flags: u8, stream_id: u32) -> io::Result<()> {
        let padding = if flags & PADDED != 0 {
            if payload.is_empty() {
                return Err(invalid("padded HEADERS without a pad length".into()));
            }
            usize::from(payload.get_u8())
        } else {
            0
        };
        let priority = if flags & PRIORITY != 0 {
            if payload.len() < 5 {
                return Err(invalid("HEADERS too short for its priority".into()));
            }
            let mut fields = [0u8; 5];
            payload.copy_to_slice(&mut fields);
            Some(fields)
        } else {
            None
        };
        if padding > payload.len() {
            return Err(invalid("HEADERS padding exceeds the frame".into()));
        }
        payload.truncate(payload.len() - padding);
        self.pending = Some(PendingBlock {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            fragment: payload,
        });
        if flags & END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    fn finish_block(&mut self) -> io::Result<()> {
        let Some(block) = self.pending.take() else {
            return Ok(());
        };
        let mut headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| invalid(format!("header block: {e}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                tracing::debug!(
                    authority = %String::from_utf8_lossy(value),
                    "invalid :authority from the client replaced"
                );
                *value = REPLACEMENT.to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.write_block(&block, &encoded);
        Ok(())
    }

    fn write_block(&mut self, block: &PendingBlock, encoded: &[u8]) {
        let priority_len = if block.priority.is_some() { 5 } else { 0 };
        let first_len = encoded.len().min(MAX_OUT_FRAME - priority_len);
        let (first, mut rest) = encoded.split_at(first_len);
        let mut flags = 0;
        if block.end_stream {
            flags |= END_STREAM;
        }
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame_header(priority_len + first.len(), HEADERS, flags, block.stream_id);
        if let Some(fields) = block.priority {
            self.out.extend_from_slice(&fields);
        }
        self.out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            self.frame_header(chunk.len(), CONTINUATION, flags, block.stream_id);
            self.out.extend_from_slice(chunk);
        }
    }

    fn frame_header(&mut self, len: usize, kind: u8, flags: u8, stream_id: u32) {
        // `len` is at most MAX_OUT_FRAME, well within 24 bits.
        let len = len as u32;
        self.out.put_u8((len >> 16) as u8);
        self.out.put_u8((len >> 8) as u8);
        self.out.put_u8(len as u8);
        self.out.put_u8(kind);
        self.out.put_u8(flags);
        self.out.put_u32(stream_id);
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                if this.out.is_empty() {
                    // Hold no buffer while the connection is idle.
                    this.out = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.raw.capacity() - this.raw.len() < 1024 {
                this.raw.reserve(8 * 1024);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.raw
            ))?;
            if n == 0 {
                // Whatever is left is an incomplete frame: the server sees it cut short.
                let rest = this.raw.split();
                this.out.extend_from_slice(&rest);
                this.eof = true;
                continue;
            }
            this.process()?;
            if this.raw.is_empty() {
                this.raw = BytesMut::new();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Request headers as a grpc-go client of kube-apiserver 1.20's day sends them to a socket.
    fn request_headers(encoder: &mut loona_hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/ProxyService/Proxy"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    /// An h2 server behind the adapter takes requests whose authority is a socket path, in
    /// one HEADERS frame, padded with a priority, split across CONTINUATION frames, and
    /// percent-encoded; the dynamic table stays in step from one request to the next.
    #[tokio::test]
    async fn a_socket_path_authority_reaches_h2_as_localhost() {
        let (mut client, server_io) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(AuthorityFix::new(server_io))
                .await
                .unwrap();
            let mut seen = Vec::new();
            while let Some(request) = connection.accept().await {
                let (request, mut respond) = request.unwrap();
                seen.push((
                    request.uri().authority().map(|a| a.to_string()),
                    request.uri().path().to_owned(),
                ));
                let response = http::Response::new(());
                respond.send_response(response, true).unwrap();
                if seen.len() == 4 {
                    break;
                }
            }
            seen
        });

        let mut encoder = loona_hpack::Encoder::new();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let path = b"/etc/kubernetes/konnectivity-server/konnectivity-server.socket";
        let block = request_headers(&mut encoder, path);
        wire.extend(frame(HEADERS, END_HEADERS, 1, &block));
        // Padded, with priority fields.
        let block = request_headers(&mut encoder, path);
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0, 0, 0]);
        wire.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 3, &payload));
        // Split across a CONTINUATION frame, with a valid authority left alone.
        let block = request_headers(&mut encoder, b"cplink.example:8090");
        let (a, b) = block.split_at(block.len() / 2);
        wire.extend(frame(HEADERS, 0, 5, a));
        wire.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        // The path percent-encoded, as grpc-go 1.58 and later send it.
        let encoded = b"%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket";
        let block = request_headers(&mut encoder, encoded);
        wire.extend(frame(HEADERS, END_HEADERS, 7, &block));
        client.write_all(&wire).await.unwrap();

        let seen = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (
                    Some("localhost".to_owned()),
                    "/ProxyService/Proxy".to_owned()
                ),
                (
                    Some("localhost".to_owned()),
                    "/ProxyService/Proxy".to_owned()
                ),
                (
                    Some("cplink.example:8090".to_owned()),
                    "/ProxyService/Proxy".to_owned()
                ),
                (
                    Some("localhost".to_owned()),
                    "/ProxyService/Proxy".to_owned()
                ),
            ]
        );
    }

    /// What makes the adapter necessary: both forms kube-apiserver sends are refused by the
    /// `http` crate h2 validates authorities with, so both are rewritten.
    #[test]
    fn neither_form_of_the_socket_path_is_a_valid_authority() {
        let forms: [&[u8]; 2] = [
            b"/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
            b"%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket",
        ];
        for form in forms {
            assert!(
                http::uri::Authority::try_from(form).is_err(),
                "{}",
                String::from_utf8_lossy(form)
            );
        }
    }

    #[test]
    fn data_frames_pass_untouched_and_broken_blocks_are_errors() {
        let mut fix = AuthorityFix::new(tokio::io::empty());
        fix.raw.extend_from_slice(PREFACE);
        let data = frame(0x0, END_STREAM, 1, b"payload");
        fix.raw.extend_from_slice(&data);
        fix.process().unwrap();
        let mut expected = PREFACE.to_vec();
        expected.extend_from_slice(&data);
        assert_eq!(fix.out, Bytes::from(expected));

        // A DATA frame in the middle of a header block is a protocol violation.
        fix.raw.extend_from_slice(&frame(HEADERS, 0, 3, &[0x82]));
        fix.raw.extend_from_slice(&frame(0x0, 0, 3, b"x"));
        assert!(fix.process().is_err());
    }
}
