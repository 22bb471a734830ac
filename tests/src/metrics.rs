//! Reading the Prometheus text that servers' and agents' admin endpoints serve.

/// The sum of a Prometheus counter's samples whose labels contain `labels`.
pub fn counter(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

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
