//! The whole product against real Kubernetes components: kube-apiserver, controller-manager
//! and scheduler from `scripts/kube.sh`, three real nodes (kubelet and containerd) on a
//! network kube-apiserver has no route to, cplink installed with its Helm chart and running
//! from its image, the operator (a pod) rolling out a ControlPlaneLink, and kube-apiserver
//! sending `kubectl logs`, node proxy and service proxy traffic through the tunnel; then the
//! link without agents, a lost server, a deleted DaemonSet and the link's deletion.
//!
//! The two modes' tests run one after the other: each runs a whole cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::sync::Mutex;
use std::time::Duration;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::image;
use cplink_e2e::metrics::counter;
use cplink_e2e::stack::{self, Egress, Follow, LINK, NAMESPACE, STEP, Stack, StackOptions};
use cplink_e2e::wait;
use cplink_operator::resources::{
    AGENT_TERMINATION_GRACE_PERIOD_SECONDS, SERVER_TERMINATION_GRACE_PERIOD_SECONDS,
    daemonset::AGENT_ADMIN_PORT, deployment::SERVER_ADMIN_PORT,
};

/// One cluster at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

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
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 0
      containers:
      - name: hello
        image: {FIXTURE_IMAGE}
        imagePullPolicy: Never
        args: [--http=0.0.0.0:8080]
        env:
        - name: FIXTURE_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: default
spec:
  selector: {app: hello}
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

/// How long each test may take, once its turn came.
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

/// The admin endpoint at `port` of the pod at `ip`.
fn admin(ip: &str, port: i32) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(ip.parse()?, u16::try_from(port)?))
}

/// Successful dials of each agent, by node.
async fn agent_dials(stack: &Stack) -> anyhow::Result<Vec<(String, f64)>> {
    let mut dials = Vec::new();
    for (_, node, ip) in stack.pods("agent")? {
        let metrics = stack
            .admin_get(admin(&ip, AGENT_ADMIN_PORT)?, "/metrics")
            .await?;
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
        let metrics = stack
            .admin_get(admin(&ip, SERVER_ADMIN_PORT)?, "/metrics")
            .await?;
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
    let nodes = stack.nodes.names();
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

/// Runs the hello fixture on a node, behind its Service, and waits until the Service's
/// Endpoints name its ready pod.
async fn hello_deployed(stack: &Stack) -> anyhow::Result<()> {
    stack.apply(
        "hello",
        &HELLO.replace("{FIXTURE_IMAGE}", image::FIXTURE_NAME),
    )?;
    stack
        .plane
        .wait_kubectl(
            "the hello pod to be ready behind its Service",
            STEP,
            &[
                "get",
                "endpoints",
                "hello",
                "-o",
                "jsonpath={.subsets[*].addresses[*].targetRef.name}",
            ],
            |pods| pods.starts_with("hello-") && !pods.contains(' '),
        )
        .await
        .map_err(|err| err.context(stack.diagnostics()))?;
    Ok(())
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

/// Runs `test` once no other test of this file runs a cluster.
fn one_at_a_time<F, Fut>(name: &str, test: F) -> anyhow::Result<()>
where
    F: FnOnce(Steps) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let _one = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    harness::run(name, DEADLINE, test)
}

#[test]
fn kube_apiserver_reaches_nodes_and_pods_through_the_tunnel() -> anyhow::Result<()> {
    one_at_a_time(
        "kube_apiserver_reaches_nodes_and_pods_through_the_tunnel",
        http_connect,
    )
}

async fn http_connect(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane, three real nodes, the forwarder and the operator");
    let mut stack = Stack::start(StackOptions::default(), Egress::HttpConnect).await?;

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
    // Each agent drains for up to its termination grace period before it goes.
    let agents_gone =
        STEP + Duration::from_secs(AGENT_TERMINATION_GRACE_PERIOD_SECONDS.unsigned_abs());
    stack
        .plane
        .wait_kubectl(
            "every agent pod to be gone",
            agents_gone,
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
        .await
        .map_err(|e| e.context(stack.diagnostics()))?;
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
    // The old pod drains its tunnels before it goes.
    let mut servers = Vec::new();
    wait::until("the deleted server pod to be gone", STEP, || {
        servers = stack.pods("server").unwrap_or_default();
        servers.len() == 1 && servers.iter().all(|(name, _, _)| *name != old_server)
    })
    .await
    .map_err(|e| e.context(format!("server pods {servers:?}, deleted {old_server}")))?;
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
    let new_uid = stack
        .plane
        .wait_kubectl("the DaemonSet to be restored", STEP, &agents_uid, |now| {
            !now.is_empty() && now != uid
        })
        .await?;
    stack.wait_link_ready().await?;
    // Restored means running again: one ready agent of the new DaemonSet per node, and the old
    // ones gone (they drain for up to their grace period). An agent pod deleted seconds after
    // its DaemonSet made it was seen Terminating here for more than twice its grace period
    // (kubelet v1.20 still starting it): that is kubelet's business, not the link's, so the
    // deletion below starts from agents that run.
    stack
        .plane
        .wait_kubectl(
            "an agent of the new DaemonSet ready on every node, and no other",
            STEP + Duration::from_secs(AGENT_TERMINATION_GRACE_PERIOD_SECONDS.unsigned_abs()),
            &[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "jsonpath={range .items[*]}{.metadata.ownerReferences[0].uid} \
                 {.status.conditions[?(@.type==\"Ready\")].status} \
                 {.metadata.deletionTimestamp}{\"\\n\"}{end}",
            ],
            |out| {
                let pods: Vec<Vec<&str>> = out
                    .lines()
                    .map(|line| line.split_whitespace().collect())
                    .collect();
                pods.len() == nodes.len()
                    && pods.iter().all(|pod| pod[..] == [new_uid.as_str(), "True"])
            },
        )
        .await
        .map_err(|e| e.context(stack.diagnostics()))?;

    // 4. Deleting the link removes everything it created, and its pods stop.
    steps.enter("deleting the link");
    stack
        .plane
        .kubectl_ok(&["delete", "cpl", LINK, "-n", NAMESPACE, "--timeout=90s"])?;
    // Servers and agents drain for up to their grace periods before they go.
    let children_gone =
        STEP + Duration::from_secs(SERVER_TERMINATION_GRACE_PERIOD_SECONDS.unsigned_abs());
    stack
        .plane
        .wait_kubectl(
            "the link's namespaced children to be gone",
            children_gone,
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
        .await
        .map_err(|e| e.context(stack.diagnostics()))?;
    let cluster =
        stack
            .plane
            .kubectl_ok(&["get", "clusterrole,clusterrolebinding", "-o", "name"])?;
    assert!(
        !cluster.contains(&format!("cplink:{NAMESPACE}:{LINK}")),
        "{cluster}"
    );
    // What remains of cplink on the nodes: the operator's replicas.
    let running = Mutex::new(0);
    wait::until_async("every container of the link to stop", STEP, || async {
        let now = stack.nodes.running(image::NAME).await.unwrap_or(usize::MAX);
        *running.lock().expect("running") = now;
        now == stack::OPERATOR_REPLICAS
    })
    .await
    .map_err(|e| {
        e.context(format!(
            "{:?} containers of {} still run",
            running.lock().map(|n| *n),
            image::NAME
        ))
    })?;
    println!(
        "on {} real nodes in HTTPConnect mode: node proxy, agent logs, the service proxy and \
         kubectl logs -f crossed the tunnel through the tls frontend; without agents they \
         failed with code 503 while the API kept serving; a deleted server pod and a deleted \
         agent DaemonSet were replaced and the link became ready again; deleting the link \
         removed its children and stopped its containers",
        nodes.len()
    );
    steps.enter("stopping the stack");
    stack.stop_leaving_nothing()
}

/// kube-apiserver in `GRPC` mode: konnectivity gRPC over the Unix socket the server creates in
/// the link's `socketHostPath` (a directory of this run on the host, where the server's node
/// and kube-apiserver both see it). The agents-removed and resilience scenarios are the
/// HTTPConnect test's.
#[test]
fn kube_apiserver_in_grpc_mode_reaches_nodes_and_pods_through_the_socket() -> anyhow::Result<()> {
    one_at_a_time(
        "kube_apiserver_in_grpc_mode_reaches_nodes_and_pods_through_the_socket",
        grpc,
    )
}

async fn grpc(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane, three real nodes, the forwarder and the operator");
    let mut stack = Stack::start(StackOptions::default(), Egress::Grpc).await?;
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
    println!(
        "on {} real nodes in GRPC mode: the unprivileged server made {} (uid {}), the status \
         and kube-apiserver's egress file name it, and node proxy, agent logs, the service \
         proxy and kubectl logs -f crossed the tunnel through the grpc frontend only",
        nodes.len(),
        socket.display(),
        stack::POD_USER
    );
    steps.enter("stopping the stack");
    stack.stop_leaving_nothing()
}
