//! The operator's admin HTTP server: `/healthz`, `/readyz` and `/metrics`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the admin endpoints report.
#[derive(Debug, Clone, Default)]
pub struct AdminState {
    /// Rendered on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Set once the controller's watches have synced; `/readyz` answers 503 until then.
    pub ready: Arc<AtomicBool>,
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// Answers one admin request.
pub fn route<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
            PLAIN,
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "controller not started\n",
            PLAIN,
        ),
        "/metrics" => match state.metrics.encode() {
            Ok(body) => text(
                StatusCode::OK,
                body,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
                PLAIN,
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n", PLAIN),
    }
}

/// First pause after a failed accept.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);
/// Longest pause between failed accepts.
const MAX_ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves admin requests on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let mut pause = ACCEPT_PAUSE;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Accept errors (e.g. EMFILE) must not end the server, nor spin it: pause,
                    // longer while they last, and log each pause once.
                    tracing::warn!(%error, pause = ?pause, "admin accept failed");
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_ACCEPT_PAUSE);
                    continue;
                }
            },
        };
        pause = ACCEPT_PAUSE;
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = route(&state, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, %peer, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[test]
    fn readiness_follows_the_controller_and_health_is_unconditional() {
        let state = AdminState::default();
        assert_eq!(route(&state, &get("/healthz")).status(), StatusCode::OK);
        assert_eq!(
            route(&state, &get("/readyz")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(route(&state, &get("/readyz")).status(), StatusCode::OK);
        assert_eq!(route(&state, &get("/nope")).status(), StatusCode::NOT_FOUND);
        let post = Request::post("/healthz").body(()).expect("request");
        assert_eq!(
            route(&state, &post).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn metrics_are_served_over_http_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = AdminState::default();
        drop(state.metrics.reconcile_started());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));

        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("cplink_operator_reconciles_total 1"),
            "{response}"
        );

        stop.send(()).expect("server running");
        server.await.expect("joins").expect("serves cleanly");
    }
}
