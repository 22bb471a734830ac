//! `kubectl cplink routes NODE|IP`: which agent each server would pick for the destination,
//! and by which strategy, as the servers' own routing code answers (`/debug/route`); nothing
//! is dialed.

use cplink_runtime::introspect::RouteInfo;
use serde::Serialize;

use crate::cluster::{Cluster, ReadError};
use crate::table::Table;

/// Each server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutesReport {
    /// The link.
    pub link: String,
    /// The destination asked about, as given.
    pub destination: String,
    /// One entry per running server pod.
    pub servers: Vec<ServerRoute>,
}

/// One server's route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerRoute {
    /// The server pod.
    pub pod: String,
    /// What it answered; none when it could not be asked.
    pub route: Option<RouteInfo>,
    /// Why it could not be asked.
    pub error: Option<String>,
}

/// Asks every server of the link where `destination` (a node name or an IP) on `port` goes.
pub async fn run(
    cluster: &Cluster,
    link: Option<&str>,
    destination: &str,
    port: u16,
) -> Result<RoutesReport, ReadError> {
    let link = cluster.link(link).await?;
    let pods = crate::servers::running(cluster, &link).await?;
    let port = port.to_string();
    let key = if destination.parse::<std::net::IpAddr>().is_ok() {
        "ip"
    } else {
        "node"
    };
    let answers = crate::servers::ask::<RouteInfo>(
        cluster,
        &pods,
        "/debug/route",
        &[(key, destination), ("port", &port)],
    )
    .await;
    Ok(RoutesReport {
        link: link.metadata.name.clone().unwrap_or_default(),
        destination: destination.to_owned(),
        servers: answers
            .into_iter()
            .map(|(pod, answer)| match answer {
                Ok(route) => ServerRoute {
                    pod,
                    route: Some(route),
                    error: None,
                },
                Err(err) => ServerRoute {
                    pod,
                    route: None,
                    error: Some(err.to_string()),
                },
            })
            .collect(),
    })
}

/// The report as a table; `wide` adds the destination and the strategy chain.
pub fn render(report: &RoutesReport, wide: bool) -> String {
    let mut table = if wide {
        Table::new([
            "SERVER",
            "DESTINATION",
            "AGENT",
            "NODE",
            "STRATEGY",
            "STRATEGIES",
            "REFUSAL",
        ])
    } else {
        Table::new(["SERVER", "AGENT", "NODE", "STRATEGY", "REFUSAL"])
    };
    for server in &report.servers {
        let mut row = vec![server.pod.clone()];
        match &server.route {
            Some(route) => {
                if wide {
                    row.push(route.destination.clone());
                }
                row.extend([
                    route.agent.clone().unwrap_or_default(),
                    route.node.clone().unwrap_or_default(),
                    route.strategy.clone().unwrap_or_default(),
                ]);
                if wide {
                    row.push(route.strategies.join(","));
                }
                row.push(route.refusal.clone().unwrap_or_default());
            }
            None => {
                let blanks = if wide { 5 } else { 3 };
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
