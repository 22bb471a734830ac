//! `kubectl cplink check NODE`: each server dials the node's kubelet port through its agent
//! and closes at once (`/debug/check`): the latency, or the exact failure.
//!
//! Through the servers' admin ports rather than their frontends: the frontends take only
//! kube-apiserver's client certificate, which an operator's kubeconfig does not hold, while
//! the pod proxy reaches every server replica by name, each check goes through the same
//! routing and dial code as kube-apiserver's dials, and it counts in no dial metric.

use cplink_runtime::introspect::CheckInfo;
use serde::Serialize;

use crate::cluster::{Cluster, ReadError};
use crate::table::{self, Table};

/// The kubelet port unless the Node says otherwise.
const KUBELET_PORT: u16 = 10250;

/// Each server's check.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// The link.
    pub link: String,
    /// The node checked.
    pub node: String,
    /// The port dialed.
    pub port: u16,
    /// One entry per running server pod.
    pub servers: Vec<ServerCheck>,
}

/// One server's check.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerCheck {
    /// The server pod.
    pub pod: String,
    /// What it answered; none when it could not be asked.
    pub check: Option<CheckInfo>,
    /// Why it could not be asked.
    pub error: Option<String>,
}

impl CheckReport {
    /// Whether every server reached the node.
    pub fn all_ok(&self) -> bool {
        self.servers
            .iter()
            .all(|s| s.check.as_ref().is_some_and(|c| c.ok))
    }
}

/// Has every server of the link dial `node`'s kubelet (`port`, else the port its Node
/// reports, else 10250).
pub async fn run(
    cluster: &Cluster,
    link: Option<&str>,
    node: &str,
    port: Option<u16>,
) -> Result<CheckReport, ReadError> {
    let link = cluster.link(link).await?;
    let port = match port {
        Some(port) => port,
        None => kubelet_port(cluster, node).await,
    };
    let pods = crate::servers::running(cluster, &link).await?;
    let port_text = port.to_string();
    let answers = crate::servers::ask::<CheckInfo>(
        cluster,
        &pods,
        "/debug/check",
        &[("node", node), ("port", &port_text)],
    )
    .await;
    Ok(CheckReport {
        link: link.metadata.name.clone().unwrap_or_default(),
        node: node.to_owned(),
        port,
        servers: answers
            .into_iter()
            .map(|(pod, answer)| match answer {
                Ok(check) => ServerCheck {
                    pod,
                    check: Some(check),
                    error: None,
                },
                Err(err) => ServerCheck {
                    pod,
                    check: None,
                    error: Some(err.to_string()),
                },
            })
            .collect(),
    })
}

/// The kubelet port the Node reports; 10250 when it reports none or cannot be read.
async fn kubelet_port(cluster: &Cluster, node: &str) -> u16 {
    let Ok(Some(node)) = cluster.node(node).await else {
        return KUBELET_PORT;
    };
    node.status
        .and_then(|s| s.daemon_endpoints)
        .and_then(|d| d.kubelet_endpoint)
        .and_then(|e| u16::try_from(e.port).ok())
        .filter(|p| *p != 0)
        .unwrap_or(KUBELET_PORT)
}

/// The report as a table; `wide` adds the strategy and the error kind.
pub fn render(report: &CheckReport, wide: bool) -> String {
    let mut table = if wide {
        Table::new([
            "SERVER",
            "DESTINATION",
            "AGENT",
            "STRATEGY",
            "RESULT",
            "LATENCY",
            "KIND",
            "ERROR",
        ])
    } else {
        Table::new([
            "SERVER",
            "DESTINATION",
            "AGENT",
            "RESULT",
            "LATENCY",
            "ERROR",
        ])
    };
    for server in &report.servers {
        let mut row = vec![server.pod.clone()];
        match &server.check {
            Some(c) => {
                row.extend([c.destination.clone(), c.agent.clone().unwrap_or_default()]);
                if wide {
                    row.push(c.strategy.clone().unwrap_or_default());
                }
                row.extend([
                    if c.ok { "ok" } else { "failed" }.to_owned(),
                    table::latency(c.latency_seconds),
                ]);
                if wide {
                    row.push(c.error_kind.clone().unwrap_or_default());
                }
                row.push(c.error.clone().unwrap_or_default());
            }
            None => {
                let blanks = if wide { 6 } else { 4 };
                row.extend(std::iter::repeat_n(String::new(), blanks));
                row.push(format!(
                    "cannot ask: {}",
                    server.error.clone().unwrap_or_default()
                ));
            }
        }
        table.row(row);
    }
    table.render()
}
