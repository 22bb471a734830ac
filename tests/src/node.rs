//! Real worker nodes on one machine: per node, kubelet v1.20.2 (from `scripts/kube.sh`) and a
//! private containerd with CRI, in network, mount and PID namespaces of their own.
//!
//! Layout, in ranges that cannot be mistaken for a real network (198.18.0.0/15, for
//! benchmarking): node `n` of network `k` has `198.18.k.(n+2)/24` on a veth into a host bridge
//! that has no address, and its pods `198.19.(16k+n).0/24` on a CNI bridge inside the node.
//! The host routes both ranges as unreachable, so kube-apiserver (on the host's loopback)
//! cannot reach nodes or pods, and nothing addressed to them leaves the machine. Kubelets and
//! pods reach kube-apiserver at its Service address (`10.0.0.1:443`), which a relay in this
//! process answers inside each node and forwards to the host's loopback. The network's edge
//! (`198.18.k.1`, a namespace of this process on the bridge) reaches nodes and pods the way a
//! load balancer in the nodes' network would.
//!
//! Each node's first process runs `unshare --net --mount --pid --fork --mount-proc` with
//! private binds over `/run`, `/var/lib` and `/var/log` (kubelet and containerd hard-code
//! paths there) and over the `/proc/sys` entries kubelet sets at start: copies of the host's
//! values, which kubelet rewrites instead of the host's (it refuses to start if it cannot).
//! Stopping the node kills that namespace, and with it every container; its cgroups, veth
//! and, for the network, the bridge and routes are removed after. Every name on the host
//! carries this process's id, so that a later run can sweep what a killed one left
//! ([`crate::sweep`]).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use crate::cluster::{ControlPlane, NODE_BINARIES, kube_binaries};
use crate::containerd::{self, Cri};
use crate::harness::stop_child;
use crate::netns::Netns;
use crate::pki::Usage;
use crate::sweep;

/// kube-apiserver's Service address, first of `cluster::SERVICE_CIDR`, and in its certificate.
pub const APISERVER_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// The `/proc/sys` entries kubelet sets at start; inside each node a file is bound over each,
/// so that kubelet writes the file and the host keeps its values.
pub const PROTECTED_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The host's values of [`PROTECTED_SYSCTLS`], to compare before and after nodes ran.
pub fn protected_sysctls() -> anyhow::Result<Vec<(String, String)>> {
    PROTECTED_SYSCTLS
        .iter()
        .map(|entry| {
            let value = std::fs::read_to_string(format!("/proc/sys/{entry}"))?;
            Ok((entry.to_string(), value.trim().to_owned()))
        })
        .collect()
}

/// How long a node's processes get to be gone once its namespace is killed.
const GONE: Duration = Duration::from_secs(15);

/// How long a node's namespaces get to be made.
const NAMESPACE: Duration = Duration::from_secs(10);

/// How long containerd inside a node gets to answer.
const CONTAINERD_START: Duration = Duration::from_secs(30);

/// Veths made by this process, numbered for their names.
static NEXT_VETH: AtomicU16 = AtomicU16::new(0);

/// The network indices a host may use: 16, each with a `/24` of nodes and a `/20` of pods.
const NETWORKS: u8 = 16;

/// The nodes a network has room for: a pod `/24` each in its `/20`.
pub const MAX_NODES: u8 = 16;

/// The host's side of the nodes' network: a bridge without address and unreachable routes for
/// the node and pod ranges; and the edge, a network namespace of this process on that bridge
/// (`198.18.k.1`) with routes to every node's pods, where a load balancer's forwarder and the
/// tests' probes connect from ([`Network::edge`]). Removed when dropped.
pub struct Network {
    index: u8,
    bridge: String,
    routes: Vec<String>,
    edge: Netns,
    edge_veth: String,
}

impl Network {
    /// Creates the bridge, the routes and the edge, in the first range no other network on
    /// the host uses. A network is claimed by its route, under the sweep's lock: the bridge,
    /// named for this process and the index, comes first, so that a sweep never takes the
    /// route of a network being made for its own.
    pub async fn create() -> anyhow::Result<Self> {
        let owner = std::process::id();
        let edge = Netns::create("cplink-edge")?;
        let claimed = {
            let _lock = sweep::lock()?;
            let mut claimed = None;
            let mut last_error = None;
            for index in 0..NETWORKS {
                let bridge = sweep::bridge(owner, index);
                // Taken by another network of this process.
                if let Err(err) = sweep::ip(&["link", "add", &bridge, "type", "bridge"]) {
                    last_error = Some(err);
                    continue;
                }
                match sweep::ip(&["route", "add", "unreachable", &sweep::node_range(index)]) {
                    Ok(()) => {
                        claimed = Some((index, bridge));
                        break;
                    }
                    Err(err) => {
                        last_error = Some(err);
                        sweep::ip(&["link", "del", &bridge])?;
                    }
                }
            }
            claimed.with_context(|| {
                format!(
                    "no free network among {NETWORKS} in 198.18.0.0/15; last error: {}",
                    last_error.map_or_else(String::new, |e| format!("{e:#}"))
                )
            })?
        };
        let (index, bridge) = claimed;
        let edge_veth = sweep::veth(owner, NEXT_VETH.fetch_add(1, Ordering::Relaxed) % 1000);
        let mut network = Network {
            index,
            bridge,
            routes: vec![sweep::node_range(index)],
            edge,
            edge_veth,
        };
        let pods = sweep::pod_range(index);
        sweep::ip(&["route", "add", "unreachable", &pods])?;
        network.routes.push(pods);
        sweep::ip(&["link", "set", &network.bridge, "up"])?;
        network.wire_edge().await?;
        Ok(network)
    }

    async fn wire_edge(&self) -> anyhow::Result<()> {
        let tid = self.edge.tid().to_string();
        sweep::ip(&[
            "link",
            "add",
            &self.edge_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &tid,
        ])?;
        sweep::ip(&["link", "set", &self.edge_veth, "master", &self.bridge, "up"])?;
        let address = format!("{}/24", Ipv4Addr::new(198, 18, self.index, 1));
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", &address, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
        ] {
            self.edge.command("ip", args).await?;
        }
        for n in 0..MAX_NODES {
            let via = self.node_ip(n).to_string();
            self.edge
                .command("ip", &["route", "add", &self.pod_cidr(n), "via", &via])
                .await?;
        }
        Ok(())
    }

    /// The address of node `n`.
    pub fn node_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, n + 2)
    }

    /// The pod range of node `n` (at most [`MAX_NODES`]).
    pub fn pod_cidr(&self, n: u8) -> String {
        format!("198.19.{}.0/24", u16::from(self.index) * 16 + u16::from(n))
    }

    /// The pod range of every node: `198.19.<16 k>.0/20`.
    pub fn pod_range(&self) -> String {
        sweep::pod_range(self.index)
    }

    /// The host bridge the nodes' veths join.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The routes this network added on the host.
    pub fn routes(&self) -> &[String] {
        &self.routes
    }

    /// The edge: connections opened there reach every node and pod.
    pub fn edge(&self) -> &Netns {
        &self.edge
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for route in &self.routes {
            if let Err(err) = sweep::ip(&["route", "del", "unreachable", route]) {
                tracing::warn!(%route, error = %format!("{err:#}"), "route left");
            }
        }
        // Goes with the edge's namespace too, once its thread and sockets are gone.
        let _ = sweep::ip(&["link", "del", &self.edge_veth]);
        if let Err(err) = sweep::ip(&["link", "del", &self.bridge]) {
            tracing::warn!(bridge = %self.bridge, error = %format!("{err:#}"), "bridge left");
        }
    }
}

/// A running node; stopped, with its containers, when dropped.
pub struct Node {
    name: String,
    ip: Ipv4Addr,
    pod_cidr: String,
    child: Child,
    dir: tempfile::TempDir,
    containerd: containerd::Client,
    cgroup_root: String,
    host_veth: String,
    relay: Option<Relay>,
    stopped: bool,
}

impl Node {
    /// Starts node `n` of `network`, registered with `plane`: containerd answers and the
    /// archives of `images` are imported when this returns; kubelet is starting (wait for the
    /// Node to be Ready with [`Node::wait_ready`]).
    pub async fn start(
        plane: &ControlPlane,
        network: &Network,
        n: u8,
        images: &[PathBuf],
    ) -> anyhow::Result<Self> {
        let kube = kube_binaries(&NODE_BINARIES)?;
        let name = format!("node-{n}");
        let ip = network.node_ip(n);
        let dir = tempfile::Builder::new()
            .prefix(&sweep::dir_prefix("node"))
            .tempdir()?;
        let d = dir.path();
        for sub in [
            "run",
            "var-lib",
            "var-log",
            "sysctl",
            "containerd",
            "volume-plugins",
            "kubelet-pki",
            "cni/net.d",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let dir_name = d
            .file_name()
            .context("a temporary directory has a name")?
            .to_string_lossy()
            .into_owned();
        let cgroup_root = format!("/{dir_name}");

        // Credentials: kubelet as `system:node:<name>`, serving its API with a certificate of
        // the cluster CA (kube-apiserver checks it) for the node's address.
        let pki = plane.pki();
        let serving = pki.issue(&name, &[&ip.to_string()], Usage::Server)?;
        let client = pki.issue_in_group(
            &format!("system:node:{name}"),
            Some("system:nodes"),
            &[],
            Usage::Client,
        )?;
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
                 server: https://{APISERVER_SERVICE_IP}:443\n    certificate-authority: {ca}\n\
                 users:\n- name: u\n  user:\n    client-certificate: {cert}\n    \
                 client-key: {key}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\n\
                 current-context: c\n",
                ca = pki.ca_file().display(),
                cert = client.cert.display(),
                key = client.key.display(),
            ),
        )?;
        let kubelet_config = d.join("kubelet.yaml");
        std::fs::write(
            &kubelet_config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{ip}"
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: AlwaysAllow}}
tlsCertFile: "{cert}"
tlsPrivateKeyFile: "{key}"
cgroupDriver: cgroupfs
cgroupRoot: "{cgroup_root}"
failSwapOn: false
makeIPTablesUtilChains: false
nodeStatusUpdateFrequency: 1s
serializeImagePulls: false
evictionHard: {{"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}}
# The images are imported, not pulled: image GC on a host disk other work fills would delete
# the pause image, and no pod could start again.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
                ca = pki.ca_file().display(),
                cert = serving.cert.display(),
                key = serving.key.display(),
            ),
        )?;
        std::fs::write(
            d.join("cni/net.d/10-cplink.conflist"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "cplink",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": network.pod_cidr(n) }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                    },
                }],
            }))?,
        )?;
        let containerd_dir = d.join("containerd");
        let containerd_config = containerd::write_config(
            &containerd_dir,
            &containerd::Options {
                cri: Some(Cri {
                    sandbox_image: crate::image::PAUSE_NAME.to_owned(),
                    stream_address: "127.0.0.1".to_owned(),
                    stream_port: 0,
                    cni_bin_dir: PathBuf::from("/usr/lib/cni"),
                    cni_conf_dir: d.join("cni/net.d"),
                }),
            },
        )?;
        crate::cgroups::create(&cgroup_root)?;

        let log = std::fs::File::create(d.join("node.log"))?;
        let socket = containerd_dir.join("containerd.sock");
        // The node's first process waits for the host to wire its network (a line on stdin),
        // then makes its mounts, starts containerd and becomes kubelet.
        let script = r#"set -eu
d=$1; kubelet=$2; shift 2
read -r go
mount --bind "$d/run" /run
mount --bind "$d/var-lib" /var/lib
mount --bind "$d/var-log" /var/log
for entry in $SYSCTLS; do
    copy="$d/sysctl/$(echo "$entry" | tr / _)"
    cat "/proc/sys/$entry" >"$copy"
    mount --bind "$copy" "/proc/sys/$entry"
done
containerd --config "$CONTAINERD_CONFIG" >"$d/containerd/containerd.log" 2>&1 &
exec "$kubelet" "$@" >"$d/kubelet.log" 2>&1
"#;
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--", "unshare"])
            .args(["--net", "--mount", "--pid", "--fork", "--kill-child"])
            .args(["--mount-proc", "--propagation", "private", "--"])
            .args(["sh", "-c", script, "sh"])
            .arg(d)
            .arg(kube.join("kubelet"))
            .arg(format!("--config={}", kubelet_config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                socket.display()
            ))
            .arg(format!("--containerd={}", socket.display()))
            .arg(format!("--node-ip={ip}"))
            .arg(format!("--hostname-override={name}"))
            .arg(format!(
                "--volume-plugin-dir={}",
                d.join("volume-plugins").display()
            ))
            .arg(format!("--cert-dir={}", d.join("kubelet-pki").display()))
            .arg("--v=1")
            .env("SYSCTLS", PROTECTED_SYSCTLS.join(" "))
            .env("CONTAINERD_CONFIG", &containerd_config)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = crate::harness::spawn_for_process_lifetime(command)
            .context("cannot start the node's namespaces")?;
        let stdin = child.stdin.take();
        let host_veth = sweep::veth(
            std::process::id(),
            NEXT_VETH.fetch_add(1, Ordering::Relaxed) % 1000,
        );
        let mut node = Node {
            name,
            ip,
            pod_cidr: network.pod_cidr(n),
            child,
            containerd: containerd::Client::new(&containerd_dir, &dir_name),
            cgroup_root: cgroup_root.clone(),
            host_veth,
            relay: None,
            stopped: false,
            dir,
        };
        node.wire(network, n, plane, stdin).await?;
        let Node {
            child, containerd, ..
        } = &mut node;
        containerd
            .wait_serving(CONTAINERD_START, || matches!(child.try_wait(), Ok(Some(_))))
            .await?;
        if let Ok(Some(status)) = node.child.try_wait() {
            anyhow::bail!("node {} exited ({status}): {}", node.name, node.log_tail());
        }
        for archive in images {
            node.containerd.import(archive).await?;
        }
        Ok(node)
    }

    /// Wires the node's network from the host (veth, addresses, routes, the API relay), then
    /// lets its first process go on.
    async fn wire(
        &mut self,
        network: &Network,
        n: u8,
        plane: &ControlPlane,
        stdin: Option<ChildStdin>,
    ) -> anyhow::Result<()> {
        // unshare made the network namespace for itself before forking the node's first
        // process, so its pid names the namespace.
        let pid = self.child.id().to_string();
        // Until setpriv has exec'd unshare and unshare has made the namespace, the pid still
        // names the host's.
        let host_netns = std::fs::read_link("/proc/self/ns/net")?;
        let node_netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        crate::wait::until("the node's network namespace", NAMESPACE, || {
            std::fs::read_link(&node_netns).is_ok_and(|ns| ns != host_netns)
        })
        .await
        .with_context(|| self.log_tail())?;
        // The peer is made in the node's namespace directly, as its `eth0`.
        sweep::ip(&[
            "link",
            "add",
            &self.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pid,
        ])?;
        sweep::ip(&[
            "link",
            "set",
            &self.host_veth,
            "master",
            network.bridge(),
            "up",
        ])?;
        let inside = |args: &[&str]| -> anyhow::Result<()> {
            run(Command::new("nsenter")
                .args(["--target", &pid, "--net", "--"])
                .args(args))
        };
        let cidr = format!("{}/24", self.ip);
        inside(&["ip", "link", "set", "lo", "up"])?;
        inside(&["ip", "addr", "add", &cidr, "dev", "eth0"])?;
        inside(&["ip", "link", "set", "eth0", "up"])?;
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{APISERVER_SERVICE_IP}/32"),
            "dev",
            "lo",
        ])?;
        inside(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        for other in (0..MAX_NODES).filter(|m| *m != n) {
            let via = network.node_ip(other).to_string();
            inside(&["ip", "route", "add", &network.pod_cidr(other), "via", &via])?;
        }
        self.relay = Some(relay(&pid, plane)?);
        let mut stdin = stdin.context("the node's stdin is piped")?;
        writeln!(stdin, "go").context("the node's first process is gone")?;
        Ok(())
    }

    /// Waits until the Node is registered, gives it its pod range (`spec.podCIDR`, which
    /// kubelet does not set and the agents read), and waits until it is Ready; `deadline`
    /// bounds the whole.
    pub async fn wait_ready(&self, plane: &ControlPlane, deadline: Duration) -> anyhow::Result<()> {
        let give_up = tokio::time::Instant::now() + deadline;
        let registered = plane
            .wait_kubectl(
                &format!("node {} to register", self.name),
                deadline,
                &["get", "node", &self.name, "-o", "jsonpath={.spec.podCIDR}"],
                |_| true,
            )
            .await
            .with_context(|| self.log_tail())?;
        if registered.is_empty() {
            let patch = serde_json::json!({
                "spec": { "podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr] },
            });
            plane.kubectl_ok(&["patch", "node", &self.name, "-p", &patch.to_string()])?;
        }
        let jsonpath = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
        plane
            .wait_kubectl(
                &format!("node {} to be Ready", self.name),
                give_up.saturating_duration_since(tokio::time::Instant::now()),
                &["get", "node", &self.name, "-o", jsonpath],
                |status| status == "True",
            )
            .await
            .with_context(|| self.log_tail())
            .map(drop)
    }

    /// The node's pod range.
    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ctr` against the node's containerd.
    pub fn containerd(&self) -> &containerd::Client {
        &self.containerd
    }

    /// The node's directory (configuration, logs, the private `/run`, `/var/lib`, `/var/log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cgroup under which kubelet puts the node's pods.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// The ends of kubelet's and containerd's logs, for error messages.
    pub fn log_tail(&self) -> String {
        let tail = |file: &str| {
            let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        // kubelet's errors and fatal errors (klog's `E`/`F` lines) say more than a goroutine
        // dump's last lines.
        let kubelet =
            std::fs::read_to_string(self.dir.path().join("kubelet.log")).unwrap_or_default();
        let errors: Vec<&str> = kubelet
            .lines()
            .filter(|line| {
                (line.starts_with('E') || line.starts_with('F') || line.starts_with("panic"))
                    && line.as_bytes().get(1).is_some_and(u8::is_ascii_digit)
                    || line.starts_with("panic")
            })
            .collect();
        format!(
            "{} node log:\n{}\nkubelet errors:\n{}\nkubelet log:\n{}\n{}",
            self.name,
            tail("node.log"),
            errors[errors.len().saturating_sub(10)..].join("\n"),
            tail("kubelet.log"),
            self.containerd.log_tail()
        )
    }

    /// Stops the node and removes what it made on the host. Dropping does the same, reporting
    /// failures as warnings only.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        drop(self.relay.take());
        // setpriv became unshare: SIGKILL to it kills the namespace's first process (the
        // parent-death signal of `--kill-child`), and the kernel kills the rest.
        stop_child(&mut self.child, Duration::ZERO);
        containerd::wait_gone(self.dir.path(), GONE)?;
        // The peer went with the namespace, taking this end with it; an error here is a veth
        // that was already gone.
        let _ = sweep::ip(&["link", "del", &self.host_veth]);
        // Containers of the killed namespace may take a moment longer to leave their cgroups.
        let give_up = std::time::Instant::now() + GONE;
        loop {
            match crate::cgroups::remove(&self.cgroup_root) {
                Ok(()) => return Ok(()),
                Err(err) if std::time::Instant::now() >= give_up => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(err) = self.teardown() {
            tracing::warn!(node = %self.name, error = %format!("{err:#}"), "node teardown incomplete");
        }
    }
}

/// The relay of a node's kube-apiserver Service address: a thread of its own with a runtime
/// of its own, so that a test blocking its runtime (on `kubectl`, say) never cuts kubelet
/// and pods off kube-apiserver. Stopped, and its thread joined, when dropped.
struct Relay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The runtime drops its connections as it ends: this returns at once.
            let _ = thread.join();
        }
    }
}

/// Answers `10.0.0.1:443` inside the network namespace of `pid` and forwards each connection
/// to kube-apiserver on the host's loopback.
fn relay(pid: &str, plane: &ControlPlane) -> anyhow::Result<Relay> {
    let upstream: std::net::SocketAddr = plane
        .url
        .strip_prefix("https://")
        .context("the API server's URL is https")?
        .parse()
        .context("the API server's URL is an address and port")?;
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    // A thread of its own enters the namespace to bind the listener and then ends: a
    // socket stays in the namespace it was made in, and no other thread changes namespace.
    let listener = std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let listener = std::net::TcpListener::bind((APISERVER_SERVICE_IP, 443))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the relay's binding thread panicked"))??;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("relay-{pid}"))
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::warn!(%err, "the relay cannot listen");
                        return;
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    () = forward(listener, upstream) => {}
                }
            });
        })?;
    Ok(Relay {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Accepts on `listener` and joins each connection to one made to `upstream`.
async fn forward(listener: tokio::net::TcpListener, upstream: std::net::SocketAddr) {
    loop {
        let mut inbound = match listener.accept().await {
            Ok((inbound, _)) => inbound,
            Err(err) => {
                // Out of descriptors, most likely: pause instead of spinning on it.
                tracing::warn!(%err, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?}: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
