//! cplink on real nodes: the rest of what kube-apiserver sends to nodes and pods, through the
//! tunnel, in both egress modes. On three kubelets with containerd, on a network
//! kube-apiserver has no route to, once kube-apiserver is wired to the link:
//!
//! - `kubectl logs -f` sees a line the pod writes after the follow began;
//! - `kubectl exec -t` gets a remote terminal and carries a typed line;
//! - `kubectl attach -i` carries a line to a pod reading its standard input, and its answer
//!   back;
//! - `kubectl port-forward` carries 100 MiB each way to an echo in a pod, checksummed, and 20
//!   parallel connections each verified;
//! - the node, pod and service proxies reach the kubelet and a pod's HTTP server;
//! - a validating admission webhook addressed by a Service, served over TLS by a pod, denies
//!   a labelled ConfigMap with its own message and allows another;
//! - an aggregated API (`fixture.cplink.dev/v1`), served by a pod behind an APIService,
//!   becomes Available and answers discovery and a list.
//!
//! Each step is counted at the server's frontend of the egress mode, at its dials and at the
//! agents: the counters grow by at least the step's operations. Every operation is a fresh
//! connection: an upgrade (exec, attach, port-forward) or a request to a destination that
//! kube-apiserver's transport of that kind has not connected to before (its idle connections
//! would otherwise be reused).
//!
//! The pods are the shell and reader of busybox and `cplink-fixture` from its own image
//! (echo, HTTP, the webhook and the aggregated API), all on the last node. The two modes' tests
//! run one after the other: each runs a whole cluster.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::image;
use cplink_e2e::node::protected_sysctls;
use cplink_e2e::nodes;
use cplink_e2e::pki::{Pki, Usage};
use cplink_e2e::pty::Terminal;
use cplink_e2e::stack::{Egress, Follow, STEP, Stack, StackOptions, TunnelCounts};
use cplink_e2e::wait;
use rand::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

/// How long the test may take.
const DEADLINE: Duration = Duration::from_secs(420);

/// What the shell pod prints first.
const GREETING: &str = "hello from a real node";

/// The fixture's pod and Service (in `default`).
const FIXTURE: &str = "fixture";

/// The fixture's ports in its pod: echo, HTTP for the pod proxy, HTTP behind the Service,
/// HTTPS (webhook and aggregated API).
const ECHO_PORT: u16 = 7000;
const POD_HTTP_PORT: u16 = 8080;
const SERVICE_HTTP_PORT: u16 = 8081;
const HTTPS_PORT: u16 = 8443;

/// What `kubectl port-forward` carries each way on one connection.
const LARGE: usize = 100 << 20;

/// Parallel port-forwarded connections, and what each carries each way.
const PARALLEL: usize = 20;
const SMALL: usize = 256 << 10;

/// The label the fixture's webhook decides on.
const ADMISSION_LABEL: &str = "fixture.cplink.dev/admission";

/// The aggregated API's group and version.
const GROUP: &str = "fixture.cplink.dev";

/// One cluster at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn run(test: &str, egress: Egress) -> anyhow::Result<()> {
    let _one = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let sysctls = protected_sysctls()?;
    harness::run(test, DEADLINE, move |steps| operations(steps, egress))?;
    assert_eq!(protected_sysctls()?, sysctls, "host sysctls changed");
    Ok(())
}

#[test]
fn on_real_nodes_kubectl_operations_proxies_webhooks_and_aggregated_apis_cross_the_tunnel()
-> anyhow::Result<()> {
    run(
        "on_real_nodes_kubectl_operations_proxies_webhooks_and_aggregated_apis_cross_the_tunnel",
        Egress::HttpConnect,
    )
}

#[test]
fn in_grpc_mode_on_real_nodes_kubectl_operations_proxies_webhooks_and_aggregated_apis_cross_the_tunnel()
-> anyhow::Result<()> {
    run(
        "in_grpc_mode_on_real_nodes_kubectl_operations_proxies_webhooks_and_aggregated_apis_cross_the_tunnel",
        Egress::Grpc,
    )
}

/// The tunnel's counters at the start of a step.
struct Counted {
    before: TunnelCounts,
}

impl Counted {
    async fn start(stack: &Stack) -> anyhow::Result<Self> {
        Ok(Counted {
            before: stack.tunnel_counts().await?,
        })
    }

    /// Fails unless `operations` connections came through the frontend, were dialed by the
    /// server and by the agents since the start; says how many did.
    async fn crossed(self, stack: &Stack, what: &str, operations: u32) -> anyhow::Result<String> {
        self.crossed_carrying(stack, what, operations, 0).await
    }

    /// [`Counted::crossed`], and at least `bytes` came from the agents.
    async fn crossed_carrying(
        self,
        stack: &Stack,
        what: &str,
        operations: u32,
        bytes: usize,
    ) -> anyhow::Result<String> {
        let after = stack.tunnel_counts().await?;
        let before = self.before;
        let frontend = after.frontend - before.frontend;
        let dials = after.dials - before.dials;
        let agents = after.all_agent_dials() - before.all_agent_dials();
        let carried = after.from_agents - before.from_agents;
        let wanted = f64::from(operations);
        let name = stack.egress().frontend();
        anyhow::ensure!(
            frontend >= wanted && dials >= wanted && agents >= wanted && carried >= bytes as f64,
            "{what}: {operations} operations and {bytes} bytes, but {frontend} connections \
             through the {name} frontend, {dials} server dials, {agents} agent dials, \
             {carried} bytes from the agents: {before:?} -> {after:?}"
        );
        let mut counted = format!(
            "{frontend} {name} frontend connections, {dials} server dials, {agents} agent dials"
        );
        if bytes > 0 {
            counted += &format!(
                ", {:.1} MiB from the agents",
                carried / f64::from(1u32 << 20)
            );
        }
        Ok(counted)
    }
}

async fn operations(steps: Steps, egress: Egress) -> anyhow::Result<()> {
    steps.enter("starting the control plane, three real nodes and cplink from its image");
    let mut stack = Stack::start(StackOptions::default(), egress).await?;
    let names = stack.nodes.names();
    assert_eq!(names.len(), nodes::DEFAULT_NODES);
    let node = names.last().expect("three nodes").clone();
    // A node no step before the proxies has reached: its kubelet's connection is fresh.
    let proxied_node = names[1].clone();

    steps.enter("rolling out the link and the test pods");
    stack.apply_link()?;
    let certs = Pki::new(&stack.plane.dir().join("fixture-pki"), "fixture")?;
    let serving = certs.issue(
        FIXTURE,
        &[
            &format!("{FIXTURE}.default.svc"),
            &format!("{FIXTURE}.default.svc.cluster.local"),
        ],
        Usage::Server,
    )?;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(certs.ca_pem()?);
    stack.plane.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "fixture-tls",
        &format!("--from-file=tls.crt={}", serving.cert.display()),
        &format!("--from-file=tls.key={}", serving.key.display()),
    ])?;
    stack.apply("fixture-service", &fixture_service())?;
    let mut reader = nodes::shell_pod(
        "reader",
        &node,
        "while read line; do echo \"answer: $line\"; done",
    );
    reader["spec"]["containers"][0]["stdin"] = true.into();
    let shell = nodes::shell_pod("shell", &node, &format!("echo {GREETING}; exec sleep 3600"));
    let (_, _, fixture_ip) = futures_util::future::try_join3(
        nodes::run_pod(&stack.plane, &shell),
        nodes::run_pod(&stack.plane, &reader),
        nodes::run_pod(&stack.plane, &fixture_pod(&node)),
    )
    .await
    .map_err(|err| err.context(stack.diagnostics()))?;
    stack.wait_link_ready().await?;

    steps.enter("restarting kube-apiserver with the egress configuration");
    stack.wire_egress().await?;
    let start = stack.tunnel_counts().await?;
    anyhow::ensure!(start.frontend == 0.0, "nothing came through yet: {start:?}");

    steps.enter("kubectl logs -f sees a line written after the follow began");
    let counted = Counted::start(&stack).await?;
    let follow = follow_logs(&stack, "shell").await?;
    let mark = format!("written after the follow began {}", rand::random::<u32>());
    stack.plane.kubectl_ok(&[
        "exec",
        "shell",
        "--",
        "sh",
        "-c",
        &format!("echo '{mark}' >/proc/1/fd/1"),
    ])?;
    wait::until("the follower to show the new line", STEP, || {
        follow.contains(&mark)
    })
    .await?;
    let ended = follow.stop(Duration::from_secs(5));
    anyhow::ensure!(ended.is_some(), "the follower did not end");
    let crossed = counted
        .crossed(&stack, "kubectl logs -f and exec", 2)
        .await?;
    println!(
        "kubectl logs -f shell showed {mark:?}, written by kubectl exec to the container's \
         stdout after the follow began, then ended: {crossed}"
    );

    steps.enter("kubectl exec -t gets a remote terminal and carries a typed line");
    let counted = Counted::start(&stack).await?;
    let mut terminal = Terminal::spawn(stack.plane.kubectl(&[
        "exec",
        "-i",
        "-t",
        "shell",
        "--",
        "sh",
        "-c",
        "tty; test -t 0 && echo stdin-is-a-terminal; read line; echo \"typed: $line\"",
    ]))?;
    terminal.wait_for("stdin-is-a-terminal", STEP).await?;
    let screen = terminal.screen();
    let tty = screen
        .split_whitespace()
        .find(|word| word.starts_with("/dev/pts/"))
        .with_context(|| format!("`tty` printed no terminal: {screen:?}"))?
        .to_owned();
    let typed = format!("line-{}", rand::random::<u32>());
    terminal.type_line(&typed)?;
    terminal.wait_for(&format!("typed: {typed}"), STEP).await?;
    let status = terminal
        .wait_exit(Duration::from_secs(30))
        .context("kubectl exec -t did not end with its command")?;
    anyhow::ensure!(status.success(), "kubectl exec -t: {status}");
    let crossed = counted.crossed(&stack, "kubectl exec -t", 1).await?;
    println!(
        "kubectl exec -it on a pseudo-terminal: the remote shell ran on {tty} with a terminal \
         as stdin and echoed the typed {typed:?}: {crossed}"
    );

    steps.enter("kubectl attach -i carries a line to the reader and its answer back");
    let counted = Counted::start(&stack).await?;
    let question = format!("question-{}", rand::random::<u32>());
    let answer = attach_and_ask(&stack, "reader", &question).await?;
    let crossed = counted.crossed(&stack, "kubectl attach -i", 1).await?;
    println!("kubectl attach -i reader: sent {question:?}, read {answer:?}: {crossed}");

    steps.enter("kubectl port-forward: 100 MiB each way and 20 parallel connections");
    let counted = Counted::start(&stack).await?;
    let (mut forward, local) = port_forward(&stack, FIXTURE, ECHO_PORT).await?;
    let started = std::time::Instant::now();
    let digest = echo_checked(local, LARGE, rand::random()).await?;
    let took = started.elapsed();
    let parallel = futures_util::future::try_join_all(
        (0..PARALLEL).map(|_| echo_checked(local, SMALL, rand::random())),
    )
    .await?;
    anyhow::ensure!(
        forward.try_wait()?.is_none(),
        "kubectl port-forward ended early"
    );
    forward.start_kill()?;
    let _ = forward.wait().await;
    let crossed = counted
        .crossed_carrying(&stack, "kubectl port-forward", 1, LARGE + PARALLEL * SMALL)
        .await?;
    // The fixture saw the whole transfer too.
    stack
        .plane
        .wait_kubectl(
            "the fixture to log the large echo",
            STEP,
            &["logs", FIXTURE],
            |log| log.contains(&format!("echoed {LARGE} bytes")),
        )
        .await?;
    println!(
        "kubectl port-forward to the fixture's echo: {} MiB each way on one connection in \
         {:.1} s ({:.0} MiB/s each way), sha256 {} both ways; {PARALLEL} parallel connections \
         of {} KiB each way all verified ({} distinct): {crossed}",
        LARGE >> 20,
        took.as_secs_f64(),
        (LARGE >> 20) as f64 / took.as_secs_f64(),
        &digest[..16],
        SMALL >> 10,
        parallel
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
    );

    steps.enter("the node, pod and service proxies");
    let counted = Counted::start(&stack).await?;
    let healthz = stack.plane.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes/{proxied_node}/proxy/healthz"),
    ])?;
    anyhow::ensure!(healthz.trim() == "ok", "node proxy: {healthz}");
    let via_pod = stack.plane.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/default/pods/{FIXTURE}:{POD_HTTP_PORT}/proxy/via-pod-proxy"),
    ])?;
    anyhow::ensure!(
        via_pod.trim() == format!("hello from {FIXTURE} on port {POD_HTTP_PORT}: /via-pod-proxy"),
        "pod proxy: {via_pod}"
    );
    let via_service = stack.plane.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/default/services/{FIXTURE}:web/proxy/via-service-proxy"),
    ])?;
    anyhow::ensure!(
        via_service.trim()
            == format!("hello from {FIXTURE} on port {SERVICE_HTTP_PORT}: /via-service-proxy"),
        "service proxy: {via_service}"
    );
    let crossed = counted
        .crossed(&stack, "node, pod and service proxies", 3)
        .await?;
    println!(
        "node proxy to {proxied_node}'s kubelet answered {:?}; pod proxy to {FIXTURE} \
         ({fixture_ip}:{POD_HTTP_PORT}) answered {:?}; service proxy to {FIXTURE}:web \
         answered {:?}: {crossed}",
        healthz.trim(),
        via_pod.trim(),
        via_service.trim(),
    );

    steps.enter("a validating webhook behind a Service, served by a pod over TLS");
    let counted = Counted::start(&stack).await?;
    stack.apply("webhook", &webhook(&ca_bundle))?;
    let denial = wait_denied(&stack, "denied-by-fixture").await?;
    let allowed = create_labelled_configmap(&stack, "allowed-by-fixture", "allow")?;
    anyhow::ensure!(allowed.is_ok(), "the allowed ConfigMap: {allowed:?}");
    let missing = stack
        .plane
        .kubectl(&["get", "configmap", "denied-by-fixture"])
        .output()?;
    anyhow::ensure!(!missing.status.success(), "the denied ConfigMap exists");
    let crossed = counted.crossed(&stack, "the webhook", 1).await?;
    println!(
        "the webhook in {FIXTURE} (Service {FIXTURE}:443, TLS with a caBundle) denied a \
         ConfigMap labelled {ADMISSION_LABEL}=deny with {denial:?} and allowed one labelled \
         =allow: {crossed}"
    );

    steps.enter("an aggregated API served by a pod behind an APIService");
    let counted = Counted::start(&stack).await?;
    stack.apply("apiservice", &api_service(&ca_bundle))?;
    stack
        .plane
        .wait_kubectl(
            "the APIService to be Available",
            STEP,
            &[
                "get",
                "apiservice",
                &format!("v1.{GROUP}"),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
            ],
            |status| status == "True",
        )
        .await?;
    // kube-apiserver installs the proxy to the group apart from the availability check: the
    // version answers once both are done.
    let discovery: serde_json::Value = serde_json::from_str(
        &stack
            .plane
            .wait_kubectl(
                "the aggregated API's discovery",
                STEP,
                &["get", "--raw", &format!("/apis/{GROUP}/v1")],
                |_| true,
            )
            .await?,
    )?;
    anyhow::ensure!(
        discovery["kind"] == "APIResourceList" && discovery["resources"][0]["name"] == "widgets",
        "discovery: {discovery}"
    );
    let widgets: serde_json::Value = serde_json::from_str(&stack.plane.kubectl_ok(&[
        "get",
        "--raw",
        &format!("/apis/{GROUP}/v1/widgets"),
    ])?)?;
    let widget = &widgets["items"][0]["metadata"]["name"];
    anyhow::ensure!(
        *widget == format!("served-by-{FIXTURE}"),
        "the list: {widgets}"
    );
    // The availability check and the proxied reads: two of kube-apiserver's transports.
    let crossed = counted.crossed(&stack, "the aggregated API", 2).await?;
    println!(
        "the APIService v1.{GROUP} became Available through the tunnel; /apis/{GROUP}/v1 \
         listed {} and /apis/{GROUP}/v1/widgets returned {widget}: {crossed}",
        discovery["resources"][0]["name"],
    );

    steps.enter("stopping everything");
    let end = stack.tunnel_counts().await?;
    let agent_dials = end.agent_dials_on(&node)? - start.agent_dials_on(&node)?;
    println!(
        "in all, through the {} frontend: {} connections, {} dials, {:.0} MiB from the agents; \
         the agent on {node} dialed {agent_dials} times",
        egress.frontend(),
        end.frontend - start.frontend,
        end.dials - start.dials,
        (end.from_agents - start.from_agents) / f64::from(1u32 << 20),
    );
    stack.stop_leaving_nothing()
}

/// `kubectl logs -f pod`, once it has shown the pod's greeting (so it follows); started again
/// if it ends before.
async fn follow_logs(stack: &Stack, pod: &str) -> anyhow::Result<Follow> {
    let give_up = tokio::time::Instant::now() + STEP;
    let mut pause = Duration::from_millis(100);
    loop {
        let mut follow = Follow::start(stack, &["logs", "-f", pod])?;
        let mut ended = false;
        wait::until("the follower to show the greeting", STEP, || {
            ended = follow.exited().is_some();
            ended || follow.contains(GREETING)
        })
        .await?;
        if !ended {
            return Ok(follow);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "kubectl logs -f {pod} kept ending within {STEP:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// `kubectl attach -i pod`: sends `line`, returns the line the pod answers with.
async fn attach_and_ask(stack: &Stack, pod: &str, line: &str) -> anyhow::Result<String> {
    let mut attach = tokio::process::Command::from(stack.plane.kubectl(&["attach", "-i", pod]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = attach.stdin.take().context("piped stdin")?;
    stdin.write_all(format!("{line}\n").as_bytes()).await?;
    stdin.flush().await?;
    let mut lines =
        tokio::io::BufReader::new(attach.stdout.take().context("piped stdout")?).lines();
    let wanted = format!("answer: {line}");
    let answer = tokio::time::timeout(STEP, async {
        while let Some(got) = lines.next_line().await? {
            if got.trim() == wanted {
                return Ok(got.trim().to_owned());
            }
        }
        anyhow::bail!("kubectl attach ended without the answer")
    })
    .await
    .with_context(|| format!("no answer to {line:?} within {STEP:?}"))??;
    drop(stdin);
    attach.start_kill()?;
    let _ = attach.wait().await;
    Ok(answer)
}

/// `kubectl port-forward pod :port` on 127.0.0.1; the running kubectl and the local address
/// it chose.
async fn port_forward(
    stack: &Stack,
    pod: &str,
    port: u16,
) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    let mut forward = tokio::process::Command::from(stack.plane.kubectl(&[
        "port-forward",
        &format!("pod/{pod}"),
        &format!(":{port}"),
        "--address",
        "127.0.0.1",
    ]))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true)
    .spawn()?;
    let mut lines =
        tokio::io::BufReader::new(forward.stdout.take().context("piped stdout")?).lines();
    // `Forwarding from 127.0.0.1:41235 -> 7000`
    let local = tokio::time::timeout(STEP, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = line
                .strip_prefix("Forwarding from ")
                .and_then(|rest| rest.split_whitespace().next())
            {
                return Ok(address.parse::<SocketAddr>()?);
            }
        }
        anyhow::bail!("kubectl port-forward ended without forwarding")
    })
    .await
    .with_context(|| format!("kubectl port-forward did not forward within {STEP:?}"))??;
    // Its later output (a line per connection) is read and dropped, so that it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((forward, local))
}

/// Sends `size` pseudo-random bytes (from `seed`) to the echo at `address` while reading them
/// back; fails unless what came back is what was sent. Returns the SHA-256 of the bytes.
async fn echo_checked(address: SocketAddr, size: usize, seed: u64) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut read, mut write) = stream.into_split();
    let sender = tokio::spawn(async move {
        let mut random = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sent = Sha256::new();
        let mut chunk = vec![0u8; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            random.fill_bytes(&mut chunk[..n]);
            sent.update(&chunk[..n]);
            write.write_all(&chunk[..n]).await?;
            left -= n;
        }
        // The write half stays open until everything came back: a half-close through
        // port-forward is not what is tested here.
        anyhow::Ok((hex(&sent.finalize()), write))
    });
    let mut received = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    let reading = async {
        while got < size {
            let n = read.read(&mut buf[..(size - got).min(64 << 10)]).await?;
            anyhow::ensure!(n > 0, "the echo closed after {got} of {size} bytes");
            received.update(&buf[..n]);
            got += n;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(STEP, reading)
        .await
        .with_context(|| format!("{got} of {size} bytes echoed within {STEP:?}"))??;
    let (sent, _write) = sender.await??;
    let received = hex(&received.finalize());
    anyhow::ensure!(
        sent == received,
        "the echo returned other bytes: sent {sent}, received {received}"
    );
    Ok(sent)
}

/// Creates ConfigMap `name` labelled [`ADMISSION_LABEL`]`=value`: `Ok(Ok(()))` if created,
/// `Ok(Err(stderr))` if refused.
fn create_labelled_configmap(
    stack: &Stack,
    name: &str,
    value: &str,
) -> anyhow::Result<Result<(), String>> {
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": { ADMISSION_LABEL: value },
        },
        "data": { "k": "v" },
    });
    let file = stack.plane.dir().join(format!("configmap-{name}.json"));
    std::fs::write(&file, serde_json::to_vec(&manifest)?)?;
    let out = stack
        .plane
        .kubectl(&["create", "-f", &file.display().to_string()])
        .output()?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    })
}

/// Creates ConfigMap `name` labelled `deny` until the webhook denies it (kube-apiserver
/// takes the new configuration up asynchronously: one created before is deleted again);
/// returns the denial.
async fn wait_denied(stack: &Stack, name: &str) -> anyhow::Result<String> {
    let give_up = tokio::time::Instant::now() + STEP;
    let mut pause = Duration::from_millis(50);
    loop {
        let outcome = create_labelled_configmap(stack, name, "deny")?;
        match outcome {
            Err(denial)
                if denial.contains(&format!("{FIXTURE} denies ConfigMap default/{name}")) =>
            {
                anyhow::ensure!(
                    denial.contains(
                        "admission webhook \"configmaps.fixture.cplink.dev\" denied the request"
                    ),
                    "denied, but not by the webhook: {denial}"
                );
                return Ok(denial
                    .rsplit("denied the request: ")
                    .next()
                    .unwrap_or(&denial)
                    .to_owned());
            }
            Ok(()) => {
                stack
                    .plane
                    .kubectl_ok(&["delete", "configmap", name, "--wait=false"])?;
            }
            Err(other) => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < give_up,
                    "the webhook did not deny {name} within {STEP:?}: {other}"
                );
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "the webhook did not deny {name} within {STEP:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The fixture's pod on `node`: echo, two HTTP listeners and HTTPS with the certificate of
/// Secret `fixture-tls`; ready once HTTPS listens.
fn fixture_pod(node: &str) -> serde_json::Value {
    let secret =
        |key: &str| serde_json::json!({ "secretKeyRef": { "name": "fixture-tls", "key": key } });
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": FIXTURE,
            "namespace": "default",
            "labels": { "app": "cplink-fixture" },
        },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "fixture",
                "image": image::FIXTURE_NAME,
                "imagePullPolicy": "Never",
                "args": [
                    format!("--echo=0.0.0.0:{ECHO_PORT}"),
                    format!("--http=0.0.0.0:{POD_HTTP_PORT}"),
                    format!("--http=0.0.0.0:{SERVICE_HTTP_PORT}"),
                    format!("--https=0.0.0.0:{HTTPS_PORT}"),
                ],
                "env": [
                    { "name": "FIXTURE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                    { "name": "FIXTURE_TLS_CERT", "valueFrom": secret("tls.crt") },
                    { "name": "FIXTURE_TLS_KEY", "valueFrom": secret("tls.key") },
                ],
                "readinessProbe": {
                    "tcpSocket": { "port": HTTPS_PORT },
                    "periodSeconds": 1,
                },
            }],
        },
    })
}

/// The fixture's Service: `https` (443, the webhook and the aggregated API) and `web` (80, an
/// HTTP listener of its own).
fn fixture_service() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {FIXTURE}
  namespace: default
spec:
  selector:
    app: cplink-fixture
  ports:
  - name: https
    port: 443
    targetPort: {HTTPS_PORT}
  - name: web
    port: 80
    targetPort: {SERVICE_HTTP_PORT}
"
    )
}

/// A validating webhook on the creation of ConfigMaps carrying [`ADMISSION_LABEL`], served by
/// the fixture's Service.
fn webhook(ca_bundle: &str) -> String {
    format!(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: fixture.cplink.dev
webhooks:
- name: configmaps.fixture.cplink.dev
  clientConfig:
    service:
      namespace: default
      name: {FIXTURE}
      path: /validate
      port: 443
    caBundle: {ca_bundle}
  rules:
  - operations: [CREATE]
    apiGroups: [\"\"]
    apiVersions: [v1]
    resources: [configmaps]
  objectSelector:
    matchExpressions:
    - key: {ADMISSION_LABEL}
      operator: Exists
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 10
"
    )
}

/// The APIService of `fixture.cplink.dev/v1`, served by the fixture's Service.
fn api_service(ca_bundle: &str) -> String {
    format!(
        "apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1.{GROUP}
spec:
  group: {GROUP}
  version: v1
  service:
    namespace: default
    name: {FIXTURE}
    port: 443
  caBundle: {ca_bundle}
  groupPriorityMinimum: 1000
  versionPriority: 15
"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
