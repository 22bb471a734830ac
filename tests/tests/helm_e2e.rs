//! The Helm chart on a real control plane and two real nodes (kubelet and containerd, cplink
//! running from its image), through the real Helm engine: `install` runs the operator as a pod
//! with nothing but the chart's RBAC and a link from the values becomes Ready, one of its two replicas holding the leader Lease; `upgrade` with a changed value rolls
//! the operator and the Lease passes to a new pod; `uninstall` (after the link is
//! removed, as the chart's NOTES say) leaves none of the release's objects behind. On the way,
//! the pods' metrics are read: every family is one the chart may name, and the operator
//! reports the link.

use std::net::SocketAddr;
use std::time::Duration;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::stack::{
    self, Egress, FRONTEND_SERVICE, LINK, NAMESPACE, OPERATOR, RELEASE, STEP, Stack, StackOptions,
};
use cplink_e2e::{metrics, wait, workspace};
use serde_json::json;

/// The release's link, from values: one server, its frontend Service reached through the
/// forwarder (which serves the Services of a link named [`LINK`]), agents finding the servers
/// in the cluster.
fn link_values(stack: &Stack, create: bool) -> serde_json::Value {
    json!({
        "create": create,
        "name": LINK,
        "spec": {
            "server": {
                "replicas": 1,
                "frontend": {
                    "externalAddress": stack.forwarder.address(FRONTEND_SERVICE).to_string(),
                },
            },
            "network": { "podCIDRs": [stack.nodes.range()] },
        },
    })
}

fn operator_pods(stack: &Stack) -> anyhow::Result<Vec<String>> {
    Ok(stack
        .plane
        .kubectl_ok(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=operator",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// Waits until one of `pods` holds the operator's leader Lease (named after the release) and
/// returns it.
async fn wait_leader(stack: &Stack, pods: &[String]) -> anyhow::Result<String> {
    let holder = stack
        .plane
        .wait_kubectl(
            "an operator pod to hold the leader Lease",
            STEP,
            &[
                "get",
                "lease",
                RELEASE,
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            |holder| pods.iter().any(|pod| pod == holder),
        )
        .await?;
    Ok(holder)
}

/// Admin ports of the chart's operator (`adminPort`) and of the link's servers and agents.
const ADMIN_PORTS: [(&str, u16); 3] = [("operator", 8080), ("server", 8095), ("agent", 8096)];

/// Every family the running pods export is one the chart's alerts and dashboard may name
/// (`tests/helm/exported-metrics.txt`), and the operator reports the link it made Ready: its
/// condition, each server pod's linked agents and every certificate's expiry.
async fn scrape_metrics(stack: &Stack) -> anyhow::Result<()> {
    let listed = std::fs::read_to_string(workspace::root().join(metrics::EXPORTED_FAMILIES_PATH))?;
    let link = format!("namespace=\"{NAMESPACE}\",link=\"{LINK}\"");
    let servers = stack.pods("server")?;
    let last = std::sync::Mutex::new(String::new());
    let (servers_ref, link_ref, last_ref) = (&servers, &link, &last);
    wait::until_async(
        "the operator to report every agent linked",
        STEP,
        || async move {
            let mut pages = String::new();
            for (_, _, ip) in stack.pods("operator").unwrap_or_default() {
                let Ok(ip) = ip.parse() else {
                    continue;
                };
                let address = SocketAddr::new(ip, ADMIN_PORTS[0].1);
                if let Ok(page) = stack.admin_get(address, "/metrics").await {
                    pages.push_str(&page);
                }
            }
            let linked = servers_ref.iter().all(|(pod, _, _)| {
                let linked = format!(
                    "cplink_operator_link_server_agents_linked{{{link_ref},pod=\"{pod}\"}} 2"
                );
                pages.lines().any(|l| l == linked)
            });
            *last_ref
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = pages;
            linked
        },
    )
    .await
    .map_err(|e| e.context(last.lock().map(|l| l.clone()).unwrap_or_default()))?;
    let operator = last.into_inner().unwrap_or_default();
    let ready = format!("cplink_operator_link_condition{{{link},condition=\"Ready\"}} 1");
    assert!(operator.lines().any(|l| l == ready), "{operator}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    for certificate in ["ca", "server", "agent", "apiserver"] {
        let series = format!(
            "cplink_operator_certificate_expiry_timestamp_seconds{{{link},certificate=\"{certificate}\"}} "
        );
        let expiry = operator
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse::<f64>().ok());
        assert!(expiry.is_some_and(|t| t > now), "{certificate}: {operator}");
    }
    for (component, port) in ADMIN_PORTS {
        let pods = stack.pods(component)?;
        anyhow::ensure!(!pods.is_empty(), "no {component} pod");
        for (pod, _, ip) in pods {
            let page = stack
                .admin_get(SocketAddr::new(ip.parse()?, port), "/metrics")
                .await?;
            for family in page.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
                assert!(
                    listed.lines().any(|l| l == family),
                    "{component} {pod} exports {family:?}, missing from {}: run `make metric-names`",
                    metrics::EXPORTED_FAMILIES_PATH
                );
            }
        }
    }
    Ok(())
}

/// How long the test may take.
const DEADLINE: Duration = Duration::from_secs(420);

#[test]
fn chart_installs_upgrades_and_uninstalls() -> anyhow::Result<()> {
    harness::run(
        "chart_installs_upgrades_and_uninstalls",
        DEADLINE,
        install_upgrade_uninstall,
    )
}

async fn install_upgrade_uninstall(steps: Steps) -> anyhow::Result<()> {
    // The stack installs the chart with default values and waits for the operator pods.
    steps.enter("starting the stack on two real nodes: installing the chart");
    let stack = Stack::start(
        StackOptions {
            nodes: 2,
            servers: 1,
        },
        Egress::HttpConnect,
    )
    .await?;
    let crd =
        stack
            .plane
            .kubectl_ok(&["get", "crd", "controlplanelinks.cplink.dev", "-o", "name"])?;
    assert_eq!(
        crd.trim(),
        "customresourcedefinition.apiextensions.k8s.io/controlplanelinks.cplink.dev"
    );
    let first = operator_pods(&stack)?;
    assert_eq!(first.len(), stack::OPERATOR_REPLICAS, "{first:?}");
    // One of the two replicas leads, with nothing but the chart's Role for its Lease.
    let leader = wait_leader(&stack, &first).await?;

    // A link from values: the operator, holding only the chart's permissions, rolls it out.
    steps.enter("upgrading with a link in the values");
    stack.helm.upgrade(
        NAMESPACE,
        RELEASE,
        &stack::chart_values(&[("link", link_values(&stack, true))]),
    )?;
    stack
        .plane
        .wait_kubectl(
            "the link from values to be ready",
            STEP,
            &["get", "controlplanelinks", "-n", NAMESPACE],
            |table| {
                table.lines().any(|row| {
                    row.split_whitespace().take(4).collect::<Vec<_>>()
                        == [LINK, "True", "1/1", "2/2"]
                })
            },
        )
        .await
        .map_err(|e| e.context(stack.diagnostics()))?;
    steps.enter("reading the operator's, servers' and agents' metrics");
    scrape_metrics(&stack).await?;
    // From the nodes' disks: kube-apiserver is not wired to the link, so it cannot reach the
    // kubelets.
    for pod in &first {
        let log = stack.nodes.pod_log(NAMESPACE, pod);
        anyhow::ensure!(!log.is_empty(), "no log of {pod} on the nodes");
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "the chart's RBAC is enough: {log}"
        );
        assert_eq!(
            log.contains("became the leader"),
            *pod == leader,
            "only {leader} leads: {pod}: {log}"
        );
    }

    // Upgrade with a changed value: the Deployment changes and a new operator pod takes over.
    steps.enter("upgrading with changed logging values");
    stack.helm.upgrade(
        NAMESPACE,
        RELEASE,
        &stack::chart_values(&[
            ("link", link_values(&stack, true)),
            ("logging", json!({ "level": "debug", "format": "json" })),
        ]),
    )?;
    let args = stack.plane.kubectl_ok(&[
        "get",
        "deployment",
        OPERATOR,
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ])?;
    assert!(args.contains("--log-format=json"), "{args}");
    stack.wait_operator_ready().await?;
    let mut pods = Vec::new();
    wait::until("new operator pods to replace the old ones", STEP, || {
        pods = operator_pods(&stack).unwrap_or_default();
        pods.len() == stack::OPERATOR_REPLICAS && pods.iter().all(|pod| !first.contains(pod))
    })
    .await
    .map_err(|e| e.context(format!("operator pods {pods:?}, before {first:?}")))?;
    // The old leader released the Lease as it stopped; a new pod holds it.
    wait_leader(&stack, &pods).await?;

    // The NOTES' way out: drop the link (the operator removes its cluster-scoped RBAC), then
    // uninstall.
    steps.enter("dropping the link from the values");
    stack.helm.upgrade(
        NAMESPACE,
        RELEASE,
        &stack::chart_values(&[("link", link_values(&stack, false))]),
    )?;
    stack
        .plane
        .wait_kubectl(
            "the link and its children to be gone",
            STEP,
            &[
                "get",
                "controlplanelinks,deployments,daemonsets,secrets,clusterroles",
                "-A",
                "-l",
                "app.kubernetes.io/managed-by=cplink-operator",
                "-o",
                "name",
            ],
            |out| out.trim().is_empty(),
        )
        .await?;
    steps.enter("uninstalling the release");
    stack.helm.uninstall(NAMESPACE, RELEASE)?;
    // The operator's pods stop within their grace period, and a busy node's kubelet takes
    // about as long again to report them gone.
    stack
        .plane
        .wait_kubectl(
            "every object of the release to be gone",
            2 * STEP,
            &[
                "get",
                "deployments,pods,serviceaccounts,services,clusterroles,clusterrolebindings,\
                 roles,rolebindings,poddisruptionbudgets,controlplanelinks",
                "-A",
                "-l",
                &format!("app.kubernetes.io/instance={RELEASE}"),
                "-o",
                "name",
            ],
            |out| out.trim().is_empty(),
        )
        .await?;
    let releases = stack
        .plane
        .kubectl_ok(&["get", "secrets", "-n", NAMESPACE, "-o", "name"])?;
    assert!(
        !releases.contains("sh.helm.release"),
        "release history removed: {releases}"
    );
    println!(
        "the chart on {} real nodes: installed, its two operator replicas with only the chart's \
         RBAC elected {leader} and made the link from values Ready; every exported metric family \
         is listed; an upgrade rolled the operator and the Lease moved to a new pod; the link \
         dropped from the values took its children with it; uninstall left nothing",
        stack.nodes.nodes().len()
    );
    steps.enter("stopping the stack");
    stack.stop_leaving_nothing()
}
