//! Server, agent and destinations in-process on loopback: the tunnel's behaviour end to end.

use std::time::{Duration, Instant};

use cplink_e2e::client::{self, TlsClient};
use cplink_e2e::fixture::Loopback;
use cplink_e2e::pki::{Pki, Usage};
use cplink_e2e::{targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn echo_round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> anyhow::Result<()> {
    stream.write_all(msg).await?;
    stream.flush().await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    anyhow::ensure!(back == msg, "echo mismatch");
    Ok(())
}

#[tokio::test]
async fn bytes_cross_the_tunnel_through_both_frontends() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;

    let mut uds = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    echo_round_trip(&mut uds, b"hello over the unix socket").await?;

    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut stream = tls.tunnel(server.tls_addr, &echo.authority()).await?;
    echo_round_trip(&mut stream, b"hello over mutual TLS").await?;

    let metrics = server.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_dials_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn bytes_sent_right_behind_the_connect_head_are_not_lost() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let mut stream = UnixStream::connect(&server.uds).await?;
    stream
        .write_all(
            format!(
                "CONNECT {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nearly",
                echo.authority()
            )
            .as_bytes(),
        )
        .await?;
    let answer = client::read_answer(&mut stream).await?;
    assert_eq!(answer.status, 200);
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await?;
    assert_eq!(&back, b"early");
    Ok(())
}

#[tokio::test]
async fn the_200_names_the_connection_established_and_nothing_follows_it() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let echo = targets::echo().await?;
    let mut stream = UnixStream::connect(&server.uds).await?;
    let answer = client::handshake(&mut stream, &echo.authority()).await?;
    assert_eq!(answer.head, "HTTP/1.1 200 Connection Established\r\n\r\n");
    // The echo target sends nothing unprompted, so nothing may be readable.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut byte)).await;
    assert!(
        read.is_err(),
        "no byte may follow the 200 until the client speaks"
    );
    Ok(())
}

#[tokio::test]
async fn a_half_closed_client_still_receives_the_answer() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let target = targets::count_then_answer().await?;

    let mut uds = client::tunnel_uds(&server.uds, &target.authority()).await?;
    uds.write_all(&[7u8; 100_000]).await?;
    uds.shutdown().await?;
    let mut answer = String::new();
    uds.read_to_string(&mut answer).await?;
    assert_eq!(answer, "read 100000 bytes");

    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut stream = tls.tunnel(server.tls_addr, &target.authority()).await?;
    stream.write_all(&[7u8; 12_345]).await?;
    stream.shutdown().await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    assert_eq!(answer, "read 12345 bytes");
    Ok(())
}

#[tokio::test]
async fn a_destination_reset_reaches_the_client_as_an_error() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let target = targets::resetter().await?;
    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut stream = tls.tunnel(server.tls_addr, &target.authority()).await?;
    stream.write_all(b"x").await?;
    let mut buf = Vec::new();
    let result =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await?;
    assert!(
        result.is_err(),
        "an aborted destination must not look like a clean end: {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_reset_reaches_the_destination_as_an_error() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let (target, mut outcomes) = targets::recorder().await?;
    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut stream = tls.tunnel(server.tls_addr, &target.authority()).await?;
    stream.write_all(b"partial").await?;
    stream.flush().await?;
    let (tcp, _) = stream.into_inner();
    cplink_runtime::net::abort_tcp(tcp);
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcomes.recv()).await?;
    assert!(
        matches!(outcome, Some(Err(_))),
        "destination must see an abort, saw {outcome:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_closed_port_answers_502() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let closed = targets::closed_port()?;
    let mut stream = UnixStream::connect(&server.uds).await?;
    let answer = client::handshake(&mut stream, &closed.to_string()).await?;
    assert_eq!(answer.status, 502, "{answer:?}");
    // The agent's reason, passed on once: not "connection refused: connection refused: ...".
    assert_eq!(answer.body, format!("connection refused: {closed}\n"));
    Ok(())
}

#[tokio::test]
async fn a_destination_that_never_answers_gives_504_within_the_timeout() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let _agent = lo
        .start_agent(&[server.agent_addr], &["--dial-timeout", "500ms"])
        .await?;
    server.wait_for_agents(1).await?;
    let hole = targets::black_hole()?;
    let started = Instant::now();
    let mut stream = UnixStream::connect(&server.uds).await?;
    let answer = client::handshake(&mut stream, &hole.addr.to_string()).await?;
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(answer.body.contains("timed out after 500ms"), "{answer:?}");
    // The agent's budget, not the server's 10 s default, decided.
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn no_agent_answers_503() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let mut stream = UnixStream::connect(&server.uds).await?;
    let answer = client::handshake(&mut stream, "127.0.0.1:10250").await?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(
        answer.body,
        "no agent available: no agent is linked to this server\n"
    );
    Ok(())
}

#[tokio::test]
async fn dials_beyond_max_tunnels_answer_503_until_a_tunnel_ends() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--max-tunnels", "2"]).await?;
    let _agent = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    let echo = targets::echo().await?;
    let mut first = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    let mut second = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    echo_round_trip(&mut first, b"one").await?;
    echo_round_trip(&mut second, b"two").await?;

    let mut stream = UnixStream::connect(&server.uds).await?;
    let answer = client::handshake(&mut stream, &echo.authority()).await?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(
        answer.body,
        "server at capacity: 2 tunneled connections open (--max-tunnels)\n"
    );
    assert!(
        server
            .handle
            .metrics_text()
            .contains("cplink_server_dials_total{result=\"busy\"} 1"),
        "{}",
        server.handle.metrics_text()
    );

    // A tunnel that ends gives its place back.
    drop(first);
    let handle = server.handle.clone();
    wait::until("the first tunnel closed", Duration::from_secs(10), || {
        handle.active_streams() == 1
    })
    .await?;
    let mut third = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    echo_round_trip(&mut third, b"three").await?;
    Ok(())
}

#[tokio::test]
async fn a_denied_destination_answers_403_with_the_reason() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let echo = targets::echo().await?;
    let _agent = lo
        .start_agent(
            &[server.agent_addr],
            &["--allow", &format!("127.0.0.1/32:{}", echo.addr.port())],
        )
        .await?;
    server.wait_for_agents(1).await?;
    // The allowed port works...
    let mut ok = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    echo_round_trip(&mut ok, b"allowed").await?;
    // ...another port on the same host does not.
    let other = targets::echo().await?;
    let mut stream = UnixStream::connect(&server.uds).await?;
    let answer = client::handshake(&mut stream, &other.authority()).await?;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(
        answer
            .body
            .contains("not in the agent's allowed destinations"),
        "{answer:?}"
    );
    assert_eq!(
        answer.body.matches("destination not allowed").count(),
        1,
        "{answer:?}"
    );
    // Link-local metadata is refused even without rules.
    let open = lo.start_server(&[]).await?;
    let _open_agent = lo.start_agent(&[open.agent_addr], &[]).await?;
    open.wait_for_agents(1).await?;
    let mut stream = UnixStream::connect(&open.uds).await?;
    let answer = client::handshake(&mut stream, "169.254.169.254:80").await?;
    assert_eq!(answer.status, 403, "{answer:?}");
    Ok(())
}

#[tokio::test]
async fn malformed_requests_get_clear_errors() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&["--header-timeout", "300ms"]).await?;

    let mut stream = UnixStream::connect(&server.uds).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let answer = client::read_answer(&mut stream).await?;
    assert_eq!(answer.status, 405, "{answer:?}");

    let mut stream = UnixStream::connect(&server.uds).await?;
    stream
        .write_all(b"CONNECT no-port HTTP/1.1\r\n\r\n")
        .await?;
    assert_eq!(client::read_answer(&mut stream).await?.status, 400);

    let mut stream = UnixStream::connect(&server.uds).await?;
    let mut huge = b"CONNECT a:1 HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 9 * 1024));
    // The server may close before reading everything; the answer is what matters.
    let _ = stream.write_all(&huge).await;
    assert_eq!(client::read_answer(&mut stream).await?.status, 431);

    // Slow loris: half a head, then silence.
    let mut stream = UnixStream::connect(&server.uds).await?;
    stream
        .write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHo")
        .await?;
    let answer =
        tokio::time::timeout(Duration::from_secs(10), client::read_answer(&mut stream)).await??;
    assert_eq!(answer.status, 408, "{answer:?}");

    let metrics = server.handle.metrics_text();
    for reason in [
        "not_connect",
        "bad_target",
        "header_too_large",
        "header_timeout",
    ] {
        assert!(
            metrics.contains(&format!(
                "cplink_server_frontend_request_errors_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_frontend_client_without_a_trusted_certificate_is_rejected() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let rogue = Pki::new(&lo.dir().join("rogue"), "rogue")?;
    let rogue_cert = rogue.issue("apiserver", &["kube-apiserver"], Usage::Client)?;
    let client = TlsClient::new(&rogue_cert, lo.pki.ca_file())?;
    // TLS 1.3 reports a rejected client certificate on the first read.
    let result = async {
        let mut stream = client.connect(server.tls_addr).await?;
        client::handshake(&mut stream, "127.0.0.1:1").await
    }
    .await;
    assert!(
        result.is_err(),
        "untrusted client certificate accepted: {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn agents_with_untrusted_certificates_or_trust_are_not_linked() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let rogue = Pki::new(&lo.dir().join("rogue"), "rogue")?;

    // A client certificate from a CA the server does not trust.
    let rogue_cert = rogue.issue("agent", &["agent"], Usage::Client)?;
    let untrusted = lo
        .start_agent_with_cert(&[server.agent_addr], &rogue_cert, lo.pki.ca_file(), &[])
        .await?;
    // An agent that does not trust the server's CA.
    let distrustful = lo
        .start_agent_with_cert(&[server.agent_addr], &lo.agent_cert, rogue.ca_file(), &[])
        .await?;

    let handle = server.handle.clone();
    wait::until(
        "two rejected TLS handshakes",
        Duration::from_secs(20),
        || {
            handle
                .metrics_text()
                .contains("cplink_server_link_errors_total{reason=\"tls\"} 2")
                || handle
                    .metrics_text()
                    .contains("cplink_server_link_errors_total{reason=\"tls\"} 3")
        },
    )
    .await?;
    let agent_handle = distrustful.handle.clone();
    wait::until(
        "the agent to record its TLS failure",
        Duration::from_secs(20),
        || {
            agent_handle
                .metrics_text()
                .contains("cplink_agent_link_attempts_total{result=\"tls\"}")
        },
    )
    .await?;
    assert_eq!(server.handle.linked_agents(), 0);
    assert!(untrusted.handle.readiness().is_err());
    assert!(distrustful.handle.readiness().is_err());
    Ok(())
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let get = |addr: std::net::SocketAddr, path: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    assert!(
        get(server.admin_addr, "/healthz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    let not_ready = get(server.admin_addr, "/readyz").await?;
    assert!(
        not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("no agent linked"),
        "{not_ready}"
    );

    let agent = lo.start_agent(&[server.agent_addr], &[]).await?;
    server.wait_for_agents(1).await?;
    agent.wait_ready().await?;
    assert!(
        get(server.admin_addr, "/readyz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        get(agent.admin_addr, "/readyz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    let metrics = get(server.admin_addr, "/metrics").await?;
    for name in [
        "cplink_server_agents_linked 1",
        "cplink_server_streams_active",
        "cplink_server_dial_duration_seconds_bucket",
        "cplink_server_tunnel_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let metrics = get(agent.admin_addr, "/metrics").await?;
    assert!(metrics.contains("cplink_agent_links_up 1"), "{metrics}");
    assert!(
        get(server.admin_addr, "/nope")
            .await?
            .starts_with("HTTP/1.1 404")
    );
    Ok(())
}

/// Links from 127.0.0.2 claiming the agent id `id`, with the agent certificate, and returns the
/// server's answer to the hello.
async fn claim_agent_id(
    lo: &Loopback,
    server: std::net::SocketAddr,
    id: &str,
) -> anyhow::Result<cplink_proto::hello::HelloOutcome> {
    let ours = cplink_proto::hello::AgentHello {
        agent_id: id.to_owned(),
        node_name: Some(id.to_owned()),
        identifiers: Default::default(),
        software_version: "intruder".into(),
        token: None,
    };
    let from = "127.0.0.2".parse()?;
    cplink_e2e::fixture::say_hello(server, &lo.agent_cert, lo.pki.ca_file(), from, &ours).await
}

#[tokio::test]
async fn a_second_agent_claiming_a_linked_id_from_another_address_is_refused() -> anyhow::Result<()>
{
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    let echo = targets::echo().await?;
    let agent = lo
        .start_agent(&[server.agent_addr], &["--node-name", "node-1"])
        .await?;
    server.wait_for_agents(1).await?;
    let id = server.handle.agent_ids().remove(0);

    let outcome = claim_agent_id(&lo, server.agent_addr, &id).await?;
    let cplink_proto::hello::HelloOutcome::Rejected { reason } = outcome else {
        anyhow::bail!("a second party was let in as {id}");
    };
    assert!(
        reason.contains("already linked from 127.0.0.1:"),
        "{reason}"
    );
    // Counted once the refused link's task ends, which may be after the refusal reached us.
    let mut metrics = String::new();
    wait::until("the refusal counted", Duration::from_secs(10), || {
        metrics = server.handle.metrics_text();
        metrics.contains("cplink_server_link_errors_total{reason=\"duplicate_id\"} 1")
    })
    .await
    .map_err(|e| e.context(metrics.clone()))?;
    // Dials for the agent still reach the real one.
    let mut stream = client::tunnel_uds(&server.uds, &echo.authority()).await?;
    echo_round_trip(&mut stream, b"still mine").await?;
    assert_eq!(agent.handle.tunneled_bytes().stream_to_socket, 10);
    drop(stream);

    // Once the real agent is gone, the id is free again.
    agent.stop().await;
    server.wait_for_agents(0).await?;
    let outcome = claim_agent_id(&lo, server.agent_addr, &id).await?;
    assert_eq!(outcome, cplink_proto::hello::HelloOutcome::Accepted);
    Ok(())
}

/// Bytes the tests below send before the failure: within one stream window, so that they are
/// all in the tunnel when it fails.
const BEFORE_FAILURE: usize = 64 * 1024;

#[tokio::test]
async fn a_tls_client_gone_without_close_notify_still_delivers_its_upload_then_an_error()
-> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let (release, gate) = tokio::sync::watch::channel(false);
    let (destination, mut ends) = targets::gated_tally(gate).await?;
    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut stream = tls
        .tunnel(server.tls_addr, &destination.authority())
        .await?;
    stream
        .write_all(&targets::pattern(1, BEFORE_FAILURE))
        .await?;
    stream.flush().await?;
    // The client goes away without close_notify: TCP closes, TLS was cut short.
    let (tcp, _) = stream.into_inner();
    drop(tcp);
    let handle = server.handle.clone();
    wait::until(
        "the server read the whole upload",
        Duration::from_secs(10),
        || handle.tunneled_bytes().socket_to_stream == BEFORE_FAILURE as u64,
    )
    .await?;
    // Only now does the destination read: nothing of what the client sent may be lost.
    release.send(true)?;
    let (received, end) = tokio::time::timeout(Duration::from_secs(10), ends.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the destination never reported"))?;
    assert_eq!(received, BEFORE_FAILURE, "bytes lost on the way");
    assert_eq!(
        end,
        Some(std::io::ErrorKind::ConnectionReset),
        "the destination must see the client's failure, not a clean end"
    );
    Ok(())
}

#[tokio::test]
async fn a_destination_reset_after_sending_delivers_its_bytes_then_an_error() -> anyhow::Result<()>
{
    let lo = Loopback::new()?;
    let (server, _agent) = lo.pair().await?;
    let source = targets::source_then_reset(BEFORE_FAILURE).await?;
    let tls = TlsClient::new(&lo.frontend_cert, lo.pki.ca_file())?;
    let mut stream = tls.tunnel(server.tls_addr, &source.authority()).await?;
    let mut got = Vec::new();
    let end = loop {
        let mut buf = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await? {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(got.len(), BEFORE_FAILURE, "bytes lost on the way");
    assert!(got == targets::pattern(0, BEFORE_FAILURE), "bytes changed");
    assert!(end.is_some(), "a clean end after a reset destination");
    Ok(())
}
