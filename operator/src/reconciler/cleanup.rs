//! What the operator removes itself: the cluster-scoped RBAC when a link is deleted (its
//! namespaced children go with their owner reference), and the in-cluster agents' objects when
//! a link moves its agents outside the cluster. An object already gone counts as removed.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::{Context, Error, key};
use crate::crd::ControlPlaneLink;
use crate::resources::{Names, Plan, PlanError};

/// Removes what ownerReferences cannot: the cluster-scoped RBAC.
#[tracing::instrument(skip_all)]
pub(super) async fn cleanup(link: &ControlPlaneLink, ctx: &Context) -> Result<Action, Error> {
    let ns = link
        .namespace()
        .ok_or(PlanError::MissingMetadata("namespace"))?;
    let names = Names::new(&link.name_any(), &ns);
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let cluster_roles: Api<ClusterRole> = Api::all(ctx.client.clone());
    // Both, whatever the link's mode: it may have changed since they were made.
    for name in [names.server_cluster_role(), names.agent_cluster_role()] {
        delete_ignoring_missing(&cluster_bindings, &name).await?;
        delete_ignoring_missing(&cluster_roles, &name).await?;
    }
    ctx.metrics.forget_link(&ns, &link.name_any());
    tracing::info!(link = %key(link), "cleaned up cluster-scoped objects");
    Ok(Action::await_change())
}

/// With agents outside the cluster: deletes the agent DaemonSet and everything granted to
/// in-cluster agents or to servers for checking them, which the link had if it used tokens
/// before. Servers no longer accept those agents, and nothing should keep rights it does not
/// use. Objects already gone are fine, so this runs on every pass.
pub(super) async fn remove_in_cluster_agents(client: &Client, plan: &Plan) -> Result<(), Error> {
    let names = plan.names();
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &plan.namespace);
    delete_ignoring_missing(&daemonsets, &names.agent()).await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &plan.namespace);
    let roles: Api<Role> = Api::namespaced(client.clone(), &plan.namespace);
    // Kept, with the Lease rights only, when the servers publish Leases.
    if !crate::resources::rbac::server_role_needed(plan) {
        delete_ignoring_missing(&bindings, &names.server()).await?;
        delete_ignoring_missing(&roles, &names.server()).await?;
    }
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    delete_ignoring_missing(&cluster_bindings, &names.agent_cluster_role()).await?;
    delete_ignoring_missing(&cluster_roles, &names.agent_cluster_role()).await?;
    delete_ignoring_missing(&bindings, &names.agent()).await?;
    delete_ignoring_missing(&roles, &names.agent()).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &plan.namespace);
    delete_ignoring_missing(&accounts, &names.agent()).await?;
    Ok(())
}

/// Deletes `name`; an object already gone counts as deleted.
async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(source) => Err(Error::Delete {
            kind: K::kind(&()).into_owned(),
            name: name.to_owned(),
            source,
        }),
    }
}
