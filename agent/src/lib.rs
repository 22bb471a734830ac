//! cplink-agent: links out to cplink servers and dials nodes, pods and services for them.
//!
//! - [`config`]: command line and validated configuration.
//! - [`policy`]: which destinations may be dialed.
//! - `uplink`: native links to servers, with keepalive, drain and redial with backoff.
//! - `konnectivity`: links to konnectivity servers (gRPC `AgentService/Connect`), as many as
//!   the servers behind an address report, each serving dials on one multiplexed stream.
//! - `links`: the links up per server address, and the readiness they make.
//! - `dial`: dialing a destination (policy, timeout, metrics) and serving one native tunnel
//!   stream (dial, answer, pump).
//! - [`metrics`]: Prometheus metrics.
//!
//! [`Agent::run`] takes an already-bound admin listener and a shutdown token, so tests run
//! agents in-process.

pub mod config;
mod dial;
mod konnectivity;
mod links;
pub mod metrics;
pub mod policy;
mod uplink;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cplink_proto::admin;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError, Protocol};
use links::Links;
use metrics::Metrics;

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
    pub(crate) links: Arc<Links>,
    draining: AtomicBool,
}

impl Shared {
    fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        self.links
            .readiness(self.config.servers.iter().map(|s| s.address.as_str()))
    }
}

/// A cplink agent.
pub struct Agent {
    shared: Arc<Shared>,
    prometheus: Arc<prometheus_client::registry::Registry>,
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

    /// Whether the agent is linked to every server it knows: one link per native server
    /// address, as many distinct servers as reported (`servercount`) per konnectivity address.
    pub fn readiness(&self) -> Result<(), String> {
        self.shared.readiness()
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
        let links = Links::new(
            config.servers.len(),
            metrics.links_up.clone(),
            metrics.servers_known.clone(),
        );
        Agent {
            shared: Arc::new(Shared {
                config,
                metrics,
                links,
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
        tracing::info!(
            agent_id = %config.agent_id,
            servers = config.servers.len(),
            protocol = %config.protocol,
            "cplink-agent started"
        );

        let uplinks = TaskTracker::new();
        let streams = TaskTracker::new();
        let force = CancellationToken::new();
        for index in 0..config.servers.len() {
            let (shared, streams) = (shared.clone(), streams.clone());
            let (shutdown, force) = (shutdown.clone(), force.clone());
            match config.protocol {
                Protocol::Cplink => {
                    uplinks.spawn(uplink::maintain(shared, index, streams, shutdown, force))
                }
                Protocol::Konnectivity => uplinks.spawn(konnectivity::maintain(
                    shared, index, streams, shutdown, force,
                )),
            };
        }
        let admin_stop = CancellationToken::new();
        let admin_task = admin_listener.map(|listener| {
            let probe = shared.clone();
            tokio::spawn(admin::serve(
                listener,
                self.prometheus.clone(),
                Arc::new(move || probe.readiness()),
                admin_stop.clone(),
            ))
        });

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
            uplinks.wait().await;
        }
        // With their links gone, remaining stream tasks fail at their next step.
        streams.close();
        streams.wait().await;
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        tracing::info!("cplink-agent stopped");
    }
}
