//! The server Deployment.
//!
//! Listeners bind the pod IP rather than 0.0.0.0: a pod on the host network (or any network
//! namespace shared with other pods) would otherwise collide with them on the same ports.
//!
//! Servers stop without dropping a connection: on SIGTERM a server reports not-ready at once
//! but keeps accepting for the shutdown delay, while the endpoints of its Services (and load
//! balancers behind them) catch up; then it stops accepting and lets tunneled connections
//! finish for the drain timeout. The grace period covers both. Rollouts surge a new server
//! before an old one goes, so capacity never drops.
//!
//! Servers check which node each agent speaks for (`--agent-identity`): the token each
//! in-cluster agent sends, or with `agent.authentication: certificate` the node named in the
//! agent's certificate, against the Node object. They call the API for it as their
//! ServiceAccount, whose token their pods mount.
//!
//! In `GRPC` mode a server also serves konnectivity gRPC on a Unix socket in a hostPath
//! directory, for the kube-apiserver on its node. Two servers on one node would fight over that
//! socket, so GRPC-mode servers get a required anti-affinity per node and roll out by replacing
//! a pod rather than surging one (a surge pod could never schedule when every eligible node
//! already runs a server).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, HTTPGetAction, HostPathVolumeSource, PodAffinityTerm,
    PodAntiAffinity, PodSpec, PodTemplateSpec, Probe, SecretVolumeSource, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::services::{AGENT_PORT_NAME, FRONTEND_PORT_NAME};
use super::{
    Component, DRAIN_TIMEOUT_SECONDS, GRPC_SOCKET_MOUNT_PATH, NODE_AGENT_GRACE_SECONDS, Plan,
    SERVER_READINESS_FAILURES, SERVER_READINESS_PERIOD_SECONDS,
    SERVER_TERMINATION_GRACE_PERIOD_SECONDS, SHUTDOWN_DELAY_SECONDS, TLS_CHECKSUM_ANNOTATION,
    TLS_MOUNT_PATH, container_security_context, field_env, pod_security_context,
};
use crate::crd::{AgentAuthentication, GRPC_SOCKET_FILE};
use crate::resources::secrets::{CA_CRT, TLS_CRT, TLS_KEY};

/// Admin port of the server (`/healthz`, `/readyz`, `/metrics`).
pub const SERVER_ADMIN_PORT: i32 = 8095;

/// Name of the server container.
pub const SERVER_CONTAINER: &str = "server";

/// Name of the hostPath volume holding the gRPC frontend's socket (`GRPC` mode).
pub const GRPC_SOCKET_VOLUME: &str = "frontend-socket";

/// Node label the server anti-affinity spreads over.
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

/// How servers tell which node an agent speaks for: `--agent-identity` and, for tokens, whose
/// tokens they accept. This is the only place the flags `--agent-namespace`,
/// `--agent-service-account` and `--authentication-audience` are set (the server also reads
/// them for upstream konnectivity agents' tokens, which the operator does not configure), so
/// each appears once, with the values the agent DaemonSet matches.
fn agent_identity_args(plan: &Plan) -> Vec<String> {
    let names = plan.names();
    let identity = plan.spec.agent.authentication;
    let mut args = vec![format!("--agent-identity={}", identity.as_str())];
    match identity {
        AgentAuthentication::Token => args.extend([
            format!("--agent-namespace={}", plan.namespace),
            format!("--agent-service-account={}", names.agent()),
            format!("--agent-daemonset={}", names.agent()),
            format!("--authentication-audience={}", names.agent_token_audience()),
        ]),
        AgentAuthentication::Certificate => {}
    }
    args
}

/// Arguments of `cplink-server`, in the order they appear in the pod.
pub fn server_args(plan: &Plan) -> Vec<String> {
    let server = &plan.spec.server;
    let strategies: Vec<&str> = plan
        .spec
        .routing
        .strategies
        .iter()
        .map(|s| s.as_str())
        .collect();
    let mut args = vec![
        format!("--server-count={}", server.replicas),
        format!(
            "--agent-address=$(CPLINK_POD_IP):{}",
            server.agent_endpoint.port
        ),
        format!(
            "--frontend-address=$(CPLINK_POD_IP):{}",
            server.frontend.port
        ),
    ];
    if plan.valid.grpc_socket.is_some() {
        args.push(format!(
            "--grpc-uds={GRPC_SOCKET_MOUNT_PATH}/{GRPC_SOCKET_FILE}"
        ));
    }
    args.extend([
        format!("--admin-address=$(CPLINK_POD_IP):{SERVER_ADMIN_PORT}"),
        // The read-only debug views `kubectl cplink` reads through the pod proxy.
        "--debug-endpoints".to_owned(),
        format!("--tls-cert={TLS_MOUNT_PATH}/{TLS_CRT}"),
        format!("--tls-key={TLS_MOUNT_PATH}/{TLS_KEY}"),
        format!("--agent-ca={TLS_MOUNT_PATH}/{CA_CRT}"),
        format!("--frontend-ca={TLS_MOUNT_PATH}/{CA_CRT}"),
    ]);
    args.extend(agent_identity_args(plan));
    if server.publish_leases {
        // The server id, the pod's name, names the Lease.
        args.extend([
            "--publish-server-leases".to_owned(),
            format!("--lease-namespace={}", plan.namespace),
        ]);
    }
    args.extend([
        format!("--shutdown-delay={SHUTDOWN_DELAY_SECONDS}s"),
        format!("--drain-timeout={DRAIN_TIMEOUT_SECONDS}s"),
        format!("--node-agent-grace={NODE_AGENT_GRACE_SECONDS}s"),
        format!("--strategies={}", strategies.join(",")),
        format!("--log-level={}", plan.spec.log_level),
    ]);
    args
}

/// Spread servers across nodes: a preference, so small clusters still schedule; in `GRPC` mode
/// a requirement, since servers on one node would share the socket directory.
fn default_affinity(plan: &Plan) -> Affinity {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(plan.selector(Component::Server)),
            ..LabelSelector::default()
        }),
        topology_key: HOSTNAME_TOPOLOGY.to_owned(),
        ..PodAffinityTerm::default()
    };
    let anti_affinity = if plan.valid.grpc_socket.is_some() {
        PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        }
    } else {
        PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        }
    };
    Affinity {
        pod_anti_affinity: Some(anti_affinity),
        ..Affinity::default()
    }
}

/// How server pods are replaced. A new server must be ready before an old one drains, so
/// capacity never drops; in `GRPC` mode the new pod may need the old one's node, so the old one
/// goes first (the kube-apiserver on that node waits for the new socket either way).
fn rollout_strategy(plan: &Plan) -> DeploymentStrategy {
    let (max_surge, max_unavailable) = if plan.valid.grpc_socket.is_some() {
        (0, 1)
    } else {
        (1, 0)
    };
    DeploymentStrategy {
        type_: Some("RollingUpdate".to_owned()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(max_surge)),
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
        }),
    }
}

/// The hostPath directory of the gRPC frontend's socket, in `GRPC` mode.
fn grpc_socket_volume(plan: &Plan) -> Option<(Volume, VolumeMount)> {
    // Only in GRPC mode: elsewhere `socketHostPath` is ignored.
    plan.valid.grpc_socket.as_ref()?;
    let host_path = plan.spec.server.frontend.socket_host_path.clone()?;
    Some((
        Volume {
            name: GRPC_SOCKET_VOLUME.to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: host_path,
                type_: Some("DirectoryOrCreate".to_owned()),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: GRPC_SOCKET_VOLUME.to_owned(),
            mount_path: GRPC_SOCKET_MOUNT_PATH.to_owned(),
            ..VolumeMount::default()
        },
    ))
}

pub(crate) fn http_probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

pub(crate) fn tls_volume(secret_name: String) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "tls".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "tls".to_owned(),
            mount_path: TLS_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// A TCP port of a container, by name.
pub(super) fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

/// The image of a component: its own when the spec names one, the operator's default
/// otherwise.
pub(super) fn image(plan: &Plan, own: Option<&String>) -> Option<String> {
    Some(own.cloned().unwrap_or_else(|| plan.default_image.clone()))
}

/// The selector of `component`'s pods.
pub(super) fn pod_selector(plan: &Plan, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(plan.selector(component)),
        ..LabelSelector::default()
    }
}

/// The metadata of `component`'s pod template: its labels, and the checksum of its TLS Secret,
/// so that a new certificate rolls the pods.
pub(super) fn pod_template_meta(
    plan: &Plan,
    component: Component,
    tls_checksum: &str,
) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        labels: Some(plan.labels(component)),
        annotations: Some(BTreeMap::from([(
            TLS_CHECKSUM_ANNOTATION.to_owned(),
            tls_checksum.to_owned(),
        )])),
        ..ObjectMeta::default()
    })
}

/// The server Deployment; `tls_checksum` is [`super::secrets::checksum`] of the server Secret.
pub fn server_deployment(plan: &Plan, tls_checksum: &str) -> Deployment {
    let server = &plan.spec.server;
    let (tls, tls_mount) = tls_volume(plan.names().server_tls_secret());
    let (mut volumes, mut mounts) = (vec![tls], vec![tls_mount]);
    if let Some((socket, socket_mount)) = grpc_socket_volume(plan) {
        volumes.push(socket);
        mounts.push(socket_mount);
    }
    let container = Container {
        name: SERVER_CONTAINER.to_owned(),
        image: image(plan, server.image.as_ref()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        // Explicit: the image's entrypoint is the operator.
        command: Some(vec!["cplink-server".to_owned()]),
        args: Some(server_args(plan)),
        env: Some(vec![
            field_env("CPLINK_POD_IP", "status.podIP"),
            field_env("POD_NAME", "metadata.name"),
        ]),
        ports: Some(vec![
            container_port(FRONTEND_PORT_NAME, server.frontend.port),
            container_port(AGENT_PORT_NAME, server.agent_endpoint.port),
            container_port("admin", SERVER_ADMIN_PORT),
        ]),
        readiness_probe: Some(http_probe(
            "/readyz",
            SERVER_ADMIN_PORT,
            SERVER_READINESS_PERIOD_SECONDS,
            SERVER_READINESS_FAILURES,
        )),
        liveness_probe: Some(http_probe("/healthz", SERVER_ADMIN_PORT, 10, 3)),
        resources: server.resources.clone(),
        security_context: Some(container_security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    Deployment {
        metadata: plan.meta(plan.names().server(), Component::Server),
        spec: Some(DeploymentSpec {
            replicas: Some(server.replicas),
            selector: pod_selector(plan, Component::Server),
            strategy: Some(rollout_strategy(plan)),
            template: PodTemplateSpec {
                metadata: pod_template_meta(plan, Component::Server, tls_checksum),
                spec: Some(PodSpec {
                    service_account_name: Some(plan.names().server()),
                    // Checking agents' node identities reads the API as this account.
                    automount_service_account_token: Some(true),
                    termination_grace_period_seconds: Some(SERVER_TERMINATION_GRACE_PERIOD_SECONDS),
                    security_context: Some(pod_security_context()),
                    node_selector: server.node_selector.clone(),
                    tolerations: server.tolerations.clone(),
                    affinity: Some(
                        server
                            .affinity
                            .clone()
                            .unwrap_or_else(|| default_affinity(plan)),
                    ),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use serde_json::json;

    use super::*;
    use crate::crd::{ControlPlaneLink, RoutingStrategy};
    use crate::resources::fixtures::{Workload, http_get};

    #[test]
    fn the_default_server_runs_two_replicas_bound_to_the_pod_ip() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "sum");
        assert_eq!(deploy.metadata.name.as_deref(), Some("link-server"));
        let spec = deploy.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(2));
        let c = &deploy.pod().containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/cplink/cplink:test"));
        assert_eq!(c.command, Some(vec!["cplink-server".to_owned()]));
        assert_eq!(
            c.args.as_deref().expect("args"),
            [
                "--server-count=2",
                "--agent-address=$(CPLINK_POD_IP):8091",
                "--frontend-address=$(CPLINK_POD_IP):8090",
                "--admin-address=$(CPLINK_POD_IP):8095",
                "--debug-endpoints",
                "--tls-cert=/etc/cplink/tls/tls.crt",
                "--tls-key=/etc/cplink/tls/tls.key",
                "--agent-ca=/etc/cplink/tls/ca.crt",
                "--frontend-ca=/etc/cplink/tls/ca.crt",
                "--agent-identity=token",
                "--agent-namespace=tunnels",
                "--agent-service-account=link-agent",
                "--agent-daemonset=link-agent",
                "--authentication-audience=cplink.dev/tunnels/link",
                "--shutdown-delay=5s",
                "--drain-timeout=30s",
                "--node-agent-grace=105s",
                "--strategies=node,cidr,any",
                "--log-level=info",
            ]
        );
        assert_eq!(
            serde_json::to_value(&c.env).expect("json"),
            json!([
                {"name": "CPLINK_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
            ])
        );
    }

    #[test]
    fn replicas_strategies_log_level_and_ports_follow_the_spec() {
        let plan = ControlPlaneLink::test()
            .with_replicas(3)
            .with_spec(|s| {
                s.routing.strategies = vec![RoutingStrategy::Any];
                s.log_level = "debug".into();
                s.server.frontend.port = 9443;
                s.server.image = Some("registry.local/cplink:1".into());
            })
            .plan();
        let deploy = server_deployment(&plan, "sum");
        assert_eq!(deploy.spec.as_ref().expect("spec").replicas, Some(3));
        let c = &deploy.pod().containers[0];
        let args = c.args.as_deref().expect("args");
        assert!(args.contains(&"--server-count=3".to_owned()));
        assert!(args.contains(&"--strategies=any".to_owned()));
        assert!(args.contains(&"--log-level=debug".to_owned()));
        assert!(args.contains(&"--frontend-address=$(CPLINK_POD_IP):9443".to_owned()));
        assert_eq!(c.image.as_deref(), Some("registry.local/cplink:1"));
        let ports = c.ports.as_ref().expect("ports");
        assert_eq!(ports[0].container_port, 9443);
    }

    #[test]
    fn rollouts_never_lose_capacity_and_pods_outlive_the_shutdown_delay_and_drain() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "sum");
        let strategy = deploy
            .spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .expect("strategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let rolling = strategy.rolling_update.as_ref().expect("rolling");
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        let grace = deploy
            .pod()
            .termination_grace_period_seconds
            .expect("grace");
        assert!(
            grace > SHUTDOWN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS,
            "SIGKILL only after the shutdown delay and the drain: {grace}s"
        );
        assert_eq!(grace, 50);
    }

    #[test]
    fn servers_publish_leases_in_the_links_namespace_when_asked() {
        let args = |plan: &Plan| server_args(plan);
        let plain = args(&ControlPlaneLink::test().plan());
        assert!(
            !plain.iter().any(|a| a.contains("lease")),
            "none by default: {plain:?}"
        );
        let leases = args(
            &ControlPlaneLink::test()
                .with_spec(|s| s.server.publish_leases = true)
                .plan(),
        );
        assert!(
            leases.contains(&"--publish-server-leases".to_owned()),
            "{leases:?}"
        );
        assert!(
            leases.contains(&"--lease-namespace=tunnels".to_owned()),
            "{leases:?}"
        );
    }

    #[test]
    fn a_stopping_server_leaves_the_endpoints_before_it_stops_accepting() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "sum");
        let c = &deploy.pod().containers[0];
        let args = c.args.as_deref().expect("args");
        assert!(args.contains(&"--shutdown-delay=5s".to_owned()), "{args:?}");
        let readiness = c.readiness_probe.as_ref().expect("readiness");
        let unready_after = readiness.period_seconds.expect("period")
            * readiness.failure_threshold.expect("threshold");
        assert_eq!(unready_after, 4);
        assert!(
            i64::from(unready_after) < SHUTDOWN_DELAY_SECONDS,
            "readiness notices a not-ready server ({unready_after}s) within the shutdown delay"
        );
    }

    #[test]
    fn servers_are_locked_down_and_probed_on_the_admin_port() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "sum");
        let pod = deploy.pod();
        assert_eq!(
            pod.security_context
                .as_ref()
                .and_then(|s| s.run_as_non_root),
            Some(true)
        );
        assert_eq!(
            pod.automount_service_account_token,
            Some(true),
            "servers check agents' identities through the API"
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("link-server"));
        let c = &pod.containers[0];
        assert_eq!(
            serde_json::to_value(&c.security_context).expect("json"),
            json!({
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true
            })
        );
        let readiness = http_get(c.readiness_probe.as_ref());
        assert_eq!(
            (readiness.path.as_deref(), &readiness.port),
            (Some("/readyz"), &IntOrString::Int(8095))
        );
        let liveness = http_get(c.liveness_probe.as_ref());
        assert_eq!(
            (liveness.path.as_deref(), &liveness.port),
            (Some("/healthz"), &IntOrString::Int(8095))
        );
    }

    #[test]
    fn the_server_secret_is_mounted_and_its_checksum_annotates_the_template() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "abc123");
        assert_eq!(deploy.tls_checksum(), "abc123");
        let pod = deploy.pod();
        let volume = &pod.volumes.as_ref().expect("volumes")[0];
        assert_eq!(
            volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("link-server-tls")
        );
        let mount = &pod.containers[0].volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(mount.mount_path, "/etc/cplink/tls");
        assert_eq!(mount.read_only, Some(true));
    }

    #[test]
    fn in_grpc_mode_servers_serve_a_socket_in_the_host_directory() {
        let plan = ControlPlaneLink::test()
            .with_replicas(3)
            .in_grpc_mode("/etc/kubernetes/cplink-frontend")
            .plan();
        let deploy = server_deployment(&plan, "sum");
        let pod = deploy.pod();
        let c = &pod.containers[0];
        let args = c.args.as_deref().expect("args");
        assert!(
            args.contains(&"--grpc-uds=/run/cplink/frontend/konnectivity-server.socket".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--frontend-address=$(CPLINK_POD_IP):8090".to_owned()),
            "the TLS frontend stays for HTTP CONNECT clients: {args:?}"
        );
        assert_eq!(
            serde_json::to_value(&pod.volumes).expect("json")[1],
            json!({
                "name": "frontend-socket",
                "hostPath": {"path": "/etc/kubernetes/cplink-frontend", "type": "DirectoryOrCreate"}
            })
        );
        assert_eq!(
            serde_json::to_value(&c.volume_mounts).expect("json")[1],
            json!({"name": "frontend-socket", "mountPath": "/run/cplink/frontend"})
        );
        // Still unprivileged: the directory must be writable by the server's user.
        assert_eq!(
            pod.security_context.as_ref().and_then(|s| s.run_as_user),
            Some(65532)
        );
    }

    #[test]
    fn in_grpc_mode_one_server_per_node_is_required_and_rollouts_replace_in_place() {
        let plan = ControlPlaneLink::test().in_grpc_mode("/srv/cplink").plan();
        let deploy = server_deployment(&plan, "sum");
        let anti = deploy
            .pod()
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .expect("anti-affinity");
        assert_eq!(
            anti.preferred_during_scheduling_ignored_during_execution,
            None
        );
        let required = anti
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .expect("required anti-affinity");
        assert_eq!(required[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(
            required[0]
                .label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .expect("selector")["app.kubernetes.io/component"],
            "server"
        );
        let rolling = deploy
            .spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.rolling_update.as_ref())
            .expect("rolling update");
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

        // The user's affinity wins, as in HTTPConnect mode.
        let plan = ControlPlaneLink::test()
            .in_grpc_mode("/srv/cplink")
            .with_spec(|s| s.server.affinity = Some(Affinity::default()))
            .plan();
        assert_eq!(
            server_deployment(&plan, "sum").pod().affinity,
            Some(Affinity::default())
        );
    }

    #[test]
    fn in_http_connect_mode_no_host_directory_is_mounted() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "sum");
        let pod = deploy.pod();
        assert!(
            pod.volumes.iter().flatten().all(|v| v.host_path.is_none()),
            "{:?}",
            pod.volumes
        );
        let args = pod.containers[0].args.as_deref().expect("args");
        assert!(
            !args.iter().any(|a| a.starts_with("--grpc-uds")),
            "{args:?}"
        );
    }

    #[test]
    fn servers_spread_across_nodes_unless_placement_is_given() {
        let deploy = server_deployment(&ControlPlaneLink::test().plan(), "sum");
        let preferred = deploy
            .pod()
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("preferred anti-affinity");
        assert_eq!(
            preferred[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );

        let plan = ControlPlaneLink::test()
            .with_spec(|s| {
                s.server.node_selector = Some(BTreeMap::from([("role".into(), "edge".into())]));
                s.server.tolerations = Some(vec![Toleration {
                    key: Some("edge".into()),
                    operator: Some("Exists".into()),
                    ..Toleration::default()
                }]);
                s.server.affinity = Some(Affinity::default());
                s.server.resources = Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([("cpu".into(), Quantity("100m".into()))])),
                    ..ResourceRequirements::default()
                });
            })
            .plan();
        let deploy = server_deployment(&plan, "sum");
        let pod = deploy.pod();
        assert_eq!(
            pod.node_selector.as_ref().expect("selector")["role"],
            "edge"
        );
        assert_eq!(
            pod.tolerations.as_ref().expect("tolerations")[0]
                .key
                .as_deref(),
            Some("edge")
        );
        assert_eq!(pod.affinity, Some(Affinity::default()));
        assert_eq!(
            pod.containers[0]
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .expect("requests")["cpu"],
            Quantity("100m".into())
        );
    }

    #[test]
    fn in_token_mode_servers_accept_tokens_of_the_agent_daemonsets_pods_for_the_links_audience() {
        let plan = ControlPlaneLink::test().plan();
        let deploy = server_deployment(&plan, "sum");
        let args = deploy.pod().containers[0].args.clone().expect("args");
        let identity: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|a| {
                a.starts_with("--agent-identity")
                    || a.starts_with("--agent-namespace")
                    || a.starts_with("--agent-service-account")
                    || a.starts_with("--agent-daemonset")
                    || a.starts_with("--authentication-audience")
            })
            .collect();
        assert_eq!(
            identity,
            [
                "--agent-identity=token",
                "--agent-namespace=tunnels",
                "--agent-service-account=link-agent",
                "--agent-daemonset=link-agent",
                "--authentication-audience=cplink.dev/tunnels/link",
            ]
        );
        // Agents' tokens are issued for that same audience.
        let agents = crate::resources::daemonset::agent_daemonset(&plan, "sum");
        let volumes = serde_json::to_value(
            &agents
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .expect("pod spec")
                .volumes,
        )
        .expect("json");
        assert_eq!(
            volumes[1]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "cplink.dev/tunnels/link"
        );
    }

    #[test]
    fn in_certificate_mode_servers_read_the_node_from_the_certificate_and_take_no_token_flags() {
        let plan = ControlPlaneLink::test()
            .with_agents_outside_the_cluster()
            .plan();
        let deploy = server_deployment(&plan, "sum");
        let pod = deploy.pod();
        let args = pod.containers[0].args.as_deref().expect("args");
        assert!(
            args.contains(&"--agent-identity=certificate".to_owned()),
            "{args:?}"
        );
        for flag in [
            "--agent-namespace",
            "--agent-service-account",
            "--agent-daemonset",
            "--authentication-audience",
        ] {
            assert!(
                !args.iter().any(|a| a.starts_with(flag)),
                "{flag}: {args:?}"
            );
        }
        assert_eq!(
            pod.automount_service_account_token,
            Some(true),
            "servers still read Nodes"
        );
    }

    #[test]
    fn no_flag_is_passed_twice_in_any_mode() {
        let links = [
            ControlPlaneLink::test(),
            ControlPlaneLink::test().with_agents_outside_the_cluster(),
            ControlPlaneLink::test().in_grpc_mode("/srv/cplink"),
            ControlPlaneLink::test()
                .in_grpc_mode("/srv/cplink")
                .with_agents_outside_the_cluster(),
        ];
        for link in links {
            let args = server_args(&link.plan());
            let mut flags: Vec<&str> = args
                .iter()
                .map(|a| a.split_once('=').map_or(a.as_str(), |(flag, _)| flag))
                .collect();
            let count = flags.len();
            flags.sort_unstable();
            flags.dedup();
            assert_eq!(flags.len(), count, "a repeated flag in {args:?}");
        }
    }
}
