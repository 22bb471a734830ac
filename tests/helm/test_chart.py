"""The Helm chart, rendered and linted offline by the real Helm engine (helm-python-sdk).

Run with `pytest tests/helm` (part of `make test`). The install, upgrade and uninstall on a
real control plane are in tests/tests/helm_e2e.rs, which drives helmctl.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from helm_python import chart as helm_chart
from helm_python.errors import HelmRenderError, HelmValuesError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cplink"
CRD = "controlplanelinks.cplink.dev.yaml"
NAMESPACE = "cplink-system"


@pytest.fixture(scope="module")
def chart() -> helm_chart.Chart:
    return helm_chart.Chart.load(CHART)


def render(chart: helm_chart.Chart, values: dict | None = None, name: str = "cplink") -> list[dict]:
    """Every object the chart renders, parsed."""
    manifests = chart.render(values or {}, name=name, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def notes(chart: helm_chart.Chart, values: dict | None = None) -> str:
    manifests = chart.render(values or {}, name="cplink", namespace=NAMESPACE, is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def test_lint_reports_no_errors_or_warnings():
    for values in (None, yaml.safe_load((Path(__file__).parent / "full-values.yaml").read_text())):
        report = helm_chart.lint(CHART, values, strict=True)
        assert report["errors"] == [], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], report


def test_chart_version_follows_the_workspace(chart):
    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert chart.version == workspace
    assert chart.metadata["appVersion"] == workspace
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.metadata["type"] == "application"
    for field in ("kubeVersion", "description", "keywords", "home", "sources", "maintainers"):
        assert chart.metadata.get(field), field


def test_the_charts_crd_is_the_generated_one(chart):
    generated = (REPO / "crds" / CRD).read_text()
    assert (CHART / "files" / "crds" / CRD).read_text() == generated, "run `make crds`"
    # Not under crds/, which Helm installs once and never upgrades: templates/crds.yaml.
    assert chart.crds == []
    assert not (CHART / "crds").exists()


def test_the_crd_renders_as_generated_with_the_releases_labels_and_keep(chart):
    generated = yaml.safe_load((REPO / "crds" / CRD).read_text())
    crd = one(render(chart), "CustomResourceDefinition")
    metadata = crd["metadata"]
    labels = metadata.pop("labels")
    annotations = metadata.pop("annotations")
    assert crd == generated, "the template changes nothing but labels and annotations"
    assert labels == {
        "helm.sh/chart": f"cplink-{chart.version}",
        "app.kubernetes.io/name": "cplink",
        "app.kubernetes.io/instance": "cplink",
        "app.kubernetes.io/version": chart.metadata["appVersion"],
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/component": "crds",
    }
    assert annotations == {"helm.sh/resource-policy": "keep"}


def test_the_crd_follows_crds_enabled_and_keep(chart):
    crd = one(render(chart, {"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]
    assert crd["metadata"]["labels"]["app.kubernetes.io/component"] == "crds"
    objects = render(chart, {"crds": {"enabled": False}})
    assert "CustomResourceDefinition" not in {o["kind"] for o in objects}


# Values whose defaults are Kubernetes objects, documented as a whole.
FREE_FORM = {"podSecurityContext", "securityContext", "resources"}


def test_every_value_is_documented():
    """A comment stands directly above every key of values.yaml (a block holding one key may
    share its comment); keys inside Kubernetes objects are documented by the object's."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        key = stripped.split(":", 1)[0].lstrip("- ")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        exempt = any(parent in FREE_FORM for _, parent in parents)
        parents.append((indent, key))
        if exempt or stripped.startswith("-"):
            continue
        previous = lines[number - 1].strip() if number else ""
        is_parent = previous.endswith(":") and not previous.startswith("#")
        assert previous.startswith("#") or is_parent, f"values.yaml:{number + 1}: {line}"


def test_default_render(chart):
    objects = render(chart)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["helm.sh/chart"] == f"cplink-{chart.version}"
        assert labels["app.kubernetes.io/name"] == "cplink"
        assert labels["app.kubernetes.io/instance"] == "cplink"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"

    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "cplink"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    image = f"ghcr.io/cplink/cplink:{chart.metadata['appVersion']}"
    assert container["image"] == image
    assert container["command"] == ["cplink-operator"]
    assert f"--default-image={image}" in container["args"]
    assert "--admin-address=$(CPLINK_POD_IP):8080" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["memory"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    (role,) = [
        o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "cplink"
    ]
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules[("cplink.dev", "controlplanelinks")] == {"get", "list", "watch", "patch"}
    assert rules[("cplink.dev", "controlplanelinks/status")] == {"patch"}
    assert "delete" in rules[("rbac.authorization.k8s.io", "clusterroles")]
    assert all("*" not in verbs for verbs in rules.values()), "no wildcards"
    assert all(resource != "*" for _, resource in rules)
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cplink", "namespace": NAMESPACE}
    ]


def args_of(deployment: dict) -> list[str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]


def test_two_replicas_elect_a_leader_roll_and_keep_one_up_by_default(chart):
    objects = render(chart)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    # A new pod stands by until the old leader releases the Lease; none goes before its
    # replacement is ready.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    args = args_of(deployment)
    for flag in (
        "--leader-elect",
        "--leader-elect-resource-name=cplink",
        f"--leader-elect-resource-namespace={NAMESPACE}",
        "--leader-elect-lease-duration=15s",
        "--leader-elect-renew-deadline=10s",
        "--leader-elect-retry-period=2s",
    ):
        assert flag in args, (flag, args)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    identity = next(e for e in container["env"] if e["name"] == "CPLINK_LEADER_ELECT_IDENTITY")
    assert identity["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    selector = deployment["spec"]["selector"]["matchLabels"]
    spread = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (preferred,) = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert preferred["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in spread

    budget = one(objects, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["metadata"]["namespace"] == NAMESPACE
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}

    role = one(objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["cplink"],
            "verbs": ["get", "update"],
        },
    ]
    binding = one(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cplink", "namespace": NAMESPACE}
    ]


def test_one_replica_without_leader_election_is_recreated(chart):
    objects = render(chart, {"replicas": 1, "leaderElection": {"enabled": False}})
    assert sorted(o["kind"] for o in objects) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
    ]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in args_of(deployment) if a.startswith("--leader-elect")]
    assert "affinity" not in deployment["spec"]["template"]["spec"]


def test_one_replica_with_leader_election_rolls_without_a_budget(chart):
    objects = render(chart, {"replicas": 1})
    assert "PodDisruptionBudget" not in [o["kind"] for o in objects]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--leader-elect" in args_of(deployment)
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    one(objects, "Role")


def test_several_replicas_need_leader_election(chart):
    with pytest.raises(HelmRenderError, match="replicas > 1 needs leaderElection.enabled"):
        render(chart, {"leaderElection": {"enabled": False}})


@pytest.mark.parametrize(
    ("budget", "spec"),
    [
        ({"minAvailable": "50%"}, {"minAvailable": "50%"}),
        ({"maxUnavailable": 1}, {"maxUnavailable": 1}),
        ({"minAvailable": 2}, {"minAvailable": 2}),
    ],
)
def test_the_budget_takes_min_available_or_max_unavailable(chart, budget, spec):
    objects = render(chart, {"replicas": 3, "podDisruptionBudget": budget})
    rendered = one(objects, "PodDisruptionBudget")["spec"]
    rendered.pop("selector")
    assert rendered == spec


def test_the_budget_refuses_both_bounds_and_can_be_left_out(chart):
    with pytest.raises(HelmRenderError, match="set minAvailable or maxUnavailable, not both"):
        render(chart, {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}})
    objects = render(chart, {"podDisruptionBudget": {"enabled": False}})
    assert "PodDisruptionBudget" not in [o["kind"] for o in objects]


def test_the_viewer_role_reads_links_pods_and_their_debug_views_only(chart):
    objects = render(chart)
    (viewer,) = [o for o in objects if o["metadata"]["name"] == "cplink-viewer"]
    assert viewer["kind"] == "ClusterRole"
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in viewer["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("cplink.dev", "controlplanelinks"): ["get", "list"],
        ("", "pods"): ["get", "list"],
        ("", "pods/proxy"): ["get"],
        ("apps", "deployments"): ["get"],
    }
    off = render(chart, {"rbac": {"viewer": False}})
    assert all(o["metadata"]["name"] != "cplink-viewer" for o in off)


def test_every_option_renders(chart):
    values = yaml.safe_load((Path(__file__).parent / "full-values.yaml").read_text())
    objects = render(chart, values)
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == "edge-tunnel"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "tunnel"
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "platform"
    assert template["metadata"]["annotations"] == {"example.com/scrape": "true"}
    pod = template["spec"]
    assert pod["serviceAccountName"] == "tunnel-operator"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    # Helm merges maps with the defaults: the given keys win, the other defaults stay.
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/cplink/cplink:9.9.9"
    assert container["imagePullPolicy"] == "Always"
    assert "--default-image=registry.example/cplink/cplink:9.9.9" in container["args"]
    assert "--admin-address=$(CPLINK_POD_IP):9090" in container["args"]
    assert "--log-level=cplink_operator=debug,kube=info" in container["args"]
    assert "--log-format=json" in container["args"]
    assert container["args"][-1] == "--log-level=trace", "extra args come last"
    assert {"name": "NO_COLOR", "value": "1"} in container["env"]
    assert container["ports"][0]["containerPort"] == 9090
    assert container["securityContext"]["privileged"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == values["resources"]
    assert deployment["spec"]["replicas"] == 3
    for flag in (
        "--leader-elect-resource-name=edge-leader",
        "--leader-elect-lease-duration=20s",
        "--leader-elect-renew-deadline=12s",
        "--leader-elect-retry-period=3s",
    ):
        assert flag in container["args"], (flag, container["args"])
    budget = one(objects, "PodDisruptionBudget")
    assert budget["metadata"]["name"] == "edge-tunnel"
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    assert one(objects, "Role")["rules"][1]["resourceNames"] == ["edge-leader"]
    assert one(objects, "RoleBinding")["subjects"][0]["name"] == "tunnel-operator"

    assert all(o["metadata"]["name"] != "edge-tunnel-viewer" for o in objects)
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["name"] == "tunnel-operator"
    assert account["metadata"]["annotations"] == {"example.com/owner": "platform"}
    service = one(objects, "Service")
    assert service["metadata"]["name"] == "edge-tunnel-metrics"
    assert service["spec"]["ports"][0]["port"] == 9191
    assert service["spec"]["ports"][0]["targetPort"] == "admin"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    link = one(objects, "ControlPlaneLink")
    assert link["apiVersion"] == "cplink.dev/v1alpha1"
    assert link["metadata"]["name"] == "edge"
    assert link["metadata"]["namespace"] == NAMESPACE
    assert link["metadata"]["labels"]["app.kubernetes.io/component"] == "link"
    assert link["spec"] == {"server": {"replicas": 2}}
    assert "helm upgrade" in notes(chart, values)


def test_existing_service_account_and_no_rbac(chart):
    objects = render(
        chart, {"serviceAccount": {"create": False, "name": "mine"}, "rbac": {"create": False}}
    )
    assert sorted(o["kind"] for o in objects) == [
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
    ]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mine"


def test_an_existing_service_account_must_be_named(chart):
    with pytest.raises(HelmRenderError, match="serviceAccount.name must name an existing"):
        render(chart, {"serviceAccount": {"create": False}})


def test_release_name_containing_the_chart_name_is_not_repeated(chart):
    objects = render(chart, name="my-cplink")
    assert one(objects, "Deployment")["metadata"]["name"] == "my-cplink"
    objects = render(chart, name="tunnels")
    assert one(objects, "Deployment")["metadata"]["name"] == "tunnels-cplink"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"adminPort": "8080"}, "/adminPort"),
        ({"adminPort": 70000}, "/adminPort"),
        ({"replica": 2}, "'replica'"),
        ({"replicas": -1}, "/replicas"),
        ({"replicas": "2"}, "/replicas"),
        ({"leaderElection": {"enabled": "yes"}}, "/leaderElection/enabled"),
        ({"leaderElection": {"leaseDuration": "15"}}, "/leaderElection/leaseDuration"),
        ({"leaderElection": {"leaseDuration": "1500ms"}}, "/leaderElection/leaseDuration"),
        ({"leaderElection": {"retryPeriod": 2}}, "/leaderElection/retryPeriod"),
        ({"leaderElection": {"leaseName": "Not_A_Name"}}, "/leaderElection/leaseName"),
        ({"leaderElection": {"lease": "x"}}, "'lease'"),
        ({"podDisruptionBudget": {"minAvailable": "half"}}, "/podDisruptionBudget/minAvailable"),
        ({"podDisruptionBudget": {"maxUnavailable": -1}}, "/podDisruptionBudget/maxUnavailable"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"tag": 1}}, "/image/tag"),
        ({"logging": {"format": "xml"}}, "/logging/format"),
        ({"link": {"create": "yes"}}, "/link/create"),
        ({"link": {"name": "Not_A_Name"}}, "/link/name"),
        ({"link": {"spec": []}}, "/link/spec"),
        ({"metrics": {"service": {"enabled": 1}}}, "/metrics/service/enabled"),
        ({"extraArgs": "--verbose"}, "/extraArgs"),
        ({"tolerations": {"key": "x"}}, "/tolerations"),
    ],
)
def test_schema_rejects_wrong_values_and_names_them(chart, values, named):
    with pytest.raises(HelmValuesError) as error:
        render(chart, values)
    assert named in str(error.value)
