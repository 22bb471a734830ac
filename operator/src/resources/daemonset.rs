//! The agent DaemonSet: one agent per node, linked to every server.
//!
//! In the cluster, agents find the servers themselves: they watch the EndpointSlices of the
//! headless agent Service (not-ready servers included, since a server becomes ready only once
//! agents link to it) and keep one link per server, so a surged or replaced server is linked
//! within moments. Behind `agentEndpoint.externalAddress` they dial that one address until
//! they are linked to as many servers as the servers announce. Either way they read their
//! Node's pod ranges, so servers route pod addresses to the agent of the pod's node; both need
//! the ServiceAccount token, which is mounted for that.
//!
//! Each agent also proves which node it runs on: kubelet projects a second token, bound to the
//! agent's pod and issued for the link's own audience, which the agent rereads on every link
//! attempt and sends to the servers. Servers review it and accept only the node name, host IP
//! and pod ranges of the Node the pod runs on. Kubelet renews the token at 80% of its
//! lifetime. The operator runs this DaemonSet only with `agent.authentication: token`.

use cplink_runtime::malloc;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PodSpec, PodTemplateSpec, ProjectedVolumeSource,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::deployment::{
    container_port, http_probe, image, pod_selector, pod_template_meta, tls_volume,
};
use super::{
    AGENT_TERMINATION_GRACE_PERIOD_SECONDS, Component, DRAIN_TIMEOUT_SECONDS, Plan, TLS_MOUNT_PATH,
    container_security_context, field_env, pod_security_context,
};
use crate::resources::secrets::{CA_CRT, TLS_CRT, TLS_KEY};

/// Admin port of the agent (`/healthz`, `/readyz`, `/metrics`).
pub const AGENT_ADMIN_PORT: i32 = 8096;

/// Name of the agent container.
pub const AGENT_CONTAINER: &str = "agent";

/// Name of the projected volume holding the agent's identity token.
pub const IDENTITY_TOKEN_VOLUME: &str = "identity-token";
/// Where the identity token volume is mounted in the agent container.
pub const IDENTITY_TOKEN_MOUNT_PATH: &str = "/var/run/secrets/cplink";
/// File of the identity token inside [`IDENTITY_TOKEN_MOUNT_PATH`].
pub const IDENTITY_TOKEN_FILE: &str = "token";
/// Lifetime kubelet requests for the identity token; it renews the token at 80% of it. An
/// hour bounds how long a token copied off a node stays usable.
pub const IDENTITY_TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// Arguments of `cplink-agent`, in the order they appear in the pod.
pub fn agent_args(plan: &Plan) -> Vec<String> {
    let agent_service = plan.names().agent_service();
    let mut args = vec![
        "--node-name=$(CPLINK_NODE_NAME)".to_owned(),
        "--host-ip=$(CPLINK_HOST_IP)".to_owned(),
        "--pod-cidr-from-node".to_owned(),
    ];
    if plan.valid.agent_endpoint_external.is_some() {
        args.push(format!(
            "--server-address={}",
            plan.agent_endpoint_address()
        ));
    } else {
        args.push(format!("--server-service={agent_service}"));
        args.push(format!("--server-namespace={}", plan.namespace));
    }
    args.extend([
        // The in-cluster Service name is always in the server certificate, whichever address
        // agents dial.
        format!("--server-name={}", plan.service_dns(&agent_service)),
        format!("--server-ca={TLS_MOUNT_PATH}/{CA_CRT}"),
        format!("--tls-cert={TLS_MOUNT_PATH}/{TLS_CRT}"),
        format!("--tls-key={TLS_MOUNT_PATH}/{TLS_KEY}"),
        format!("--service-account-token-path={IDENTITY_TOKEN_MOUNT_PATH}/{IDENTITY_TOKEN_FILE}"),
        format!("--admin-address=$(CPLINK_POD_IP):{AGENT_ADMIN_PORT}"),
        // The read-only debug views `kubectl cplink` reads through the pod proxy.
        "--debug-endpoints".to_owned(),
        format!("--drain-timeout={DRAIN_TIMEOUT_SECONDS}s"),
        format!("--log-level={}", plan.spec.log_level),
    ]);
    args.extend(
        plan.valid
            .allow
            .iter()
            .map(|allow| format!("--allow={allow}")),
    );
    args
}

/// The projected volume of the agent's identity token: bound to the pod, for the link's
/// audience ([`super::Names::agent_token_audience`]).
fn identity_token_volume(plan: &Plan) -> (Volume, VolumeMount) {
    (
        Volume {
            name: IDENTITY_TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(plan.names().agent_token_audience()),
                        expiration_seconds: Some(IDENTITY_TOKEN_EXPIRATION_SECONDS),
                        path: IDENTITY_TOKEN_FILE.to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: IDENTITY_TOKEN_VOLUME.to_owned(),
            mount_path: IDENTITY_TOKEN_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// The agent DaemonSet; `tls_checksum` is [`super::secrets::checksum`] of the agent Secret.
pub fn agent_daemonset(plan: &Plan, tls_checksum: &str) -> DaemonSet {
    let agent = &plan.spec.agent;
    let (tls, tls_mount) = tls_volume(plan.names().agent_tls_secret());
    let (token, token_mount) = identity_token_volume(plan);
    let container = Container {
        name: AGENT_CONTAINER.to_owned(),
        image: image(plan, agent.image.as_ref()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["cplink-agent".to_owned()]),
        args: Some(agent_args(plan)),
        env: Some(vec![
            field_env("CPLINK_NODE_NAME", "spec.nodeName"),
            field_env("CPLINK_HOST_IP", "status.hostIP"),
            field_env("CPLINK_POD_IP", "status.podIP"),
            EnvVar {
                name: malloc::GLIBC_TUNABLES.to_owned(),
                value: Some(malloc::TUNABLES.to_owned()),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![container_port("admin", AGENT_ADMIN_PORT)]),
        readiness_probe: Some(http_probe("/readyz", AGENT_ADMIN_PORT, 5, 2)),
        liveness_probe: Some(http_probe("/healthz", AGENT_ADMIN_PORT, 10, 3)),
        resources: agent.resources.clone(),
        security_context: Some(container_security_context()),
        volume_mounts: Some(vec![tls_mount, token_mount]),
        ..Container::default()
    };
    DaemonSet {
        metadata: plan.meta(plan.names().agent(), Component::Agent),
        spec: Some(DaemonSetSpec {
            selector: pod_selector(plan, Component::Agent),
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: pod_template_meta(plan, Component::Agent, tls_checksum),
                spec: Some(PodSpec {
                    service_account_name: Some(plan.names().agent()),
                    // Server discovery and the Node's pod ranges read the API as this account;
                    // the identity token is a volume of its own.
                    automount_service_account_token: Some(true),
                    priority_class_name: Some(agent.priority_class_name.clone()),
                    termination_grace_period_seconds: Some(AGENT_TERMINATION_GRACE_PERIOD_SECONDS),
                    security_context: Some(pod_security_context()),
                    node_selector: agent.node_selector.clone(),
                    tolerations: Some(agent.tolerations.clone()),
                    containers: vec![container],
                    volumes: Some(vec![tls, token]),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::{AllowedDestination, ControlPlaneLink};
    use crate::resources::fixtures::{Workload, http_get};

    #[test]
    fn the_default_agent_finds_the_servers_in_the_headless_service_and_reaches_only_its_kubelet() {
        let ds = agent_daemonset(&ControlPlaneLink::test().plan(), "sum");
        assert_eq!(ds.metadata.name.as_deref(), Some("link-agent"));
        let c = &ds.pod().containers[0];
        assert_eq!(c.command, Some(vec!["cplink-agent".to_owned()]));
        assert_eq!(c.image.as_deref(), Some("ghcr.io/cplink/cplink:test"));
        assert_eq!(
            c.args.as_deref().expect("args"),
            [
                "--node-name=$(CPLINK_NODE_NAME)",
                "--host-ip=$(CPLINK_HOST_IP)",
                "--pod-cidr-from-node",
                "--server-service=link-agent-endpoint",
                "--server-namespace=tunnels",
                "--server-name=link-agent-endpoint.tunnels.svc",
                "--server-ca=/etc/cplink/tls/ca.crt",
                "--tls-cert=/etc/cplink/tls/tls.crt",
                "--tls-key=/etc/cplink/tls/tls.key",
                "--service-account-token-path=/var/run/secrets/cplink/token",
                "--admin-address=$(CPLINK_POD_IP):8096",
                "--debug-endpoints",
                "--drain-timeout=30s",
                "--log-level=info",
                "--allow=$(CPLINK_HOST_IP)/32:10250",
            ]
        );
        assert_eq!(
            serde_json::to_value(&c.env).expect("json"),
            json!([
                {"name": "CPLINK_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "CPLINK_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "CPLINK_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "GLIBC_TUNABLES", "value": "glibc.malloc.trim_threshold=1048576"}
            ])
        );
        let readiness = http_get(c.readiness_probe.as_ref());
        assert_eq!(readiness.path.as_deref(), Some("/readyz"));
        assert_eq!(readiness.port, IntOrString::Int(8096));
    }

    #[test]
    fn agents_tolerate_everything_and_run_at_node_critical_priority() {
        let ds = agent_daemonset(&ControlPlaneLink::test().plan(), "sum");
        let pod = ds.pod();
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(
            serde_json::to_value(&pod.tolerations).expect("json"),
            json!([{"operator": "Exists"}])
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("link-agent"));
        assert_eq!(
            pod.automount_service_account_token,
            Some(true),
            "discovery and --pod-cidr-from-node need the token"
        );
        let rolling = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .and_then(|s| s.rolling_update.as_ref())
            .expect("rolling update");
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    }

    #[test]
    fn a_stopping_agent_may_drain_before_it_is_killed() {
        let ds = agent_daemonset(&ControlPlaneLink::test().plan(), "sum");
        let strategy = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .expect("update strategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let grace = ds.pod().termination_grace_period_seconds.expect("grace");
        assert!(grace > DRAIN_TIMEOUT_SECONDS, "{grace}s");
        let args = ds.pod().containers[0].args.clone().expect("args");
        assert!(args.contains(&format!("--drain-timeout={DRAIN_TIMEOUT_SECONDS}s")));
    }

    #[test]
    fn agents_are_locked_down_and_mount_their_secret() {
        let ds = agent_daemonset(&ControlPlaneLink::test().plan(), "abc");
        assert_eq!(ds.tls_checksum(), "abc");
        let pod = ds.pod();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            pod.security_context
                .as_ref()
                .and_then(|s| s.run_as_non_root),
            Some(true)
        );
        assert_eq!(
            pod.volumes.as_ref().expect("volumes")[0]
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("link-agent-tls")
        );
    }

    #[test]
    fn placement_image_addresses_and_destinations_follow_the_spec() {
        let plan = ControlPlaneLink::test()
            .with_spec(|s| {
                s.agent.image = Some("registry.local/cplink:2".into());
                s.agent.tolerations = vec![];
                s.agent.priority_class_name = "high".into();
                s.agent.allowed_destinations = vec![AllowedDestination {
                    cidr: "10.0.0.0/8".into(),
                    ports: vec!["10250".into()],
                }];
                s.server.agent_endpoint.external_address = Some("tunnel.example.com".into());
                s.server.agent_endpoint.port = 443;
            })
            .plan();
        let ds = agent_daemonset(&plan, "sum");
        let pod = ds.pod();
        assert_eq!(pod.tolerations, Some(vec![]));
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/cplink:2"));
        let args = c.args.as_deref().expect("args");
        assert!(args.contains(&"--server-address=tunnel.example.com:443".to_owned()));
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--server-service") || a.starts_with("--server-namespace")),
            "one fixed address, no discovery: {args:?}"
        );
        assert!(args.contains(&"--server-name=link-agent-endpoint.tunnels.svc".to_owned()));
        assert!(args.contains(&"--pod-cidr-from-node".to_owned()));
        assert!(args.contains(&"--allow=10.0.0.0/8:10250".to_owned()));
        assert!(!args.iter().any(|a| a.contains("CPLINK_HOST_IP)/32")));
    }

    #[test]
    fn agents_send_a_pod_bound_token_for_their_links_audience_renewed_hourly() {
        let ds = agent_daemonset(&ControlPlaneLink::test().plan(), "sum");
        let pod = ds.pod();
        assert_eq!(
            serde_json::to_value(&pod.volumes.as_ref().expect("volumes")[1]).expect("json"),
            json!({
                "name": "identity-token",
                "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "cplink.dev/tunnels/link",
                    "expirationSeconds": 3600,
                    "path": "token"
                }}]}
            })
        );
        let c = &pod.containers[0];
        assert_eq!(
            serde_json::to_value(&c.volume_mounts.as_ref().expect("mounts")[1]).expect("json"),
            json!({"name": "identity-token", "mountPath": "/var/run/secrets/cplink", "readOnly": true})
        );
        let args = c.args.as_deref().expect("args");
        let token_args: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("--service-account-token-path"))
            .collect();
        assert_eq!(
            token_args,
            ["--service-account-token-path=/var/run/secrets/cplink/token"]
        );
    }

    #[test]
    fn the_token_audience_follows_the_link_name_and_namespace() {
        let mut link = ControlPlaneLink::test();
        link.metadata.name = Some("edge".into());
        link.metadata.namespace = Some("cplink-system".into());
        let ds = agent_daemonset(&link.plan(), "sum");
        let token = ds.pod().volumes.as_ref().expect("volumes")[1]
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s[0].service_account_token.as_ref())
            .expect("token projection");
        assert_eq!(
            token.audience.as_deref(),
            Some("cplink.dev/cplink-system/edge")
        );
    }
}
