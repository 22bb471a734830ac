//! Prometheus metrics of the server.

use cplink_proto::pump::ByteCounters;
pub use cplink_runtime::metrics::ResultLabels;
use cplink_runtime::metrics::{registered, streams_active, tunnel_bytes};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a frontend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FrontendLabels {
    /// `tls` or `uds`.
    pub frontend: &'static str,
}

/// Labels of a refused frontend request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestErrorLabels {
    /// Why the request was refused.
    pub reason: &'static str,
}

/// Labels of a routing decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StrategyLabels {
    /// The strategy that picked the agent.
    pub strategy: &'static str,
}

/// Labels of a refused agent link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LinkErrorLabels {
    /// Why the link failed to establish.
    pub reason: &'static str,
}

/// Labels naming a listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `agent`, `frontend`, `frontend-uds` or `grpc-uds`.
    pub listener: &'static str,
}

/// Every metric the server exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Agents currently linked.
    pub agents_linked: Gauge,
    /// Tunneled connections currently open.
    pub streams_active: Gauge,
    /// Dials by result: `ok` or a
    /// [`DialFailure::kind`](cplink_proto::dial::DialFailure::kind).
    pub dials: Family<ResultLabels, Counter>,
    /// Dials by the strategy that routed them.
    pub routed: Family<StrategyLabels, Counter>,
    /// Time from CONNECT to the agent's answer.
    pub dial_duration: Histogram,
    /// Frontend connections accepted.
    pub frontend_connections: Family<FrontendLabels, Counter>,
    /// Frontend requests refused before dialing.
    pub request_errors: Family<RequestErrorLabels, Counter>,
    /// Agent links that failed to establish.
    pub link_errors: Family<LinkErrorLabels, Counter>,
    /// Agent links refused because the agent's proven identity does not back what it claims.
    pub identity_refusals: Family<LinkErrorLabels, Counter>,
    /// Agent links closed, or routes dropped, because their Pod or Node changed.
    pub identity_revocations: Family<LinkErrorLabels, Counter>,
    /// Connections closed at accept: their listener had too many in their handshake.
    pub connections_shed: Family<ListenerLabels, Counter>,
    /// Tunneled bytes: `socket_to_stream` is frontend → agent, `stream_to_socket` the reverse.
    pub bytes: ByteCounters,
    /// Connections through upstream konnectivity agents closed because their frontend client
    /// fell more than the per-connection budget behind the agent.
    pub konnectivity_overflows: Counter,
    /// Renewals of the server Lease (`--publish-server-leases`) by result.
    pub lease_renewals: Family<ResultLabels, Counter>,
    /// Dials held for their node's agent (`--node-agent-grace`), by how the wait ended:
    /// `linked` or `expired`.
    pub node_agent_waits: Family<ResultLabels, Counter>,
    /// How long dials were held for their node's agent.
    pub node_agent_wait_duration: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them under the `cplink_server` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("cplink_server");
        Metrics {
            bytes: ByteCounters::from(tunnel_bytes(r, ["to_agent", "from_agent"])),
            agents_linked: registered(
                r,
                "agents_linked",
                "Agents currently linked",
                Gauge::default(),
            ),
            streams_active: streams_active(r),
            lease_renewals: registered(
                r,
                "lease_renewals",
                "Renewals of the server Lease upstream agents count servers by, by result",
                Family::default(),
            ),
            dials: registered(
                r,
                "dials",
                "Dials through the tunnel by result",
                Family::default(),
            ),
            routed: registered(
                r,
                "routed_dials",
                "Dials by the routing strategy that chose the agent",
                Family::default(),
            ),
            dial_duration: registered(
                r,
                "dial_duration_seconds",
                "Time from a frontend CONNECT to the agent's answer",
                Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
            frontend_connections: registered(
                r,
                "frontend_connections",
                "Frontend connections accepted",
                Family::default(),
            ),
            request_errors: registered(
                r,
                "frontend_request_errors",
                "Frontend requests refused before dialing",
                Family::default(),
            ),
            link_errors: registered(
                r,
                "link_errors",
                "Agent links that failed to establish",
                Family::default(),
            ),
            identity_refusals: registered(
                r,
                "identity_refusals",
                "Agent links refused because the agent's proven identity (its pod's token or its \
                 certificate, and the Node behind it) does not back what it claims, by reason",
                Family::default(),
            ),
            identity_revocations: registered(
                r,
                "identity_revocations",
                "Agent links closed or routes dropped because the agent's Pod or Node changed",
                Family::default(),
            ),
            konnectivity_overflows: registered(
                r,
                "konnectivity_overflows",
                "Connections through upstream konnectivity agents closed because their client \
                 fell more than the per-connection budget behind",
                Counter::default(),
            ),
            node_agent_waits: registered(
                r,
                "node_agent_waits",
                "Dials held for their node's agent (--node-agent-grace), by how the wait ended: \
                 linked, or expired",
                Family::default(),
            ),
            node_agent_wait_duration: registered(
                r,
                "node_agent_wait_duration_seconds",
                "How long dials were held for their node's agent",
                Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            ),
            connections_shed: registered(
                r,
                "connections_shed",
                "Connections closed as soon as accepted because their listener had \
                 --max-pending-connections still in their handshake",
                Family::default(),
            ),
        }
    }
}
