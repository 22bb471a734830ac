//! The konnectivity gRPC side of cplink-server, with our own gRPC peers: the Proxy frontend
//! (kube-apiserver's `GRPC` mode) over a Unix socket, and upstream agents on the agent port.

use std::time::Duration;

use bytes::Bytes;
use cplink_e2e::fixture::Loopback;
use cplink_e2e::grpc::{self, DialAnswer, ProxyStream, ScriptedAgent};
use cplink_e2e::{client, targets, wait};
use cplink_proto::konnectivity::{Packet, Payload, UNRECOGNIZED_CONNECT_ID};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn close_response(packet: &Packet) -> Option<(i64, &str)> {
    match &packet.payload {
        Some(Payload::CloseResponse(rsp)) => Some((rsp.connect_id, rsp.error.as_str())),
        _ => None,
    }
}

#[tokio::test]
async fn a_grpc_dial_carries_data_both_ways_and_closes() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;

    let (mut stream, id) = ProxyStream::connect(channel.clone(), &echo.authority()).await?;
    stream.write_all(id, b"hello over grpc").await?;
    assert_eq!(stream.read_exact(id, 15).await?, b"hello over grpc");

    // 4 MiB each way, checksummed: every byte arrives, in order.
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let writer = stream.writer();
    let (sent, echoed) = tokio::join!(
        writer.write_all(id, &payload),
        stream.read_exact(id, payload.len())
    );
    sent?;
    assert_eq!(Sha256::digest(echoed?), Sha256::digest(&payload));

    stream.send(Packet::close_request(id)).await?;
    let packet = stream.next().await?.expect("CLOSE_RSP");
    assert_eq!(close_response(&packet), Some((id, "")), "{packet:?}");
    assert!(
        stream.next().await?.is_none(),
        "the stream ends after CLOSE_RSP"
    );

    let handle = server.handle.clone();
    wait::until("no active stream", Duration::from_secs(10), || {
        handle.active_streams() == 0
    })
    .await?;
    let metrics = server.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_dials_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cplink_server_frontend_connections_total{frontend=\"grpc\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn the_destination_closing_first_ends_the_stream_with_close_rsp() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let source = targets::source(100_000, written).await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let (mut stream, id) = ProxyStream::connect(channel, &source.authority()).await?;
    assert_eq!(stream.read_exact(id, 100_000).await?, vec![0x5a; 100_000]);
    let packet = stream.next().await?.expect("CLOSE_RSP");
    assert_eq!(close_response(&packet), Some((id, "")), "{packet:?}");
    Ok(())
}

#[tokio::test]
async fn failed_dials_are_answered_with_the_reason() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;

    let closed = targets::closed_port()?;
    let mut stream = ProxyStream::open(channel.clone(), &closed.to_string(), 11).await?;
    match stream.answer(11).await? {
        DialAnswer::Failed(error) => assert!(error.contains("connection refused"), "{error}"),
        other => panic!("dial to a closed port answered {other:?}"),
    }
    assert!(
        stream.next().await?.is_none(),
        "a failed dial ends the stream"
    );

    let mut stream = ProxyStream::open(channel.clone(), "no port here", 12).await?;
    match stream.answer(12).await? {
        DialAnswer::Failed(error) => assert!(error.contains("bad destination"), "{error}"),
        other => panic!("a malformed address answered {other:?}"),
    }

    // A stream that does not start with a dial is refused with a status.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Packet::close_request(1)).await?;
    let mut client = cplink_proto::konnectivity::ProxyServiceClient::new(channel);
    let result = async {
        let mut inbound = client
            .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        inbound.message().await
    }
    .await;
    let status = result.expect_err("a stream without DIAL_REQ must fail");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("DIAL_REQ"), "{status}");
    Ok(())
}

#[tokio::test]
async fn unknown_connect_ids_are_refused_and_the_connection_survives() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let (mut stream, id) = ProxyStream::connect(channel, &echo.authority()).await?;
    stream.send(Packet::close_request(id + 1000)).await?;
    let packet = stream.next().await?.expect("CLOSE_RSP");
    assert_eq!(
        close_response(&packet),
        Some((id + 1000, UNRECOGNIZED_CONNECT_ID)),
        "{packet:?}"
    );
    stream.write_all(id, b"still here").await?;
    assert_eq!(stream.read_exact(id, 10).await?, b"still here");
    Ok(())
}

#[tokio::test]
async fn dial_cls_cancels_a_pending_dial() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, agent) = lo.pair().await?;
    let hole = targets::black_hole()?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    // The dial hangs at the black hole until the client cancels it.
    let mut stream = ProxyStream::open(channel, &hole.addr.to_string(), 99).await?;
    stream.send(Packet::close_dial(99)).await?;
    assert!(
        stream.next().await?.is_none(),
        "a cancelled dial ends the stream without an answer"
    );
    let handle = server.handle.clone();
    wait::until("the cancel counted", Duration::from_secs(10), || {
        handle
            .metrics_text()
            .contains("cplink_server_dials_total{result=\"cancelled\"} 1")
    })
    .await?;
    // The agent stops dialing the black hole too, long before its dial timeout.
    let agent_handle = agent.handle.clone();
    wait::until(
        "the agent to give up the dial",
        Duration::from_secs(3),
        || {
            agent_handle
                .metrics_text()
                .contains("cplink_agent_dials_total{result=\"cancelled\"} 1")
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_upstream_agent_is_routed_dials_and_carries_their_bytes() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo
        .start_server(&["--server-count", "3", "--strategies", "node,cidr"])
        .await?;
    let tls = grpc::agent_h2_tls(&lo.agent_cert, lo.pki.ca_file())?;
    let mut agent = ScriptedAgent::link(
        server.agent_addr,
        tls,
        "upstream-1",
        "host=node-7&ipv4=127.0.0.77&cidr=10.244.7.0/24",
    )
    .await?;
    assert_eq!(agent.server_id, "server-0");
    assert_eq!(agent.server_count, 3);
    server.wait_for_agents(1).await?;
    assert_eq!(server.handle.agent_ids(), vec!["upstream-1".to_owned()]);

    // A CONNECT by node name reaches the upstream agent as DIAL_REQ.
    let uds = server.uds.clone();
    let frontend = tokio::spawn(async move {
        let mut stream = client::tunnel_uds(&uds, "node-7:10250").await?;
        stream.write_all(b"ping").await?;
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await?;
        stream.shutdown().await?;
        anyhow::Ok(answer)
    });
    let random = match agent.next().await?.payload {
        Some(Payload::DialRequest(dial)) => {
            assert_eq!(dial.address, "node-7:10250");
            assert_eq!(dial.protocol, "tcp");
            dial.random
        }
        other => panic!("expected DIAL_REQ, got {other:?}"),
    };
    agent.send(Packet::dial_established(random, 1)).await?;
    match agent.next().await?.payload {
        Some(Payload::Data(data)) => {
            assert_eq!(data.connect_id, 1);
            assert_eq!(data.data, b"ping");
        }
        other => panic!("expected DATA, got {other:?}"),
    }
    agent
        .send(Packet::data(1, Bytes::from_static(b"pong")))
        .await?;
    // The client's FIN closes the connection (konnectivity has no half-close).
    match agent.next().await?.payload {
        Some(Payload::CloseRequest(close)) => assert_eq!(close.connect_id, 1),
        other => panic!("expected CLOSE_REQ, got {other:?}"),
    }
    agent.send(Packet::close_response(1, "")).await?;
    assert_eq!(&frontend.await??, b"pong");

    // A dial error from the agent reaches the client with its status.
    let uds = server.uds.clone();
    let refused = tokio::spawn(async move {
        let mut stream = tokio::net::UnixStream::connect(&uds).await?;
        client::handshake(&mut stream, "127.0.0.77:10250").await
    });
    let random = match agent.next().await?.payload {
        Some(Payload::DialRequest(dial)) => dial.random,
        other => panic!("expected DIAL_REQ, got {other:?}"),
    };
    agent
        .send(Packet::dial_failed(
            random,
            "dial tcp 127.0.0.77:10250: connect: connection refused",
        ))
        .await?;
    let answer = refused.await??;
    assert_eq!(answer.status, 502, "{answer:?}");

    // A gRPC frontend dial into the agent's pod range, cancelled by the client before the
    // agent answers, is cancelled at the agent too.
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let stream = ProxyStream::open(channel, "10.244.7.9:8080", 5).await?;
    let random = match agent.next().await?.payload {
        Some(Payload::DialRequest(dial)) => dial.random,
        other => panic!("expected DIAL_REQ, got {other:?}"),
    };
    stream.send(Packet::close_dial(5)).await?;
    match agent.next().await?.payload {
        Some(Payload::CloseDial(cancel)) => assert_eq!(cancel.random, random),
        other => panic!("expected DIAL_CLS, got {other:?}"),
    }

    // DRAIN: no new dials for this agent; with no other agent the dial fails at once.
    agent.send(Packet::drain()).await?;
    let handle = server.handle.clone();
    let uds = server.uds.clone();
    wait::until_async("dials refused after DRAIN", Duration::from_secs(10), || {
        let uds = uds.clone();
        async move {
            let Ok(mut stream) = tokio::net::UnixStream::connect(&uds).await else {
                return false;
            };
            // A dial that raced the DRAIN reaches the agent, which never answers it.
            let answer = tokio::time::timeout(
                Duration::from_millis(500),
                client::handshake(&mut stream, "node-7:10250"),
            )
            .await;
            matches!(answer, Ok(Ok(a)) if a.status == 503)
        }
    })
    .await?;
    drop(agent);
    wait::until("the agent unlinked", Duration::from_secs(10), || {
        handle.linked_agents() == 0
    })
    .await?;
    Ok(())
}

/// konnectivity-client's connection reads a DATA packet without bytes as its end: one from an
/// upstream agent is not passed on, and the bytes behind it are.
#[tokio::test]
async fn an_empty_data_packet_from_an_upstream_agent_does_not_reach_the_client()
-> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--strategies", "node"]).await?;
    let tls = grpc::agent_h2_tls(&lo.agent_cert, lo.pki.ca_file())?;
    let mut agent = ScriptedAgent::link(
        server.agent_addr,
        tls,
        "upstream-1",
        "host=node-7&ipv4=127.0.0.77",
    )
    .await?;
    server.wait_for_agents(1).await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let mut stream = ProxyStream::open(channel, "node-7:10250", 3).await?;
    let random = match agent.next().await?.payload {
        Some(Payload::DialRequest(dial)) => dial.random,
        other => panic!("expected DIAL_REQ, got {other:?}"),
    };
    agent.send(Packet::dial_established(random, 1)).await?;
    let DialAnswer::Connected(id) = stream.answer(3).await? else {
        panic!("the dial failed");
    };
    agent.send(Packet::data(1, Bytes::new())).await?;
    agent
        .send(Packet::data(1, Bytes::from_static(b"after")))
        .await?;
    agent.send(Packet::close_response(1, "")).await?;
    assert_eq!(
        stream.next().await?,
        Some(Packet::data(id, Bytes::from_static(b"after"))),
        "the first packet after the dial answer carries bytes"
    );
    let packet = stream.next().await?.expect("CLOSE_RSP");
    assert_eq!(close_response(&packet), Some((id, "")), "{packet:?}");
    Ok(())
}

/// Newer clients open a stream per dial on one connection, older ones (konnectivity-client
/// v0.0.14, in Kubernetes 1.20) a connection per dial.
#[tokio::test]
async fn streams_on_one_connection_and_a_connection_per_dial_both_work() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let shared = grpc::uds_channel(&server.grpc_uds).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20usize {
        let channel = if i < 16 {
            shared.clone()
        } else {
            grpc::uds_channel(&server.grpc_uds).await?
        };
        let address = echo.authority();
        tasks.spawn(async move {
            let (stream, id) = ProxyStream::connect(channel, &address).await?;
            let io = stream.into_io(id);
            let message = format!("message {i} ").repeat(1000 + i);
            let (mut reader, mut writer) = tokio::io::split(io);
            let (written, back) = tokio::join!(writer.write_all(message.as_bytes()), async {
                let mut back = vec![0u8; message.len()];
                reader.read_exact(&mut back).await.map(|_| back)
            });
            written?;
            anyhow::ensure!(back? == message.as_bytes(), "stream {i}: wrong bytes back");
            // The close is answered, and ends the read side.
            writer.shutdown().await?;
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).await?;
            anyhow::ensure!(
                rest.is_empty(),
                "stream {i}: {} bytes after the echo",
                rest.len()
            );
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let metrics = server.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_dials_total{result=\"ok\"} 20"),
        "{metrics}"
    );
    Ok(())
}

/// An upstream agent that stops reading its stream stalls its own connections only: dials and
/// bytes through a native agent on the same server carry on.
#[tokio::test]
async fn a_stalled_upstream_agent_does_not_stall_native_links() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo
        .start_server(&["--strategies", "node", "--dial-timeout", "30s"])
        .await?;
    let _native = lo
        .start_agent(
            &[server.agent_addr],
            &["--node-name", "native", "--host-ip", "127.0.0.1"],
        )
        .await?;
    let tls = grpc::agent_h2_tls(&lo.agent_cert, lo.pki.ca_file())?;
    let mut upstream =
        ScriptedAgent::link(server.agent_addr, tls, "upstream", "host=stalled").await?;
    server.wait_for_agents(2).await?;

    // A connection through the upstream agent, then the agent stops reading.
    let uds = server.uds.clone();
    let flood = tokio::spawn(async move {
        let mut stream = client::tunnel_uds(&uds, "stalled:10250").await?;
        let chunk = vec![0x42u8; 64 * 1024];
        // Far more than the server queues for one agent; this blocks once the queue is full.
        for _ in 0..1024 {
            stream.write_all(&chunk).await?;
        }
        anyhow::Ok(())
    });
    let random = match upstream.next().await?.payload {
        Some(Payload::DialRequest(dial)) => dial.random,
        other => panic!("expected DIAL_REQ, got {other:?}"),
    };
    upstream.send(Packet::dial_established(random, 1)).await?;
    let handle = server.handle.clone();
    wait::until(
        "the upstream connection to be open",
        Duration::from_secs(10),
        || handle.active_streams() == 1,
    )
    .await?;

    let echo = targets::echo().await?;
    for i in 0..20u8 {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(10),
            client::tunnel_uds(&server.uds, &echo.authority()),
        )
        .await??;
        stream.write_all(&[i; 1000]).await?;
        let mut back = [0u8; 1000];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back)).await??;
        assert_eq!(back, [i; 1000]);
    }
    assert!(
        !flood.is_finished(),
        "the stalled agent's connection is held back"
    );
    flood.abort();
    Ok(())
}
