//! A read-ahead buffer under TLS.
//!
//! rustls pulls ciphertext from its transport 4 KiB at a time, which turns a bulk transfer into
//! one `recv` per 4 KiB. [`ReadAhead`] reads the socket in large chunks instead and hands rustls
//! its small pieces from memory. The buffer exists only while there is unread data: an idle
//! connection holds none, and
//! neither does one that exchanges small messages; a bulk transfer keeps its buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Size of the reads issued on the transport.
pub const READ_AHEAD: usize = 64 * 1024;

/// Wraps a transport so that its reads are [`READ_AHEAD`] bytes at a time; writes pass through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    io: S,
    buf: BytesMut,
    /// The last read filled at least half the buffer: a bulk transfer, keep the buffer.
    bulk: bool,
}

impl<S> ReadAhead<S> {
    /// Wraps `io`.
    pub fn new(io: S) -> Self {
        ReadAhead {
            io,
            buf: BytesMut::new(),
            bulk: false,
        }
    }

    /// The transport.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The transport; bytes read ahead and not yet consumed are dropped.
    pub fn into_inner(self) -> S {
        self.io
    }

    fn release(&mut self) {
        self.buf = BytesMut::new();
        self.bulk = false;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // A caller asking for a lot gets it straight from the transport.
            if out.remaining() >= READ_AHEAD {
                this.release();
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.reserve(READ_AHEAD);
            match poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Idle between chatty exchanges: hold no memory while waiting.
                    if !this.bulk {
                        this.release();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => {
                    this.release();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => this.bulk = n >= READ_AHEAD / 2,
                Poll::Ready(Err(err)) => {
                    this.release();
                    return Poll::Ready(Err(err));
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    crate::forward_async_write!(io);
}

/// Implements every method of [`AsyncWrite`] inside an `impl AsyncWrite for Wrapper` by passing
/// it on to the wrapper's field `$field`, for wrappers that change only how a transport is read
/// (an `Unpin` wrapper around an `AsyncWrite + Unpin` transport). Vectored writes pass on too:
/// a wrapper that forgot them would turn every vectored write into one write per slice.
#[macro_export]
macro_rules! forward_async_write {
    ($field:ident) => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::tokio::io::AsyncWrite::poll_write(::std::pin::Pin::new(&mut self.$field), cx, buf)
        }

        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::tokio::io::AsyncWrite::poll_write_vectored(
                ::std::pin::Pin::new(&mut self.$field),
                cx,
                bufs,
            )
        }

        fn is_write_vectored(&self) -> bool {
            ::tokio::io::AsyncWrite::is_write_vectored(&self.$field)
        }

        fn poll_flush(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::tokio::io::AsyncWrite::poll_flush(::std::pin::Pin::new(&mut self.$field), cx)
        }

        fn poll_shutdown(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::tokio::io::AsyncWrite::poll_shutdown(::std::pin::Pin::new(&mut self.$field), cx)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            far.write_all(&data).await.unwrap();
            far.shutdown().await.unwrap();
        });
        let mut reader = ReadAhead::new(near);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = reader.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, expected);
        assert!(reader.buf.capacity() == 0, "no buffer held after the end");
    }

    #[tokio::test]
    async fn large_reads_bypass_the_buffer_and_writes_pass_through() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut ahead = ReadAhead::new(near);
        far.write_all(&[7u8; 1000]).await.unwrap();
        let mut big = vec![0u8; READ_AHEAD];
        let n = ahead.read(&mut big).await.unwrap();
        assert_eq!(&big[..n], &[7u8; 1000][..n]);
        assert_eq!(ahead.buf.capacity(), 0);
        ahead.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (_far, near) = tokio::io::duplex(1024);
        let mut ahead = ReadAhead::new(near);
        let mut small = [0u8; 16];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = ReadBuf::new(&mut small);
        assert!(
            Pin::new(&mut ahead)
                .poll_read(&mut cx, &mut out)
                .is_pending()
        );
        assert_eq!(ahead.buf.capacity(), 0);
    }
}
