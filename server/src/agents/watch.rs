//! Keeps verified links true to their Pods and Nodes while they live.
//!
//! A link is verified once, at its hello. Afterwards the server watches the agent pods'
//! namespace and the Nodes: a deleted agent pod closes its links (its token no longer proves
//! anything), a deleted Node closes the links bound to it, and a changed Node replaces what its
//! agents route, so that a route follows the Node's addresses and pod ranges.
//!
//! A server that has just started knows of no agent that went: for its first
//! `--node-agent-grace`, each Node it learns of with no agent linked is expected to get one, and
//! dials for it wait as they would for a replaced agent
//! ([`crate::registry::Registry::expect_node`]). The server reports ready only once it has listed
//! the Nodes: before, it could not tell a Node to hold from a name it never heard of.
//!
//! Events can be missed while a watch is broken; after each relist (`Init` .. `InitDone`), links
//! whose Pod or Node was not listed are closed as if their deletion had been seen. Only links
//! established before the relist started are judged, so a link verified meanwhile is not
//! mistaken for a stale one.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::serde::de::DeserializeOwned;
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
    let nodes = watch::<Node>(&shared, kube::Api::all(client.clone()));
    let pods = async {
        if let Some(namespace) = binding.pod_namespace() {
            watch::<Pod>(&shared, kube::Api::namespaced(client.clone(), namespace)).await;
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

/// What a watch keeps verified links true to: Nodes, or agent pods.
trait Watched:
    kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static
{
    /// What the object is called in logs, and the metric reason when it goes.
    const KIND: &'static str;
    const GONE: &'static str;

    /// The key a link is bound by: the Node's name, the pod's uid.
    fn key(&self) -> Option<String>;

    /// The key `link` is bound by, if it is bound to this kind of object.
    fn bound(link: &AgentLink) -> Option<&str>;

    /// The object was added or changed.
    fn applied(&self, _shared: &Shared) {}

    /// Every object of the kind has been listed (after each relist).
    fn listed(_shared: &Shared) {}
}

impl Watched for Node {
    const KIND: &'static str = "node";
    const GONE: &'static str = "node_deleted";

    fn key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn bound(link: &AgentLink) -> Option<&str> {
        node_of(link)
    }

    fn applied(&self, shared: &Shared) {
        follow(shared, self);
        expect(shared, self);
    }

    fn listed(shared: &Shared) {
        shared.nodes_were_listed();
    }
}

impl Watched for Pod {
    const KIND: &'static str = "pod";
    const GONE: &'static str = "pod_deleted";

    fn key(&self) -> Option<String> {
        self.metadata.uid.clone()
    }

    fn bound(link: &AgentLink) -> Option<&str> {
        pod_uid_of(link)
    }
}

/// Follows `api`'s objects: closes the links bound to one that is deleted, or missing after a
/// relist, and tells the others of changes.
async fn watch<K: Watched>(shared: &Shared, api: kube::Api<K>) {
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<(Instant, HashSet<String>)> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(object)) => object.applied(shared),
            Ok(Event::Delete(object)) => {
                let key = object.key().unwrap_or_default();
                let why = format!(
                    "its {} {} was deleted",
                    K::KIND,
                    object.meta().name.as_deref().unwrap_or_default()
                );
                for link in verified_links(shared, |l| K::bound(l) == Some(key.as_str())) {
                    revoke(shared, &link, K::GONE, &why);
                }
            }
            Ok(Event::Init) => relist = Some((Instant::now(), HashSet::new())),
            Ok(Event::InitApply(object)) => {
                object.applied(shared);
                if let (Some((_, seen)), Some(key)) = (&mut relist, object.key()) {
                    seen.insert(key);
                }
            }
            Ok(Event::InitDone) => {
                K::listed(shared);
                let Some((started, seen)) = relist.take() else {
                    continue;
                };
                let stale = verified_links(shared, |l| {
                    l.linked_at < started && K::bound(l).is_some_and(|key| !seen.contains(key))
                });
                for link in stale {
                    let why = format!(
                        "its {} {} no longer exists",
                        K::KIND,
                        K::bound(&link).unwrap_or_default()
                    );
                    revoke(shared, &link, K::GONE, &why);
                }
            }
            // The stream backs off and retries by itself.
            Err(err) => tracing::warn!(%err, kind = K::KIND, "watch failed; retrying"),
        }
    }
}

/// On a server started less than `--node-agent-grace` ago, files `node` as expecting an agent
/// ([`crate::registry::Registry::expect_node`]) unless one is linked: an agent replaced while
/// the server started never linked to it, and the dials for its node hold until the new one
/// has.
fn expect(shared: &Shared, node: &Node) {
    let grace = shared.config.node_agent_grace;
    if grace.is_zero() || shared.started.elapsed() >= grace {
        return;
    }
    let backing = Backing::of(node);
    if shared
        .registry
        .expect_node(&backing.node, &backing.addresses, shared.started)
    {
        tracing::debug!(
            node = %backing.node,
            "no agent of the node is linked yet: its dials wait for one until a grace after the \
             server started"
        );
    }
}

/// Makes the links bound to `node` route what it backs now.
fn follow(shared: &Shared, node: &Node) {
    let backing = Backing::of(node);
    for link in verified_links(shared, |l| node_of(l) == Some(backing.node.as_str())) {
        let routes = backing.identifiers(link.identifiers().default_route);
        if shared.registry.replace_identifiers(&link, routes.clone()) {
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
