//! 10 000 tunneled connections opened and closed leave no stream and no file descriptor behind.
//!
//! Alone in its test binary so that no other test opens descriptors meanwhile.

use std::time::Duration;

use cplink_e2e::client;
use cplink_e2e::fixture::Loopback;
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::{targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;

fn open_fds() -> anyhow::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// How long the test may take.
const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn ten_thousand_connections_leave_nothing_behind() -> anyhow::Result<()> {
    harness::run(
        "ten_thousand_connections_leave_nothing_behind",
        DEADLINE,
        ten_thousand_connections,
    )
}

async fn ten_thousand_connections(steps: Steps) -> anyhow::Result<()> {
    const CONNECTIONS: usize = 10_000;
    const PARALLEL: usize = 16;
    let lo = Loopback::new()?;
    let (server, agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let refused = targets::closed_port()?;

    // Warm up once so that lazily created state is part of the baseline.
    steps.enter("warming up");
    let mut warm = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    warm.write_all(b"w").await?;
    warm.read_exact(&mut [0u8; 1]).await?;
    drop(warm);
    let (s, a) = (server.handle.clone(), agent.handle.clone());
    wait::until("warm-up stream to close", Duration::from_secs(10), || {
        s.active_streams() == 0 && a.active_streams() == 0
    })
    .await?;
    let baseline = open_fds()?;

    steps.enter("opening and closing the connections");
    let mut workers = Vec::new();
    for w in 0..PARALLEL {
        let uds = server.uds.clone();
        let target = echo.authority();
        let refused = refused.to_string();
        workers.push(AbortOnDropHandle::new(tokio::spawn(async move {
            for i in (w..CONNECTIONS).step_by(PARALLEL) {
                match i % 10 {
                    // Some dials fail: failures must not leak either.
                    0 => {
                        let mut stream = tokio::net::UnixStream::connect(&uds).await?;
                        let answer = client::handshake(&mut stream, &refused).await?;
                        anyhow::ensure!(answer.status == 502, "{answer:?}");
                    }
                    // Some clients vanish mid-stream without a clean close.
                    1 => {
                        let mut stream = client::tunnel_uds(&uds, &target).await?;
                        stream.write_all(b"bye").await?;
                    }
                    _ => {
                        let mut stream = client::tunnel_uds(&uds, &target).await?;
                        let msg = (i as u32).to_be_bytes();
                        stream.write_all(&msg).await?;
                        let mut back = [0u8; 4];
                        stream.read_exact(&mut back).await?;
                        anyhow::ensure!(back == msg, "echo mismatch");
                        stream.shutdown().await?;
                        let mut rest = Vec::new();
                        stream.read_to_end(&mut rest).await?;
                    }
                }
            }
            anyhow::Ok(())
        })));
    }
    for worker in workers {
        worker.await??;
    }

    steps.enter("every stream and descriptor to be released");
    let (s, a) = (server.handle.clone(), agent.handle.clone());
    wait::until("every stream to close", Duration::from_secs(30), || {
        s.active_streams() == 0 && a.active_streams() == 0
    })
    .await?;
    wait::until(
        "file descriptors back to the baseline",
        Duration::from_secs(30),
        || open_fds().is_ok_and(|n| n <= baseline),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: baseline {baseline}, now {:?}", open_fds()))?;

    let metrics = server.handle.metrics_text();
    let ok_dials = CONNECTIONS - CONNECTIONS / 10 + 1;
    assert!(
        metrics.contains(&format!(
            "cplink_server_dials_total{{result=\"ok\"}} {ok_dials}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "cplink_server_dials_total{{result=\"refused\"}} {}",
        CONNECTIONS / 10
    )));
    Ok(())
}
