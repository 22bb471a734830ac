//! High availability end to end: a link with three servers on four real nodes (kubelet and
//! containerd, cplink running from its image), agents finding the servers through the
//! EndpointSlices of the agent Service and linking to each, and rolling restarts of the
//! servers and then of the agents while kube-apiserver keeps sending node proxy requests
//! through the tunnel. Not one of them may fail.
//!
//! kube-apiserver reaches the frontend Service through the test forwarder (the load
//! balancer's role), which follows the Service's EndpointSlices; the test also checks that it
//! stopped sending connections to each old server well within the server's shutdown delay.
//!
//! Each agent may reach only its own node's kubelet (the link's default destinations), so
//! while a node's agent is replaced (a Kubernetes 1.20 DaemonSet cannot surge: the new agent
//! starts only once the old one has drained and exited) no other agent may carry that node's
//! connections: the servers hold them for their node-agent grace until the new agent links,
//! and refuse them (403) after it. The test prints how the servers routed dials meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde_json::Value;
use tokio_util::task::AbortOnDropHandle;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::metrics::counter;
use cplink_e2e::nodes;
use cplink_e2e::prober::{Outcome, Prober};
use cplink_e2e::stack::{
    Egress, FRONTEND_SERVICE, Follow, LINK, NAMESPACE, STEP, Stack, StackOptions,
};
use cplink_e2e::wait;
use cplink_operator::resources::{NODE_AGENT_GRACE_SECONDS, deployment::SERVER_ADMIN_PORT};

const NODES: usize = 4;
const SERVERS: u32 = 3;
/// The link's frontend port (the CRD's default).
const FRONTEND_PORT: u16 = 8090;
/// The operator's `--shutdown-delay` of servers: the forwarder must have dropped a stopping
/// server before it stops accepting.
const SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// The operator's `--drain-timeout`: what a stopping server or agent gives its connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two node proxy requests.
const REQUEST_INTERVAL: Duration = Duration::from_millis(50);
/// How long one node proxy request may take: a dial for a node whose agent is being replaced
/// waits for the new agent up to the servers' node-agent grace.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(NODE_AGENT_GRACE_SECONDS.unsigned_abs() + 10);
/// How long a rollout may take: four agents draining one after the other, each for up to the
/// drain timeout (kube-apiserver's idle connections to its kubelet keep it that long), then
/// replaced: 40 s each on an idle machine, 75 s on a busy one.
const ROLLOUT: Duration = Duration::from_secs(420);
/// How long the whole test may take.
const DEADLINE: Duration = Duration::from_secs(900);

/// What the ticker pod runs: a line every 200 ms, for `kubectl logs -f`.
const TICKER: &str = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done";

/// When the test first saw each server pod terminating, by pod IP; watched until dropped.
struct Terminations {
    seen: Arc<Mutex<HashMap<IpAddr, Instant>>>,
    _watch: AbortOnDropHandle<()>,
}

impl Terminations {
    /// Watches the link's server pods; failed watches are retried with backoff (the control
    /// plane may restart or be gone), and the watch stops when this is dropped.
    async fn watch(stack: &Stack) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let pods: kube::Api<Pod> = kube::Api::namespaced(stack.plane.client().await?, NAMESPACE);
        let config = watcher::Config::default().labels(&format!(
            "app.kubernetes.io/instance={LINK},app.kubernetes.io/component=server"
        ));
        let record = Arc::clone(&seen);
        let watch = tokio::spawn(async move {
            let mut events = watcher::watcher(pods, config).default_backoff().boxed();
            while let Some(event) = events.next().await {
                let pod = match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
                    Ok(_) => continue,
                    Err(err) => {
                        tracing::debug!(%err, "server pod watch failed; retrying with backoff");
                        continue;
                    }
                };
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
                if let (Some(_), Some(Ok(ip))) = (
                    pod.metadata.deletion_timestamp,
                    ip.map(str::parse::<IpAddr>),
                ) {
                    record
                        .lock()
                        .expect("terminations")
                        .entry(ip)
                        .or_insert_with(Instant::now);
                }
            }
        });
        Ok(Terminations {
            seen,
            _watch: AbortOnDropHandle::new(watch),
        })
    }

    fn at(&self, ip: IpAddr) -> Option<Instant> {
        self.seen.lock().expect("terminations").get(&ip).copied()
    }
}

/// The admin endpoint of the server pod at `ip`.
fn server_admin(ip: &str) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(
        ip.parse()?,
        u16::try_from(SERVER_ADMIN_PORT)?,
    ))
}

/// `status.server.linkedAgents` of the link, as (pod, agents).
fn linked_agents(stack: &Stack) -> anyhow::Result<Vec<(String, Option<i64>)>> {
    let out = stack.link_jsonpath("{.status.server.linkedAgents}")?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let links: Vec<Value> = serde_json::from_str(&out).with_context(|| out.clone())?;
    Ok(links
        .iter()
        .map(|l| {
            (
                l["pod"].as_str().unwrap_or_default().to_owned(),
                l["agents"].as_i64(),
            )
        })
        .collect())
}

/// The link's server pods that are not terminating, as (name, pod IP).
fn live_servers(stack: &Stack) -> anyhow::Result<Vec<(String, String)>> {
    let out = stack.plane.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        &format!("app.kubernetes.io/instance={LINK},app.kubernetes.io/component=server"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} \
         {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])?;
    Ok(out
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [name, ip] => Some((name.to_owned(), ip.to_owned())),
                _ => None,
            },
        )
        .collect())
}

/// Waits until the link's status shows every live server linked to every agent, and checks
/// each server's own metrics say the same; returns the server pods.
async fn every_server_links_every_agent(stack: &Stack) -> anyhow::Result<Vec<String>> {
    let mut servers = Vec::new();
    let mut last = Vec::new();
    wait::until("every server to report every agent linked", STEP, || {
        servers = live_servers(stack)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        last = linked_agents(stack).unwrap_or_default();
        let mut pods: Vec<&String> = last.iter().map(|(pod, _)| pod).collect();
        pods.sort();
        let mut expected: Vec<&String> = servers.iter().collect();
        expected.sort();
        pods.len() == SERVERS as usize
            && pods == expected
            && last.iter().all(|(_, n)| *n == Some(NODES as i64))
    })
    .await
    .map_err(|e| {
        e.context(format!(
            "status.server.linkedAgents: {last:?}, servers {servers:?}\n{}",
            stack.diagnostics()
        ))
    })?;
    for (pod, ip) in live_servers(stack)? {
        let metrics = stack.admin_get(server_admin(&ip)?, "/metrics").await?;
        let linked = counter(&metrics, "cplink_server_agents_linked", "");
        assert_eq!(linked, NODES as f64, "{pod} counts every agent itself");
    }
    Ok(servers)
}

/// Dials routed by each strategy, summed over the live servers.
async fn routed(stack: &Stack) -> anyhow::Result<BTreeMap<&'static str, f64>> {
    let mut routed = BTreeMap::new();
    for (_, ip) in live_servers(stack)? {
        let metrics = stack.admin_get(server_admin(&ip)?, "/metrics").await?;
        for strategy in ["node", "cidr", "default-route", "any"] {
            *routed.entry(strategy).or_default() += counter(
                &metrics,
                "cplink_server_routed_dials_total",
                &format!("strategy=\"{strategy}\""),
            );
        }
    }
    Ok(routed)
}

/// `kubectl rollout restart` of `what`, then `kubectl rollout status` until it is done (off
/// the runtime's workers, which meanwhile serve the forwarder).
fn roll(stack: &Stack, what: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        stack
            .plane
            .kubectl_ok(&["rollout", "restart", what, "-n", NAMESPACE])?;
        stack.plane.kubectl_ok(&[
            "rollout",
            "status",
            what,
            "-n",
            NAMESPACE,
            &format!("--timeout={}s", ROLLOUT.as_secs()),
        ])
    })
    .map_err(|err| err.context(stack.diagnostics()))?;
    Ok(started.elapsed())
}

#[test]
fn rolling_restarts_of_servers_and_agents_lose_no_tunneled_request() -> anyhow::Result<()> {
    harness::run(
        "rolling_restarts_of_servers_and_agents_lose_no_tunneled_request",
        DEADLINE,
        rolling_restarts,
    )
}

async fn rolling_restarts(steps: Steps) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let since = |at: Instant| at.saturating_duration_since(t0).as_secs_f64();
    steps.enter("starting the control plane, four real nodes, the forwarder and the operator");
    let mut stack = Stack::start(
        StackOptions {
            nodes: NODES,
            servers: SERVERS,
        },
        Egress::HttpConnect,
    )
    .await?;
    let nodes = stack.nodes.names();
    println!("[{:6.1}s] started", since(Instant::now()));

    // 1. Three servers on four nodes; every agent finds every server and links to it.
    steps.enter("rolling out the link");
    stack.apply_link()?;
    let table = stack.wait_link_ready().await?;
    println!("{table}");
    let agent_args = stack.plane.kubectl_ok(&[
        "get",
        "ds",
        &format!("{LINK}-agent"),
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ])?;
    assert!(
        agent_args.contains("--server-service=edge-agent-endpoint")
            && !agent_args.contains("--server-address"),
        "agents discover the servers: {agent_args}"
    );
    steps.enter("every server linking every agent");
    let servers = every_server_links_every_agent(&stack).await?;
    println!(
        "[{:6.1}s] linked: every one of {servers:?} has {NODES} agents",
        since(Instant::now())
    );

    steps.enter("running the ticker pod");
    let last = nodes.last().context("four nodes")?;
    nodes::run_shell_pod(&stack.plane, "ticker", last, TICKER)
        .await
        .map_err(|err| err.context(stack.diagnostics()))?;
    steps.enter("restarting kube-apiserver with the egress configuration");
    stack.wire_egress().await?;
    steps.enter("node proxy through the tunnel");
    stack.wait_node_proxy(&nodes).await?;

    // 2. Requests in a loop and a followed log, across both rollouts.
    steps.enter("starting node proxy requests and kubectl logs -f");
    let terminations = Terminations::watch(&stack).await?;
    let prober = Prober::start(
        stack.plane.kubeconfig.clone(),
        nodes.clone(),
        REQUEST_INTERVAL,
        REQUEST_TIMEOUT,
    )?;
    let mut follow = Follow::start(&stack, &["logs", "-f", "ticker"])?;
    wait::until("node proxy requests and followed lines", STEP, || {
        prober.succeeded() >= 2 * NODES && follow.contains("tick")
    })
    .await?;

    steps.enter("rolling restart of the servers");
    let old_servers = stack.pods("server")?;
    let servers_restarted = Instant::now();
    let took = roll(&stack, &format!("deployment/{LINK}-server"))?;
    println!(
        "[{:6.1}s] servers rolled in {:.1}s",
        since(Instant::now()),
        took.as_secs_f64()
    );
    let before = follow.lines_before(servers_restarted);
    assert!(
        before > 0,
        "kubectl logs -f delivered lines before the restart"
    );
    steps.enter("the new servers linking every agent");
    stack.wait_link_ready().await?;
    let new_servers = every_server_links_every_agent(&stack).await?;
    assert!(
        new_servers
            .iter()
            .all(|s| old_servers.iter().all(|(old, _, _)| old != s)),
        "every server was replaced: {old_servers:?} -> {new_servers:?}"
    );

    // The forwarder stopped sending connections to each old server soon after it began to
    // terminate, well before the server stopped accepting.
    steps.enter("checking the forwarder dropped the old servers in time");
    let mut report = String::new();
    for (pod, _, ip) in &old_servers {
        let ip: IpAddr = ip.parse()?;
        let endpoint = SocketAddr::new(ip, FRONTEND_PORT);
        let terminating = terminations
            .at(ip)
            .with_context(|| format!("{pod} was seen terminating"))?;
        let dropped = stack
            .forwarder
            .dropped_at(FRONTEND_SERVICE, endpoint)
            .with_context(|| format!("the forwarder dropped {pod} ({endpoint})"))?;
        let lag = dropped.saturating_duration_since(terminating);
        let late: Vec<f64> = stack
            .forwarder
            .connections(FRONTEND_SERVICE)
            .into_iter()
            .filter(|(at, to)| *to == endpoint && *at > dropped)
            .map(|(at, _)| since(at))
            .collect();
        let _ = writeln!(
            report,
            "  {pod}: terminating at {:.2}s, out of the forwarder {:.3}s later",
            since(terminating),
            lag.as_secs_f64()
        );
        assert!(
            lag < SHUTDOWN_DELAY,
            "the forwarder dropped {pod} {lag:?} after it began terminating, not within the \
             shutdown delay"
        );
        assert!(
            late.is_empty(),
            "connections to {pod} after it was dropped: {late:?}"
        );
    }
    print!("forwarder:\n{report}");

    steps.enter("rolling restart of the agents");
    let routed_before = routed(&stack).await?;
    let agents_restarted = Instant::now();
    let took = roll(&stack, &format!("daemonset/{LINK}-agent"))?;
    println!(
        "[{:6.1}s] agents rolled in {:.1}s",
        since(Instant::now()),
        took.as_secs_f64()
    );
    steps.enter("the new agents linking every server");
    stack.wait_link_ready().await?;
    every_server_links_every_agent(&stack).await?;
    // A few more requests through the new agents.
    steps.enter("requests through the new agents");
    let done = prober.succeeded() + 2 * NODES;
    wait::until("requests through the new agents", STEP, || {
        prober.succeeded() >= done
    })
    .await?;
    let outcomes = prober.finish()?;
    // While a node's agent drains and before its replacement links, no agent may serve that
    // node's kubelet. The servers lived through the agent rollout, so their counters show how
    // they routed dials meanwhile.
    let routed_after = routed(&stack).await?;
    let during: Vec<String> = routed_after
        .iter()
        .map(|(strategy, n)| format!("{strategy} {}", n - routed_before[strategy]))
        .collect();
    println!(
        "dials routed during the agent rollout: {}",
        during.join(", ")
    );

    // 3. What the client saw.
    steps.enter("checking what the client saw");
    let phase = |at: Instant| {
        if at >= agents_restarted {
            "agent rollout"
        } else if at >= servers_restarted {
            "server rollout"
        } else {
            "before the rollouts"
        }
    };
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    println!(
        "node proxy: {} requests, {} failed, slowest {:.3}s",
        outcomes.len(),
        failures.len(),
        slowest.as_secs_f64()
    );
    for failure in &failures {
        println!(
            "  FAILED at {:.3}s ({}), {} after {:.3}s: {}",
            since(failure.at),
            phase(failure.at),
            failure.node,
            failure.took.as_secs_f64(),
            failure.error.as_deref().unwrap_or_default()
        );
    }
    let ended = follow.exited();
    println!(
        "kubectl logs -f: {before} lines before the server restart, last line at {:.1}s, {}",
        follow.last_line_at().map_or(0.0, since),
        match ended {
            Some(status) => format!(
                "ended ({status}): its tunnel was cut when the server or agent carrying it \
                 finished draining ({DRAIN_TIMEOUT:?} drain timeout)"
            ),
            None => "still following".to_owned(),
        }
    );
    println!("total {:.1}s", since(Instant::now()));
    assert!(
        failures.is_empty(),
        "{} of {} node proxy requests failed during the rollouts",
        failures.len(),
        outcomes.len()
    );
    steps.enter("stopping the stack");
    drop((follow, terminations));
    stack.stop_leaving_nothing()
}
