//! Several servers, several agents: every agent linked to every server, dials routed to the
//! right node's agent through any server, and one server's loss breaking only its own streams.

use std::time::Duration;

use cplink_e2e::fixture::{Loopback, RunningAgent, RunningServer};
use cplink_e2e::metrics::counter;
use cplink_e2e::{client, targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

const SERVERS: usize = 3;
const AGENTS: usize = 5;

/// Agent `i` runs on node `node-i` with host IP 127.0.1.i and pod range 127.2.i.0/24.
fn host_ip(i: usize) -> String {
    format!("127.0.1.{}", i + 1)
}

fn pod_ip(i: usize) -> String {
    format!("127.2.{}.5", i + 1)
}

/// An echo server on `ip`, port chosen by the kernel; stopped, its connections with it,
/// when the handle is dropped.
async fn echo_on(ip: &str) -> anyhow::Result<(String, AbortOnDropHandle<()>)> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            connections.spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok((addr, AbortOnDropHandle::new(task)))
}

fn dials(agent: &RunningAgent) -> f64 {
    counter(&agent.handle.metrics_text(), "cplink_agent_dials_total", "")
}

async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> anyhow::Result<()> {
    stream.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    anyhow::ensure!(back == msg, "echo mismatch");
    Ok(())
}

async fn start(lo: &Loopback) -> anyhow::Result<(Vec<RunningServer>, Vec<RunningAgent>)> {
    let mut servers = Vec::new();
    for _ in 0..SERVERS {
        servers.push(
            lo.start_server(&["--server-count", "3", "--drain-timeout", "50ms"])
                .await?,
        );
    }
    let addrs: Vec<_> = servers.iter().map(|s| s.agent_addr).collect();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let node = format!("node-{i}");
        let cidr = format!("127.2.{}.0/24", i + 1);
        let ip = host_ip(i);
        agents.push(
            lo.start_agent(
                &addrs,
                &["--node-name", &node, "--host-ip", &ip, "--pod-cidr", &cidr],
            )
            .await?,
        );
    }
    for server in &servers {
        server.wait_for_agents(AGENTS).await?;
    }
    for agent in &agents {
        agent.wait_ready().await?;
    }
    Ok((servers, agents))
}

#[tokio::test]
async fn every_agent_links_to_every_server_and_dials_reach_the_right_node() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (servers, agents) = start(&lo).await?;
    for agent in &agents {
        let mut ids = agent.server_ids();
        assert_eq!(ids.len(), SERVERS, "{ids:?}");
        ids.dedup();
        assert_eq!(ids.len(), SERVERS, "links to distinct servers: {ids:?}");
    }

    let mut fixtures = Vec::new();
    for (i, _) in agents.iter().enumerate() {
        let (node_addr, a) = echo_on(&host_ip(i)).await?;
        let (pod_addr, b) = echo_on(&pod_ip(i)).await?;
        fixtures.push((node_addr, pod_addr, a, b));
    }
    for (s, server) in servers.iter().enumerate() {
        for (i, agent) in agents.iter().enumerate() {
            let (node_addr, pod_addr, _, _) = &fixtures[i];
            for (how, dest) in [("host IP", node_addr), ("pod CIDR", pod_addr)] {
                let before: Vec<f64> = agents.iter().map(dials).collect();
                let mut stream = client::tunnel_uds(&server.uds, dest).await?;
                round_trip(&mut stream, format!("{s}-{i}").as_bytes()).await?;
                let after: Vec<f64> = agents.iter().map(dials).collect();
                for (j, (b, a)) in before.iter().zip(&after).enumerate() {
                    let expected = if j == i { b + 1.0 } else { *b };
                    assert_eq!(
                        *a,
                        expected,
                        "server {s}, dial by {how} to node {i}: agent {j} dialed {}",
                        a - b
                    );
                }
            }
            // By node name: the node's agent takes the dial (the name does not resolve here,
            // so the dial itself fails, at that agent).
            let before = dials(agent);
            let mut stream = tokio::net::UnixStream::connect(&server.uds).await?;
            let answer = client::handshake(&mut stream, &format!("node-{i}:10250")).await?;
            assert_eq!(answer.status, 502, "{answer:?}");
            assert_eq!(dials(agent), before + 1.0, "dial by name to node-{i}");
        }
        let metrics = server.handle.metrics_text();
        let routed = |strategy: &str| {
            counter(
                &metrics,
                "cplink_server_routed_dials_total",
                &format!("strategy=\"{strategy}\""),
            )
        };
        // Established dials only: those by name failed at the agent.
        assert_eq!(routed("node"), AGENTS as f64, "{metrics}");
        assert_eq!(routed("cidr"), AGENTS as f64, "{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn losing_a_server_breaks_only_its_own_streams() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (mut servers, agents) = start(&lo).await?;
    let echo = targets::echo().await?;
    let mut doomed = client::tunnel_uds(&servers[0].uds, &echo.authority()).await?;
    let mut survivor = client::tunnel_uds(&servers[1].uds, &echo.authority()).await?;
    round_trip(&mut doomed, b"before").await?;
    round_trip(&mut survivor, b"before").await?;

    // The drain timeout is 50 ms: the stream is cut almost at once, as by a crash.
    let lost = servers.remove(0);
    lost.stop().await;
    let mut buf = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), doomed.read_to_end(&mut buf)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "the lost server's stream ends: {cut:?}"
    );

    round_trip(&mut survivor, b"after").await?;
    for server in &servers {
        for i in 0..10u8 {
            let mut stream = client::tunnel_uds(&server.uds, &echo.authority()).await?;
            round_trip(&mut stream, &[i]).await?;
        }
    }
    for agent in &agents {
        let handle = agent.handle.clone();
        wait::until("the agent to notice", Duration::from_secs(10), || {
            handle.links().len() == SERVERS - 1
        })
        .await?;
        // Linked to every server once, it stays ready while a link is up: a server that
        // drains away must not turn every agent unready at once.
        assert!(
            agent.handle.readiness().is_ok(),
            "an agent that lost one of its servers stays ready: {:?}",
            agent.handle.readiness()
        );
    }
    Ok(())
}
