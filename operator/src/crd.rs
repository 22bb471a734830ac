//! The `ControlPlaneLink` custom resource: types, defaults and the schema the apiserver enforces.
//!
//! Defaults live in serde `default` functions, so the same values land in the generated schema
//! (the apiserver fills them in) and in this crate when it reads an object that was stored
//! without them. What a structural schema without CEL cannot express is checked by
//! [`crate::validate`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resource.
pub const GROUP: &str = "cplink.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";

/// Desired state of a reverse-tunnel link between a control plane and the nodes of this cluster.
///
/// The operator runs `server.replicas` tunnel servers (a Deployment) and, unless agents run
/// outside the cluster, one agent per node (a DaemonSet), issues their certificates and writes
/// an `EgressSelectorConfiguration` that kube-apiserver can use to reach nodes through the
/// tunnel.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cplink.dev",
    version = "v1alpha1",
    kind = "ControlPlaneLink",
    plural = "controlplanelinks",
    namespaced,
    shortname = "cpl",
    status = "ControlPlaneLinkStatus",
    derive = "PartialEq",
    doc = "A reverse-tunnel link between a control plane and the nodes of this cluster.",
    printcolumn = r#"{"name":"Ready","type":"string","description":"Whether the link carries traffic","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Servers","type":"string","description":"Ready/desired server replicas","jsonPath":".status.server.summary"}"#,
    printcolumn = r#"{"name":"Agents","type":"string","description":"Ready/desired agents","jsonPath":".status.agents.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneLinkSpec {
    /// The tunnel servers kube-apiserver connects to and agents dial.
    #[serde(default)]
    pub server: ServerSpec,
    /// The per-node agents.
    #[serde(default)]
    pub agent: AgentSpec,
    /// Certificate authority and certificate lifetimes.
    #[serde(default)]
    pub tls: TlsSpec,
    /// How servers pick an agent for a destination.
    #[serde(default)]
    pub routing: RoutingSpec,
    /// Cluster address ranges agents may reach when `agent.allowedDestinations` is empty.
    #[serde(default)]
    pub network: NetworkSpec,
    /// Log filter for servers and agents (tracing `EnvFilter` syntax, e.g. `info` or `cplink=debug`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for ControlPlaneLinkSpec {
    fn default() -> Self {
        Self {
            server: ServerSpec::default(),
            agent: AgentSpec::default(),
            tls: TlsSpec::default(),
            routing: RoutingSpec::default(),
            network: NetworkSpec::default(),
            log_level: default_log_level(),
        }
    }
}

/// The tunnel server Deployment and its Services.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Number of server replicas; every agent links to every replica.
    #[serde(default = "default_server_replicas")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Container image holding `cplink-server`; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where kube-apiserver reaches the servers: HTTP CONNECT over mutual TLS, or konnectivity
    /// gRPC over a Unix socket on the server's node.
    #[serde(default)]
    pub frontend: FrontendSpec,
    /// Where agents reach the servers.
    #[serde(default)]
    pub agent_endpoint: AgentEndpointSpec,
    /// Node selector of server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of server pods; replaces the default anti-affinity across nodes (preferred, or
    /// required in `GRPC` mode, where servers on one node would share the socket directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Publish a Lease per server in the link's namespace, as konnectivity-server does
    /// (`konnectivity-proxy-server-<pod>`, label `k8s-app=konnectivity-server`, 30 s, renewed
    /// every 15 s, deleted when the server stops), for upstream konnectivity agents run with
    /// `--count-server-leases --lease-namespace <the link's namespace>`: they then link to
    /// every server. The servers get the rights on leases in that namespace. cplink agents do
    /// not need it: they follow the agent Service's EndpointSlices.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_leases: bool,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            replicas: default_server_replicas(),
            image: None,
            resources: None,
            frontend: FrontendSpec::default(),
            agent_endpoint: AgentEndpointSpec::default(),
            node_selector: None,
            tolerations: None,
            affinity: None,
            publish_leases: false,
        }
    }
}

/// Name of the gRPC frontend's socket inside `frontend.socketHostPath`.
pub const GRPC_SOCKET_FILE: &str = "konnectivity-server.socket";

/// How kube-apiserver reaches the servers.
///
/// In `HTTPConnect` mode it dials the frontend Service (or `externalAddress`) with HTTP CONNECT
/// over mutual TLS. In `GRPC` mode it speaks konnectivity gRPC over a Unix socket that each
/// server creates in `socketHostPath` on its node; the TLS frontend keeps serving HTTP CONNECT.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_socket_host_path_in_grpc_mode)]
pub struct FrontendSpec {
    /// Protocol of kube-apiserver's egress selector: `HTTPConnect` (over mutual TLS) or `GRPC`
    /// (over the Unix socket in `socketHostPath`).
    #[serde(default)]
    pub mode: FrontendMode,
    /// Absolute directory on the node where a `GRPC`-mode server creates
    /// `konnectivity-server.socket`, mounted as a `DirectoryOrCreate` hostPath volume (the
    /// namespace must admit hostPath volumes); required in `GRPC` mode, ignored otherwise; at
    /// most 80 characters, so the socket path fits a Unix socket address. kube-apiserver must run
    /// on the same node: place the servers on control-plane nodes with `nodeSelector` and
    /// `tolerations`, at most one per node (`replicas` at most the number of such nodes). The
    /// server runs as uid 65532: create the directory writable by it, e.g.
    /// `install -d -o 65532 -g 65532 -m 0750 /etc/kubernetes/cplink-frontend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"),
        length(max = 80)
    )]
    pub socket_host_path: Option<String>,
    /// Port of the frontend, on the Service and on the server pods.
    #[serde(default = "default_frontend_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Type of the frontend Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Host (DNS name or IP), optionally `host:port`, at which kube-apiserver reaches the
    /// frontend when it is not the Service DNS name. Added to the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_address: Option<String>,
    /// Egress selections the generated `EgressSelectorConfiguration` lists besides `cluster`,
    /// each with `proxyProtocol: Direct` (kube-apiserver connects on its own, as it does for a
    /// selection the file leaves out): `controlplane` (webhooks, aggregated API servers) and
    /// `etcd`. Empty by default: the file has `cluster` only. These names are read by every
    /// kube-apiserver from 1.20 on; the old alias `master` is never written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub direct_egress: Vec<DirectEgress>,
}

/// An egress selection kube-apiserver keeps connecting to directly.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum DirectEgress {
    /// Traffic to the control plane: admission webhooks, aggregated API servers.
    #[serde(rename = "controlplane")]
    ControlPlane,
    /// Traffic to etcd.
    #[serde(rename = "etcd")]
    Etcd,
}

impl DirectEgress {
    /// Every selection, in the order the generated file lists them.
    pub const ALL: [DirectEgress; 2] = [DirectEgress::ControlPlane, DirectEgress::Etcd];

    /// The selection's name in `EgressSelectorConfiguration`.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectEgress::ControlPlane => "controlplane",
            DirectEgress::Etcd => "etcd",
        }
    }
}

impl Default for FrontendSpec {
    fn default() -> Self {
        Self {
            mode: FrontendMode::default(),
            socket_host_path: None,
            port: default_frontend_port(),
            service_type: ServiceType::default(),
            external_address: None,
            direct_egress: Vec::new(),
        }
    }
}

/// The protocol kube-apiserver's egress selector speaks to the servers.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FrontendMode {
    /// HTTP CONNECT over mutual TLS to the frontend Service.
    #[default]
    #[serde(rename = "HTTPConnect")]
    HttpConnect,
    /// konnectivity gRPC over a Unix socket on the server's node.
    #[serde(rename = "GRPC")]
    Grpc,
}

impl FrontendMode {
    /// The name the CRD and the egress selector configuration use.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendMode::HttpConnect => "HTTPConnect",
            FrontendMode::Grpc => "GRPC",
        }
    }
}

/// `socketHostPath` is required in `GRPC` mode: the schema says "not (mode is GRPC and
/// socketHostPath is missing)". `not` because kube's structural rewrite hoists the properties
/// of `anyOf`/`oneOf` branches into the parent, which would lose the condition; a structural
/// schema allows `not` as long as it adds no types, defaults or descriptions.
fn require_socket_host_path_in_grpc_mode(schema: &mut schemars::Schema) {
    schema.insert(
        "not".to_owned(),
        serde_json::json!({
            "required": ["mode"],
            "properties": {"mode": {"enum": [FrontendMode::Grpc.as_str()]}},
            "not": {"required": ["socketHostPath"]},
        }),
    );
}

/// The Service agents dial.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentEndpointSpec {
    /// Port of the agent endpoint, on the Service and on the server pods.
    #[serde(default = "default_agent_endpoint_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Type of the agent Service; `ClusterIP` makes it headless so agents find every server.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Host (DNS name or IP), optionally `host:port`, at which agents reach the servers from
    /// outside the cluster network, typically a load balancer in front of every replica. Added
    /// to the server certificate. Agents dial it until they are linked to as many servers as
    /// `replicas`. When unset, agents find the servers in the EndpointSlices of the agent
    /// Service and link to each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_address: Option<String>,
}

impl Default for AgentEndpointSpec {
    fn default() -> Self {
        Self {
            port: default_agent_endpoint_port(),
            service_type: ServiceType::default(),
            external_address: None,
        }
    }
}

/// Kubernetes Service type.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also exposed on a port of every node.
    NodePort,
    /// Also exposed through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The name the Service API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The per-node agents: how they authenticate and, in `token` mode, the DaemonSet running them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Container image holding `cplink-agent`; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Compute resources of the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of agent pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of agent pods; by default every taint is tolerated.
    #[serde(default = "default_agent_tolerations")]
    pub tolerations: Vec<Toleration>,
    /// Priority class of agent pods.
    #[serde(default = "default_agent_priority_class")]
    pub priority_class_name: String,
    /// Destinations agents may dial. When empty: the node's own kubelet (host IP, port 10250)
    /// plus `network.podCIDRs` and `network.serviceCIDRs`. Link-local ranges are never allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_destinations: Vec<AllowedDestination>,
    /// How an agent proves which node it speaks for; servers then accept only the node name,
    /// host IPs and pod ranges that node's Node object backs. `token`: the operator runs the
    /// agent DaemonSet and each agent also sends a token bound to its pod, for the audience
    /// `cplink.dev/<namespace>/<link>`, which servers review. `certificate`: agents run outside
    /// the cluster, each with its own client certificate signed by the link's CA whose subject
    /// CN is `system:node:<nodeName>`; the operator runs no agents and the other `agent`
    /// fields are ignored.
    #[serde(default)]
    pub authentication: AgentAuthentication,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            image: None,
            resources: None,
            node_selector: None,
            tolerations: default_agent_tolerations(),
            priority_class_name: default_agent_priority_class(),
            allowed_destinations: Vec::new(),
            authentication: AgentAuthentication::default(),
        }
    }
}

/// How agents prove which node they speak for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentAuthentication {
    /// The operator's in-cluster agents send a token bound to their pod.
    #[default]
    Token,
    /// Agents outside the cluster present a certificate for `system:node:<nodeName>`.
    Certificate,
}

impl AgentAuthentication {
    /// The name the CRD and the server's `--agent-identity` flag use.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentAuthentication::Token => "token",
            AgentAuthentication::Certificate => "certificate",
        }
    }
}

/// A destination range agents may dial.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedDestination {
    /// Address range, e.g. `10.96.0.0/12` or `fd00::/8`.
    #[schemars(regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"))]
    pub cidr: String,
    /// Ports or port ranges (`"443"`, `"30000-32767"`); all ports when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[0-9]{1,5}(-[0-9]{1,5})?$")))]
    pub ports: Vec<String>,
}

/// Certificates of the link.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in the link's namespace with `tls.crt` and `tls.key` (PKCS#8) of a CA to sign
    /// with. When unset the operator generates a CA in `<link>-ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretRef>,
    /// Lifetime of issued certificates (e.g. `8760h`).
    #[serde(default = "default_validity")]
    pub validity: String,
    /// Certificates are reissued this long before they expire (e.g. `720h`).
    #[serde(default = "default_renew_before")]
    pub renew_before: String,
}

impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            ca_secret_ref: None,
            validity: default_validity(),
            renew_before: default_renew_before(),
        }
    }
}

/// A reference to a Secret in the link's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Routing of tunneled connections to agents.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// Strategies tried in order for each destination (`--strategies` of the servers), each at
    /// most once: `node` (the destination is an agent's node name or host IP), `cidr` (it lies
    /// in an agent's pod range, read from its Node), `default-route` (agents that offer
    /// themselves for destinations nobody claims, such as upstream konnectivity agents linked
    /// with `default-route=true`; the operator's agents do not), `any` (the least-loaded
    /// agent).
    #[serde(default = "default_strategies")]
    pub strategies: Vec<RoutingStrategy>,
}

impl Default for RoutingSpec {
    fn default() -> Self {
        Self {
            strategies: default_strategies(),
        }
    }
}

/// One routing strategy of the server.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoutingStrategy {
    /// The destination is a node name or host IP of an agent.
    Node,
    /// The destination lies in an agent's pod CIDR.
    Cidr,
    /// An agent that offers itself for destinations no other agent claims.
    #[serde(rename = "default-route")]
    DefaultRoute,
    /// Any healthy agent, least loaded first.
    Any,
}

impl RoutingStrategy {
    /// The name the server's `--strategies` flag uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingStrategy::Node => "node",
            RoutingStrategy::Cidr => "cidr",
            RoutingStrategy::DefaultRoute => "default-route",
            RoutingStrategy::Any => "any",
        }
    }
}

/// Cluster address ranges, used for the agents' default destination policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct NetworkSpec {
    /// Pod address ranges of the cluster (all ports allowed).
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")))]
    pub pod_cidrs: Vec<String>,
    /// Service address ranges of the cluster (all ports allowed).
    #[serde(
        rename = "serviceCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")))]
    pub service_cidrs: Vec<String>,
}

fn default_log_level() -> String {
    "info".to_owned()
}
fn default_server_replicas() -> i32 {
    2
}
fn default_frontend_port() -> i32 {
    8090
}
fn default_agent_endpoint_port() -> i32 {
    8091
}
fn default_agent_tolerations() -> Vec<Toleration> {
    vec![Toleration {
        operator: Some("Exists".to_owned()),
        ..Toleration::default()
    }]
}
fn default_agent_priority_class() -> String {
    "system-node-critical".to_owned()
}
fn default_validity() -> String {
    "8760h".to_owned()
}
fn default_renew_before() -> String {
    "720h".to_owned()
}
fn default_strategies() -> Vec<RoutingStrategy> {
    vec![
        RoutingStrategy::Node,
        RoutingStrategy::Cidr,
        RoutingStrategy::Any,
    ]
}

/// Observed state of a `ControlPlaneLink`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneLinkStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `ServerAvailable`, `AgentsAvailable` and `CertificatesReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Server replicas, from the Deployment status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerStatus>,
    /// Agents, from the DaemonSet status; absent with `agent.authentication: certificate`, where
    /// agents run outside the cluster and `server.linkedAgents` is all there is to count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<AgentsStatus>,
    /// How kube-apiserver reaches the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendStatus>,
    /// Issued certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificatesStatus>,
}

/// Server replicas.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    /// Desired replicas.
    pub replicas: i32,
    /// Replicas passing their readiness probe.
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    pub summary: String,
    /// Agents linked to each running server pod, by pod name, as the pod's admin endpoint
    /// (metric `cplink_server_agents_linked`) reported it at the last reconcile. With every
    /// agent linked to every server, each count equals `agents.desired`. A pod whose endpoint
    /// did not answer is listed without a count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linked_agents: Vec<ServerLinks>,
}

/// Agents linked to one server pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerLinks {
    /// Name of the server pod.
    pub pod: String,
    /// Agents linked to it; absent when its admin endpoint could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<i64>,
}

/// Agents.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentsStatus {
    /// Nodes that should run an agent.
    pub desired: i32,
    /// Agents linked to every server.
    pub ready: i32,
    /// `ready/desired`, for `kubectl get`.
    pub summary: String,
}

/// How kube-apiserver reaches the link.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendStatus {
    /// `host:port` of the frontend, or in `GRPC` mode the path of the Unix socket on the nodes
    /// running a server.
    pub address: String,
    /// Secret holding the `EgressSelectorConfiguration` and kube-apiserver's client certificate.
    pub egress_secret: String,
}

/// Issued certificates.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesStatus {
    /// Earliest expiry among the CA and the issued certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// kube-apiserver's egress client certificate, which kube-apiserver reads only when it
    /// starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressCertificateStatus>,
}

/// kube-apiserver's egress client certificate: the one in the egress Secret, and the one a
/// kube-apiserver that has not restarted since it was replaced still presents.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressCertificateStatus {
    /// Expiry of the certificate in the egress Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// When the operator replaced a certificate that has not expired yet: a kube-apiserver
    /// started before then still presents it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_at: Option<Time>,
    /// Expiry of that replaced certificate (the earliest, when several were replaced): restart
    /// kube-apiserver with the egress Secret's files before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_not_after: Option<Time>,
}

/// The CustomResourceDefinition as YAML, as checked in at `crds/controlplanelinks.cplink.dev.yaml`.
pub fn crd_yaml() -> Result<String, crate::yaml::Error> {
    use kube::CustomResourceExt;
    crate::yaml::to_string(&ControlPlaneLink::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRD_PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/controlplanelinks.cplink.dev.yaml"
    );

    #[test]
    fn the_checked_in_crd_matches_the_code() {
        let generated = crd_yaml().expect("CRD serializes");
        let checked_in = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
        assert!(
            generated == checked_in,
            "crds/controlplanelinks.cplink.dev.yaml is out of date; regenerate it with \
             `cargo run -p cplink-operator --bin crdgen > crds/controlplanelinks.cplink.dev.yaml`"
        );
    }

    #[test]
    fn an_empty_spec_gets_every_documented_default() {
        let spec: ControlPlaneLinkSpec = serde_json::from_str("{}").expect("empty spec parses");
        assert_eq!(spec, ControlPlaneLinkSpec::default());
        assert_eq!(spec.server.replicas, 2);
        assert_eq!(spec.server.frontend.port, 8090);
        assert_eq!(spec.server.agent_endpoint.port, 8091);
        assert_eq!(spec.server.frontend.service_type, ServiceType::ClusterIP);
        assert_eq!(spec.server.frontend.mode, FrontendMode::HttpConnect);
        assert_eq!(spec.server.frontend.socket_host_path, None);
        assert_eq!(spec.agent.priority_class_name, "system-node-critical");
        assert_eq!(spec.agent.authentication, AgentAuthentication::Token);
        assert_eq!(spec.agent.tolerations.len(), 1);
        assert_eq!(
            spec.agent.tolerations[0].operator.as_deref(),
            Some("Exists")
        );
        assert_eq!(spec.tls.validity, "8760h");
        assert_eq!(spec.tls.renew_before, "720h");
        assert_eq!(
            spec.routing.strategies,
            vec![
                RoutingStrategy::Node,
                RoutingStrategy::Cidr,
                RoutingStrategy::Any
            ]
        );
        assert_eq!(spec.log_level, "info");
    }

    #[test]
    fn nested_defaults_apply_inside_a_partial_section() {
        let spec: ControlPlaneLinkSpec =
            serde_json::from_str(r#"{"server": {"frontend": {"serviceType": "NodePort"}}}"#)
                .expect("partial spec parses");
        assert_eq!(spec.server.replicas, 2);
        assert_eq!(spec.server.frontend.port, 8090);
        assert_eq!(spec.server.frontend.service_type, ServiceType::NodePort);
    }

    #[test]
    fn the_frontend_mode_uses_the_egress_selector_spelling() {
        let spec: ControlPlaneLinkSpec = serde_json::from_str(
            r#"{"server": {"frontend": {"mode": "GRPC", "socketHostPath": "/srv/cplink"}}}"#,
        )
        .expect("GRPC mode parses");
        assert_eq!(spec.server.frontend.mode, FrontendMode::Grpc);
        assert_eq!(
            spec.server.frontend.socket_host_path.as_deref(),
            Some("/srv/cplink")
        );
        assert!(
            serde_json::from_str::<FrontendSpec>(r#"{"mode": "grpc"}"#).is_err(),
            "mode names are case-sensitive, as in EgressSelectorConfiguration"
        );
        let json = serde_json::to_value(FrontendSpec::default()).expect("serializes");
        assert_eq!(json["mode"], "HTTPConnect");
    }

    /// The schema's own check, as the API server would apply it: in GRPC mode the socket
    /// directory is required; a pattern keeps it absolute.
    #[test]
    fn the_schema_requires_a_socket_directory_in_grpc_mode() {
        let schema = serde_json::to_value(schemars::schema_for!(FrontendSpec)).expect("json");
        assert_eq!(
            schema["not"],
            serde_json::json!({
                "required": ["mode"],
                "properties": {"mode": {"enum": ["GRPC"]}},
                "not": {"required": ["socketHostPath"]},
            })
        );
        let path = &schema["properties"]["socketHostPath"];
        assert_eq!(path["maxLength"], 80);
        assert_eq!(
            path["pattern"],
            r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+$"
        );
    }

    #[test]
    fn strategies_use_the_server_flag_spelling_default_route_included() {
        let spec: ControlPlaneLinkSpec = serde_json::from_str(
            r#"{"routing": {"strategies": ["node", "default-route", "cidr", "any"]}}"#,
        )
        .expect("strategies parse");
        let names: Vec<&str> = spec.routing.strategies.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["node", "default-route", "cidr", "any"]);
        assert_eq!(
            serde_json::to_value(&spec.routing).expect("serializes")["strategies"],
            serde_json::json!(["node", "default-route", "cidr", "any"])
        );
        assert!(
            serde_json::from_str::<RoutingSpec>(r#"{"strategies": ["defaultRoute"]}"#).is_err()
        );
        // What the apiserver enforces: the enum in the generated CRD.
        let crd = serde_json::to_value(<ControlPlaneLink as kube::CustomResourceExt>::crd())
            .expect("json");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["routing"]["properties"]["strategies"]["items"]["enum"],
            serde_json::json!(["node", "cidr", "default-route", "any"])
        );
    }

    #[test]
    fn agent_authentication_uses_the_server_flag_spelling() {
        let spec: ControlPlaneLinkSpec =
            serde_json::from_str(r#"{"agent": {"authentication": "certificate"}}"#)
                .expect("certificate parses");
        assert_eq!(spec.agent.authentication, AgentAuthentication::Certificate);
        assert_eq!(spec.agent.authentication.as_str(), "certificate");
        assert_eq!(AgentAuthentication::Token.as_str(), "token");
        assert_eq!(
            serde_json::to_value(&spec.agent).expect("serializes")["authentication"],
            "certificate"
        );
        assert!(serde_json::from_str::<AgentSpec>(r#"{"authentication": "Token"}"#).is_err());
        // What the apiserver enforces and fills in: the enum and the default in the CRD.
        let crd = serde_json::to_value(<ControlPlaneLink as kube::CustomResourceExt>::crd())
            .expect("json");
        let agent = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["agent"];
        let authentication = &agent["properties"]["authentication"];
        assert_eq!(
            authentication["enum"],
            serde_json::json!(["token", "certificate"])
        );
        assert_eq!(authentication["default"], "token");
        assert_eq!(agent["default"]["authentication"], "token");
    }

    #[test]
    fn network_ranges_use_kubernetes_spelling() {
        let spec: ControlPlaneLinkSpec = serde_json::from_str(
            r#"{"network": {"podCIDRs": ["10.244.0.0/16"], "serviceCIDRs": ["10.96.0.0/12"]}}"#,
        )
        .expect("network parses");
        assert_eq!(spec.network.pod_cidrs, vec!["10.244.0.0/16"]);
        assert_eq!(spec.network.service_cidrs, vec!["10.96.0.0/12"]);
    }
}
