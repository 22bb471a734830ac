"""The operator's ClusterRole in the chart covers what the operator does for each link's mode.

Kubernetes refuses to let the operator grant a permission it does not hold itself (it has no
`bind` or `escalate`), so the rules it grants to tunnel servers and agents must be in its own
ClusterRole; operator/src/resources/rbac.rs checks the same from the Rust side, against the
builders themselves. Rendered by the real Helm engine, as in test_chart.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helm_python import chart as helm_chart

CHART = Path(__file__).resolve().parents[2] / "charts" / "cplink"


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    """Every object of the chart, as rendered by default."""
    chart = helm_chart.Chart.load(CHART)
    manifests = chart.render({}, name="cplink", namespace="cplink-system", is_install=True)
    return [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def held(objects) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of the operator's ClusterRole, as rendered by default."""
    (role,) = [
        o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "cplink"
    ]
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs.setdefault((group, resource), set()).update(rule["verbs"])
    return verbs


# What the operator grants the servers of a link: reviewing agents' tokens and reading Nodes
# cluster-wide; reading agent pods and, with server.publishLeases, writing their Leases in the
# link's namespace.
SERVER_GRANTS = [
    ("authentication.k8s.io", "tokenreviews", {"create"}),
    ("", "nodes", {"get", "list", "watch"}),
    ("", "pods", {"get", "list", "watch"}),
    ("coordination.k8s.io", "leases", {"get", "create", "patch", "delete"}),
]
# What it grants in-cluster agents: their Node, server discovery.
AGENT_GRANTS = [
    ("", "nodes", {"get"}),
    ("discovery.k8s.io", "endpointslices", {"list", "watch"}),
]


@pytest.mark.parametrize(("group", "resource", "verbs"), SERVER_GRANTS + AGENT_GRANTS)
def test_the_operator_holds_what_it_grants(held, group, resource, verbs):
    assert verbs <= held.get((group, resource), set()), (group, resource)


# What a link switched to agents outside the cluster (agent.authentication: certificate) no
# longer has: the operator deletes the agent DaemonSet, the agents' ServiceAccount and the
# Roles of agents and servers.
REMOVED = [
    ("apps", "daemonsets"),
    ("", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
]


@pytest.mark.parametrize("resource", REMOVED)
def test_the_operator_may_remove_in_cluster_agents_when_a_link_switches_to_certificates(
    held, resource
):
    assert "delete" in held[resource], resource


def test_nothing_lets_the_operator_sidestep_escalation_checks(held):
    for (group, resource), verbs in held.items():
        assert not {"bind", "escalate", "impersonate", "*"} & verbs, (group, resource, verbs)


def test_the_operator_may_take_and_renew_its_own_lease_and_nothing_more(objects):
    """Leader election (operator/src/election/store.rs) reads the Lease (get), creates it when
    missing (create) and writes it with the resourceVersion read (update): on the Lease the
    operator's arguments name, in the release's namespace."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    flags = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    lease = flags["--leader-elect-resource-name"]
    assert flags["--leader-elect-resource-namespace"] == "cplink-system"
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "cplink-system"
    granted: dict[str | None, set[str]] = {}
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["coordination.k8s.io"], rule
        assert rule["resources"] == ["leases"], rule
        for name in rule.get("resourceNames", [None]):
            granted.setdefault(name, set()).update(rule["verbs"])
    # create cannot be limited by name: the name is in the request body.
    assert granted == {None: {"create"}, lease: {"get", "update"}}
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == deployment["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
