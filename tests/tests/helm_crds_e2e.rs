//! The chart's CRD on a real control plane and a real node (the chart's operator running from
//! cplink's image), through the real Helm engine: rendered from a template, it is created with
//! the release's labels and `helm.sh/resource-policy: keep`, changed by `helm upgrade`, left
//! with its links by an upgrade with `crds.enabled=false` and by `helm uninstall`; a CRD
//! without Helm's labels, as charts that shipped it under `crds/` left it, stops `helm upgrade`
//! until the README's `kubectl label`/`annotate` adopt it. And, as the README warns, one `helm
//! install` cannot both create the CRD and a link in it: install, then upgrade with the link.

use std::time::Duration;

use cplink_e2e::harness::{self, Steps};
use cplink_e2e::stack::{self, Egress, LINK, NAMESPACE, RELEASE, Stack, StackOptions};
use serde_json::json;

const CRD: &str = "crd/controlplanelinks.cplink.dev";

/// How long the test may take.
const DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn the_charts_crd_is_upgraded_kept_and_adopted() -> anyhow::Result<()> {
    harness::run(
        "the_charts_crd_is_upgraded_kept_and_adopted",
        DEADLINE,
        upgrade_keep_adopt,
    )
}

/// The CRD's labels and annotations, as `key=value` lines.
fn crd_metadata(stack: &Stack) -> anyhow::Result<String> {
    stack.plane.kubectl_ok(&[
        "get",
        CRD,
        "-o",
        "go-template={{range $k, $v := .metadata.labels}}{{$k}}={{$v}}\n{{end}}\
         {{range $k, $v := .metadata.annotations}}{{$k}}={{$v}}\n{{end}}",
    ])
}

fn has(metadata: &str, line: &str) -> bool {
    metadata.lines().any(|l| l == line)
}

/// The links the API serves, by name.
fn links(stack: &Stack) -> anyhow::Result<String> {
    stack.plane.kubectl_ok(&[
        "get",
        "controlplanelinks",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
}

async fn upgrade_keep_adopt(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the stack on a real node: installing the chart");
    let stack = Stack::start(
        StackOptions {
            nodes: 1,
            servers: 1,
        },
        Egress::HttpConnect,
    )
    .await?;
    let defaults = stack::chart_values(&[]);

    let metadata = crd_metadata(&stack)?;
    for line in [
        "app.kubernetes.io/managed-by=Helm",
        "app.kubernetes.io/component=crds",
        "helm.sh/resource-policy=keep",
        &format!("meta.helm.sh/release-name={RELEASE}"),
        &format!("meta.helm.sh/release-namespace={NAMESPACE}"),
    ] {
        assert!(
            has(&metadata, line),
            "{line} missing from the CRD: {metadata}"
        );
    }
    stack.apply_link()?;

    steps.enter("upgrading with crds.keep=false: the CRD changes");
    stack.helm.upgrade(
        NAMESPACE,
        RELEASE,
        &stack::chart_values(&[("crds", json!({ "keep": false }))]),
    )?;
    let metadata = crd_metadata(&stack)?;
    assert!(
        !metadata.contains("helm.sh/resource-policy"),
        "the upgrade rewrote the CRD: {metadata}"
    );
    stack.helm.upgrade(NAMESPACE, RELEASE, &defaults)?;
    assert!(has(&crd_metadata(&stack)?, "helm.sh/resource-policy=keep"));

    steps.enter("upgrading with crds.enabled=false: the kept CRD and the link stay");
    stack.helm.upgrade(
        NAMESPACE,
        RELEASE,
        &stack::chart_values(&[("crds", json!({ "enabled": false }))]),
    )?;
    assert_eq!(
        links(&stack)?.trim(),
        LINK,
        "the CRD and its link are still served"
    );

    // What a chart that shipped the CRD under crds/ left: a CRD Helm does not manage.
    steps.enter("stripping Helm's ownership from the CRD");
    stack.plane.kubectl_ok(&[
        "label",
        CRD,
        "app.kubernetes.io/managed-by-",
        "app.kubernetes.io/instance-",
    ])?;
    stack.plane.kubectl_ok(&[
        "annotate",
        CRD,
        "meta.helm.sh/release-name-",
        "meta.helm.sh/release-namespace-",
        "helm.sh/resource-policy-",
    ])?;
    let refused = stack
        .helm
        .upgrade(NAMESPACE, RELEASE, &defaults)
        .expect_err("Helm does not take over a CRD it does not own");
    assert!(
        format!("{refused:#}").contains("invalid ownership metadata"),
        "{refused:#}"
    );

    steps.enter("adopting the CRD as the README says, then upgrading");
    stack
        .plane
        .kubectl_ok(&["label", CRD, "app.kubernetes.io/managed-by=Helm"])?;
    stack.plane.kubectl_ok(&[
        "annotate",
        CRD,
        &format!("meta.helm.sh/release-name={RELEASE}"),
        &format!("meta.helm.sh/release-namespace={NAMESPACE}"),
    ])?;
    stack.helm.upgrade(NAMESPACE, RELEASE, &defaults)?;
    let metadata = crd_metadata(&stack)?;
    assert!(has(&metadata, "helm.sh/resource-policy=keep"), "{metadata}");
    assert!(
        has(&metadata, "app.kubernetes.io/component=crds"),
        "{metadata}"
    );
    assert_eq!(links(&stack)?.trim(), LINK);

    steps.enter("uninstalling: the CRD and the link stay");
    stack.helm.uninstall(NAMESPACE, RELEASE)?;
    assert_eq!(links(&stack)?.trim(), LINK);

    // Without the CRD, one install cannot create both it and a link in it.
    steps.enter("removing the CRD, then installing with a link");
    stack.plane.kubectl_ok(&[
        "patch",
        "controlplanelink",
        LINK,
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])?;
    stack
        .plane
        .kubectl_ok(&["delete", CRD, "--wait=true", "--timeout=60s"])?;
    let with_link =
        stack::chart_values(&[("link", json!({ "create": true, "name": LINK, "spec": {} }))]);
    let refused = stack
        .helm
        .install(NAMESPACE, RELEASE, &with_link)
        .expect_err("the link cannot be mapped before its CRD exists");
    let message = format!("{refused:#}");
    assert!(
        message.contains("no matches for kind \"ControlPlaneLink\""),
        "{message}"
    );

    steps.enter("installing, then adding the link with an upgrade, as the README says");
    stack.helm.install(NAMESPACE, RELEASE, &defaults)?;
    stack.helm.upgrade(NAMESPACE, RELEASE, &with_link)?;
    assert_eq!(links(&stack)?.trim(), LINK);
    println!(
        "the chart's CRD: created with the release's labels and the keep policy, rewritten by an \
         upgrade, kept with its link by crds.enabled=false and by uninstall; without Helm's \
         ownership it stopped an upgrade until labelled and annotated; one install could not \
         make both the CRD and a link, an install then an upgrade could"
    );
    steps.enter("stopping the stack");
    stack.stop_leaving_nothing()
}
