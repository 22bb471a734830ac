//! Server Leases in a real kube-apiserver, as upstream agents run with `--count-server-leases`
//! (v0.31 and later) read them: `konnectivity-proxy-server-<id>` in `kube-system`, labelled
//! `k8s-app=konnectivity-server`, held by the server id for 30 s and renewed; deleted when the
//! server shuts down; with no more rights than the operator grants servers.

use std::time::Duration;

use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::fixture::Loopback;
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::wait;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};

const TEST_DEADLINE: Duration = Duration::from_secs(240);
const NAMESPACE: &str = "kube-system";
const SELECTOR: &str = "k8s-app=konnectivity-server";

/// The servers an upstream agent counts: Leases with the label whose renewal (or acquisition)
/// plus duration is still ahead, as its lease counter decides.
async fn counted(leases: &Api<Lease>) -> anyhow::Result<Vec<String>> {
    let now = Timestamp::now();
    let list = leases.list(&ListParams::default().labels(SELECTOR)).await?;
    let mut holders: Vec<String> = list
        .items
        .into_iter()
        .filter_map(|lease| {
            let spec = lease.spec?;
            let last = spec.renew_time.or(spec.acquire_time)?.0;
            let duration = spec.lease_duration_seconds?;
            (last + Duration::from_secs(u64::try_from(duration).ok()?) > now)
                .then_some(spec.holder_identity?)
        })
        .collect();
    holders.sort();
    Ok(holders)
}

/// A kubeconfig for a service account holding exactly the rights on leases the operator grants
/// servers with `server.publishLeases` (operator/src/resources/rbac.rs), in `kube-system`.
async fn restricted_kubeconfig(plane: &ControlPlane) -> anyhow::Result<std::path::PathBuf> {
    let manifest = plane.dir().join("lease-rbac.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1
kind: ServiceAccount
metadata: {name: lease-writer, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: lease-writer, namespace: kube-system}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lease-writer, namespace: kube-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: lease-writer}
subjects:
- {kind: ServiceAccount, name: lease-writer, namespace: kube-system}
",
    )?;
    plane.kubectl_ok(&["apply", "-f", &manifest.display().to_string()])?;
    let accounts: Api<ServiceAccount> = Api::namespaced(plane.client().await?, NAMESPACE);
    let issued: TokenRequest = accounts
        .create_subresource(
            "token",
            "lease-writer",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..TokenRequestSpec::default()
                },
                ..TokenRequest::default()
            },
        )
        .await?;
    let token = issued.status.map(|s| s.token).unwrap_or_default();
    anyhow::ensure!(!token.is_empty(), "no token issued");
    let path = plane.dir().join("lease-writer.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: \"{url}\", certificate-authority: \"{ca}\"}}}}]
users: [{{name: u, user: {{token: \"{token}\"}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
",
            url = plane.url,
            ca = plane.pki().ca_file().display(),
        ),
    )?;
    Ok(path)
}

#[test]
fn servers_publish_the_leases_upstream_agents_count_and_remove_them_on_shutdown()
-> anyhow::Result<()> {
    harness::run(
        "servers_publish_the_leases_upstream_agents_count_and_remove_them_on_shutdown",
        TEST_DEADLINE,
        publish,
    )
}

async fn publish(steps: Steps) -> anyhow::Result<()> {
    steps.enter("starting the control plane");
    let plane = ControlPlane::start(Options::default()).await?;
    let kubeconfig = plane.kubeconfig.display().to_string();
    let leases: Api<Lease> = Api::namespaced(plane.client().await?, NAMESPACE);

    steps.enter("a service account with the rights the operator grants servers");
    let restricted = restricted_kubeconfig(&plane).await?;
    let restricted = restricted.display().to_string();

    steps.enter("a server publishing its Lease");
    let lo = Loopback::new()?;
    // Renewed every second here, to see renewals within the test; 15 s by default.
    let flags = |kubeconfig: &str| {
        [
            "--publish-server-leases",
            "--kubeconfig",
            kubeconfig,
            "--lease-renew-interval",
            "1s",
        ]
        .map(str::to_owned)
    };
    let first_flags = flags(&restricted);
    let first_flags: Vec<&str> = first_flags.iter().map(String::as_str).collect();
    let first = lo.start_server(&first_flags).await?;
    let name = "konnectivity-proxy-server-server-0";
    {
        let leases = leases.clone();
        wait::until_async("the Lease", Duration::from_secs(20), || {
            let leases = leases.clone();
            async move { matches!(leases.get_opt(name).await, Ok(Some(_))) }
        })
        .await?;
    }
    let lease = leases.get(name).await?;
    let labels = lease.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("k8s-app").map(String::as_str),
        Some("konnectivity-server"),
        "{labels:?}"
    );
    let spec = lease.spec.clone().expect("a spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("server-0"));
    assert_eq!(spec.lease_duration_seconds, Some(30));
    assert!(spec.acquire_time.is_some(), "{spec:?}");
    let first_renewal = spec.renew_time.expect("a renew time").0;

    steps.enter("the Lease renewed");
    {
        let leases = leases.clone();
        wait::until_async("a later renewTime", Duration::from_secs(10), || {
            let leases = leases.clone();
            async move {
                let renewed = leases
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec?.renew_time);
                renewed.is_some_and(|t| t.0 > first_renewal)
            }
        })
        .await?;
    }
    let metrics = first.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_lease_renewals_total{result=\"ok\"}"),
        "{metrics}"
    );

    steps.enter("a second server: an agent counts both");
    let second_flags = flags(&kubeconfig);
    let second_flags: Vec<&str> = second_flags.iter().map(String::as_str).collect();
    let second = lo.start_server(&second_flags).await?;
    {
        let leases = leases.clone();
        wait::until_async("two counted servers", Duration::from_secs(20), || {
            let leases = leases.clone();
            async move { counted(&leases).await.ok().map(|c| c.len()) == Some(2) }
        })
        .await?;
    }
    assert_eq!(counted(&leases).await?, ["server-0", "server-1"]);

    steps.enter("the first server shutting down");
    first.stop().await;
    assert!(
        leases.get_opt(name).await?.is_none(),
        "the Lease is gone once the server has stopped"
    );
    assert_eq!(counted(&leases).await?, ["server-1"]);
    second.stop().await;
    assert!(counted(&leases).await?.is_empty());
    drop(plane);
    Ok(())
}
