//! What newer clusters send to the konnectivity gRPC frontend, byte for byte where it matters:
//! the `:authority` kube-apiserver's gRPC library derives from the socket path, and
//! konnectivity-client's DIAL_CLS and CLOSE_REQ.

use std::time::Duration;

use bytes::Bytes;
use cplink_e2e::fixture::Loopback;
use cplink_e2e::grpc::{self, ProxyStream, ScriptedAgent};
use cplink_e2e::grpc_wire::{self, Event, WireClient};
use cplink_e2e::{targets, wait};
use cplink_proto::konnectivity::{Packet, Payload};

/// Dials `address` on a new stream and returns the connect id.
async fn dial(
    client: &mut WireClient,
    stream_id: u32,
    headers: &[(String, String)],
    address: &str,
) -> anyhow::Result<i64> {
    client.open(stream_id, headers).await?;
    let random = i64::from(stream_id) * 1000 + 1;
    client
        .send(stream_id, &Packet::dial_request(address, random))
        .await?;
    match client.packet(stream_id).await?.payload {
        Some(Payload::DialResponse(rsp)) if rsp.random == random && rsp.error.is_empty() => {
            Ok(rsp.connect_id)
        }
        other => anyhow::bail!("expected a successful DIAL_RSP, got {other:?}"),
    }
}

/// kube-apiserver up to 1.28 (grpc-go before 1.58) names the socket path as it is; 1.29 and
/// later (grpc-go 1.58 and later) percent-encode it. Both reach the Proxy service, on one
/// connection per dial and on several streams of one connection (the HPACK dynamic table then
/// carries the authority from one request to the next).
#[tokio::test]
async fn both_socket_path_authorities_kube_apiserver_sends_are_served() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let sent = [
        (grpc_wire::SOCKET_PATH, "grpc-go/1.56.3"),
        (grpc_wire::SOCKET_PATH_ENCODED, "grpc-go/1.58.3"),
    ];
    for (authority, user_agent) in sent {
        let headers = grpc_wire::proxy_request_headers(authority, user_agent);
        let mut client = WireClient::connect(&server.grpc_uds).await?;
        for stream_id in [1u32, 3, 5] {
            let id = dial(&mut client, stream_id, &headers, &echo.authority()).await?;
            let message = format!("{authority} stream {stream_id}");
            client
                .send(stream_id, &Packet::data(id, Bytes::from(message.clone())))
                .await?;
            match client.packet(stream_id).await?.payload {
                Some(Payload::Data(data)) => assert_eq!(data.data, message.as_bytes()),
                other => panic!("{authority}: expected the echo, got {other:?}"),
            }
            client.send(stream_id, &Packet::close_request(id)).await?;
            match client.packet(stream_id).await?.payload {
                Some(Payload::CloseResponse(rsp)) => {
                    assert_eq!((rsp.connect_id, rsp.error.as_str()), (id, ""));
                }
                other => panic!("{authority}: expected CLOSE_RSP, got {other:?}"),
            }
            // The call ends with grpc-status 0.
            let trailers = loop {
                match client.next_on(stream_id).await? {
                    Event::Headers(headers)
                        if grpc_wire::field(&headers, "grpc-status").is_some() =>
                    {
                        break headers;
                    }
                    Event::Headers(_) => {}
                    other => panic!("{authority}: expected trailers, got {other:?}"),
                }
            };
            assert_eq!(
                grpc_wire::field(&trailers, "grpc-status"),
                Some("0"),
                "{trailers:?}"
            );
        }
    }
    let metrics = server.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_dials_total{result=\"ok\"} 6"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("cplink_server_frontend_request_errors_total{"),
        "{metrics}"
    );
    Ok(())
}

fn close_rsp_error(packet: &Packet) -> Option<&str> {
    match &packet.payload {
        Some(Payload::CloseResponse(rsp)) => Some(rsp.error.as_str()),
        _ => None,
    }
}

/// Far less than the 5 s an agent's end is given to finish after the client's close, and than
/// konnectivity-client's 10 s wait for CLOSE_RSP.
const PROMPT: Duration = Duration::from_secs(2);

/// konnectivity-client's `Close` sends CLOSE_REQ, waits up to 10 s for CLOSE_RSP and reads
/// nothing more. A destination that ignores the close and keeps sending does not hold the
/// answer back: CLOSE_RSP comes at once, nothing follows it, and the agent's end is cut once
/// its grace has passed.
#[tokio::test]
async fn close_req_is_answered_at_once_while_the_destination_keeps_sending() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, agent) = lo.pair().await?;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let firehose = targets::source(u64::MAX, written).await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let (mut stream, id) = ProxyStream::connect(channel, &firehose.authority()).await?;
    stream.read_exact(id, 256 * 1024).await?;

    let asked = tokio::time::Instant::now();
    stream.send(Packet::close_request(id)).await?;
    let answer = loop {
        let packet = stream.next().await?.expect("CLOSE_RSP before the end");
        match &packet.payload {
            // Bytes already on their way when the client closed.
            Some(Payload::Data(data)) if data.connect_id == id => {}
            _ => break packet,
        }
    };
    let took = asked.elapsed();
    assert_eq!(close_rsp_error(&answer), Some(""), "{answer:?}");
    assert!(took < PROMPT, "CLOSE_RSP took {took:?}");
    assert!(
        stream.next().await?.is_none(),
        "nothing follows CLOSE_RSP: the call ends"
    );

    // The destination never stops on its own: the agent's end is reset after its grace, and
    // the agent lets the destination go.
    let (server_handle, agent_handle) = (server.handle.clone(), agent.handle.clone());
    wait::until("both ends to let go", Duration::from_secs(15), || {
        server_handle.active_streams() == 0 && agent_handle.active_streams() == 0
    })
    .await?;
    Ok(())
}

/// An upstream agent slow to confirm the close holds nothing up either: the client's bytes
/// and then CLOSE_REQ reach the agent in order, the client has its CLOSE_RSP before the agent
/// said anything, and the connection is forgotten when the agent never answers.
#[tokio::test]
async fn close_req_through_an_upstream_agent_is_answered_before_the_agent_confirms()
-> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--strategies", "node"]).await?;
    let tls = grpc::agent_h2_tls(&lo.agent_cert, lo.pki.ca_file())?;
    let mut agent = ScriptedAgent::link(server.agent_addr, tls, "upstream", "host=node-9").await?;
    server.wait_for_agents(1).await?;

    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let mut stream = ProxyStream::open(channel, "node-9:10250", 41).await?;
    let random = match agent.next().await?.payload {
        Some(Payload::DialRequest(dial)) => dial.random,
        other => panic!("expected DIAL_REQ, got {other:?}"),
    };
    agent.send(Packet::dial_established(random, 3)).await?;
    let id = match stream.answer(41).await? {
        grpc::DialAnswer::Connected(id) => id,
        other => panic!("dial answered {other:?}"),
    };
    stream
        .send(Packet::data(id, Bytes::from_static(b"last words")))
        .await?;
    let asked = tokio::time::Instant::now();
    stream.send(Packet::close_request(id)).await?;
    let answer = stream.next().await?.expect("CLOSE_RSP");
    assert_eq!(close_rsp_error(&answer), Some(""), "{answer:?}");
    assert!(
        asked.elapsed() < PROMPT,
        "CLOSE_RSP took {:?}",
        asked.elapsed()
    );
    assert!(
        stream.next().await?.is_none(),
        "the call ends after CLOSE_RSP"
    );

    match agent.next().await?.payload {
        Some(Payload::Data(data)) => {
            assert_eq!((data.connect_id, &data.data[..]), (3, &b"last words"[..]));
        }
        other => panic!("expected DATA, got {other:?}"),
    }
    match agent.next().await?.payload {
        Some(Payload::CloseRequest(close)) => assert_eq!(close.connect_id, 3),
        other => panic!("expected CLOSE_REQ, got {other:?}"),
    }
    // The agent never answers: the connection is let go after its grace all the same.
    let handle = server.handle.clone();
    wait::until("the connection let go", Duration::from_secs(15), || {
        handle.active_streams() == 0
    })
    .await?;
    Ok(())
}

/// konnectivity-client v0.28 and later: when the dial times out or the caller's context ends,
/// DIAL_CLS goes out and the client closes its gRPC connection right behind it. The dial is
/// cancelled at the agent, counted, and everything it held is freed: with room for a single
/// tunnel, the next dial gets it.
#[tokio::test]
async fn dial_cls_then_a_closed_connection_frees_the_pending_dial() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--max-tunnels", "1"]).await?;
    let agent = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let hole = targets::black_hole()?;
    let headers =
        grpc_wire::proxy_request_headers(grpc_wire::SOCKET_PATH_ENCODED, "grpc-go/1.58.3");

    let mut client = WireClient::connect(&server.grpc_uds).await?;
    client.open(1, &headers).await?;
    client
        .send(1, &Packet::dial_request(hole.addr.to_string(), 77))
        .await?;
    wait::until("the agent dialing", Duration::from_secs(10), || {
        hole.hanging_dials() == 1
    })
    .await?;
    client.send(1, &Packet::close_dial(77)).await?;
    drop(client);
    let handle = server.handle.clone();

    wait::until("the cancel counted", Duration::from_secs(10), || {
        handle
            .metrics_text()
            .contains("cplink_server_dials_total{result=\"cancelled\"} 1")
    })
    .await?;
    let agent_handle = agent.handle.clone();
    wait::until(
        "the agent to give up the dial",
        Duration::from_secs(5),
        || {
            agent_handle
                .metrics_text()
                .contains("cplink_agent_dials_total{result=\"cancelled\"} 1")
                && hole.hanging_dials() == 0
        },
    )
    .await?;
    let echo = targets::echo().await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;
    let (mut stream, id) = ProxyStream::connect(channel, &echo.authority()).await?;
    stream.write_all(id, b"the tunnel is free").await?;
    assert_eq!(stream.read_exact(id, 18).await?, b"the tunnel is free");
    Ok(())
}

/// A DIAL_CLS that crosses the dial's answer (the client gave up just as the agent connected)
/// closes the connection that answer opened: the destination sees the end, and the tunnel is
/// free for the next dial.
#[tokio::test]
async fn dial_cls_after_the_answer_closes_the_connection() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--max-tunnels", "1"]).await?;
    let _agent = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let (recorder, mut ends) = targets::recorder().await?;
    let channel = grpc::uds_channel(&server.grpc_uds).await?;

    let mut stream = ProxyStream::open(channel.clone(), &recorder.authority(), 55).await?;
    assert!(matches!(
        stream.answer(55).await?,
        grpc::DialAnswer::Connected(_)
    ));
    stream.send(Packet::close_dial(55)).await?;
    assert!(
        stream.next().await?.is_none(),
        "the call ends without a CLOSE_RSP: the client never took the connection"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), ends.recv()).await?;
    assert!(end.is_some(), "the destination's connection ended");
    let handle = server.handle.clone();
    wait::until("the connection let go", Duration::from_secs(10), || {
        handle.active_streams() == 0
    })
    .await?;

    let echo = targets::echo().await?;
    let (mut stream, id) = ProxyStream::connect(channel, &echo.authority()).await?;
    stream.write_all(id, b"free again").await?;
    assert_eq!(stream.read_exact(id, 10).await?, b"free again");
    Ok(())
}
