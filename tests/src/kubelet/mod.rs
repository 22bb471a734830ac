//! A pod runner that plays kubelet for simulated nodes on loopback.
//!
//! Each node is registered as a Node object whose InternalIP is a loopback address of its own
//! (`127.A.0.n`) with a pod range (`127.A.n.0/24`). The runner watches the pods bound to its
//! nodes and runs each container's `command` + `args` as a local process: images cannot be
//! pulled here, so commands are resolved on a PATH that holds the freshly built cplink
//! binaries. Volumes (Secret, ConfigMap, projected, downward API, emptyDir) are written out
//! and bind-mounted at their `mountPath` by bubblewrap, so programs read their service account
//! token and certificates where Kubernetes puts them; the environment carries the downward-API
//! fields and `KUBERNETES_SERVICE_HOST`/`PORT` of the API server. Pod status follows the
//! processes: phase, Ready from the readiness probe, restarts with backoff, liveness restarts.
//! Deleted pods get SIGTERM, then SIGKILL after their grace period.
//!
//! Each node serves the kubelet endpoints kube-apiserver uses for `kubectl logs` and node
//! proxying on `<node-ip>:10250` over TLS ([`api`]).
//!
//! What is not simulated: images, init containers, exec probes and `kubectl exec`, resource
//! limits, users other than through `setpriv`, and Secret updates after a container started
//! (pods are rolled on change by their owners here).
//! Mount points missing on the host are created empty by bubblewrap (under a tmpfs where a
//! whole parent is missing).

mod api;
mod env;
mod logs;
mod pod;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::ControlPlane;
use crate::pki::Usage;

pub use logs::Logs;

/// The port kube-apiserver reaches kubelets on.
pub const KUBELET_PORT: u16 = 10250;

/// A simulated node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node name (`node-1`, ...).
    pub name: String,
    /// Its InternalIP, where its kubelet endpoint listens.
    pub ip: Ipv4Addr,
    /// The range its pods get addresses from.
    pub pod_cidr: String,
}

/// What the pod runner needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many nodes.
    pub nodes: usize,
    /// Directories searched first for container commands (the cplink binaries).
    pub bin_dirs: Vec<PathBuf>,
}

/// Shared by every pod of every node.
pub(crate) struct Runtime {
    client: kube::Client,
    logs: Arc<Logs>,
    processes: Arc<Processes>,
    /// Pod directories live under `dir/pods`.
    dir: PathBuf,
    /// `PATH` of containers.
    path: String,
    /// Where containers reach the API server.
    apiserver: (String, u16),
}

/// Process groups of running containers, by the pod they run for (`namespace/name`), killed
/// when the runner goes away; and the pods whose containers a test keeps from restarting.
#[derive(Default)]
pub(crate) struct Processes {
    groups: Mutex<HashMap<i32, String>>,
    held: Mutex<HashSet<String>>,
    released: tokio::sync::Notify,
}

impl Processes {
    fn add(&self, group: i32, pod: &str) {
        self.groups
            .lock()
            .expect("process table")
            .insert(group, pod.to_owned());
    }

    fn remove(&self, group: i32) {
        self.groups.lock().expect("process table").remove(&group);
    }

    fn count(&self) -> usize {
        self.groups.lock().expect("process table").len()
    }

    fn kill_all(&self) {
        for (group, _) in self.groups.lock().expect("process table").drain() {
            let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
        }
    }

    /// Whether `pod`'s containers must not restart for now.
    fn is_held(&self, pod: &str) -> bool {
        self.held.lock().expect("held pods").contains(pod)
    }

    /// Waits until `pod` is no longer held.
    async fn wait_released(&self, pod: &str) {
        loop {
            let released = self.released.notified();
            if !self.is_held(pod) {
                return;
            }
            released.await;
        }
    }
}

/// One node's runtime state.
pub(crate) struct NodeCtx {
    name: String,
    ip: Ipv4Addr,
    /// First three octets of the pod range.
    pod_prefix: [u8; 3],
    pod_ips: Mutex<PodIps>,
}

#[derive(Default)]
struct PodIps {
    next: u8,
    used: HashSet<u8>,
}

impl NodeCtx {
    /// A free pod address (`.2` to `.254`), never the one released last.
    fn allocate_ip(&self) -> Option<Ipv4Addr> {
        let mut ips = self.pod_ips.lock().expect("pod addresses");
        for _ in 0..253 {
            let host = if (2..=254).contains(&ips.next) {
                ips.next
            } else {
                2
            };
            ips.next = host.wrapping_add(1);
            if ips.used.insert(host) {
                let [a, b, c] = self.pod_prefix;
                return Some(Ipv4Addr::new(a, b, c, host));
            }
        }
        None
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        self.pod_ips
            .lock()
            .expect("pod addresses")
            .used
            .remove(&ip.octets()[3]);
    }
}

/// Simulated nodes and their pods; everything stops when this is dropped.
pub struct Nodes {
    nodes: Vec<NodeInfo>,
    range: String,
    logs: Arc<Logs>,
    processes: Arc<Processes>,
    shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.processes.kill_all();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Nodes {
    /// Registers `options.nodes` nodes with the control plane and starts running their pods.
    ///
    /// The runner has a runtime of its own, so tests that block on `kubectl` never stall
    /// the kubelets that `kubectl` talks to.
    pub async fn start(plane: &ControlPlane, options: Options) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cplink-kubelet")
            .enable_all()
            .build()?;
        let dir = tempfile::Builder::new().prefix("cplink-nodes-").tempdir()?;
        let (base, listeners) = claim_node_addresses(options.nodes)?;
        let mut path = std::env::join_paths(&options.bin_dirs)?
            .into_string()
            .map_err(|_| anyhow::anyhow!("binary directories must be UTF-8"))?;
        path.push_str(":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let url: http::Uri = plane.url.parse()?;
        let apiserver = (
            url.host()
                .context("API server URL without host")?
                .to_owned(),
            url.port_u16().context("API server URL without port")?,
        );
        let logs = Arc::new(Logs::default());
        let processes = Arc::new(Processes::default());
        let shutdown = CancellationToken::new();
        let kubeconfig = plane.kubeconfig.clone();
        let ca = plane.pki().ca_file().to_owned();

        let mut nodes = Vec::new();
        let mut servers = Vec::new();
        for (n, listener) in (1..).zip(listeners) {
            let name = format!("node-{n}");
            let ip = Ipv4Addr::new(127, base, 0, n);
            let serving = plane
                .pki()
                .issue(&name, &[&name, &ip.to_string()], Usage::Server)?;
            let tls = cplink_proto::tls::frontend_server_config(
                &cplink_proto::tls::Identity::from_pem_files(&serving.cert, &serving.key)?,
                &cplink_proto::tls::TrustAnchors::from_pem_file(&ca)?,
            )?;
            servers.push((listener, tls));
            nodes.push(NodeInfo {
                name,
                ip,
                pod_cidr: format!("127.{base}.{n}.0/24"),
            });
        }

        let started = {
            let nodes = nodes.clone();
            let logs = Arc::clone(&logs);
            let processes = Arc::clone(&processes);
            let shutdown = shutdown.clone();
            let dir = dir.path().to_owned();
            runtime.spawn(async move {
                let client = crate::cluster::client_for(&kubeconfig).await?;
                let rt = Arc::new(Runtime {
                    client: client.clone(),
                    logs: Arc::clone(&logs),
                    processes,
                    dir,
                    path,
                    apiserver,
                });
                for (info, (listener, tls)) in nodes.iter().zip(servers) {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    tokio::spawn(api::serve(
                        listener,
                        tls,
                        Arc::clone(&logs),
                        shutdown.clone(),
                    ));
                    register(&client, info).await?;
                    tokio::spawn(heartbeat(
                        client.clone(),
                        info.name.clone(),
                        shutdown.clone(),
                    ));
                    let ctx = Arc::new(NodeCtx {
                        name: info.name.clone(),
                        ip: info.ip,
                        pod_prefix: {
                            let o = info.ip.octets();
                            [o[0], o[1], info.ip.octets()[3]]
                        },
                        pod_ips: Mutex::new(PodIps::default()),
                    });
                    tokio::spawn(run_node(Arc::clone(&rt), ctx, shutdown.clone()));
                }
                anyhow::Ok(())
            })
        };
        started.await.context("pod runner start panicked")??;
        Ok(Nodes {
            nodes,
            range: format!("127.{base}.0.0/16"),
            logs,
            processes,
            shutdown,
            runtime: Some(runtime),
            _dir: dir,
        })
    }

    /// The nodes, in name order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The range holding every node and pod address.
    pub fn range(&self) -> &str {
        &self.range
    }

    /// How many container processes run right now.
    pub fn running(&self) -> usize {
        self.processes.count()
    }

    /// Kills every container of pod `namespace/name` at once (SIGKILL to its process groups)
    /// and keeps them from restarting until [`Nodes::release`], as a crashed process whose
    /// restart has not come yet. Returns how many were killed.
    pub fn kill_and_hold(&self, namespace: &str, name: &str) -> usize {
        let pod = format!("{namespace}/{name}");
        self.processes
            .held
            .lock()
            .expect("held pods")
            .insert(pod.clone());
        let groups: Vec<i32> = self
            .processes
            .groups
            .lock()
            .expect("process table")
            .iter()
            .filter(|(_, of)| **of == pod)
            .map(|(group, _)| *group)
            .collect();
        for group in &groups {
            let _ = killpg(Pid::from_raw(*group), Signal::SIGKILL);
        }
        groups.len()
    }

    /// Lets the containers of a pod held by [`Nodes::kill_and_hold`] restart.
    pub fn release(&self, namespace: &str, name: &str) {
        self.processes
            .held
            .lock()
            .expect("held pods")
            .remove(&format!("{namespace}/{name}"));
        self.processes.released.notify_waiters();
    }

    /// The captured logs of every container.
    pub fn logs(&self) -> &Logs {
        &self.logs
    }
}

/// Picks `127.A.0.0/16` with `A` free on this machine: the kubelet port of every node address
/// must be bindable. The listeners are kept for the kubelet endpoints.
fn claim_node_addresses(count: usize) -> anyhow::Result<(u8, Vec<std::net::TcpListener>)> {
    anyhow::ensure!((1..=200).contains(&count), "between 1 and 200 nodes");
    let mut last_error = None;
    for _ in 0..50 {
        let base: u8 = rand::random_range(32..=250);
        let claimed: Result<Vec<_>, _> = (1..=count)
            .map(|n| {
                let ip = Ipv4Addr::new(127, base, 0, u8::try_from(n).expect("at most 200"));
                let listener = std::net::TcpListener::bind((ip, KUBELET_PORT))?;
                listener.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(listener)
            })
            .collect();
        match claimed {
            Ok(listeners) => return Ok((base, listeners)),
            Err(err) => last_error = Some(err),
        }
    }
    Err(anyhow::anyhow!(
        "no free 127.x.0.0/16 range for the nodes' kubelet port {KUBELET_PORT}: {last_error:?}"
    ))
}

/// Creates the Node object and reports it ready with its addresses and kubelet port.
async fn register(client: &kube::Client, node: &NodeInfo) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let object: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
            },
        },
        "spec": { "podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr] },
    }))?;
    api.create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("cannot register node {}", node.name))?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let resources = json!({ "cpu": "8", "memory": "16Gi", "pods": "110" });
    let status = json!({ "status": {
        "addresses": [
            { "type": "InternalIP", "address": node.ip.to_string() },
            { "type": "Hostname", "address": node.name },
        ],
        "daemonEndpoints": { "kubeletEndpoint": { "Port": KUBELET_PORT } },
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "cplink pod runner is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
        "nodeInfo": {
            "machineID": node.name,
            "systemUUID": node.name,
            "bootID": node.name,
            "kernelVersion": "",
            "osImage": "cplink pod runner",
            "containerRuntimeVersion": "bwrap://",
            "kubeletVersion": "v1.20.2",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH,
        },
    }});
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("cannot report node {} ready", node.name))?;
    Ok(())
}

/// How often a node renews its lease; kube-controller-manager marks a node whose lease is
/// older than 40 s unreachable and taints it.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps the node's lease in `kube-node-lease` fresh, as kubelet does.
async fn heartbeat(client: kube::Client, node: String, shutdown: CancellationToken) {
    let api: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut interval = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let renew = json!({ "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
        }});
        let renewed = match api
            .patch(&node, &PatchParams::default(), &Patch::Merge(&renew))
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let lease = serde_json::from_value::<Lease>(json!({
                    "metadata": { "name": node, "namespace": "kube-node-lease" },
                    "spec": renew["spec"],
                }));
                match lease {
                    Ok(lease) => api.create(&PostParams::default(), &lease).await.map(drop),
                    Err(err) => Err(kube::Error::SerdeError(err)),
                }
            }
            other => other.map(drop),
        };
        if let Err(err) = renewed {
            tracing::warn!(%node, %err, "cannot renew the node lease");
        }
    }
}

/// Watches the pods bound to `node` and runs a worker for each.
async fn run_node(rt: Arc<Runtime>, node: Arc<NodeCtx>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(rt.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut pods: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    // Pods whose worker is done (terminated and removed, or finished): never started again.
    let mut done: HashSet<String> = HashSet::new();
    let mut listed: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        pods.retain(|uid, pod| {
            let running = !pod.is_closed();
            if !running {
                done.insert(uid.clone());
            }
            running
        });
        match event {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(listed), Some(uid)) = (&mut listed, &pod.metadata.uid) {
                    listed.insert(uid.clone());
                }
                apply(&rt, &node, &mut pods, &done, pod);
            }
            Ok(Event::Apply(pod)) => apply(&rt, &node, &mut pods, &done, pod),
            Ok(Event::InitDone) => {
                let listed = listed.take().unwrap_or_default();
                pods.retain(|uid, pod| {
                    let keep = listed.contains(uid);
                    if !keep {
                        let _ = pod.send(None);
                    }
                    keep
                });
            }
            Ok(Event::Delete(pod)) => {
                if let Some(worker) = pod.metadata.uid.as_ref().and_then(|u| pods.remove(u)) {
                    let _ = worker.send(None);
                }
            }
            Err(err) => tracing::debug!(node = %node.name, %err, "pod watch failed"),
        }
    }
}

fn apply(
    rt: &Arc<Runtime>,
    node: &Arc<NodeCtx>,
    pods: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    done: &HashSet<String>,
    pod: Pod,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if done.contains(&uid) {
        return;
    }
    if let Some(worker) = pods.get(&uid) {
        let _ = worker.send(Some(pod));
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return;
    }
    let (tx, rx) = watch::channel(Some(pod.clone()));
    pods.insert(uid, tx);
    tokio::spawn(pod::run(Arc::clone(rt), Arc::clone(node), pod, rx));
}
