//! Prometheus metrics of the agent.

use std::sync::atomic::AtomicU64;

use cplink_proto::pump::ByteCounters;
pub use cplink_runtime::metrics::ResultLabels;
use cplink_runtime::metrics::{registered, streams_active, tunnel_bytes};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
        Metrics {
            bytes: ByteCounters::from(tunnel_bytes(r, ["from_destination", "to_destination"])),
            links_up: registered(
                r,
                "links_up",
                "Links to servers currently up",
                Gauge::default(),
            ),
            servers_known: registered(
                r,
                "servers_known",
                "Servers the agent should be linked to",
                Gauge::default(),
            ),
            link_attempts: registered(
                r,
                "link_attempts",
                "Attempts to link to a server by result",
                Family::default(),
            ),
            streams_active: streams_active(r),
            dials: registered(
                r,
                "dials",
                "Dials to destinations by result",
                Family::default(),
            ),
            dial_duration: registered(
                r,
                "dial_duration_seconds",
                "Time to connect to a destination",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            konnectivity_overflows: registered(
                r,
                "konnectivity_overflows",
                "Connections on konnectivity links closed because their destination fell more \
                 than the per-connection budget behind",
                Counter::default(),
            ),
            keepalive_backoffs: registered(
                r,
                "keepalive_backoffs",
                "Times a konnectivity server answered PINGs with too_many_pings and the agent \
                 doubled its PING interval for it",
                Counter::default(),
            ),
            keepalive_interval: registered(
                r,
                "keepalive_interval_seconds",
                "Longest HTTP/2 PING interval in use on konnectivity links",
                Gauge::default(),
            ),
        }
    }
}
