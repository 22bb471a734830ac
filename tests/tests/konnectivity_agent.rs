//! cplink-agent in konnectivity mode against cplink-server's AgentService: both halves of the
//! upstream agent protocol exercised by our own peers, behind a load balancer as upstream
//! deployments run them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cplink_e2e::fixture::{Loopback, RunningServer};
use cplink_e2e::grpc::{self, ProxyStream};
use cplink_e2e::metrics::counter;
use cplink_e2e::{client, targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP load balancer handing connections to `backends` in turn.
async fn round_robin(backends: Vec<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

async fn echo_through(server: &RunningServer, target: &str) -> anyhow::Result<()> {
    let mut stream = client::tunnel_uds(&server.uds, target).await?;
    stream.write_all(b"over connect").await?;
    let mut back = [0u8; 12];
    stream.read_exact(&mut back).await?;
    anyhow::ensure!(&back == b"over connect", "CONNECT echo mismatch");

    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let (mut stream, id) = ProxyStream::connect(channel, target).await?;
    stream.write_all(id, b"over grpc").await?;
    anyhow::ensure!(
        stream.read_exact(id, 9).await? == b"over grpc",
        "gRPC echo mismatch"
    );
    Ok(())
}

#[tokio::test]
async fn a_konnectivity_mode_agent_links_to_every_server_behind_a_balancer() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let servers = [
        lo.start_server(&["--server-count", "2"]).await?,
        lo.start_server(&["--server-count", "2"]).await?,
    ];
    let balancer = round_robin(servers.iter().map(|s| s.agent_addr).collect()).await?;
    let agent = lo
        .start_agent(
            &[balancer],
            &["--protocol", "konnectivity", "--node-name", "node-1"],
        )
        .await?;
    agent.wait_ready().await?;
    let ids = agent.server_ids();
    assert_eq!(ids, vec!["server-0".to_owned(), "server-1".to_owned()]);
    for server in &servers {
        server.wait_for_agents(1).await?;
    }

    let echo = targets::echo().await?;
    for server in &servers {
        echo_through(server, &echo.authority()).await?;
    }
    let dials = counter(
        &agent.handle.metrics_text(),
        "cplink_agent_dials_total",
        "result=\"ok\"",
    );
    assert_eq!(dials, 4.0, "every dial went through the konnectivity agent");

    // A refused dial comes back as the same failure a native agent reports.
    let closed = targets::closed_port()?;
    let mut stream = tokio::net::UnixStream::connect(&servers[0].uds).await?;
    let answer = client::handshake(&mut stream, &closed.to_string()).await?;
    assert_eq!(answer.status, 502, "{answer:?}");

    // Draining: the servers stop routing to the agent, its links close, and it exits.
    agent.begin_shutdown();
    for server in &servers {
        let handle = server.handle.clone();
        wait::until("the agent to leave", Duration::from_secs(15), || {
            handle.linked_agents() == 0
        })
        .await?;
    }
    tokio::time::timeout(Duration::from_secs(15), agent.join()).await?;
    Ok(())
}
