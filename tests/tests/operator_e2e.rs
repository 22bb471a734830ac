//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler from `scripts/kube.sh`), driven with the real `kubectl`: the CRD's schema
//! rejects invalid links, the example link is rolled out with every child, hand-made damage is
//! repaired, and deleting the link removes everything it created.

use std::time::Duration;

use cplink_e2e::binaries::Operator;
use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::stack;
use cplink_e2e::workspace;

const NAMESPACE: &str = "cplink-system";
/// How long one wait for the operator may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long the whole test may take: it takes 30 to 90 s.
const TEST_DEADLINE: Duration = Duration::from_secs(300);

fn get_json(plane: &ControlPlane, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = plane.kubectl_ok(&all).expect("kubectl get");
    serde_json::from_str(&out).expect("kubectl printed JSON")
}

/// Every namespaced child of the example link `edge`, as `kind/name`.
const CHILDREN: &[&str] = &[
    "serviceaccount/edge-server",
    "serviceaccount/edge-agent",
    "role/edge-agent",
    "rolebinding/edge-agent",
    "secret/edge-ca",
    "secret/edge-server-tls",
    "secret/edge-agent-tls",
    "secret/edge-apiserver-egress",
    "service/edge-frontend",
    "service/edge-agent-endpoint",
    "deployment/edge-server",
    "daemonset/edge-agent",
];
const CLUSTER_CHILDREN: &[&str] = &[
    "clusterrole/cplink:cplink-system:edge:agent",
    "clusterrolebinding/cplink:cplink-system:edge:agent",
];

#[test]
fn operator_rolls_out_repairs_and_cleans_up_a_link() -> anyhow::Result<()> {
    harness::run(
        "operator_rolls_out_repairs_and_cleans_up_a_link",
        TEST_DEADLINE,
        roll_out_repair_clean_up,
    )
}

async fn roll_out_repair_clean_up(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane and installing the CRD");
    let mut plane = ControlPlane::start(Options::default()).await?;
    stack::install_crd(&plane).await?;
    plane.kubectl_ok(&["create", "namespace", NAMESPACE])?;

    // The schema rejects an invalid link before any controller sees it.
    steps.enter("invalid links rejected by the schema");
    let invalid = plane.dir().join("invalid.yaml");
    std::fs::write(
        &invalid,
        "apiVersion: cplink.dev/v1alpha1\nkind: ControlPlaneLink\nmetadata:\n  name: bad\n  \
         namespace: cplink-system\nspec:\n  server:\n    replicas: 0\n",
    )?;
    let rejected = plane
        .kubectl(&["apply", "-f", &invalid.display().to_string()])
        .output()?;
    let message = String::from_utf8_lossy(&rejected.stderr);
    assert!(!rejected.status.success(), "replicas 0 was accepted");
    assert!(
        message.contains("spec.server.replicas"),
        "the rejection names the field: {message}"
    );
    // GRPC mode needs an absolute socket directory; the schema says so before the operator
    // would.
    for (frontend, field) in [
        ("{mode: GRPC}", "spec.server.frontend"),
        (
            "{mode: GRPC, socketHostPath: run/cplink}",
            "spec.server.frontend.socketHostPath",
        ),
    ] {
        std::fs::write(
            &invalid,
            format!(
                "apiVersion: cplink.dev/v1alpha1\nkind: ControlPlaneLink\nmetadata:\n  name: bad\n  \
                 namespace: cplink-system\nspec:\n  server:\n    frontend: {frontend}\n"
            ),
        )?;
        let rejected = plane
            .kubectl(&["apply", "-f", &invalid.display().to_string()])
            .output()?;
        let message = String::from_utf8_lossy(&rejected.stderr);
        assert!(!rejected.status.success(), "{frontend} was accepted");
        assert!(
            message.contains(field),
            "the rejection of {frontend} names {field}: {message}"
        );
    }

    steps.enter("the operator rolling out the example link");
    let operator = Operator::start(&plane, "cplink:e2e")?;
    let example = workspace::root().join("crds/examples/controlplanelink.yaml");
    plane.kubectl_ok(&["apply", "-f", &example.display().to_string()])?;

    for child in CHILDREN {
        plane
            .wait_kubectl(child, DEADLINE, &["get", "-n", NAMESPACE, child], |_| true)
            .await?;
    }
    for child in CLUSTER_CHILDREN {
        plane
            .wait_kubectl(child, DEADLINE, &["get", child], |_| true)
            .await?;
    }

    // Children are owned by the link, and the link's status is written for its generation.
    steps.enter("owners and status of the link");
    let deployment = get_json(&plane, &["get", "-n", NAMESPACE, "deployment/edge-server"]);
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["kind"], "ControlPlaneLink",
        "{deployment}"
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    plane
        .wait_kubectl(
            "status for the current generation",
            DEADLINE,
            &["get", "-n", NAMESPACE, "cpl/edge", "-o", "json"],
            |out| {
                let link: serde_json::Value = serde_json::from_str(out).unwrap_or_default();
                link["status"]["observedGeneration"] == link["metadata"]["generation"]
                    && link["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "CertificatesReady" && c["status"] == "True")
                    })
            },
        )
        .await?;
    let table = plane.kubectl_ok(&["get", "controlplanelinks", "-n", NAMESPACE])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "SERVERS", "AGENTS", "AGE"],
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("edge ")), "{table}");

    // The egress file kube-apiserver is given names the frontend and speaks HTTPConnect.
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(plane.client().await?, NAMESPACE);
    let egress = secrets.get("edge-apiserver-egress").await?;
    let config = egress
        .data
        .unwrap_or_default()
        .into_values()
        .filter_map(|bytes| String::from_utf8(bytes.0).ok())
        .find(|text| text.contains("EgressSelectorConfiguration"))
        .expect("an EgressSelectorConfiguration in the egress secret");
    assert!(config.contains("HTTPConnect"), "{config}");

    // Damage is repaired: a deleted DaemonSet comes back, a hand-scaled Deployment is reset.
    steps.enter("damage repaired");
    let uid =
        get_json(&plane, &["get", "-n", NAMESPACE, "daemonset/edge-agent"])["metadata"]["uid"]
            .clone();
    plane.kubectl_ok(&[
        "delete",
        "-n",
        NAMESPACE,
        "daemonset/edge-agent",
        "--wait=false",
    ])?;
    plane
        .wait_kubectl(
            "the DaemonSet restored",
            DEADLINE,
            &[
                "get",
                "-n",
                NAMESPACE,
                "daemonset/edge-agent",
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            |out| !out.is_empty() && uid.as_str() != Some(out),
        )
        .await?;
    plane.kubectl_ok(&[
        "scale",
        "-n",
        NAMESPACE,
        "deployment/edge-server",
        "--replicas",
        "5",
    ])?;
    plane
        .wait_kubectl(
            "the Deployment's replicas restored",
            DEADLINE,
            &[
                "get",
                "-n",
                NAMESPACE,
                "deployment/edge-server",
                "-o",
                "jsonpath={.spec.replicas}",
            ],
            |out| out == "2",
        )
        .await?;

    // Deleting the link removes everything it created, cluster-scoped objects included.
    steps.enter("deleting the link");
    plane.kubectl_ok(&["delete", "-n", NAMESPACE, "cpl/edge", "--timeout", "60s"])?;
    for child in CHILDREN {
        plane
            .wait_kubectl(
                &format!("{child} deleted"),
                DEADLINE,
                &[
                    "get",
                    "-n",
                    NAMESPACE,
                    child,
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
                |out| out.trim().is_empty(),
            )
            .await?;
    }
    for child in CLUSTER_CHILDREN {
        let left = plane.kubectl_ok(&["get", child, "--ignore-not-found", "-o", "name"])?;
        assert!(left.trim().is_empty(), "{child} left behind");
    }
    plane.check_running()?;
    steps.enter("stopping the operator and the control plane");
    drop((operator, plane));
    Ok(())
}
