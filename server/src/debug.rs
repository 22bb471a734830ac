//! The server's read-only debug views on the admin endpoint (`--debug-endpoints`):
//!
//! - `/debug/agents`: the agents linked, what they route, and each of their links' streams,
//!   bytes, keepalive round trip and drain state;
//! - `/debug/connections`: the tunneled connections open now (`node=`, `agent=` filter them);
//! - `/debug/route?node=NAME|ip=IP[&port=P]`: the agent a dial would take now, by the same
//!   routing code as a dial, without dialing;
//! - `/debug/check?node=NAME[&port=P]`: a dial to a node's kubelet port (10250 unless `port`)
//!   through the tunnel, closed as soon as the agent answered: the latency or the exact
//!   failure. Like kube-apiserver it dials the node's address: the first its agent announces,
//!   else (no agent of that node linked) the Node's InternalIP where the server reads Nodes,
//!   else the name. It goes through the same routing and dial code as kube-apiserver's dials,
//!   but counts in no dial metric, so probing does not move the dial-failure ratio.
//!
//! Lists are paged as [`cplink_runtime::introspect`] says.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use cplink_proto::dial::DialFailure;
use cplink_proto::target::{Host, Target};
use cplink_runtime::admin::{DebugFuture, DebugReply, Introspect};
use cplink_runtime::introspect::{
    self, AgentInfo, AgentLinkInfo, CheckInfo, ConnectionInfo, IdentifiersInfo, Page, Query,
    QueryError, RouteInfo, ServerHeader, VerifiedInfo,
};
use http::StatusCode;

use crate::Shared;
use crate::connections::Connection;
use crate::registry::{AgentLink, Registry, Strategy};

/// The kubelet's port, checked unless `port` says otherwise.
const KUBELET_PORT: u16 = 10250;

/// Checks running at once, at most: each holds a tunneled connection for up to the dial
/// timeout.
const MAX_CHECKS: usize = 2;

/// The debug views of one server.
pub(crate) struct Views {
    shared: Arc<Shared>,
    checks: Arc<tokio::sync::Semaphore>,
}

impl Views {
    /// The views of the server sharing `shared`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Views {
            shared,
            checks: Arc::new(tokio::sync::Semaphore::new(MAX_CHECKS)),
        }
    }
}

impl Introspect for Views {
    fn get(&self, path: &str, query: &str) -> Option<DebugFuture> {
        let ready = |reply: DebugReply| -> DebugFuture { Box::pin(std::future::ready(reply)) };
        let bad = |err: QueryError| DebugReply::error(StatusCode::BAD_REQUEST, err.to_string());
        let shared = &self.shared;
        Some(match path {
            "agents" => ready(
                Query::parse(query, &["limit", "continue"])
                    .and_then(|q| q.page())
                    .map_or_else(bad, |page| DebugReply::json(&agents(shared, &page))),
            ),
            "connections" => ready(
                Query::parse(query, &["limit", "continue", "node", "agent"])
                    .and_then(|q| connections(shared, &q))
                    .map_or_else(bad, |list| DebugReply::json(&list)),
            ),
            "route" => ready(
                Query::parse(query, &["node", "ip", "port"])
                    .and_then(|q| destination(&q, true))
                    .map_or_else(bad, |target| DebugReply::json(&route(shared, &target))),
            ),
            "check" => {
                let target = match Query::parse(query, &["node", "port"])
                    .and_then(|q| destination(&q, false))
                {
                    Ok(target) => target,
                    Err(err) => return Some(ready(bad(err))),
                };
                let Ok(permit) = self.checks.clone().try_acquire_owned() else {
                    return Some(ready(DebugReply::error(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!("{MAX_CHECKS} checks are running on this server; try again"),
                    )));
                };
                let shared = shared.clone();
                Box::pin(async move {
                    let info = match node_target(&shared, &target).await {
                        Ok(dialed) => check(&shared, &dialed).await,
                        Err(failure) => unchecked(&shared, &target, failure),
                    };
                    drop(permit);
                    DebugReply::json(&info)
                })
            }
            _ => return None,
        })
    }
}

fn header(shared: &Shared) -> ServerHeader {
    ServerHeader {
        server: shared.config.server_id.clone(),
        draining: shared.is_draining(),
    }
}

/// `/debug/agents`: one page of the agents linked, by id.
pub(crate) fn agents(shared: &Shared, page: &Page) -> introspect::AgentList {
    // One more than the page, to know whether it is the last.
    let linked = shared
        .registry
        .links_after(page.after.as_deref(), page.limit.saturating_add(1));
    page.cut(
        linked
            .iter()
            .filter_map(|(id, links)| agent_info(id, links)),
        |a| a.id.clone(),
    )
    .into_list(header(shared))
}

fn agent_info(id: &str, links: &[Arc<AgentLink>]) -> Option<AgentInfo> {
    let preferred = Registry::preferred_link(links);
    let first = preferred.or_else(|| links.last())?;
    let routes = first.identifiers();
    Some(AgentInfo {
        id: id.to_owned(),
        node: first.node_name.clone(),
        protocol: protocol(first).to_owned(),
        verified: first.verified.as_ref().map(|v| VerifiedInfo {
            node: v.node.clone(),
            by: if v.pod.is_some() {
                "token"
            } else {
                "certificate"
            }
            .to_owned(),
            pod: v
                .pod
                .as_ref()
                .map(|p| format!("{}/{}", p.namespace, p.name)),
            pod_uid: v.pod.as_ref().map(|p| p.uid.clone()),
        }),
        identifiers: IdentifiersInfo {
            host_ips: routes.host_ips.iter().map(ToString::to_string).collect(),
            pod_cidrs: routes.pod_cidrs.iter().map(ToString::to_string).collect(),
            default_route: routes.default_route,
        },
        links: links
            .iter()
            .map(|link| {
                let (to_agent, from_agent) = link.bytes();
                AgentLinkInfo {
                    link_id: link.link_id,
                    peer: link.peer.to_string(),
                    linked_since: introspect::timestamp(link.linked_since),
                    active_streams: link.active_streams() as u64,
                    bytes_to_agent: to_agent,
                    bytes_from_agent: from_agent,
                    keepalive_rtt_seconds: link.keepalive_rtt().map(|rtt| rtt.as_secs_f64()),
                    draining: link.is_draining(),
                    preferred: preferred.is_some_and(|p| Arc::ptr_eq(p, link)),
                }
            })
            .collect(),
    })
}

fn protocol(link: &AgentLink) -> &'static str {
    if link.is_konnectivity() {
        "konnectivity"
    } else {
        "cplink"
    }
}

/// `/debug/connections`: one page of the tunneled connections open now, oldest first.
pub(crate) fn connections(
    shared: &Shared,
    query: &Query,
) -> Result<introspect::ConnectionList, QueryError> {
    let page = query.page()?;
    let after = match page.after.as_deref() {
        Some(token) => token.parse::<u64>().map_err(|_| QueryError::Invalid {
            name: "continue".into(),
            reason: "not a token this list handed out".into(),
        })?,
        None => 0,
    };
    let node = query.get("node");
    let agent = query.get("agent");
    let keep = |c: &Connection| {
        if node.is_none() && agent.is_none() {
            return true;
        }
        let Some(link) = c.link() else {
            return false;
        };
        node.is_none_or(|n| {
            link.node_name
                .as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(n))
        }) && agent.is_none_or(|a| link.id == a)
    };
    let open = shared
        .connections
        .after(after, page.limit.saturating_add(1), keep);
    let now = Instant::now();
    let items = open.iter().map(|c| {
        let link = c.link();
        let (to_agent, from_agent) = c.bytes();
        ConnectionInfo {
            id: c.id,
            frontend: c.frontend.to_owned(),
            destination: c.destination.to_string(),
            agent: link.as_ref().map(|l| l.id.clone()),
            node: link.as_ref().and_then(|l| l.node_name.clone()),
            state: if c.is_established() {
                "established"
            } else {
                "dialing"
            }
            .to_owned(),
            age_seconds: now.saturating_duration_since(c.opened).as_secs_f64(),
            bytes_to_agent: to_agent,
            bytes_from_agent: from_agent,
        }
    });
    Ok(page
        .cut(items, |c| c.id.to_string())
        .into_list(header(shared)))
}

/// The destination of a route or check query: `node` (a name, or with `ip_allowed` an IP
/// address) or `ip`, and `port`.
fn destination(query: &Query, ip_allowed: bool) -> Result<Target, QueryError> {
    let port = query.parsed::<u16>("port")?.unwrap_or(KUBELET_PORT);
    let invalid = |name: &str, reason: String| QueryError::Invalid {
        name: name.to_owned(),
        reason,
    };
    let host = match (query.get("node"), query.get("ip")) {
        (Some(_), Some(_)) => {
            return Err(QueryError::Missing(
                "give either node or ip, not both".into(),
            ));
        }
        (Some(node), None) => match node.parse::<std::net::IpAddr>() {
            Ok(_) if !ip_allowed => {
                return Err(invalid(
                    "node",
                    format!("{node} is an address; a check takes a node's name"),
                ));
            }
            _ => node.to_owned(),
        },
        (None, Some(ip)) => {
            let addr: std::net::IpAddr = ip
                .parse()
                .map_err(|e: std::net::AddrParseError| invalid("ip", e.to_string()))?;
            match addr {
                std::net::IpAddr::V4(_) => addr.to_string(),
                std::net::IpAddr::V6(_) => format!("[{addr}]"),
            }
        }
        (None, None) if ip_allowed => {
            return Err(QueryError::Missing(
                "a node name (node=) or an IP address (ip=) is required".into(),
            ));
        }
        (None, None) => return Err(QueryError::Missing("node= is required".into())),
    };
    let target: Target =
        format!("{host}:{port}")
            .parse()
            .map_err(|e: cplink_proto::target::TargetError| {
                let name = if query.get("ip").is_some() {
                    "ip"
                } else {
                    "node"
                };
                invalid(name, e.to_string())
            })?;
    if !ip_allowed && !matches!(target.host, Host::Name(_)) {
        return Err(invalid("node", "a check takes a node's name".into()));
    }
    Ok(target)
}

fn strategies(shared: &Shared) -> Vec<String> {
    shared
        .config
        .strategies
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect()
}

/// `/debug/route`: the agent a dial to `target` would take now.
pub(crate) fn route(shared: &Shared, target: &Target) -> RouteInfo {
    let chosen = shared.registry.choose(target, &shared.config.strategies);
    let (agent, node, strategy, refusal) = match chosen {
        Ok((link, strategy)) => (
            Some(link.id.clone()),
            link.node_name.clone(),
            Some(strategy.as_str().to_owned()),
            None,
        ),
        Err(failure) => (None, None, None, Some(failure.reason_line())),
    };
    RouteInfo {
        server: shared.config.server_id.clone(),
        destination: target.to_string(),
        strategies: strategies(shared),
        agent,
        node,
        strategy,
        refusal,
    }
}

/// What a check of node `target` (a name and a port) dials: the node's address as its agent
/// announces it, else its Node's InternalIP (when the server reads Nodes), else its name.
async fn node_target(shared: &Shared, target: &Target) -> Result<Target, DialFailure> {
    let Host::Name(name) = &target.host else {
        return Ok(target.clone());
    };
    let at = |ip: std::net::IpAddr| Target {
        host: Host::Ip(ip),
        port: target.port,
    };
    if let Some(ip) = shared.registry.node_address(name) {
        return Ok(at(ip));
    }
    let Some(api) = shared.config.identity.api() else {
        return Ok(target.clone());
    };
    let lookup = async {
        let client = api
            .client()
            .await
            .map_err(|e| DialFailure::Unreachable(format!("cannot read Node {name}: {e}")))?;
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        nodes
            .get_opt(name)
            .await
            .map_err(|e| DialFailure::Unreachable(format!("cannot read Node {name}: {e}")))
    };
    let budget = shared.config.dial_timeout;
    let node = tokio::time::timeout(budget, lookup)
        .await
        .map_err(|_| DialFailure::Timeout(budget))??
        .ok_or_else(|| DialFailure::Unreachable(format!("node {name} not found")))?;
    let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
    let internal = addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .chain(addresses.iter().filter(|a| a.type_ == "ExternalIP"))
        .find_map(|a| a.address.parse().ok());
    Ok(internal.map_or_else(|| target.clone(), at))
}

/// The answer to a check that could not dial.
fn unchecked(shared: &Shared, target: &Target, failure: DialFailure) -> CheckInfo {
    CheckInfo {
        server: shared.config.server_id.clone(),
        destination: target.to_string(),
        ok: false,
        agent: None,
        node: None,
        strategy: None,
        latency_seconds: 0.0,
        error_kind: Some(failure.kind().to_owned()),
        error: Some(failure.reason_line()),
    }
}

/// `/debug/check`: dials `target` through the tunnel and closes the connection at once.
pub(crate) async fn check(shared: &Shared, target: &Target) -> CheckInfo {
    let chosen: Mutex<Option<(Arc<AgentLink>, Strategy)>> = Mutex::new(None);
    let started = Instant::now();
    let dialed = match shared.tunnels.clone().try_acquire_owned() {
        Ok(_permit) => crate::tunnel::open(shared, target, &|route| {
            let mut chosen = chosen.lock().unwrap_or_else(|e| e.into_inner());
            *chosen = Some((route.guard.link().clone(), route.strategy));
        })
        .await
        // Dropping the carried connection closes it: a reset towards a native agent, which
        // aborts its socket; CLOSE_REQ towards an upstream one.
        .map(drop),
        Err(_) => Err(DialFailure::Busy(format!(
            "{} tunneled connections open (--max-tunnels)",
            shared.config.max_tunnels
        ))),
    };
    let latency = started.elapsed();
    let chosen = chosen.into_inner().unwrap_or_else(|e| e.into_inner());
    let (agent, node, strategy) = match chosen {
        Some((link, strategy)) => (
            Some(link.id.clone()),
            link.node_name.clone(),
            Some(strategy.as_str().to_owned()),
        ),
        None => (None, None, None),
    };
    let (error_kind, error) = match &dialed {
        Ok(()) => (None, None),
        Err(failure) => (Some(failure.kind().to_owned()), Some(failure.reason_line())),
    };
    tracing::info!(
        dest = %target,
        agent_id = agent.as_deref().unwrap_or(""),
        ok = dialed.is_ok(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        "debug check"
    );
    CheckInfo {
        server: shared.config.server_id.clone(),
        destination: target.to_string(),
        ok: dialed.is_ok(),
        agent,
        node,
        strategy,
        latency_seconds: latency.as_secs_f64(),
        error_kind,
        error,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::registry::Route;
    use crate::registry::tests::link;

    /// A server's shared state, with a throwaway certificate, routing `node,cidr`.
    fn shared() -> Arc<Shared> {
        crate::tests::server(&["--strategies=node,cidr", "--debug-endpoints"]).shared
    }

    async fn get(views: &Views, path_and_query: &str) -> (StatusCode, Value) {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let reply = views.get(path, query).expect("a view").await;
        (reply.status, serde_json::from_slice(&reply.body).unwrap())
    }

    #[tokio::test]
    async fn agents_are_listed_by_id_with_their_links_and_paged() {
        let shared = shared();
        let b = link(&shared.registry, "b", "node-b", "10.0.0.2", "10.244.2.0/24").await;
        link(&shared.registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        link(&shared.registry, "c", "node-c", "10.0.0.3", "10.244.3.0/24").await;
        b.record_keepalive_rtt(std::time::Duration::from_micros(1500));
        b.count_to_agent(100);
        b.count_from_agent(7);
        let views = Views::new(shared.clone());

        let (status, all) = get(&views, "agents").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(all["server"], "server-a");
        assert_eq!(all["truncated"], false);
        assert!(all.get("continue").is_none(), "{all}");
        let ids: Vec<&str> = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let mut agent_b = all["items"][1].clone();
        let since = agent_b["links"][0]["linkedSince"].take();
        assert!(since.as_str().unwrap().ends_with('Z'), "{since}");
        assert_eq!(
            agent_b,
            json!({
                "id": "b",
                "node": "node-b",
                "protocol": "cplink",
                "verified": null,
                "identifiers": {
                    "hostIPs": ["10.0.0.2"],
                    "podCIDRs": ["10.244.2.0/24"],
                    "defaultRoute": false,
                },
                "links": [{
                    "linkId": b.link_id,
                    "peer": "192.0.2.1:40000",
                    "linkedSince": null,
                    "activeStreams": 0,
                    "bytesToAgent": 100,
                    "bytesFromAgent": 7,
                    "keepaliveRttSeconds": 0.0015,
                    "draining": false,
                    "preferred": true,
                }],
            })
        );

        let (_, first) = get(&views, "agents?limit=2").await;
        assert_eq!(first["items"].as_array().unwrap().len(), 2);
        assert_eq!(first["truncated"], true);
        assert_eq!(first["continue"], "b");
        let (_, rest) = get(&views, "agents?limit=2&continue=b").await;
        assert_eq!(rest["items"][0]["id"], "c");
        assert_eq!(rest["truncated"], false);

        let (status, err) = get(&views, "agents?limit=0").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(err["error"].as_str().unwrap().contains("limit"), "{err}");
        let (status, _) = get(&views, "agents?node=a").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "agents take no filter");
    }

    #[tokio::test]
    async fn connections_show_their_agent_state_and_bytes_and_filter_by_node() {
        let shared = shared();
        let a = link(&shared.registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        let b = link(&shared.registry, "b", "node-b", "10.0.0.2", "10.244.2.0/24").await;
        let target = |s: &str| s.parse::<Target>().unwrap();
        let dialing = shared.connections.track("grpc", &target("node-a:10250"));
        dialing.entry().set_link(&a);
        let open = shared.connections.track("tls", &target("10.244.2.9:8080"));
        open.entry().set_link(&b);
        open.entry().set_established();
        let routed = Route {
            guard: shared
                .registry
                .route(&target("node-b:1"), &[Strategy::Node])
                .unwrap()
                .guard,
            strategy: Strategy::Cidr,
        };
        let counted = crate::tunnel::counted(&shared.metrics.bytes, &open, &routed);
        cplink_proto::pump::CountBytes::to_stream(&counted, 300);
        cplink_proto::pump::CountBytes::to_socket(&counted, 20);
        let _unrouted = shared.connections.track("uds", &target("node-z:10250"));
        let views = Views::new(shared.clone());

        let (status, all) = get(&views, "connections").await;
        assert_eq!(status, StatusCode::OK);
        let items = all["items"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        let mut second = items[1].clone();
        assert!(second["ageSeconds"].take().as_f64().unwrap() >= 0.0);
        assert_eq!(
            second,
            json!({
                "id": open.entry().id,
                "frontend": "tls",
                "destination": "10.244.2.9:8080",
                "agent": "b",
                "node": "node-b",
                "state": "established",
                "ageSeconds": null,
                "bytesToAgent": 300,
                "bytesFromAgent": 20,
            })
        );
        assert_eq!(items[0]["state"], "dialing");
        assert_eq!(items[2]["agent"], Value::Null);
        assert_eq!(
            b.bytes(),
            (300, 20),
            "the link counts its connections' bytes"
        );
        assert_eq!(shared.metrics.bytes.totals().socket_to_stream, 300);

        let (_, on_a) = get(&views, "connections?node=NODE-A").await;
        assert_eq!(on_a["items"].as_array().unwrap().len(), 1);
        assert_eq!(on_a["items"][0]["destination"], "node-a:10250");
        let (_, by_agent) = get(&views, "connections?agent=b").await;
        assert_eq!(by_agent["items"][0]["id"], open.entry().id);

        let (_, page) = get(&views, "connections?limit=1").await;
        assert_eq!(page["truncated"], true);
        let next = page["continue"].as_str().unwrap().to_owned();
        let (_, page) = get(&views, &format!("connections?limit=1&continue={next}")).await;
        assert_eq!(page["items"][0]["id"], open.entry().id);
        let (status, err) = get(&views, "connections?continue=b").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(err["error"].as_str().unwrap().contains("continue"), "{err}");

        drop((dialing, open, routed));
        let (_, left) = get(&views, "connections").await;
        assert_eq!(left["items"].as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn routes_are_answered_without_dialing_and_refusals_name_the_destination() {
        let shared = shared();
        let a = link(&shared.registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        let views = Views::new(shared.clone());
        for (query, strategy) in [
            ("route?node=node-a", "node"),
            ("route?ip=10.0.0.1", "node"),
            ("route?ip=10.244.1.7&port=8080", "cidr"),
        ] {
            let (status, route) = get(&views, query).await;
            assert_eq!(status, StatusCode::OK, "{route}");
            assert_eq!(route["agent"], "a", "{query}");
            assert_eq!(route["strategy"], strategy, "{query}");
            assert_eq!(route["strategies"], json!(["node", "cidr"]));
        }
        assert_eq!(a.active_streams(), 0, "routing a question holds no stream");
        let (_, refused) = get(&views, "route?node=node-z").await;
        assert_eq!(refused["destination"], "node-z:10250");
        assert_eq!(refused["agent"], Value::Null);
        let refusal = refused["refusal"].as_str().unwrap();
        assert!(refusal.contains("node-z"), "{refusal}");
        let (_, v6) = get(&views, "route?ip=fd00::1").await;
        assert_eq!(v6["destination"], "[fd00::1]:10250");

        for bad in [
            "route",
            "route?node=a&ip=10.0.0.1",
            "route?ip=node-a",
            "route?node=a&port=70000",
            "check?node=10.0.0.1",
            "check",
            "check?ip=10.0.0.1",
        ] {
            let (status, err) = get(&views, bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
            assert!(err["error"].is_string(), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_check_dials_the_address_the_nodes_agent_announces() {
        let shared = shared();
        link(&shared.registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        let target = |s: &str| s.parse::<Target>().unwrap();
        let dialed = node_target(&shared, &target("NODE-A:10250")).await.unwrap();
        assert_eq!(dialed.to_string(), "10.0.0.1:10250");
        // Without an agent of that node nor Nodes to read, the name is all there is.
        let dialed = node_target(&shared, &target("node-b:10255")).await.unwrap();
        assert_eq!(dialed.to_string(), "node-b:10255");
    }

    #[tokio::test]
    async fn a_check_without_an_agent_reports_the_refusal_and_counts_no_dial() {
        let shared = shared();
        let views = Views::new(shared.clone());
        let (status, check) = get(&views, "check?node=node-z").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(check["ok"], false);
        assert_eq!(check["errorKind"], "no_agent");
        assert_eq!(check["agent"], Value::Null);
        let error = check["error"].as_str().unwrap();
        assert!(error.contains("no agent"), "{error}");
        let dials = shared
            .metrics
            .dials
            .get_or_create(&crate::metrics::ResultLabels { result: "no_agent" });
        assert_eq!(dials.get(), 0, "a check is no dial of kube-apiserver's");
    }
}
