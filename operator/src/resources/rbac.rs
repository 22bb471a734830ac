//! ServiceAccounts and the least privilege they need.
//!
//! Servers need no API access at all. Agents may read Nodes (their own node's pod CIDR) and
//! list/watch EndpointSlices in the link's namespace (server discovery). Nodes are
//! cluster-scoped, hence a ClusterRole; it cannot be owned by the namespaced link, so the
//! operator's finalizer deletes it.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};

use super::{Component, Plan};

/// The servers' ServiceAccount; no token is mounted since servers never call the API.
pub fn server_account(plan: &Plan) -> ServiceAccount {
    ServiceAccount {
        metadata: plan.meta(plan.names().server(), Component::Server),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// The agents' ServiceAccount.
pub fn agent_account(plan: &Plan) -> ServiceAccount {
    ServiceAccount {
        metadata: plan.meta(plan.names().agent(), Component::Agent),
        ..ServiceAccount::default()
    }
}

fn agent_subject(plan: &Plan) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: plan.names().agent(),
        namespace: Some(plan.namespace.clone()),
        ..Subject::default()
    }
}

fn rule(api_group: &str, resource: &str, verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![api_group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// Lets agents discover servers through the EndpointSlices of the link's namespace.
pub fn agent_role(plan: &Plan) -> Role {
    Role {
        metadata: plan.meta(plan.names().agent(), Component::Agent),
        rules: Some(vec![rule(
            "discovery.k8s.io",
            "endpointslices",
            &["list", "watch"],
        )]),
    }
}

/// Binds [`agent_role`] to the agents' ServiceAccount.
pub fn agent_role_binding(plan: &Plan) -> RoleBinding {
    RoleBinding {
        metadata: plan.meta(plan.names().agent(), Component::Agent),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: plan.names().agent(),
        },
        subjects: Some(vec![agent_subject(plan)]),
    }
}

/// Lets agents read Nodes (for their own node's pod CIDR).
pub fn agent_cluster_role(plan: &Plan) -> ClusterRole {
    ClusterRole {
        metadata: plan.cluster_meta(plan.names().agent_cluster_role(), Component::Agent),
        rules: Some(vec![rule("", "nodes", &["get"])]),
        ..ClusterRole::default()
    }
}

/// Binds [`agent_cluster_role`] to the agents' ServiceAccount.
pub fn agent_cluster_role_binding(plan: &Plan) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: plan.cluster_meta(plan.names().agent_cluster_role(), Component::Agent),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: plan.names().agent_cluster_role(),
        },
        subjects: Some(vec![agent_subject(plan)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ControlPlaneLink;

    #[test]
    fn servers_get_no_api_token() {
        let sa = server_account(&ControlPlaneLink::test().plan());
        assert_eq!(sa.metadata.name.as_deref(), Some("link-server"));
        assert_eq!(sa.metadata.namespace.as_deref(), Some("tunnels"));
        assert_eq!(sa.automount_service_account_token, Some(false));
    }

    #[test]
    fn agents_may_only_list_and_watch_endpointslices_in_their_namespace() {
        let plan = ControlPlaneLink::test().plan();
        assert_eq!(
            agent_account(&plan).metadata.name.as_deref(),
            Some("link-agent")
        );
        let role = agent_role(&plan);
        assert_eq!(role.metadata.namespace.as_deref(), Some("tunnels"));
        assert_eq!(
            serde_json::to_value(&role.rules).expect("json"),
            serde_json::json!([{
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"]
            }])
        );
        let binding = agent_role_binding(&plan);
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(binding.role_ref.name, "link-agent");
        let subject = &binding.subjects.expect("subjects")[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "link-agent", Some("tunnels"))
        );
    }

    #[test]
    fn agents_may_only_get_nodes_cluster_wide_and_those_objects_are_unowned() {
        let plan = ControlPlaneLink::test().plan();
        let role = agent_cluster_role(&plan);
        assert_eq!(
            role.metadata.name.as_deref(),
            Some("cplink:tunnels:link:agent")
        );
        assert_eq!(role.metadata.namespace, None);
        assert_eq!(role.metadata.owner_references, None);
        assert_eq!(
            role.metadata.labels.as_ref().expect("labels")["cplink.dev/link-namespace"],
            "tunnels"
        );
        assert_eq!(
            serde_json::to_value(&role.rules).expect("json"),
            serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}])
        );
        let binding = agent_cluster_role_binding(&plan);
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, "cplink:tunnels:link:agent");
        assert_eq!(binding.subjects.expect("subjects")[0].name, "link-agent");
        assert_eq!(binding.metadata.owner_references, None);
    }
}
