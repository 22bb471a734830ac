//! Linked agents and the routing strategies that pick one for a destination.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cplink_proto::dial::DialFailure;
use cplink_proto::hello::Identifiers;
use cplink_proto::konnectivity::mux::Mux;
use cplink_proto::target::{Host, Target};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use crate::identity::Verified;

/// One step of the routing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The destination host is an agent's node name or one of its host IPs.
    Node,
    /// The destination IP lies in one of an agent's pod CIDRs.
    Cidr,
    /// Agents that offer themselves for destinations no other agent claims (`--default-route`,
    /// upstream's `defaultRoute`), the least loaded first.
    DefaultRoute,
    /// Any healthy agent, the least loaded first.
    Any,
}

impl Strategy {
    /// Name used in flags and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Node => "node",
            Strategy::Cidr => "cidr",
            Strategy::DefaultRoute => "default-route",
            Strategy::Any => "any",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "node" => Ok(Strategy::Node),
            "cidr" => Ok(Strategy::Cidr),
            "default-route" => Ok(Strategy::DefaultRoute),
            "any" => Ok(Strategy::Any),
            other => Err(format!(
                "unknown strategy {other:?} (expected node, cidr, default-route or any)"
            )),
        }
    }
}

/// Parses a comma-separated, non-empty strategy chain without repetitions.
pub fn parse_strategies(s: &str) -> Result<Vec<Strategy>, String> {
    let mut chain = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let strategy: Strategy = part.parse()?;
        if chain.contains(&strategy) {
            return Err(format!("strategy {strategy} is listed twice"));
        }
        chain.push(strategy);
    }
    if chain.is_empty() {
        return Err("at least one strategy is required".into());
    }
    Ok(chain)
}

/// How a link carries tunneled connections.
#[derive(Debug, Clone)]
pub(crate) enum Carrier {
    /// A native cplink link: one HTTP/2 stream per connection.
    Native(h2::client::SendRequest<Bytes>),
    /// An upstream konnectivity agent: every connection on its one `Connect` stream.
    Konnectivity(Arc<Mux>),
}

/// A linked agent.
pub struct AgentLink {
    /// The agent's id.
    pub id: String,
    /// Distinguishes successive links of the same agent.
    pub link_id: u64,
    /// Where the link comes from.
    pub peer: SocketAddr,
    /// The agent's node.
    pub node_name: Option<String>,
    /// Who the agent proved to be, when the server binds agents to nodes.
    pub verified: Option<Verified>,
    /// When the link was established.
    pub linked_at: Instant,
    /// When the link was established, by the wall clock.
    pub linked_since: SystemTime,
    /// What the agent routes. Replaced when the Node behind a verified agent changes.
    identifiers: RwLock<Identifiers>,
    /// How tunneled connections reach the agent.
    pub(crate) carrier: Carrier,
    /// Tunneled connections currently on this link.
    active: AtomicUsize,
    /// The agent announced it is going away; take no new dials.
    draining: AtomicBool,
    /// Bytes carried towards the agent and from it, by connections that are done or as they
    /// move.
    bytes_to_agent: AtomicU64,
    bytes_from_agent: AtomicU64,
    /// The round trip of the last answered keepalive PING, in microseconds; [`NO_RTT`] before
    /// the first.
    keepalive_rtt_us: AtomicU64,
    /// Closes the link.
    pub(crate) closer: CancellationToken,
}

/// No keepalive PING answered yet.
const NO_RTT: u64 = u64::MAX;

impl fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentLink")
            .field("id", &self.id)
            .field("link_id", &self.link_id)
            .field("peer", &self.peer)
            .field("node_name", &self.node_name)
            .field("active", &self.active_streams())
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl AgentLink {
    pub(crate) fn new(
        id: String,
        link_id: u64,
        peer: SocketAddr,
        node_name: Option<String>,
        identifiers: Identifiers,
        verified: Option<Verified>,
        carrier: Carrier,
    ) -> Self {
        AgentLink {
            id,
            link_id,
            peer,
            node_name,
            verified,
            linked_at: Instant::now(),
            linked_since: SystemTime::now(),
            identifiers: RwLock::new(identifiers),
            carrier,
            active: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            bytes_to_agent: AtomicU64::new(0),
            bytes_from_agent: AtomicU64::new(0),
            keepalive_rtt_us: AtomicU64::new(NO_RTT),
            closer: CancellationToken::new(),
        }
    }

    /// What the agent routes now.
    pub fn identifiers(&self) -> Identifiers {
        self.routes().clone()
    }

    /// Replaces what the agent routes; false when nothing changed. Through
    /// [`Registry::replace_identifiers`], which keeps its index in step.
    fn replace_identifiers(&self, identifiers: Identifiers) -> bool {
        let mut routes = self.identifiers.write().unwrap_or_else(|e| e.into_inner());
        if *routes == identifiers {
            return false;
        }
        *routes = identifiers;
        true
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Identifiers> {
        self.identifiers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Tunneled connections currently on this link.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether the agent is going away.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops routing new dials to this agent.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Counts `n` bytes carried towards the agent.
    pub(crate) fn count_to_agent(&self, n: u64) {
        self.bytes_to_agent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` bytes carried from the agent.
    pub(crate) fn count_from_agent(&self, n: u64) {
        self.bytes_from_agent.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes carried so far: towards the agent, and from it.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_to_agent.load(Ordering::Relaxed),
            self.bytes_from_agent.load(Ordering::Relaxed),
        )
    }

    /// Records the round trip of an answered keepalive PING.
    pub(crate) fn record_keepalive_rtt(&self, rtt: Duration) {
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(NO_RTT - 1);
        self.keepalive_rtt_us.store(micros, Ordering::Relaxed);
    }

    /// The round trip of the last answered keepalive PING, if any was.
    pub fn keepalive_rtt(&self) -> Option<Duration> {
        match self.keepalive_rtt_us.load(Ordering::Relaxed) {
            NO_RTT => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// Whether the agent speaks the upstream konnectivity protocol.
    pub fn is_konnectivity(&self) -> bool {
        matches!(self.carrier, Carrier::Konnectivity(_))
    }

    /// Whether the agent has sent GOAWAY (it is shutting down). Does not wait.
    pub fn goaway_received(&self) -> bool {
        let Carrier::Native(sender) = &self.carrier else {
            return false;
        };
        let mut sender = sender.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(
            sender.poll_ready(&mut cx),
            std::task::Poll::Ready(Err(err)) if err.is_go_away() && err.is_remote()
        )
    }

    fn serves_node(&self, host: &Host) -> bool {
        match host {
            Host::Name(name) => self
                .node_name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(name)),
            Host::Ip(ip) => self.routes().host_ips.contains(ip),
        }
    }

    fn serves_cidr(&self, target: &Target) -> bool {
        target
            .ip()
            .is_some_and(|ip| self.routes().pod_cidrs.iter().any(|c| c.contains(&ip)))
    }
}

/// Counts a tunneled connection against its link for as long as it lives.
#[derive(Debug)]
pub struct StreamGuard(Arc<AgentLink>);

impl StreamGuard {
    fn new(link: Arc<AgentLink>) -> Self {
        link.active.fetch_add(1, Ordering::Relaxed);
        StreamGuard(link)
    }

    /// The link carrying the connection.
    pub fn link(&self) -> &Arc<AgentLink> {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All agents linked to this server.
///
/// An agent may hold more than one link to a server for a while: an agent that dials through a
/// load balancer until it reached every server lands on one it already has, and closes one of
/// the two itself (a native agent drains the older with GOAWAY, a konnectivity agent closes
/// the newer); an agent that restarted links again before its old link is found dead. So links
/// of one agent from one address coexist, and new dials go to its newest link that is not
/// draining.
///
/// A link claiming an agent id that is linked from another address is refused: it is another
/// party (a second node configured with the same id, or someone holding the agent certificate),
/// and letting it in would hand it every new dial meant for that agent, kubelet exec sessions
/// included. It is let in once the first link ended (closed, or found dead by the keepalive).
#[derive(Debug, Default)]
pub struct Registry {
    state: RwLock<State>,
    next_link_id: AtomicU64,
    /// Woken whenever a link joins or what a link routes changes.
    linked: tokio::sync::Notify,
}

/// The links of each agent id, and the index that finds them by what they route.
#[derive(Debug, Default)]
struct State {
    agents: HashMap<String, Vec<Arc<AgentLink>>>,
    index: Index,
    departed: Departed,
}

/// When the last link of each node name and host IP closed: dials for that node may wait a
/// while for its agent to link again ([`Registry::await_node_agent`]). A server that has just
/// started also files here the nodes it learns of that have no agent linked yet
/// ([`Registry::expect_node`]), as gone when it started: it never saw their agents go, and an
/// agent being replaced then links to it only once its new pod runs. Forgotten when a link of
/// the node joins, or after [`DEPARTED_MEMORY`].
#[derive(Debug, Default)]
struct Departed {
    names: HashMap<String, Instant>,
    ips: HashMap<IpAddr, Instant>,
}

/// How long a departed node is remembered at most, whatever `--node-agent-grace` says; keeps
/// the record of nodes gone for good small.
const DEPARTED_MEMORY: Duration = Duration::from_secs(600);

impl Departed {
    fn record(&mut self, link: &AgentLink, at: Instant) {
        if let Some(name) = &link.node_name {
            self.names.insert(name.to_ascii_lowercase(), at);
        }
        for ip in &link.routes().host_ips {
            self.ips.insert(*ip, at);
        }
        self.names
            .retain(|_, t| at.duration_since(*t) < DEPARTED_MEMORY);
        self.ips
            .retain(|_, t| at.duration_since(*t) < DEPARTED_MEMORY);
    }

    /// Files node `name` with `host_ips` as gone at `since`, unless a later departure is
    /// filed.
    fn expect(&mut self, name: &str, host_ips: &[IpAddr], since: Instant) {
        let later = |t: &mut Instant| *t = (*t).max(since);
        self.names
            .entry(name.to_ascii_lowercase())
            .and_modify(later)
            .or_insert(since);
        for ip in host_ips {
            self.ips.entry(*ip).and_modify(later).or_insert(since);
        }
    }

    fn forget(&mut self, link: &AgentLink) {
        if let Some(name) = &link.node_name {
            self.names.remove(&name.to_ascii_lowercase());
        }
        for ip in &link.routes().host_ips {
            self.ips.remove(ip);
        }
    }

    fn since(&self, host: &Host) -> Option<Instant> {
        match host {
            Host::Name(name) => self.names.get(&name.to_ascii_lowercase()).copied(),
            Host::Ip(ip) => self.ips.get(ip).copied(),
        }
    }
}

/// Agent ids by the node names, host IPs and pod ranges of any of their links.
///
/// A server of a large cluster routes every dial among thousands of agents; walking them all
/// for each dial made routing cost grow with the cluster. Lookups here cost the same for 10
/// agents or 10 000, except `any`, which must compare every agent's load. An entry only
/// proposes an agent: the route still checks the chosen link itself, so the index never has
/// to know which of an agent's links is draining.
#[derive(Debug, Default)]
struct Index {
    /// By node name, lowercased (DNS names compare without case).
    names: HashMap<String, HashSet<String>>,
    ips: HashMap<IpAddr, HashSet<String>>,
    /// By prefix length, then by network: a destination is looked up once per length in use.
    cidrs: BTreeMap<u8, HashMap<IpNet, HashSet<String>>>,
    default_routes: HashSet<String>,
    /// What each agent id is filed under, to take it out again.
    keys: HashMap<String, Vec<Key>>,
}

/// Where an agent id is filed in the [`Index`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Name(String),
    Ip(IpAddr),
    Cidr(IpNet),
    DefaultRoute,
}

impl Index {
    /// Files agent `id` under what its `links` route now, in place of what it was filed under.
    fn update(&mut self, id: &str, links: &[Arc<AgentLink>]) {
        for key in self.keys.remove(id).unwrap_or_default() {
            match &key {
                Key::Name(name) => unfile(&mut self.names, name, id),
                Key::Ip(ip) => unfile(&mut self.ips, ip, id),
                Key::Cidr(net) => {
                    let len = net.prefix_len();
                    if let Some(nets) = self.cidrs.get_mut(&len) {
                        unfile(nets, net, id);
                        if nets.is_empty() {
                            self.cidrs.remove(&len);
                        }
                    }
                }
                Key::DefaultRoute => {
                    self.default_routes.remove(id);
                }
            }
        }
        let mut keys = Vec::new();
        for link in links {
            if let Some(name) = &link.node_name {
                keys.push(Key::Name(name.to_ascii_lowercase()));
            }
            let routes = link.routes();
            keys.extend(routes.host_ips.iter().copied().map(Key::Ip));
            keys.extend(routes.pod_cidrs.iter().map(|c| Key::Cidr(c.trunc())));
            if routes.default_route {
                keys.push(Key::DefaultRoute);
            }
        }
        if keys.is_empty() {
            return;
        }
        for key in &keys {
            let id = id.to_owned();
            match key {
                Key::Name(name) => self.names.entry(name.clone()).or_default().insert(id),
                Key::Ip(ip) => self.ips.entry(*ip).or_default().insert(id),
                Key::Cidr(net) => self
                    .cidrs
                    .entry(net.prefix_len())
                    .or_default()
                    .entry(*net)
                    .or_default()
                    .insert(id),
                Key::DefaultRoute => self.default_routes.insert(id),
            };
        }
        self.keys.insert(id.to_owned(), keys);
    }

    /// Agents that may be `host`'s node.
    fn node(&self, host: &Host) -> impl Iterator<Item = &String> {
        let ids = match host {
            Host::Name(name) => self.names.get(&name.to_ascii_lowercase()),
            Host::Ip(ip) => self.ips.get(ip),
        };
        ids.into_iter().flatten()
    }

    /// Agents with a pod range that may hold `ip`.
    fn cidr(&self, ip: IpAddr) -> impl Iterator<Item = &String> {
        self.cidrs
            .iter()
            .filter_map(move |(&len, nets)| nets.get(&IpNet::new(ip, len).ok()?.trunc()))
            .flatten()
    }
}

/// Takes `id` out of the set filed under `key`, dropping the set once empty.
fn unfile<K: Eq + std::hash::Hash>(map: &mut HashMap<K, HashSet<String>>, key: &K, id: &str) {
    if let Some(ids) = map.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            map.remove(key);
        }
    }
}

/// A link refused because its agent id is held by another agent: linked from another address
/// or, when agents are verified, by another node's identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent id {id:?} is already linked from {linked_from}{}; a link from another address is \
     accepted once that one ends",
    held_by.as_ref().map(|v| format!(" by {v}")).unwrap_or_default()
)]
pub struct DuplicateAgent {
    /// The contested agent id.
    pub id: String,
    /// Where the agent's existing link comes from.
    pub linked_from: SocketAddr,
    /// Who holds the id, when verified (node and pod).
    pub held_by: Option<String>,
}

/// Checks that a new link of `id` from `peer`, verified as `verified`, may join `links`: two
/// verified links of one id must be the same node's; otherwise they must come from one address.
fn check_peer(
    id: &str,
    links: &[Arc<AgentLink>],
    peer: IpAddr,
    verified: Option<&Verified>,
) -> Result<(), DuplicateAgent> {
    let conflict = links.iter().find(|l| match (verified, &l.verified) {
        (Some(new), Some(held)) => new.node != held.node,
        _ => l.peer.ip() != peer,
    });
    match conflict {
        Some(other) => Err(DuplicateAgent {
            id: id.to_owned(),
            linked_from: other.peer,
            held_by: other.verified.as_ref().map(ToString::to_string),
        }),
        None => Ok(()),
    }
}

/// How a dial's wait for its node's agent ended ([`Registry::await_node_agent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeWait {
    /// A link of the node takes dials now.
    Linked,
    /// The grace ran out first; the dial routes as usual.
    Expired,
}

impl NodeWait {
    /// Name used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeWait::Linked => "linked",
            NodeWait::Expired => "expired",
        }
    }
}

/// The agent chosen for a dial and the strategy that chose it.
#[derive(Debug)]
pub struct Route {
    /// Holds the chosen link's stream count.
    pub guard: StreamGuard,
    /// Which strategy matched.
    pub strategy: Strategy,
}

impl Registry {
    /// A fresh id for a new link.
    pub fn next_link_id(&self) -> u64 {
        self.next_link_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Checks that a link of agent `id` from `peer`, verified as `verified`, may join (see
    /// [`Registry`]).
    pub fn admissible(
        &self,
        id: &str,
        peer: IpAddr,
        verified: Option<&Verified>,
    ) -> Result<(), DuplicateAgent> {
        match self.read().agents.get(id) {
            Some(links) => check_peer(id, links, peer, verified),
            None => Ok(()),
        }
    }

    /// Adds a link; returns how many links the agent now has. A link whose agent id is held
    /// from another address is refused.
    pub fn insert(&self, link: Arc<AgentLink>) -> Result<usize, DuplicateAgent> {
        let mut state = self.write();
        let State {
            agents,
            index,
            departed,
        } = &mut *state;
        let links = agents.entry(link.id.clone()).or_default();
        check_peer(&link.id, links, link.peer.ip(), link.verified.as_ref())?;
        links.push(link.clone());
        index.update(&link.id, links);
        departed.forget(&link);
        let count = links.len();
        drop(state);
        self.linked.notify_waiters();
        Ok(count)
    }

    /// Replaces what `link` routes (its Node changed) and refiles it; false when nothing
    /// changed.
    pub(crate) fn replace_identifiers(&self, link: &AgentLink, identifiers: Identifiers) -> bool {
        let mut state = self.write();
        if !link.replace_identifiers(identifiers) {
            return false;
        }
        let State { agents, index, .. } = &mut *state;
        if let Some(links) = agents.get(&link.id) {
            index.update(&link.id, links);
        }
        drop(state);
        self.linked.notify_waiters();
        true
    }

    /// Removes the link `link_id` of agent `id`; false when it was already gone.
    pub fn remove(&self, id: &str, link_id: u64) -> bool {
        let mut state = self.write();
        let State {
            agents,
            index,
            departed,
        } = &mut *state;
        let Some(links) = agents.get_mut(id) else {
            return false;
        };
        let before = links.len();
        let gone: Vec<Arc<AgentLink>> = links
            .iter()
            .filter(|l| l.link_id == link_id)
            .cloned()
            .collect();
        links.retain(|l| l.link_id != link_id);
        let removed = links.len() < before;
        index.update(id, links);
        if links.is_empty() {
            agents.remove(id);
            let now = Instant::now();
            for link in &gone {
                departed.record(link, now);
            }
        }
        removed
    }

    /// Records that node `name`, with host IPs `host_ips`, should have an agent: unless a link
    /// of the node is up, dials for it wait for one as if its agent had gone at `since`
    /// ([`Self::await_node_agent`]). A server that has just started calls it for every Node it
    /// learns of, with its start as `since`: an agent being replaced while the server started
    /// never linked to it, and its node's dials must wait for the new agent as they do on the
    /// servers that saw the old one go. Returns whether the node was filed.
    pub fn expect_node(&self, name: &str, host_ips: &[IpAddr], since: Instant) -> bool {
        let mut state = self.write();
        let State {
            agents,
            index,
            departed,
        } = &mut *state;
        let host = Host::Name(name.to_owned());
        let linked = index
            .node(&host)
            .filter_map(|id| agents.get(id))
            .flatten()
            .any(|link| link.serves_node(&host));
        if linked {
            return false;
        }
        departed.expect(name, host_ips, since);
        true
    }

    /// Number of linked agents.
    pub fn len(&self) -> usize {
        self.read().agents.len()
    }

    /// Whether no agent is linked.
    pub fn is_empty(&self) -> bool {
        self.read().agents.is_empty()
    }

    /// Snapshot of the linked agents, one link each (the one new dials go to).
    pub fn agents(&self) -> Vec<Arc<AgentLink>> {
        self.read()
            .agents
            .values()
            .filter_map(|links| preferred(links).or_else(|| links.last()).cloned())
            .collect()
    }

    /// The links of at most `count` agents whose ids come after `after` (from the first when
    /// `None`), by agent id, each agent's oldest first.
    pub fn links_after(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> Vec<(String, Vec<Arc<AgentLink>>)> {
        let state = self.read();
        let mut agents: Vec<(&String, &Vec<Arc<AgentLink>>)> = state
            .agents
            .iter()
            .filter(|(id, _)| after.is_none_or(|after| id.as_str() > after))
            .collect();
        agents.sort_unstable_by(|a, b| a.0.cmp(b.0));
        agents
            .into_iter()
            .take(count)
            .map(|(id, links)| (id.clone(), links.clone()))
            .collect()
    }

    /// The first host IP the agent of node `name` announces (its Node's first address when
    /// verified), if an agent of that node is linked.
    pub fn node_address(&self, name: &str) -> Option<IpAddr> {
        let state = self.read();
        let host = Host::Name(name.to_owned());
        state
            .index
            .node(&host)
            .filter_map(|id| state.agents.get(id).and_then(|links| preferred(links)))
            .filter(|link| link.serves_node(&host))
            .find_map(|link| link.routes().host_ips.first().copied())
    }

    /// Of `links`, all of one agent, the one new dials take.
    pub fn preferred_link(links: &[Arc<AgentLink>]) -> Option<&Arc<AgentLink>> {
        preferred(links)
    }

    /// Closes every link.
    pub fn close_all(&self) {
        for link in self.read().agents.values().flatten() {
            link.closer.cancel();
        }
    }

    /// Picks the agent for `target` by walking the strategy chain.
    pub fn route(&self, target: &Target, chain: &[Strategy]) -> Result<Route, DialFailure> {
        let (link, strategy) = self.choose(target, chain)?;
        Ok(Route {
            guard: StreamGuard::new(link),
            strategy,
        })
    }

    /// With `grace`, waits while `target` is a node whose agent has just gone and no link of
    /// the node takes dials: until one does (a replaced agent pod linked again), or `grace`
    /// after the agent went (its last link closed, or now while it is draining; for a node
    /// filed by [`Self::expect_node`], its `since`). Returns `None` at once when the chain has
    /// no `node` strategy, the node strategy routes, or nothing says the node had an agent;
    /// else how the wait ended. The dial then routes as usual.
    pub async fn await_node_agent(
        &self,
        target: &Target,
        chain: &[Strategy],
        grace: Duration,
    ) -> Option<NodeWait> {
        if grace.is_zero() || !chain.contains(&Strategy::Node) {
            return None;
        }
        let started = tokio::time::Instant::now();
        let mut waited = None;
        loop {
            // Registered before looking, so that a link joining in between still wakes us.
            let linked = self.linked.notified();
            tokio::pin!(linked);
            linked.as_mut().enable();
            let Some(gone) = self.node_agent_gone(&target.host) else {
                return waited.map(|_| {
                    tracing::info!(
                        node = %target.host,
                        %target,
                        waited = ?started.elapsed(),
                        "the node's agent linked: the held dial goes on"
                    );
                    NodeWait::Linked
                });
            };
            // A draining agent says "gone now" at every look: the wait still ends `grace`
            // after it began.
            let until = (tokio::time::Instant::from_std(gone) + grace).min(started + grace);
            if tokio::time::Instant::now() >= until {
                return waited.map(|()| NodeWait::Expired);
            }
            if waited.is_none() {
                tracing::info!(
                    node = %target.host,
                    %target,
                    up_to = ?until.saturating_duration_since(started),
                    "no agent of the node takes dials, as its agent has just gone or not linked \
                     yet: holding the dial until one links"
                );
                waited = Some(());
            }
            tokio::select! {
                () = &mut linked => {}
                () = tokio::time::sleep_until(until) => {
                    tracing::warn!(
                        node = %target.host,
                        %target,
                        waited = ?started.elapsed(),
                        "no agent of the node linked in time: the held dial routes as usual"
                    );
                    return Some(NodeWait::Expired);
                }
            }
        }
    }

    /// When the agent of `host`'s node went away, if it did and no link of the node takes
    /// dials now: the time its last link closed, or now while its only links are draining.
    fn node_agent_gone(&self, host: &Host) -> Option<Instant> {
        let state = self.read();
        let State {
            agents,
            index,
            departed,
        } = &*state;
        let mut draining = false;
        for links in index.node(host).filter_map(|id| agents.get(id)) {
            for link in links.iter().filter(|l| l.serves_node(host)) {
                if !link.is_draining() {
                    return None;
                }
                draining = true;
            }
        }
        if draining {
            return Some(Instant::now());
        }
        departed.since(host)
    }

    /// The link [`Self::route`] would pick for `target` now, and the strategy that picks it,
    /// without counting a stream on it.
    pub fn choose(
        &self,
        target: &Target,
        chain: &[Strategy],
    ) -> Result<(Arc<AgentLink>, Strategy), DialFailure> {
        let state = self.read();
        let State { agents, index, .. } = &*state;
        let link_of = |id: &String| agents.get(id).and_then(|links| preferred(links));
        for &strategy in chain {
            let chosen = match strategy {
                Strategy::Node => least_loaded(
                    index
                        .node(&target.host)
                        .filter_map(link_of)
                        .filter(|l| l.serves_node(&target.host)),
                ),
                Strategy::Cidr => match target.ip() {
                    Some(ip) => least_loaded(
                        index
                            .cidr(ip)
                            .filter_map(link_of)
                            .filter(|l| l.serves_cidr(target)),
                    ),
                    None => None,
                },
                Strategy::DefaultRoute => least_loaded(
                    index
                        .default_routes
                        .iter()
                        .filter_map(link_of)
                        .filter(|l| l.routes().default_route),
                ),
                Strategy::Any => least_loaded(agents.values().filter_map(|links| preferred(links))),
            };
            if let Some(link) = chosen {
                return Ok((link.clone(), strategy));
            }
        }
        Err(DialFailure::NoAgent(if agents.is_empty() {
            "no agent is linked to this server".to_owned()
        } else {
            let chain: Vec<_> = chain.iter().map(|s| s.as_str()).collect();
            format!(
                "no linked agent serves {} (strategies: {})",
                target.host,
                chain.join(",")
            )
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the state inconsistent: no critical
        // section calls anything that panics between its map and index updates.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The link of an agent that takes new dials: its newest one that is not draining.
fn preferred(links: &[Arc<AgentLink>]) -> Option<&Arc<AgentLink>> {
    links.iter().rev().find(|l| !l.is_draining())
}

fn least_loaded<'a>(links: impl Iterator<Item = &'a Arc<AgentLink>>) -> Option<&'a Arc<AgentLink>> {
    links.min_by_key(|l| (l.active_streams(), l.link_id))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A link backed by a real HTTP/2 connection over an in-memory pipe.
    pub(crate) async fn link(
        registry: &Registry,
        id: &str,
        node: &str,
        ip: &str,
        cidr: &str,
    ) -> Arc<AgentLink> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = h2::server::handshake::<_>(server_io).await {
                while conn.accept().await.is_some() {}
            }
        });
        let (sender, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let link = Arc::new(AgentLink::new(
            id.into(),
            registry.next_link_id(),
            PEER,
            Some(node.into()),
            Identifiers {
                host_ips: vec![ip.parse().unwrap()],
                pod_cidrs: vec![cidr.parse().unwrap()],
                default_route: false,
            },
            None,
            Carrier::Native(sender),
        ));
        registry.insert(link.clone()).unwrap();
        link
    }

    /// Where the test links come from.
    const PEER: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        40000,
    );

    fn target(s: &str) -> Target {
        s.parse().unwrap()
    }

    const CHAIN: [Strategy; 3] = [Strategy::Node, Strategy::Cidr, Strategy::Any];

    #[tokio::test]
    async fn dials_go_to_the_node_by_name_ip_or_pod_cidr() {
        let registry = Registry::default();
        link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        link(&registry, "b", "node-b", "10.0.0.2", "10.244.2.0/24").await;
        for (dest, agent, strategy) in [
            ("node-b:10250", "b", Strategy::Node),
            ("NODE-A:10250", "a", Strategy::Node),
            ("10.0.0.2:10250", "b", Strategy::Node),
            ("10.244.1.7:8080", "a", Strategy::Cidr),
            ("10.244.2.9:8080", "b", Strategy::Cidr),
        ] {
            let route = registry.route(&target(dest), &CHAIN).unwrap();
            assert_eq!(route.guard.link().id, agent, "{dest}");
            assert_eq!(route.strategy, strategy, "{dest}");
        }
    }

    #[tokio::test]
    async fn any_picks_the_least_loaded_and_skips_draining_agents() {
        let registry = Registry::default();
        let a = link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        link(&registry, "b", "node-b", "10.0.0.2", "10.244.2.0/24").await;
        let first = registry.route(&target("192.168.9.9:443"), &CHAIN).unwrap();
        let second = registry.route(&target("192.168.9.9:443"), &CHAIN).unwrap();
        assert_ne!(
            first.guard.link().id,
            second.guard.link().id,
            "load spreads"
        );
        drop((first, second));
        a.mark_draining();
        for _ in 0..3 {
            let route = registry.route(&target("node-a:10250"), &CHAIN).unwrap();
            assert_eq!(
                route.guard.link().id,
                "b",
                "a draining agent takes no new dials"
            );
            assert_eq!(route.strategy, Strategy::Any);
        }
    }

    #[tokio::test]
    async fn default_route_picks_only_agents_that_offer_it() {
        let registry = Registry::default();
        link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        let b = link(&registry, "b", "node-b", "10.0.0.2", "10.244.2.0/24").await;
        let chain = [Strategy::Node, Strategy::DefaultRoute];
        assert!(registry.route(&target("192.168.9.9:443"), &chain).is_err());
        registry.remove("b", b.link_id);
        let gateway = Arc::new(AgentLink::new(
            "b".into(),
            registry.next_link_id(),
            PEER,
            Some("node-b".into()),
            Identifiers {
                default_route: true,
                ..b.identifiers()
            },
            None,
            b.carrier.clone(),
        ));
        registry.insert(gateway).unwrap();
        for _ in 0..3 {
            let route = registry.route(&target("192.168.9.9:443"), &chain).unwrap();
            assert_eq!(route.guard.link().id, "b");
            assert_eq!(route.strategy, Strategy::DefaultRoute);
        }
        assert_eq!(
            parse_strategies("node,default-route,any").unwrap(),
            vec![Strategy::Node, Strategy::DefaultRoute, Strategy::Any]
        );
    }

    #[tokio::test]
    async fn without_any_an_unknown_node_fails_naming_it() {
        let registry = Registry::default();
        link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        let err = registry
            .route(&target("node-z:10250"), &[Strategy::Node, Strategy::Cidr])
            .unwrap_err();
        assert_eq!(err.status().as_u16(), 503);
        assert!(err.to_string().contains("node-z"), "{err}");
    }

    #[tokio::test]
    async fn an_agent_linked_twice_keeps_both_links_until_it_closes_one() {
        let registry = Registry::default();
        let mux = || {
            let (tx, _rx) = tokio::sync::mpsc::channel(1);
            Carrier::Konnectivity(Mux::new(cplink_proto::konnectivity::mux::Role::Dialer, tx))
        };
        let konnectivity = |registry: &Registry| {
            Arc::new(AgentLink::new(
                "k".into(),
                registry.next_link_id(),
                PEER,
                None,
                Identifiers::default(),
                None,
                mux(),
            ))
        };
        let first = konnectivity(&registry);
        let second = konnectivity(&registry);
        assert_eq!(registry.insert(first.clone()), Ok(1));
        assert_eq!(
            registry.insert(second.clone()),
            Ok(2),
            "nothing is replaced"
        );
        assert_eq!(registry.len(), 1);
        let route = registry.route(&target("10.1.1.1:80"), &CHAIN).unwrap();
        assert_eq!(
            route.guard.link().link_id,
            second.link_id,
            "the newest link is used"
        );
        drop(route);
        second.mark_draining();
        let route = registry.route(&target("10.1.1.1:80"), &CHAIN).unwrap();
        assert_eq!(
            route.guard.link().link_id,
            first.link_id,
            "unless it is draining"
        );
        drop(route);
        // The agent closes one link; the other carries on.
        assert!(registry.remove("k", second.link_id));
        assert_eq!(registry.len(), 1);
        assert!(registry.remove("k", first.link_id));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_thousand_agents_are_each_found_by_name_ip_and_pod_range() {
        let registry = Registry::default();
        for i in 0..1000u32 {
            let (hi, lo) = (i / 256, i % 256);
            link(
                &registry,
                &format!("n{i}"),
                &format!("node-{i}"),
                &format!("10.1.{hi}.{lo}"),
                &format!("10.{}.{lo}.0/24", 100 + hi),
            )
            .await;
        }
        // A wider range overlapping nodes 768 to 999: both are candidates, the less loaded
        // wins; past them it is the only one.
        let wide = link(&registry, "wide", "node-wide", "10.9.9.9", "10.103.0.0/16").await;
        let _busy = StreamGuard::new(wide.clone());
        for i in [0u32, 1, 255, 256, 517, 900, 999] {
            let (hi, lo) = (i / 256, i % 256);
            let id = format!("n{i}");
            for (dest, strategy) in [
                (format!("node-{i}:10250"), Strategy::Node),
                (format!("10.1.{hi}.{lo}:10250"), Strategy::Node),
                (format!("10.{}.{lo}.33:80", 100 + hi), Strategy::Cidr),
            ] {
                let route = registry.route(&target(&dest), &CHAIN).unwrap();
                assert_eq!(
                    (route.guard.link().id.as_str(), route.strategy),
                    (id.as_str(), strategy),
                    "{dest}"
                );
            }
        }
        let outside = registry.route(&target("10.103.240.1:80"), &CHAIN).unwrap();
        assert_eq!(
            (outside.guard.link().id.as_str(), outside.strategy),
            ("wide", Strategy::Cidr)
        );
    }

    #[tokio::test]
    async fn routes_follow_changed_identifiers_and_leave_with_the_last_link() {
        let registry = Registry::default();
        let a = link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        link(&registry, "b", "node-b", "10.0.0.2", "10.244.2.0/24").await;
        let moved = Identifiers {
            host_ips: vec!["10.0.0.9".parse().unwrap()],
            pod_cidrs: vec!["10.244.9.0/24".parse().unwrap()],
            default_route: false,
        };
        assert!(registry.replace_identifiers(&a, moved.clone()));
        assert!(!registry.replace_identifiers(&a, moved));
        let only_node_b = [Strategy::Node, Strategy::Cidr];
        for old in ["10.0.0.1:10250", "10.244.1.7:80"] {
            assert!(registry.route(&target(old), &only_node_b).is_err(), "{old}");
        }
        for new in ["10.0.0.9:10250", "10.244.9.7:80", "node-a:10250"] {
            let route = registry.route(&target(new), &only_node_b).unwrap();
            assert_eq!(route.guard.link().id, "a", "{new}");
        }
        registry.remove("a", a.link_id);
        assert!(
            registry
                .route(&target("node-a:10250"), &only_node_b)
                .is_err()
        );
        registry.remove("b", 2);
        let state = registry.read();
        assert!(state.agents.is_empty());
        let index = &state.index;
        assert!(index.names.is_empty() && index.ips.is_empty() && index.cidrs.is_empty());
        assert!(index.keys.is_empty() && index.default_routes.is_empty());
    }

    #[tokio::test]
    async fn a_native_agent_linked_again_is_routed_through_its_new_link() {
        let registry = Registry::default();
        let old = link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        let new = link(&registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        assert_eq!(registry.len(), 1);
        let route = registry.route(&target("node-a:10250"), &CHAIN).unwrap();
        assert_eq!(route.guard.link().link_id, new.link_id);
        drop(route);
        // The old link ends (the agent drained it, or the keepalive found it dead).
        assert!(registry.remove("a", old.link_id));
        assert!(!registry.remove("a", old.link_id), "removed once");
        assert_eq!(registry.len(), 1);
        assert!(registry.remove("a", new.link_id));
        assert!(registry.is_empty());
    }

    #[test]
    fn strategy_chains_parse_strictly() {
        assert_eq!(parse_strategies("node,cidr,any").unwrap(), CHAIN.to_vec());
        assert!(parse_strategies("").is_err());
        assert!(parse_strategies("node,node").is_err());
        assert!(parse_strategies("random").is_err());
    }

    #[tokio::test]
    async fn an_agent_id_linked_from_another_address_is_refused_until_the_first_link_ends() {
        let registry = Registry::default();
        let first = link(&registry, "node-1", "node-1", "10.0.0.1", "10.244.1.0/24").await;
        let intruder: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        let claim = Arc::new(AgentLink::new(
            "node-1".into(),
            registry.next_link_id(),
            intruder,
            Some("node-1".into()),
            first.identifiers(),
            None,
            first.carrier.clone(),
        ));
        let refused = registry.insert(claim.clone()).unwrap_err();
        assert_eq!(refused.linked_from, PEER);
        assert!(refused.to_string().contains("192.0.2.1:40000"), "{refused}");
        assert_eq!(
            registry.admissible("node-1", intruder.ip(), None),
            Err(refused.clone())
        );
        // Every dial for node-1 still reaches the first link.
        let route = registry.route(&target("node-1:10250"), &CHAIN).unwrap();
        assert_eq!(route.guard.link().link_id, first.link_id);
        drop(route);
        // The same address may link again (a restart, a balancer landing twice).
        assert!(registry.admissible("node-1", PEER.ip(), None).is_ok());
        // Once the first link is gone, the newcomer is let in.
        registry.remove("node-1", first.link_id);
        assert_eq!(registry.insert(claim), Ok(1));
    }

    #[tokio::test]
    async fn verified_links_of_one_id_must_be_one_node_wherever_they_come_from() {
        let registry = Registry::default();
        let first = link(&registry, "spare", "node-1", "10.0.0.1", "10.244.1.0/24").await;
        let verified = |node: &str, uid: &str| Verified {
            node: node.into(),
            pod: Some(crate::identity::PodRef {
                namespace: "cplink".into(),
                name: format!("agent-{uid}"),
                uid: uid.into(),
            }),
        };
        let bound = |peer: &str, who: Verified| {
            Arc::new(AgentLink::new(
                "node-1".into(),
                registry.next_link_id(),
                peer.parse().unwrap(),
                Some("node-1".into()),
                first.identifiers(),
                Some(who),
                first.carrier.clone(),
            ))
        };
        let old_pod = bound("192.0.2.1:40000", verified("node-1", "a"));
        assert_eq!(registry.insert(old_pod.clone()), Ok(1));
        // The node's next agent pod, from another pod address: the same identity relinks.
        let new_pod = verified("node-1", "b");
        assert!(
            registry
                .admissible("node-1", "192.0.2.9".parse().unwrap(), Some(&new_pod))
                .is_ok()
        );
        assert_eq!(registry.insert(bound("192.0.2.9:40000", new_pod)), Ok(2));
        // Another node's identity under this id, even from the first link's address: refused,
        // naming who holds it.
        let refused = registry
            .admissible(
                "node-1",
                "192.0.2.1".parse().unwrap(),
                Some(&verified("node-2", "c")),
            )
            .unwrap_err();
        assert_eq!(
            refused.held_by.as_deref(),
            Some("node node-1 (pod cplink/agent-a, uid a)")
        );
        assert!(
            refused.to_string().contains("pod cplink/agent-a"),
            "{refused}"
        );
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_dial_for_a_node_whose_agent_just_left_waits_for_it_to_link_again() {
        let registry = Arc::new(Registry::default());
        let _other = link(&registry, "b", "node-b", "10.0.0.2", "10.2.0.0/24").await;
        let old = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
        assert!(registry.remove("a", old.link_id));

        let waiter = {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let wait = registry
                    .await_node_agent(&target("10.0.0.1:10250"), &CHAIN, GRACE)
                    .await;
                assert_eq!(wait, Some(NodeWait::Linked));
                registry.route(&target("10.0.0.1:10250"), &CHAIN)
            })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "the dial waits rather than going to node-b's agent"
        );

        let new = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
        let route = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the new link ends the wait")
            .expect("joined")
            .expect("routed");
        assert_eq!(route.strategy, Strategy::Node);
        assert_eq!(route.guard.link().link_id, new.link_id);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_node_agent_ends_after_the_grace() {
        let registry = Registry::default();
        let _other = link(&registry, "b", "node-b", "10.0.0.2", "10.2.0.0/24").await;
        let old = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
        registry.remove("a", old.link_id);
        let started = tokio::time::Instant::now();
        let wait = registry
            .await_node_agent(&target("node-a:10250"), &CHAIN, GRACE)
            .await;
        assert_eq!(wait, Some(NodeWait::Expired));
        let waited = started.elapsed();
        assert!(
            waited <= GRACE && waited > GRACE - Duration::from_secs(1),
            "{waited:?}"
        );
        let route = registry.route(&target("node-a:10250"), &CHAIN).unwrap();
        assert_eq!(route.strategy, Strategy::Any, "then the chain goes on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_agent_holds_its_nodes_dials_for_the_grace_at_most() {
        let registry = Registry::default();
        let _other = link(&registry, "b", "node-b", "10.0.0.2", "10.2.0.0/24").await;
        let draining = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
        draining.mark_draining();
        let started = tokio::time::Instant::now();
        registry
            .await_node_agent(&target("10.0.0.1:10250"), &CHAIN, GRACE)
            .await;
        assert_eq!(started.elapsed(), GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn dials_route_at_once_without_a_grace_a_node_strategy_or_a_departed_agent() {
        let registry = Registry::default();
        let present = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
        let gone = link(&registry, "c", "node-c", "10.0.0.3", "10.3.0.0/24").await;
        registry.remove("c", gone.link_id);
        let started = tokio::time::Instant::now();
        for (dest, chain, grace) in [
            ("10.0.0.1:10250", &CHAIN[..], GRACE),
            ("10.0.0.9:10250", &CHAIN[..], GRACE),
            ("10.0.0.3:10250", &CHAIN[..], Duration::ZERO),
            (
                "10.0.0.3:10250",
                &[Strategy::Cidr, Strategy::Any][..],
                GRACE,
            ),
        ] {
            let wait = registry.await_node_agent(&target(dest), chain, grace).await;
            assert_eq!(wait, None, "{dest}");
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(present);
    }

    #[tokio::test]
    async fn a_fresh_server_holds_the_dials_of_a_node_it_knows_until_its_agent_links() {
        let registry = Arc::new(Registry::default());
        let _other = link(&registry, "b", "node-b", "10.0.0.2", "10.2.0.0/24").await;
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(registry.expect_node("Node-A", &[ip], Instant::now()));
        for dest in ["10.0.0.1:10250", "node-a:10250"] {
            let waiter = {
                let registry = Arc::clone(&registry);
                let dest = target(dest);
                tokio::spawn(async move {
                    let wait = registry.await_node_agent(&dest, &CHAIN, GRACE).await;
                    (wait, registry.route(&dest, &CHAIN))
                })
            };
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(
                !waiter.is_finished(),
                "{dest}: the dial waits rather than going to node-b's agent"
            );
            let new = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
            let (wait, route) = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the agent's link ends the wait")
                .expect("joined");
            assert_eq!(wait, Some(NodeWait::Linked), "{dest}");
            let route = route.expect("routed");
            assert_eq!(route.strategy, Strategy::Node);
            assert_eq!(route.guard.link().link_id, new.link_id);
            drop(route);
            registry.remove("a", new.link_id);
            // Expected again, for the next destination.
            assert!(registry.expect_node("node-a", &[ip], Instant::now()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expected_node_waits_until_a_grace_after_the_server_started_at_most() {
        let registry = Registry::default();
        let _other = link(&registry, "b", "node-b", "10.0.0.2", "10.2.0.0/24").await;
        let started_ago = Duration::from_secs(10);
        let since = Instant::now() - started_ago;
        registry.expect_node("node-a", &["10.0.0.1".parse().unwrap()], since);
        let holding = tokio::time::Instant::now();
        let wait = registry
            .await_node_agent(&target("10.0.0.1:10250"), &CHAIN, GRACE)
            .await;
        assert_eq!(wait, Some(NodeWait::Expired));
        let held = holding.elapsed();
        // `since` is on the wall clock, which moved on a little while the test clock did not.
        let expected = GRACE - started_ago;
        let slack = Duration::from_secs(1);
        assert!(
            held > expected - slack && held < expected + slack,
            "{held:?}"
        );
        let route = registry.route(&target("10.0.0.1:10250"), &CHAIN).unwrap();
        assert_eq!(route.strategy, Strategy::Any, "then the chain goes on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_with_a_linked_agent_is_not_expected_and_a_later_departure_counts() {
        let registry = Registry::default();
        let a = link(&registry, "a", "node-a", "10.0.0.1", "10.1.0.0/24").await;
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let long_ago = Instant::now() - GRACE;
        assert!(!registry.expect_node("node-a", &[ip], long_ago));
        let started = tokio::time::Instant::now();
        let wait = registry
            .await_node_agent(&target("node-a:10250"), &CHAIN, GRACE)
            .await;
        assert_eq!(wait, None, "a linked node routes at once");
        // The agent goes now; expecting it since long ago does not cut its wait short.
        registry.remove("a", a.link_id);
        assert!(registry.expect_node("node-a", &[ip], long_ago));
        let wait = registry
            .await_node_agent(&target("node-a:10250"), &CHAIN, GRACE)
            .await;
        assert_eq!(wait, Some(NodeWait::Expired));
        assert_eq!(started.elapsed(), GRACE);
    }
}
