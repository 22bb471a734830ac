//! The agent's read-only debug view on the admin endpoint (`--debug-endpoints`):
//! `/debug/links`, every server address it links to and each link's server, state, age and
//! tunneled connections; an address without a link says why its last attempt failed. Paged as
//! [`cplink_runtime::introspect`] says, in the order the addresses were added.

use std::sync::Arc;

use cplink_runtime::admin::{DebugFuture, DebugReply, Introspect};
use cplink_runtime::introspect::{self, AgentHeader, LinkInfo, LinkList, Page, Query, QueryError};
use http::StatusCode;

use crate::Shared;
use crate::slots::SlotView;

/// The debug view of one agent.
pub(crate) struct Views(pub(crate) Arc<Shared>);

impl Introspect for Views {
    fn get(&self, path: &str, query: &str) -> Option<DebugFuture> {
        let reply = match path {
            "links" => Query::parse(query, &["limit", "continue"])
                .and_then(|q| links(&self.0, &q))
                .map_or_else(
                    |err| DebugReply::error(StatusCode::BAD_REQUEST, err.to_string()),
                    |list| DebugReply::json(&list),
                ),
            _ => return None,
        };
        Some(Box::pin(std::future::ready(reply)))
    }
}

/// A row's place in the list: its slot, then its link (0 for a slot without links).
type Key = (u64, u64);

fn parse_key(token: &str) -> Option<Key> {
    let (slot, link) = token.split_once('.')?;
    Some((slot.parse().ok()?, link.parse().ok()?))
}

/// `/debug/links`: one page of the agent's server addresses and links.
pub(crate) fn links(shared: &Shared, query: &Query) -> Result<LinkList, QueryError> {
    let page: Page = query.page()?;
    let after = match page.after.as_deref() {
        Some(token) => Some(parse_key(token).ok_or_else(|| QueryError::Invalid {
            name: "continue".into(),
            reason: "not a token this list handed out".into(),
        })?),
        None => None,
    };
    let draining = shared.is_draining();
    let rows = shared
        .links
        .views()
        .into_iter()
        .flat_map(|slot| rows(slot, draining))
        .filter(|(key, _)| after.is_none_or(|after| *key > after));
    let readiness = shared.readiness();
    let header = AgentHeader {
        agent: shared.config.agent_id.clone(),
        node: shared.config.node_name.clone(),
        protocol: shared.config.protocol.to_string(),
        ready: readiness.is_ok(),
        not_ready: readiness.err(),
    };
    let cut = page.cut(rows, |(key, _)| format!("{}.{}", key.0, key.1));
    Ok(introspect::Cut {
        items: cut.items.into_iter().map(|(_, row)| row).collect(),
        truncated: cut.truncated,
        continue_token: cut.continue_token,
    }
    .into_list(header))
}

/// The rows of one slot: a row per link, or one saying why it has none.
fn rows(slot: SlotView, draining: bool) -> Vec<(Key, LinkInfo)> {
    if slot.links.is_empty() {
        return vec![(
            (slot.id, 0),
            LinkInfo {
                address: slot.address,
                server_id: None,
                state: if slot.retired { "retired" } else { "down" }.to_owned(),
                since: None,
                active_streams: 0,
                last_error: slot.last_error,
            },
        )];
    }
    let state = if draining {
        "draining"
    } else if slot.retired {
        "retired"
    } else {
        "up"
    };
    slot.links
        .into_iter()
        .map(|link| {
            (
                (slot.id, link.id),
                LinkInfo {
                    address: slot.address.clone(),
                    server_id: Some(link.server_id),
                    state: state.to_owned(),
                    since: Some(introspect::timestamp(link.since)),
                    active_streams: link.streams as u64,
                    last_error: None,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::LinkInfo as Established;
    use crate::slots::{OnDuplicate, Wants};

    async fn get(views: &Views, path_and_query: &str) -> (StatusCode, Value) {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let reply = views.get(path, query).expect("a view").await;
        (reply.status, serde_json::from_slice(&reply.body).unwrap())
    }

    #[tokio::test]
    async fn links_show_each_server_their_streams_and_why_an_address_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::tests::config(dir.path(), &["--agent-id", "node-1"]).unwrap();
        let agent = crate::Agent::new(config);
        let shared = agent.shared.clone();
        let fixed = agent.fixed[0];
        let second = shared.links.add("server-b:8091".into(), Wants::One);
        let held = shared
            .links
            .hold(
                fixed,
                Established {
                    server_id: "server-a".into(),
                    server_count: 2,
                },
                OnDuplicate::Refuse,
            )
            .unwrap();
        let _streams = [held.count_stream(), held.count_stream()];
        drop(held.count_stream());
        shared
            .links
            .failed(second, "cannot connect: connection refused".into());
        let views = Views(shared.clone());

        let (status, list) = get(&views, "links").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list["agent"], "node-1");
        assert_eq!(list["protocol"], "cplink");
        assert_eq!(list["ready"], false);
        assert_eq!(list["notReady"], "not linked to server-b:8091");
        let mut up = list["items"][0].clone();
        assert!(up["since"].take().as_str().unwrap().ends_with('Z'));
        assert_eq!(
            up,
            json!({
                "address": shared.config.servers[0].address,
                "serverId": "server-a",
                "state": "up",
                "since": null,
                "activeStreams": 2,
                "lastError": null,
            })
        );
        assert_eq!(
            list["items"][1],
            json!({
                "address": "server-b:8091",
                "serverId": null,
                "state": "down",
                "since": null,
                "activeStreams": 0,
                "lastError": "cannot connect: connection refused",
            })
        );

        let (_, first) = get(&views, "links?limit=1").await;
        assert_eq!(first["truncated"], true);
        let next = first["continue"].as_str().unwrap().to_owned();
        let (_, rest) = get(&views, &format!("links?limit=1&continue={next}")).await;
        assert_eq!(rest["items"][0]["address"], "server-b:8091");
        assert_eq!(rest["truncated"], false);

        for bad in ["links?continue=x", "links?limit=-1", "links?server=a"] {
            let (status, err) = get(&views, bad).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {err}");
        }
        assert!(views.get("agents", "").is_none());
    }
}
