//! What a Node object backs: the only identifiers a verified agent may route.

use std::net::IpAddr;

use cplink_proto::hello::Identifiers;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::{Claim, Refusal};

/// Address types of `status.addresses` that name the node's own IPs. `Hostname` and
/// `InternalDNS` entries are names, and the node's name is already the identity.
const ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// The identifiers a Node object backs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backing {
    /// The Node's name.
    pub(crate) node: String,
    /// Its InternalIP and ExternalIP addresses.
    pub(crate) addresses: Vec<IpAddr>,
    /// Its pod ranges (`spec.podCIDRs`, or `spec.podCIDR` on clusters without dual-stack).
    pub(crate) pod_cidrs: Vec<IpNet>,
}

impl Backing {
    /// Reads the Node. Values that do not parse back nothing.
    pub(crate) fn of(node: &Node) -> Self {
        let mut addresses = Vec::new();
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for address in listed.into_iter().flatten() {
            if ADDRESS_TYPES.contains(&address.type_.as_str())
                && let Ok(ip) = address.address.parse::<IpAddr>()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        }
        let spec = node.spec.as_ref();
        let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
        if cidrs.is_empty() {
            cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
        }
        let mut pod_cidrs = Vec::new();
        for cidr in cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()) {
            if !pod_cidrs.contains(&cidr) {
                pod_cidrs.push(cidr);
            }
        }
        Backing {
            node: node.metadata.name.clone().unwrap_or_default(),
            addresses,
            pod_cidrs,
        }
    }

    /// Checks that the Node backs everything `claim` says: the agent id (when it counts) and
    /// node name are the Node's name, each host IP one of its addresses, each pod range inside
    /// one of its pod ranges. The first claim that is not backed is the refusal.
    pub(crate) fn check(&self, claim: &Claim<'_>) -> Result<(), Refusal> {
        let node = &self.node;
        if let Some(agent_id) = claim.agent_id.filter(|id| id != node) {
            return Err(Refusal::AgentId {
                agent_id: agent_id.to_owned(),
                node: node.clone(),
            });
        }
        if let Some(announced) = claim.node_name.filter(|n| n != node) {
            return Err(Refusal::NodeName {
                announced: announced.to_owned(),
                node: node.clone(),
            });
        }
        if let Some(ip) = claim
            .identifiers
            .host_ips
            .iter()
            .find(|ip| !self.addresses.contains(ip))
        {
            return Err(Refusal::HostIp {
                ip: *ip,
                node: node.clone(),
                backed: self.addresses.clone(),
            });
        }
        if let Some(cidr) = claim
            .identifiers
            .pod_cidrs
            .iter()
            .find(|c| !self.pod_cidrs.iter().any(|own| own.contains(*c)))
        {
            return Err(Refusal::PodCidr {
                cidr: *cidr,
                node: node.clone(),
                backed: self.pod_cidrs.clone(),
            });
        }
        Ok(())
    }

    /// The identifiers the server routes to the agent: all the Node backs, so that a route
    /// follows the Node when its addresses or pod ranges change. Offering itself as a default
    /// route claims no identity and stays as the agent announced it.
    pub(crate) fn identifiers(&self, default_route: bool) -> Identifiers {
        Identifiers {
            host_ips: self.addresses.clone(),
            pod_cidrs: self.pod_cidrs.clone(),
            default_route,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

    use super::*;

    fn node(name: &str, addresses: &[(&str, &str)], cidrs: &[&str]) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some(name.to_owned());
        node.spec = Some(NodeSpec {
            pod_cidrs: Some(cidrs.iter().map(|c| (*c).to_owned()).collect()),
            ..NodeSpec::default()
        });
        node.status = Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: (*t).to_owned(),
                        address: (*a).to_owned(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        });
        node
    }

    /// A claim with an agent id, as native agents make them.
    fn hello(id: &str, node: Option<&str>, ips: &[&str], cidrs: &[&str]) -> Owned {
        Owned {
            agent_id: id.to_owned(),
            node_name: node.map(str::to_owned),
            identifiers: Identifiers {
                host_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                default_route: false,
            },
        }
    }

    struct Owned {
        agent_id: String,
        node_name: Option<String>,
        identifiers: Identifiers,
    }

    impl Owned {
        fn claim(&self) -> Claim<'_> {
            Claim {
                agent_id: Some(&self.agent_id),
                node_name: self.node_name.as_deref(),
                identifiers: &self.identifiers,
            }
        }
    }

    fn node_1() -> Backing {
        Backing::of(&node(
            "node-1",
            &[
                ("InternalIP", "198.18.0.11"),
                ("ExternalIP", "198.19.0.11"),
                ("Hostname", "node-1"),
                ("InternalIP", "not-an-ip"),
            ],
            &["198.18.64.0/24", "fd00:1::/64"],
        ))
    }

    #[test]
    fn a_node_backs_its_name_ips_and_pod_ranges() {
        let backing = node_1();
        assert_eq!(backing.node, "node-1");
        assert_eq!(
            backing.addresses,
            ["198.18.0.11", "198.19.0.11"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        let full = hello(
            "node-1",
            Some("node-1"),
            &["198.18.0.11"],
            &["198.18.64.0/25", "fd00:1::/64"],
        );
        backing.check(&full.claim()).unwrap();
        backing
            .check(&hello("node-1", None, &[], &[]).claim())
            .unwrap();
        // Upstream agents' ids are their own: only their identifiers count.
        let upstream = hello("3f1c-uuid", Some("node-1"), &["198.18.0.11"], &[]);
        let claim = Claim {
            agent_id: None,
            ..upstream.claim()
        };
        backing.check(&claim).unwrap();
    }

    #[test]
    fn each_claim_the_node_does_not_back_is_refused_by_name() {
        let backing = node_1();
        let cases = [
            (hello("node-2", None, &[], &[]), "agent_id", "node-2"),
            (
                hello("node-1", Some("node-2"), &[], &[]),
                "node_name",
                "node-2",
            ),
            (
                hello("node-1", None, &["198.18.0.12"], &[]),
                "host_ip",
                "198.18.0.12",
            ),
            (
                hello("node-1", None, &[], &["198.18.0.0/16"]),
                "pod_cidr",
                "198.18.0.0/16",
            ),
        ];
        for (claim, reason, named) in cases {
            let refusal = backing.check(&claim.claim()).unwrap_err();
            assert_eq!(refusal.reason(), reason, "{refusal}");
            let text = refusal.to_string();
            assert!(text.contains(named) && text.contains("node-1"), "{text}");
        }
    }

    #[test]
    fn the_old_single_pod_cidr_field_counts_when_the_list_is_empty() {
        let mut old = node("node-1", &[], &[]);
        if let Some(spec) = old.spec.as_mut() {
            spec.pod_cidrs = None;
            spec.pod_cidr = Some("198.18.64.0/24".into());
        }
        assert_eq!(
            Backing::of(&old).pod_cidrs,
            vec!["198.18.64.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn routes_are_what_the_node_backs_and_the_default_route_as_announced() {
        let ids = node_1().identifiers(true);
        assert_eq!(ids.host_ips.len(), 2);
        assert_eq!(ids.pod_cidrs.len(), 2);
        assert!(ids.default_route);
    }
}
