//! cplink on real nodes: three kubelets with containerd, each in namespaces of its own on a
//! network kube-apiserver has no route to; the chart's operator, the link's servers and its
//! agents running from cplink's own image. Until kube-apiserver is wired to the link,
//! `kubectl logs` and `kubectl exec` to a pod on a worker node fail to dial its kubelet; once
//! it is wired, both work (exec with standard input, and 50 MiB of checksummed standard
//! output), and the server's counters show that they came through the frontend of the egress
//! mode (HTTP CONNECT over mutual TLS, or konnectivity gRPC over the server's Unix socket) and
//! crossed the tunnel.
//!
//! The two modes' tests run one after the other: each runs a whole cluster.

use std::io::Write as _;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::image;
use cplink_e2e::node::protected_sysctls;
use cplink_e2e::nodes;
use cplink_e2e::stack::{Egress, NAMESPACE, STEP, Stack, StackOptions};
use sha2::{Digest as _, Sha256};

/// How long the test may take: it takes 60 to 120 s.
const DEADLINE: Duration = Duration::from_secs(480);

/// What the shell pod prints first.
const GREETING: &str = "hello from a real node";

/// The standard output `kubectl exec` carries, checksummed.
const LARGE: usize = 50 << 20;

/// The standard input `kubectl exec -i` carries, checksummed.
const STDIN: usize = 1 << 20;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One cluster at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

/// `kubectl args...` that must fail: its standard error.
fn kubectl_fails(stack: &Stack, args: &[&str]) -> anyhow::Result<String> {
    let out = stack.plane.kubectl(args).output()?;
    anyhow::ensure!(
        !out.status.success(),
        "kubectl {} succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).trim().to_owned())
}

/// `kubectl args...` fed `stdin`; its standard output and error.
fn kubectl_with_stdin(
    stack: &Stack,
    args: &[&str],
    stdin: &[u8],
) -> anyhow::Result<(Vec<u8>, String)> {
    let mut child = stack
        .plane
        .kubectl(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || pipe.write_all(&input));
    let out = child.wait_with_output()?;
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the stdin writer panicked"))?;
    // kubectl's failure first: it explains a broken pipe.
    anyhow::ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    written?;
    Ok((
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn run(test: &str, egress: Egress) -> anyhow::Result<()> {
    let _one = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let sysctls = protected_sysctls()?;
    harness::run(test, DEADLINE, move |steps| logs_and_exec(steps, egress))?;
    assert_eq!(protected_sysctls()?, sysctls, "host sysctls changed");
    Ok(())
}

#[test]
fn on_real_nodes_logs_and_exec_cross_the_tunnel_once_kube_apiserver_is_wired() -> anyhow::Result<()>
{
    run(
        "on_real_nodes_logs_and_exec_cross_the_tunnel_once_kube_apiserver_is_wired",
        Egress::HttpConnect,
    )
}

#[test]
fn in_grpc_mode_on_real_nodes_logs_and_exec_cross_the_tunnel_through_the_socket()
-> anyhow::Result<()> {
    run(
        "in_grpc_mode_on_real_nodes_logs_and_exec_cross_the_tunnel_through_the_socket",
        Egress::Grpc,
    )
}

async fn logs_and_exec(steps: Steps, egress: Egress) -> anyhow::Result<()> {
    steps.enter("starting the control plane, three real nodes and cplink from its image");
    let mut stack = Stack::start(StackOptions::default(), egress).await?;
    let names = stack.nodes.names();
    assert_eq!(names.len(), nodes::DEFAULT_NODES);

    steps.enter("rolling out the link");
    stack.apply_link()?;
    stack.wait_link_ready().await?;
    // Every cplink pod (operators, server, agents) runs the image, on a real node.
    let images = stack.plane.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={range .items[*]}{.spec.nodeName} {.spec.containers[0].image} \
         {.status.containerStatuses[0].imageID}{\"\\n\"}{end}",
    ])?;
    let pods: Vec<Vec<&str>> = images
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        pods.len(),
        cplink_e2e::stack::OPERATOR_REPLICAS + 1 + names.len(),
        "two operators, a server and an agent per node: {images}"
    );
    for pod in &pods {
        assert!(
            matches!(pod[..], [node, image, id] if names.iter().any(|n| n == node)
                && image == image::NAME && id.starts_with("sha256:")),
            "a cplink pod not running the image on a real node: {pod:?}"
        );
    }

    let node = names.last().expect("three nodes").clone();
    let node_ip = stack.nodes.nodes().last().expect("three nodes").ip();
    steps.enter(format!("a shell pod on {node}"));
    nodes::run_shell_pod(
        &stack.plane,
        "shell",
        &node,
        &format!("echo {GREETING}; exec sleep 3600"),
    )
    .await
    .map_err(|err| err.context(stack.diagnostics()))?;

    steps.enter("kubectl logs and exec before kube-apiserver is wired");
    let dial = format!("dial tcp {node_ip}:10250");
    let logs = kubectl_fails(&stack, &["logs", "shell", "--request-timeout=20s"])?;
    assert!(
        logs.contains(&dial),
        "logs should fail to dial the kubelet: {logs}"
    );
    let exec = kubectl_fails(
        &stack,
        &["exec", "shell", "--request-timeout=20s", "--", "true"],
    )?;
    assert!(
        exec.contains("error dialing backend") && exec.contains(&dial),
        "exec should fail to dial the kubelet: {exec}"
    );
    let before = stack.tunnel_counts().await?;
    assert_eq!(
        before.frontend, 0.0,
        "nothing came through the frontend yet"
    );
    let agent_before = before.agent_dials_on(&node)?;

    steps.enter("restarting kube-apiserver with the egress configuration");
    let wired = std::fs::read_to_string(stack.wire_egress().await?)?;
    let protocol = match egress {
        Egress::HttpConnect => "proxyProtocol: HTTPConnect",
        Egress::Grpc => "proxyProtocol: GRPC",
    };
    assert!(wired.contains(protocol), "{wired}");

    steps.enter("kubectl logs through the tunnel");
    stack
        .plane
        .wait_kubectl(
            "kubectl logs through the tunnel",
            STEP,
            &["logs", "shell"],
            |out| out.contains(GREETING),
        )
        .await?;

    steps.enter("kubectl exec with standard input through the tunnel");
    let input: Vec<u8> = (0..STDIN).map(|_| rand::random::<u8>()).collect();
    let (out, _) = kubectl_with_stdin(&stack, &["exec", "-i", "shell", "--", "sha256sum"], &input)?;
    let summed = String::from_utf8_lossy(&out);
    assert_eq!(
        summed.split_whitespace().next(),
        Some(hex(&Sha256::digest(&input)).as_str()),
        "the pod read the exact {STDIN} bytes sent"
    );

    steps.enter("kubectl exec with 50 MiB of standard output through the tunnel");
    let script = format!(
        "head -c {LARGE} /dev/urandom >/tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob \
         && rm /tmp/blob"
    );
    let mut attempt = 0;
    let (blob, stderr) = loop {
        attempt += 1;
        let before = hop_counts(&stack).await?;
        let (blob, stderr) =
            kubectl_with_stdin(&stack, &["exec", "shell", "--", "sh", "-c", &script], &[])?;
        if blob.len() == LARGE {
            break (blob, stderr);
        }
        let loss = Loss::place(&stack, blob.len(), LARGE, before).await?;
        // cplink lost bytes: that is this test's failure. Bytes lost outside the tunnel are
        // kubectl's, kube-apiserver's or the kubelet's (README, "A tunnel that fails"): told,
        // and the exec is run again, a bounded number of times.
        assert!(!loss.in_cplink(), "{loss}");
        println!("exec attempt {attempt}: {loss}");
        assert!(
            attempt < 3,
            "every exec came back short, outside cplink: {loss}"
        );
    };
    assert_eq!(
        stderr.split_whitespace().next(),
        Some(hex(&Sha256::digest(&blob)).as_str()),
        "the 50 MiB arrived as the pod wrote them"
    );

    steps.enter("the server's and the agent's counters");
    let after = stack.tunnel_counts().await?;
    let agent_after = after.agent_dials_on(&node)?;
    // kube-apiserver dials once per exec and at least once for logs, each dial a connection
    // to the frontend and a dial by the agent of the pod's node.
    let frontend = egress.frontend();
    assert!(
        after.frontend >= before.frontend + 3.0,
        "logs and two execs came through the {frontend} frontend: {before:?} -> {after:?}"
    );
    assert!(
        after.dials >= before.dials + 3.0,
        "the server dialed through the tunnel: {before:?} -> {after:?}"
    );
    assert!(
        after.from_agents >= before.from_agents + LARGE as f64,
        "the 50 MiB crossed the tunnel: {before:?} -> {after:?}"
    );
    assert!(
        agent_after >= agent_before + 3.0,
        "the agent on {node} dialed its kubelet: {agent_before} -> {agent_after}"
    );
    println!(
        "on {} real nodes running cplink from its image: before kube-apiserver was wired, logs \
         and exec failed to dial {node_ip}:10250; after, logs, exec with 1 MiB of stdin and \
         50 MiB of checksummed stdout went through the {frontend} frontend ({} connections, {} dials, \
         {:.0} MiB from the agents) and the agent on {node} ({} dials)",
        names.len(),
        after.frontend - before.frontend,
        after.dials - before.dials,
        (after.from_agents - before.from_agents) / f64::from(1u32 << 20),
        agent_after - agent_before,
    );

    steps.enter("stopping everything");
    stack.stop_leaving_nothing()
}

/// Standard output of each exec of the stress test.
const STRESS_OUTPUT: usize = 20 << 20;

/// Execs of the stress test.
const STRESS_ROUNDS: usize = 12;

/// Bytes the agents read from their destinations (the kubelets) and the server passed on to
/// its clients (kube-apiserver), as their counters say.
#[derive(Debug, Clone, Copy)]
struct Hops {
    agents: f64,
    server: f64,
}

async fn hop_counts(stack: &Stack) -> anyhow::Result<Hops> {
    use cplink_e2e::metrics::counter;
    use cplink_operator::resources::{daemonset::AGENT_ADMIN_PORT, deployment::SERVER_ADMIN_PORT};
    let mut hops = Hops {
        agents: 0.0,
        server: 0.0,
    };
    for (_, _, ip) in stack.pods("agent")? {
        let address = std::net::SocketAddr::new(ip.parse()?, u16::try_from(AGENT_ADMIN_PORT)?);
        let metrics = stack.admin_get(address, "/metrics").await?;
        hops.agents += counter(
            &metrics,
            "cplink_agent_tunnel_bytes_total",
            "direction=\"from_destination\"",
        );
    }
    for (_, _, ip) in stack.pods("server")? {
        let address = std::net::SocketAddr::new(ip.parse()?, u16::try_from(SERVER_ADMIN_PORT)?);
        let metrics = stack.admin_get(address, "/metrics").await?;
        hops.server += counter(
            &metrics,
            "cplink_server_tunnel_bytes_total",
            "direction=\"from_agent\"",
        );
    }
    Ok(hops)
}

/// Where the bytes of a short `kubectl exec` output went missing, from the counts of each hop
/// while it ran.
struct Loss {
    got: usize,
    expected: usize,
    /// Bytes the agents read from the kubelets (TLS and SPDY framing included).
    agents: f64,
    /// Bytes the server passed on to kube-apiserver.
    server: f64,
    /// What the link's servers and agents logged about aborted tunnels.
    aborted: String,
}

impl Loss {
    async fn place(
        stack: &Stack,
        got: usize,
        expected: usize,
        before: Hops,
    ) -> anyhow::Result<Self> {
        let after = hop_counts(stack).await?;
        let logs = stack
            .plane
            .kubectl_ok(&[
                "logs",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component in (agent,server)",
                "--prefix",
                "--tail=200",
            ])
            .unwrap_or_else(|err| format!("{err:#}"));
        Ok(Loss {
            got,
            expected,
            agents: after.agents - before.agents,
            server: after.server - before.server,
            aborted: logs
                .lines()
                .filter(|line| line.contains("abort"))
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }

    /// Whether the tunnel passed on fewer bytes than it read from the kubelet.
    fn in_cplink(&self) -> bool {
        self.server < self.agents
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (got, expected, agents, server) = (self.got, self.expected, self.agents, self.server);
        let place = if self.in_cplink() {
            "cplink lost bytes between the kubelet and kube-apiserver"
        } else if agents < expected as f64 {
            "the tunnel passed on every byte it read, and read less than the output from the \
             kubelet: lost at the kubelet's end"
        } else {
            "the tunnel passed on every byte it read, the whole output: lost after the server \
             (kube-apiserver or kubectl)"
        };
        write!(
            f,
            "kubectl exec returned {got} of {expected} bytes; the agents read {agents} bytes from \
             the kubelets and the server passed {server} on to kube-apiserver: {place}\n\
             aborted tunnels:\n{}",
            self.aborted
        )
    }
}

/// `kubectl args...` whose standard output is read slowly (about 6 MB/s), so that much of it
/// is still on its way when the kubelet closes its end; standard output, error and success.
fn kubectl_read_slowly(stack: &Stack, args: &[&str]) -> anyhow::Result<(Vec<u8>, String, bool)> {
    use std::io::Read as _;
    let mut child = stack
        .plane
        .kubectl(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = stdout.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = child.wait()?;
    let stderr = errors
        .join()
        .map_err(|_| anyhow::anyhow!("the stderr reader panicked"))?;
    Ok((out, stderr, status.success()))
}

/// Many execs in one cluster, each read slowly so that its end finds much of the output still
/// on its way: the tunnel must read every exec's whole output from the kubelet and pass all of
/// it on to kube-apiserver. kubectl itself, so read, now and then comes back short with exit
/// status 0 although the tunnel passed on every byte (2 of 12 execs in one run): those are
/// counted and placed with [`Loss`], not failed.
#[test]
#[ignore = "stress: a dozen execs read slowly, about a minute more than the test above"]
fn in_grpc_mode_exec_output_read_slowly_is_whole() -> anyhow::Result<()> {
    let _one = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    harness::run(
        "in_grpc_mode_exec_output_read_slowly_is_whole",
        DEADLINE * 2,
        |steps| async move {
            steps.enter("starting the control plane, three real nodes and cplink");
            let mut stack = Stack::start(StackOptions::default(), Egress::Grpc).await?;
            stack.apply_link()?;
            stack.wait_link_ready().await?;
            let node = stack.nodes.names().last().expect("three nodes").clone();
            nodes::run_shell_pod(&stack.plane, "shell", &node, "exec sleep 3600").await?;
            stack.wire_egress().await?;
            stack
                .plane
                .wait_kubectl(
                    "kubectl exec",
                    STEP,
                    &["exec", "shell", "--", "true"],
                    |_| true,
                )
                .await?;
            let script = format!("head -c {STRESS_OUTPUT} /dev/zero");
            let mut short = 0;
            for round in 0..STRESS_ROUNDS {
                steps.enter(format!("exec {round}"));
                let before = hop_counts(&stack).await?;
                let (out, _, ok) =
                    kubectl_read_slowly(&stack, &["exec", "shell", "--", "sh", "-c", &script])?;
                anyhow::ensure!(ok, "kubectl exec failed");
                let loss = Loss::place(&stack, out.len(), STRESS_OUTPUT, before).await?;
                // The tunnel read the whole output from the kubelet and passed all of it on,
                // whatever kubectl made of it.
                assert!(!loss.in_cplink(), "exec {round}: {loss}");
                assert!(
                    loss.agents >= STRESS_OUTPUT as f64,
                    "exec {round}: the agent did not read the whole output: {loss}"
                );
                if out.len() != STRESS_OUTPUT {
                    short += 1;
                    println!("exec {round}: {loss}");
                }
            }
            println!(
                "{STRESS_ROUNDS} execs of {STRESS_OUTPUT} bytes: the tunnel carried every byte \
                 of each; kubectl came back short {short} times"
            );
            stack.stop_leaving_nothing()
        },
    )
}
