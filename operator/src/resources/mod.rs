//! Pure builders of the objects a link owns: given a [`Plan`], each returns the full desired
//! object, ready for server-side apply. No I/O happens here.
//!
//! - [`rbac`]: ServiceAccounts, and the Roles and ClusterRoles of servers and agents
//! - [`secrets`]: the CA, server, agent and kube-apiserver certificates, the egress file
//! - [`services`]: the frontend Service and the headless agent Service
//! - [`deployment`]: the server Deployment
//! - [`daemonset`]: the agent DaemonSet (with `agent.authentication: token`)

pub mod daemonset;
pub mod deployment;
pub mod rbac;
pub mod secrets;
pub mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Capabilities, EnvVar, EnvVarSource, ObjectFieldSelector, PodSecurityContext, SeccompProfile,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{AgentAuthentication, ControlPlaneLink};
use crate::validate::{Host, ValidSpec};

/// Value of `app.kubernetes.io/name` on everything the operator creates.
pub const APP_NAME: &str = "cplink";
/// Value of `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "cplink-operator";
/// Label carrying the link's namespace on cluster-scoped objects, which have none.
pub const LINK_NAMESPACE_LABEL: &str = "cplink.dev/link-namespace";
/// Pod template annotation with the sha256 of the mounted certificate Secret: a renewed
/// certificate changes it and rolls the pods.
pub const TLS_CHECKSUM_ANNOTATION: &str = "cplink.dev/tls-checksum";
/// Where certificate Secrets are mounted in server and agent containers.
pub const TLS_MOUNT_PATH: &str = "/etc/cplink/tls";
/// Where a `GRPC`-mode server mounts `frontend.socketHostPath` and creates its socket.
pub const GRPC_SOCKET_MOUNT_PATH: &str = "/run/cplink/frontend";
/// Non-root user the containers run as (the distroless `nonroot` user).
pub const RUN_AS_USER: i64 = 65532;
/// Drain timeout passed to servers and agents; pods get longer than this to exit.
pub const DRAIN_TIMEOUT_SECONDS: i64 = 30;
/// How long a server holds a dial for a node whose agent has just gone (`--node-agent-grace`):
/// a DaemonSet replaces an agent pod (a rolling update, after each certificate renewal) only
/// once the old one has exited, and the new one takes some seconds to start and link. Until it
/// has, that node's kubelet is out of every other agent's reach under the default destination
/// policy, so its dials wait rather than fail. The old agent stops taking dials at once and may
/// take its whole grace period to exit (kube-apiserver keeps idle connections to kubelets
/// open, so the drain usually lasts its full timeout), then its replacement has
/// [`AGENT_START_SECONDS`]: a shorter hold would end before the new agent links.
pub const NODE_AGENT_GRACE_SECONDS: i64 =
    AGENT_TERMINATION_GRACE_PERIOD_SECONDS + AGENT_START_SECONDS;
/// How long a replaced agent pod may take, once the old one has gone, to be created, started
/// and linked to the servers: about 6 s on an idle node, and up to 48 s measured on a loaded
/// 2-core one, where kubelet is slow to report the old pod gone.
pub const AGENT_START_SECONDS: i64 = 60;
/// How long a server keeps accepting after SIGTERM while already reporting not-ready
/// (`--shutdown-delay`): a deleted pod leaves its Services' endpoints at once, and a pod that
/// just turned unready within [`SERVER_READINESS_PERIOD_SECONDS`] ×
/// [`SERVER_READINESS_FAILURES`]; then endpoint watchers (kube-proxy, load balancers) need a
/// moment to act on it. Until they have, new frontend connections must still be served.
pub const SHUTDOWN_DELAY_SECONDS: i64 = 5;
/// Period of the server's readiness probe on `/readyz`.
pub const SERVER_READINESS_PERIOD_SECONDS: i32 = 2;
/// Failed readiness probes before a server leaves its Services' endpoints.
pub const SERVER_READINESS_FAILURES: i32 = 2;
/// Time to close links and exit once the drain is over.
const EXIT_MARGIN_SECONDS: i64 = 15;
/// Grace period of server pods: the shutdown delay, the drain, then time to close links.
pub const SERVER_TERMINATION_GRACE_PERIOD_SECONDS: i64 =
    SHUTDOWN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS + EXIT_MARGIN_SECONDS;
/// Grace period of agent pods: the drain (they stop taking dials at once), then time to close
/// links.
pub const AGENT_TERMINATION_GRACE_PERIOD_SECONDS: i64 = DRAIN_TIMEOUT_SECONDS + EXIT_MARGIN_SECONDS;

/// Which half of the link an object belongs to (`app.kubernetes.io/component`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The tunnel servers.
    Server,
    /// The per-node agents.
    Agent,
}

impl Component {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Server => "server",
            Component::Agent => "agent",
        }
    }
}

/// Names of every object derived from a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    link: String,
    namespace: String,
}

impl Names {
    /// Names for the link `link` in `namespace`.
    pub fn new(link: &str, namespace: &str) -> Self {
        Self {
            link: link.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    /// The server Deployment and ServiceAccount, and (token mode) the Role and RoleBinding that
    /// let servers read agent pods.
    pub fn server(&self) -> String {
        format!("{}-server", self.link)
    }
    /// The agent DaemonSet, ServiceAccount, Role and RoleBinding.
    pub fn agent(&self) -> String {
        format!("{}-agent", self.link)
    }
    /// The frontend Service kube-apiserver dials.
    pub fn frontend_service(&self) -> String {
        format!("{}-frontend", self.link)
    }
    /// The (headless) Service agents dial.
    pub fn agent_service(&self) -> String {
        format!("{}-agent-endpoint", self.link)
    }
    /// The generated CA.
    pub fn ca_secret(&self) -> String {
        format!("{}-ca", self.link)
    }
    /// The server certificate.
    pub fn server_tls_secret(&self) -> String {
        format!("{}-server-tls", self.link)
    }
    /// The agent client certificate.
    pub fn agent_tls_secret(&self) -> String {
        format!("{}-agent-tls", self.link)
    }
    /// kube-apiserver's client certificate and egress selector configuration.
    pub fn egress_secret(&self) -> String {
        format!("{}-apiserver-egress", self.link)
    }
    /// The agent's ClusterRole and ClusterRoleBinding; cluster-scoped, so the namespace is part
    /// of the name.
    pub fn agent_cluster_role(&self) -> String {
        format!("cplink:{}:{}:agent", self.namespace, self.link)
    }
    /// The servers' ClusterRole and ClusterRoleBinding; cluster-scoped, so the namespace is part
    /// of the name.
    pub fn server_cluster_role(&self) -> String {
        format!("cplink:{}:{}:server", self.namespace, self.link)
    }

    /// The audience of the agents' projected ServiceAccount tokens, which servers review them
    /// for. One per link: a token kubelet minted for one link's agents is refused by every
    /// other link's servers, and by the API server itself, so a server that receives one cannot
    /// use it to act as the agent. The agent DaemonSet's token volume and the servers'
    /// `--authentication-audience` both take it from here.
    pub fn agent_token_audience(&self) -> String {
        format!("cplink.dev/{}/{}", self.namespace, self.link)
    }
}

/// Everything the builders need, derived once per reconcile from a valid link.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Name of the link.
    pub name: String,
    /// Namespace of the link and of every namespaced child.
    pub namespace: String,
    /// The link's spec, defaults applied.
    pub spec: crate::crd::ControlPlaneLinkSpec,
    /// The parsed parts of the spec.
    pub valid: ValidSpec,
    /// Makes every namespaced child owned by (and garbage-collected with) the link.
    pub owner: OwnerReference,
    /// Image used when the spec names none.
    pub default_image: String,
}

/// Why a [`Plan`] could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The link lacks a namespace, name or uid (never the case for objects read from the API).
    #[error("ControlPlaneLink has no {0}")]
    MissingMetadata(&'static str),
}

impl Plan {
    /// Plans the children of `link`.
    pub fn new(
        link: &ControlPlaneLink,
        valid: ValidSpec,
        default_image: &str,
    ) -> Result<Self, PlanError> {
        let namespace = link
            .namespace()
            .ok_or(PlanError::MissingMetadata("namespace"))?;
        let owner = link
            .controller_owner_ref(&())
            .ok_or(PlanError::MissingMetadata("uid"))?;
        Ok(Self {
            name: link.name_any(),
            namespace,
            spec: link.spec.clone(),
            valid,
            owner,
            default_image: default_image.to_owned(),
        })
    }

    /// Names of the children.
    pub fn names(&self) -> Names {
        Names::new(&self.name, &self.namespace)
    }

    /// Whether the operator runs the agents, as a DaemonSet (`agent.authentication: token`),
    /// rather than agents running outside the cluster (`certificate`).
    pub fn agents_in_cluster(&self) -> bool {
        self.spec.agent.authentication == AgentAuthentication::Token
    }

    /// Labels that select a component's pods.
    pub fn selector(&self, component: Component) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
            ("app.kubernetes.io/instance".to_owned(), self.name.clone()),
            (
                "app.kubernetes.io/component".to_owned(),
                component.as_str().to_owned(),
            ),
        ])
    }

    /// Labels of a component's objects.
    pub fn labels(&self, component: Component) -> BTreeMap<String, String> {
        let mut labels = self.selector(component);
        labels.insert(
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        );
        labels
    }

    /// Metadata of a namespaced child: name, namespace, labels, controller owner reference.
    pub fn meta(&self, name: String, component: Component) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Metadata of a cluster-scoped child: no owner (a namespaced owner is not allowed), so the
    /// labels say which link it belongs to and the finalizer removes it.
    pub fn cluster_meta(&self, name: String, component: Component) -> ObjectMeta {
        let mut labels = self.labels(component);
        labels.insert(LINK_NAMESPACE_LABEL.to_owned(), self.namespace.clone());
        ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            ..ObjectMeta::default()
        }
    }

    /// In-cluster DNS name of a Service (`<svc>.<ns>.svc`).
    pub fn service_dns(&self, service: &str) -> String {
        format!("{service}.{}.svc", self.namespace)
    }

    /// `host:port` kube-apiserver dials: the external address if set, else the frontend Service.
    pub fn frontend_address(&self) -> String {
        let port = self.spec.server.frontend.port;
        match &self.valid.frontend_external {
            Some(ext) => format!("{}:{}", ext.host, ext.port.map_or(port, i32::from)),
            None => format!(
                "{}:{port}",
                self.service_dns(&self.names().frontend_service())
            ),
        }
    }

    /// What kube-apiserver connects to: in `GRPC` mode the socket's path on the server's node,
    /// else the frontend's `host:port` ([`Plan::frontend_address`]).
    pub fn apiserver_endpoint(&self) -> String {
        match &self.valid.grpc_socket {
            Some(socket) => socket.clone(),
            None => self.frontend_address(),
        }
    }

    /// `host:port` of the servers' agent endpoint: the external address if set (agents dial
    /// it), else the agent Service (agents find the servers in its EndpointSlices instead).
    pub fn agent_endpoint_address(&self) -> String {
        let port = self.spec.server.agent_endpoint.port;
        match &self.valid.agent_endpoint_external {
            Some(ext) => format!("{}:{}", ext.host, ext.port.map_or(port, i32::from)),
            None => format!("{}:{port}", self.service_dns(&self.names().agent_service())),
        }
    }

    /// Subject alternative names of the server certificate: every DNS form of both Services
    /// plus the external hosts.
    pub fn server_sans(&self) -> (BTreeSet<String>, BTreeSet<IpAddr>) {
        let names = self.names();
        let mut dns = BTreeSet::new();
        let mut ips = BTreeSet::new();
        for service in [names.frontend_service(), names.agent_service()] {
            let ns = &self.namespace;
            dns.insert(service.clone());
            dns.insert(format!("{service}.{ns}"));
            dns.insert(format!("{service}.{ns}.svc"));
            dns.insert(format!("{service}.{ns}.svc.cluster.local"));
        }
        let externals = [
            &self.valid.frontend_external,
            &self.valid.agent_endpoint_external,
        ];
        for ext in externals.into_iter().flatten() {
            match &ext.host {
                Host::Dns(name) => dns.insert(name.clone()),
                Host::Ip(ip) => ips.insert(*ip),
            };
        }
        (dns, ips)
    }
}

/// An environment variable from the downward API.
pub(crate) fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Pod security context shared by servers and agents.
pub(crate) fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Container security context shared by servers and agents: nothing beyond plain sockets.
pub(crate) fn container_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Test fixtures: `ControlPlaneLink::test().with_replicas(3)`.
#[cfg(test)]
pub(crate) mod fixtures {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use k8s_openapi::api::core::v1::{HTTPGetAction, PodSpec, PodTemplateSpec, Probe};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::Plan;
    use crate::crd::{ControlPlaneLink, ControlPlaneLinkSpec};
    use crate::validate::validate;

    /// Image the fixtures pass as the operator's default.
    pub const DEFAULT_IMAGE: &str = "ghcr.io/cplink/cplink:test";

    impl ControlPlaneLink {
        /// A link named `link` in namespace `tunnels` with the default spec.
        pub fn test() -> Self {
            let mut link = ControlPlaneLink::new("link", ControlPlaneLinkSpec::default());
            link.metadata = ObjectMeta {
                name: Some("link".into()),
                namespace: Some("tunnels".into()),
                uid: Some("6f1c3b1e-0000-4000-8000-000000000001".into()),
                generation: Some(1),
                ..ObjectMeta::default()
            };
            link
        }

        /// With `server.replicas`.
        pub fn with_replicas(mut self, replicas: i32) -> Self {
            self.spec.server.replicas = replicas;
            self
        }

        /// With `server.frontend.mode: GRPC` and its socket in `socket_host_path`.
        pub fn in_grpc_mode(mut self, socket_host_path: &str) -> Self {
            self.spec.server.frontend.mode = crate::crd::FrontendMode::Grpc;
            self.spec.server.frontend.socket_host_path = Some(socket_host_path.into());
            self
        }

        /// With `agent.authentication: certificate`: agents run outside the cluster.
        pub fn with_agents_outside_the_cluster(mut self) -> Self {
            self.spec.agent.authentication = crate::crd::AgentAuthentication::Certificate;
            self
        }

        /// With `metadata.generation`.
        pub fn with_generation(mut self, generation: i64) -> Self {
            self.metadata.generation = Some(generation);
            self
        }

        /// With a change to the spec.
        pub fn with_spec(mut self, f: impl FnOnce(&mut ControlPlaneLinkSpec)) -> Self {
            f(&mut self.spec);
            self
        }

        /// The builders' input for this link; panics when the spec is invalid.
        pub fn plan(&self) -> Plan {
            let valid = validate("link", &self.spec).expect("fixture spec is valid");
            Plan::new(self, valid, DEFAULT_IMAGE).expect("fixture has metadata")
        }
    }

    /// A built object that runs pods from a template.
    pub trait Workload {
        /// Its pod template; panics when it has no spec.
        fn template(&self) -> &PodTemplateSpec;

        /// The spec of its pods; panics when there is none.
        fn pod(&self) -> &PodSpec {
            self.template().spec.as_ref().expect("pod spec")
        }

        /// The TLS checksum annotation of its pod template.
        fn tls_checksum(&self) -> &str {
            let annotations = self
                .template()
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref());
            &annotations.expect("annotations")["cplink.dev/tls-checksum"]
        }
    }

    impl Workload for Deployment {
        fn template(&self) -> &PodTemplateSpec {
            &self.spec.as_ref().expect("spec").template
        }
    }

    impl Workload for DaemonSet {
        fn template(&self) -> &PodTemplateSpec {
            &self.spec.as_ref().expect("spec").template
        }
    }

    /// The HTTP request of a probe; panics when there is none.
    pub fn http_get(probe: Option<&Probe>) -> &HTTPGetAction {
        probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_link_and_cluster_names_include_the_namespace() {
        let names = Names::new("edge", "tunnels");
        assert_eq!(names.server(), "edge-server");
        assert_eq!(names.agent(), "edge-agent");
        assert_eq!(names.frontend_service(), "edge-frontend");
        assert_eq!(names.agent_service(), "edge-agent-endpoint");
        assert_eq!(names.ca_secret(), "edge-ca");
        assert_eq!(names.server_tls_secret(), "edge-server-tls");
        assert_eq!(names.agent_tls_secret(), "edge-agent-tls");
        assert_eq!(names.egress_secret(), "edge-apiserver-egress");
        assert_eq!(names.agent_cluster_role(), "cplink:tunnels:edge:agent");
        assert_eq!(names.server_cluster_role(), "cplink:tunnels:edge:server");
    }

    #[test]
    fn each_link_has_its_own_token_audience() {
        assert_eq!(
            Names::new("edge", "tunnels").agent_token_audience(),
            "cplink.dev/tunnels/edge"
        );
        assert_ne!(
            Names::new("edge", "tunnels").agent_token_audience(),
            Names::new("edge", "other").agent_token_audience(),
            "links of the same name in two namespaces"
        );
        assert_ne!(
            Names::new("edge", "tunnels").agent_token_audience(),
            Names::new("core", "tunnels").agent_token_audience()
        );
    }

    #[test]
    fn the_operator_runs_the_agents_unless_they_authenticate_with_certificates() {
        assert!(ControlPlaneLink::test().plan().agents_in_cluster());
        assert!(
            !ControlPlaneLink::test()
                .with_agents_outside_the_cluster()
                .plan()
                .agents_in_cluster()
        );
    }

    #[test]
    fn children_are_labelled_and_owned_by_the_link() {
        let plan = ControlPlaneLink::test().plan();
        let meta = plan.meta("x".into(), Component::Agent);
        let labels = meta.labels.expect("labels");
        assert_eq!(labels["app.kubernetes.io/name"], "cplink");
        assert_eq!(labels["app.kubernetes.io/instance"], "link");
        assert_eq!(labels["app.kubernetes.io/component"], "agent");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "cplink-operator");
        let owner = &meta.owner_references.expect("owner")[0];
        assert_eq!(owner.kind, "ControlPlaneLink");
        assert_eq!(owner.api_version, "cplink.dev/v1alpha1");
        assert_eq!(owner.name, "link");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn addresses_default_to_service_dns_names() {
        let plan = ControlPlaneLink::test().plan();
        assert_eq!(plan.frontend_address(), "link-frontend.tunnels.svc:8090");
        assert_eq!(
            plan.agent_endpoint_address(),
            "link-agent-endpoint.tunnels.svc:8091"
        );
    }

    #[test]
    fn kube_apiserver_connects_to_the_socket_in_grpc_mode() {
        assert_eq!(
            ControlPlaneLink::test().plan().apiserver_endpoint(),
            "link-frontend.tunnels.svc:8090"
        );
        let plan = ControlPlaneLink::test().in_grpc_mode("/srv/cplink").plan();
        assert_eq!(
            plan.apiserver_endpoint(),
            "/srv/cplink/konnectivity-server.socket"
        );
    }

    #[test]
    fn external_addresses_override_and_join_the_server_sans() {
        let plan = ControlPlaneLink::test()
            .with_spec(|s| {
                s.server.frontend.external_address = Some("10.0.0.5".into());
                s.server.agent_endpoint.external_address = Some("tunnel.example.com:443".into());
            })
            .plan();
        assert_eq!(plan.frontend_address(), "10.0.0.5:8090");
        assert_eq!(plan.agent_endpoint_address(), "tunnel.example.com:443");
        let (dns, ips) = plan.server_sans();
        assert!(dns.contains("tunnel.example.com"));
        assert!(dns.contains("link-frontend.tunnels.svc.cluster.local"));
        assert!(dns.contains("link-agent-endpoint.tunnels"));
        assert_eq!(dns.len(), 9);
        assert_eq!(ips, ["10.0.0.5".parse().expect("ip")].into());
    }
}
