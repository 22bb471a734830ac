//! The pod ranges of the agent's Node (`spec.podCIDRs`), read once at start-up.

use std::time::Duration;

use cplink_runtime::kubeapi::KubeApi;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::config::BackoffConfig;

/// Why the Node's pod ranges are not known.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    /// The API answered that there is no such Node.
    #[error("node {0} not found")]
    NotFound(String),
    /// The API could not be asked, or did not answer, within the budget.
    #[error("no answer from the Kubernetes API within {}: {last}", humantime::format_duration(*.budget))]
    Unavailable {
        /// How long the agent tried.
        budget: Duration,
        /// The last failure.
        last: String,
    },
}

/// The pod ranges of `node`, and the values that are not CIDRs. `spec.podCIDRs` lists them
/// all; clusters older than dual-stack set only `spec.podCIDR`.
pub(crate) fn pod_cidrs(node: &Node) -> (Vec<IpNet>, Vec<String>) {
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let values = if listed.is_empty() {
        spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect()
    } else {
        listed
    };
    let mut cidrs = Vec::new();
    let mut invalid = Vec::new();
    for value in values {
        match value.parse::<IpNet>() {
            Ok(cidr) if !cidrs.contains(&cidr) => cidrs.push(cidr),
            Ok(_) => {}
            Err(_) => invalid.push(value),
        }
    }
    (cidrs, invalid)
}

/// Reads `node`'s pod ranges, retrying with backoff for at most `budget` while the API cannot
/// be reached or fails.
pub(crate) async fn lookup(
    api: &KubeApi,
    node: &str,
    budget: Duration,
    backoff: BackoffConfig,
) -> Result<Vec<IpNet>, LookupError> {
    let mut last = String::from("not asked yet");
    let attempts = async {
        let mut backoff = backoff.start();
        loop {
            let answer =
                match api.client().await {
                    Ok(client) => kube::Api::<Node>::all(client)
                        .get(node)
                        .await
                        .map_err(|err| match err {
                            kube::Error::Api(status) if status.is_not_found() => {
                                LookupError::NotFound(node.to_owned())
                            }
                            err => LookupError::Unavailable {
                                budget,
                                last: err.to_string(),
                            },
                        }),
                    Err(err) => Err(LookupError::Unavailable {
                        budget,
                        last: err.to_string(),
                    }),
                };
            match answer {
                Ok(found) => {
                    let (cidrs, invalid) = pod_cidrs(&found);
                    if !invalid.is_empty() {
                        tracing::warn!(
                            node,
                            invalid = %invalid.join(","),
                            "ignoring pod ranges of the Node that are not CIDRs"
                        );
                    }
                    return Ok(cidrs);
                }
                Err(LookupError::Unavailable { last: failure, .. }) => {
                    let delay = backoff.next_delay();
                    tracing::info!(
                        node,
                        err = %failure,
                        delay = %humantime::format_duration(delay),
                        "cannot read the Node yet; retrying after a pause"
                    );
                    last = failure;
                    tokio::time::sleep(delay).await;
                }
                Err(not_found) => return Err(not_found),
            }
        }
    };
    match tokio::time::timeout(budget, attempts).await {
        Ok(outcome) => outcome,
        Err(_) => Err(LookupError::Unavailable { budget, last }),
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::client::Body;

    use super::*;

    fn node(pod_cidr: Option<&str>, pod_cidrs: &[&str]) -> Node {
        Node {
            spec: Some(NodeSpec {
                pod_cidr: pod_cidr.map(str::to_owned),
                pod_cidrs: (!pod_cidrs.is_empty())
                    .then(|| pod_cidrs.iter().map(|c| (*c).to_owned()).collect()),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn the_listed_ranges_win_over_the_single_one() {
        let dual = node(Some("10.244.1.0/24"), &["10.244.1.0/24", "fd00:1::/64"]);
        let (cidrs, invalid) = pod_cidrs(&dual);
        assert_eq!(
            cidrs,
            [
                "10.244.1.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ] as [IpNet; 2]
        );
        assert!(invalid.is_empty());

        let old = node(Some("10.244.2.0/24"), &[]);
        assert_eq!(
            pod_cidrs(&old).0,
            ["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(pod_cidrs(&node(None, &[])).0.is_empty());
        assert!(pod_cidrs(&Node::default()).0.is_empty());

        let (cidrs, invalid) = pod_cidrs(&node(None, &["10.244.3.0/24", "nope"]));
        assert_eq!(cidrs.len(), 1);
        assert_eq!(invalid, ["nope"]);
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn mocked() -> (KubeApi, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        (KubeApi::with_client(client), handle)
    }

    fn json(status: u16, value: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(value).unwrap()))
            .unwrap()
    }

    fn unavailable() -> Response<Body> {
        json(
            503,
            &serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "etcd is down", "reason": "ServiceUnavailable", "code": 503,
            }),
        )
    }

    const BACKOFF: BackoffConfig = BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };

    #[tokio::test(start_paused = true)]
    async fn the_node_is_read_again_until_the_api_answers() {
        let (api, mut handle) = mocked();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (request, respond) = handle.next_request().await.unwrap();
                assert_eq!(request.uri().path(), "/api/v1/nodes/node-1");
                respond.send_response(unavailable());
            }
            let (_, respond) = handle.next_request().await.unwrap();
            let node = serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": { "name": "node-1" },
                "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] },
            });
            respond.send_response(json(200, &node));
        });
        let cidrs = lookup(&api, "node-1", Duration::from_secs(30), BACKOFF)
            .await
            .unwrap();
        assert_eq!(cidrs, ["10.244.1.0/24".parse::<IpNet>().unwrap()]);
        server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_api_is_given_up_after_the_budget() {
        let (api, mut handle) = mocked();
        let server = tokio::spawn(async move {
            let mut asked = 0;
            while let Some((_, respond)) = handle.next_request().await {
                asked += 1;
                respond.send_response(unavailable());
            }
            asked
        });
        let started = tokio::time::Instant::now();
        let err = lookup(&api, "node-1", Duration::from_secs(5), BACKOFF)
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let LookupError::Unavailable { last, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(last.contains("etcd is down"), "{err}");
        drop(api);
        assert!(server.await.unwrap() >= 4, "retried with backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_node_is_not_retried() {
        let (api, mut handle) = mocked();
        tokio::spawn(async move {
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_response(json(
                404,
                &serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "nodes \"node-1\" not found", "reason": "NotFound", "code": 404,
                }),
            ));
        });
        let err = lookup(&api, "node-1", Duration::from_secs(30), BACKOFF)
            .await
            .unwrap_err();
        assert!(matches!(err, LookupError::NotFound(_)), "{err}");
    }
}
