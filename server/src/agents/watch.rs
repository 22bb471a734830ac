//! Keeps verified links true to their Pods and Nodes while they live.
//!
//! A link is verified once, at its hello. Afterwards the server watches the agent pods'
//! namespace and the Nodes: a deleted agent pod closes its links (its token no longer proves
//! anything), a deleted Node closes the links bound to it, and a changed Node replaces what its
//! agents route, so that a route follows the Node's addresses and pod ranges.
//!
//! Events can be missed while a watch is broken; after each relist (`Init` .. `InitDone`), links
//! whose Pod or Node was not listed are closed as if their deletion had been seen. Only links
//! established before the relist started are judged, so a link verified meanwhile is not
//! mistaken for a stale one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::identity::nodes::Backing;
use crate::metrics::LinkErrorLabels;
use crate::registry::AgentLink;

/// Watches the Nodes (and, in token mode, the agent pods) until `stop` is cancelled.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let binding = &shared.config.identity;
    let Some(api) = binding.api() else {
        return;
    };
    let client = tokio::select! {
        client = api.client() => match client {
            Ok(client) => client,
            Err(err) => {
                // Every hello is refused as unverifiable too, so agents report it as well.
                tracing::error!(%err, "cannot watch the agents' Pods and Nodes");
                return;
            }
        },
        () = stop.cancelled() => return,
    };
    let nodes = watch_nodes(&shared, kube::Api::all(client.clone()));
    let pods = async {
        if let Some(namespace) = binding.pod_namespace() {
            watch_pods(&shared, kube::Api::namespaced(client.clone(), namespace)).await;
        }
    };
    tokio::select! {
        () = async { tokio::join!(nodes, pods); } => {}
        () = stop.cancelled() => {}
    }
}

/// Links bound to a node, or to a pod.
fn verified_links(
    shared: &Shared,
    mut matches: impl FnMut(&AgentLink) -> bool,
) -> Vec<Arc<AgentLink>> {
    shared
        .registry
        .agents()
        .into_iter()
        .filter(|link| link.verified.is_some() && matches(link))
        .collect()
}

fn revoke(shared: &Shared, link: &AgentLink, reason: &'static str, why: &str) {
    shared
        .metrics
        .identity_revocations
        .get_or_create(&LinkErrorLabels { reason })
        .inc();
    tracing::warn!(
        agent_id = %link.id,
        peer = %link.peer,
        verified = link.verified.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        "closing agent link: {why}"
    );
    link.closer.cancel();
}

fn node_of(link: &AgentLink) -> Option<&str> {
    link.verified.as_ref().map(|v| v.node.as_str())
}

fn pod_uid_of(link: &AgentLink) -> Option<&str> {
    link.verified
        .as_ref()
        .and_then(|v| v.pod.as_ref())
        .map(|p| p.uid.as_str())
}

async fn watch_nodes(shared: &Shared, api: kube::Api<Node>) {
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<(Instant, HashSet<String>)> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(node)) => follow(shared, &node),
            Ok(Event::Delete(node)) => {
                let name = node.metadata.name.unwrap_or_default();
                for link in verified_links(shared, |l| node_of(l) == Some(name.as_str())) {
                    revoke(
                        shared,
                        &link,
                        "node_deleted",
                        &format!("node {name} was deleted"),
                    );
                }
            }
            Ok(Event::Init) => relist = Some((Instant::now(), HashSet::new())),
            Ok(Event::InitApply(node)) => {
                follow(shared, &node);
                if let (Some((_, seen)), Some(name)) = (&mut relist, node.metadata.name) {
                    seen.insert(name);
                }
            }
            Ok(Event::InitDone) => {
                let Some((started, seen)) = relist.take() else {
                    continue;
                };
                let stale = verified_links(shared, |l| {
                    l.linked_at < started && node_of(l).is_some_and(|n| !seen.contains(n))
                });
                for link in stale {
                    let why = format!("node {} no longer exists", node_of(&link).unwrap_or(""));
                    revoke(shared, &link, "node_deleted", &why);
                }
            }
            // The stream backs off and retries by itself.
            Err(err) => tracing::warn!(%err, "watching Nodes failed; retrying"),
        }
    }
}

/// Makes the links bound to `node` route what it backs now.
fn follow(shared: &Shared, node: &Node) {
    let backing = Backing::of(node);
    for link in verified_links(shared, |l| node_of(l) == Some(backing.node.as_str())) {
        let routes = backing.identifiers(link.identifiers().default_route);
        if link.replace_identifiers(routes.clone()) {
            shared
                .metrics
                .identity_revocations
                .get_or_create(&LinkErrorLabels {
                    reason: "node_changed",
                })
                .inc();
            tracing::info!(
                agent_id = %link.id,
                node = %backing.node,
                host_ips = ?routes.host_ips,
                pod_cidrs = ?routes.pod_cidrs,
                "the agent's node changed; its routes follow"
            );
        }
    }
}

async fn watch_pods(shared: &Shared, api: kube::Api<Pod>) {
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<(Instant, HashSet<String>)> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Delete(pod)) => {
                let uid = pod.metadata.uid.unwrap_or_default();
                let name = pod.metadata.name.unwrap_or_default();
                for link in verified_links(shared, |l| pod_uid_of(l) == Some(uid.as_str())) {
                    revoke(
                        shared,
                        &link,
                        "pod_deleted",
                        &format!("its pod {name} was deleted"),
                    );
                }
            }
            Ok(Event::Apply(_)) => {}
            Ok(Event::Init) => relist = Some((Instant::now(), HashSet::new())),
            Ok(Event::InitApply(pod)) => {
                if let (Some((_, seen)), Some(uid)) = (&mut relist, pod.metadata.uid) {
                    seen.insert(uid);
                }
            }
            Ok(Event::InitDone) => {
                let Some((started, seen)) = relist.take() else {
                    continue;
                };
                let stale = verified_links(shared, |l| {
                    l.linked_at < started && pod_uid_of(l).is_some_and(|uid| !seen.contains(uid))
                });
                for link in stale {
                    revoke(shared, &link, "pod_deleted", "its pod no longer exists");
                }
            }
            Err(err) => tracing::warn!(%err, "watching agent pods failed; retrying"),
        }
    }
}
