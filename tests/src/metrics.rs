//! Reading the Prometheus text that servers' and agents' admin endpoints serve, and the metric
//! families the binaries export.

use std::collections::BTreeSet;

use prometheus_client::registry::Registry;

/// Where the chart's tests read the exported families from.
pub const EXPORTED_FAMILIES_PATH: &str = "tests/helm/exported-metrics.txt";

/// The sum of a Prometheus counter's samples whose labels contain `labels`.
pub fn counter(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every metric family cplink-server, cplink-agent and cplink-operator export, as sorted
/// `name type` lines (`cplink_server_dials counter`): the families each binary registers at
/// start, with the same calls (`Server::new`, `Agent::new`, the operator's `Metrics::default`).
/// OpenMetrics names a counter's samples `<name>_total` and a histogram's `<name>_bucket`,
/// `_sum` and `_count`.
pub fn exported_families() -> Result<String, std::fmt::Error> {
    let mut server = Registry::default();
    touch_server(cplink_server::metrics::Metrics::new(&mut server));
    let mut agent = Registry::default();
    touch_agent(cplink_agent::metrics::Metrics::new(&mut agent));
    let operator = cplink_operator::metrics::Metrics::default();
    touch_operator(&operator);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &server)?;
    prometheus_client::encoding::text::encode(&mut text, &agent)?;
    text.push_str(&operator.encode()?);
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(str::to_owned)
        .collect();
    Ok(families.into_iter().map(|family| family + "\n").collect())
}

// A family with no series is not encoded at all: each touch_* function gives every family of a
// binary's metrics one. The server's and agent's name every field, so that a metric added
// there does not compile here until it is listed.

fn touch_server(metrics: cplink_server::metrics::Metrics) {
    use cplink_server::metrics::{
        FrontendLabels, LinkErrorLabels, ListenerLabels, Metrics, RequestErrorLabels, ResultLabels,
        StrategyLabels,
    };
    let Metrics {
        agents_linked: _,
        streams_active: _,
        dials,
        routed,
        dial_duration: _,
        frontend_connections,
        request_errors,
        link_errors,
        identity_refusals,
        identity_revocations,
        connections_shed,
        bytes: _,
        konnectivity_overflows: _,
        lease_renewals,
        node_agent_waits,
        node_agent_wait_duration: _,
    } = metrics;
    for family in [&dials, &lease_renewals, &node_agent_waits] {
        family.get_or_create(&ResultLabels { result: "ok" }).inc();
    }
    routed
        .get_or_create(&StrategyLabels { strategy: "node" })
        .inc();
    let frontend = FrontendLabels { frontend: "tls" };
    frontend_connections.get_or_create(&frontend).inc();
    let reason = "test";
    request_errors
        .get_or_create(&RequestErrorLabels { reason })
        .inc();
    for family in [&link_errors, &identity_refusals, &identity_revocations] {
        family.get_or_create(&LinkErrorLabels { reason }).inc();
    }
    let listener = ListenerLabels { listener: "agent" };
    connections_shed.get_or_create(&listener).inc();
}

fn touch_agent(metrics: cplink_agent::metrics::Metrics) {
    use cplink_agent::metrics::{Metrics, ResultLabels};
    let Metrics {
        links_up: _,
        servers_known: _,
        link_attempts,
        streams_active: _,
        dials,
        dial_duration: _,
        bytes: _,
        konnectivity_overflows: _,
        keepalive_backoffs: _,
        keepalive_interval: _,
    } = metrics;
    for family in [&link_attempts, &dials] {
        family.get_or_create(&ResultLabels { result: "ok" }).inc();
    }
}

/// The operator's families through what the reconciler records: a failure, a link's full
/// status and its certificates.
fn touch_operator(metrics: &cplink_operator::metrics::Metrics) {
    use cplink_operator::crd::{AgentsStatus, ControlPlaneLinkStatus, ServerLinks, ServerStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    metrics.reconcile_failed("get");
    let status = ControlPlaneLinkStatus {
        conditions: cplink_operator::metrics::CONDITIONS
            .iter()
            .map(|type_| Condition {
                type_: (*type_).to_owned(),
                status: "True".to_owned(),
                reason: "Test".to_owned(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            })
            .collect(),
        server: Some(ServerStatus {
            replicas: 1,
            ready_replicas: 1,
            summary: "1/1".to_owned(),
            linked_agents: vec![ServerLinks {
                pod: "server".to_owned(),
                agents: Some(1),
            }],
        }),
        agents: Some(AgentsStatus {
            desired: 1,
            ready: 1,
            summary: "1/1".to_owned(),
        }),
        ..Default::default()
    };
    metrics.record_status("namespace", "link", &status);
    metrics.record_certificates("namespace", "link", &[("ca", 0)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_list_of_exported_metrics_is_current() {
        let path = crate::workspace::root().join(EXPORTED_FAMILIES_PATH);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        let exported = exported_families().expect("encodes");
        assert!(
            exported.lines().any(|l| l == "cplink_server_dials counter"),
            "{exported}"
        );
        assert!(
            exported
                .lines()
                .any(|l| l == "cplink_operator_certificate_expiry_timestamp_seconds gauge"),
            "{exported}"
        );
        assert!(
            exported == checked_in,
            "{EXPORTED_FAMILIES_PATH} is out of date; regenerate it with `make metric-names`"
        );
    }

    #[test]
    fn counters_add_up_matching_samples_only() {
        let metrics = "# HELP x\ncplink_server_dials_total{result=\"ok\"} 3\n\
                       cplink_server_dials_total{result=\"refused\"} 2\n\
                       cplink_server_dial_duration_seconds_count 5\n";
        assert_eq!(
            counter(metrics, "cplink_server_dials_total", "result=\"ok\""),
            3.0
        );
        assert_eq!(counter(metrics, "cplink_server_dials_total", ""), 5.0);
        assert_eq!(counter(metrics, "missing", ""), 0.0);
    }
}
