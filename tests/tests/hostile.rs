//! Silent connections by the hundred on a server with few file descriptors.
//!
//! The only test of its binary: it lowers the process's open-files limit, which the in-process
//! server, agent, destinations and clients then share.

use std::time::Duration;

use cplink_e2e::fixture::Loopback;
use cplink_e2e::{client, http1, targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The process's open-files limit during the test.
const FILES: u64 = 512;

/// Silent connections opened against each TCP listener: together far more than the limit.
const SILENT: usize = 150;

async fn echo(
    stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
    n: u64,
) -> anyhow::Result<()> {
    stream.write_u64(n).await?;
    stream.flush().await?;
    anyhow::ensure!(stream.read_u64().await? == n, "echo mismatch");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_starve_established_traffic_or_the_admin_port()
-> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, FILES.min(hard), hard)?;

    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo_target = targets::echo().await?;
    let mut established = client::tunnel_uds(&server.uds, &echo_target.authority()).await?;
    echo(&mut established, 0).await?;

    // Silent clients: TCP connected, never a TLS byte, on the agent port and the TLS frontend.
    let mut silent = Vec::new();
    for addr in [server.agent_addr, server.tls_addr] {
        for _ in 0..SILENT {
            silent.push(TcpStream::connect(addr).await?);
        }
    }

    // Connections over the cap were closed at once, so their descriptors came back.
    let handle = server.handle.clone();
    let shed = |listener: &str| -> u64 {
        let prefix = format!("cplink_server_connections_shed_total{{listener=\"{listener}\"}} ");
        handle
            .metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|n| n.trim().parse().ok()))
            .unwrap_or(0)
    };
    wait::until(
        "silent connections over the cap shed on both listeners",
        Duration::from_secs(10),
        || shed("agent") > 0 && shed("frontend") > 0,
    )
    .await?;
    let mut closed = 0;
    for stream in &mut silent {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    eprintln!(
        "{} silent connections: {closed} closed by the server at once, shed agent {} frontend {}",
        silent.len(),
        shed("agent"),
        shed("frontend")
    );
    assert!(closed > 0, "no silent connection was closed");

    // Meanwhile established traffic flows, a new tunnel through the other frontend opens, and
    // the admin port answers.
    for n in 1..100 {
        echo(&mut established, n).await?;
    }
    let mut fresh = client::tunnel_uds(&server.uds, &echo_target.authority()).await?;
    echo(&mut fresh, 7).await?;
    // A 200 or an error.
    let metrics = http1::get(server.admin_addr, "/metrics").await?;
    assert!(
        metrics.contains("cplink_server_connections_shed_total"),
        "{metrics}"
    );

    // Once the silent clients are gone, the capped listeners take new clients again.
    drop(silent);
    let tls = client::TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let addr = server.tls_addr;
    let target = echo_target.authority();
    wait::until_async(
        "a TLS tunnel once the silent clients left",
        Duration::from_secs(20),
        || {
            let tls = tls.clone();
            let target = target.clone();
            async move {
                match tls.tunnel(addr, &target).await {
                    Ok(mut stream) => echo(&mut stream, 9).await.is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await?;
    Ok(())
}
