//! `kubectl cplink status`: each server replica and agent of a link, ready or not and why, the
//! agents a server has not linked, nodes without an agent, certificate expiry and the egress
//! mode.
//!
//! Gathering reads the API and each server's `/debug/agents`; [`analyse`] turns what was read
//! into the report, without I/O, so the judgement is tested on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use cplink_operator::crd::ControlPlaneLink;
use cplink_operator::resources::Names;
use cplink_runtime::introspect::{AgentInfo, AgentList};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Serialize;

use crate::cluster::{AGENT_ADMIN_PORT, Cluster, ReadError, SERVER_ADMIN_PORT};
use crate::table::{self, Table};

/// The status of every link asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// One entry per link.
    pub links: Vec<LinkReport>,
}

/// The status of one link.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkReport {
    /// The link's name.
    pub link: String,
    /// Its namespace.
    pub namespace: String,
    /// Its `Ready` condition: status, and why.
    pub ready: String,
    /// The condition's reason and message.
    pub ready_reason: Option<String>,
    /// How kube-apiserver reaches the servers.
    pub egress: EgressReport,
    /// Server replicas: desired, ready, and why some are missing.
    pub servers: Replicas,
    /// Agents: desired, ready.
    pub agents: Replicas,
    /// Each server pod.
    pub server_pods: Vec<ServerReport>,
    /// Each agent pod (none when agents run outside the cluster).
    pub agent_pods: Vec<AgentReport>,
    /// Agents that a server has not linked.
    pub not_linked: Vec<MissingLink>,
    /// Nodes the agents should run on that run none (needs list on nodes).
    pub nodes_without_agent: Vec<String>,
    /// The link's certificates and when they expire.
    pub certificates: Vec<CertificateReport>,
    /// What could not be read, and what that leaves out.
    pub notes: Vec<String>,
}

/// How kube-apiserver reaches the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressReport {
    /// `HTTPConnect` or `GRPC`.
    pub mode: String,
    /// The frontend's address, or the socket's path.
    pub address: Option<String>,
    /// The Secret with the egress configuration and kube-apiserver's client certificate.
    pub secret: Option<String>,
}

/// Desired and ready replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replicas {
    /// How many should run.
    pub desired: Option<i64>,
    /// How many are ready.
    pub ready: i64,
    /// Why some are missing, as their controller says.
    pub missing_reason: Option<String>,
}

/// A server pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerReport {
    /// The pod.
    pub pod: String,
    /// Its node.
    pub node: Option<String>,
    /// Its IP.
    pub ip: Option<String>,
    /// Whether it is ready.
    pub ready: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// Container restarts.
    pub restarts: i32,
    /// The agents it has linked, by id; none when its view could not be read.
    pub linked_agents: Option<Vec<String>>,
    /// Why its view could not be read.
    pub view_error: Option<String>,
    /// How many agents it should have linked.
    pub expected_agents: usize,
}

/// An agent pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// The pod.
    pub pod: String,
    /// Its node (the agent's id).
    pub node: Option<String>,
    /// Its IP.
    pub ip: Option<String>,
    /// Whether it is ready.
    pub ready: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// Container restarts.
    pub restarts: i32,
    /// The server pods that have linked it.
    pub linked_servers: Vec<String>,
    /// The server pods whose view could be read.
    pub known_servers: usize,
}

/// An agent that a server has not linked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MissingLink {
    /// The agent's id.
    pub agent: String,
    /// Its pod, when it runs in the cluster.
    pub agent_pod: Option<String>,
    /// The server pod.
    pub server: String,
}

/// A certificate of the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateReport {
    /// `<secret>/<key>`, or `status` for the earliest expiry the link's status reports.
    pub source: String,
    /// Its expiry (RFC 3339).
    pub not_after: String,
    /// Seconds until then (negative once expired).
    pub expires_in_seconds: i64,
}

/// What [`analyse`] reads: everything gathered for one link.
#[derive(Debug, Clone)]
pub struct Gathered {
    /// The link.
    pub link: ControlPlaneLink,
    /// Its server Deployment, if readable.
    pub deployment: Option<Deployment>,
    /// Server pods.
    pub servers: Vec<Pod>,
    /// Agent pods.
    pub agents: Vec<Pod>,
    /// Each server pod's linked agents, or why its view could not be read, by pod name.
    pub views: BTreeMap<String, Result<Vec<AgentInfo>, String>>,
    /// Why each not-ready pod is not ready, as its `/readyz` says, by pod name.
    pub readyz: BTreeMap<String, String>,
    /// The Nodes, if listable.
    pub nodes: Option<Vec<Node>>,
    /// Certificates read from Secrets: source and expiry.
    pub certificates: Vec<(String, SystemTime)>,
    /// What could not be read.
    pub notes: Vec<String>,
}

impl Gathered {
    /// Nothing gathered yet about `link`.
    pub fn new(link: ControlPlaneLink) -> Self {
        Gathered {
            link,
            deployment: None,
            servers: Vec::new(),
            agents: Vec::new(),
            views: BTreeMap::new(),
            readyz: BTreeMap::new(),
            nodes: None,
            certificates: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// Reads what [`analyse`] needs for the links `name` selects (every link when `None`).
pub async fn gather(cluster: &Cluster, name: Option<&str>) -> Result<Vec<Gathered>, ReadError> {
    let links = cluster.links(name).await?;
    if links.is_empty() {
        return Err(ReadError::Api(format!(
            "no ControlPlaneLink in namespace {} (-n selects another)",
            cluster.namespace
        )));
    }
    let mut nodes_note = None;
    let nodes = match cluster.nodes().await {
        Ok(nodes) => Some(nodes),
        Err(err) => {
            nodes_note = Some(format!(
                "nodes without an agent are not shown: cannot list nodes ({err})"
            ));
            None
        }
    };
    let mut gathered = Vec::new();
    for link in links {
        let mut one = gather_link(cluster, link).await?;
        one.nodes = nodes.clone();
        one.notes.extend(nodes_note.clone());
        gathered.push(one);
    }
    Ok(gathered)
}

async fn gather_link(cluster: &Cluster, link: ControlPlaneLink) -> Result<Gathered, ReadError> {
    let name = link.metadata.name.clone().unwrap_or_default();
    let names = Names::new(&name, &cluster.namespace);
    let mut notes = Vec::new();
    let servers = cluster.pods(&name, "server").await?;
    let agents = cluster.pods(&name, "agent").await?;
    let deployment = match cluster.deployment(&names.server()).await {
        Ok(deployment) => deployment,
        Err(err) => {
            notes.push(format!("cannot read Deployment {}: {err}", names.server()));
            None
        }
    };

    let mut views = BTreeMap::new();
    let mut readyz = BTreeMap::new();
    for pod in &servers {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        if !is_running(pod) {
            continue;
        }
        views.insert(pod_name.clone(), server_agents(cluster, pod).await);
        if !pod_ready(pod) {
            readyz.insert(
                pod_name,
                readyz_reason(cluster, pod, SERVER_ADMIN_PORT).await,
            );
        }
    }
    for pod in agents.iter().filter(|p| is_running(p) && !pod_ready(p)) {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        readyz.insert(
            pod_name,
            readyz_reason(cluster, pod, AGENT_ADMIN_PORT).await,
        );
    }

    let mut certificates = Vec::new();
    let ca_secret = link
        .spec
        .tls
        .ca_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| names.ca_secret());
    let mut unreadable = Vec::new();
    for secret in [
        ca_secret,
        names.server_tls_secret(),
        names.agent_tls_secret(),
        names.egress_secret(),
    ] {
        match cluster.secret(&secret).await {
            Ok(Some(found)) => {
                let pem = found
                    .data
                    .as_ref()
                    .and_then(|d| d.get("tls.crt"))
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned());
                if let Some(info) = pem.and_then(|pem| cplink_operator::certs::inspect(&pem).ok()) {
                    certificates.push((
                        format!("{secret}/tls.crt"),
                        SystemTime::from(info.not_after),
                    ));
                }
            }
            Ok(None) => {}
            Err(err) => unreadable.push(format!("{secret} ({err})")),
        }
    }
    if !unreadable.is_empty() {
        notes.push(format!(
            "certificates: the earliest expiry from the link's status only; cannot read Secrets {}",
            unreadable.join(", ")
        ));
    }
    Ok(Gathered {
        deployment,
        servers,
        agents,
        views,
        readyz,
        certificates,
        notes,
        ..Gathered::new(link)
    })
}

/// Every agent a server has linked, page by page.
async fn server_agents(cluster: &Cluster, pod: &Pod) -> Result<Vec<AgentInfo>, String> {
    let mut agents = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut query = vec![("limit", "5000")];
        if let Some(token) = &token {
            query.push(("continue", token.as_str()));
        }
        let page: AgentList = cluster
            .view(pod, SERVER_ADMIN_PORT, "/debug/agents", &query)
            .await
            .map_err(|e| e.to_string())?;
        agents.extend(page.items);
        match page.continue_token {
            Some(next) if page.truncated => token = Some(next),
            _ => return Ok(agents),
        }
    }
}

/// What a not-ready pod's `/readyz` says.
async fn readyz_reason(cluster: &Cluster, pod: &Pod, port: u16) -> String {
    match cluster.proxy_get(pod, port, "/readyz", &[]).await {
        Ok((status, _)) if status.is_success() => {
            "ready now, by its /readyz; the pod's Ready condition has not caught up".to_owned()
        }
        Ok((_, body)) => String::from_utf8_lossy(&body)
            .trim()
            .trim_start_matches("not ready: ")
            .to_owned(),
        Err(err) => format!("its /readyz did not answer: {err}"),
    }
}

fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn pod_ready(pod: &Pod) -> bool {
    condition(pod, "Ready").is_some_and(|(status, _)| status == "True")
}

/// A pod condition's status and message.
fn condition(pod: &Pod, kind: &str) -> Option<(String, Option<String>)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.message.clone()))
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// Why a pod is not ready, from what its status and its `/readyz` say.
fn not_ready_reason(pod: &Pod, readyz: Option<&String>) -> String {
    if pod.metadata.deletion_timestamp.is_some() {
        return "terminating".into();
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    if let Some((status, message)) = condition(pod, "PodScheduled")
        && status == "False"
    {
        return format!("not scheduled: {}", message.unwrap_or_default());
    }
    let waiting = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.clone());
    if let Some(waiting) = waiting {
        let reason = waiting.reason.unwrap_or_else(|| "waiting".into());
        return match waiting.message {
            Some(message) => format!("{reason}: {message}"),
            None => reason,
        };
    }
    match readyz {
        Some(reason) if phase == "Running" => reason.clone(),
        _ => phase.to_owned(),
    }
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

fn ip_of(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

/// The report of one link, from what was gathered, as of `now`.
pub fn analyse(gathered: &Gathered, now: SystemTime) -> LinkReport {
    let link = &gathered.link;
    let status = link.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");

    // Who should be linked: every running agent pod (its id is its node's name) and every
    // agent some server has linked (agents outside the cluster have no pod).
    let running_agents: Vec<&Pod> = gathered.agents.iter().filter(|p| is_running(p)).collect();
    let mut expected: BTreeMap<String, Option<String>> = running_agents
        .iter()
        .filter_map(|p| Some((node_of(p)?, Some(pod_name(p)))))
        .collect();
    for agents in gathered.views.values().flatten() {
        for agent in agents {
            let key = agent.node.clone().unwrap_or_else(|| agent.id.clone());
            expected.entry(key).or_insert(None);
        }
    }
    let linked_by: BTreeMap<&String, BTreeSet<String>> = gathered
        .views
        .iter()
        .filter_map(|(server, view)| {
            let keys = view
                .as_ref()
                .ok()?
                .iter()
                .map(|a| a.node.clone().unwrap_or_else(|| a.id.clone()))
                .collect();
            Some((server, keys))
        })
        .collect();

    let mut not_linked = Vec::new();
    for (agent, agent_pod) in &expected {
        for (server, keys) in &linked_by {
            if !keys.contains(agent) {
                not_linked.push(MissingLink {
                    agent: agent.clone(),
                    agent_pod: agent_pod.clone(),
                    server: (*server).clone(),
                });
            }
        }
    }
    not_linked.sort();

    let server_pods = gathered
        .servers
        .iter()
        .map(|pod| {
            let name = pod_name(pod);
            let ready = pod_ready(pod);
            ServerReport {
                reason: (!ready).then(|| not_ready_reason(pod, gathered.readyz.get(&name))),
                linked_agents: gathered.views.get(&name).and_then(|v| {
                    v.as_ref()
                        .ok()
                        .map(|agents| agents.iter().map(|a| a.id.clone()).collect())
                }),
                view_error: gathered
                    .views
                    .get(&name)
                    .and_then(|v| v.as_ref().err().cloned()),
                expected_agents: expected.len(),
                node: node_of(pod),
                ip: ip_of(pod),
                restarts: restarts(pod),
                pod: name,
                ready,
            }
        })
        .collect();
    let agent_pods = gathered
        .agents
        .iter()
        .map(|pod| {
            let name = pod_name(pod);
            let ready = pod_ready(pod);
            let node = node_of(pod);
            AgentReport {
                reason: (!ready).then(|| not_ready_reason(pod, gathered.readyz.get(&name))),
                linked_servers: linked_by
                    .iter()
                    .filter(|(_, keys)| node.as_ref().is_some_and(|n| keys.contains(n)))
                    .map(|(server, _)| (*server).clone())
                    .collect(),
                known_servers: linked_by.len(),
                ip: ip_of(pod),
                restarts: restarts(pod),
                node,
                pod: name,
                ready,
            }
        })
        .collect();

    let nodes_without_agent = match (&gathered.nodes, link.spec.agent.authentication) {
        (Some(nodes), cplink_operator::crd::AgentAuthentication::Token) => {
            let with_agent: BTreeSet<String> = gathered.agents.iter().filter_map(node_of).collect();
            let selector = link.spec.agent.node_selector.clone().unwrap_or_default();
            let mut without: Vec<String> = nodes
                .iter()
                .filter(|node| {
                    let labels = node.metadata.labels.clone().unwrap_or_default();
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .filter_map(|node| node.metadata.name.clone())
                .filter(|name| !with_agent.contains(name))
                .collect();
            without.sort();
            without
        }
        _ => Vec::new(),
    };

    let mut certificates: Vec<CertificateReport> = gathered
        .certificates
        .iter()
        .map(|(source, not_after)| certificate(source, *not_after, now))
        .collect();
    if certificates.is_empty()
        && let Some(not_after) = status
            .certificates
            .as_ref()
            .and_then(|c| c.not_after.as_ref())
    {
        let when = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(not_after.0.as_second()).unwrap_or(0));
        certificates.push(certificate("status (earliest)", when, now));
    }
    certificates.sort_by_key(|c| c.expires_in_seconds);

    let desired_servers = gathered
        .deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .map(i64::from)
        .or(Some(i64::from(link.spec.server.replicas)));
    let ready_servers = gathered.servers.iter().filter(|p| pod_ready(p)).count() as i64;
    // The most telling condition first: a pod the ReplicaSet could not create says why.
    let missing_reason = gathered.deployment.as_ref().and_then(|d| {
        let conditions = d.status.as_ref()?.conditions.as_ref()?;
        [
            ("ReplicaFailure", "True"),
            ("Progressing", "False"),
            ("Available", "False"),
        ]
        .iter()
        .find_map(|(kind, status)| {
            conditions
                .iter()
                .find(|c| c.type_ == *kind && c.status == *status)
                .and_then(|c| c.message.clone())
        })
    });
    let agents = status.agents.as_ref();

    LinkReport {
        link: link.metadata.name.clone().unwrap_or_default(),
        namespace: link.metadata.namespace.clone().unwrap_or_default(),
        ready: ready.map_or("Unknown".into(), |c| c.status.clone()),
        ready_reason: ready.map(|c| format!("{}: {}", c.reason, c.message)),
        egress: EgressReport {
            mode: link.spec.server.frontend.mode.as_str().to_owned(),
            address: status.frontend.as_ref().map(|f| f.address.clone()),
            secret: status.frontend.as_ref().map(|f| f.egress_secret.clone()),
        },
        servers: Replicas {
            desired: desired_servers,
            ready: ready_servers,
            missing_reason: desired_servers
                .filter(|d| *d > ready_servers)
                .and(missing_reason),
        },
        agents: Replicas {
            desired: agents.map(|a| i64::from(a.desired)),
            ready: agents.map_or_else(
                || gathered.agents.iter().filter(|p| pod_ready(p)).count() as i64,
                |a| i64::from(a.ready),
            ),
            missing_reason: None,
        },
        server_pods,
        agent_pods,
        not_linked,
        nodes_without_agent,
        certificates,
        notes: gathered.notes.clone(),
    }
}

fn certificate(source: &str, not_after: SystemTime, now: SystemTime) -> CertificateReport {
    let expires_in_seconds = match not_after.duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    };
    CertificateReport {
        source: source.to_owned(),
        not_after: cplink_runtime::introspect::timestamp(not_after),
        expires_in_seconds,
    }
}

fn count(ready: i64, desired: Option<i64>) -> String {
    match desired {
        Some(desired) => format!("{ready}/{desired}"),
        None => ready.to_string(),
    }
}

fn expires(seconds: i64) -> String {
    if seconds < 0 {
        format!(
            "expired {} ago",
            table::age(Duration::from_secs(seconds.unsigned_abs()))
        )
    } else {
        format!(
            "in {}",
            table::age(Duration::from_secs(seconds.unsigned_abs()))
        )
    }
}

/// The report as text; `wide` adds IPs and every certificate.
pub fn render(report: &StatusReport, wide: bool) -> String {
    let mut out = String::new();
    for (i, link) in report.links.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_link(&mut out, link, wide);
    }
    out
}

fn render_link(out: &mut String, link: &LinkReport, wide: bool) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "Link:          {}/{}", link.namespace, link.link);
    let _ = writeln!(
        out,
        "Ready:         {}{}",
        link.ready,
        link.ready_reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "Egress:        {}{}{}",
        link.egress.mode,
        link.egress
            .address
            .as_ref()
            .map(|a| format!(" to {a}"))
            .unwrap_or_default(),
        link.egress
            .secret
            .as_ref()
            .map(|s| format!(", configuration in Secret {s}"))
            .unwrap_or_default()
    );
    let shown: Vec<&CertificateReport> = if wide {
        link.certificates.iter().collect()
    } else {
        link.certificates.iter().take(1).collect()
    };
    for (i, cert) in shown.iter().enumerate() {
        let label = match (i, wide) {
            (0, false) => "Certificates:  earliest",
            (0, true) => "Certificates: ",
            _ => "              ",
        };
        let _ = writeln!(
            out,
            "{label} {} expires {} ({})",
            cert.source,
            cert.not_after,
            expires(cert.expires_in_seconds)
        );
    }
    let _ = writeln!(
        out,
        "Servers:       {} ready{}",
        count(link.servers.ready, link.servers.desired),
        link.servers
            .missing_reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "Agents:        {} ready",
        count(link.agents.ready, link.agents.desired)
    );

    out.push('\n');
    let mut servers = if wide {
        Table::new([
            "SERVER", "NODE", "IP", "READY", "AGENTS", "RESTARTS", "REASON",
        ])
    } else {
        Table::new(["SERVER", "NODE", "READY", "AGENTS", "RESTARTS", "REASON"])
    };
    for s in &link.server_pods {
        let agents = match &s.linked_agents {
            Some(linked) => format!("{}/{}", linked.len(), s.expected_agents),
            None => "?".into(),
        };
        let mut row = vec![s.pod.clone(), s.node.clone().unwrap_or_default()];
        if wide {
            row.push(s.ip.clone().unwrap_or_default());
        }
        row.extend([
            title(s.ready),
            agents,
            s.restarts.to_string(),
            s.reason.clone().unwrap_or_default(),
        ]);
        servers.row(row);
    }
    if servers.is_empty() {
        out.push_str("No server pods.\n");
    } else {
        out.push_str(&servers.render());
    }
    for s in &link.server_pods {
        if let Some(err) = &s.view_error {
            let _ = writeln!(out, "server {}: cannot read /debug/agents: {err}", s.pod);
        }
    }

    if !link.agent_pods.is_empty() {
        out.push('\n');
        let mut agents = if wide {
            Table::new([
                "AGENT", "NODE", "IP", "READY", "SERVERS", "RESTARTS", "REASON",
            ])
        } else {
            Table::new(["AGENT", "NODE", "READY", "SERVERS", "RESTARTS", "REASON"])
        };
        for a in &link.agent_pods {
            let mut row = vec![a.pod.clone(), a.node.clone().unwrap_or_default()];
            if wide {
                row.push(a.ip.clone().unwrap_or_default());
            }
            row.extend([
                title(a.ready),
                format!("{}/{}", a.linked_servers.len(), a.known_servers),
                a.restarts.to_string(),
                a.reason.clone().unwrap_or_default(),
            ]);
            agents.row(row);
        }
        out.push_str(&agents.render());
    }

    if !link.not_linked.is_empty() {
        out.push('\n');
        for missing in &link.not_linked {
            let pod = missing
                .agent_pod
                .as_ref()
                .map(|p| format!(" (pod {p})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "agent {}{pod} not linked to server {}",
                missing.agent, missing.server
            );
        }
    }
    if !link.nodes_without_agent.is_empty() {
        let _ = writeln!(
            out,
            "\nNodes without an agent: {} (their dials go to other agents, if the routing \
             strategies allow: see `kubectl cplink routes NODE`)",
            link.nodes_without_agent.join(", ")
        );
    }
    for note in &link.notes {
        let _ = writeln!(out, "\nNote: {note}");
    }
}

fn title(ready: bool) -> String {
    if ready { "True" } else { "False" }.to_owned()
}

#[cfg(test)]
mod tests {
    use cplink_runtime::introspect::IdentifiersInfo;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, node: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.0.0.1".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn agent(id: &str) -> AgentInfo {
        AgentInfo {
            id: id.into(),
            node: Some(id.into()),
            protocol: "cplink".into(),
            verified: None,
            identifiers: IdentifiersInfo::default(),
            links: Vec::new(),
        }
    }

    fn link() -> ControlPlaneLink {
        let mut link = ControlPlaneLink::new("edge", Default::default());
        link.metadata.namespace = Some("cplink-system".into());
        link
    }

    #[test]
    fn a_server_missing_an_agent_is_named_and_so_is_the_agent() {
        let gathered = Gathered {
            servers: vec![
                pod("server-a", "node-1", true),
                pod("server-b", "node-2", true),
            ],
            agents: vec![
                pod("agent-1", "node-1", true),
                pod("agent-2", "node-2", false),
            ],
            views: BTreeMap::from([
                (
                    "server-a".to_owned(),
                    Ok(vec![agent("node-1"), agent("node-2")]),
                ),
                ("server-b".to_owned(), Ok(vec![agent("node-1")])),
            ]),
            readyz: BTreeMap::from([(
                "agent-2".to_owned(),
                "not linked to 10.0.0.9:8091".to_owned(),
            )]),
            ..Gathered::new(link())
        };
        let report = analyse(&gathered, SystemTime::now());
        assert_eq!(
            report.not_linked,
            [MissingLink {
                agent: "node-2".into(),
                agent_pod: Some("agent-2".into()),
                server: "server-b".into(),
            }]
        );
        let agent_2 = &report.agent_pods[1];
        assert_eq!(agent_2.linked_servers, ["server-a"]);
        assert_eq!(
            agent_2.reason.as_deref(),
            Some("not linked to 10.0.0.9:8091")
        );
        assert_eq!(
            report.server_pods[1].linked_agents.as_ref().unwrap().len(),
            1
        );
        let text = render(
            &StatusReport {
                links: vec![report],
            },
            false,
        );
        assert!(
            text.contains("agent node-2 (pod agent-2) not linked to server server-b\n"),
            "{text}"
        );
        assert!(
            text.contains("SERVER     NODE     READY   AGENTS"),
            "{text}"
        );
    }

    #[test]
    fn an_unreadable_server_is_marked_and_judges_no_agent() {
        let gathered = Gathered {
            servers: vec![pod("server-a", "node-1", true)],
            agents: vec![pod("agent-1", "node-1", true)],
            views: BTreeMap::from([(
                "server-a".to_owned(),
                Err("forbidden: cannot get pods/proxy".to_owned()),
            )]),
            ..Gathered::new(link())
        };
        let report = analyse(&gathered, SystemTime::now());
        assert!(report.not_linked.is_empty());
        assert_eq!(report.server_pods[0].linked_agents, None);
        let text = render(
            &StatusReport {
                links: vec![report],
            },
            false,
        );
        assert!(text.contains("server-a   node-1   True    ?"), "{text}");
    }

    #[test]
    fn a_pending_server_says_why_and_nodes_without_agents_are_listed() {
        let mut pending = pod("server-b", "", false);
        let status = pending.status.as_mut().unwrap();
        status.phase = Some("Pending".into());
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            message: Some("0/3 nodes are available".into()),
            ..PodCondition::default()
        }]);
        let node = |name: &str| Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        let gathered = Gathered {
            servers: vec![pod("server-a", "node-1", true), pending],
            agents: vec![pod("agent-1", "node-1", true)],
            views: BTreeMap::from([("server-a".to_owned(), Ok(vec![agent("node-1")]))]),
            nodes: Some(vec![node("node-1"), node("node-2")]),
            ..Gathered::new(link())
        };
        let report = analyse(&gathered, SystemTime::now());
        assert_eq!(
            report.server_pods[1].reason.as_deref(),
            Some("not scheduled: 0/3 nodes are available")
        );
        assert_eq!(report.nodes_without_agent, ["node-2"]);
        assert_eq!(report.servers.ready, 1);
    }

    #[test]
    fn certificates_count_down_and_say_when_expired() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let soon = certificate(
            "edge-ca/tls.crt",
            now + Duration::from_secs(3 * 86_400),
            now,
        );
        assert_eq!(soon.expires_in_seconds, 3 * 86_400);
        assert_eq!(expires(soon.expires_in_seconds), "in 3d");
        let past = certificate("x", now - Duration::from_secs(90), now);
        assert_eq!(expires(past.expires_in_seconds), "expired 90s ago");
    }
}
