//! 64 concurrent streams each move 16 MiB of random bytes both ways; every byte arrives, in order.

use cplink_e2e::client::{self, TlsClient};
use std::time::Duration;

use cplink_e2e::fixture::Loopback;
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::targets;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;

const STREAMS: usize = 64;
const BYTES: usize = 16 * 1024 * 1024;
/// How long the test may take.
const DEADLINE: Duration = Duration::from_secs(300);

/// Sends `BYTES` random bytes through an echo destination while reading them back; returns
/// the digests of what was sent and what came back.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    seed: u64,
) -> anyhow::Result<([u8; 32], [u8; 32], usize)> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    // Aborted if reading fails first.
    let send = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut digest = Sha256::new();
        let mut chunk = vec![0u8; 61 * 1024 + 7];
        let mut sent = 0;
        while sent < BYTES {
            let n = chunk.len().min(BYTES - sent);
            rng.fill_bytes(&mut chunk[..n]);
            digest.update(&chunk[..n]);
            writer.write_all(&chunk[..n]).await?;
            sent += n;
        }
        writer.shutdown().await?;
        anyhow::Ok(<[u8; 32]>::from(digest.finalize()))
    }));
    let mut digest = Sha256::new();
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        received += n;
    }
    let sent = send.await??;
    Ok((sent, digest.finalize().into(), received))
}

#[test]
fn sixty_four_streams_of_sixteen_mebibytes_arrive_intact() -> anyhow::Result<()> {
    harness::run(
        "sixty_four_streams_of_sixteen_mebibytes_arrive_intact",
        DEADLINE,
        sixty_four_streams,
    )
}

async fn sixty_four_streams(steps: Steps) -> anyhow::Result<()> {
    steps.enter("opening the streams");
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;

    let mut exchanges = Vec::new();
    for i in 0..STREAMS {
        let target = echo.authority();
        // Half of the streams use each frontend.
        if i % 2 == 0 {
            let stream = client::tunnel_uds(&server.uds, &target).await?;
            exchanges.push(AbortOnDropHandle::new(tokio::spawn(exchange(
                stream, i as u64,
            ))));
        } else {
            let stream = tls.tunnel(server.tls_addr, &target).await?;
            exchanges.push(AbortOnDropHandle::new(tokio::spawn(exchange(
                stream, i as u64,
            ))));
        }
    }
    steps.enter("moving 16 MiB each way on every stream");
    for (i, exchange) in exchanges.into_iter().enumerate() {
        let (sent, received, len) = exchange.await??;
        assert_eq!(len, BYTES, "stream {i} lost or gained bytes");
        assert_eq!(sent, received, "stream {i} corrupted or reordered bytes");
    }
    Ok(())
}
