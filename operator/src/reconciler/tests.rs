//! The reconciler against a mocked apiserver (scenario style, as in kube-rs/controller-rs).
//!
//! A [`Scenario`] lists the calls one reconcile must make, in order; the verifier asserts
//! method, path, query (field manager, force) and body of each, and answers with a plausible
//! object. After the scenario the client is dropped and the verifier asserts that no further
//! request arrived, so "nothing else was written" is checked, not assumed.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use super::*;
use crate::certs::{self, CertPair, Profile};
use crate::crd::{AgentAuthentication, ControlPlaneLink, SecretRef};
use crate::metrics::Metrics;
use crate::resources::fixtures::DEFAULT_IMAGE;
use crate::resources::secrets;

/// The finalizer's part of a link's life, on top of the fixtures in `resources`.
impl ControlPlaneLink {
    /// With the cleanup finalizer already in place.
    fn finalized(mut self) -> Self {
        self.metadata.finalizers = Some(vec![FINALIZER.into()]);
        self
    }

    /// Marked for deletion.
    fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        self
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

const NS: &str = "tunnels";
const CORE: &str = "/api/v1/namespaces/tunnels";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";
const APPS: &str = "/apis/apps/v1/namespaces/tunnels";
const LINK_PATH: &str = "/apis/cplink.dev/v1alpha1/namespaces/tunnels/controlplanelinks/link";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/tunnels/events";

/// The Secrets a reconcile reads, in order.
const SECRETS: [&str; 4] = [
    "link-ca",
    "link-server-tls",
    "link-agent-tls",
    "link-apiserver-egress",
];

/// Every child a reconcile applies, in order: (path, kind). Agents in the cluster (token
/// mode, the default) add their RBAC, the servers' Role for reading agent pods, and the
/// DaemonSet.
fn children(agents_in_cluster: bool) -> Vec<(String, &'static str)> {
    let mut children = vec![
        (
            format!("{CORE}/serviceaccounts/link-server"),
            "ServiceAccount",
        ),
        (
            format!("{RBAC}/clusterroles/cplink:tunnels:link:server"),
            "ClusterRole",
        ),
        (
            format!("{RBAC}/clusterrolebindings/cplink:tunnels:link:server"),
            "ClusterRoleBinding",
        ),
    ];
    if agents_in_cluster {
        children.extend([
            (format!("{RBAC}/namespaces/{NS}/roles/link-server"), "Role"),
            (
                format!("{RBAC}/namespaces/{NS}/rolebindings/link-server"),
                "RoleBinding",
            ),
            (
                format!("{CORE}/serviceaccounts/link-agent"),
                "ServiceAccount",
            ),
            (format!("{RBAC}/namespaces/{NS}/roles/link-agent"), "Role"),
            (
                format!("{RBAC}/namespaces/{NS}/rolebindings/link-agent"),
                "RoleBinding",
            ),
            (
                format!("{RBAC}/clusterroles/cplink:tunnels:link:agent"),
                "ClusterRole",
            ),
            (
                format!("{RBAC}/clusterrolebindings/cplink:tunnels:link:agent"),
                "ClusterRoleBinding",
            ),
        ]);
    }
    children.extend([
        (format!("{CORE}/secrets/link-ca"), "Secret"),
        (format!("{CORE}/secrets/link-server-tls"), "Secret"),
        (format!("{CORE}/secrets/link-agent-tls"), "Secret"),
        (format!("{CORE}/secrets/link-apiserver-egress"), "Secret"),
        (format!("{CORE}/services/link-frontend"), "Service"),
        (format!("{CORE}/services/link-agent-endpoint"), "Service"),
        (format!("{APPS}/deployments/link-server"), "Deployment"),
    ]);
    if agents_in_cluster {
        children.push((format!("{APPS}/daemonsets/link-agent"), "DaemonSet"));
    }
    children
}

/// With agents outside the cluster: what token mode ran for in-cluster agents, deleted in this
/// order after the Deployment is applied.
fn removed_with_agents_outside_the_cluster() -> Vec<String> {
    vec![
        format!("{APPS}/daemonsets/link-agent"),
        format!("{RBAC}/namespaces/{NS}/rolebindings/link-server"),
        format!("{RBAC}/namespaces/{NS}/roles/link-server"),
        format!("{RBAC}/clusterrolebindings/cplink:tunnels:link:agent"),
        format!("{RBAC}/clusterroles/cplink:tunnels:link:agent"),
        format!("{RBAC}/namespaces/{NS}/rolebindings/link-agent"),
        format!("{RBAC}/namespaces/{NS}/roles/link-agent"),
        format!("{CORE}/serviceaccounts/link-agent"),
    ]
}

/// What the apiserver saw during one reconcile.
#[derive(Debug, Clone, Default)]
struct Recorded {
    /// Bodies of the server-side applies of children, by path.
    applied: BTreeMap<String, Value>,
    /// Order of the applies.
    order: Vec<String>,
    /// Paths deleted, in order.
    deleted: Vec<String>,
    /// The `status` of the status apply.
    status: Value,
    /// Reasons of the published Events.
    events: Vec<String>,
}

impl Recorded {
    /// The link as the next reconcile sees it: with the status this one wrote.
    fn link_after(&self, link: ControlPlaneLink) -> ControlPlaneLink {
        let mut link = link;
        link.status = Some(serde_json::from_value(self.status.clone()).expect("status parses"));
        link
    }

    fn secret(&self, name: &str) -> Option<Value> {
        self.applied.get(&format!("{CORE}/secrets/{name}")).cloned()
    }
}

/// The calls one reconcile is expected to make.
enum Scenario {
    /// No finalizer yet: a JSON patch adding it, nothing else.
    FinalizerCreation,
    /// Reads the Secrets (`stored` answers them; missing ones are 404), applies every child,
    /// with agents outside the cluster deletes what in-cluster agents had (those `stored`
    /// applied exist, others are 404), lists the server pods (answered with `server_pods`, or refused with 403 for `None`),
    /// writes status, publishes Events with these reasons.
    Apply {
        stored: Recorded,
        server_pods: Option<Vec<Value>>,
        events: Vec<&'static str>,
    },
    /// Writes a `Ready=False`/`InvalidSpec` status naming `field`, publishes one Warning.
    InvalidSpec { field: &'static str },
    /// `spec.tls.caSecretRef` names a Secret that does not exist.
    MissingCaSecret { name: &'static str },
    /// The first read fails with a 500.
    ServerError,
    /// The link is being deleted: the servers' and agents' cluster RBAC removed (each binding
    /// already gone), finalizer removed.
    Cleanup,
}

struct ApiServerVerifier(Handle);

impl ApiServerVerifier {
    fn run(self, link: ControlPlaneLink, scenario: Scenario) -> JoinHandle<Recorded> {
        tokio::spawn(async move {
            let mut verifier = self;
            let mut recorded = Recorded::default();
            match scenario {
                Scenario::FinalizerCreation => verifier.finalizer_added(&link).await,
                Scenario::Apply {
                    stored,
                    server_pods,
                    events,
                } => {
                    for name in SECRETS {
                        verifier.get_secret(name, stored.secret(name)).await;
                    }
                    let in_cluster = link.spec.agent.authentication == AgentAuthentication::Token;
                    for (path, kind) in children(in_cluster) {
                        let body = verifier.apply(&path, kind).await;
                        recorded.order.push(path.clone());
                        recorded.applied.insert(path, body);
                    }
                    if !in_cluster {
                        for path in removed_with_agents_outside_the_cluster() {
                            let answer = if stored.applied.contains_key(&path) {
                                StatusCode::OK
                            } else {
                                StatusCode::NOT_FOUND
                            };
                            verifier.delete(&path, answer).await;
                            recorded.deleted.push(path);
                        }
                    }
                    verifier.list_server_pods(server_pods).await;
                    recorded.status = verifier.status(&link).await;
                    for reason in events {
                        recorded.events.push(verifier.event(reason).await);
                    }
                }
                Scenario::InvalidSpec { field } => {
                    recorded.status = verifier.status(&link).await;
                    let ready = &recorded.status["conditions"][0];
                    assert_eq!(ready["type"], "Ready");
                    assert_eq!(ready["status"], "False");
                    assert_eq!(ready["reason"], "InvalidSpec");
                    let message = ready["message"].as_str().expect("message");
                    assert!(message.starts_with(&format!("{field}: ")), "{message}");
                    recorded.events.push(verifier.event("InvalidSpec").await);
                }
                Scenario::MissingCaSecret { name } => {
                    verifier.get_secret(name, None).await;
                    recorded.status = verifier.status(&link).await;
                    recorded.events.push(verifier.event("Created").await);
                }
                Scenario::ServerError => {
                    let (request, send) = verifier.next().await;
                    assert_eq!(request.method(), Method::GET);
                    send.send_response(status_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                    ));
                }
                Scenario::Cleanup => {
                    for name in ["cplink:tunnels:link:server", "cplink:tunnels:link:agent"] {
                        let binding = format!("{RBAC}/clusterrolebindings/{name}");
                        verifier.delete(&binding, StatusCode::NOT_FOUND).await;
                        recorded.deleted.push(binding);
                        let role = format!("{RBAC}/clusterroles/{name}");
                        verifier.delete(&role, StatusCode::OK).await;
                        recorded.deleted.push(role);
                    }
                    verifier.finalizer_removed(&link).await;
                }
            }
            verifier.no_more_requests().await;
            recorded
        })
    }

    async fn next(&mut self) -> (Request<Body>, Responder) {
        self.0
            .next_request()
            .await
            .expect("the reconciler made the expected call")
    }

    async fn no_more_requests(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    async fn get_secret(&mut self, name: &str, stored: Option<Value>) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), format!("{CORE}/secrets/{name}"));
        send.send_response(match stored {
            Some(secret) => json_response(&secret),
            None => status_response(StatusCode::NOT_FOUND, "NotFound"),
        });
    }

    /// Expects a forced server-side apply by our field manager; answers with the object.
    async fn apply(&mut self, path: &str, kind: &str) -> Value {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::PATCH, "{path}");
        assert_eq!(request.uri().path(), path);
        assert_ssa_query(&request);
        assert_eq!(
            request.headers()[http::header::CONTENT_TYPE],
            "application/apply-patch+yaml"
        );
        let body = body_json(request).await;
        assert_eq!(body["kind"], kind, "{path}");
        let name = path.rsplit('/').next().expect("name");
        assert_eq!(body["metadata"]["name"], name);
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/instance"],
            "link"
        );
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "cplink-operator"
        );
        if kind.starts_with("Cluster") {
            assert_eq!(body["metadata"].get("ownerReferences"), None, "{path}");
        } else {
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "ControlPlaneLink", "{path}");
            assert_eq!(owner["uid"], "6f1c3b1e-0000-4000-8000-000000000001");
            assert_eq!(owner["controller"], true);
        }
        let mut stored = body.clone();
        stored["metadata"]["uid"] = json!(format!("uid-{name}"));
        send.send_response(json_response(&stored));
        body
    }

    /// Expects the server pods to be listed by their labels; answers with `pods`, or 403.
    async fn list_server_pods(&mut self, pods: Option<Vec<Value>>) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), format!("{CORE}/pods"));
        let query = request.uri().query().unwrap_or_default();
        assert!(
            query.contains(
                "labelSelector=app.kubernetes.io%2Fcomponent%3Dserver%2C\
                 app.kubernetes.io%2Finstance%3Dlink%2Capp.kubernetes.io%2Fname%3Dcplink"
            ),
            "{query}"
        );
        send.send_response(match pods {
            Some(items) => json_response(&json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items
            })),
            None => status_response(StatusCode::FORBIDDEN, "Forbidden"),
        });
    }

    /// Expects a server-side apply of the link's status; answers with the updated link.
    async fn status(&mut self, link: &ControlPlaneLink) -> Value {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().path(), format!("{LINK_PATH}/status"));
        assert_ssa_query(&request);
        let body = body_json(request).await;
        assert_eq!(body["apiVersion"], "cplink.dev/v1alpha1");
        assert_eq!(body["kind"], "ControlPlaneLink");
        assert_eq!(
            body.get("spec"),
            None,
            "a status apply must not claim the spec"
        );
        let mut updated = serde_json::to_value(link).expect("link serializes");
        updated["status"] = body["status"].clone();
        send.send_response(json_response(&updated));
        body["status"].clone()
    }

    /// Expects an Event with `reason` about the link; returns the reason.
    async fn event(&mut self, reason: &str) -> String {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), EVENTS_PATH);
        let body = body_json(request).await;
        assert_eq!(body["reason"], reason);
        assert_eq!(body["regarding"]["kind"], "ControlPlaneLink");
        assert_eq!(body["regarding"]["name"], "link");
        assert_eq!(body["reportingController"], "cplink-operator");
        send.send_response(json_response(&body));
        reason.to_owned()
    }

    async fn delete(&mut self, path: &str, answer: StatusCode) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::DELETE);
        assert_eq!(request.uri().path(), path);
        send.send_response(if answer == StatusCode::OK {
            json_response(&json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
        } else {
            status_response(answer, "NotFound")
        });
    }

    async fn finalizer_added(&mut self, link: &ControlPlaneLink) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().path(), LINK_PATH);
        let body = body_json(request).await;
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["cplink.dev/cleanup"]}
            ])
        );
        send.send_response(json_response(&link.clone().finalized()));
    }

    async fn finalizer_removed(&mut self, link: &ControlPlaneLink) {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().path(), LINK_PATH);
        let body = body_json(request).await;
        assert_eq!(
            body[1],
            json!({"op": "remove", "path": "/metadata/finalizers/0"})
        );
        let mut unfinalized = link.clone();
        unfinalized.metadata.finalizers = None;
        send.send_response(json_response(&unfinalized));
    }
}

fn assert_ssa_query(request: &Request<Body>) {
    let query = request.uri().query().unwrap_or_default();
    let params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    assert!(
        params.contains(&"fieldManager=cplink.dev%2Foperator"),
        "{query}"
    );
    assert!(params.contains(&"force=true"), "{query}");
}

async fn body_json(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

fn json_response(value: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("serializes")))
        .expect("response")
}

fn status_response(code: StatusCode, reason: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code.as_u16()
    });
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&status).expect("serializes")))
        .expect("response")
}

fn test_context() -> (Arc<Context>, ApiServerVerifier) {
    let (ctx, verifier) = context_reading_servers_on(SERVER_ADMIN_PORT_NUMBER);
    (Arc::new(ctx), verifier)
}

/// A context whose client talks to the verifier and which reads the server pods' metrics on
/// `admin_port`.
fn context_reading_servers_on(admin_port: u16) -> (Context, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(
        client,
        Arc::new(Metrics::default()),
        DEFAULT_IMAGE.to_owned(),
    )
    .with_server_admin_port(admin_port);
    (ctx, ApiServerVerifier(handle))
}

/// Runs one reconcile of `link` against `scenario`; returns its result and what was seen.
async fn reconcile_with(
    link: ControlPlaneLink,
    scenario: Scenario,
) -> (Result<Action, Error>, Recorded) {
    let (ctx, verifier) = test_context();
    reconcile_in(ctx, verifier, link, scenario).await
}

/// [`reconcile_with`] in a context of the test's making.
async fn reconcile_in(
    ctx: Arc<Context>,
    verifier: ApiServerVerifier,
    link: ControlPlaneLink,
    scenario: Scenario,
) -> (Result<Action, Error>, Recorded) {
    let server = verifier.run(link.clone(), scenario);
    let result = reconcile(Arc::new(link), ctx).await;
    // The context (and with it the client) is gone now: the verifier sees the end of calls.
    let recorded = server.await.expect("scenario completed");
    (result, recorded)
}

async fn first_apply(link: ControlPlaneLink) -> Recorded {
    let (result, recorded) = reconcile_with(
        link,
        Scenario::Apply {
            stored: Recorded::default(),
            server_pods: Some(vec![]),
            events: vec!["Created"],
        },
    )
    .await;
    result.expect("first reconcile succeeds");
    recorded
}

fn decoded(secret: &Value, key: &str) -> String {
    let encoded = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} present"));
    let bytes: k8s_openapi::ByteString = serde_json::from_value(json!(encoded)).expect("base64");
    String::from_utf8(bytes.0).expect("utf-8")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("{type_} condition"))
}

#[tokio::test]
async fn a_link_without_the_finalizer_gets_it_and_nothing_else() {
    let (result, _) = reconcile_with(ControlPlaneLink::test(), Scenario::FinalizerCreation).await;
    assert_eq!(result.expect("reconcile succeeds"), Action::await_change());
}

#[tokio::test]
async fn the_first_reconcile_creates_every_child_and_writes_status() {
    let recorded = first_apply(ControlPlaneLink::test().finalized()).await;

    let expected: Vec<String> = children(true).into_iter().map(|(path, _)| path).collect();
    assert_eq!(recorded.order, expected);
    assert_eq!(recorded.events, ["Created"]);

    let deployment = &recorded.applied[&format!("{APPS}/deployments/link-server")];
    assert_eq!(deployment["spec"]["replicas"], 2);
    let server_secret = recorded.secret("link-server-tls").expect("server secret");
    let checksum =
        secrets::checksum(&serde_json::from_value(server_secret.clone()).expect("secret parses"));
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["cplink.dev/tls-checksum"],
        checksum.as_str()
    );

    let ca = decoded(&recorded.secret("link-ca").expect("ca"), "tls.crt");
    for name in ["link-server-tls", "link-agent-tls", "link-apiserver-egress"] {
        let secret = recorded.secret(name).expect(name);
        assert_eq!(decoded(&secret, "ca.crt"), ca, "{name} carries the link CA");
        assert!(
            decoded(&secret, "tls.key").contains("PRIVATE KEY"),
            "{name}"
        );
    }
    let server_cert = certs::inspect(&decoded(&server_secret, "tls.crt")).expect("parses");
    assert!(server_cert.dns_names.contains("link-frontend.tunnels.svc"));
    assert!(
        server_cert
            .dns_names
            .contains("link-agent-endpoint.tunnels.svc.cluster.local")
    );
    let egress = recorded.secret("link-apiserver-egress").expect("egress");
    assert!(
        decoded(&egress, "egress-selector-configuration.yaml")
            .contains("url: https://link-frontend.tunnels.svc:8090")
    );

    let status = &recorded.status;
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        status["server"],
        json!({"replicas": 2, "readyReplicas": 0, "summary": "0/2"})
    );
    assert_eq!(
        status["agents"],
        json!({"desired": 0, "ready": 0, "summary": "0/0"})
    );
    assert_eq!(
        status["frontend"],
        json!({"address": "link-frontend.tunnels.svc:8090", "egressSecret": "link-apiserver-egress"})
    );
    assert!(status["certificates"]["notAfter"].is_string());
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Ready")["reason"], "Progressing");
    assert_eq!(condition(status, "CertificatesReady")["status"], "True");
    assert_eq!(condition(status, "ServerAvailable")["status"], "False");
    assert_eq!(condition(status, "AgentsAvailable")["status"], "False");
}

#[tokio::test]
async fn a_second_reconcile_with_nothing_changed_reapplies_identical_bodies_and_publishes_nothing()
{
    // The contract: every pass server-side applies every child (so drift is repaired), and with
    // nothing changed each body is byte-for-byte what the first pass sent, which the apiserver
    // treats as a no-op. Certificates come from the stored Secrets, so no pod rolls. The only
    // other write is the status apply; no Event is published.
    let link = ControlPlaneLink::test().finalized();
    let first = first_apply(link.clone()).await;
    let (result, second) = reconcile_with(
        first.link_after(link),
        Scenario::Apply {
            stored: first.clone(),
            server_pods: Some(vec![]),
            events: vec![],
        },
    )
    .await;
    let action = result.expect("second reconcile succeeds");
    assert_eq!(action, Action::requeue(RESYNC_INTERVAL));
    assert_eq!(second.order, first.order);
    for path in &first.order {
        assert_eq!(second.applied[path], first.applied[path], "{path} changed");
    }
    assert_eq!(second.status, first.status, "status is stable too");
    assert!(second.events.is_empty());
}

#[tokio::test]
async fn a_replica_change_updates_only_the_deployment() {
    let link = ControlPlaneLink::test().finalized();
    let first = first_apply(link.clone()).await;
    let scaled = first.link_after(link).with_replicas(3).with_generation(2);
    let (result, second) = reconcile_with(
        scaled,
        Scenario::Apply {
            stored: first.clone(),
            server_pods: Some(vec![]),
            events: vec!["Updated"],
        },
    )
    .await;
    result.expect("reconcile succeeds");

    let deployment_path = format!("{APPS}/deployments/link-server");
    let deployment = &second.applied[&deployment_path];
    assert_eq!(deployment["spec"]["replicas"], 3);
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "--server-count=3");
    for path in first.order.iter().filter(|p| **p != deployment_path) {
        assert_eq!(second.applied[path], first.applied[path], "{path} changed");
    }
    assert_eq!(second.status["observedGeneration"], 2);
    assert_eq!(second.status["server"]["replicas"], 3);
}

fn server_pod(name: &str, phase: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": NS},
        "status": {"phase": phase, "podIP": ip},
    })
}

#[tokio::test]
async fn the_status_counts_the_agents_linked_to_each_running_server() {
    let metrics = "# TYPE cplink_server_agents_linked gauge\ncplink_server_agents_linked 3\n";
    let admin = crate::linked::fixtures::admin_endpoint(200, metrics).await;
    let (ctx, verifier) = context_reading_servers_on(admin.port());
    // Only the metrics are kept: the verifier ends once the context's client is dropped.
    let metrics = ctx.metrics.clone();
    let link = ControlPlaneLink::test().finalized();
    let (result, recorded) = reconcile_in(
        Arc::new(ctx),
        verifier,
        link,
        Scenario::Apply {
            stored: Recorded::default(),
            // The admin endpoint listens on 127.0.0.1 only: the pod on 127.0.0.2 refuses.
            server_pods: Some(vec![
                server_pod("link-server-b", "Running", "127.0.0.2"),
                server_pod("link-server-a", "Running", "127.0.0.1"),
                server_pod("link-server-c", "Pending", ""),
            ]),
            events: vec!["Created"],
        },
    )
    .await;
    assert_eq!(
        recorded.status["server"]["linkedAgents"],
        json!([
            {"pod": "link-server-a", "agents": 3},
            {"pod": "link-server-b"},
        ])
    );
    assert_eq!(
        result.expect("an unreadable server fails nothing"),
        Action::requeue(LINKS_RECHECK_INTERVAL),
        "links are read again soon while a server is unaccounted for"
    );
    // The metrics say what the status says, under the link's namespace and name.
    let metrics = metrics.encode().expect("metrics");
    let series = |name: &str, labels: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "{name}{{namespace=\"{NS}\",link=\"link\"{labels}}} "
                ))
            })
            .map(str::to_owned)
    };
    let linked = series(
        "cplink_operator_link_server_agents_linked",
        ",pod=\"link-server-a\"",
    );
    assert_eq!(linked.as_deref(), Some("3"), "{metrics}");
    assert_eq!(
        series(
            "cplink_operator_link_server_agents_linked",
            ",pod=\"link-server-b\""
        ),
        None,
        "{metrics}"
    );
    assert_eq!(
        series("cplink_operator_link_servers_desired", "").as_deref(),
        Some("2"),
        "{metrics}"
    );
    assert_eq!(
        series("cplink_operator_link_condition", ",condition=\"Ready\"").as_deref(),
        Some("0"),
        "{metrics}"
    );
    let not_after = recorded.status["certificates"]["notAfter"]
        .as_str()
        .expect("notAfter")
        .parse::<k8s_openapi::jiff::Timestamp>()
        .expect("a timestamp")
        .as_second();
    let expiries: Vec<i64> = ["ca", "server", "agent", "apiserver"]
        .iter()
        .map(|kind| {
            series(
                "cplink_operator_certificate_expiry_timestamp_seconds",
                &format!(",certificate=\"{kind}\""),
            )
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no expiry of {kind} in {metrics}"))
        })
        .collect();
    assert_eq!(
        expiries.iter().min(),
        Some(&not_after),
        "the earliest is the status' notAfter"
    );
}

#[tokio::test]
async fn server_pods_that_cannot_be_listed_leave_the_counts_out_and_fail_nothing() {
    let (result, recorded) = reconcile_with(
        ControlPlaneLink::test().finalized(),
        Scenario::Apply {
            stored: Recorded::default(),
            server_pods: None,
            events: vec!["Created"],
        },
    )
    .await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(RESYNC_INTERVAL)
    );
    assert_eq!(recorded.status["server"].get("linkedAgents"), None);
    assert_eq!(recorded.status["server"]["summary"], "0/2");
}

#[tokio::test]
async fn an_invalid_spec_reports_ready_false_and_touches_no_child() {
    let link = ControlPlaneLink::test()
        .finalized()
        .with_spec(|s| s.tls.validity = "abc".into());
    let (result, recorded) = reconcile_with(
        link,
        Scenario::InvalidSpec {
            field: "spec.tls.validity",
        },
    )
    .await;
    assert_eq!(result.expect("not an error"), Action::await_change());
    assert_eq!(
        condition(&recorded.status, "Ready")["message"],
        r#"spec.tls.validity: invalid duration "abc" (e.g. "8760h")"#
    );
    assert!(recorded.applied.is_empty());
}

#[tokio::test]
async fn a_grpc_link_points_kube_apiserver_at_the_socket_in_status_and_egress_file() {
    let recorded = first_apply(
        ControlPlaneLink::test()
            .finalized()
            .in_grpc_mode("/etc/kubernetes/cplink-frontend"),
    )
    .await;
    let socket = "/etc/kubernetes/cplink-frontend/konnectivity-server.socket";
    assert_eq!(
        recorded.status["frontend"],
        json!({"address": socket, "egressSecret": "link-apiserver-egress"})
    );
    let egress = recorded.secret("link-apiserver-egress").expect("egress");
    let config = decoded(&egress, "egress-selector-configuration.yaml");
    assert!(config.contains("proxyProtocol: GRPC"), "{config}");
    assert!(config.contains(&format!("udsName: {socket}")), "{config}");
    let deployment = &recorded.applied[&format!("{APPS}/deployments/link-server")];
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][1]["hostPath"]["path"],
        "/etc/kubernetes/cplink-frontend"
    );
}

#[tokio::test]
async fn grpc_mode_without_a_socket_directory_is_an_invalid_spec() {
    let link = ControlPlaneLink::test()
        .finalized()
        .with_spec(|s| s.server.frontend.mode = crate::crd::FrontendMode::Grpc);
    let (result, recorded) = reconcile_with(
        link,
        Scenario::InvalidSpec {
            field: "spec.server.frontend.socketHostPath",
        },
    )
    .await;
    assert_eq!(result.expect("not an error"), Action::await_change());
    let message = condition(&recorded.status, "Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with(
            "spec.server.frontend.socketHostPath: required when spec.server.frontend.mode is GRPC"
        ),
        "{message}"
    );
    assert!(recorded.applied.is_empty());
}

#[tokio::test]
async fn a_missing_ca_secret_is_reported_in_status_and_retried() {
    let link = ControlPlaneLink::test().finalized().with_spec(|s| {
        s.tls.ca_secret_ref = Some(SecretRef {
            name: "corporate-ca".into(),
        })
    });
    let (result, recorded) = reconcile_with(
        link,
        Scenario::MissingCaSecret {
            name: "corporate-ca",
        },
    )
    .await;
    assert_eq!(
        result.expect("not an error"),
        Action::requeue(CA_RETRY_INTERVAL)
    );
    let certificates = condition(&recorded.status, "CertificatesReady");
    assert_eq!(certificates["status"], "False");
    assert_eq!(certificates["reason"], "CASecretNotFound");
    assert_eq!(condition(&recorded.status, "Ready")["status"], "False");
    assert!(
        recorded.applied.is_empty(),
        "nothing is applied without a CA"
    );
}

#[tokio::test]
async fn an_api_error_fails_the_reconcile_and_error_policy_requeues_with_backoff() {
    let link = ControlPlaneLink::test().finalized();
    let (ctx, verifier) = test_context();
    let server = verifier.run(link.clone(), Scenario::ServerError);
    let link = Arc::new(link);
    let error = reconcile(link.clone(), ctx.clone())
        .await
        .expect_err("a 500 fails the reconcile");
    assert_eq!(error.metric_label(), "get");

    assert_eq!(
        error_policy(link.clone(), &error, ctx.clone()),
        Action::requeue(ERROR_BACKOFF_BASE)
    );
    assert_eq!(
        error_policy(link.clone(), &error, ctx.clone()),
        Action::requeue(ERROR_BACKOFF_BASE * 2),
        "consecutive failures back off"
    );
    let metrics = ctx.metrics.encode().expect("metrics");
    assert!(
        metrics.contains("cplink_operator_reconcile_errors_total{error=\"get\"} 2"),
        "{metrics}"
    );
    drop(ctx);
    server.await.expect("scenario completed");
}

#[tokio::test]
async fn deleting_a_link_removes_its_cluster_rbac_then_the_finalizer() {
    let (ctx, verifier) = test_context();
    let metrics = ctx.metrics.clone();
    metrics.record_certificates(NS, "link", &[("ca", 2_000_000_000)]);
    assert!(metrics.encode().expect("metrics").contains("link=\"link\""));
    let link = ControlPlaneLink::test().finalized().deleting();
    let (result, recorded) = reconcile_in(ctx, verifier, link, Scenario::Cleanup).await;
    assert_eq!(result.expect("cleanup succeeds"), Action::await_change());
    assert_eq!(recorded.deleted.len(), 4);
    let metrics = metrics.encode().expect("metrics");
    assert!(
        !metrics.contains("link=\"link\""),
        "the link's series go with it: {metrics}"
    );
}

#[tokio::test]
async fn deleting_a_link_with_agents_outside_the_cluster_removes_the_same_cluster_rbac() {
    // The link may have run agents in the cluster before: cleanup does not trust the mode.
    let link = ControlPlaneLink::test()
        .with_agents_outside_the_cluster()
        .finalized()
        .deleting();
    let (result, recorded) = reconcile_with(link, Scenario::Cleanup).await;
    assert_eq!(result.expect("cleanup succeeds"), Action::await_change());
    assert_eq!(recorded.deleted.len(), 4);
}

#[test]
fn backoff_doubles_and_is_capped() {
    assert_eq!(backoff(1), ERROR_BACKOFF_BASE);
    assert_eq!(backoff(2), ERROR_BACKOFF_BASE * 2);
    assert_eq!(backoff(3), ERROR_BACKOFF_BASE * 4);
    assert_eq!(backoff(100), ERROR_BACKOFF_MAX);
}

#[test]
fn the_next_check_comes_sooner_when_a_renewal_is_due() {
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
    assert_eq!(
        next_check(now + Duration::from_secs(86_400), now),
        RESYNC_INTERVAL
    );
    assert_eq!(
        next_check(now + Duration::from_secs(90), now),
        Duration::from_secs(90)
    );
    assert_eq!(
        next_check(now - Duration::from_secs(90), now),
        Duration::from_secs(1)
    );
}

#[test]
fn the_fixture_link_is_named_as_the_paths_expect() {
    let link = ControlPlaneLink::test();
    assert_eq!(link.name_any(), "link");
    assert_eq!(link.namespace().as_deref(), Some(NS));
}

#[tokio::test]
async fn a_certificate_due_for_renewal_is_reissued_and_rolls_only_its_pods() {
    let link = ControlPlaneLink::test().finalized();
    let first = first_apply(link.clone()).await;

    // Replace the stored server certificate with one from the same CA that expires in a day,
    // well inside the default 720h renewal window.
    let ca_secret = first.secret("link-ca").expect("ca");
    let ca = CertPair {
        cert_pem: decoded(&ca_secret, "tls.crt"),
        key_pem: decoded(&ca_secret, "tls.key"),
    };
    let year = Duration::from_secs(8760 * 3600);
    let issued_long_ago = OffsetDateTime::now_utc() - (year - Duration::from_secs(86_400));
    let profile = {
        let plan = link.plan();
        let (dns_names, ips) = plan.server_sans();
        Profile::Server {
            common_name: "link-server".into(),
            dns_names,
            ips,
        }
    };
    let expiring = certs::issue(&ca, &profile, year, issued_long_ago).expect("issues");
    let mut stored = first.clone();
    let server_path = format!("{CORE}/secrets/link-server-tls");
    let mut server_secret = stored.applied[&server_path].clone();
    server_secret["data"]["tls.crt"] =
        serde_json::to_value(k8s_openapi::ByteString(expiring.cert_pem.into_bytes())).expect("b64");
    server_secret["data"]["tls.key"] =
        serde_json::to_value(k8s_openapi::ByteString(expiring.key_pem.into_bytes())).expect("b64");
    stored
        .applied
        .insert(server_path.clone(), server_secret.clone());

    let (result, second) = reconcile_with(
        first.link_after(link),
        Scenario::Apply {
            stored,
            server_pods: Some(vec![]),
            events: vec!["CertificatesRenewed"],
        },
    )
    .await;
    result.expect("reconcile succeeds");

    let renewed = &second.applied[&server_path];
    assert_ne!(renewed["data"]["tls.crt"], server_secret["data"]["tls.crt"]);
    let not_after = certs::inspect(&decoded(renewed, "tls.crt"))
        .expect("parses")
        .not_after;
    assert!(
        not_after > OffsetDateTime::now_utc() + year / 2,
        "a fresh certificate"
    );

    let annotation = |r: &Recorded, path: &str| {
        r.applied[path]["spec"]["template"]["metadata"]["annotations"]["cplink.dev/tls-checksum"]
            .clone()
    };
    let deployment = format!("{APPS}/deployments/link-server");
    let daemonset = format!("{APPS}/daemonsets/link-agent");
    assert_ne!(
        annotation(&second, &deployment),
        annotation(&first, &deployment),
        "servers roll to pick up the new certificate"
    );
    assert_eq!(
        annotation(&second, &daemonset),
        annotation(&first, &daemonset),
        "agents keep running"
    );
    for name in ["link-ca", "link-agent-tls", "link-apiserver-egress"] {
        assert_eq!(second.secret(name), first.secret(name), "{name} is reused");
    }
}

/// A second reconcile of the link of `first`, with the stored CA Secret's entries replaced by
/// `entries`; expects `events`.
async fn reconcile_with_stored_ca(
    link: ControlPlaneLink,
    first: &Recorded,
    entries: &[(&str, &str)],
    events: Vec<&'static str>,
) -> Recorded {
    let mut stored = first.clone();
    let ca_path = format!("{CORE}/secrets/link-ca");
    let mut ca_secret = stored.applied[&ca_path].clone();
    for (key, text) in entries {
        ca_secret["data"][*key] =
            serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).expect("b64");
    }
    stored.applied.insert(ca_path, ca_secret);
    let (result, second) = reconcile_with(
        first.link_after(link),
        Scenario::Apply {
            stored,
            server_pods: Some(vec![]),
            events,
        },
    )
    .await;
    result.expect("reconcile succeeds");
    second
}

/// A generated CA near its end is not replaced outright: its successor joins every `ca.crt`
/// while it keeps signing, and every pod rolls to trust both.
#[tokio::test]
async fn a_generated_ca_near_its_end_first_adds_its_successor_to_every_ca_bundle() {
    let link = ControlPlaneLink::test().finalized();
    let first = first_apply(link.clone()).await;

    let year = Duration::from_secs(8760 * 3600);
    let old = certs::generate_ca(
        "cplink tunnels/link",
        year,
        OffsetDateTime::now_utc() - year * 9,
    )
    .expect("ca");
    // kube-apiserver must load the egress Secret's new files (and CA bundle) too.
    let second = reconcile_with_stored_ca(
        link,
        &first,
        &[
            ("tls.crt", &old.cert_pem),
            ("tls.key", &old.key_pem),
            ("ca.crt", &old.cert_pem),
        ],
        vec![
            "CertificatesRenewed",
            "EgressCertificateExpiring",
            "CARotation",
        ],
    )
    .await;
    let ca_path = format!("{CORE}/secrets/link-ca");
    let rotating = &second.applied[&ca_path];
    let bundle = decoded(rotating, "tls.crt");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    assert!(
        bundle.starts_with(&old.cert_pem),
        "the old CA still signs first"
    );
    assert_eq!(decoded(rotating, "tls.key"), old.key_pem);
    assert!(decoded(rotating, "next.key").contains("PRIVATE KEY"));
    for name in ["link-server-tls", "link-agent-tls", "link-apiserver-egress"] {
        let secret = second.secret(name).expect("leaf secret");
        assert_eq!(decoded(&secret, "ca.crt"), bundle, "{name} trusts both CAs");
    }
    let annotation = |r: &Recorded, path: &str| {
        r.applied[path]["spec"]["template"]["metadata"]["annotations"]["cplink.dev/tls-checksum"]
            .clone()
    };
    for path in [
        format!("{APPS}/deployments/link-server"),
        format!("{APPS}/daemonsets/link-agent"),
    ] {
        assert_ne!(
            annotation(&second, &path),
            annotation(&first, &path),
            "{path} rolls"
        );
    }
}

/// A stored CA that cannot sign is replaced at once, with a Warning: that is an outage.
#[tokio::test]
async fn an_unusable_generated_ca_is_replaced_with_a_warning() {
    let link = ControlPlaneLink::test().finalized();
    let first = first_apply(link.clone()).await;
    let second = reconcile_with_stored_ca(
        link,
        &first,
        &[("tls.key", "garbled")],
        vec![
            "CertificatesRenewed",
            "EgressCertificateExpiring",
            "CAReplaced",
        ],
    )
    .await;
    let ca_path = format!("{CORE}/secrets/link-ca");
    let replaced = decoded(&second.applied[&ca_path], "tls.crt");
    assert_ne!(replaced, decoded(&first.applied[&ca_path], "tls.crt"));
    assert_eq!(replaced.matches("BEGIN CERTIFICATE").count(), 1);
}

#[tokio::test]
async fn the_default_link_has_agents_send_tokens_the_servers_may_review() {
    let recorded = first_apply(ControlPlaneLink::test().finalized()).await;
    let audience = "cplink.dev/tunnels/link";

    let daemonset = &recorded.applied[&format!("{APPS}/daemonsets/link-agent")];
    let agent_pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(
        agent_pod["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": audience, "expirationSeconds": 3600, "path": "token"})
    );
    assert!(
        agent_pod["containers"][0]["args"]
            .as_array()
            .expect("args")
            .contains(&json!(
                "--service-account-token-path=/var/run/secrets/cplink/token"
            ))
    );

    let deployment = &recorded.applied[&format!("{APPS}/deployments/link-server")];
    let server_pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(server_pod["automountServiceAccountToken"], true);
    let args = server_pod["containers"][0]["args"]
        .as_array()
        .expect("args");
    for arg in [
        "--agent-identity=token".to_owned(),
        "--agent-namespace=tunnels".to_owned(),
        "--agent-service-account=link-agent".to_owned(),
        "--agent-daemonset=link-agent".to_owned(),
        format!("--authentication-audience={audience}"),
    ] {
        assert!(args.contains(&json!(arg)), "{arg} in {args:?}");
    }

    let role = &recorded.applied[&format!("{RBAC}/namespaces/{NS}/roles/link-server")];
    assert_eq!(role["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(role["rules"].as_array().map(Vec::len), Some(1), "pods only");
    let binding =
        &recorded.applied[&format!("{RBAC}/clusterrolebindings/cplink:tunnels:link:server")];
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "link-server", "namespace": NS}])
    );
    assert!(recorded.deleted.is_empty());
}

#[tokio::test]
async fn with_agents_outside_the_cluster_no_agent_runs_and_status_says_so() {
    let link = ControlPlaneLink::test()
        .with_agents_outside_the_cluster()
        .finalized();
    let (result, recorded) = reconcile_with(
        link,
        Scenario::Apply {
            stored: Recorded::default(),
            server_pods: Some(vec![]),
            events: vec!["Created"],
        },
    )
    .await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(RESYNC_INTERVAL)
    );
    let expected: Vec<String> = children(false).into_iter().map(|(path, _)| path).collect();
    assert_eq!(recorded.order, expected, "no DaemonSet, no agent RBAC");
    assert_eq!(recorded.deleted, removed_with_agents_outside_the_cluster());

    let deployment = &recorded.applied[&format!("{APPS}/deployments/link-server")];
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args");
    assert!(
        args.contains(&json!("--agent-identity=certificate")),
        "{args:?}"
    );
    let role = &recorded.applied[&format!("{RBAC}/clusterroles/cplink:tunnels:link:server")];
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}])
    );

    let status = &recorded.status;
    assert_eq!(status.get("agents"), None);
    let agents = condition(status, "AgentsAvailable");
    assert_eq!(agents["status"], "True");
    assert_eq!(agents["reason"], "OutsideCluster");
    assert_eq!(condition(status, "Ready")["reason"], "Progressing");
}

#[tokio::test]
async fn switching_to_agents_outside_the_cluster_deletes_the_in_cluster_agents_and_their_rights() {
    let link = ControlPlaneLink::test().finalized();
    let first = first_apply(link.clone()).await;
    let switched = first
        .link_after(link)
        .with_agents_outside_the_cluster()
        .with_generation(2);
    let (result, second) = reconcile_with(
        switched,
        Scenario::Apply {
            stored: first.clone(),
            server_pods: Some(vec![]),
            events: vec!["Updated"],
        },
    )
    .await;
    result.expect("reconcile succeeds");
    // Every deleted path was applied by the first pass (the verifier answered 200 for those).
    assert_eq!(second.deleted, removed_with_agents_outside_the_cluster());
    assert!(
        second
            .deleted
            .iter()
            .all(|path| first.applied.contains_key(path)),
        "{:?}",
        second.deleted
    );
    for name in ["link-ca", "link-server-tls", "link-apiserver-egress"] {
        assert_eq!(second.secret(name), first.secret(name), "{name} is reused");
    }
    assert_eq!(second.status.get("agents"), None);
    assert_eq!(second.status["observedGeneration"], 2);
}
