//! `apply`: one idempotent pass that makes the cluster match a link.
//!
//! Certificates first (a link without usable ones reports why and waits), then RBAC, Secrets,
//! Services and the workloads, each server-side applied whole; then the status and the Events
//! its changes deserve.

use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use time::OffsetDateTime;

use super::certificates::{CertOutcome, certificates};
use super::cleanup::remove_in_cluster_agents;
use super::{
    CA_RETRY_INTERVAL, Context, Error, FIELD_MANAGER, LINKS_RECHECK_INTERVAL, RESYNC_INTERVAL, key,
};
use crate::certs::CaStep;
use crate::crd::{ControlPlaneLink, ControlPlaneLinkStatus, FrontendStatus, ServerLinks};
use crate::linked;
use crate::resources::{
    Component, Plan, PlanError, daemonset, deployment, rbac, secrets, services,
};
use crate::status::{self, Agents, Certificates, EgressCertificate, Observed, Transition};
use crate::validate::validate;

/// Makes the cluster match the link: certificates, RBAC, Services, workloads, then status.
#[tracing::instrument(skip_all)]
pub(super) async fn apply(link: &ControlPlaneLink, ctx: &Context) -> Result<Action, Error> {
    let client = &ctx.client;
    let name = link.name_any();
    let ns = link
        .namespace()
        .ok_or(PlanError::MissingMetadata("namespace"))?;
    let links: Api<ControlPlaneLink> = Api::namespaced(client.clone(), &ns);
    let old = link.status.as_ref();
    let generation = link.metadata.generation;
    let (now, now_time) = now();

    let valid = match validate(&name, &link.spec) {
        Ok(valid) => valid,
        Err(invalid) => {
            tracing::warn!(link = %key(link), %invalid, "invalid spec");
            let status = status::invalid_status(old, &invalid, generation, &now_time);
            write_status(&links, &name, &status).await?;
            ctx.metrics.record_status(&ns, &name, &status);
            publish(ctx, link, status::transitions(old, &status, false)).await;
            // Only a spec change can fix this, and that triggers a reconcile by itself.
            return Ok(Action::await_change());
        }
    };
    let plan = Plan::new(link, valid, &ctx.default_image)?;
    let names = plan.names();

    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let issued = match certificates(&secrets_api, &plan, now).await? {
        CertOutcome::Ready(issued) => issued,
        CertOutcome::NotReady { reason, message } => {
            tracing::warn!(link = %key(link), reason, %message, "certificates not ready");
            let agents = if plan.agents_in_cluster() {
                Agents::DaemonSet(old.and_then(|s| s.agents.clone()))
            } else {
                Agents::OutsideCluster
            };
            let observed = Observed {
                generation,
                server: old.and_then(|s| s.server.clone()),
                agents,
                frontend: old.and_then(|s| s.frontend.clone()),
                certificates: Certificates::NotReady { reason, message },
            };
            let status = status::desired_status(old, &observed, &now_time);
            write_status(&links, &name, &status).await?;
            ctx.metrics.record_status(&ns, &name, &status);
            publish(ctx, link, status::transitions(old, &status, false)).await;
            return Ok(Action::requeue(CA_RETRY_INTERVAL));
        }
    };

    apply_accounts(client, &plan).await?;

    if let Some(ca) = &issued.ca {
        apply_object(&secrets_api, ca).await?;
    }
    apply_object(&secrets_api, &issued.server).await?;
    apply_object(&secrets_api, &issued.agent).await?;
    apply_object(&secrets_api, &issued.egress).await?;

    let services_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    apply_object(&services_api, &services::frontend_service(&plan)).await?;
    apply_object(&services_api, &services::agent_service(&plan)).await?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = apply_object(
        &deployments,
        &deployment::server_deployment(&plan, &secrets::checksum(&issued.server)),
    )
    .await?;
    let agents = if plan.agents_in_cluster() {
        let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
        let daemonset = apply_object(
            &daemonsets,
            &daemonset::agent_daemonset(&plan, &secrets::checksum(&issued.agent)),
        )
        .await?;
        Agents::DaemonSet(Some(status::agents_status(&daemonset)))
    } else {
        remove_in_cluster_agents(client, &plan).await?;
        Agents::OutsideCluster
    };

    let mut server = status::server_status(&deployment);
    server.linked_agents = server_links(ctx, &plan).await;
    let links_settled = status::links_settled(&server, &agents);
    let observed = Observed {
        generation,
        server: Some(server),
        agents,
        frontend: Some(FrontendStatus {
            address: plan.apiserver_endpoint(),
            egress_secret: names.egress_secret(),
        }),
        certificates: Certificates::Ready {
            not_after: to_time(issued.not_after),
            // In GRPC mode kube-apiserver dials the servers' Unix socket without a certificate.
            egress: plan.valid.grpc_socket.is_none().then(|| EgressCertificate {
                secret: names.egress_secret(),
                not_after: to_time(issued.egress_not_after),
                replaced: issued.egress_replaced.map(to_time),
            }),
        },
    };
    let status = status::desired_status(old, &observed, &now_time);
    write_status(&links, &name, &status).await?;
    ctx.metrics.record_status(&ns, &name, &status);
    let expiries: Vec<(&'static str, i64)> = issued
        .expiries
        .iter()
        .map(|(kind, not_after)| (*kind, not_after.unix_timestamp()))
        .collect();
    ctx.metrics.record_certificates(&ns, &name, &expiries);
    let mut events = status::transitions(old, &status, issued.renewed);
    match issued.ca_step {
        Some(CaStep::Generated) => events.push(Transition::warning(
            "CAReplaced",
            "the stored CA could not sign (garbled, expired or its key lost): \
             generated a new one; peers of the old and the new CA refuse each other until every \
             pod has rolled and kube-apiserver has restarted with the egress Secret's files"
                .to_owned(),
        )),
        Some(step) => events.push(Transition::normal("CARotation", step.describe().to_owned())),
        None => {}
    }
    publish(ctx, link, events).await;

    // The egress warning ends when the replaced certificate expires: look again then.
    let replaced_expiry = status
        .certificates
        .as_ref()
        .and_then(|c| c.egress.as_ref())
        .and_then(|e| e.replaced_not_after.as_ref())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.0.as_second()).ok())
        .filter(|expiry| *expiry > now);
    let next = next_check(
        replaced_expiry.map_or(issued.renew_at, |expiry| issued.renew_at.min(expiry)),
        now,
    );
    Ok(Action::requeue(if links_settled {
        next
    } else {
        next.min(LINKS_RECHECK_INTERVAL)
    }))
}

/// Applies the ServiceAccounts and RBAC of the servers and, when the operator runs them, of the
/// agents.
async fn apply_accounts(client: &Client, plan: &Plan) -> Result<(), Error> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &plan.namespace);
    let roles: Api<Role> = Api::namespaced(client.clone(), &plan.namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &plan.namespace);
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    apply_object(&accounts, &rbac::server_account(plan)).await?;
    apply_object(&cluster_roles, &rbac::server_cluster_role(plan)).await?;
    apply_object(&cluster_bindings, &rbac::server_cluster_role_binding(plan)).await?;
    if rbac::server_role_needed(plan) {
        apply_object(&roles, &rbac::server_role(plan)).await?;
        apply_object(&bindings, &rbac::server_role_binding(plan)).await?;
    }
    if plan.agents_in_cluster() {
        apply_object(&accounts, &rbac::agent_account(plan)).await?;
        apply_object(&roles, &rbac::agent_role(plan)).await?;
        apply_object(&bindings, &rbac::agent_role_binding(plan)).await?;
        apply_object(&cluster_roles, &rbac::agent_cluster_role(plan)).await?;
        apply_object(&cluster_bindings, &rbac::agent_cluster_role_binding(plan)).await?;
    }
    Ok(())
}

/// Agents linked to each running server pod. Advisory: when the pods cannot be listed the
/// status lists none, and the reconcile goes on.
async fn server_links(ctx: &Context, plan: &Plan) -> Vec<ServerLinks> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let selector: Vec<String> = plan
        .selector(Component::Server)
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    match pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
    {
        Ok(list) => {
            linked::linked_agents(&list.items, ctx.server_admin_port, linked::SCRAPE_TIMEOUT).await
        }
        Err(error) => {
            tracing::warn!(
                namespace = %plan.namespace,
                %error,
                "cannot list server pods; their linked agents go unreported"
            );
            Vec::new()
        }
    }
}

async fn write_status(
    api: &Api<ControlPlaneLink>,
    name: &str,
    status: &ControlPlaneLinkStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": ControlPlaneLink::api_version(&()),
        "kind": ControlPlaneLink::kind(&()),
        "status": status,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&patch))
        .await
        .map_err(Error::Status)?;
    Ok(())
}

/// Publishes Events; a failure is logged, never fatal: Events are advisory.
async fn publish(ctx: &Context, link: &ControlPlaneLink, transitions: Vec<Transition>) {
    let reference = link.object_ref(&());
    for t in transitions {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.to_owned(),
            note: Some(t.note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(link = %key(link), %error, reason = t.reason, "publishing event failed");
        }
    }
}

/// When to look at the link again: the resync interval, or sooner when a renewal is due.
pub fn next_check(renew_at: OffsetDateTime, now: OffsetDateTime) -> Duration {
    let until_renewal = Duration::try_from(renew_at - now).unwrap_or(Duration::ZERO);
    // Never spin: at least a second between passes even when renewal is overdue.
    until_renewal.clamp(Duration::from_secs(1), RESYNC_INTERVAL)
}

fn now() -> (OffsetDateTime, Time) {
    let now = OffsetDateTime::now_utc();
    let ts = Timestamp::from_second(now.unix_timestamp()).unwrap_or(Timestamp::UNIX_EPOCH);
    (now, Time(ts))
}

fn to_time(t: OffsetDateTime) -> Time {
    Time(Timestamp::from_second(t.unix_timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Server-side applies `obj` and returns the object as stored.
async fn apply_object<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(|source| Error::Apply {
            kind: K::kind(&()).into_owned(),
            name,
            source,
        })
}
