//! The whole product against real Kubernetes components: kube-apiserver, controller-manager
//! and scheduler from `scripts/kube.sh`, three simulated nodes whose pods run the freshly
//! built binaries, cplink installed with its Helm chart, the operator (a pod) rolling out a
//! ControlPlaneLink, and kube-apiserver sending `kubectl logs`, node proxy and service proxy
//! traffic through the tunnel.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

use std::time::Duration;

use cplink_e2e::cluster::PodAddress;
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::metrics::counter;
use cplink_e2e::stack::{self, Egress, Follow, LINK, NAMESPACE, STEP, Stack, StackOptions};
use cplink_e2e::{http1, wait};

/// A fixture HTTP server on one of the nodes, behind a Service.
const HELLO: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {app: hello}
  template:
    metadata:
      labels: {app: hello}
    spec:
      containers:
      - name: hello
        image: cplink-http-fixture:e2e
        command: [cplink-http-fixture]
        args: [\"--listen=$(POD_IP):8080\", \"--name=$(POD_NAME)\"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
spec:
  # No selector: Kubernetes refuses the pod's loopback address as an endpoint, so the test
  # writes the Endpoints itself (`ControlPlane::write_endpoints`).
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

/// How long each test may take: both take about 120 s, side by side.
const DEADLINE: Duration = Duration::from_secs(480);

const SERVICE_PROXY: &str = "/api/v1/namespaces/default/services/hello:80/proxy/";

fn node_healthz(node: &str) -> String {
    format!("/api/v1/nodes/{node}/proxy/healthz")
}

/// Waits until kube-apiserver's node proxy answers `ok` for every node's kubelet `/healthz`.
async fn node_proxy_answers(stack: &Stack, nodes: &[String], what: &str) -> anyhow::Result<()> {
    for node in nodes {
        stack
            .plane
            .wait_kubectl(what, STEP, &["get", "--raw", &node_healthz(node)], |out| {
                out.trim() == "ok"
            })
            .await?;
    }
    Ok(())
}

/// Successful dials of each agent, by node.
async fn agent_dials(stack: &Stack) -> anyhow::Result<Vec<(String, f64)>> {
    let mut dials = Vec::new();
    for (_, node, ip) in stack.pods("agent")? {
        let metrics = http1::get(format!("{ip}:8096").parse()?, "/metrics").await?;
        dials.push((
            node,
            counter(&metrics, "cplink_agent_dials_total", "result=\"ok\""),
        ));
    }
    dials.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(dials)
}

/// The Ready condition's (status, lastTransitionTime) of the link.
fn ready_condition(stack: &Stack) -> anyhow::Result<(String, String)> {
    let out = stack.link_jsonpath(
        "{.status.conditions[?(@.type==\"Ready\")].status} \
         {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
    )?;
    let (status, time) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
    Ok((status.to_owned(), time.to_owned()))
}

/// `kubectl` that is expected to fail: its standard error.
fn kubectl_err(stack: &Stack, args: &[&str]) -> String {
    match stack.plane.kubectl(args).output() {
        Ok(out) if out.status.success() => String::new(),
        Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
        Err(err) => err.to_string(),
    }
}

/// Successful dials counted by every server pod, and tunneled connections accepted by each
/// frontend (`tls`, `uds`, `grpc`), summed over the server pods.
async fn server_counts(stack: &Stack) -> anyhow::Result<(f64, BTreeMap<String, f64>)> {
    let mut dials = 0.0;
    let mut frontends = BTreeMap::new();
    for (_, _, ip) in stack.pods("server")? {
        let metrics = http1::get(format!("{ip}:8095").parse()?, "/metrics").await?;
        dials += counter(&metrics, "cplink_server_dials_total", "result=\"ok\"");
        for frontend in FRONTENDS {
            *frontends.entry((*frontend).to_owned()).or_default() += counter(
                &metrics,
                "cplink_server_frontend_connections_total",
                &format!("frontend=\"{frontend}\""),
            );
        }
    }
    Ok((dials, frontends))
}

/// The server's frontends, as its metrics label them.
const FRONTENDS: &[&str] = &["tls", "uds", "grpc"];

/// Applies the link and waits until `kubectl get controlplanelinks` shows it ready with one
/// server and an agent on every node; returns the node names and the agents as
/// (pod, node, IP).
async fn link_rolled_out(
    stack: &Stack,
) -> anyhow::Result<(Vec<String>, Vec<(String, String, String)>)> {
    let nodes: Vec<String> = stack.nodes.nodes().iter().map(|n| n.name.clone()).collect();
    stack.apply_link()?;
    let table = stack.wait_link_ready().await?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "SERVERS", "AGENTS", "AGE"],
        "{table}"
    );
    let agents = stack.pods("agent")?;
    let mut agent_nodes: Vec<&str> = agents.iter().map(|(_, node, _)| node.as_str()).collect();
    agent_nodes.sort_unstable();
    assert_eq!(agent_nodes, nodes, "one agent per node: {agents:?}");
    assert_eq!(stack.pods("server")?.len(), 1);
    // The default link binds agents to their nodes: the servers refuse any hello without a
    // token that TokenReview ties to an agent pod on the node claimed, so every agent counted
    // ready above linked with its pod's projected token.
    let server_args = stack.plane.kubectl_ok(&[
        "get",
        "deployment",
        "-n",
        NAMESPACE,
        &format!("{LINK}-server"),
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ])?;
    assert!(
        server_args.contains("--agent-identity=token"),
        "{server_args}"
    );
    let agent_volumes = stack.plane.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/component=agent",
        "-o",
        "jsonpath={.items[*].spec.volumes[*].projected.sources[*].serviceAccountToken.audience}",
    ])?;
    let audience = format!("cplink.dev/{NAMESPACE}/{LINK}");
    assert_eq!(
        agent_volumes
            .split_whitespace()
            .filter(|a| *a == audience)
            .count(),
        nodes.len(),
        "{agent_volumes}"
    );
    Ok((nodes, agents))
}

/// Runs the hello fixture on a node and writes its Service's Endpoints.
async fn hello_deployed(stack: &Stack) -> anyhow::Result<()> {
    stack.apply("hello", HELLO)?;
    stack
        .plane
        .wait_kubectl(
            "the hello pod to run",
            STEP,
            &[
                "get",
                "pods",
                "-l",
                "app=hello",
                "-o",
                "jsonpath={.items[*].status.phase}",
            ],
            |phase| phase == "Running",
        )
        .await?;
    let hello: Vec<PodAddress> = stack
        .plane
        .kubectl_ok(&[
            "get",
            "pods",
            "-l",
            "app=hello",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
        ])?
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ').map(str::to_owned);
            Some(PodAddress {
                name: fields.next()?,
                node: fields.next()?,
                ip: fields.next()?,
            })
        })
        .collect();
    assert_eq!(hello.len(), 1, "{hello:?}");
    stack
        .plane
        .write_endpoints("default", "hello", &hello, &[("http", 8080)])
        .await
}

/// With kube-apiserver wired to the link: node proxy `healthz` on every node, `kubectl logs`
/// of every agent, the service proxy and `kubectl logs -f` all work, and the server counted
/// them as dials through `frontend` and through no other frontend; each node's agent dialed
/// its kubelet. Returns the marker the followed log showed.
async fn requests_cross_the_tunnel(
    stack: &Stack,
    nodes: &[String],
    agents: &[(String, String, String)],
    frontend: &str,
) -> anyhow::Result<String> {
    let (dials_before, frontends_before) = server_counts(stack).await?;
    node_proxy_answers(stack, nodes, "node proxy through the tunnel").await?;
    for (pod, node, _) in agents {
        let log = stack.plane.kubectl_ok(&["logs", "-n", NAMESPACE, pod])?;
        assert!(
            log.contains("linked"),
            "the agent on {node} logged its link, fetched through the tunnel: {log}"
        );
    }
    let greeting = stack
        .plane
        .wait_kubectl(
            "the service proxy through the tunnel",
            STEP,
            &["get", "--raw", SERVICE_PROXY],
            |out| out.starts_with("hello from hello-"),
        )
        .await?;
    assert!(greeting.ends_with('\n'), "{greeting:?}");

    // `kubectl logs -f` streams lines written after it started.
    let follow = Follow::start(stack, &["logs", "-f", "deploy/hello"])?;
    let marker = format!("follow-{}", rand::random::<u32>());
    stack
        .plane
        .kubectl_ok(&["get", "--raw", &format!("{SERVICE_PROXY}{marker}")])?;
    wait::until("the request in the followed log", STEP, || {
        follow.contains(&marker)
    })
    .await?;
    drop(follow);

    // kube-apiserver keeps connections to a kubelet or pod open and reuses them, so the server
    // dialed at least once per destination (each node's kubelet and the hello pod), each dial
    // arriving through the expected frontend, and each node's own agent made the kubelet
    // dials of that node.
    let (dials_after, frontends_after) = server_counts(stack).await?;
    let destinations = (nodes.len() + 1) as f64;
    assert!(
        dials_after >= dials_before + destinations,
        "the server dialed every kubelet and the hello pod: {dials_before} -> {dials_after}"
    );
    for name in FRONTENDS {
        let (before, after) = (frontends_before[*name], frontends_after[*name]);
        if *name == frontend {
            assert!(
                after >= before + destinations,
                "kube-apiserver connected through the {name} frontend: {before} -> {after}"
            );
        } else {
            assert_eq!(before, after, "nothing came through the {name} frontend");
        }
    }
    for (node, dials) in agent_dials(stack).await? {
        assert!(dials >= 1.0, "the agent on {node} dialed its kubelet");
    }
    Ok(marker)
}

#[test]
fn kube_apiserver_reaches_nodes_and_pods_through_the_tunnel() -> anyhow::Result<()> {
    harness::run(
        "kube_apiserver_reaches_nodes_and_pods_through_the_tunnel",
        DEADLINE,
        http_connect,
    )
}

async fn http_connect(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane, nodes, forwarder and operator");
    let mut stack = Stack::start(StackOptions::default()).await?;

    // 1. The link rolls out: one server, an agent on each of the three nodes, all ready.
    steps.enter("rolling out the link");
    let (nodes, agents) = link_rolled_out(&stack).await?;
    steps.enter("running the hello fixture");
    hello_deployed(&stack).await?;

    // 2. kube-apiserver uses the egress configuration the operator wrote: HTTP CONNECT over
    // mutual TLS, through the forwarder to the frontend Service.
    steps.enter("restarting kube-apiserver with the egress configuration");
    stack.wire_egress().await?;
    steps.enter("requests through the tunnel");
    let marker = requests_cross_the_tunnel(&stack, &nodes, &agents, "tls").await?;

    // With every agent stopped, tunneled requests fail as the apiserver's dial errors while
    // plain API requests still work.
    steps.enter("requests with every agent stopped");
    stack.patch_link(r#"{"spec":{"agent":{"nodeSelector":{"cplink.dev/e2e":"no-such-node"}}}}"#)?;
    stack
        .plane
        .wait_kubectl(
            "every agent pod to be gone",
            STEP,
            &[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "name",
            ],
            |out| out.trim().is_empty(),
        )
        .await?;
    // kube-apiserver's HTTPConnect dialer reports the server's refusal as "proxy error from
    // <frontend> while dialing <node>, code 503"; upgrade requests (exec, port-forward) wrap
    // the same dial error in "error dialing backend". The first request may still meet a
    // kept-alive connection torn down with its agent.
    let mut refused = String::new();
    wait::until("node proxy to fail without agents", STEP, || {
        refused = kubectl_err(&stack, &["get", "--raw", &node_healthz(&nodes[0])]);
        refused.contains("code 503")
    })
    .await
    .map_err(|e| e.context(refused.clone()))?;
    let logs_refused = kubectl_err(&stack, &["logs", "deploy/hello"]);
    assert!(logs_refused.contains("code 503"), "{logs_refused}");
    let exec_refused = kubectl_err(&stack, &["exec", "deploy/hello", "--", "true"]);
    assert!(
        exec_refused.contains("error dialing backend") && exec_refused.contains("code 503"),
        "{exec_refused}"
    );
    stack
        .plane
        .kubectl_ok(&["create", "configmap", "crud-check", "--from-literal=a=b"])?;
    let value =
        stack
            .plane
            .kubectl_ok(&["get", "configmap", "crud-check", "-o", "jsonpath={.data.a}"])?;
    assert_eq!(value, "b");
    stack
        .plane
        .kubectl_ok(&["delete", "configmap", "crud-check"])?;

    steps.enter("the agents returning");
    stack.patch_link(r#"{"spec":{"agent":{"nodeSelector":null}}}"#)?;
    stack.wait_link_ready().await?;
    stack
        .plane
        .wait_kubectl(
            "node proxy after the agents returned",
            STEP,
            &["get", "--raw", &node_healthz(&nodes[0])],
            |out| out.trim() == "ok",
        )
        .await?;
    stack
        .plane
        .wait_kubectl(
            "logs after the agents returned",
            STEP,
            &["logs", "deploy/hello"],
            |out| out.contains(&marker),
        )
        .await?;

    // 3. Resilience: a deleted server pod is replaced; the link degrades, then recovers.
    steps.enter("a deleted server pod replaced");
    let (status, since) = ready_condition(&stack)?;
    assert_eq!(status, "True");
    let (old_server, _, _) = stack.pods("server")?.remove(0);
    stack.plane.kubectl_ok(&[
        "delete",
        "pod",
        "-n",
        NAMESPACE,
        &old_server,
        "--wait=false",
    ])?;
    let mut last = (String::new(), String::new());
    wait::until("the link to go unready and recover", STEP, || {
        if let Ok(now) = ready_condition(&stack) {
            last = now;
        }
        last.0 == "True" && last.1 != since
    })
    .await
    .map_err(|e| e.context(format!("Ready {last:?}, was True since {since}")))?;
    stack.wait_link_ready().await?;
    let servers = stack.pods("server")?;
    assert!(
        servers.iter().all(|(name, _, _)| *name != old_server),
        "{servers:?}"
    );
    node_proxy_answers(&stack, &nodes, "node proxy through the new server").await?;

    // A DaemonSet deleted by hand is restored by the operator, with agents on every node.
    steps.enter("a deleted agent DaemonSet restored");
    let agents_uid = [
        "get",
        "ds",
        "edge-agent",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.metadata.uid}",
    ];
    let uid = stack.plane.kubectl_ok(&agents_uid)?;
    stack.plane.kubectl_ok(&[
        "delete",
        "ds",
        "edge-agent",
        "-n",
        NAMESPACE,
        "--wait=false",
    ])?;
    stack
        .plane
        .wait_kubectl("the DaemonSet to be restored", STEP, &agents_uid, |now| {
            !now.is_empty() && now != uid
        })
        .await?;
    stack.wait_link_ready().await?;

    // 4. Deleting the link removes everything it created, and its pods stop.
    steps.enter("deleting the link");
    stack
        .plane
        .kubectl_ok(&["delete", "cpl", LINK, "-n", NAMESPACE, "--timeout=90s"])?;
    stack
        .plane
        .wait_kubectl(
            "the link's namespaced children to be gone",
            STEP,
            &[
                "get",
                "deploy,ds,svc,secret,sa,role,rolebinding,pods",
                "-n",
                NAMESPACE,
                "-l",
                &format!("app.kubernetes.io/instance={LINK}"),
                "-o",
                "name",
            ],
            |out| out.trim().is_empty(),
        )
        .await?;
    let cluster =
        stack
            .plane
            .kubectl_ok(&["get", "clusterrole,clusterrolebinding", "-o", "name"])?;
    assert!(
        !cluster.contains(&format!("cplink:{NAMESPACE}:{LINK}")),
        "{cluster}"
    );
    // What remains: the hello fixture and the operator's replicas.
    wait::until("every process of the link to stop", STEP, || {
        stack.nodes.running() == 1 + stack::OPERATOR_REPLICAS
    })
    .await
    .map_err(|e| e.context(format!("{} containers still run", stack.nodes.running())))?;
    steps.enter("stopping the stack");
    drop(stack);
    Ok(())
}

/// kube-apiserver in `GRPC` mode: konnectivity gRPC over the Unix socket the server creates in
/// the link's `socketHostPath` (a directory of this run, shared by every simulated node and
/// kube-apiserver). The agents-removed and resilience scenarios are the HTTPConnect test's.
#[test]
fn kube_apiserver_in_grpc_mode_reaches_nodes_and_pods_through_the_socket() -> anyhow::Result<()> {
    harness::run(
        "kube_apiserver_in_grpc_mode_reaches_nodes_and_pods_through_the_socket",
        DEADLINE,
        grpc,
    )
}

async fn grpc(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane, nodes, forwarder and operator");
    let mut stack = Stack::start_with(StackOptions::default(), Egress::Grpc).await?;
    steps.enter("rolling out the link");
    let (nodes, agents) = link_rolled_out(&stack).await?;
    let socket = stack.socket_dir().join("konnectivity-server.socket");
    let address = stack.link_jsonpath("{.status.frontend.address}")?;
    assert_eq!(
        address,
        socket.display().to_string(),
        "the status names the socket"
    );
    // The unprivileged server made the socket in the host directory it was given.
    let meta = std::fs::symlink_metadata(&socket)?;
    assert!(
        meta.file_type().is_socket(),
        "{} is a socket",
        socket.display()
    );
    assert_eq!(
        meta.uid(),
        stack::POD_USER,
        "the server's user owns the socket"
    );
    steps.enter("running the hello fixture");
    hello_deployed(&stack).await?;

    steps.enter("restarting kube-apiserver with the egress configuration");
    let egress = std::fs::read_to_string(stack.wire_egress().await?)?;
    assert!(egress.contains("proxyProtocol: GRPC"), "{egress}");
    assert!(
        egress.contains(&format!("udsName: {}", socket.display())),
        "{egress}"
    );
    // kube-apiserver started with it: the pass-through selections are valid as written.
    assert!(
        egress.ends_with(
            "- name: controlplane\n  connection:\n    proxyProtocol: Direct\n\
             - name: etcd\n  connection:\n    proxyProtocol: Direct\n"
        ),
        "{egress}"
    );
    steps.enter("requests through the tunnel");
    requests_cross_the_tunnel(&stack, &nodes, &agents, "grpc").await?;
    steps.enter("stopping the stack");
    drop(stack);
    Ok(())
}
