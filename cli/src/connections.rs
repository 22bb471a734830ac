//! `kubectl cplink connections [--node N]`: the tunneled connections open on each server
//! (`/debug/connections`, page by page), oldest first.

use cplink_runtime::introspect::{ConnectionInfo, ConnectionList, MAX_LIMIT};
use serde::Serialize;

use crate::cluster::{Cluster, ReadError, SERVER_ADMIN_PORT};
use crate::table::{self, Table};

/// Each server's connections.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsReport {
    /// The link.
    pub link: String,
    /// One entry per running server pod.
    pub servers: Vec<ServerConnections>,
}

/// One server's connections.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerConnections {
    /// The server pod.
    pub pod: String,
    /// Its connections, up to the limit asked for.
    pub connections: Vec<ConnectionInfo>,
    /// Whether it has more than were listed.
    pub truncated: bool,
    /// Why it could not be asked.
    pub error: Option<String>,
}

/// Lists up to `limit` connections of every server of the link, those of `node`'s agent only
/// when given.
pub async fn run(
    cluster: &Cluster,
    link: Option<&str>,
    node: Option<&str>,
    limit: usize,
) -> Result<ConnectionsReport, ReadError> {
    let link = cluster.link(link).await?;
    let pods = crate::servers::running(cluster, &link).await?;
    let mut servers = Vec::new();
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut listed = ServerConnections {
            pod: name,
            connections: Vec::new(),
            truncated: false,
            error: None,
        };
        let mut token: Option<String> = None;
        loop {
            let want = (limit - listed.connections.len())
                .clamp(1, MAX_LIMIT)
                .to_string();
            let mut query = vec![("limit", want.as_str())];
            if let Some(node) = node {
                query.push(("node", node));
            }
            if let Some(token) = &token {
                query.push(("continue", token.as_str()));
            }
            match cluster
                .view::<ConnectionList>(pod, SERVER_ADMIN_PORT, "/debug/connections", &query)
                .await
            {
                Ok(page) => {
                    listed.connections.extend(page.items);
                    match page.continue_token {
                        Some(next) if page.truncated => {
                            if listed.connections.len() >= limit {
                                listed.truncated = true;
                                break;
                            }
                            token = Some(next);
                        }
                        _ => break,
                    }
                }
                Err(err) => {
                    listed.error = Some(err.to_string());
                    break;
                }
            }
        }
        servers.push(listed);
    }
    Ok(ConnectionsReport {
        link: link.metadata.name.clone().unwrap_or_default(),
        servers,
    })
}

/// The report as a table; `wide` adds the connection number and exact byte counts.
pub fn render(report: &ConnectionsReport, wide: bool) -> String {
    let mut table = if wide {
        Table::new([
            "SERVER",
            "ID",
            "FRONTEND",
            "DESTINATION",
            "AGENT",
            "NODE",
            "STATE",
            "AGE",
            "TO-AGENT",
            "FROM-AGENT",
        ])
    } else {
        Table::new([
            "SERVER",
            "FRONTEND",
            "DESTINATION",
            "AGENT",
            "STATE",
            "AGE",
            "TO-AGENT",
            "FROM-AGENT",
        ])
    };
    let mut notes = String::new();
    for server in &report.servers {
        for c in &server.connections {
            let age = table::age(std::time::Duration::from_secs_f64(c.age_seconds.max(0.0)));
            let (to, from) = if wide {
                (c.bytes_to_agent.to_string(), c.bytes_from_agent.to_string())
            } else {
                (
                    table::bytes(c.bytes_to_agent),
                    table::bytes(c.bytes_from_agent),
                )
            };
            let mut row = vec![server.pod.clone()];
            if wide {
                row.push(c.id.to_string());
            }
            row.extend([
                c.frontend.clone(),
                c.destination.clone(),
                c.agent.clone().unwrap_or_default(),
            ]);
            if wide {
                row.push(c.node.clone().unwrap_or_default());
            }
            row.extend([c.state.clone(), age, to, from]);
            table.row(row);
        }
        if let Some(err) = &server.error {
            notes.push_str(&format!("server {}: cannot list: {err}\n", server.pod));
        } else if server.truncated {
            notes.push_str(&format!(
                "server {}: more connections than listed (--limit)\n",
                server.pod
            ));
        }
    }
    let mut out = if table.is_empty() {
        "No tunneled connections.\n".to_owned()
    } else {
        table.render()
    };
    out.push_str(&notes);
    out
}
