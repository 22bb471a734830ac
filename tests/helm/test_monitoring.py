"""The chart's monitoring: ServiceMonitor and PodMonitor, PrometheusRule, Grafana dashboard.

Every metric an alert or a dashboard panel names must be one the binaries export: the families
in exported-metrics.txt, which `make metric-names` writes from the very registrations
cplink-server, cplink-agent and cplink-operator make (a Rust test fails when it is stale).
Expressions are parsed with a real PromQL parser (promql-parser, pinned in requirements.txt).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml
from helm_python.errors import HelmValuesError

from test_chart import CHART, NAMESPACE, REPO, chart, one, render  # noqa: F401 (fixture)

EXPORTED = Path(__file__).parent / "exported-metrics.txt"
DASHBOARD = CHART / "files" / "dashboards" / "cplink.json"
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}
# Every alert the chart can render.
ALERTS = {
    "CplinkLinkNotReady",
    "CplinkServersUnavailable",
    "CplinkServerReplicasMissing",
    "CplinkAgentsMissing",
    "CplinkAgentLinksDown",
    "CplinkDialFailureRatioHigh",
    "CplinkCertificateExpiringSoon",
    "CplinkCertificateExpiryCritical",
    "CplinkKubeAPIServerRestartNeeded",
    "CplinkOperatorReconcileErrors",
    "CplinkOperatorDown",
}
ALL_ON = {
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafana": {"dashboard": {"enabled": True}},
}


def exported_series() -> set[str]:
    """The names of the series the binaries export, from their metric families as OpenMetrics
    names a family's samples."""
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["", "_sum", "_count"],
        "info": ["_info"],
        "unknown": [""],
    }
    names = set()
    for line in EXPORTED.read_text().splitlines():
        family, kind = line.split()
        names.update(family + suffix for suffix in suffixes[kind])
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """Every vector selector of a PromQL expression: its metric name and its equality
    matchers. Fails when the expression does not parse."""
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next(m.value for m in matchers if m.name == "__name__")
            equal = {m.name: m.value for m in matchers if m.op == promql_parser.MatchOp.Equal}
            found.append((name, equal))

    promql_parser.walk(promql_parser.parse(expr), visit)
    assert found, f"no metric in {expr!r}"
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus receives it: Grafana's interval variables become
    durations and the dashboard's own variables (used in regex matchers) match anything."""
    expr = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def rules(objects: list[dict]) -> list[dict]:
    rule = one(objects, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = []
    for panel in dashboard["panels"]:
        queries.extend(grafana_to_promql(t["expr"]) for t in panel.get("targets", []))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        queries.append(grafana_to_promql(match.group(1)))
    return queries


def test_exported_metrics_list_the_binaries_families():
    series = exported_series()
    for name in (
        "cplink_server_agents_linked",
        "cplink_server_dials_total",
        "cplink_server_dial_duration_seconds_bucket",
        "cplink_agent_links_up",
        "cplink_operator_reconciles_total",
        "cplink_operator_certificate_expiry_timestamp_seconds",
    ):
        assert name in series
    assert "cplink_server_dials" not in series, "a counter's samples end in _total"


def test_monitoring_is_off_by_default(chart):
    kinds = {o["kind"] for o in render(chart)}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "Service"}


def test_the_service_monitor_scrapes_the_operator_through_its_metrics_service(chart):
    objects = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}})
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/component"] == "monitoring"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True, "the per-link series keep their namespace and pod"
    assert endpoint["interval"] == "30s"


def operator_constant(path: str, name: str) -> str:
    source = (REPO / "operator" / "src" / path).read_text()
    match = re.search(rf'pub const {name}: &str = "([^"]+)";', source)
    assert match, f"{name} in {path}"
    return match.group(1)


def test_the_pod_monitor_selects_the_servers_and_agents_the_operator_runs(chart):
    objects = render(chart, {"serviceMonitor": {"enabled": True}})
    monitor = one(objects, "PodMonitor")
    spec = monitor["spec"]
    # The labels the operator puts on every server and agent pod (operator/src/resources).
    assert spec["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": operator_constant("resources/mod.rs", "APP_NAME"),
        "app.kubernetes.io/managed-by": operator_constant("resources/mod.rs", "MANAGED_BY"),
    }
    assert spec["selector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["server", "agent"]}
    ]
    assert spec["namespaceSelector"] == {"any": True}
    (endpoint,) = spec["podMetricsEndpoints"]
    # Both containers name their admin port so.
    for source in ("resources/deployment.rs", "resources/daemonset.rs"):
        assert f'container_port("{endpoint["port"]}", ' in (
            REPO / "operator" / "src" / source
        ).read_text()
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert targets["link"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
    # The operator's own pod is not selected: it is not managed by the operator.
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not spec["selector"]["matchLabels"].items() <= pod_labels.items()

    objects = render(
        chart,
        {"serviceMonitor": {"enabled": True, "podMonitor": {"namespaces": ["edge", "core"]}}},
    )
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["edge", "core"]
    }
    objects = render(chart, {"serviceMonitor": {"enabled": True, "podMonitor": {"enabled": False}}})
    assert [o for o in objects if o["kind"] == "PodMonitor"] == []


def test_every_alert_is_complete_and_has_a_runbook(chart):
    objects = render(chart, ALL_ON)
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = rules(objects)
    assert {a["alert"] for a in alerts} == ALERTS
    readme = (REPO / "README.md").read_text()
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"].strip(), name
        assert alert["annotations"]["description"].strip(), name
        assert alert["annotations"]["runbook_url"].endswith(f"README.md#{name.lower()}"), name
        assert f"\n#### {name}\n" in readme, f"README has no runbook entry for {name}"
        # The annotations are Prometheus templates, which Helm left alone; all but the
        # operator's absence name what they are about.
        text = alert["annotations"]["summary"] + alert["annotations"]["description"]
        assert ("{{ $labels." in text) != (name == "CplinkOperatorDown"), name
    severities = {a["alert"]: a["labels"]["severity"] for a in alerts}
    assert severities["CplinkServersUnavailable"] == "critical"
    assert severities["CplinkCertificateExpiryCritical"] == "critical"


def exported_conditions() -> set[str]:
    """The `condition` label values of `cplink_operator_link_condition`: the operator's
    `metrics::CONDITIONS`, each a constant of `status.rs`."""
    source = REPO / "operator" / "src"
    listed = re.search(
        r"pub const CONDITIONS: \[&str; \d+\] = \[([^\]]*)\]", (source / "metrics.rs").read_text()
    )
    assert listed, "operator/src/metrics.rs has no CONDITIONS"
    values = dict(
        re.findall(r'pub const ([A-Z_]+): &str = "([^"]+)";', (source / "status.rs").read_text())
    )
    names = [name.strip() for name in listed.group(1).split(",") if name.strip()]
    return {values[name] for name in names}


def test_the_exported_conditions_are_read_from_the_operator():
    assert {"Ready", "ServerAvailable", "EgressCertificateExpiring"} <= exported_conditions()


def test_alerts_and_dashboard_name_only_metrics_the_binaries_export(chart):
    series = exported_series()
    objects = render(chart, ALL_ON)
    expressions = [a["expr"] for a in rules(objects)]
    dashboard = json.loads(one(objects, "ConfigMap")["data"]["cplink.json"])
    expressions += dashboard_queries(dashboard)
    named = set()
    for expr in expressions:
        for name, matchers in selectors(expr):
            named.add(name)
            assert name in series | PROMETHEUS_SERIES, f"{name} in {expr!r} is not exported"
            if name == "cplink_operator_link_condition" and "condition" in matchers:
                assert matchers["condition"] in exported_conditions(), expr
    # What the alerts need, and the panels the dashboard promises.
    for needed in (
        "cplink_operator_link_condition",
        "cplink_operator_link_agents_desired",
        "cplink_operator_link_server_agents_linked",
        "cplink_operator_certificate_expiry_timestamp_seconds",
        "cplink_server_agents_linked",
        "cplink_server_dials_total",
        "cplink_server_dial_duration_seconds_bucket",
        "cplink_server_tunnel_bytes_total",
        "cplink_server_streams_active",
        "cplink_server_konnectivity_overflows_total",
        "cplink_agent_links_up",
    ):
        assert needed in named, needed


def test_a_misspelt_metric_would_be_caught():
    series = exported_series()
    ((name, _),) = selectors("rate(cplink_server_dial_total[5m])")
    assert name not in series
    with pytest.raises(ValueError):
        selectors("sum by (le (rate(x[5m]))")


def test_thresholds_labels_and_disabled_alerts_follow_the_values(chart):
    values = {
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "kps"},
            "alertLabels": {"team": "platform"},
            "disabled": {"CplinkAgentLinksDown": True},
            "dialFailureRatio": 0.2,
            "dialFailureMinimumDials": 100,
            "certificateExpiryWarningSeconds": 2592000,
            "certificateExpiryCriticalSeconds": 172800,
            "runbookBaseURL": "https://wiki.example/cplink",
        }
    }
    objects = render(chart, values)
    assert one(objects, "PrometheusRule")["metadata"]["labels"]["release"] == "kps"
    alerts = {a["alert"]: a for a in rules(objects)}
    assert "CplinkAgentLinksDown" not in alerts
    assert "CplinkOperatorDown" not in alerts, "without a ServiceMonitor no job is known"
    assert all(a["labels"]["team"] == "platform" for a in alerts.values())
    ratio = alerts["CplinkDialFailureRatioHigh"]["expr"]
    assert "> 0.2" in ratio and ">= 100" in ratio, ratio
    assert "< 2592000" in alerts["CplinkCertificateExpiringSoon"]["expr"], "no 2.592e+06"
    assert "< 172800" in alerts["CplinkCertificateExpiryCritical"]["expr"]
    url = alerts["CplinkLinkNotReady"]["annotations"]["runbook_url"]
    assert url == "https://wiki.example/cplink#cplinklinknotready"


def test_the_operator_down_alert_names_the_scraped_job(chart):
    objects = render(chart, ALL_ON)
    (down,) = [a for a in rules(objects) if a["alert"] == "CplinkOperatorDown"]
    service = one(objects, "Service")["metadata"]["name"]
    job = {"job": service, "namespace": NAMESPACE}
    assert selectors(down["expr"]) == [("up", job), ("cplink_operator_leader", job)]


def test_the_dashboard_is_a_configmap_for_the_grafana_sidecar(chart):
    objects = render(chart, {"grafana": {"dashboard": {"enabled": True}}})
    config_map = one(objects, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    (key,) = config_map["data"]
    dashboard = json.loads(config_map["data"][key])
    assert dashboard == json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cplink-overview"
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles)), titles
    for wanted in (
        "Links ready",
        "Agents per server",
        "Dials/s by result",
        "Dial latency",
        "Tunnel bytes/s",
        "Active streams",
        "Overflows and shed connections",
        "Certificate expiry",
    ):
        assert wanted in titles
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]

    objects = render(
        chart,
        {
            "grafana": {
                "dashboard": {
                    "enabled": True,
                    "namespace": "monitoring",
                    "labels": {"grafana_dashboard": "1", "team": "platform"},
                    "annotations": {"grafana_folder": "Tunnels"},
                }
            }
        },
    )
    config_map = one(objects, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["team"] == "platform"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Tunnels"}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"crds": {"enabled": "yes"}}, "/crds/enabled"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"serviceMonitor": {"podMonitor": {"namespaces": "edge"}}}, "/serviceMonitor/podMonitor"),
        ({"prometheusRule": {"dialFailureRatio": 2}}, "/prometheusRule/dialFailureRatio"),
        (
            {"prometheusRule": {"certificateExpiryWarningSeconds": "7d"}},
            "/prometheusRule/certificateExpiryWarningSeconds",
        ),
        ({"grafana": {"dashboard": {"labels": {"a": 1}}}}, "/grafana/dashboard/labels"),
    ],
)
def test_schema_rejects_wrong_monitoring_values(chart, values, named):
    with pytest.raises(HelmValuesError) as error:
        render(chart, values)
    assert named in str(error.value)


def test_a_group_whose_alerts_are_all_disabled_is_left_out(chart):
    certificates = {
        "CplinkCertificateExpiringSoon": True,
        "CplinkCertificateExpiryCritical": True,
        "CplinkKubeAPIServerRestartNeeded": True,
    }
    objects = render(chart, {"prometheusRule": {"enabled": True, "disabled": certificates}})
    groups = one(objects, "PrometheusRule")["spec"]["groups"]
    assert [g["name"] for g in groups] == ["cplink.links", "cplink.operator"]
    assert all(g["rules"] for g in groups)

    everything = {name: True for name in ALERTS}
    objects = render(chart, {**ALL_ON, "prometheusRule": {"enabled": True, "disabled": everything}})
    assert [o for o in objects if o["kind"] == "PrometheusRule"] == []
