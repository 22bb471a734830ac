//! Prometheus metrics of the operator. Label values are fixed `&'static str`s, never error text,
//! so cardinality stays bounded.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Kind of failure: one of a fixed set of labels, never error text.
    pub error: &'static str,
}

/// The operator's metrics, registered in one [`Registry`] that the admin endpoint serves.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: Counter,
    /// Failed reconciles, by kind of failure.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// 1 while this replica leads (holds the leader Lease, or runs without leader election).
    pub leader: Gauge,
    /// `leaseTransitions` of the leader Lease as this replica last read it: how many times
    /// leadership changed hands.
    pub leader_transitions: Gauge,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms to ~16 s.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let mut registry = Registry::with_prefix("cplink_operator");
        registry.register(
            "reconciles",
            "ControlPlaneLink reconciles started",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "ControlPlaneLink reconciles that failed, by kind of failure",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of ControlPlaneLink reconciles",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the leader and runs the controller, else 0",
            leader.clone(),
        );
        let leader_transitions = Gauge::default();
        registry.register(
            "leader_transitions",
            "Times leadership changed hands, from the leader Lease's leaseTransitions",
            leader_transitions.clone(),
        );
        Self {
            reconciles,
            failures,
            duration,
            leader,
            leader_transitions,
            registry: Arc::new(registry),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            histogram: &self.duration,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }

    /// The registry holding every metric, for the admin endpoint.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Renders every metric in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records the duration of a reconcile when dropped, whichever way the reconcile ended.
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_errors_and_durations_are_exported() {
        let metrics = Metrics::default();
        drop(metrics.reconcile_started());
        metrics.reconcile_failed("apply");
        metrics.reconcile_failed("apply");
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains("cplink_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains("cplink_operator_reconcile_errors_total{error=\"apply\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("cplink_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn leadership_is_exported() {
        let metrics = Metrics::default();
        metrics.leader.set(1);
        metrics.leader_transitions.set(3);
        let text = metrics.encode().expect("encodes");
        assert!(text.contains("cplink_operator_leader 1\n"), "{text}");
        assert!(
            text.contains("cplink_operator_leader_transitions 3\n"),
            "{text}"
        );
    }
}
