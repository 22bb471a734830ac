//! How many agents each server pod has linked, read from the pod's admin endpoint
//! (`GET /metrics`, gauge `cplink_server_agents_linked`) over plain HTTP with a short timeout.
//!
//! Advisory, like Events: a pod that does not answer in time is reported without a count, and
//! nothing here can fail a reconcile.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future::join_all;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use tokio::net::TcpStream;

use crate::crd::ServerLinks;

/// The server gauge counting linked agents.
pub const AGENTS_LINKED_METRIC: &str = "cplink_server_agents_linked";
/// How long one server pod may take to answer, connection included.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest metrics page read; a server's is a few KiB.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Why a server pod's count could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No connection to the admin endpoint.
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (never for a socket address).
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// The endpoint answered with something other than 200.
    #[error("answered {0}")]
    Status(StatusCode),
    /// The page was larger than we read or not UTF-8.
    #[error("unreadable metrics page")]
    Body,
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The page has no `cplink_server_agents_linked` sample.
    #[error("no {AGENTS_LINKED_METRIC} sample")]
    NoSample,
}

/// The value of the `cplink_server_agents_linked` gauge in an OpenMetrics page.
pub fn agents_linked(metrics: &str) -> Option<i64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(AGENTS_LINKED_METRIC)?;
        // The gauge has no labels; anything else is another metric sharing the prefix.
        let value = rest.strip_prefix(' ')?;
        let value: f64 = value.split_whitespace().next()?.parse().ok()?;
        // A gauge of linked agents is a small whole number.
        value
            .is_finite()
            .then(|| value.round())
            .filter(|v| *v >= 0.0 && *v <= i64::MAX as f64)
            .map(|v| v as i64)
    })
}

/// `GET /metrics` of `address`, the body of a 200.
pub async fn fetch_metrics(address: SocketAddr) -> Result<String, ScrapeError> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(ScrapeError::Connect)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let exchange = async move {
        let request = Request::get("/metrics")
            .header(http::header::HOST, address.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(ScrapeError::Status(response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|_| ScrapeError::Body)?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| ScrapeError::Body)
    };
    // The connection must be polled for the exchange to make progress. It may finish first
    // (the server closed after answering): what it read is already handed to the exchange.
    tokio::pin!(exchange);
    tokio::select! {
        result = &mut exchange => return result,
        closed = connection => closed?,
    }
    exchange.await
}

/// The linked-agent count of the server at `address`, within `timeout`.
pub async fn count(address: SocketAddr, timeout: Duration) -> Result<i64, ScrapeError> {
    let page = tokio::time::timeout(timeout, fetch_metrics(address))
        .await
        .map_err(|_| ScrapeError::TimedOut(timeout))??;
    agents_linked(&page).ok_or(ScrapeError::NoSample)
}

/// The server pods worth asking: running, with an address, not on their way out (a
/// terminating server is draining and no longer counts).
fn running_address(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// Asks every running pod of `pods` on `admin_port` at once; one entry per pod, sorted by
/// name, without a count where the pod did not answer.
pub async fn linked_agents(pods: &[Pod], admin_port: u16, timeout: Duration) -> Vec<ServerLinks> {
    let asks = pods.iter().filter_map(|pod| {
        let ip = running_address(pod)?;
        let name = pod.name_any();
        Some(async move {
            let agents = match count(SocketAddr::new(ip, admin_port), timeout).await {
                Ok(agents) => Some(agents),
                Err(error) => {
                    tracing::info!(pod = %name, %ip, %error, "cannot read the server's linked agents");
                    None
                }
            };
            ServerLinks { pod: name, agents }
        })
    });
    let mut links = join_all(asks).await;
    links.sort_by(|a, b| a.pod.cmp(&b.pod));
    links
}

/// A stand-in for a server's admin endpoint.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// Answers every connection on a loopback port with `status` and `body`, or never
    /// answers when `status` is 0; returns the address.
    pub(crate) async fn admin_endpoint(status: u16, body: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = socket.read(&mut request).await;
                    if status == 0 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        address
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::admin_endpoint;
    use super::*;

    const PAGE: &str = "# HELP cplink_server_agents_linked Agents currently linked.\n\
                        # TYPE cplink_server_agents_linked gauge\n\
                        cplink_server_agents_linked_total_bogus 9\n\
                        cplink_server_agents_linked 4\n\
                        cplink_server_streams_active 0\n# EOF\n";

    fn pod(name: &str, phase: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"phase": phase, "podIP": ip},
        }))
        .expect("pod")
    }

    #[test]
    fn the_gauge_is_read_and_lookalike_metrics_are_not() {
        assert_eq!(agents_linked(PAGE), Some(4));
        assert_eq!(agents_linked("cplink_server_agents_linked 0\n"), Some(0));
        assert_eq!(agents_linked("cplink_server_agents_linked_x 3\n"), None);
        assert_eq!(agents_linked("cplink_server_agents_linked NaN\n"), None);
        assert_eq!(agents_linked("cplink_server_agents_linked -1\n"), None);
        assert_eq!(agents_linked(""), None);
    }

    #[tokio::test]
    async fn a_server_answering_its_metrics_reports_its_count() {
        let address = admin_endpoint(200, PAGE).await;
        assert_eq!(count(address, SCRAPE_TIMEOUT).await.expect("count"), 4);
    }

    #[tokio::test]
    async fn errors_silence_and_missing_samples_are_errors_within_the_timeout() {
        let refused = admin_endpoint(503, "not ready\n").await;
        assert!(matches!(
            count(refused, SCRAPE_TIMEOUT).await,
            Err(ScrapeError::Status(StatusCode::SERVICE_UNAVAILABLE))
        ));
        let empty = admin_endpoint(200, "# EOF\n").await;
        assert!(matches!(
            count(empty, SCRAPE_TIMEOUT).await,
            Err(ScrapeError::NoSample)
        ));
        let silent = admin_endpoint(0, "").await;
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(200);
        assert!(matches!(
            count(silent, timeout).await,
            Err(ScrapeError::TimedOut(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn every_running_pod_is_listed_by_name_and_those_not_answering_without_a_count() {
        let answering = admin_endpoint(200, PAGE).await;
        // Bound on 127.0.0.1 only: the same port on 127.0.0.2 refuses.
        let pods = vec![
            pod("server-b", "Running", Some("127.0.0.2")),
            pod("server-a", "Running", Some("127.0.0.1")),
            pod("server-pending", "Pending", None),
            pod("server-no-ip", "Running", None),
        ];
        let links = linked_agents(&pods, answering.port(), SCRAPE_TIMEOUT).await;
        assert_eq!(
            links,
            [
                ServerLinks {
                    pod: "server-a".into(),
                    agents: Some(4)
                },
                ServerLinks {
                    pod: "server-b".into(),
                    agents: None
                },
            ]
        );
        let mut leaving = pod("server-c", "Running", Some("127.0.0.1"));
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(
            linked_agents(&[leaving], answering.port(), SCRAPE_TIMEOUT)
                .await
                .is_empty(),
            "a terminating server is draining and not listed"
        );
    }
}
