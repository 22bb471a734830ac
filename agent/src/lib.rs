//! cplink-agent: links out to cplink servers and dials nodes, pods and services for them.
//!
//! Modules, from the outside in:
//! - `pool`: keeping the links of one server address up, for either protocol: dial while
//!   short of servers, back off, stop dialing an address no longer wanted.
//! - `link`: one link to a server in either protocol (`link::native`, `link::konnectivity`)
//!   behind one `Link` type: connect, serve, drain; the errors both share.
//! - `dial`: dialing a destination (policy, timeout, metrics) and serving one native tunnel
//!   stream (dial, answer, pump).
//! - `slots`: the links up per server address, and the readiness they make.
//! - `cluster`: what the agent reads from the Kubernetes API: the servers' EndpointSlices and its
//!   Node's pod ranges.
//! - `token` (the service-account token that proves the agent's pod to servers),
//!   `grpc_metadata` (what konnectivity requests carry).
//! - `debug`: the admin endpoint's read-only view of the links (`--debug-endpoints`).
//! - [`config`]: command line and validated configuration; [`policy`]: which destinations may
//!   be dialed; [`metrics`]: Prometheus metrics.
//!
//! [`Agent::run`] takes an already-bound admin listener and a shutdown token, so tests run
//! agents in-process.

mod cluster;
pub mod config;
mod debug;
mod dial;
mod grpc_metadata;
mod link;
pub mod metrics;
pub mod policy;
mod pool;
mod slots;
mod token;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cplink_proto::hello::Identifiers;
use cplink_runtime::admin;
use cplink_runtime::kubeapi::KubeApi;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError, Protocol};
use link::LinkContext;
use metrics::Metrics;
use pool::Pool;
use slots::{SlotId, Slots, Source, Wants};

/// How long links and tunneled connections may take to end once they are told to, at the end
/// of a drain: the agent exits then, whatever is left.
const FORCED_END: std::time::Duration = std::time::Duration::from_secs(5);

/// What the agent knows about an established link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// The server's id.
    pub server_id: String,
    /// How many servers the server says there are.
    pub server_count: u32,
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) links: Arc<Slots>,
    /// The Kubernetes API, for discovery and the Node lookup.
    pub(crate) kube: Option<KubeApi>,
    /// The identifiers sent in hellos, once the Node's pod ranges joined them.
    identifiers: OnceLock<Identifiers>,
    draining: AtomicBool,
}

impl Shared {
    /// Whether the agent is shutting down.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn readiness(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("shutting down".into());
        }
        self.links.readiness()
    }

    /// The identifiers announced to servers: the configured ones, plus the Node's pod
    /// ranges with `--pod-cidr-from-node`.
    pub(crate) fn identifiers(&self) -> &Identifiers {
        self.identifiers.get().unwrap_or(&self.config.identifiers)
    }
}

/// Adds the pod ranges of the agent's Node to the identifiers, as far as the API tells them
/// within the lookup budget.
async fn pod_cidrs_from_node(shared: &Shared) {
    let config = &shared.config;
    let (Some(api), Some(node)) = (&shared.kube, config.node_name.as_deref()) else {
        return;
    };
    match cluster::node::lookup(api, node, config.node_lookup_budget, config.backoff).await {
        Ok(cidrs) if cidrs.is_empty() => {
            tracing::info!(node, "the Node has no pod CIDR: none added");
        }
        Ok(cidrs) => {
            let mut identifiers = config.identifiers.clone();
            for cidr in cidrs {
                if !identifiers.pod_cidrs.contains(&cidr) {
                    identifiers.pod_cidrs.push(cidr);
                }
            }
            let all: Vec<_> = identifiers
                .pod_cidrs
                .iter()
                .map(|c| c.to_string())
                .collect();
            tracing::info!(node, pod_cidrs = %all.join(","), "pod CIDRs from the Node");
            // Set once, before any link says hello.
            let _ = shared.identifiers.set(identifiers);
        }
        Err(err) => tracing::warn!(
            node,
            %err,
            "starting without the Node's pod CIDRs: dials into them are not routed here by CIDR"
        ),
    }
}

/// A cplink agent.
pub struct Agent {
    shared: Arc<Shared>,
    prometheus: Arc<prometheus_client::registry::Registry>,
    /// The slots of the fixed server addresses, in their order.
    fixed: Vec<SlotId>,
}

/// A cheap handle to observe a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    shared: Arc<Shared>,
    prometheus: Arc<prometheus_client::registry::Registry>,
}

impl AgentHandle {
    /// The links currently up, server address by server address.
    pub fn links(&self) -> Vec<LinkInfo> {
        self.shared.links.all()
    }

    /// Tunneled connections currently open.
    pub fn active_streams(&self) -> i64 {
        self.shared.metrics.streams_active.get()
    }

    /// Tunneled bytes so far over native links: destination to server (read from destinations
    /// and sent on), and server to destination (written to destinations).
    pub fn tunneled_bytes(&self) -> cplink_proto::pump::PumpStats {
        self.shared.metrics.bytes.totals()
    }

    /// Whether the agent is linked to every server it knows: every discovered endpoint (and
    /// at least one), or every fixed address, a sole one to as many distinct servers as they
    /// report.
    pub fn readiness(&self) -> Result<(), String> {
        self.shared.readiness()
    }

    /// The server addresses the agent links to: fixed, or discovered (endpoints removed from
    /// the slices aside, even while their links last).
    pub fn server_addresses(&self) -> Vec<String> {
        self.shared.links.addresses()
    }

    /// The identifiers the agent announces to servers.
    pub fn identifiers(&self) -> Identifiers {
        self.shared.identifiers().clone()
    }

    /// Metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.prometheus);
        text
    }
}

impl Agent {
    /// Creates an agent from a validated configuration.
    pub fn new(config: Config) -> Self {
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);
        let source = match &config.discovery {
            Some(discovery) => Source::Discovering(discovery.qualified_name()),
            None => Source::Fixed,
        };
        let links = Slots::new(
            source,
            metrics.links_up.clone(),
            metrics.servers_known.clone(),
        );
        // Known before the agent runs, so that readiness names them from the start. A sole
        // address may front every server; several addresses are one server each.
        let wants = match config.servers.len() {
            1 => Wants::ServerCount,
            _ => Wants::One,
        };
        let fixed = config
            .servers
            .iter()
            .map(|endpoint| links.add(endpoint.address.clone(), wants))
            .collect();
        let kube = config.api.clone().map(KubeApi::new);
        Agent {
            fixed,
            shared: Arc::new(Shared {
                config,
                metrics,
                links,
                kube,
                identifiers: OnceLock::new(),
                draining: AtomicBool::new(false),
            }),
            prometheus: Arc::new(prometheus),
        }
    }

    /// A handle to observe the agent while it runs.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            shared: self.shared.clone(),
            prometheus: self.prometheus.clone(),
        }
    }

    /// Links to every server until `shutdown` is cancelled, then drains: GOAWAY on every native
    /// link, DRAIN on every konnectivity link; no new dials are taken and in-flight tunneled
    /// connections finish up to the drain timeout.
    pub async fn run(self, admin_listener: Option<TcpListener>, shutdown: CancellationToken) {
        let shared = self.shared;
        let config = &shared.config;
        if config.policy.is_open() {
            tracing::warn!(
                "no --allow given: every destination except link-local addresses may be dialed"
            );
        } else {
            let rules: Vec<_> = config
                .policy
                .rules()
                .iter()
                .map(|r| r.to_string())
                .collect();
            tracing::info!(allow = %rules.join(","), "destination policy");
        }
        if config.protocol == Protocol::Konnectivity
            && config.keepalive.interval < config::KONNECTIVITY_MIN_PING_INTERVAL
        {
            tracing::warn!(
                interval = %humantime::format_duration(config.keepalive.interval),
                "--keepalive-interval is below 30s: upstream konnectivity servers close idle links \
                 that ping this often (too_many_pings); cplink-server does not"
            );
        }
        // The bound address, so that whoever started the agent with port 0 learns it.
        let admin_address = admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let admin_stop = CancellationToken::new();
        let admin_task = admin_listener.map(|listener| {
            let probe = shared.clone();
            let views = config
                .debug_endpoints
                .then(|| Arc::new(debug::Views(shared.clone())) as Arc<dyn admin::Introspect>);
            tokio::spawn(admin::serve_with_debug(
                listener,
                self.prometheus.clone(),
                Arc::new(move || probe.readiness()),
                views,
                admin_stop.clone(),
            ))
        });
        match &config.discovery {
            Some(discovery) => tracing::info!(
                agent_id = %config.agent_id,
                service = %discovery.qualified_name(),
                protocol = %config.protocol,
                admin = %admin_address,
                "cplink-agent started: finding the servers in the Service's EndpointSlices"
            ),
            None => tracing::info!(
                agent_id = %config.agent_id,
                servers = config.servers.len(),
                protocol = %config.protocol,
                admin = %admin_address,
                "cplink-agent started"
            ),
        }

        if config.pod_cidr_from_node {
            tokio::select! {
                () = pod_cidrs_from_node(&shared) => {}
                () = shutdown.cancelled() => {}
            }
        }

        let uplinks = TaskTracker::new();
        let context = LinkContext {
            streams: TaskTracker::new(),
            shutdown: shutdown.clone(),
            force: CancellationToken::new(),
        };
        let starter = Pool::new(shared.clone(), uplinks.clone(), context.clone());
        for (slot, endpoint) in self.fixed.iter().zip(&config.servers) {
            // Fixed addresses are dialed until shutdown.
            drop(starter.start_slot(*slot, endpoint.clone()));
        }
        if config.discovery.is_some() {
            uplinks.spawn(cluster::discovery::run(
                shared.clone(),
                starter,
                shutdown.clone(),
            ));
        }
        let (streams, force) = (context.streams, context.force);

        shutdown.cancelled().await;
        shared.draining.store(true, Ordering::Relaxed);
        uplinks.close();
        if tokio::time::timeout(config.drain_timeout, uplinks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                streams = shared.metrics.streams_active.get(),
                "drain timeout reached: closing links with streams in flight"
            );
            force.cancel();
            if tokio::time::timeout(FORCED_END, uplinks.wait())
                .await
                .is_err()
            {
                tracing::warn!("links still closing after the drain timeout; exiting anyway");
            }
        }
        // With their links gone, remaining stream tasks fail at their next step; one waiting on
        // an idle destination socket may not take another, so the wait is bounded too.
        streams.close();
        if tokio::time::timeout(FORCED_END, streams.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                streams = shared.metrics.streams_active.get(),
                "tunneled connections still open after their links closed; exiting anyway"
            );
        }
        admin_stop.cancel();
        if let Some(task) = admin_task
            && tokio::time::timeout(FORCED_END, task).await.is_err()
        {
            tracing::warn!("the admin server still has connections open; exiting anyway");
        }
        tracing::info!("cplink-agent stopped");
    }
}
