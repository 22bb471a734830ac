//! Flow through upstream konnectivity agents, which carry every connection on one gRPC stream
//! without per-connection flow control: the server must keep reading an agent's
//! stream whatever one connection does, or an agent whose two directions are coupled (as
//! upstream's are) deadlocks with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cplink_e2e::client::{self, TlsClient};
use cplink_e2e::fixture::{Loopback, RunningServer};
use cplink_e2e::grpc::{self, CoupledAgent, ECHO_PORT, FLOOD_BYTES, FLOOD_PORT, ScriptedAgent};
use cplink_e2e::wait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes sent each way by a bulk transfer.
const BULK: usize = 32 * 1024 * 1024;
/// How long a bulk transfer may take (a debug build, two cores).
const BULK_DEADLINE: Duration = Duration::from_secs(120);
/// How long one small round trip may take.
const ROUND_TRIP: Duration = Duration::from_secs(10);

async fn server_with_coupled_agent(lo: &Loopback) -> anyhow::Result<(RunningServer, CoupledAgent)> {
    let server = lo.start_server(&["--strategies", "node"]).await?;
    let tls = grpc::agent_h2_tls(&lo.agent_cert, lo.pki.ca_file())?;
    let agent = ScriptedAgent::link(server.agent_addr, tls, "upstream", "host=node-u").await?;
    server.wait_for_agents(1).await?;
    Ok((server, CoupledAgent::serve(agent)))
}

/// Deterministic bytes that do not repeat within a transfer (xorshift).
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Writes [`BULK`] bytes and reads them back at the same time; compares their digests.
async fn bulk_echo<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> anyhow::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async move {
        let mut digest = Sha256::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..BULK / buf.len() {
            fill(&mut state, &mut buf);
            digest.update(&buf);
            writer.write_all(&buf).await?;
        }
        // A TLS stream may hold the last bytes in its buffer until flushed.
        writer.flush().await?;
        anyhow::Ok((digest.finalize(), writer))
    };
    let read = async move {
        let mut digest = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < BULK {
            let n = reader.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the echo ended after {total} bytes");
            digest.update(&buf[..n]);
            total += n;
        }
        anyhow::Ok(digest.finalize())
    };
    let (written, read) = tokio::try_join!(write, read)?;
    assert_eq!(written.0, read, "every byte came back, in order");
    Ok(())
}

/// Round trips of 100 bytes on `stream` until `done`; how many completed.
async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    done: &AtomicBool,
) -> anyhow::Result<usize> {
    let mut trips = 0;
    while !done.load(Ordering::Relaxed) {
        let message = [trips as u8; 100];
        let mut back = [0u8; 100];
        tokio::time::timeout(ROUND_TRIP, async {
            stream.write_all(&message).await?;
            stream.flush().await?;
            stream.read_exact(&mut back).await
        })
        .await
        .map_err(|_| anyhow::anyhow!("round trip {trips} took more than {ROUND_TRIP:?}"))??;
        anyhow::ensure!(back == message, "round trip {trips} came back wrong");
        trips += 1;
    }
    Ok(trips)
}

/// A bulk transfer both ways on one connection while another connection of the same agent
/// keeps making round trips.
async fn bulk_while_small_round_trips<S, F, Fut>(open: F) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<S>>,
{
    let echo = format!("node-u:{ECHO_PORT}");
    let bulk = open(echo.clone()).await?;
    let small = open(echo).await?;
    let done = Arc::new(AtomicBool::new(false));
    let trips = tokio::spawn({
        let done = done.clone();
        async move { round_trips(small, &done).await }
    });
    let bulk = tokio::time::timeout(BULK_DEADLINE, bulk_echo(bulk)).await;
    done.store(true, Ordering::Relaxed);
    bulk.map_err(|_| anyhow::anyhow!("the bulk transfer stalled"))??;
    let trips = trips.await??;
    assert!(
        trips > 0,
        "the small connection made no round trip during the bulk"
    );
    Ok(())
}

#[tokio::test]
async fn bulk_both_ways_through_the_uds_frontend_with_a_coupled_agent() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, agent) = server_with_coupled_agent(&lo).await?;
    let uds = server.uds.clone();
    bulk_while_small_round_trips(|target| {
        let uds = uds.clone();
        async move { client::tunnel_uds(&uds, &target).await }
    })
    .await?;
    assert!(!agent.is_finished(), "the agent's stream is still up");
    assert!(
        server
            .handle
            .metrics_text()
            .contains("cplink_server_konnectivity_overflows_total 0"),
        "a reader that keeps up is never cut"
    );
    Ok(())
}

#[tokio::test]
async fn bulk_both_ways_through_the_tls_frontend_with_a_coupled_agent() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, agent) = server_with_coupled_agent(&lo).await?;
    let client = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let addr = server.tls_addr;
    bulk_while_small_round_trips(|target| {
        let client = client.clone();
        async move { client.tunnel(addr, &target).await }
    })
    .await?;
    assert!(!agent.is_finished(), "the agent's stream is still up");
    Ok(())
}

/// The agent sends 64 MiB on one connection, reading nothing meanwhile (as an upstream agent
/// whose send is blocked does); that connection's client reads nothing. The server must keep
/// reading the agent's stream: it cuts the stalled connection at its budget, and the agent's
/// other connection carries on.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_at_the_budget_and_the_others_carry_on()
-> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, agent) = server_with_coupled_agent(&lo).await?;
    let mut small = client::tunnel_uds(&server.uds, &format!("node-u:{ECHO_PORT}")).await?;
    let mut stalled = client::tunnel_uds(&server.uds, &format!("node-u:{FLOOD_PORT}")).await?;

    let handle = server.handle.clone();
    wait::until("the stalled connection to be cut", BULK_DEADLINE, || {
        handle
            .metrics_text()
            .contains("cplink_server_konnectivity_overflows_total 1")
    })
    .await?;
    // The agent got through its flood and is told (CLOSE_REQ for the second connection) ...
    wait::until("the agent to be told", BULK_DEADLINE, || {
        agent.closed_by_server() == [2]
    })
    .await?;
    // ... the other connection still works ...
    small.write_all(b"still here").await?;
    let mut back = [0u8; 10];
    tokio::time::timeout(ROUND_TRIP, small.read_exact(&mut back)).await??;
    assert_eq!(&back, b"still here");
    // ... and the stalled client sees its connection end short of what was sent.
    let mut received = 0;
    let ended = tokio::time::timeout(ROUND_TRIP, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled connection was closed");
    assert!(received < FLOOD_BYTES, "{received} bytes");
    assert!(!agent.is_finished(), "the agent's stream is still up");
    Ok(())
}
