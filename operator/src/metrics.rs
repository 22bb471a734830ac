//! Prometheus metrics of the operator: its reconciles, and what it last observed of each link
//! (conditions, replicas, agents linked to each server pod, certificate expiry), so alerts can
//! be written on the operator's view without kube-state-metrics.
//!
//! Label values of the reconcile metrics are fixed `&'static str`s, never error text. The
//! per-link series also carry the link's namespace and name (and a server pod's name): they are
//! bounded by the links that exist, and [`Metrics::forget_link`] removes them with the link.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::ControlPlaneLinkStatus;
use crate::status::{
    AGENTS_AVAILABLE, CERTIFICATES_READY, EGRESS_CERTIFICATE_EXPIRING, READY, SERVER_AVAILABLE,
};

/// The conditions exported by `cplink_operator_link_condition`, as fixed label values.
pub const CONDITIONS: [&str; 5] = [
    READY,
    SERVER_AVAILABLE,
    AGENTS_AVAILABLE,
    CERTIFICATES_READY,
    EGRESS_CERTIFICATE_EXPIRING,
];

/// Labels of the reconcile error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Kind of failure: one of a fixed set of labels, never error text.
    pub error: &'static str,
}

/// Labels naming a link.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct LinkLabels {
    /// Namespace of the link.
    pub namespace: String,
    /// Name of the link.
    pub link: String,
}

impl LinkLabels {
    /// The labels of the link `name` in `namespace`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            link: name.to_owned(),
        }
    }
}

/// Labels of a link's condition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// Namespace of the link.
    pub namespace: String,
    /// Name of the link.
    pub link: String,
    /// One of [`CONDITIONS`].
    pub condition: &'static str,
}

/// Labels of one server pod of a link.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerPodLabels {
    /// Namespace of the link and its pods.
    pub namespace: String,
    /// Name of the link.
    pub link: String,
    /// Name of the server pod.
    pub pod: String,
}

/// Labels of one of a link's certificates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// Namespace of the link.
    pub namespace: String,
    /// Name of the link.
    pub link: String,
    /// `ca`, `server`, `agent` or `apiserver` (kube-apiserver's client certificate).
    pub certificate: &'static str,
}

/// The series one link has, so that they can be removed when they no longer apply.
#[derive(Debug, Default)]
struct LinkSeries {
    pods: BTreeSet<String>,
    certificates: BTreeSet<&'static str>,
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
    /// 1 when a link's condition is True, 0 otherwise.
    pub link_conditions: Family<ConditionLabels, Gauge>,
    /// Desired server replicas of a link.
    pub servers_desired: Family<LinkLabels, Gauge>,
    /// Server replicas of a link passing their readiness probe.
    pub servers_ready: Family<LinkLabels, Gauge>,
    /// Nodes that should run one of a link's agents (in-cluster agents only).
    pub agents_desired: Family<LinkLabels, Gauge>,
    /// A link's agents linked to every server (in-cluster agents only).
    pub agents_ready: Family<LinkLabels, Gauge>,
    /// Agents linked to each server pod, as its admin endpoint reported.
    pub server_agents_linked: Family<ServerPodLabels, Gauge>,
    /// `notAfter` of each of a link's certificates, in seconds since the Unix epoch.
    pub certificate_expiry: Family<CertificateLabels, Gauge>,
    links: Mutex<HashMap<LinkLabels, LinkSeries>>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms to ~16 s.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let link_conditions = Family::<ConditionLabels, Gauge>::default();
        let servers_desired = Family::<LinkLabels, Gauge>::default();
        let servers_ready = Family::<LinkLabels, Gauge>::default();
        let agents_desired = Family::<LinkLabels, Gauge>::default();
        let agents_ready = Family::<LinkLabels, Gauge>::default();
        let server_agents_linked = Family::<ServerPodLabels, Gauge>::default();
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
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
        registry.register(
            "link_condition",
            "1 when the link's condition (Ready, ServerAvailable, AgentsAvailable, \
             CertificatesReady, EgressCertificateExpiring) is True, 0 when it is not, as of the \
             last reconcile",
            link_conditions.clone(),
        );
        registry.register(
            "link_servers_desired",
            "Server replicas the link asks for",
            servers_desired.clone(),
        );
        registry.register(
            "link_servers_ready",
            "Server replicas of the link passing their readiness probe",
            servers_ready.clone(),
        );
        registry.register(
            "link_agents_desired",
            "Nodes that should run one of the link's agents (agents the operator runs)",
            agents_desired.clone(),
        );
        registry.register(
            "link_agents_ready",
            "Agents of the link linked to every server (agents the operator runs)",
            agents_ready.clone(),
        );
        registry.register(
            "link_server_agents_linked",
            "Agents linked to each server pod of the link, as the pod's admin endpoint \
             reported at the last reconcile",
            server_agents_linked.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each of the link's certificates (ca, server, agent, apiserver) expires, \
             in seconds since the Unix epoch",
            certificate_expiry.clone(),
        );
        Self {
            reconciles,
            failures,
            duration,
            leader,
            leader_transitions,
            link_conditions,
            servers_desired,
            servers_ready,
            agents_desired,
            agents_ready,
            server_agents_linked,
            certificate_expiry,
            links: Mutex::new(HashMap::new()),
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

    /// Records what a reconcile wrote into the status of the link `name` in `namespace`:
    /// its conditions, replicas and agents, and the agents each server pod reported linked.
    /// Series the status no longer backs (a condition it lacks, agents outside the cluster, a
    /// server pod gone or unanswering) are removed rather than left at their last value.
    pub fn record_status(&self, namespace: &str, name: &str, status: &ControlPlaneLinkStatus) {
        let link = LinkLabels::new(namespace, name);
        for condition in CONDITIONS {
            let labels = ConditionLabels {
                namespace: link.namespace.clone(),
                link: link.link.clone(),
                condition,
            };
            match status.conditions.iter().find(|c| c.type_ == condition) {
                Some(c) => {
                    self.link_conditions
                        .get_or_create(&labels)
                        .set(i64::from(c.status == "True"));
                }
                None => {
                    self.link_conditions.remove(&labels);
                }
            }
        }
        set_or_remove(
            &self.servers_desired,
            &link,
            status.server.as_ref().map(|s| i64::from(s.replicas)),
        );
        set_or_remove(
            &self.servers_ready,
            &link,
            status.server.as_ref().map(|s| i64::from(s.ready_replicas)),
        );
        set_or_remove(
            &self.agents_desired,
            &link,
            status.agents.as_ref().map(|a| i64::from(a.desired)),
        );
        set_or_remove(
            &self.agents_ready,
            &link,
            status.agents.as_ref().map(|a| i64::from(a.ready)),
        );

        let counted: Vec<(&str, i64)> = status
            .server
            .iter()
            .flat_map(|s| &s.linked_agents)
            .filter_map(|l| Some((l.pod.as_str(), l.agents?)))
            .collect();
        let mut links = self.links();
        let series = links.entry(link.clone()).or_default();
        for gone in series
            .pods
            .iter()
            .filter(|pod| !counted.iter().any(|(counted, _)| counted == pod))
        {
            self.server_agents_linked
                .remove(&server_pod(&link, gone.clone()));
        }
        series.pods = counted.iter().map(|(pod, _)| (*pod).to_owned()).collect();
        for (pod, agents) in counted {
            self.server_agents_linked
                .get_or_create(&server_pod(&link, pod.to_owned()))
                .set(agents);
        }
    }

    /// Records the expiry of each of the link's certificates, as `(certificate, notAfter in
    /// seconds since the Unix epoch)`; certificates not listed lose their series.
    pub fn record_certificates(
        &self,
        namespace: &str,
        name: &str,
        expiries: &[(&'static str, i64)],
    ) {
        let link = LinkLabels::new(namespace, name);
        let mut links = self.links();
        let series = links.entry(link.clone()).or_default();
        for gone in series
            .certificates
            .iter()
            .filter(|kind| !expiries.iter().any(|(listed, _)| listed == *kind))
        {
            self.certificate_expiry.remove(&certificate(&link, gone));
        }
        series.certificates = expiries.iter().map(|(kind, _)| *kind).collect();
        for (kind, not_after) in expiries {
            self.certificate_expiry
                .get_or_create(&certificate(&link, kind))
                .set(*not_after);
        }
    }

    /// Removes every series of the link `name` in `namespace`: it is gone.
    pub fn forget_link(&self, namespace: &str, name: &str) {
        let link = LinkLabels::new(namespace, name);
        let series = self.links().remove(&link).unwrap_or_default();
        for condition in CONDITIONS {
            self.link_conditions.remove(&ConditionLabels {
                namespace: link.namespace.clone(),
                link: link.link.clone(),
                condition,
            });
        }
        for family in [
            &self.servers_desired,
            &self.servers_ready,
            &self.agents_desired,
            &self.agents_ready,
        ] {
            family.remove(&link);
        }
        for pod in series.pods {
            self.server_agents_linked.remove(&server_pod(&link, pod));
        }
        for kind in series.certificates {
            self.certificate_expiry.remove(&certificate(&link, kind));
        }
    }

    /// Removes the series of every link, for an operator that stops reconciling (one that is
    /// no longer the leader): what it last saw would soon be stale.
    pub fn forget_links(&self) {
        self.links().clear();
        self.link_conditions.clear();
        self.servers_desired.clear();
        self.servers_ready.clear();
        self.agents_desired.clear();
        self.agents_ready.clear();
        self.server_agents_linked.clear();
        self.certificate_expiry.clear();
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

    fn links(&self) -> MutexGuard<'_, HashMap<LinkLabels, LinkSeries>> {
        // The map only indexes series to remove later; a panic mid-update leaves at worst a
        // series that lingers until the link's next status. Keep going.
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn set_or_remove(family: &Family<LinkLabels, Gauge>, link: &LinkLabels, value: Option<i64>) {
    match value {
        Some(value) => {
            family.get_or_create(link).set(value);
        }
        None => {
            family.remove(link);
        }
    }
}

fn server_pod(link: &LinkLabels, pod: String) -> ServerPodLabels {
    ServerPodLabels {
        namespace: link.namespace.clone(),
        link: link.link.clone(),
        pod,
    }
}

fn certificate(link: &LinkLabels, certificate: &'static str) -> CertificateLabels {
    CertificateLabels {
        namespace: link.namespace.clone(),
        link: link.link.clone(),
        certificate,
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::{AgentsStatus, ServerLinks, ServerStatus};

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

    fn condition(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: "Test".to_owned(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    fn linked(pod: &str, agents: Option<i64>) -> ServerLinks {
        ServerLinks {
            pod: pod.to_owned(),
            agents,
        }
    }

    /// A link with two of three server replicas ready, two pods of which one answered, and
    /// three of four agents ready.
    fn degraded() -> ControlPlaneLinkStatus {
        ControlPlaneLinkStatus {
            conditions: vec![
                condition(READY, "False"),
                condition(SERVER_AVAILABLE, "True"),
                condition(AGENTS_AVAILABLE, "False"),
                condition(CERTIFICATES_READY, "True"),
            ],
            server: Some(ServerStatus {
                replicas: 3,
                ready_replicas: 2,
                summary: "2/3".into(),
                linked_agents: vec![
                    linked("edge-server-a", Some(3)),
                    linked("edge-server-b", None),
                ],
            }),
            agents: Some(AgentsStatus {
                desired: 4,
                ready: 3,
                summary: "3/4".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_links_status_is_exported_under_its_namespace_and_name() {
        let metrics = Metrics::default();
        metrics.record_status("tunnels", "edge", &degraded());
        let text = metrics.encode().expect("encodes");
        for line in [
            r#"cplink_operator_link_condition{namespace="tunnels",link="edge",condition="Ready"} 0"#,
            r#"cplink_operator_link_condition{namespace="tunnels",link="edge",condition="ServerAvailable"} 1"#,
            r#"cplink_operator_link_condition{namespace="tunnels",link="edge",condition="AgentsAvailable"} 0"#,
            r#"cplink_operator_link_condition{namespace="tunnels",link="edge",condition="CertificatesReady"} 1"#,
            r#"cplink_operator_link_servers_desired{namespace="tunnels",link="edge"} 3"#,
            r#"cplink_operator_link_servers_ready{namespace="tunnels",link="edge"} 2"#,
            r#"cplink_operator_link_agents_desired{namespace="tunnels",link="edge"} 4"#,
            r#"cplink_operator_link_agents_ready{namespace="tunnels",link="edge"} 3"#,
            r#"cplink_operator_link_server_agents_linked{namespace="tunnels",link="edge",pod="edge-server-a"} 3"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains("edge-server-b"),
            "a pod that did not answer has no count, not a zero: {text}"
        );
    }

    #[test]
    fn series_the_status_no_longer_backs_are_removed() {
        let metrics = Metrics::default();
        metrics.record_status("tunnels", "edge", &degraded());
        // Agents moved outside the cluster, pod a was replaced by c, only Ready is known.
        let mut status = degraded();
        status.conditions = vec![condition(READY, "True")];
        status.agents = None;
        if let Some(server) = status.server.as_mut() {
            server.linked_agents = vec![linked("edge-server-c", Some(0))];
        }
        metrics.record_status("tunnels", "edge", &status);
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(r#"cplink_operator_link_condition{namespace="tunnels",link="edge",condition="Ready"} 1"#),
            "{text}"
        );
        assert!(!text.contains("condition=\"AgentsAvailable\""), "{text}");
        assert!(
            !text.contains("cplink_operator_link_agents_desired{"),
            "{text}"
        );
        assert!(!text.contains("edge-server-a"), "{text}");
        assert!(text.contains(r#"pod="edge-server-c"} 0"#), "{text}");
    }

    #[test]
    fn certificate_expiry_is_exported_per_certificate() {
        let metrics = Metrics::default();
        metrics.record_certificates(
            "tunnels",
            "edge",
            &[("ca", 2_000_000_000), ("apiserver", 1_800_000_000)],
        );
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(r#"cplink_operator_certificate_expiry_timestamp_seconds{namespace="tunnels",link="edge",certificate="ca"} 2000000000"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cplink_operator_certificate_expiry_timestamp_seconds{namespace="tunnels",link="edge",certificate="apiserver"} 1800000000"#),
            "{text}"
        );
        metrics.record_certificates("tunnels", "edge", &[("ca", 2_100_000_000)]);
        let text = metrics.encode().expect("encodes");
        assert!(text.contains(r#"certificate="ca"} 2100000000"#), "{text}");
        assert!(!text.contains(r#"certificate="apiserver""#), "{text}");
    }

    #[test]
    fn a_forgotten_link_leaves_no_series_and_other_links_keep_theirs() {
        let metrics = Metrics::default();
        for name in ["edge", "core"] {
            metrics.record_status("tunnels", name, &degraded());
            metrics.record_certificates("tunnels", name, &[("server", 1_900_000_000)]);
        }
        metrics.forget_link("tunnels", "edge");
        let text = metrics.encode().expect("encodes");
        assert!(!text.contains(r#"link="edge""#), "{text}");
        assert_eq!(
            text.matches(r#"link="core""#).count(),
            10,
            "4 conditions, 4 counts, 1 pod, 1 certificate: {text}"
        );
        metrics.forget_links();
        let text = metrics.encode().expect("encodes");
        assert!(!text.contains("link=\""), "{text}");
        assert!(
            text.contains("cplink_operator_reconciles_total 0"),
            "the operator's own metrics stay: {text}"
        );
    }
}
