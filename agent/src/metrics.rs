//! Prometheus metrics of the agent.

use cplink_proto::pump::ByteCounters;
use cplink_runtime::metrics::counters_by_direction;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or the failure kind.
    pub result: &'static str,
}

/// Every metric the agent exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Links currently up.
    pub links_up: Gauge,
    /// Servers the agent should be linked to.
    pub servers_known: Gauge,
    /// Link attempts by result.
    pub link_attempts: Family<ResultLabels, Counter>,
    /// Tunneled connections currently open.
    pub streams_active: Gauge,
    /// Dials by result.
    pub dials: Family<ResultLabels, Counter>,
    /// Time to connect to destinations.
    pub dial_duration: Histogram,
    /// Tunneled bytes: `socket_to_stream` is destination → server, `stream_to_socket` the
    /// reverse.
    pub bytes: ByteCounters,
    /// Connections on konnectivity links closed because their destination fell more than the
    /// per-connection budget behind the server.
    pub konnectivity_overflows: Counter,
    /// Times a konnectivity server answered PINGs with GOAWAY `too_many_pings` and the agent
    /// doubled its PING interval for that server.
    pub keepalive_backoffs: Counter,
    /// The longest PING interval in use on konnectivity links, in seconds.
    pub keepalive_interval: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Creates the metrics and registers them under the `cplink_agent` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("cplink_agent");
        let [socket_to_stream, stream_to_socket] = counters_by_direction(
            r,
            "tunnel_bytes",
            "Bytes carried through the tunnel",
            ["from_destination", "to_destination"],
        );
        let metrics = Metrics {
            links_up: Gauge::default(),
            servers_known: Gauge::default(),
            link_attempts: Family::default(),
            streams_active: Gauge::default(),
            dials: Family::default(),
            dial_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            konnectivity_overflows: Counter::default(),
            keepalive_backoffs: Counter::default(),
            keepalive_interval: Gauge::default(),
            bytes: ByteCounters {
                socket_to_stream,
                stream_to_socket,
            },
        };
        r.register(
            "links_up",
            "Links to servers currently up",
            metrics.links_up.clone(),
        );
        r.register(
            "servers_known",
            "Servers the agent should be linked to",
            metrics.servers_known.clone(),
        );
        r.register(
            "link_attempts",
            "Attempts to link to a server by result",
            metrics.link_attempts.clone(),
        );
        r.register(
            "streams_active",
            "Tunneled connections currently open",
            metrics.streams_active.clone(),
        );
        r.register(
            "dials",
            "Dials to destinations by result",
            metrics.dials.clone(),
        );
        r.register(
            "dial_duration_seconds",
            "Time to connect to a destination",
            metrics.dial_duration.clone(),
        );
        r.register(
            "konnectivity_overflows",
            "Connections on konnectivity links closed because their destination fell more than \
             the per-connection budget behind",
            metrics.konnectivity_overflows.clone(),
        );
        r.register(
            "keepalive_backoffs",
            "Times a konnectivity server answered PINGs with too_many_pings and the agent \
             doubled its PING interval for it",
            metrics.keepalive_backoffs.clone(),
        );
        r.register(
            "keepalive_interval_seconds",
            "Longest HTTP/2 PING interval in use on konnectivity links",
            metrics.keepalive_interval.clone(),
        );
        metrics
    }
}
