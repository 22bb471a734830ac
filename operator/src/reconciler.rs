//! The ControlPlaneLink controller: `reconcile` wraps a finalizer around `apply` and `cleanup`.
//!
//! `apply` is one idempotent pass that server-side applies every child (so a conflict or a
//! transient error mid-pass is repaired by the next pass), reusing stored certificates unless
//! they are missing, invalid or due for renewal, then writes the status and publishes Events
//! for changes of state. With agents outside the cluster (`agent.authentication: certificate`)
//! `apply` also deletes what it ran for in-cluster agents, should the link have had them
//! before. `cleanup` removes the cluster-scoped RBAC that ownerReferences cannot cover;
//! everything namespaced is garbage-collected through its owner reference.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use time::OffsetDateTime;

use crate::certs::{self, CertError, CertPair, Profile};
use crate::crd::{ControlPlaneLink, ControlPlaneLinkStatus, FrontendStatus, ServerLinks};
use crate::linked;
use crate::metrics::Metrics;
use crate::resources::deployment::SERVER_ADMIN_PORT;
use crate::resources::{
    Component, MANAGED_BY, Plan, PlanError, daemonset, deployment, rbac, secrets, services,
};
use crate::status::{self, Agents, Certificates, Observed, Transition};
use crate::validate::validate;

/// Finalizer that guards removal of the link's cluster-scoped objects.
pub const FINALIZER: &str = "cplink.dev/cleanup";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "cplink.dev/operator";
/// Name the operator publishes Events under.
pub const CONTROLLER_NAME: &str = "cplink-operator";

/// Re-check a healthy link this often (drift the watches missed, certificate expiry).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Re-check a link whose CA Secret is missing or unusable (that Secret is not watched).
pub const CA_RETRY_INTERVAL: Duration = Duration::from_secs(60);
/// Re-read the servers' linked agents this often until every server has every agent: links
/// come and go without any object changing.
pub const LINKS_RECHECK_INTERVAL: Duration = Duration::from_secs(15);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const ERROR_BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after failed reconciles.
pub const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);

/// [`SERVER_ADMIN_PORT`] as a port number, checked when compiling.
const SERVER_ADMIN_PORT_NUMBER: u16 = {
    assert!(SERVER_ADMIN_PORT > 0 && SERVER_ADMIN_PORT <= u16::MAX as i32);
    SERVER_ADMIN_PORT as u16
};

/// Why a reconcile failed. Every variant is retried with backoff by [`error_policy`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a child from the API failed.
    #[error("reading {kind} {name}: {source}")]
    Get {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Server-side applying a child failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a cluster-scoped child failed.
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the link's status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// The link lacks metadata every stored object has.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Generating or issuing a certificate failed.
    #[error("certificates: {0}")]
    Certificates(#[from] CertError),
    /// Rendering the egress selector configuration failed.
    #[error("rendering egress selector configuration: {0}")]
    Egress(#[from] serde_yaml::Error),
    /// Adding or removing the finalizer failed (or wraps a failure of apply/cleanup).
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// A fixed label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Get { .. } => "get",
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Status(_) => "status",
            Error::Plan(_) => "metadata",
            Error::Certificates(_) => "certificates",
            Error::Egress(_) => "egress",
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
        }
    }
}

/// Shared state of all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on links.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Image for servers and agents when the spec names none (the operator's own image).
    pub default_image: String,
    /// Port of the server pods' admin endpoint, where their linked agents are counted.
    server_admin_port: u16,
    /// Consecutive failures per link (`namespace/name`), for retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context publishing Events as [`CONTROLLER_NAME`].
    pub fn new(client: Client, metrics: Arc<Metrics>, default_image: String) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.to_owned(),
            instance: None,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            default_image,
            server_admin_port: SERVER_ADMIN_PORT_NUMBER,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the servers' linked agents on `port` instead of their admin port (tests serve
    /// metrics on a port of their own).
    pub fn with_server_admin_port(mut self, port: u16) -> Self {
        self.server_admin_port = port;
        self
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A panic while holding this lock cannot leave the counts inconsistent; keep going.
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn key(link: &ControlPlaneLink) -> String {
    format!(
        "{}/{}",
        link.namespace().unwrap_or_default(),
        link.name_any()
    )
}

/// Reconciles one link: adds the finalizer, then applies or cleans up.
pub async fn reconcile(link: Arc<ControlPlaneLink>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = link
        .namespace()
        .ok_or(PlanError::MissingMetadata("namespace"))?;
    let links: Api<ControlPlaneLink> = Api::namespaced(ctx.client.clone(), &ns);
    let link_key = key(&link);
    tracing::info!(link = %link_key, "reconciling");
    let action = finalizer(&links, FINALIZER, link, |event| async {
        match event {
            Finalizer::Apply(link) => apply(&link, &ctx).await,
            Finalizer::Cleanup(link) => cleanup(&link, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures().remove(&link_key);
    Ok(action)
}

/// Logs and counts a failed reconcile, and retries with exponential backoff.
pub fn error_policy(link: Arc<ControlPlaneLink>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = error.metric_label();
    ctx.metrics.reconcile_failed(label);
    let failures = {
        let mut failures = ctx.failures();
        let count = failures.entry(key(&link)).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let delay = backoff(failures);
    tracing::warn!(link = %key(&link), %error, kind = label, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Delay before retry number `failures` (1-based).
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    ERROR_BACKOFF_BASE
        .saturating_mul(1 << exponent)
        .min(ERROR_BACKOFF_MAX)
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

async fn get_secret(api: &Api<Secret>, name: &str) -> Result<Option<Secret>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Get {
        kind: "Secret".into(),
        name: name.to_owned(),
        source,
    })
}

/// Certificate Secrets ready to apply.
struct Issued {
    /// The generated CA's Secret; `None` with `spec.tls.caSecretRef`.
    ca: Option<Secret>,
    server: Secret,
    agent: Secret,
    egress: Secret,
    /// Earliest expiry among CA and leaves.
    not_after: OffsetDateTime,
    /// Earliest renewal among CA and leaves.
    renew_at: OffsetDateTime,
    /// Whether an existing certificate was replaced in this pass.
    renewed: bool,
}

enum CertOutcome {
    Ready(Box<Issued>),
    NotReady {
        reason: &'static str,
        message: String,
    },
}

/// Finds or makes the CA, then reuses or issues each leaf.
async fn certificates(
    api: &Api<Secret>,
    plan: &Plan,
    now: OffsetDateTime,
) -> Result<CertOutcome, Error> {
    let names = plan.names();
    let renew_before = plan.valid.renew_before;
    let mut renewed = false;

    let (ca, ca_info, ca_secret) = match &plan.spec.tls.ca_secret_ref {
        Some(reference) => {
            let field = "spec.tls.caSecretRef";
            let Some(secret) = get_secret(api, &reference.name).await? else {
                return Ok(CertOutcome::NotReady {
                    reason: "CASecretNotFound",
                    message: format!("{field}: Secret {:?} not found", reference.name),
                });
            };
            let Some(ca) = secrets::read_pair(&secret) else {
                return Ok(CertOutcome::NotReady {
                    reason: "CASecretInvalid",
                    message: format!(
                        "{field}: Secret {:?} needs tls.crt and tls.key",
                        reference.name
                    ),
                });
            };
            match certs::ca_is_reusable(&ca, renew_before, now) {
                Ok(info) => (ca, info, None),
                Err(problem) => {
                    return Ok(CertOutcome::NotReady {
                        reason: "CASecretInvalid",
                        message: format!("{field}: Secret {:?}: {problem}", reference.name),
                    });
                }
            }
        }
        None => {
            let stored = get_secret(api, &names.ca_secret()).await?;
            let reusable = stored.as_ref().and_then(secrets::read_pair).and_then(|ca| {
                certs::ca_is_reusable(&ca, renew_before, now)
                    .ok()
                    .map(|info| (ca, info))
            });
            let (ca, info) = match reusable {
                Some(found) => found,
                None => {
                    renewed |= stored.is_some();
                    let ca = certs::generate_ca(
                        &format!("cplink {}/{}", plan.namespace, plan.name),
                        plan.valid.validity,
                        now,
                    )?;
                    let info = certs::inspect(&ca.cert_pem)?;
                    (ca, info)
                }
            };
            let secret = secrets::ca_secret(plan, &ca);
            (ca, info, Some(secret))
        }
    };

    let (dns_names, ips) = plan.server_sans();
    let leaves = [
        (
            names.server_tls_secret(),
            Profile::Server {
                common_name: names.server(),
                dns_names,
                ips,
            },
        ),
        (
            names.agent_tls_secret(),
            Profile::Client {
                common_name: "cplink-agent".into(),
            },
        ),
        (
            names.egress_secret(),
            Profile::Client {
                common_name: "cplink-apiserver".into(),
            },
        ),
    ];
    let mut not_after = ca_info.not_after;
    let mut renew_at = ca_info.renew_at(renew_before);
    let mut pairs: Vec<CertPair> = Vec::with_capacity(leaves.len());
    for (secret_name, profile) in &leaves {
        let stored = get_secret(api, secret_name).await?;
        let stored_leaf = stored.as_ref().and_then(secrets::read_leaf);
        let (pair, info) =
            match certs::reusable_leaf(stored_leaf.as_ref(), &ca, profile, renew_before, now) {
                Some(info) => (stored_leaf.map(|l| l.pair), info),
                None => {
                    renewed |= stored.is_some();
                    let pair = certs::issue(&ca, profile, plan.valid.validity, now)?;
                    let info = certs::inspect(&pair.cert_pem)?;
                    (Some(pair), info)
                }
            };
        not_after = not_after.min(info.not_after);
        renew_at = renew_at.min(info.renew_at(renew_before));
        // `reusable_leaf` only succeeds for a parsed stored leaf, so the pair is always present.
        pairs.extend(pair);
    }
    let [server, agent, apiserver] = <[CertPair; 3]>::try_from(pairs)
        .map_err(|_| CertError::InvalidCertificate("stored leaf vanished".into()))?;
    Ok(CertOutcome::Ready(Box::new(Issued {
        server: secrets::server_tls_secret(plan, &server, &ca.cert_pem),
        agent: secrets::agent_tls_secret(plan, &agent, &ca.cert_pem),
        egress: secrets::egress_secret(plan, &apiserver, &ca.cert_pem)?,
        ca: ca_secret,
        not_after,
        renew_at,
        renewed,
    })))
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

/// Makes the cluster match the link: certificates, RBAC, Services, workloads, then status.
async fn apply(link: &ControlPlaneLink, ctx: &Context) -> Result<Action, Error> {
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
        },
    };
    let status = status::desired_status(old, &observed, &now_time);
    write_status(&links, &name, &status).await?;
    publish(ctx, link, status::transitions(old, &status, issued.renewed)).await;

    let next = next_check(issued.renew_at, now);
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
    if plan.agents_in_cluster() {
        apply_object(&roles, &rbac::server_role(plan)).await?;
        apply_object(&bindings, &rbac::server_role_binding(plan)).await?;
        apply_object(&accounts, &rbac::agent_account(plan)).await?;
        apply_object(&roles, &rbac::agent_role(plan)).await?;
        apply_object(&bindings, &rbac::agent_role_binding(plan)).await?;
        apply_object(&cluster_roles, &rbac::agent_cluster_role(plan)).await?;
        apply_object(&cluster_bindings, &rbac::agent_cluster_role_binding(plan)).await?;
    }
    Ok(())
}

/// With agents outside the cluster: deletes the agent DaemonSet and everything granted to
/// in-cluster agents or to servers for checking them, which the link had if it used tokens
/// before. Servers no longer accept those agents, and nothing should keep rights it does not
/// use. Objects already gone are fine, so this runs on every pass.
async fn remove_in_cluster_agents(client: &Client, plan: &Plan) -> Result<(), Error> {
    let names = plan.names();
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &plan.namespace);
    delete_ignoring_missing(&daemonsets, &names.agent()).await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &plan.namespace);
    let roles: Api<Role> = Api::namespaced(client.clone(), &plan.namespace);
    delete_ignoring_missing(&bindings, &names.server()).await?;
    delete_ignoring_missing(&roles, &names.server()).await?;
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

/// When to look at the link again: the resync interval, or sooner when a renewal is due.
pub fn next_check(renew_at: OffsetDateTime, now: OffsetDateTime) -> Duration {
    let until_renewal = Duration::try_from(renew_at - now).unwrap_or(Duration::ZERO);
    // Never spin: at least a second between passes even when renewal is overdue.
    until_renewal.clamp(Duration::from_secs(1), RESYNC_INTERVAL)
}

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

/// Removes what ownerReferences cannot: the cluster-scoped RBAC.
async fn cleanup(link: &ControlPlaneLink, ctx: &Context) -> Result<Action, Error> {
    let ns = link
        .namespace()
        .ok_or(PlanError::MissingMetadata("namespace"))?;
    let names = crate::resources::Names::new(&link.name_any(), &ns);
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let cluster_roles: Api<ClusterRole> = Api::all(ctx.client.clone());
    // Both, whatever the link's mode: it may have changed since they were made.
    for name in [names.server_cluster_role(), names.agent_cluster_role()] {
        delete_ignoring_missing(&cluster_bindings, &name).await?;
        delete_ignoring_missing(&cluster_roles, &name).await?;
    }
    tracing::info!(link = %key(link), "cleaned up cluster-scoped objects");
    Ok(Action::await_change())
}

/// Backoff of the controller's watches after an error.
///
/// kube-runtime pauses *all* of a controller's watches behind one backoff. After a
/// kube-apiserver restart every watch fails in turn (connection refused, then `410 Gone` while
/// the new watch cache fills), and its default (up to 30 s, reset after 2 minutes without
/// errors) compounds those into minutes of deafness. Short steps reconnect within seconds.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    /// The first pause.
    pub const MIN: Duration = Duration::from_millis(250);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(5);
    /// Quiet time after which the pauses start again from [`Self::MIN`].
    pub const RESET_AFTER: Duration = Duration::from_secs(30);

    /// The backoff the controller uses, restarting after [`Self::RESET_AFTER`] without errors.
    pub fn for_controller() -> ResetTimerBackoff<Self> {
        ResetTimerBackoff::new(Self { next: Self::MIN }, Self::RESET_AFTER)
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(pause)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// Runs the controller until `shutdown` completes, then lets running reconciles finish.
/// `ready` is set once the ControlPlaneLink watch has synced.
pub async fn run(
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let controller = Controller::new(
        Api::<ControlPlaneLink>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .owns(Api::<Deployment>::all(client.clone()), children.clone())
    .owns(Api::<DaemonSet>::all(client.clone()), children.clone())
    .owns(Api::<Service>::all(client.clone()), children.clone())
    .owns(Api::<Secret>::all(client.clone()), children.clone())
    .owns(Api::<ServiceAccount>::all(client.clone()), children)
    .trigger_backoff(WatchBackoff::for_controller())
    .graceful_shutdown_on(shutdown);

    let store = controller.store();
    tokio::spawn(async move {
        // kube-runtime's "store ready" signal wakes only the last task waiting on it, and the
        // controller waits on it too: look again every second instead of relying on a wake-up.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::Release);
                    tracing::info!("controller watches synced");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });

    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((link, _)) => tracing::debug!(%link, "reconciled"),
                // Reconcile errors are logged by `error_policy`.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::QueueError(error)) => {
                    tracing::warn!(error = %error, "watch failed; retrying");
                }
                Err(error) => tracing::debug!(%error, "controller event"),
            }
        })
        .await;
    tracing::info!("controller stopped");
}

#[cfg(test)]
mod tests;
