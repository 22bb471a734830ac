//! The debug views of a real server and real agents, in-process on loopback, while tunnels
//! through all three frontends are open: what `/debug/agents`, `/debug/connections`,
//! `/debug/route` and `/debug/check` of the server and `/debug/links` of an agent report, and
//! that a limit cuts a list.

use std::net::SocketAddr;
use std::time::Duration;

use cplink_e2e::client::{self, TlsClient};
use cplink_e2e::fixture::Loopback;
use cplink_e2e::grpc::{self, ProxyStream};
use cplink_e2e::{targets, wait};
use cplink_runtime::introspect::{AgentList, CheckInfo, ConnectionList, LinkList, RouteInfo};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a view may take to show what the test did.
const SHOWS: Duration = Duration::from_secs(10);

/// A request to an admin endpoint: its status and body.
async fn exchange(admin: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(SHOWS, stream.read_to_string(&mut response)).await??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed response {response:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("malformed head {head:?}"))?
        .parse()?;
    Ok((status, body.to_owned()))
}

/// `GET path` on an admin endpoint, decoded; fails unless 200.
async fn view<T: DeserializeOwned>(admin: SocketAddr, path: &str) -> anyhow::Result<T> {
    let (status, body) = exchange(admin, "GET", path).await?;
    anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    len: usize,
) -> anyhow::Result<()> {
    let sent = targets::pattern(len as u64, len);
    stream.write_all(&sent).await?;
    stream.flush().await?;
    let mut back = vec![0u8; len];
    stream.read_exact(&mut back).await?;
    anyhow::ensure!(back == sent, "echo mismatch");
    Ok(())
}

#[tokio::test]
async fn the_debug_views_show_live_tunnels_their_agents_and_routes() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    // Without `any`, a destination no agent serves is refused at once, naming it.
    let server = lo
        .start_server(&[
            "--debug-endpoints",
            "--strategies=node,cidr",
            "--keepalive-interval=100ms",
        ])
        .await?;
    // The agent of "localhost": dials for its name and for 127.0.0.1 are routed to it.
    let local = lo
        .start_agent(
            &[server.agent_addr],
            &[
                "--debug-endpoints",
                "--node-name=localhost",
                "--host-ip=127.0.0.1",
            ],
        )
        .await?;
    // An upstream-protocol agent of another node, with the debug view off.
    let other = lo
        .start_agent(
            &[server.agent_addr],
            &[
                "--protocol=konnectivity",
                "--node-name=node-b",
                "--host-ip=127.0.0.2",
            ],
        )
        .await?;
    server.wait_for_agents(2).await?;
    local.wait_ready().await?;
    let server_id = "server-0";

    // Three tunnels to one echo destination, one per frontend, each with its own byte count.
    let destination = targets::echo().await?;
    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut over_tls = tls
        .tunnel(server.tls_addr, &destination.authority())
        .await?;
    echo(&mut over_tls, 3000).await?;
    let mut over_uds = client::tunnel_uds(&server.uds, &destination.authority()).await?;
    echo(&mut over_uds, 200).await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let (mut over_grpc, connect_id) =
        ProxyStream::connect(channel, &destination.authority()).await?;
    over_grpc.write_all(connect_id, b"through grpc").await?;
    assert_eq!(over_grpc.read_exact(connect_id, 12).await?, b"through grpc");

    // Bytes written to a client are counted just after the write: wait for the last ones.
    let expected = [("tls", 3000), ("uds", 200), ("grpc", 12)];
    let admin = server.admin_addr;
    wait::until_async("every byte in /debug/connections", SHOWS, || async {
        view::<ConnectionList>(admin, "/debug/connections")
            .await
            .is_ok_and(|list| {
                list.items.len() == 3
                    && list
                        .items
                        .iter()
                        .zip(expected)
                        .all(|(c, (_, n))| c.bytes_to_agent == n && c.bytes_from_agent == n)
            })
    })
    .await?;
    let connections: ConnectionList = view(admin, "/debug/connections").await?;
    assert_eq!(connections.header.server, server_id);
    assert!(!connections.truncated);
    for (connection, (frontend, _)) in connections.items.iter().zip(expected) {
        assert_eq!(connection.frontend, frontend, "{connection:?}");
        assert_eq!(connection.destination, destination.authority());
        assert_eq!(connection.agent.as_deref(), Some("agent-1"));
        assert_eq!(connection.node.as_deref(), Some("localhost"));
        assert_eq!(connection.state, "established");
        assert!(connection.age_seconds < 60.0, "{connection:?}");
    }
    assert!(
        connections.items.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first: {connections:?}"
    );

    // A limit cuts the list; its token continues after the cut.
    let first: ConnectionList = view(admin, "/debug/connections?limit=2").await?;
    assert_eq!(first.items.len(), 2);
    assert!(first.truncated);
    let token = first.continue_token.clone().expect("a continue token");
    let rest: ConnectionList = view(
        admin,
        &format!("/debug/connections?limit=2&continue={token}"),
    )
    .await?;
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].frontend, "grpc");
    assert!(!rest.truncated && rest.continue_token.is_none());
    let elsewhere: ConnectionList = view(admin, "/debug/connections?node=node-b").await?;
    assert!(elsewhere.items.is_empty(), "{elsewhere:?}");

    // The agents: the tunnels' streams and bytes on the local agent's link, its keepalive
    // round trip, the other agent's protocol.
    wait::until_async("a keepalive round trip in /debug/agents", SHOWS, || async {
        view::<AgentList>(admin, "/debug/agents")
            .await
            .is_ok_and(|list| {
                list.items
                    .first()
                    .is_some_and(|a| a.links.iter().any(|l| l.keepalive_rtt_seconds.is_some()))
            })
    })
    .await?;
    let agents: AgentList = view(admin, "/debug/agents").await?;
    let ids: Vec<&str> = agents.items.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["agent-1", "agent-2"]);
    let localhost = &agents.items[0];
    assert_eq!(localhost.node.as_deref(), Some("localhost"));
    assert_eq!(localhost.protocol, "cplink");
    assert_eq!(localhost.identifiers.host_ips, ["127.0.0.1"]);
    assert_eq!(
        localhost.verified, None,
        "the binaries believe declared identities"
    );
    let [link] = localhost.links.as_slice() else {
        panic!("one link: {localhost:?}");
    };
    assert_eq!(link.active_streams, 3);
    assert_eq!(link.bytes_to_agent, 3212);
    assert_eq!(link.bytes_from_agent, 3212);
    assert!(link.preferred && !link.draining);
    assert!(
        link.keepalive_rtt_seconds.is_some_and(|rtt| rtt < 5.0),
        "{link:?}"
    );
    let node_b = &agents.items[1];
    assert_eq!(node_b.protocol, "konnectivity");
    assert_eq!(node_b.links[0].active_streams, 0);
    assert_eq!(node_b.links[0].keepalive_rtt_seconds, None);

    let first: AgentList = view(admin, "/debug/agents?limit=1").await?;
    assert_eq!(first.items.len(), 1);
    assert!(first.truncated);
    assert_eq!(first.continue_token.as_deref(), Some("agent-1"));
    let rest: AgentList = view(admin, "/debug/agents?limit=1&continue=agent-1").await?;
    assert_eq!(rest.items[0].id, "agent-2");
    assert!(!rest.truncated);

    // The agent's own view: its link to the server, carrying the three tunnels.
    let links: LinkList = view(local.admin_addr, "/debug/links").await?;
    assert!(links.header.ready);
    assert_eq!(links.header.node.as_deref(), Some("localhost"));
    let [up] = links.items.as_slice() else {
        panic!("one link: {links:?}");
    };
    assert_eq!(up.server_id.as_deref(), Some(server_id));
    assert_eq!(up.state, "up");
    assert_eq!(up.active_streams, 3);
    assert_eq!(up.address, server.agent_addr.to_string());

    // Routes are answered by the routing code, without a dial.
    let dials_before = server.handle.metrics_text();
    let by_name: RouteInfo = view(admin, "/debug/route?node=localhost").await?;
    assert_eq!(
        (by_name.agent.as_deref(), by_name.strategy.as_deref()),
        (Some("agent-1"), Some("node"))
    );
    let by_ip: RouteInfo = view(admin, "/debug/route?ip=127.0.0.2&port=22").await?;
    assert_eq!(by_ip.agent.as_deref(), Some("agent-2"));
    assert_eq!(by_ip.destination, "127.0.0.2:22");
    let unknown: RouteInfo = view(admin, "/debug/route?node=node-z").await?;
    assert_eq!(unknown.agent, None);
    assert_eq!(unknown.strategies, ["node", "cidr"]);
    let refusal = unknown.refusal.unwrap_or_default();
    assert!(refusal.contains("node-z"), "{refusal}");

    // A check dials through the agent and closes; the exact failure otherwise.
    let port = destination.addr.port();
    let reached: CheckInfo =
        view(admin, &format!("/debug/check?node=localhost&port={port}")).await?;
    assert!(reached.ok, "{reached:?}");
    assert_eq!(reached.agent.as_deref(), Some("agent-1"));
    assert_eq!(
        reached.destination,
        destination.authority(),
        "the node's address, as its agent announces it"
    );
    assert!(reached.latency_seconds < 10.0);
    let closed = targets::closed_port()?;
    let refused: CheckInfo = view(
        admin,
        &format!("/debug/check?node=localhost&port={}", closed.port()),
    )
    .await?;
    assert!(!refused.ok);
    assert_eq!(
        refused.error_kind.as_deref(),
        Some("refused"),
        "{refused:?}"
    );
    assert_eq!(refused.agent.as_deref(), Some("agent-1"));
    let nobody: CheckInfo = view(admin, "/debug/check?node=node-z").await?;
    assert_eq!(nobody.error_kind.as_deref(), Some("no_agent"));
    assert!(nobody.error.unwrap_or_default().contains("node-z"));
    assert_eq!(
        dials_before
            .lines()
            .filter(|l| l.starts_with("cplink_server_dials_total"))
            .collect::<Vec<_>>(),
        server
            .handle
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("cplink_server_dials_total"))
            .collect::<Vec<_>>(),
        "routes and checks count in no dial metric"
    );

    // Read-only, and off unless enabled.
    let (status, body) = exchange(admin, "POST", "/debug/agents").await?;
    assert_eq!(status, 405, "{body}");
    let (status, body) = exchange(other.admin_addr, "GET", "/debug/links").await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("--debug-endpoints"), "{body}");

    // Closed tunnels leave the table; the link keeps what it carried.
    drop((over_tls, over_uds, over_grpc));
    wait::until_async("no connection in /debug/connections", SHOWS, || async {
        view::<ConnectionList>(admin, "/debug/connections")
            .await
            .is_ok_and(|list| list.items.is_empty())
    })
    .await?;
    let agents: AgentList = view(admin, "/debug/agents?limit=1").await?;
    assert_eq!(agents.items[0].links[0].active_streams, 0);
    assert!(agents.items[0].links[0].bytes_to_agent >= 3212);

    other.stop().await;
    local.stop().await;
    server.stop().await;
    Ok(())
}
