//! Prometheus metrics of the server.

use cplink_proto::pump::ByteCounters;
use cplink_runtime::metrics::counters_by_direction;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a dial outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DialLabels {
    /// `ok` or a [`DialFailure::kind`](cplink_proto::dial::DialFailure::kind).
    pub result: &'static str,
}

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
    /// Dials by result.
    pub dials: Family<DialLabels, Counter>,
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
}

impl Metrics {
    /// Creates the metrics and registers them under the `cplink_server` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("cplink_server");
        let [socket_to_stream, stream_to_socket] = counters_by_direction(
            r,
            "tunnel_bytes",
            "Bytes carried through the tunnel",
            ["to_agent", "from_agent"],
        );
        let metrics = Metrics {
            agents_linked: Gauge::default(),
            streams_active: Gauge::default(),
            dials: Family::default(),
            routed: Family::default(),
            dial_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            frontend_connections: Family::default(),
            request_errors: Family::default(),
            link_errors: Family::default(),
            identity_refusals: Family::default(),
            identity_revocations: Family::default(),
            connections_shed: Family::default(),
            konnectivity_overflows: Counter::default(),
            bytes: ByteCounters {
                socket_to_stream,
                stream_to_socket,
            },
        };
        r.register(
            "agents_linked",
            "Agents currently linked",
            metrics.agents_linked.clone(),
        );
        r.register(
            "streams_active",
            "Tunneled connections currently open",
            metrics.streams_active.clone(),
        );
        r.register(
            "dials",
            "Dials through the tunnel by result",
            metrics.dials.clone(),
        );
        r.register(
            "routed_dials",
            "Dials by the routing strategy that chose the agent",
            metrics.routed.clone(),
        );
        r.register(
            "dial_duration_seconds",
            "Time from a frontend CONNECT to the agent's answer",
            metrics.dial_duration.clone(),
        );
        r.register(
            "frontend_connections",
            "Frontend connections accepted",
            metrics.frontend_connections.clone(),
        );
        r.register(
            "frontend_request_errors",
            "Frontend requests refused before dialing",
            metrics.request_errors.clone(),
        );
        r.register(
            "link_errors",
            "Agent links that failed to establish",
            metrics.link_errors.clone(),
        );
        r.register(
            "identity_refusals",
            "Agent links refused because the agent's proven identity (its pod's token or its \
             certificate, and the Node behind it) does not back what it claims, by reason",
            metrics.identity_refusals.clone(),
        );
        r.register(
            "identity_revocations",
            "Agent links closed or routes dropped because the agent's Pod or Node changed",
            metrics.identity_revocations.clone(),
        );
        r.register(
            "konnectivity_overflows",
            "Connections through upstream konnectivity agents closed because their client fell \
             more than the per-connection budget behind",
            metrics.konnectivity_overflows.clone(),
        );
        r.register(
            "connections_shed",
            "Connections closed as soon as accepted because their listener had \
             --max-pending-connections still in their handshake",
            metrics.connections_shed.clone(),
        );
        metrics
    }
}
