//! cplink-agent: links out to cplink servers and dials nodes, pods and services for them.
//!
//! - [`config`]: command line and validated configuration.
//! - [`policy`]: which destinations may be dialed.
//! - `uplink`: links to servers, with keepalive, drain and redial with backoff.
//! - `dial`: serving one tunnel stream (policy, dial, answer, pump).
//! - [`metrics`]: Prometheus metrics.
//!
//! [`Agent::run`] takes an already-bound admin listener and a shutdown token, so tests run
//! agents in-process.

pub mod config;
mod dial;
pub mod metrics;
pub mod policy;
mod uplink;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cplink_proto::admin;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};
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
    /// One slot per configured server; `Some` while linked.
    links: Mutex<Vec<Option<LinkInfo>>>,
    draining: AtomicBool,
}

impl Shared {
    pub(crate) fn set_link(&self, index: usize, info: Option<LinkInfo>) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links[index] = info;
        let up = links.iter().filter(|l| l.is_some()).count();
        self.metrics.links_up.set(up as i64);
    }

    fn links(&self) -> Vec<Option<LinkInfo>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        let links = self.links();
        let down: Vec<_> = links
            .iter()
            .zip(&self.config.servers)
            .filter(|(link, _)| link.is_none())
            .map(|(_, server)| server.address.as_str())
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("not linked to {}", down.join(", ")))
        }
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
    /// The links currently up.
    pub fn links(&self) -> Vec<LinkInfo> {
        self.shared.links().into_iter().flatten().collect()
    }

    /// Tunneled connections currently open.
    pub fn active_streams(&self) -> i64 {
        self.shared.metrics.streams_active.get()
    }

    /// Whether the agent is linked to every server it knows.
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
        metrics.servers_known.set(config.servers.len() as i64);
        let links = Mutex::new(vec![None; config.servers.len()]);
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

    /// Links to every server until `shutdown` is cancelled, then drains: GOAWAY on every link,
    /// in-flight tunneled connections finish up to the drain timeout.
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
        tracing::info!(agent_id = %config.agent_id, servers = config.servers.len(), "cplink-agent started");

        let uplinks = TaskTracker::new();
        let streams = TaskTracker::new();
        let force = CancellationToken::new();
        for index in 0..config.servers.len() {
            uplinks.spawn(uplink::maintain(
                shared.clone(),
                index,
                streams.clone(),
                shutdown.clone(),
                force.clone(),
            ));
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
