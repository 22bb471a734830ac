//! The admin HTTP endpoint: `/healthz`, `/readyz` and `/metrics`, and, where a binary enables
//! them, its read-only `/debug/...` views (see [`crate::introspect`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::Acceptor;

/// Admin connections open at once, at most.
const MAX_CONNECTIONS: usize = 64;

/// Content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers readiness questions for `/readyz`.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok(())` when ready, otherwise why not.
    fn check(&self) -> Result<(), String>;
}

impl<F> Readiness for F
where
    F: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    fn check(&self) -> Result<(), String> {
        self()
    }
}

/// A debug view's answer, ready to send.
pub type DebugFuture = Pin<Box<dyn Future<Output = DebugReply> + Send + 'static>>;

/// Serves the `/debug/...` paths of a binary: JSON views of its state, read-only.
pub trait Introspect: Send + Sync + 'static {
    /// Answers `GET /debug/{path}` with the raw `query` string (after `?`), or `None` for a
    /// path it does not serve.
    fn get(&self, path: &str, query: &str) -> Option<DebugFuture>;
}

/// What a debug view answers: a status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugReply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: Bytes,
}

impl DebugReply {
    /// `200` with `value` as JSON.
    pub fn json<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(mut body) => {
                body.push(b'\n');
                DebugReply {
                    status: StatusCode::OK,
                    body: Bytes::from(body),
                }
            }
            Err(err) => DebugReply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the answer: {err}"),
            ),
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        let info = crate::introspect::ErrorInfo {
            error: message.into(),
        };
        let mut body = serde_json::to_vec(&info).unwrap_or_default();
        body.push(b'\n');
        DebugReply {
            status,
            body: Bytes::from(body),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        // The views change from one request to the next; a proxy must not serve an old one.
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        }
        response
    }
}

/// Ready once `flag` is set (with `Release` ordering); until then not ready, for `reason`.
pub fn ready_when_set(flag: Arc<AtomicBool>, reason: &'static str) -> impl Readiness {
    move || {
        if flag.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(reason.to_owned())
        }
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Registry>,
    readiness: Arc<dyn Readiness>,
    shutdown: CancellationToken,
) {
    serve_with_debug(listener, metrics, readiness, None, shutdown).await;
}

/// [`serve`], with the `/debug/...` views of `debug` when given; without, `/debug/...` is
/// `404`, saying the views are off.
pub async fn serve_with_debug(
    listener: TcpListener,
    metrics: Arc<Registry>,
    readiness: Arc<dyn Readiness>,
    debug: Option<Arc<dyn Introspect>>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    // Probes and scrapes are few and short; the cap keeps a flood from taking every descriptor.
    let acceptor = Acceptor::new("admin", MAX_CONNECTIONS, Counter::default());
    while let Some(((stream, _), held)) = acceptor.next(|| listener.accept(), &shutdown).await {
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let debug = debug.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _held = held;
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = match debug_path(&req) {
                    Some(path) => Answer::Later(debug_reply(&req, path, debug.as_deref())),
                    None => Answer::Now(respond(&req, &metrics, readiness.as_ref())),
                };
                async move {
                    Ok::<_, Infallible>(match answer {
                        Answer::Now(response) => response,
                        Answer::Later(reply) => reply.await.into_response(),
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%err, "admin connection failed");
                    }
                }
                () = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// An answer known at once, or one a debug view is working out.
enum Answer {
    Now(Response<Full<Bytes>>),
    Later(DebugFuture),
}

/// The part of the path after `/debug/`, for a debug view.
fn debug_path<B>(req: &Request<B>) -> Option<&str> {
    req.uri().path().strip_prefix("/debug/")
}

/// Answers a `/debug/...` request: only `GET`, only when the views are on.
fn debug_reply<B>(req: &Request<B>, path: &str, debug: Option<&dyn Introspect>) -> DebugFuture {
    let ready = |reply: DebugReply| -> DebugFuture { Box::pin(std::future::ready(reply)) };
    if req.method() != Method::GET {
        return ready(DebugReply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the debug views are read-only: only GET is supported",
        ));
    }
    let Some(debug) = debug else {
        return ready(DebugReply::error(
            StatusCode::NOT_FOUND,
            "the debug views are off (--debug-endpoints)",
        ));
    };
    match debug.get(path, req.uri().query().unwrap_or("")) {
        Some(reply) => reply,
        None => ready(DebugReply::error(
            StatusCode::NOT_FOUND,
            format!("no debug view /debug/{path}"),
        )),
    }
}

fn respond<B>(
    req: &Request<B>,
    metrics: &Registry,
    readiness: &dyn Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, metrics) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(OPENMETRICS),
                    );
                    response
                }
                Err(err) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {err}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn readiness_follows_the_check_and_health_is_unconditional() {
        let metrics = Registry::default();
        let ready = Arc::new(AtomicBool::new(false));
        let readiness = ready_when_set(ready.clone(), "not started");
        let status = |req: &Request<()>| respond(req, &metrics, &readiness).status();
        assert_eq!(status(&get("/healthz")), StatusCode::OK);
        assert_eq!(status(&get("/readyz")), StatusCode::SERVICE_UNAVAILABLE);
        ready.store(true, Ordering::Release);
        assert_eq!(status(&get("/readyz")), StatusCode::OK);
        assert_eq!(status(&get("/nope")), StatusCode::NOT_FOUND);
        let post = Request::post("/healthz").body(()).unwrap();
        assert_eq!(status(&post), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn not_ready_says_why() {
        use http_body_util::BodyExt as _;

        let response = respond(
            &get("/readyz"),
            &Registry::default(),
            &ready_when_set(Arc::default(), "not started"),
        );
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "not ready: not started\n");
    }

    /// Answers `/debug/echo` with its query.
    struct Echo;

    impl Introspect for Echo {
        fn get(&self, path: &str, query: &str) -> Option<DebugFuture> {
            let query = query.to_owned();
            (path == "echo").then(|| {
                Box::pin(async move { DebugReply::json(&serde_json::json!({ "query": query })) })
                    as DebugFuture
            })
        }
    }

    async fn debug(
        method: Method,
        path: &str,
        views: Option<&dyn Introspect>,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        use http_body_util::BodyExt as _;

        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let response = debug_reply(&req, debug_path(&req).unwrap(), views)
            .await
            .into_response();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&body).unwrap(),
        )
    }

    #[tokio::test]
    async fn debug_views_are_json_read_only_and_off_unless_given() {
        let (status, headers, body) = debug(Method::GET, "/debug/echo?limit=2", Some(&Echo)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(body, serde_json::json!({ "query": "limit=2" }));

        for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
            let (status, headers, body) = debug(method.clone(), "/debug/echo", Some(&Echo)).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(headers[header::ALLOW], "GET");
            assert!(
                body["error"].as_str().unwrap().contains("read-only"),
                "{body}"
            );
        }

        let (status, _, body) = debug(Method::GET, "/debug/nope", Some(&Echo)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no debug view /debug/nope");

        let (status, _, body) = debug(Method::GET, "/debug/echo", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "the debug views are off (--debug-endpoints)");
    }

    #[tokio::test]
    async fn metrics_are_served_over_http_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::with_prefix("cplink_test");
        let reconciles = Counter::<u64>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        reconciles.inc();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(registry),
            Arc::new(|| Ok(())),
            shutdown.clone(),
        ));

        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("content-type: application/openmetrics-text"),
            "{response}"
        );
        assert!(
            response.contains("cplink_test_reconciles_total 1"),
            "{response}"
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops on shutdown")
            .unwrap();
    }
}
