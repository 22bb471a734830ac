//! `cplink-agent --protocol konnectivity` against a konnectivity server played by the test: a
//! tonic `AgentService` over mutual TLS on 127.0.0.1, which hands every `Connect` stream to the
//! test so that it can send packets the way apiserver-network-proxy does and check the answers.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should panic with its location

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use cplink_agent::{Agent, AgentHandle, Args, LinkInfo};
use cplink_proto::dial::DialFailure;
use cplink_proto::konnectivity::{
    AgentService, AgentServiceServer, DialRequest, DialResponse, Packet, PacketType, Payload,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- certificates -------------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and an agent client certificate, on disk.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    ca_der: CertificateDer<'static>,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
    agent_cert: PathBuf,
    agent_key: PathBuf,
    token: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let leaf = |name: &str, usage| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, name);
            params.distinguished_name = dn;
            params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert, key)
        };
        let (server_cert, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
        let (agent_cert, agent_key) = leaf("agent", ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Pki {
            ca: write("ca.crt", &ca_cert.pem()),
            ca_der: ca_cert.der().clone(),
            server_cert: server_cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
            agent_cert: write("agent.crt", &agent_cert.pem()),
            agent_key: write("agent.key", &agent_key.serialize_pem()),
            token: write("token", "token-1\n"),
            _dir: dir,
        }
    }
}

impl Pki {
    /// TLS of a konnectivity server: HTTP/2 only, client certificates signed by the CA required.
    fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![self.server_cert.clone()],
                PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

// ---- the konnectivity server played by the test -------------------------------------------

/// One `Connect` stream as the server sees it.
struct ServerLink {
    /// The agent's request metadata.
    metadata: MetadataMap,
    /// The server id this stream answered with.
    server_id: String,
    inbound: Streaming<Packet>,
    out: mpsc::Sender<Result<Packet, Status>>,
}

impl ServerLink {
    async fn send(&self, packet: Packet) {
        self.out.send(Ok(packet)).await.unwrap();
    }

    async fn next(&mut self) -> Packet {
        within("a packet from the agent", self.inbound.message())
            .await
            .unwrap()
            .expect("the agent ended the stream")
    }

    async fn dial(&mut self, protocol: &str, address: &str, random: i64) -> DialResponse {
        self.send(Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: protocol.into(),
                address: address.into(),
                random,
            })),
        })
        .await;
        dial_response(self.next().await)
    }

    /// Waits until the agent ends the stream, cleanly or not.
    async fn ended(&mut self) {
        within("the agent to end the stream", async {
            while let Ok(Some(_)) = self.inbound.message().await {}
        })
        .await;
    }
}

fn dial_response(packet: Packet) -> DialResponse {
    assert_eq!(packet.r#type(), PacketType::DialRsp);
    match packet.payload {
        Some(Payload::DialResponse(response)) => response,
        other => panic!("expected a DIAL_RSP, got {other:?}"),
    }
}

fn data(packet: Packet) -> (i64, Vec<u8>) {
    match packet.payload {
        Some(Payload::Data(data)) => (data.connect_id, data.data.to_vec()),
        other => panic!("expected DATA, got {other:?}"),
    }
}

fn close_response(packet: Packet) -> (i64, String) {
    match packet.payload {
        Some(Payload::CloseResponse(close)) => (close.connect_id, close.error),
        other => panic!("expected a CLOSE_RSP, got {other:?}"),
    }
}

#[derive(Clone)]
struct FakeServer {
    /// Server ids handed out in turn, one per stream.
    ids: Arc<Mutex<VecDeque<String>>>,
    count: u32,
    /// One permit per stream the server answers; others wait.
    admit: Arc<Semaphore>,
    links: mpsc::UnboundedSender<ServerLink>,
}

#[tonic::async_trait]
impl AgentService for FakeServer {
    type ConnectStream = ReceiverStream<Result<Packet, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        self.admit.acquire().await.unwrap().forget();
        let server_id = {
            let mut ids = self.ids.lock().unwrap();
            let id = ids.pop_front().unwrap();
            ids.push_back(id.clone());
            id
        };
        let (out, rx) = mpsc::channel(64);
        let mut response = Response::new(ReceiverStream::new(rx));
        response
            .metadata_mut()
            .insert("serverid", server_id.parse().unwrap());
        response
            .metadata_mut()
            .insert("servercount", self.count.to_string().parse().unwrap());
        let metadata = request.metadata().clone();
        let _ = self.links.send(ServerLink {
            metadata,
            server_id,
            inbound: request.into_inner(),
            out,
        });
        Ok(response)
    }
}

struct Server {
    address: SocketAddr,
    links: mpsc::UnboundedReceiver<ServerLink>,
    admit: Arc<Semaphore>,
}

impl Server {
    /// Answers every stream at once.
    async fn start(pki: &Pki, ids: &[&str], count: u32) -> Self {
        Self::start_admitting(pki, ids, count, Semaphore::MAX_PERMITS).await
    }

    /// Answers `admitted` streams; later ones wait for [`Server::admit`] permits.
    async fn start_admitting(pki: &Pki, ids: &[&str], count: u32, admitted: usize) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_tls());
        let (tx, links) = mpsc::unbounded_channel();
        let admit = Arc::new(Semaphore::new(admitted));
        let service = AgentServiceServer::new(FakeServer {
            ids: Arc::new(Mutex::new(ids.iter().map(|s| s.to_string()).collect())),
            count,
            admit: admit.clone(),
            links: tx,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, service) = (acceptor.clone(), service.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                        .await;
                });
            }
        });
        Server {
            address,
            links,
            admit,
        }
    }

    async fn next_link(&mut self) -> ServerLink {
        within("the agent to open a Connect stream", self.links.recv())
            .await
            .unwrap()
    }
}

// ---- destinations ---------------------------------------------------------------------------

/// Echoes every connection; reports each connection whose client finished sending.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (ended, ends) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let ended = ended.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 16 * 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tcp.shutdown().await;
                let _ = ended.send(());
            });
        }
    });
    (address, ends)
}

/// Says `bye` to every connection and closes it.
async fn greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.write_all(b"bye").await;
            let _ = tcp.shutdown().await;
        }
    });
    address
}

/// A port on which connects neither succeed nor fail: its accept queue is full and the kernel
/// ignores further SYNs. The returned stream fills the queue and must be kept.
async fn unresponsive_port() -> (SocketAddr, TcpListener, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let address = listener.local_addr().unwrap();
    let filler = TcpStream::connect(address).await.unwrap();
    (address, listener, filler)
}

/// A TCP forwarder that can go silent: after [`Forwarder::freeze`], its connections stay open
/// but carry nothing, as a link through a dead network path does. Later connections flow.
struct Forwarder {
    address: SocketAddr,
    freeze: Arc<Mutex<CancellationToken>>,
}

impl Forwarder {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let freeze = Arc::new(Mutex::new(CancellationToken::new()));
        let current = freeze.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let frozen = current.lock().unwrap().clone();
                tokio::spawn(async move {
                    let server = TcpStream::connect(upstream).await.unwrap();
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        copy_until_frozen(client_read, server_write, frozen.clone()),
                        copy_until_frozen(server_read, client_write, frozen),
                    );
                });
            }
        });
        Forwarder { address, freeze }
    }

    fn freeze(&self) {
        let mut current = self.freeze.lock().unwrap();
        current.cancel();
        *current = CancellationToken::new();
    }
}

async fn copy_until_frozen(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: CancellationToken,
) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(n) if n > 0 => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = to.shutdown().await;
                    return;
                }
            },
            // Both halves stay open and silent until the test ends.
            () = frozen.cancelled() => std::future::pending::<()>().await,
        }
    }
}

// ---- the agent ------------------------------------------------------------------------------

struct RunningAgent {
    handle: AgentHandle,
    shutdown: CancellationToken,
    run: tokio::task::JoinHandle<()>,
}

fn start_agent(pki: &Pki, server: SocketAddr, extra: &[&str]) -> RunningAgent {
    let path = |p: &Path| p.display().to_string();
    let server = server.to_string();
    let (cert, key, ca, token) = (
        path(&pki.agent_cert),
        path(&pki.agent_key),
        path(&pki.ca),
        path(&pki.token),
    );
    let mut argv = vec![
        "cplink-agent",
        "--protocol",
        "konnectivity",
        "--agent-id",
        "agent-1",
        "--node-name",
        "node-1",
        "--host-ip",
        "127.0.0.1",
        "--pod-cidr",
        "10.244.1.0/24",
        "--default-route",
        "--server-address",
        &server,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--server-ca",
        &ca,
        "--service-account-token-path",
        &token,
        "--allow",
        "127.0.0.1/32",
        "--reconnect-max-backoff",
        "100ms",
    ];
    argv.extend_from_slice(extra);
    let config = Args::try_parse_from(argv).unwrap().into_config().unwrap();
    let agent = Agent::new(config);
    let handle = agent.handle();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(agent.run(None, shutdown.clone()));
    RunningAgent {
        handle,
        shutdown,
        run,
    }
}

/// The value of one sample of the agent's metrics, e.g. `cplink_agent_links_up`.
fn metric(handle: &AgentHandle, sample: &str) -> Option<f64> {
    handle.metrics_text().lines().find_map(|line| {
        let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

fn server_ids(handle: &AgentHandle) -> Vec<String> {
    let mut ids: Vec<_> = handle.links().into_iter().map(|l| l.server_id).collect();
    ids.sort();
    ids
}

// ---- tests ----------------------------------------------------------------------------------

#[tokio::test]
async fn links_with_its_identity_and_tunnels_connections_both_ways() {
    let pki = Pki::new();
    let mut server = Server::start(&pki, &["server-a"], 1).await;
    let (echo, mut echo_ends) = echo_server().await;
    let greeter = greeter().await;
    let agent = start_agent(&pki, server.address, &[]);

    let mut link = server.next_link().await;
    let header = |key: &str| {
        link.metadata
            .get(key)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(header("agentid").as_deref(), Some("agent-1"));
    assert_eq!(
        header("agentidentifiers").as_deref(),
        Some("host=node-1&ipv4=127.0.0.1&cidr=10.244.1.0%2F24&default-route=true")
    );
    assert_eq!(header("authorization").as_deref(), Some("Bearer token-1"));
    wait_until("the agent to be ready", || agent.handle.readiness().is_ok()).await;
    assert_eq!(
        agent.handle.links(),
        [LinkInfo {
            server_id: "server-a".into(),
            server_count: 1
        }]
    );
    assert_eq!(metric(&agent.handle, "cplink_agent_links_up"), Some(1.0));

    // The server asks for a connection; the agent numbers it from 1.
    let dialed = link.dial("tcp", &echo.to_string(), 11).await;
    assert_eq!((dialed.random, dialed.connect_id), (11, 1));
    assert_eq!(dialed.error, "");
    link.send(Packet::data(1, Bytes::from_static(b"hello")))
        .await;
    assert_eq!(data(link.next().await), (1, b"hello".to_vec()));
    assert_eq!(agent.handle.active_streams(), 1);

    // The server closes: the destination sees the end, the agent confirms.
    link.send(Packet::close_request(1)).await;
    assert_eq!(close_response(link.next().await), (1, String::new()));
    within("the echo server to see the end", echo_ends.recv())
        .await
        .unwrap();

    // The destination closes: its last bytes arrive, then the agent reports the close.
    let dialed = link.dial("tcp", &greeter.to_string(), 12).await;
    assert_eq!((dialed.random, dialed.connect_id), (12, 2));
    assert_eq!(data(link.next().await), (2, b"bye".to_vec()));
    assert_eq!(close_response(link.next().await), (2, String::new()));

    wait_until("both connections to be counted closed", || {
        agent.handle.active_streams() == 0
    })
    .await;
    assert_eq!(
        metric(&agent.handle, "cplink_agent_dials_total{result=\"ok\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &agent.handle,
            "cplink_agent_tunnel_bytes_total{direction=\"to_destination\"}"
        ),
        Some(5.0)
    );
}

#[tokio::test]
async fn failed_dials_are_answered_with_their_reason() {
    let pki = Pki::new();
    let mut server = Server::start(&pki, &["server-a"], 1).await;
    let refused = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let agent = start_agent(&pki, server.address, &[]);
    let mut link = server.next_link().await;

    let cases = [
        ("tcp", refused.to_string(), "refused"),
        // Outside --allow 127.0.0.1/32: denied before any connect.
        ("tcp", "127.0.0.2:80".to_owned(), "forbidden"),
        ("udp", "127.0.0.1:53".to_owned(), "bad_target"),
        ("tcp", "no-port".to_owned(), "bad_target"),
    ];
    for (random, (protocol, address, kind)) in (1..).zip(cases) {
        let answer = link.dial(protocol, &address, random).await;
        assert_eq!(answer.random, random);
        assert_eq!(answer.connect_id, 0, "{address}: no connection");
        assert_eq!(
            DialFailure::from_konnectivity_error(&answer.error).kind(),
            kind,
            "{protocol} {address}: {:?}",
            answer.error
        );
    }
    for (kind, count) in [("refused", 1.0), ("forbidden", 1.0), ("bad_target", 2.0)] {
        let sample = format!("cplink_agent_dials_total{{result=\"{kind}\"}}");
        assert_eq!(metric(&agent.handle, &sample), Some(count), "{sample}");
    }
    assert!(
        agent.handle.readiness().is_ok(),
        "failed dials keep the link"
    );
}

#[tokio::test]
async fn a_cancelled_dial_is_never_answered() {
    let pki = Pki::new();
    let mut server = Server::start(&pki, &["server-a"], 1).await;
    let (echo, _) = echo_server().await;
    let (stuck, _listener, _filler) = unresponsive_port().await;
    // Long enough that only the cancel can end the stuck dial during the test.
    let agent = start_agent(&pki, server.address, &["--dial-timeout", "60s"]);
    let mut link = server.next_link().await;

    link.send(Packet::dial_request(stuck.to_string(), 21)).await;
    link.send(Packet::close_dial(21)).await;
    wait_until("the dial to be cancelled", || {
        metric(
            &agent.handle,
            "cplink_agent_dials_total{result=\"cancelled\"}",
        ) == Some(1.0)
    })
    .await;

    // The next answer on the stream is for the next dial, not for the cancelled one.
    let answer = link.dial("tcp", &echo.to_string(), 22).await;
    assert_eq!(answer.random, 22);
    assert_eq!(
        answer.connect_id, 1,
        "the cancelled dial used no connect id"
    );
}

#[tokio::test]
async fn holds_links_to_as_many_distinct_servers_as_reported() {
    let pki = Pki::new();
    // The second stream lands on server-a again, as a load balancer may do.
    let mut server =
        Server::start_admitting(&pki, &["server-a", "server-a", "server-b"], 2, 1).await;
    let agent = start_agent(&pki, server.address, &[]);

    let _first = server.next_link().await;
    wait_until("the first link", || agent.handle.links().len() == 1).await;
    let readiness = agent.handle.readiness().unwrap_err();
    assert!(
        readiness.contains("linked to 1 of 2 servers"),
        "{readiness}"
    );
    assert_eq!(
        metric(&agent.handle, "cplink_agent_servers_known"),
        Some(2.0)
    );

    server.admit.add_permits(2);
    let mut duplicate = server.next_link().await;
    assert_eq!(duplicate.server_id, "server-a");
    duplicate.ended().await;
    let second = server.next_link().await;
    assert_eq!(second.server_id, "server-b");

    wait_until("the agent to be ready", || agent.handle.readiness().is_ok()).await;
    assert_eq!(server_ids(&agent.handle), ["server-a", "server-b"]);
    assert_eq!(metric(&agent.handle, "cplink_agent_links_up"), Some(2.0));
    assert_eq!(
        metric(
            &agent.handle,
            "cplink_agent_link_attempts_total{result=\"duplicate\"}"
        ),
        Some(1.0)
    );
    assert!(
        server.links.try_recv().is_err(),
        "no further link once every server is linked"
    );
}

#[tokio::test]
async fn a_rotated_token_is_sent_on_the_next_link() {
    let pki = Pki::new();
    let mut server = Server::start(&pki, &["server-a"], 1).await;
    let agent = start_agent(&pki, server.address, &[]);
    let first = server.next_link().await;
    assert_eq!(
        first
            .metadata
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        "Bearer token-1"
    );
    wait_until("the agent to be ready", || agent.handle.readiness().is_ok()).await;

    std::fs::write(&pki.token, "token-2\n").unwrap();
    // The server ends the stream; the agent links again.
    drop(first);
    let second = server.next_link().await;
    assert_eq!(
        second
            .metadata
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        "Bearer token-2"
    );
    wait_until("the agent to be ready again", || {
        agent.handle.readiness().is_ok()
    })
    .await;
}

#[tokio::test]
async fn draining_announces_itself_refuses_new_dials_and_lets_connections_finish() {
    let pki = Pki::new();
    let mut server = Server::start(&pki, &["server-a"], 1).await;
    let (echo, _) = echo_server().await;
    let agent = start_agent(&pki, server.address, &["--drain-timeout", "30s"]);
    let mut link = server.next_link().await;
    let open = link.dial("tcp", &echo.to_string(), 31).await;
    assert_eq!(open.connect_id, 1);

    agent.shutdown.cancel();
    assert_eq!(link.next().await.r#type(), PacketType::Drain);
    assert_eq!(agent.handle.readiness().unwrap_err(), "shutting down");
    let refused = link.dial("tcp", &echo.to_string(), 32).await;
    assert_eq!(
        DialFailure::from_konnectivity_error(&refused.error).kind(),
        "no_agent"
    );

    // The open connection still works, and keeps the agent running.
    link.send(Packet::data(1, Bytes::from_static(b"still here")))
        .await;
    assert_eq!(data(link.next().await), (1, b"still here".to_vec()));
    assert!(!agent.run.is_finished());

    link.send(Packet::close_request(1)).await;
    assert_eq!(close_response(link.next().await), (1, String::new()));
    // With nothing left in flight the agent ends its side; the server ends its own, as
    // upstream's does, and the agent stops.
    link.ended().await;
    drop(link);
    within("the agent to stop", agent.run).await.unwrap();
}

#[tokio::test]
async fn a_silent_link_is_noticed_by_keepalive_and_replaced() {
    let pki = Pki::new();
    let mut server = Server::start(&pki, &["server-a"], 1).await;
    let forwarder = Forwarder::start(server.address).await;
    let agent = start_agent(
        &pki,
        forwarder.address,
        &[
            "--keepalive-interval",
            "100ms",
            "--keepalive-timeout",
            "300ms",
        ],
    );
    let _first = server.next_link().await;
    wait_until("the agent to be ready", || agent.handle.readiness().is_ok()).await;

    // The path goes silent; the server still holds its end of the first stream.
    forwarder.freeze();
    let _second = server.next_link().await;
    wait_until("the agent to be ready on the new link", || {
        agent.handle.readiness().is_ok()
    })
    .await;
    assert_eq!(server_ids(&agent.handle), ["server-a"]);
    assert!(
        metric(
            &agent.handle,
            "cplink_agent_link_attempts_total{result=\"ok\"}"
        ) == Some(2.0)
    );
}
