//! Agents linking to every server replica: found through the EndpointSlices of the servers'
//! Service on a real kube-apiserver, or behind one balanced address that the servers' count
//! tells the agent to keep dialing; and an agent announcing its Node's pod range.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::fixture::{Loopback, RunningAgent, RunningServer};
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::metrics::counter;
use cplink_e2e::{client, targets, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

const NAMESPACE: &str = "default";
const SERVICE: &str = "cplink-servers";
const DEADLINE: Duration = Duration::from_secs(20);
/// How long the test with a control plane may take: it takes well under a minute.
const TEST_DEADLINE: Duration = Duration::from_secs(240);

/// The agent's node, and its pod range as the Node object says (the agent is not told).
const NODE: &str = "node-1";
const POD_CIDR: &str = "127.3.1.0/24";
const POD_IP: &str = "127.3.1.5";

fn kubectl_apply(plane: &ControlPlane, name: &str, yaml: &str) -> anyhow::Result<()> {
    let file = plane.dir().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    plane.kubectl_ok(&["apply", "-f", &file.display().to_string()])?;
    Ok(())
}

/// An EndpointSlice of the servers' Service listing `ip:port` (one slice per server: each
/// listens on its own port of 127.0.0.1). Kubernetes 1.20 serves `discovery.k8s.io/v1beta1`.
fn publish(plane: &ControlPlane, slice: &str, addr: SocketAddr, ready: bool) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: {slice}
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {SERVICE}
addressType: IPv4
ports:
- name: agents
  port: {port}
  protocol: TCP
endpoints:
- addresses: [\"{ip}\"]
  conditions:
    ready: {ready}
",
        port = addr.port(),
        ip = addr.ip(),
    );
    kubectl_apply(plane, slice, &yaml)
}

fn unpublish(plane: &ControlPlane, slice: &str) -> anyhow::Result<()> {
    plane.kubectl_ok(&["delete", "endpointslice", slice, "-n", NAMESPACE])?;
    Ok(())
}

fn metric(agent: &RunningAgent, name: &str, labels: &str) -> f64 {
    counter(&agent.handle.metrics_text(), name, labels)
}

async fn wait_for_servers(agent: &RunningAgent, ids: &[&str]) -> anyhow::Result<()> {
    let handle = agent.handle.clone();
    let expected: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    wait::until(&format!("links to {ids:?}"), DEADLINE, || {
        let mut up: Vec<_> = handle.links().into_iter().map(|l| l.server_id).collect();
        up.sort();
        up == expected
    })
    .await
}

async fn wait_for_readiness(
    agent: &RunningAgent,
    what: &str,
    want: impl Fn(&Result<(), String>) -> bool,
) -> anyhow::Result<()> {
    let handle = agent.handle.clone();
    wait::until(what, DEADLINE, || want(&handle.readiness())).await
}

/// Tunnels to an echo server in the Node's pod range through `server`, whose only routing
/// strategies are node and CIDR: the dial reaches an agent only through its pod CIDR.
async fn echo_through(server: &RunningServer, target: &str) -> anyhow::Result<()> {
    let mut stream = client::tunnel_uds(&server.uds, target).await?;
    stream.write_all(b"pod").await?;
    let mut back = [0u8; 3];
    stream.read_exact(&mut back).await?;
    anyhow::ensure!(&back == b"pod", "echo mismatch");
    Ok(())
}

async fn start_server(lo: &Loopback) -> anyhow::Result<RunningServer> {
    lo.start_server(&[
        "--server-count",
        "3",
        "--strategies",
        "node,cidr",
        "--drain-timeout",
        "50ms",
    ])
    .await
}

#[test]
fn agents_follow_the_servers_endpoint_slices_and_announce_their_nodes_pod_range()
-> anyhow::Result<()> {
    harness::run(
        "agents_follow_the_servers_endpoint_slices_and_announce_their_nodes_pod_range",
        TEST_DEADLINE,
        follow_the_slices,
    )
}

async fn follow_the_slices(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane");
    let mut plane = ControlPlane::start(Options::default()).await?;
    let kubeconfig = plane.kubeconfig.display().to_string();
    kubectl_apply(
        &plane,
        "service",
        &format!(
            "apiVersion: v1
kind: Service
metadata:
  name: {SERVICE}
  namespace: {NAMESPACE}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  ports:
  - name: agents
    port: 8091
"
        ),
    )?;
    kubectl_apply(
        &plane,
        "node",
        &format!(
            "apiVersion: v1
kind: Node
metadata:
  name: {NODE}
spec:
  podCIDR: {POD_CIDR}
  podCIDRs: [{POD_CIDR}]
"
        ),
    )?;

    steps.enter("three servers in the slices, an agent discovering them");
    let lo = Loopback::new()?;
    let mut servers = Vec::new();
    for i in 0..3 {
        let server = start_server(&lo).await?;
        // Not-ready endpoints are linked to as well: servers become ready once linked.
        publish(&plane, &format!("{SERVICE}-{i}"), server.agent_addr, i != 1)?;
        servers.push(server);
    }

    let discovery = [
        "--server-service",
        SERVICE,
        "--server-namespace",
        NAMESPACE,
        "--kubeconfig",
        kubeconfig.as_str(),
        "--server-name",
        "localhost",
    ];
    let agent = lo
        .start_agent(
            &[],
            &[
                &discovery[..],
                &["--node-name", NODE, "--pod-cidr-from-node"],
            ]
            .concat(),
        )
        .await?;
    agent.wait_ready().await?;
    assert_eq!(agent.server_ids(), ["server-0", "server-1", "server-2"]);
    for server in &servers {
        server.wait_for_agents(1).await?;
    }
    assert_eq!(
        metric(&agent, "cplink_agent_servers_known", ""),
        3.0,
        "one server per endpoint"
    );
    let mut addresses = agent.handle.server_addresses();
    addresses.sort();
    let mut published: Vec<String> = servers.iter().map(|s| s.agent_addr.to_string()).collect();
    published.sort();
    assert_eq!(addresses, published);

    // The Node's pod range reached every server: a dial into it is routed to this agent by
    // CIDR (the servers have no fallback strategy), through each of them.
    let announced: Vec<String> = agent
        .handle
        .identifiers()
        .pod_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(announced, [POD_CIDR]);
    steps.enter("dials routed by the Node's pod CIDR");
    let pod = TcpListener::bind((POD_IP, 0)).await?;
    let pod_addr = pod.local_addr()?.to_string();
    let _pod = echo_on(pod);
    for server in &servers {
        echo_through(server, &pod_addr).await?;
        let routed = counter(
            &server.handle.metrics_text(),
            "cplink_server_routed_dials_total",
            "strategy=\"cidr\"",
        );
        assert_eq!(routed, 1.0, "routed by the Node's pod CIDR");
    }
    assert_eq!(
        metric(&agent, "cplink_agent_dials_total", "result=\"ok\""),
        3.0
    );

    // Discovery works for konnectivity links too.
    steps.enter("a konnectivity agent discovering the servers");
    let konnectivity = lo
        .start_agent(
            &[],
            &[&discovery[..], &["--protocol", "konnectivity"]].concat(),
        )
        .await?;
    konnectivity.wait_ready().await?;
    assert_eq!(
        konnectivity.server_ids(),
        ["server-0", "server-1", "server-2"]
    );
    konnectivity.stop().await;

    steps.enter("a fourth server joining the slices");
    // A fourth server joins the slices and gets linked. (Servers and agents of a Loopback
    // draw their ids from one counter: three servers, two agents, then server-5.)
    let fourth = start_server(&lo).await?;
    publish(&plane, &format!("{SERVICE}-3"), fourth.agent_addr, false)?;
    wait_for_servers(&agent, &["server-0", "server-1", "server-2", "server-5"]).await?;
    fourth.wait_for_agents(1).await?;
    servers.push(fourth);
    agent.wait_ready().await?;
    assert_eq!(metric(&agent, "cplink_agent_servers_known", ""), 4.0);

    // An endpoint nothing answers on makes the agent not ready, naming it, until it leaves.
    steps.enter("a dead endpoint in the slices");
    let closed = targets::closed_port()?;
    publish(&plane, "nobody-home", closed, false)?;
    let closed_name = closed.to_string();
    wait_for_readiness(&agent, "readiness naming the dead endpoint", |r| {
        r.as_ref().is_err_and(|e| e.contains(&closed_name))
    })
    .await?;
    wait::until("failed attempts on the dead endpoint", DEADLINE, || {
        metric(
            &agent,
            "cplink_agent_link_attempts_total",
            "result=\"connect\"",
        ) > 0.0
    })
    .await?;
    unpublish(&plane, "nobody-home")?;
    agent.wait_ready().await?;

    steps.enter("server-1 leaving the slices");
    // server-1 leaves the slices: no longer needed for readiness, but its link stays until
    // the server closes it (as a draining server does in a rolling update).
    unpublish(&plane, &format!("{SERVICE}-1"))?;
    let gone = servers[1].agent_addr.to_string();
    let handle = agent.handle.clone();
    wait::until("server-1 to leave the endpoints", DEADLINE, || {
        !handle.server_addresses().contains(&gone)
    })
    .await?;
    assert!(agent.handle.readiness().is_ok());
    assert_eq!(metric(&agent, "cplink_agent_servers_known", ""), 3.0);
    assert!(agent.server_ids().contains(&"server-1".to_owned()));
    assert_eq!(servers[1].handle.linked_agents(), 1);

    let server1 = servers.remove(1);
    server1.stop().await;
    wait_for_servers(&agent, &["server-0", "server-2", "server-5"]).await?;
    assert!(
        agent.handle.readiness().is_ok(),
        "{:?}",
        agent.handle.readiness()
    );
    let failures = || {
        metric(
            &agent,
            "cplink_agent_link_attempts_total",
            "result=\"connect\"",
        )
    };
    let before = failures();
    // A server still listed would be redialed within the 500ms backoff cap: six times that
    // passes without an attempt.
    let redialed = wait::until(
        "a redial of the removed server",
        Duration::from_secs(3),
        || failures() > before,
    )
    .await;
    assert!(redialed.is_err(), "the removed server was dialed again");
    assert!(agent.handle.readiness().is_ok());

    // The API goes away and comes back: the links and the readiness stay all along, and the
    // watch resumes.
    steps.enter("restarting kube-apiserver under the agent");
    let watching = tokio_util::sync::CancellationToken::new();
    let handle = agent.handle.clone();
    let watch = watching.clone();
    let unready = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut seen = Vec::new();
        while !watch.is_cancelled() {
            if let Err(reason) = handle.readiness() {
                seen.push(reason);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    }));
    plane.restart_apiserver(None).await?;
    watching.cancel();
    assert_eq!(unready.await?, Vec::<String>::new(), "never unready");
    assert_eq!(agent.server_ids(), ["server-0", "server-2", "server-5"]);
    publish(&plane, "nobody-home", closed, false)?;
    wait_for_readiness(&agent, "the watch to resume", |r| {
        r.as_ref().is_err_and(|e| e.contains(&closed_name))
    })
    .await?;
    unpublish(&plane, "nobody-home")?;
    agent.wait_ready().await?;

    steps.enter("stopping the agent");
    agent.stop().await;
    Ok(())
}

/// Echoes every connection `listener` accepts, until the returned handle is dropped (its
/// connections with it).
fn echo_on(listener: TcpListener) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            connections.spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    }))
}

/// A TCP balancer handing connections to `rotation` in turn, until the returned handle is
/// dropped; counts the connections.
struct Balancer {
    address: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _task: AbortOnDropHandle<()>,
}

async fn balancer(rotation: Vec<SocketAddr>) -> anyhow::Result<Balancer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            let backend = rotation[count.fetch_add(1, Ordering::Relaxed) % rotation.len()];
            connections.spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(Balancer {
        address,
        accepted,
        _task: AbortOnDropHandle::new(task),
    })
}

async fn two_servers(lo: &Loopback) -> anyhow::Result<[RunningServer; 2]> {
    Ok([
        lo.start_server(&["--server-count", "2"]).await?,
        lo.start_server(&["--server-count", "2"]).await?,
    ])
}

#[tokio::test]
async fn a_native_agent_links_to_every_server_behind_a_balanced_address() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let servers = two_servers(&lo).await?;
    let balancer = balancer(servers.iter().map(|s| s.agent_addr).collect()).await?;
    let agent = lo.start_agent(&[balancer.address], &[]).await?;
    agent.wait_ready().await?;
    assert_eq!(agent.server_ids(), ["server-0", "server-1"]);
    for server in &servers {
        server.wait_for_agents(1).await?;
    }
    assert_eq!(metric(&agent, "cplink_agent_servers_known", ""), 2.0);
    assert_eq!(
        balancer.accepted.load(Ordering::Relaxed),
        2,
        "linked to both, the agent stops dialing"
    );
    agent.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_link_landing_on_a_server_already_linked_replaces_the_old_one() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let servers = two_servers(&lo).await?;
    // The first server comes twice in turn: the agent's second link meets it again.
    let rotation = vec![
        servers[0].agent_addr,
        servers[0].agent_addr,
        servers[1].agent_addr,
    ];
    let balancer = balancer(rotation).await?;
    let agent = lo.start_agent(&[balancer.address], &[]).await?;
    agent.wait_ready().await?;
    assert_eq!(agent.server_ids(), ["server-0", "server-1"]);
    assert_eq!(
        balancer.accepted.load(Ordering::Relaxed),
        3,
        "no dial beyond the third"
    );
    // The second link counts as a duplicate, or as a plain link when the server's closing of
    // the first was seen before: either way three links came up.
    let linked = metric(&agent, "cplink_agent_link_attempts_total", "result=\"ok\"")
        + metric(
            &agent,
            "cplink_agent_link_attempts_total",
            "result=\"duplicate\"",
        );
    assert_eq!(linked, 3.0);
    for server in &servers {
        server.wait_for_agents(1).await?;
    }
    // The link both ends kept carries dials: the first server reaches the agent.
    let echo = targets::echo().await?;
    let mut stream = client::tunnel_uds(&servers[0].uds, &echo.authority()).await?;
    stream.write_all(b"kept").await?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await?;
    assert_eq!(&back, b"kept");
    drop(stream);
    assert_eq!(agent.handle.links().len(), 2);
    agent.stop().await;
    Ok(())
}
