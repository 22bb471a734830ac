//! Certificate renewal end to end, on real nodes: a link whose certificates last 10 minutes
//! and are renewed 8 minutes ahead, so renewal is due 2 minutes after issue. The operator
//! issues new server and agent certificates, their Secrets change, and the pod templates'
//! checksum rolls the servers, then the agents, while kube-apiserver sends a node proxy request
//! through the tunnel every 50 ms. Not one of them may fail.
//!
//! On real nodes an agent's replacement leaves its node without an agent for some
//! seconds (a DaemonSet starts the new pod once the old one has gone), and no other agent may
//! reach that node's kubelet under the default destination policy: the servers hold the node's
//! dials until the new agent links (`--node-agent-grace`), a server started during the
//! rollout included: it holds the dials of every Node whose agent has not linked to it yet.
//!
//! kube-apiserver keeps the egress client certificate it read when it started; the renewal
//! puts a new one in the egress Secret, and the operator says (condition and Event) by when
//! kube-apiserver must be restarted with it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use tokio_util::task::AbortOnDropHandle;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::prober::Prober;
use cplink_e2e::stack::{Egress, LINK, NAMESPACE, STEP, Stack, StackOptions};
use cplink_e2e::wait;
use cplink_operator::resources::NODE_AGENT_GRACE_SECONDS;

/// Lifetime of the link's certificates.
const VALIDITY: &str = "10m";
/// Lifetime of the certificates issued after the renewal under test, so that renewals stop.
const SETTLED_VALIDITY: &str = "8760h";
/// How long before expiry they are renewed.
const RENEW_BEFORE: &str = "8m";
/// When renewal is due after issue: `VALIDITY - RENEW_BEFORE`.
const RENEWAL_DUE: Duration = Duration::from_secs(120);
/// Server replicas of the link.
const SERVERS: u32 = 2;
/// Pause between two node proxy requests.
const REQUEST_INTERVAL: Duration = Duration::from_millis(50);
/// How long one node proxy request may take: a request for a node whose agent is being
/// replaced waits for the new one (the servers' `--node-agent-grace`, as the operator runs
/// them: the old agent's grace period and the new one's start), then has the dial timeout
/// (10 s). A request that takes longer counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(NODE_AGENT_GRACE_SECONDS.unsigned_abs() + 15);
/// How long a renewal's rollout may take once its Secrets changed: each agent drains for its
/// 30 s (kube-apiserver keeps idle connections through it open) and its replacement starts
/// once it has gone, about 40 s a node; the next renewal, 2 minutes on, rolls the servers and
/// the agents again meanwhile. It takes 180 to 280 s.
const ROLLOUT: Duration = Duration::from_secs(360);
/// How long the whole test may take: it takes 6 to 7 minutes.
const DEADLINE: Duration = Duration::from_secs(720);

/// The certificate Secrets whose renewals are counted, by the certificate they hold.
const CERTIFICATES: [(&str, &str); 3] = [
    ("server", "edge-server-tls"),
    ("agent", "edge-agent-tls"),
    ("apiserver", "edge-apiserver-egress"),
];

/// The serial numbers each certificate Secret has held, sampled every half second by a task
/// of its own until dropped.
struct Serials {
    seen: Arc<Mutex<Vec<BTreeSet<String>>>>,
    _poll: AbortOnDropHandle<()>,
}

impl Serials {
    fn watch(secrets: Api<Secret>) -> Self {
        let seen = Arc::new(Mutex::new(vec![BTreeSet::new(); CERTIFICATES.len()]));
        let sink = Arc::clone(&seen);
        let poll = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                for (n, (_, name)) in CERTIFICATES.iter().enumerate() {
                    // A failed read is retried at the next tick.
                    if let Ok(serial) = serial(&secrets, name).await {
                        sink.lock().expect("serials")[n].insert(serial);
                    }
                }
            }
        });
        Serials {
            seen,
            _poll: AbortOnDropHandle::new(poll),
        }
    }

    /// Renewals seen of each certificate: serials beyond the first.
    fn renewals(&self) -> Vec<usize> {
        self.seen
            .lock()
            .expect("serials")
            .iter()
            .map(|serials| serials.len().saturating_sub(1))
            .collect()
    }
}

/// The serial number of the certificate in Secret `name`.
async fn serial(secrets: &Api<Secret>, name: &str) -> anyhow::Result<String> {
    Ok(certificate(secrets, name).await?.serial)
}

/// The certificate in Secret `name`.
async fn certificate(
    secrets: &Api<Secret>,
    name: &str,
) -> anyhow::Result<cplink_operator::certs::CertInfo> {
    let secret = secrets.get(name).await?;
    let pem = secret
        .data
        .as_ref()
        .and_then(|data| data.get("tls.crt"))
        .with_context(|| format!("{name} holds no tls.crt"))?;
    Ok(cplink_operator::certs::inspect(std::str::from_utf8(
        &pem.0,
    )?)?)
}

/// The client certificate kube-apiserver was started with, next to its egress configuration.
fn certificate_of(
    configuration: &std::path::Path,
) -> anyhow::Result<cplink_operator::certs::CertInfo> {
    let dir = configuration
        .parent()
        .context("the configuration's directory")?;
    let pem = std::fs::read_to_string(dir.join("tls.crt"))?;
    Ok(cplink_operator::certs::inspect(&pem)?)
}

/// A time as Kubernetes writes it in a status (`metav1.Time`, whole seconds).
fn rfc3339(unix_seconds: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix_seconds)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The uids of the link's running pods of `component`, and how many of them are ready.
async fn pods(pods: &Api<Pod>, component: &str) -> anyhow::Result<(BTreeSet<String>, usize)> {
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={LINK},app.kubernetes.io/component={component}"
        )))
        .await?;
    let live: Vec<&Pod> = list
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .collect();
    let ready = live
        .iter()
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    let uids = live
        .iter()
        .filter_map(|pod| pod.metadata.uid.clone())
        .collect();
    Ok((uids, ready))
}

/// The link with the stack's servers, nodes and frontend, and certificates that last
/// `validity`.
fn link_yaml(stack: &Stack, validity: &str) -> String {
    format!(
        "{}  tls:\n    validity: {validity}\n    renewBefore: {RENEW_BEFORE}\n",
        stack.link_yaml()
    )
}

#[test]
fn renewing_certificates_on_real_nodes_fails_no_node_proxy_request() -> anyhow::Result<()> {
    harness::run(
        "renewing_certificates_on_real_nodes_fails_no_node_proxy_request",
        DEADLINE,
        renewals,
    )
}

async fn renewals(steps: Steps) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let since = |at: Instant| at.saturating_duration_since(t0).as_secs_f64();
    steps.enter("starting the control plane, three real nodes and cplink from its image");
    let mut stack = Stack::start(
        StackOptions {
            servers: SERVERS,
            ..StackOptions::default()
        },
        Egress::HttpConnect,
    )
    .await?;
    let nodes = stack.nodes.names();
    let client = stack.plane.client().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);

    steps.enter(format!(
        "rolling out a link with validity {VALIDITY}, renewBefore {RENEW_BEFORE}"
    ));
    let yaml = link_yaml(&stack, VALIDITY);
    stack.apply("link", &yaml)?;
    let applied = Instant::now();
    stack.wait_link_ready().await?;
    let issued = certificate(&secrets, "edge-server-tls").await?;
    let lifetime = issued.not_after - issued.not_before;
    println!(
        "[{:6.1}s] server certificate {} valid {} to {} ({lifetime})",
        since(Instant::now()),
        issued.serial,
        issued.not_before,
        issued.not_after
    );
    let serials = Serials::watch(secrets.clone());
    let (first_servers, _) = pods(&pod_api, "server").await?;
    let (first_agents, _) = pods(&pod_api, "agent").await?;

    steps.enter("restarting kube-apiserver with the egress configuration");
    let wired = stack.wire_egress().await?;
    steps.enter("node proxy through the tunnel");
    stack.wait_node_proxy(&nodes).await?;

    steps.enter("starting node proxy requests every 50 ms");
    let prober = Prober::start(
        stack.plane.kubeconfig.clone(),
        nodes.clone(),
        REQUEST_INTERVAL,
        REQUEST_TIMEOUT,
    )?;
    wait::until("node proxy requests to succeed", STEP, || {
        prober.succeeded() >= 2 * nodes.len()
    })
    .await?;

    steps.enter("the operator renewing the server and agent certificates");
    wait::until(
        "new server and agent certificates in their Secrets",
        RENEWAL_DUE + STEP,
        || {
            let renewals = serials.renewals();
            renewals[0] >= 1 && renewals[1] >= 1
        },
    )
    .await
    .with_context(|| stack.diagnostics())?;
    let renewed_at = Instant::now();
    println!(
        "[{:6.1}s] renewed: server {}, agent {}, {:.1}s after the link was applied",
        since(renewed_at),
        serial(&secrets, "edge-server-tls").await?,
        serial(&secrets, "edge-agent-tls").await?,
        renewed_at.duration_since(applied).as_secs_f64(),
    );

    // A renewal every 2 minutes rolls the pods without end: an agent takes about 40 s to
    // replace, so the DaemonSet is never done. The certificates the next renewal issues last a
    // year, and the pods settle after its rollout.
    steps.enter("making the next renewal the last");
    stack.apply("link", &link_yaml(&stack, SETTLED_VALIDITY))?;

    steps.enter("every server and agent pod replaced and ready");
    let servers = SERVERS as usize;
    let agents = nodes.len();
    let last = Mutex::new(String::new());
    wait::until_async("the renewal's rollout", ROLLOUT, || {
        let (pod_api, first_servers, first_agents) = (&pod_api, &first_servers, &first_agents);
        let last = &last;
        async move {
            let (Ok((server_pods, servers_ready)), Ok((agent_pods, agents_ready))) =
                (pods(pod_api, "server").await, pods(pod_api, "agent").await)
            else {
                return false;
            };
            *last.lock().expect("last") = format!(
                "servers {servers_ready}/{} ready, agents {agents_ready}/{} ready",
                server_pods.len(),
                agent_pods.len()
            );
            server_pods.is_disjoint(first_servers)
                && agent_pods.is_disjoint(first_agents)
                && server_pods.len() == servers
                && servers_ready == servers
                && agent_pods.len() == agents
                && agents_ready == agents
        }
    })
    .await
    .map_err(|e| {
        e.context(last.lock().expect("last").clone())
            .context(stack.diagnostics())
    })?;
    println!(
        "[{:6.1}s] rolled in {:.1}s",
        since(Instant::now()),
        renewed_at.elapsed().as_secs_f64()
    );
    steps.enter("the link ready on its new pods");
    stack.wait_link_ready().await?;

    steps.enter("requests through the renewed servers and agents");
    let done = prober.succeeded() + 4 * nodes.len();
    wait::until("requests through the renewed pods", STEP, || {
        prober.succeeded() >= done
    })
    .await?;
    let outcomes = prober.finish()?;
    let renewals = serials.renewals();

    // kube-apiserver still presents the client certificate it read when it started: the
    // operator says so, and by when to restart it.
    steps.enter("the operator warning that kube-apiserver holds the replaced certificate");
    let warning = stack
        .plane
        .wait_kubectl(
            "the EgressCertificateExpiring condition",
            STEP,
            &[
                "get",
                "controlplanelink",
                LINK,
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"EgressCertificateExpiring\")]}",
            ],
            |out| out.contains("\"status\":\"True\""),
        )
        .await?;
    let loaded = certificate_of(&wired)?;
    assert!(
        warning.contains("KubeAPIServerRestartNeeded")
            && warning.contains("restart kube-apiserver")
            && warning.contains(&format!(
                "before {}",
                rfc3339(loaded.not_after.unix_timestamp())
            )),
        "the warning names the deadline of the certificate kube-apiserver loaded ({}): \
         {warning}",
        loaded.not_after
    );
    let events = stack
        .plane
        .wait_kubectl(
            "the EgressCertificateExpiring Event",
            STEP,
            &[
                "get",
                "events",
                "-n",
                NAMESPACE,
                "--field-selector",
                "reason=EgressCertificateExpiring",
                "-o",
                "jsonpath={range .items[*]}{.type} {.message}{\"\\n\"}{end}",
            ],
            |out| out.starts_with("Warning "),
        )
        .await?;
    println!("event: {}", events.lines().next().unwrap_or_default());

    steps.enter("checking what the client saw");
    let failures: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    println!(
        "node proxy: {} requests, {} failed, slowest {:.3}s; renewals seen: {}",
        outcomes.len(),
        failures.len(),
        slowest.as_secs_f64(),
        CERTIFICATES
            .iter()
            .zip(&renewals)
            .map(|((kind, _), n)| format!("{kind} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for failure in &failures {
        println!(
            "  FAILED at {:.3}s, {} after {:.3}s: {}",
            since(failure.at),
            failure.node,
            failure.took.as_secs_f64(),
            failure.error.as_deref().unwrap_or_default()
        );
    }
    assert!(
        renewals[0] >= 1 && renewals[1] >= 1,
        "server and agent certificates renewed: {renewals:?}"
    );
    if !failures.is_empty() {
        println!("{}", stack.diagnostics());
    }
    assert!(
        failures.is_empty(),
        "{} of {} node proxy requests failed across the renewal",
        failures.len(),
        outcomes.len()
    );
    println!("total {:.1}s", since(Instant::now()));
    steps.enter("stopping the stack");
    drop((serials, stack));
    Ok(())
}
