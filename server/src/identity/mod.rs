//! Which node an agent is, proven rather than announced.
//!
//! Every agent of a link holds the same client certificate, so the certificate proves only that
//! an agent belongs to the link. With `--agent-identity declared` the server believes the node
//! name, host IPs and pod ranges an agent announces; anyone holding the certificate could then
//! announce another node and receive kube-apiserver's dials to it. The other modes bind each
//! agent to one Node:
//!
//! - `token`: the hello carries the agent pod's projected service-account token. A TokenReview
//!   for the link's audience names the pod; the pod must be owned by the agent DaemonSet, and
//!   its `spec.nodeName` is the agent's node.
//! - `certificate`: for agents outside the cluster, each with its own certificate whose subject
//!   is `CN=system:node:<node>`.
//!
//! Either way the Node object decides what the agent may route (see [`nodes::Backing`]);
//! `crate::agents::watch` keeps that true while the link lives.

pub(crate) mod nodes;
pub mod tokens;

use std::net::IpAddr;
use std::sync::Arc;

use cplink_proto::hello::Identifiers;
use cplink_runtime::kubeapi::KubeApi;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};

use nodes::Backing;
use tokens::{AuthError, TokenAuth};

/// The subject CN prefix of per-node certificates, as kubelets' client certificates have it.
pub const NODE_CN_PREFIX: &str = "system:node:";

/// How the server learns which node an agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityMode {
    /// Believe what the agent announces (every agent holding the link's certificate can claim
    /// any node).
    Declared,
    /// The agent's pod-bound service-account token names its pod, and the pod its node.
    Token,
    /// The agent's own client certificate names its node (`CN=system:node:<node>`).
    Certificate,
}

/// Who a verified agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The Node the agent is bound to.
    pub node: String,
    /// The agent's pod, in token mode.
    pub pod: Option<PodRef>,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pod {
            Some(pod) => write!(
                f,
                "node {} (pod {}/{}, uid {})",
                self.node, pod.namespace, pod.name, pod.uid
            ),
            None => write!(f, "node {} (certificate)", self.node),
        }
    }
}

/// An agent's pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
}

/// What an agent says it is, from a native hello or konnectivity metadata.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    /// The agent id, when it must be the node's name (native agents; upstream agents choose
    /// their own ids).
    pub(crate) agent_id: Option<&'a str>,
    /// The node name the agent announced.
    pub(crate) node_name: Option<&'a str>,
    /// What the agent announced it routes.
    pub(crate) identifiers: &'a Identifiers,
}

/// A verified agent and what it routes.
#[derive(Debug, Clone)]
pub(crate) struct Binding {
    pub(crate) verified: Verified,
    pub(crate) identifiers: Identifiers,
}

/// Why an agent's identity does not back its hello. The text goes back to the agent, which
/// logs it.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Token mode, and the hello carries no token.
    #[error(
        "this server binds agents to their nodes and needs the agent pod's service-account \
         token: mount a projected serviceAccountToken volume and pass --service-account-token-path"
    )]
    NoToken,
    /// The token was not accepted.
    #[error("{0}")]
    Token(AuthError),
    /// The token is valid but bound to no pod (a legacy Secret token, or a TokenRequest
    /// without a pod).
    #[error("the token is not bound to a pod: use a projected serviceAccountToken volume")]
    NotPodBound,
    /// The pod the token names is not an agent pod of this link, or is gone.
    #[error("{0}")]
    Pod(String),
    /// Certificate mode, and the client certificate names no node.
    #[error("the client certificate names no node: its subject must be CN={NODE_CN_PREFIX}<node>")]
    NoNodeCertificate,
    /// The Node the identity names does not exist.
    #[error("node {0} not found")]
    NodeNotFound(String),
    /// The agent id is not the node's name.
    #[error("agent id {agent_id:?} is not the agent's verified node {node}")]
    AgentId {
        /// The announced id.
        agent_id: String,
        /// The verified node.
        node: String,
    },
    /// The announced node name is another node's.
    #[error("node name {announced:?} is not the agent's verified node {node}")]
    NodeName {
        /// The announced node name.
        announced: String,
        /// The verified node.
        node: String,
    },
    /// A host IP the Node does not have.
    #[error("host IP {ip} is not an address of node {node} (it has {})", list(.backed))]
    HostIp {
        /// The announced IP.
        ip: IpAddr,
        /// The verified node.
        node: String,
        /// The Node's addresses.
        backed: Vec<IpAddr>,
    },
    /// A pod range outside the Node's.
    #[error("pod CIDR {cidr} is not within a pod range of node {node} (it has {})", list(.backed))]
    PodCidr {
        /// The announced range.
        cidr: IpNet,
        /// The verified node.
        node: String,
        /// The Node's pod ranges.
        backed: Vec<IpNet>,
    },
    /// The Kubernetes API could not be asked; the agent tries again later.
    #[error("cannot verify the agent's identity now: {0}")]
    Unavailable(String),
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Refusal {
    /// Fixed metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::Token(AuthError::Unavailable(_)) | Refusal::Unavailable(_) => "unavailable",
            Refusal::Token(_) => "token",
            Refusal::NotPodBound => "not_pod_bound",
            Refusal::Pod(_) => "pod",
            Refusal::NoNodeCertificate => "no_node_certificate",
            Refusal::NodeNotFound(_) => "node_not_found",
            Refusal::AgentId { .. } => "agent_id",
            Refusal::NodeName { .. } => "node_name",
            Refusal::HostIp { .. } => "host_ip",
            Refusal::PodCidr { .. } => "pod_cidr",
        }
    }
}

/// How agents are bound to nodes, and what that needs.
#[derive(Debug, Clone)]
pub struct NodeBinding {
    mode: IdentityMode,
    /// Token mode: reviews tokens of the agents' service account.
    tokens: Option<Arc<TokenAuth>>,
    /// Token mode: the DaemonSet that owns agent pods.
    daemonset: String,
    /// The API, for Pods and Nodes (token and certificate modes).
    api: Option<Arc<KubeApi>>,
}

impl NodeBinding {
    /// Trusts what agents announce.
    pub fn declared() -> Self {
        NodeBinding {
            mode: IdentityMode::Declared,
            tokens: None,
            daemonset: String::new(),
            api: None,
        }
    }

    /// Binds agents by their pods' tokens, which `tokens` reviews; pods must be owned by
    /// `daemonset` in the tokens' namespace.
    pub(crate) fn token(tokens: Arc<TokenAuth>, daemonset: String, api: Arc<KubeApi>) -> Self {
        NodeBinding {
            mode: IdentityMode::Token,
            tokens: Some(tokens),
            daemonset,
            api: Some(api),
        }
    }

    /// Binds agents by their certificates' subjects.
    pub(crate) fn certificate(api: Arc<KubeApi>) -> Self {
        NodeBinding {
            mode: IdentityMode::Certificate,
            tokens: None,
            daemonset: String::new(),
            api: Some(api),
        }
    }

    /// The mode.
    pub fn mode(&self) -> IdentityMode {
        self.mode
    }

    /// The namespace agent pods live in (token mode).
    pub(crate) fn pod_namespace(&self) -> Option<&str> {
        self.tokens.as_deref().map(TokenAuth::namespace)
    }

    pub(crate) fn api(&self) -> Option<&Arc<KubeApi>> {
        self.api.as_ref()
    }

    /// Verifies `claim` against the agent's proven identity: `None` in declared mode, else who
    /// the agent is and what it may route. `token` is the agent's service-account token,
    /// `certificate` its leaf certificate (DER).
    pub(crate) async fn verify(
        &self,
        claim: Claim<'_>,
        token: Option<&str>,
        certificate: Option<&[u8]>,
    ) -> Result<Option<Binding>, Refusal> {
        let (Some(api), mode) = (&self.api, self.mode) else {
            return Ok(None);
        };
        let client = api
            .client()
            .await
            .map_err(|e| Refusal::Unavailable(e.to_string()))?;
        let (node, pod) = match mode {
            IdentityMode::Declared => return Ok(None),
            IdentityMode::Token => {
                let pod = self.pod_of(client.clone(), token).await?;
                (pod.0, Some(pod.1))
            }
            IdentityMode::Certificate => (
                certificate
                    .and_then(node_of_certificate)
                    .ok_or(Refusal::NoNodeCertificate)?,
                None,
            ),
        };
        let nodes: kube::Api<Node> = kube::Api::all(client);
        let node = match nodes.get_opt(&node).await {
            Ok(Some(found)) => found,
            Ok(None) => return Err(Refusal::NodeNotFound(node)),
            Err(err) => return Err(Refusal::Unavailable(err.to_string())),
        };
        let backing = Backing::of(&node);
        backing.check(&claim)?;
        Ok(Some(Binding {
            identifiers: backing.identifiers(claim.identifiers.default_route),
            verified: Verified {
                node: backing.node,
                pod,
            },
        }))
    }

    /// The node of the pod `token` is bound to, and the pod.
    async fn pod_of(
        &self,
        client: kube::Client,
        token: Option<&str>,
    ) -> Result<(String, PodRef), Refusal> {
        let tokens = self.tokens.as_deref().ok_or(Refusal::NoToken)?;
        let token = token.ok_or(Refusal::NoToken)?;
        let reviewed = tokens.review(token).await.map_err(Refusal::Token)?;
        let claim = reviewed.pod.ok_or(Refusal::NotPodBound)?;
        let namespace = tokens.namespace();
        let pods: kube::Api<Pod> = kube::Api::namespaced(client, namespace);
        let pod = match pods.get_opt(&claim.name).await {
            Ok(Some(pod)) => pod,
            Ok(None) => {
                return Err(Refusal::Pod(format!(
                    "pod {namespace}/{} named by the token no longer exists",
                    claim.name
                )));
            }
            Err(err) => return Err(Refusal::Unavailable(err.to_string())),
        };
        let pod_ref = PodRef {
            namespace: namespace.to_owned(),
            name: claim.name,
            uid: claim.uid,
        };
        check_agent_pod(&pod, &pod_ref, &self.daemonset)
            .map(|node| (node, pod_ref))
            .map_err(Refusal::Pod)
    }
}

/// Checks that `pod` is the one the token was issued to, owned by `daemonset` and placed on a
/// node; returns that node.
fn check_agent_pod(pod: &Pod, claim: &PodRef, daemonset: &str) -> Result<String, String> {
    let name = format!("{}/{}", claim.namespace, claim.name);
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if uid != claim.uid {
        return Err(format!(
            "pod {name} was replaced: the token names uid {}, the pod is uid {uid}",
            claim.uid
        ));
    }
    let owned = pod.metadata.owner_references.iter().flatten().any(|owner| {
        owner.kind == "DaemonSet"
            && owner.api_version == "apps/v1"
            && owner.name == daemonset
            && owner.controller == Some(true)
    });
    if !owned {
        return Err(format!(
            "pod {name} is not an agent pod: it is not owned by DaemonSet {}/{daemonset}",
            claim.namespace
        ));
    }
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("pod {name} is not placed on a node"))
}

/// The node a per-node certificate names in its subject (`CN=system:node:<node>`).
pub(crate) fn node_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix(NODE_CN_PREFIX)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn claim() -> PodRef {
        PodRef {
            namespace: "cplink".into(),
            name: "agent-x1".into(),
            uid: "uid-1".into(),
        }
    }

    fn pod(uid: &str, owner: &str, node: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.uid = Some(uid.into());
        pod.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "DaemonSet".into(),
            name: owner.into(),
            uid: "ds-uid".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        pod.spec = Some(PodSpec {
            node_name: node.map(str::to_owned),
            ..PodSpec::default()
        });
        pod
    }

    #[test]
    fn an_agent_pod_yields_its_node() {
        let node = check_agent_pod(&pod("uid-1", "agents", Some("node-1")), &claim(), "agents");
        assert_eq!(node.unwrap(), "node-1");
    }

    #[test]
    fn a_replaced_foreign_or_unplaced_pod_is_refused_with_its_name() {
        for (pod, says) in [
            (pod("uid-2", "agents", Some("node-1")), "was replaced"),
            (
                pod("uid-1", "someone-else", Some("node-1")),
                "not owned by DaemonSet cplink/agents",
            ),
            (pod("uid-1", "agents", None), "not placed on a node"),
        ] {
            let err = check_agent_pod(&pod, &claim(), "agents").unwrap_err();
            assert!(
                err.contains(says) && err.contains("cplink/agent-x1"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_node_certificate_names_its_node_and_a_shared_one_none() {
        let cert = |cn: &str| {
            let mut params = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        assert_eq!(
            node_of_certificate(&cert("system:node:node-1")).as_deref(),
            Some("node-1")
        );
        assert_eq!(node_of_certificate(&cert("cplink-agent")), None);
        assert_eq!(node_of_certificate(&cert("system:node:")), None);
        assert_eq!(node_of_certificate(b"not a certificate"), None);
    }
}
