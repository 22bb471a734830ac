//! gRPC over one hyper HTTP/2 connection at a time, for the konnectivity protocol's two
//! services: upstream agents' `AgentService/Connect` ([`crate::agents`]) and kube-apiserver's
//! `ProxyService/Proxy` ([`crate::frontends`]). Serving connection by connection keeps the
//! server's own accept loops, drain and force-close in charge, as for everything else.

use std::convert::Infallible;

use cplink_proto::keepalive::KeepaliveConfig;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Largest gRPC message accepted: a DATA packet carries at most what a peer read at once;
/// upstream peers read 32 KiB (agents) to 4 MiB (kube-apiserver's default gRPC limit).
pub(crate) const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Serves gRPC `service` on one HTTP/2 connection until the peer closes it. When `stop` fires
/// the connection sends GOAWAY and ends once its streams have.
pub(crate) async fn serve_connection<IO, S, B>(
    io: IO,
    service: S,
    stop: CancellationToken,
    keepalive: Option<KeepaliveConfig>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tonic::codegen::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // Each Proxy stream is one tunneled connection with its own window; the connection window
    // never binds (see `cplink_proto::CONNECTION_WINDOW`), so a client that stops reading one
    // stream holds back that stream only. `--max-tunnels` bounds how many there are at once.
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(cplink_proto::MAX_STREAMS_PER_LINK_LIMIT)
        .initial_stream_window_size(cplink_proto::STREAM_WINDOW)
        .initial_connection_window_size(cplink_proto::CONNECTION_WINDOW)
        .max_frame_size(cplink_proto::MAX_FRAME_SIZE);
    if let Some(keepalive) = keepalive {
        builder
            .keep_alive_interval(keepalive.interval)
            .keep_alive_timeout(keepalive.timeout);
    }
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, "gRPC connection ended with an error");
    }
}
