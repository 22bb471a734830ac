//! ServiceAccounts and the least privilege they need.
//!
//! Servers check which node each agent speaks for. With `agent.authentication: token` they
//! review the token an agent sends (TokenReview), read the Pod it is bound to, check that the
//! link's agent DaemonSet owns that Pod, and read the Pod's Node; with `certificate` they read
//! the Node named in the agent's certificate. Either way only identifiers the Node backs are
//! accepted. Agents (token mode only) may read Nodes (their own node's pod CIDR) and list/watch
//! EndpointSlices in the link's namespace (server discovery).
//!
//! Nodes and TokenReviews are cluster-scoped, hence ClusterRoles; those cannot be owned by the
//! namespaced link, so the operator's finalizer deletes them. Everything namespaced lives in
//! the link's namespace, where the agent DaemonSet and its pods are.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};

use super::{Component, Plan};

/// The servers' ServiceAccount. Servers call the API (as this account, with the token their
/// pods mount) to check agents' node identities.
pub fn server_account(plan: &Plan) -> ServiceAccount {
    ServiceAccount {
        metadata: plan.meta(plan.names().server(), Component::Server),
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

fn account_subject(plan: &Plan, name: String) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name,
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

fn role_ref(kind: &str, name: String) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".to_owned(),
        kind: kind.to_owned(),
        name,
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
        role_ref: role_ref("Role", plan.names().agent()),
        subjects: Some(vec![account_subject(plan, plan.names().agent())]),
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
        role_ref: role_ref("ClusterRole", plan.names().agent_cluster_role()),
        subjects: Some(vec![account_subject(plan, plan.names().agent())]),
    }
}

/// Lets servers read Nodes (the identifiers each agent may claim) and, in token mode, review
/// agents' tokens.
pub fn server_cluster_role(plan: &Plan) -> ClusterRole {
    let mut rules = Vec::new();
    if plan.agents_in_cluster() {
        rules.push(rule("authentication.k8s.io", "tokenreviews", &["create"]));
    }
    rules.push(rule("", "nodes", &["get", "list", "watch"]));
    ClusterRole {
        metadata: plan.cluster_meta(plan.names().server_cluster_role(), Component::Server),
        rules: Some(rules),
        ..ClusterRole::default()
    }
}

/// Binds [`server_cluster_role`] to the servers' ServiceAccount.
pub fn server_cluster_role_binding(plan: &Plan) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: plan.cluster_meta(plan.names().server_cluster_role(), Component::Server),
        role_ref: role_ref("ClusterRole", plan.names().server_cluster_role()),
        subjects: Some(vec![account_subject(plan, plan.names().server())]),
    }
}

/// Whether the servers need a Role in the link's namespace: to read agent pods (token mode),
/// or to publish their Leases (`server.publishLeases`).
pub fn server_role_needed(plan: &Plan) -> bool {
    plan.agents_in_cluster() || plan.spec.server.publish_leases
}

/// Lets servers, in the link's namespace, read the agent pods tokens are bound to (token mode;
/// the pod's owner reference names the DaemonSet, which itself is never read) and write the
/// Leases upstream agents count them by (`server.publishLeases`).
pub fn server_role(plan: &Plan) -> Role {
    let mut rules = Vec::new();
    if plan.agents_in_cluster() {
        rules.push(rule("", "pods", &["get", "list", "watch"]));
    }
    if plan.spec.server.publish_leases {
        rules.push(rule(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "patch", "delete"],
        ));
    }
    Role {
        metadata: plan.meta(plan.names().server(), Component::Server),
        rules: Some(rules),
    }
}

/// Binds [`server_role`] to the servers' ServiceAccount.
pub fn server_role_binding(plan: &Plan) -> RoleBinding {
    RoleBinding {
        metadata: plan.meta(plan.names().server(), Component::Server),
        role_ref: role_ref("Role", plan.names().server()),
        subjects: Some(vec![account_subject(plan, plan.names().server())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ControlPlaneLink;

    #[test]
    fn the_server_account_lives_with_the_link_and_leaves_token_mounting_to_the_pod() {
        let sa = server_account(&ControlPlaneLink::test().plan());
        assert_eq!(sa.metadata.name.as_deref(), Some("link-server"));
        assert_eq!(sa.metadata.namespace.as_deref(), Some("tunnels"));
        assert_eq!(sa.automount_service_account_token, None);
    }

    #[test]
    fn in_token_mode_servers_may_review_tokens_and_read_nodes_cluster_wide() {
        let plan = ControlPlaneLink::test().plan();
        let role = server_cluster_role(&plan);
        assert_eq!(
            role.metadata.name.as_deref(),
            Some("cplink:tunnels:link:server")
        );
        assert_eq!(role.metadata.namespace, None);
        assert_eq!(role.metadata.owner_references, None);
        let labels = role.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["cplink.dev/link-namespace"], "tunnels");
        assert_eq!(labels["app.kubernetes.io/component"], "server");
        assert_eq!(
            serde_json::to_value(&role.rules).expect("json"),
            serde_json::json!([
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}
            ])
        );
        let binding = server_cluster_role_binding(&plan);
        assert_eq!(
            binding.metadata.name.as_deref(),
            Some("cplink:tunnels:link:server")
        );
        assert_eq!(binding.metadata.owner_references, None);
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, "cplink:tunnels:link:server");
        let subject = &binding.subjects.expect("subjects")[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "link-server", Some("tunnels"))
        );
    }

    #[test]
    fn in_token_mode_servers_may_read_pods_and_only_the_agent_daemonset_of_their_link() {
        let plan = ControlPlaneLink::test().plan();
        let role = server_role(&plan);
        assert_eq!(role.metadata.name.as_deref(), Some("link-server"));
        assert_eq!(role.metadata.namespace.as_deref(), Some("tunnels"));
        assert_eq!(
            role.metadata.owner_references.as_ref().expect("owned")[0].kind,
            "ControlPlaneLink"
        );
        assert_eq!(
            serde_json::to_value(&role.rules).expect("json"),
            serde_json::json!([
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ])
        );
        let binding = server_role_binding(&plan);
        assert_eq!(binding.metadata.namespace.as_deref(), Some("tunnels"));
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(binding.role_ref.name, "link-server");
        let subject = &binding.subjects.expect("subjects")[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("link-server", Some("tunnels"))
        );
    }

    #[test]
    fn in_certificate_mode_servers_may_only_read_nodes() {
        let plan = ControlPlaneLink::test()
            .with_agents_outside_the_cluster()
            .plan();
        assert_eq!(
            serde_json::to_value(&server_cluster_role(&plan).rules).expect("json"),
            serde_json::json!([
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}
            ])
        );
    }

    /// `server.publishLeases` adds the rights on Leases, in the link's namespace only, to the
    /// servers' Role, which then exists in certificate mode too.
    #[test]
    fn servers_publishing_leases_may_write_leases_in_the_links_namespace() {
        let leases = serde_json::json!({
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "patch", "delete"],
        });
        let token = ControlPlaneLink::test()
            .with_spec(|s| s.server.publish_leases = true)
            .plan();
        let role = server_role(&token);
        assert_eq!(role.metadata.namespace.as_deref(), Some("tunnels"));
        let rules = serde_json::to_value(&role.rules).expect("json");
        assert_eq!(rules.as_array().map(Vec::len), Some(2), "{rules}");
        assert_eq!(rules[1], leases);

        let certificate = ControlPlaneLink::test()
            .with_agents_outside_the_cluster()
            .with_spec(|s| s.server.publish_leases = true)
            .plan();
        assert!(server_role_needed(&certificate));
        assert_eq!(
            serde_json::to_value(&server_role(&certificate).rules).expect("json"),
            serde_json::json!([leases])
        );
        let plain = ControlPlaneLink::test()
            .with_agents_outside_the_cluster()
            .plan();
        assert!(
            !server_role_needed(&plain),
            "nothing to grant, nothing kept"
        );
        assert!(
            !serde_json::to_string(&server_role(&ControlPlaneLink::test().plan()).rules)
                .expect("json")
                .contains("leases")
        );
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

    /// The rules of the operator's ClusterRole in the Helm chart. The template's Helm lines
    /// only name, label and guard it, so without them the rest is the plain object.
    fn chart_operator_rules() -> Vec<PolicyRule> {
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/cplink/templates/rbac.yaml"
        ))
        .expect("the chart's RBAC template");
        let plain: String = template
            .lines()
            .filter(|line| !line.contains("{{"))
            .map(|line| format!("{line}\n"))
            .collect();
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&plain).expect("the chart's RBAC documents");
        let first = documents.into_iter().next().expect("a first document");
        let role: ClusterRole = serde_json::from_value(first).expect("the operator's ClusterRole");
        role.rules.expect("rules")
    }

    /// Kubernetes lets the operator grant only what it holds itself (it has no `escalate` or
    /// `bind`), so every rule it hands servers and agents, in either mode, must be in the
    /// chart's ClusterRole; otherwise applying the Role fails with "attempting to grant RBAC
    /// permissions not currently held".
    #[test]
    fn the_charts_operator_role_holds_every_permission_the_operator_grants() {
        let held = chart_operator_rules();
        let holds = |group: &str, resource: &str, verb: &str| {
            held.iter().any(|r| {
                r.resource_names.is_none()
                    && r.api_groups.iter().flatten().any(|g| g == group)
                    && r.resources.iter().flatten().any(|x| x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            })
        };
        let token = ControlPlaneLink::test().plan();
        let certificate = ControlPlaneLink::test()
            .with_agents_outside_the_cluster()
            .plan();
        let leases = ControlPlaneLink::test()
            .with_spec(|s| s.server.publish_leases = true)
            .plan();
        let granted = [
            server_cluster_role(&token).rules,
            server_cluster_role(&certificate).rules,
            server_role(&token).rules,
            server_role(&leases).rules,
            agent_cluster_role(&token).rules,
            agent_role(&token).rules,
        ];
        let mut checked = 0;
        for rule in granted.into_iter().flatten().flatten() {
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        assert!(
                            holds(group, resource, verb),
                            "the chart's operator ClusterRole lacks {verb} on {resource} \
                             (group {group:?})"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 20, "every granted verb was checked");
    }
}
