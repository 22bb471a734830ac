//! Link liveness, recovery and graceful shutdown, in-process on loopback.

use std::time::Duration;

use cplink_e2e::client;
use cplink_e2e::fixture::Loopback;
use cplink_e2e::{targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

async fn round_trip(stream: &mut tokio::net::UnixStream, msg: &[u8]) -> anyhow::Result<()> {
    stream.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    anyhow::ensure!(back == msg, "echo mismatch");
    Ok(())
}

#[tokio::test]
async fn the_agent_relinks_after_the_server_restarts() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let echo = targets::echo().await?;
    let server = lo.start_server(&[]).await?;
    let agent_addr = server.agent_addr;
    let agent = lo.start_agent(&[agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let mut stream = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    round_trip(&mut stream, b"before").await?;
    drop(stream);

    server.stop().await;
    let handle = agent.handle.clone();
    wait::until(
        "the agent to notice the server is gone",
        Duration::from_secs(20),
        || handle.readiness().is_err(),
    )
    .await?;

    // Same agent port, new server process; the agent is not restarted.
    let server = lo.start_server_on(agent_addr, &[]).await?;
    server.wait_for_agents(1).await?;
    agent.wait_ready().await?;
    let mut stream = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    round_trip(&mut stream, b"after").await?;
    let metrics = agent.handle.metrics_text();
    assert!(
        metrics.contains("cplink_agent_link_attempts_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    Ok(())
}

/// A TCP relay that can be frozen: it keeps both connections open but stops forwarding, as a
/// broken middlebox or a partitioned network does. It stops, its connections with it, when
/// the [`Relay`] is dropped.
struct Relay {
    address: std::net::SocketAddr,
    freeze: watch::Sender<bool>,
    _task: AbortOnDropHandle<()>,
}

async fn freezable_relay(upstream: std::net::SocketAddr) -> anyhow::Result<Relay> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (freeze, frozen) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((inbound, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            // A refused upstream closes this connection; the next accept waits for the next.
            let Ok(outbound) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            connections.spawn(forward(ir, ow, frozen.clone()));
            connections.spawn(forward(or, iw, frozen.clone()));
        }
    });
    Ok(Relay {
        address,
        freeze,
        _task: AbortOnDropHandle::new(task),
    })
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *frozen.borrow() {
            // Hold the connection open, forward nothing, forever.
            let _ = frozen.wait_for(|f| !*f).await;
            std::future::pending::<()>().await;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
            },
            changed = frozen.changed() => {
                if changed.is_err() {
                    // Nobody can freeze it any more: plain forwarding from here (waiting on
                    // `changed` again would return at once, forever).
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_silent_link_is_declared_dead_by_the_keepalive() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let keepalive = [
        "--keepalive-interval",
        "200ms",
        "--keepalive-timeout",
        "400ms",
    ];
    let server = lo.start_server(&keepalive).await?;
    let relay = freezable_relay(server.agent_addr).await?;
    let agent = lo.start_agent(&[relay.address], &keepalive).await?;
    server.wait_for_agents(1).await?;
    agent.wait_ready().await?;

    relay.freeze.send(true)?;
    // TCP stays up; only the PINGs go unanswered.
    server.wait_for_agents(0).await?;
    let handle = agent.handle.clone();
    wait::until(
        "the agent to drop the silent link",
        Duration::from_secs(20),
        || {
            handle
                .metrics_text()
                .contains("cplink_agent_link_attempts_total{result=\"keepalive\"}")
        },
    )
    .await?;
    let metrics = server.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_link_errors_total{reason=\"keepalive\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_draining_server_finishes_in_flight_streams_and_takes_no_new_ones() -> anyhow::Result<()>
{
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let mut in_flight = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    round_trip(&mut in_flight, b"one").await?;

    server.begin_shutdown();
    let handle = server.handle.clone();
    wait::until("readiness to drop", Duration::from_secs(10), || {
        handle.readiness().is_err()
    })
    .await?;
    // New connections are refused: the socket is gone.
    let uds = server.uds.clone();
    wait::until(
        "the frontend socket to close",
        Duration::from_secs(10),
        || !uds.exists(),
    )
    .await?;
    assert!(tokio::net::UnixStream::connect(&server.uds).await.is_err());

    // The in-flight stream still works and ends cleanly.
    round_trip(&mut in_flight, b"two").await?;
    in_flight.shutdown().await?;
    let mut rest = Vec::new();
    in_flight.read_to_end(&mut rest).await?;
    assert!(rest.is_empty());
    tokio::time::timeout(Duration::from_secs(10), server.join()).await?;
    Ok(())
}

#[tokio::test]
async fn the_drain_deadline_cuts_streams_that_do_not_finish() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--drain-timeout", "300ms"]).await?;
    let _agent = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let echo = targets::echo().await?;
    let mut idle = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    server.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.join()).await?;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "cut stream must end: {n:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_draining_agent_finishes_in_flight_streams_while_new_dials_go_elsewhere()
-> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let draining = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let echo = targets::echo().await?;
    let mut in_flight = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    round_trip(&mut in_flight, b"one").await?;
    assert_eq!(draining.handle.active_streams(), 1);

    let staying = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(2).await?;
    draining.begin_shutdown();
    let handle = draining.handle.clone();
    wait::until(
        "the agent to report draining",
        Duration::from_secs(10),
        || handle.readiness().is_err(),
    )
    .await?;

    // New dials all land on the agent that stays.
    for i in 0..20u8 {
        let mut stream = client::tunnel_uds(&server.uds, &echo.authority()).await?;
        round_trip(&mut stream, &[i]).await?;
        assert_eq!(
            staying.handle.active_streams(),
            1,
            "dial {i} went to the draining agent"
        );
        drop(stream);
        let staying_handle = staying.handle.clone();
        wait::until("the stream to close", Duration::from_secs(10), || {
            staying_handle.active_streams() == 0
        })
        .await?;
    }

    // The in-flight stream finishes normally, then the agent exits.
    round_trip(&mut in_flight, b"two").await?;
    in_flight.shutdown().await?;
    let mut rest = Vec::new();
    in_flight.read_to_end(&mut rest).await?;
    tokio::time::timeout(Duration::from_secs(10), draining.join()).await?;
    server.wait_for_agents(1).await?;
    Ok(())
}

/// A connection that stays open and idle (as kube-apiserver keeps its kubelet connections)
/// holds a draining agent only until its drain timeout: then the agent closes it and exits.
#[tokio::test]
async fn a_draining_agent_exits_at_its_drain_timeout_though_an_idle_connection_stays_open()
-> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let agent = lo
        .start_agent(&[server.agent_addr], &["--drain-timeout", "300ms"])
        .await?;
    server.wait_for_agents(1).await?;
    let echo = targets::echo().await?;
    let mut idle = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    round_trip(&mut idle, b"then silence").await?;

    agent.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(15), agent.join())
        .await
        .map_err(|_| anyhow::anyhow!("the agent still runs 15 s after a 300 ms drain timeout"))?;
    // The idle connection was cut, visibly.
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await?;
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "the idle connection ended: {end:?}"
    );
    Ok(())
}

#[tokio::test]
async fn during_the_shutdown_delay_the_server_is_not_ready_but_still_serves() -> anyhow::Result<()>
{
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--shutdown-delay", "5s"]).await?;
    let _agent = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let echo = targets::echo().await?;

    server.begin_shutdown();
    let handle = server.handle.clone();
    wait::until("readiness to drop", Duration::from_secs(10), || {
        handle.readiness().is_err()
    })
    .await?;
    // Load balancers have not caught up yet: a client they still send here is served.
    let mut late = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    round_trip(&mut late, b"late but served").await?;
    assert!(server.handle.readiness().is_err());

    // Then the listeners close and the drain finishes the connection it still has.
    let uds = server.uds.clone();
    wait::until(
        "the frontend socket to close",
        Duration::from_secs(20),
        || !uds.exists(),
    )
    .await?;
    round_trip(&mut late, b"still served").await?;
    late.shutdown().await?;
    let mut rest = Vec::new();
    late.read_to_end(&mut rest).await?;
    tokio::time::timeout(Duration::from_secs(20), server.join()).await?;
    Ok(())
}
