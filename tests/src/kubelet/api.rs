//! The kubelet API of a simulated node, as far as kube-apiserver needs it here: `GET /healthz`
//! and `GET /containerLogs/{namespace}/{pod}/{container}` (`follow`, `tailLines`, `timestamps`,
//! `previous`), over TLS with client certificates of the cluster CA, on `<node-ip>:10250`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::logs::{Logs, ReadOptions};

type Body = BoxBody<Bytes, std::io::Error>;

/// Serves the kubelet API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    logs: Arc<Logs>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "kubelet accept failed");
                    // Out of descriptors, most likely: pause instead of spinning on it.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let logs = Arc::clone(&logs);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%err, "kubelet TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |req| {
                let response = respond(&req, &logs);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%err, "kubelet connection failed");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn respond(req: &Request<Incoming>, logs: &Logs) -> Response<Body> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
    }
    let path = req.uri().path();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok".into());
    }
    let Some(rest) = path.strip_prefix("/containerLogs/") else {
        return text(StatusCode::NOT_FOUND, format!("{path}: not found\n"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let [namespace, pod, container] = parts[..] else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected /containerLogs/{namespace}/{pod}/{container}\n".into(),
        );
    };
    let options = match read_options(req.uri().query().unwrap_or_default()) {
        Ok(options) => options,
        Err(message) => return text(StatusCode::BAD_REQUEST, format!("{message}\n")),
    };
    let Some(log) = logs.find(namespace, pod, container) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} in pod {namespace}/{pod} is not on this node\n"),
        );
    };
    let reader = match log.read(options) {
        Ok(reader) => reader,
        Err(err) => return text(StatusCode::BAD_REQUEST, format!("{err}\n")),
    };
    let chunks = futures_util::stream::unfold(reader, |mut reader| async move {
        let chunk = reader.next().await?;
        Some((chunk.map(Frame::data), reader))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The query of a `containerLogs` request.
fn read_options(query: &str) -> Result<ReadOptions, String> {
    let mut options = ReadOptions::default();
    let flag = |value: &str| matches!(value, "" | "1" | "true" | "True");
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "follow" => options.follow = flag(value),
            "timestamps" => options.timestamps = flag(value),
            "previous" => options.previous = flag(value),
            "tailLines" => {
                options.tail_lines = Some(
                    value
                        .parse()
                        .map_err(|_| format!("tailLines={value}: not a count of lines"))?,
                );
            }
            _ => {}
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_queries_parse_and_bad_counts_are_refused() {
        let o = read_options("follow=true&tailLines=5&timestamps=1").unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(o.tail_lines, Some(5));
        let o = read_options("previous=false&limitBytes=10").unwrap();
        assert!(!o.previous && !o.follow && o.tail_lines.is_none());
        let err = read_options("tailLines=-2").unwrap_err();
        assert!(err.contains("tailLines=-2"), "{err}");
    }
}
