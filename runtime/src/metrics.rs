//! Prometheus metric shapes more than one binary exports.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

/// Labels of an outcome (a dial, a link attempt): `ok` or a fixed failure kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or the failure kind.
    pub result: &'static str,
}

/// Registers `metric` in `registry` as `name` and returns it, so that a binary's metrics are
/// created and registered in one struct expression, each named once.
pub fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers `tunnel_bytes`, the bytes carried through the tunnel, which every binary that
/// carries connections exports alike; returns the counters of the two `directions`.
pub fn tunnel_bytes(registry: &mut Registry, directions: [&'static str; 2]) -> [Counter; 2] {
    counters_by_direction(
        registry,
        "tunnel_bytes",
        "Bytes carried through the tunnel",
        directions,
    )
}

/// Registers `streams_active`, the tunneled connections currently open, which every binary
/// that carries connections exports alike; returns its gauge.
pub fn streams_active(registry: &mut Registry) -> Gauge {
    registered(
        registry,
        "streams_active",
        "Tunneled connections currently open",
        Gauge::default(),
    )
}

/// The label of a counter split by direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Registers `name` in `registry` as a counter with a `direction` label and returns the
/// counters of the two `directions`, in their order.
pub fn counters_by_direction(
    registry: &mut Registry,
    name: &str,
    help: &str,
    directions: [&'static str; 2],
) -> [Counter; 2] {
    let family = Family::<DirectionLabels, Counter>::default();
    // get_or_create holds the family's lock until its guard drops: one guard at a time.
    let counters =
        directions.map(|direction| family.get_or_create(&DirectionLabels { direction }).clone());
    registry.register(name, help, family);
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_metric_is_the_one_exported() {
        let mut registry = Registry::with_prefix("cplink_test");
        let up: prometheus_client::metrics::gauge::Gauge =
            registered(&mut registry, "links_up", "Links up", Default::default());
        up.set(2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("# HELP cplink_test_links_up Links up."),
            "{text}"
        );
        assert!(text.contains("cplink_test_links_up 2"), "{text}");
    }

    #[test]
    fn each_direction_counts_under_its_own_label() {
        let mut registry = Registry::with_prefix("cplink_test");
        let [up, down] =
            counters_by_direction(&mut registry, "bytes", "Bytes moved", ["up", "down"]);
        up.inc_by(3);
        down.inc_by(5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("cplink_test_bytes_total{direction=\"up\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("cplink_test_bytes_total{direction=\"down\"} 5"),
            "{text}"
        );
    }
}
