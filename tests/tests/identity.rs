//! Agents bound to their nodes, against a real kube-apiserver and kube-controller-manager.
//!
//! Every agent of a link holds the same client certificate. With `--agent-identity token` each
//! agent also sends its pod's bound service-account token; the server reviews it, finds the pod
//! (owned by the agents' DaemonSet, placed by the DaemonSet controller), and lets the agent
//! route only what the pod's Node backs. With `--agent-identity certificate` a per-node
//! certificate (`CN=system:node:<node>`) names the node instead. The scenarios are the attacks
//! a holder of the shared certificate, of another node's token or of a stale token would try.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::fixture::{self, Loopback, RunningServer};
use cplink_e2e::grpc::{self, ScriptedAgent};
use cplink_e2e::harness;
use cplink_e2e::pki::Usage;
use cplink_e2e::wait;
use cplink_proto::hello::{AgentHello, BearerToken, HelloOutcome, Identifiers};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};

const NAMESPACE: &str = "cplink";
const ACCOUNT: &str = "agents";
const DAEMONSET: &str = "agents";
const AUDIENCE: &str = "cplink.dev/cplink/link";
/// Node addresses and pod ranges, in the benchmarking range that is never routed.
const NODE_1_IP: &str = "198.18.0.11";
const NODE_1_PODS: &str = "198.18.64.0/24";
const NODE_2_IP: &str = "198.18.0.12";
const NODE_2_PODS: &str = "198.18.65.0/24";
/// Where impostors link from: another loopback address than the real agents'.
const ELSEWHERE: &str = "127.0.0.2";
const DEADLINE: Duration = Duration::from_secs(30);

/// The objects a DaemonSet of agents has in a cluster: namespace, service account, DaemonSet,
/// and Nodes for it to place pods on. No kubelet runs; the pods only need to exist.
async fn agents_daemonset(client: &kube::Client) -> anyhow::Result<()> {
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": NAMESPACE}}))?,
        )
        .await?;
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), NAMESPACE);
    for name in [ACCOUNT, "intruder"] {
        accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?,
            )
            .await?;
    }
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    // node-2 starts without a pod range, as a node does before the IPAM controller gives it
    // one (the only change of pod ranges the API allows).
    for (name, ip, pods) in [
        ("node-1", NODE_1_IP, Some(NODE_1_PODS)),
        ("node-2", NODE_2_IP, None),
    ] {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDRs": pods.map(|p| vec![p]).unwrap_or_default()},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        set_addresses(&nodes, name, &[ip]).await?;
    }
    let daemonsets: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let daemonset: DaemonSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": DAEMONSET},
        "spec": {
            "selector": {"matchLabels": {"app": "cplink-agent"}},
            "template": {
                "metadata": {"labels": {"app": "cplink-agent"}},
                "spec": {
                    "serviceAccountName": ACCOUNT,
                    // The nodes have no kubelet: they are tainted not-ready.
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{"name": "agent", "image": "cplink:test"}],
                },
            },
        },
    }))?;
    daemonsets
        .create(&PostParams::default(), &daemonset)
        .await?;
    Ok(())
}

async fn set_addresses(nodes: &kube::Api<Node>, name: &str, ips: &[&str]) -> anyhow::Result<()> {
    let addresses: Vec<_> = ips
        .iter()
        .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
        .collect();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            // Room for pods, as a kubelet would report it: the scheduler places DaemonSet pods.
            &Patch::Merge(serde_json::json!({"status": {
                "addresses": addresses,
                "capacity": {"pods": "10", "cpu": "1", "memory": "1Gi"},
                "allocatable": {"pods": "10", "cpu": "1", "memory": "1Gi"},
            }})),
        )
        .await?;
    Ok(())
}

/// The DaemonSet's pod on `node`, once the controller made it; not the one with uid `not`.
async fn agent_pod(client: &kube::Client, node: &str, not: Option<&str>) -> anyhow::Result<Pod> {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let give_up = tokio::time::Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match pods
            .list(&ListParams::default().labels("app=cplink-agent"))
            .await
        {
            Ok(list) => {
                let placed = list.items.into_iter().find(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.metadata.uid.as_deref() != not
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                });
                if let Some(pod) = placed {
                    return Ok(pod);
                }
                "not made yet".to_owned()
            }
            Err(err) => err.to_string(),
        };
        if tokio::time::Instant::now() >= give_up {
            let events: kube::Api<k8s_openapi::api::core::v1::Event> =
                kube::Api::namespaced(client.clone(), NAMESPACE);
            let events = events.list(&ListParams::default()).await?;
            let said: Vec<String> = events
                .items
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.reason.as_deref().unwrap_or(""),
                        e.message.as_deref().unwrap_or("")
                    )
                })
                .collect();
            anyhow::bail!("no agent pod on {node} after {DEADLINE:?}: {last}; events: {said:#?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// A token of `account`, for `audience`, bound to `pod` when given: what kubelet puts in a
/// projected serviceAccountToken volume.
async fn token(
    client: &kube::Client,
    account: &str,
    audience: &str,
    pod: Option<&Pod>,
) -> anyhow::Result<String> {
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let issued: TokenRequest = accounts
        .create_subresource("token", account, &PostParams::default(), &request)
        .await?;
    Ok(issued.status.map(|s| s.token).unwrap_or_default())
}

/// `token` with its validity moved an hour into the past, signed again with the cluster's
/// service-account key: a token that was genuine and has expired.
fn expired(token: &str, signing_key: &Path) -> anyhow::Result<String> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        anyhow::bail!("not a JWT");
    };
    let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims)?)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    claims["iat"] = (now - 7200).into();
    claims["nbf"] = (now - 7200).into();
    claims["exp"] = (now - 3600).into();
    let signed = format!(
        "{header}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
    );
    let pem = std::fs::read_to_string(signing_key)?;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|der: rustls_pki_types::PrivatePkcs8KeyDer<'static>| der)?;
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("service-account key: {e}"))?;
    let signature = key
        .sign(&rng, signed.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

fn hello(id: &str, ips: &[&str], pods: &[&str], token: Option<&str>) -> AgentHello {
    AgentHello {
        agent_id: id.to_owned(),
        node_name: Some(id.to_owned()),
        identifiers: Identifiers {
            host_ips: ips.iter().map(|i| i.parse().expect("an IP")).collect(),
            pod_cidrs: pods.iter().map(|c| c.parse().expect("a CIDR")).collect(),
            default_route: false,
        },
        software_version: "test".into(),
        token: token.map(BearerToken::new),
    }
}

/// The refusal a hello gets; fails if it is accepted.
async fn refusal(
    lo: &Loopback,
    server: &RunningServer,
    cert: &cplink_e2e::pki::CertFiles,
    hello: &AgentHello,
) -> anyhow::Result<String> {
    let from: IpAddr = ELSEWHERE.parse()?;
    match fixture::say_hello(server.agent_addr, cert, lo.pki.ca_file(), from, hello).await? {
        HelloOutcome::Rejected { reason } => Ok(reason),
        HelloOutcome::Accepted => anyhow::bail!("the server accepted {hello:?}"),
    }
}

fn counted(server: &RunningServer, metric: &str, reason: &str) -> u64 {
    let prefix = format!("cplink_server_{metric}_total{{reason=\"{reason}\"}} ");
    server
        .handle
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The agent a dial to `target` goes to by node name, host IP or pod range, if any.
fn routed(server: &RunningServer, target: &str) -> Option<String> {
    server.handle.route_of(target).ok().map(|(id, _)| id)
}

async fn routed_within(
    server: &RunningServer,
    target: &str,
    expected: Option<&str>,
) -> anyhow::Result<()> {
    wait::until(
        &format!("dials to {target} routed to {expected:?}"),
        DEADLINE,
        || routed(server, target).as_deref() == expected,
    )
    .await
}

#[test]
fn agents_route_only_what_their_pods_node_backs() -> anyhow::Result<()> {
    harness::run(
        "agents_route_only_what_their_pods_node_backs",
        Duration::from_secs(240),
        |steps| async move {
            steps.enter("control plane, agents' DaemonSet and two nodes");
            let plane = ControlPlane::start(Options::default()).await?;
            let client = plane.client().await?;
            agents_daemonset(&client).await?;
            let pod_1 = agent_pod(&client, "node-1", None).await?;
            let pod_2 = agent_pod(&client, "node-2", None).await?;

            steps.enter("tokens: genuine, foreign, unbound, wrong audience, expired");
            let token_1 = token(&client, ACCOUNT, AUDIENCE, Some(&pod_1)).await?;
            let token_2 = token(&client, ACCOUNT, AUDIENCE, Some(&pod_2)).await?;
            let wrong_audience = token(&client, ACCOUNT, "someone-else", Some(&pod_1)).await?;
            let unbound = token(&client, ACCOUNT, AUDIENCE, None).await?;
            let foreign = token(&client, "intruder", AUDIENCE, None).await?;
            let stale = expired(&token_1, &plane.dir().join("service-account.key"))?;

            steps.enter("a server binding agents by token");
            let lo = Loopback::new()?;
            let kubeconfig = plane.kubeconfig.display().to_string();
            let server = lo
                .start_server(&[
                    "--agent-identity",
                    "token",
                    "--agent-namespace",
                    NAMESPACE,
                    "--agent-service-account",
                    ACCOUNT,
                    "--agent-daemonset",
                    DAEMONSET,
                    "--authentication-audience",
                    AUDIENCE,
                    "--kubeconfig",
                    &kubeconfig,
                    // No fallback to another agent: a dial goes to its node's agent or fails.
                    "--strategies",
                    "node,cidr",
                ])
                .await?;

            steps.enter("node-1's agent links with its pod's token and routes node-1");
            let token_file = lo.dir().join("token-1");
            std::fs::write(&token_file, &token_1)?;
            let token_path = token_file.display().to_string();
            let agent_1 = lo
                .start_agent(
                    &[server.agent_addr],
                    &[
                        "--agent-id",
                        "node-1",
                        "--node-name",
                        "node-1",
                        "--host-ip",
                        NODE_1_IP,
                        "--pod-cidr",
                        NODE_1_PODS,
                        "--service-account-token-path",
                        &token_path,
                    ],
                )
                .await?;
            server.wait_for_agents(1).await?;
            agent_1.wait_ready().await?;
            for target in ["node-1:10250", "198.18.0.11:10250", "198.18.64.7:8080"] {
                assert_eq!(
                    routed(&server, target).as_deref(),
                    Some("node-1"),
                    "{target}"
                );
            }

            steps.enter("impostors with the shared certificate are refused, each with its reason");
            let cert = &lo.agent_cert;
            let attacks = [
                (
                    "no token",
                    hello("node-1", &[NODE_1_IP], &[], None),
                    "no_token",
                    "service-account token",
                ),
                (
                    "node-2's token as node-1",
                    hello("node-1", &[], &[], Some(&token_2)),
                    "agent_id",
                    "verified node node-2",
                ),
                (
                    "node-2's token, node-1's IP",
                    hello("node-2", &[NODE_1_IP], &[], Some(&token_2)),
                    "host_ip",
                    NODE_1_IP,
                ),
                (
                    "node-2's token, node-1's pods",
                    hello("node-2", &[], &[NODE_1_PODS], Some(&token_2)),
                    "pod_cidr",
                    NODE_1_PODS,
                ),
                (
                    "a token for another audience",
                    hello("node-1", &[], &[], Some(&wrong_audience)),
                    "token",
                    "token rejected",
                ),
                (
                    "a token bound to no pod",
                    hello("node-1", &[], &[], Some(&unbound)),
                    "not_pod_bound",
                    "not bound to a pod",
                ),
                (
                    "another account's token",
                    hello("node-1", &[], &[], Some(&foreign)),
                    "token",
                    "system:serviceaccount:cplink:intruder",
                ),
                (
                    "an expired token",
                    hello("node-1", &[], &[], Some(&stale)),
                    "token",
                    "token rejected",
                ),
            ];
            for (attack, claim, reason, says) in attacks {
                let before = counted(&server, "identity_refusals", reason);
                let refused = refusal(&lo, &server, cert, &claim).await?;
                println!("  {attack}: refused: {refused}");
                assert!(refused.contains(says), "{attack}: {refused}");
                assert_eq!(
                    counted(&server, "identity_refusals", reason),
                    before + 1,
                    "{attack}"
                );
                assert_eq!(
                    routed(&server, "node-1:10250").as_deref(),
                    Some("node-1"),
                    "{attack}"
                );
            }
            assert_eq!(server.handle.agent_ids(), vec!["node-1".to_owned()]);

            steps.enter("node-2's agent links; node-2's routes follow its Node");
            let token_file_2 = lo.dir().join("token-2");
            std::fs::write(&token_file_2, &token_2)?;
            let token_path_2 = token_file_2.display().to_string();
            let agent_2 = lo
                .start_agent(
                    &[server.agent_addr],
                    &[
                        "--agent-id",
                        "node-2",
                        "--node-name",
                        "node-2",
                        "--service-account-token-path",
                        &token_path_2,
                    ],
                )
                .await?;
            server.wait_for_agents(2).await?;
            agent_2.wait_ready().await?;
            assert_eq!(
                routed(&server, "198.18.0.12:10250").as_deref(),
                Some("node-2")
            );
            assert_eq!(
                routed(&server, "198.18.65.9:8080"),
                None,
                "no pod range yet"
            );
            let nodes: kube::Api<Node> = kube::Api::all(client.clone());
            nodes
                .patch(
                    "node-2",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"spec": {"podCIDRs": [NODE_2_PODS]}})),
                )
                .await?;
            routed_within(&server, "198.18.65.9:8080", Some("node-2")).await?;
            set_addresses(&nodes, "node-2", &["198.18.0.22"]).await?;
            routed_within(&server, "198.18.0.22:10250", Some("node-2")).await?;
            routed_within(&server, "198.18.0.12:10250", None).await?;
            assert!(counted(&server, "identity_revocations", "node_changed") >= 2);

            steps.enter("upstream konnectivity agents are bound the same way");
            let anonymous = grpc::agent_h2_tls_without_certificate(lo.pki.ca_file())?;
            let upstream = |identifiers: &'static str| {
                let tls = anonymous.clone();
                let token = token_2.clone();
                let addr = server.agent_addr;
                async move {
                    ScriptedAgent::link_with_token(addr, tls, "upstream", identifiers, Some(&token))
                        .await
                }
            };
            match upstream("host=node-1").await {
                Ok(_) => anyhow::bail!("an upstream agent with node-2's token claimed node-1"),
                Err(err) => {
                    let status = err.downcast::<tonic::Status>()?;
                    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
                    assert!(status.message().contains("node-2"), "{status}");
                }
            }
            let bound = upstream("host=node-2&ipv4=198.18.0.22").await?;
            server.wait_for_agents(3).await?;
            drop(bound);

            steps.enter("node-1's pod is deleted: its link closes, and its token stops working");
            let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), NAMESPACE);
            let old_uid = pod_1.metadata.uid.clone();
            pods.delete(
                pod_1.metadata.name.as_deref().unwrap_or_default(),
                &DeleteParams::default().grace_period(0),
            )
            .await?;
            routed_within(&server, "node-1:10250", None).await?;
            assert!(counted(&server, "identity_revocations", "pod_deleted") >= 1);

            steps.enter("the DaemonSet's new pod on node-1: a rotated token relinks the agent");
            let replacement = agent_pod(&client, "node-1", old_uid.as_deref()).await?;
            std::fs::write(
                &token_file,
                token(&client, ACCOUNT, AUDIENCE, Some(&replacement)).await?,
            )?;
            routed_within(&server, "node-1:10250", Some("node-1")).await?;

            steps.enter("a server binding agents by per-node certificates");
            let cert_server = lo
                .start_server(&[
                    "--agent-identity",
                    "certificate",
                    "--kubeconfig",
                    &kubeconfig,
                    "--strategies",
                    "node,cidr",
                ])
                .await?;
            let node_1_cert = lo
                .pki
                .issue("system:node:node-1", &["node-1"], Usage::Client)?;
            let from: IpAddr = ELSEWHERE.parse()?;
            let own = hello("node-1", &[NODE_1_IP], &[NODE_1_PODS], None);
            let outcome = fixture::say_hello(
                cert_server.agent_addr,
                &node_1_cert,
                lo.pki.ca_file(),
                from,
                &own,
            )
            .await?;
            assert_eq!(outcome, HelloOutcome::Accepted);
            let as_node_2 = refusal(
                &lo,
                &cert_server,
                &node_1_cert,
                &hello("node-2", &[], &[], None),
            )
            .await?;
            assert!(as_node_2.contains("verified node node-1"), "{as_node_2}");
            let shared = refusal(&lo, &cert_server, &lo.agent_cert, &own).await?;
            assert!(shared.contains("CN=system:node:<node>"), "{shared}");
            assert_eq!(
                counted(&cert_server, "identity_refusals", "no_node_certificate"),
                1
            );

            steps.enter("stopping");
            agent_1.stop().await;
            agent_2.stop().await;
            cert_server.stop().await;
            server.stop().await;
            Ok(())
        },
    )
}
