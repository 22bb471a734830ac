//! CONNECT frontends for kube-apiserver's egress selector: TCP with mutual TLS, and a Unix socket.

use std::sync::Arc;

use cplink_proto::konnectivity::mux;
use cplink_proto::pump::{self, Buffered, ReadChunk};
use cplink_runtime::accept::Pending;
use cplink_runtime::net::{abort_tcp, abort_tcp_after_sent};
use cplink_runtime::readahead::ReadAhead;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::connect::{self, ConnectError};
use super::count_request_error;
use crate::Shared;
use crate::metrics::FrontendLabels;
use crate::tunnel::{self, Carried};

/// A frontend connection, once its transport handshake is done.
pub(crate) trait FrontendStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Read side, after the CONNECT head.
    type Reader: ReadChunk + 'static;
    /// Write side, after the CONNECT head.
    type Writer: AsyncWrite + Unpin + Send + 'static;
    /// Splits for the bidirectional pump.
    fn split(self) -> (Self::Reader, Self::Writer);
    /// Closes the connection so that the client sees an error rather than a clean end.
    fn abort(reader: Self::Reader, writer: Self::Writer);
    /// [`FrontendStream::abort`] once the bytes already written have been sent, where the
    /// transport can tell.
    fn abort_after_sent(
        reader: Self::Reader,
        writer: Self::Writer,
    ) -> impl std::future::Future<Output = ()> + Send {
        Self::abort(reader, writer);
        std::future::ready(())
    }
}

impl FrontendStream for UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;

    fn split(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    fn abort(reader: Self::Reader, writer: Self::Writer) {
        // A Unix socket has no reset; closing without the pending half-close is the closest.
        writer.forget();
        drop(reader);
    }
}

/// A TLS connection, boxed: rustls' connection state is over a kilobyte, and a connection's task
/// would otherwise carry a copy of its size at every step that once held it by value (the
/// handshake, the CONNECT head, the pump), for as long as the connection lives.
type FrontendTls = Box<TlsStream<ReadAhead<TcpStream>>>;

impl FrontendStream for FrontendTls {
    type Reader = Buffered<ReadHalf<FrontendTls>>;
    type Writer = WriteHalf<FrontendTls>;

    fn split(self) -> (Self::Reader, Self::Writer) {
        let (reader, writer) = tokio::io::split(self);
        (Buffered(reader), writer)
    }

    fn abort(reader: Self::Reader, writer: Self::Writer) {
        // Reset the TCP connection without close_notify: the client sees a failed stream.
        let tls = reader.0.unsplit(writer);
        abort_tcp(tls.into_inner().0.into_inner());
    }

    async fn abort_after_sent(reader: Self::Reader, writer: Self::Writer) {
        // A statement of its own: a temporary of the awaiting statement (the unboxed TLS
        // stream) would be kept in the task's state for as long as the await lasts.
        let tcp = reader.0.unsplit(writer).into_inner().0.into_inner();
        abort_tcp_after_sent(tcp, pump::ABORT_LINGER).await;
    }
}

/// Accepts TLS frontend connections until `stop` is cancelled.
pub(crate) async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    connections: TaskTracker,
    stop: CancellationToken,
    force: CancellationToken,
) {
    let accepting = shared.acceptor("frontend");
    while let Some(((tcp, peer), pending)) = accepting.next(|| listener.accept(), &stop).await {
        cplink_runtime::net::tune_stream(&tcp);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let force = force.clone();
        connections.spawn(
            async move {
                let budget = shared.config.header_timeout;
                let tls = match tokio::time::timeout(budget, acceptor.accept(ReadAhead::new(tcp))).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        count_request_error(&shared, "tls");
                        tracing::info!(%err, "frontend TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        count_request_error(&shared, "tls_timeout");
                        tracing::info!("frontend TLS handshake timed out");
                        return;
                    }
                };
                tokio::select! {
                    () = serve(&shared, Box::new(tls), "tls", pending) => {}
                    () = force.cancelled() => tracing::info!("drain deadline reached: connection cut"),
                }
            }
            .instrument(tracing::info_span!("frontend", %peer)),
        );
    }
}

/// Accepts Unix socket frontend connections until `stop` is cancelled.
pub(crate) async fn accept_uds(
    listener: UnixListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    stop: CancellationToken,
    force: CancellationToken,
) {
    let acceptor = shared.acceptor("frontend-uds");
    while let Some(((stream, _), pending)) = acceptor.next(|| listener.accept(), &stop).await {
        let shared = shared.clone();
        let force = force.clone();
        connections.spawn(
            async move {
                tokio::select! {
                    () = serve(&shared, stream, "uds", pending) => {}
                    () = force.cancelled() => tracing::info!("drain deadline reached: connection cut"),
                }
            }
            .instrument(tracing::info_span!("frontend", peer = "uds")),
        );
    }
}

/// Serves one frontend connection: CONNECT head, dial, answer, then pump until done.
async fn serve<S: FrontendStream>(
    shared: &Shared,
    mut stream: S,
    frontend: &'static str,
    pending: Pending,
) {
    let metrics = &shared.metrics;
    metrics
        .frontend_connections
        .get_or_create(&FrontendLabels { frontend })
        .inc();

    // In a block of its own, so that the request's head is not kept for the tunnel's life.
    let (target, leftover) = {
        let head = tokio::time::timeout(
            shared.config.header_timeout,
            connect::read_request(&mut stream),
        )
        .await
        .unwrap_or(Err(ConnectError::Timeout));
        drop(pending);
        match head {
            Ok(request) => (request.target, request.leftover),
            Err(err) => {
                count_request_error(shared, err.kind());
                tracing::info!(%err, "frontend request refused");
                if let Some(status) = err.status() {
                    reply_and_close(
                        &mut stream,
                        &connect::error_response(status, &err.to_string()),
                    )
                    .await;
                }
                return;
            }
        }
    };

    let span = tracing::info_span!("dial", dest = %target, agent_id = tracing::field::Empty);
    async move {
        let tunnel = match tunnel::open_counted(shared, &target, frontend).await {
            Ok(tunnel) => tunnel,
            Err(failure) => {
                let response = connect::error_response(failure.status(), &failure.reason_line());
                reply_and_close(&mut stream, &response).await;
                return;
            }
        };

        // Written only now that the destination is connected; nothing else is sent until the
        // client speaks.
        if let Err(err) = write_all_flush(&mut stream, connect::ESTABLISHED).await {
            tracing::info!(%err, "frontend left before the tunnel was established");
            return;
        }
        let _active = pump::ActiveStream::new(&metrics.streams_active);
        let (mut reader, mut writer) = stream.split();
        let counted = tunnel::counted(&metrics.bytes, &tunnel.tracked, &tunnel.route);
        let result = match tunnel.carried {
            Carried::H2 { send, recv } => {
                pump::pump(&mut reader, &mut writer, send, recv, leftover, &counted)
                    .await
                    .map_err(|e| (e.to_string(), e.delivered_then_aborted()))
            }
            // Boxed: its state is larger than the native pump's, and every connection's task
            // would carry that size, upstream agent or not.
            Carried::Mux(mut conn) => Box::pin(mux::pump(
                &mut reader,
                &mut writer,
                &mut conn,
                leftover,
                &counted,
                tunnel::CLOSE_LINGER,
            ))
            .await
            .map_err(|e| (e.to_string(), false)),
        };
        match result {
            Ok(stats) => tracing::debug!(
                to_agent = stats.socket_to_stream,
                from_agent = stats.stream_to_socket,
                "tunnel closed"
            ),
            Err((err, true)) => {
                tracing::info!(%err, "tunnel aborted after its bytes were written");
                S::abort_after_sent(reader, writer).await;
            }
            Err((err, false)) => {
                tracing::info!(%err, "tunnel aborted");
                S::abort(reader, writer);
            }
        }
        drop(tunnel.route);
    }
    .instrument(span)
    .await;
}

async fn write_all_flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn reply_and_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
    let write = async {
        write_all_flush(stream, response).await?;
        stream.shutdown().await?;
        // Lingering close: take in what the client already sent (up to a bound), so that
        // closing with unread input does not reset the connection before the answer is read.
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut (&mut *stream).take(64 * 1024), &mut sink).await?;
        std::io::Result::Ok(())
    };
    // A client that does not read its answer or never stops sending must not hold the
    // connection open.
    if let Ok(Err(err)) = tokio::time::timeout(std::time::Duration::from_secs(2), write).await {
        tracing::debug!(%err, "could not deliver the error answer");
    }
}
