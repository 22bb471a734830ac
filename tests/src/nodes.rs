//! A cluster of real worker nodes: the control plane on the host's loopback and N nodes
//! ([`crate::node`]) on one network, started in parallel, each with the images of the run
//! imported (cplink's own, the pod sandbox's `pause`, a busybox shell and the test backends).
//!
//! Before anything starts, [`preflight`] checks that the machine can run nodes at all (root,
//! the commands, writable cgroup hierarchies, namespaces) and fails naming what is missing,
//! and [`crate::sweep`] removes what earlier, interrupted runs left. Dropping the nodes stops
//! them and sweeps again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

use crate::cluster::{self, ControlPlane};
use crate::image::{self, Image, Spec};
use crate::node::{self, Network, Node};
use crate::sweep;

/// The nodes a cluster has unless told otherwise.
pub const DEFAULT_NODES: usize = 3;

/// How long the nodes get to be Ready once started.
const READY: Duration = Duration::from_secs(120);

/// How long the namespace check may take.
const PROBE: Duration = Duration::from_secs(10);

/// The commands a node runs, with the Debian package that has each.
const COMMANDS: [(&str, &str); 10] = [
    ("unshare", "util-linux"),
    ("setpriv", "util-linux"),
    ("nsenter", "util-linux"),
    ("mount", "mount"),
    ("ip", "iproute2"),
    ("sysctl", "procps"),
    ("containerd", "containerd (scripts/kube.sh installs it)"),
    (
        "containerd-shim-runc-v2",
        "containerd (scripts/kube.sh installs it)",
    ),
    ("runc", "runc (scripts/kube.sh installs it)"),
    ("ctr", "containerd (scripts/kube.sh installs it)"),
];

/// Where the CNI plugins the nodes use are, and which.
const CNI_DIR: &str = "/usr/lib/cni";
const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];

/// The images every node holds: what pods run and the pod sandbox.
pub struct Images {
    /// cplink's image ([`image::NAME`]), of this build's binaries.
    pub cplink: Image,
    /// The pod sandbox ([`image::PAUSE_NAME`]).
    pub pause: Image,
    /// A busybox shell ([`image::BUSYBOX_NAME`]), for test pods.
    pub busybox: Image,
    /// The test backends ([`image::FIXTURE_NAME`]).
    pub fixture: Image,
}

impl Images {
    /// The archives, in the order nodes import them.
    pub fn archives(&self) -> Vec<PathBuf> {
        [&self.pause, &self.busybox, &self.fixture, &self.cplink]
            .iter()
            .map(|image| image.archive.clone())
            .collect()
    }
}

/// The images of this run, built (or found in the cache) on first use.
pub fn images() -> anyhow::Result<Arc<Images>> {
    static BUILT: Mutex<Option<Arc<Images>>> = Mutex::new(None);
    let mut built = BUILT
        .lock()
        .map_err(|_| anyhow::anyhow!("an image build panicked"))?;
    if let Some(images) = &*built {
        return Ok(Arc::clone(images));
    }
    let kube = cluster::kube_binaries(&cluster::NODE_BINARIES)?;
    let bin_dir = crate::binaries::bin_dir()?;
    let images = Arc::new(Images {
        cplink: image::build(&bin_dir)?,
        fixture: Spec::fixture(&bin_dir)?.build()?,
        pause: Spec::pause(&kube)?.build()?,
        busybox: Spec::busybox()?.build()?,
    });
    *built = Some(Arc::clone(&images));
    Ok(images)
}

/// Checks, once per process, that this machine can run real nodes; the error names what is
/// missing.
pub fn preflight() -> anyhow::Result<()> {
    static PASSED: Mutex<bool> = Mutex::new(false);
    let mut passed = PASSED
        .lock()
        .map_err(|_| anyhow::anyhow!("a preflight check panicked"))?;
    if !*passed {
        check_machine().context("this machine cannot run real Kubernetes nodes")?;
        *passed = true;
    }
    Ok(())
}

fn check_machine() -> anyhow::Result<()> {
    let uid = nix::unistd::geteuid();
    anyhow::ensure!(
        uid.is_root(),
        "not root (uid {uid}): nodes need root for their namespaces, veths, routes, mounts and \
         cgroups"
    );
    let missing = missing_commands(std::env::var_os("PATH").as_deref());
    anyhow::ensure!(
        missing.is_empty(),
        "commands missing from PATH: {}",
        missing.join(", ")
    );
    let missing: Vec<&str> = CNI_PLUGINS
        .iter()
        .copied()
        .filter(|plugin| !Path::new(CNI_DIR).join(plugin).is_file())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "CNI plugins missing from {CNI_DIR}: {} (from containernetworking-plugins; \
         scripts/kube.sh installs it)",
        missing.join(", ")
    );
    cluster::kube_binaries(&cluster::NODE_BINARIES)?;
    check_cgroups()?;
    check_namespaces()
}

/// The [`COMMANDS`] not found in the directories of `path` (a `PATH` value), each named
/// with the package that has it.
fn missing_commands(path: Option<&std::ffi::OsStr>) -> Vec<String> {
    let dirs: Vec<PathBuf> = path
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    COMMANDS
        .iter()
        .filter(|(command, _)| !dirs.iter().any(|dir| dir.join(command).is_file()))
        .map(|(command, package)| format!("{command} (from {package})"))
        .collect()
}

/// Every cgroup hierarchy takes a new cgroup (named like a node's, so that a sweep of a
/// killed run finds a leftover probe).
fn check_cgroups() -> anyhow::Result<()> {
    let hierarchies = crate::cgroups::hierarchies()?;
    anyhow::ensure!(
        !hierarchies.is_empty(),
        "no cgroup hierarchy is mounted (kubelet and runc need /sys/fs/cgroup)"
    );
    let probe = format!("{}probe", sweep::dir_prefix("node"));
    let created = crate::cgroups::create(&probe);
    let removed = crate::cgroups::remove(&probe);
    created.with_context(|| {
        format!(
            "cannot create a cgroup in every hierarchy of {}: nodes need writable cgroups \
             (in a container: cgroup v2 with delegation, or the hierarchies mounted read-write)",
            hierarchies
                .iter()
                .map(|h| h.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    removed
}

/// `unshare` can make the namespaces a node runs in, within [`PROBE`].
fn check_namespaces() -> anyhow::Result<()> {
    let mut child = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "true",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run unshare")?;
    let give_up = std::time::Instant::now() + PROBE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() >= give_up {
            crate::harness::stop_child(&mut child, Duration::ZERO);
            anyhow::bail!("`unshare --net --mount --pid` did not finish within {PROBE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read as _;
        let _ = pipe.read_to_string(&mut stderr);
    }
    anyhow::ensure!(
        status.success(),
        "cannot make network, mount and PID namespaces (`unshare --net --mount --pid --fork \
         --mount-proc true`: {status}): {}",
        stderr.trim()
    );
    Ok(())
}

/// N real worker nodes on one network; stopped, and what killed runs left swept, when
/// dropped.
pub struct RealNodes {
    nodes: Vec<Node>,
    network: Option<Network>,
}

impl RealNodes {
    /// Checks the machine, sweeps what earlier runs left, builds the run's images, and starts
    /// `count` nodes in parallel, registered with `plane`; returns once every node is Ready.
    pub async fn start(plane: &ControlPlane, count: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=usize::from(node::MAX_NODES)).contains(&count),
            "between 1 and {} nodes, not {count}",
            node::MAX_NODES
        );
        preflight()?;
        let swept = sweep::sweep()?;
        if !swept.is_empty() {
            println!("swept what earlier runs left: {swept}");
        }
        let archives = images()?.archives();
        let network = Network::create().await?;
        let starting = (0..count).map(|n| {
            let n = u8::try_from(n).expect("at most MAX_NODES nodes, checked above");
            let (network, archives) = (&network, &archives);
            async move {
                Node::start(plane, network, n, archives)
                    .await
                    .with_context(|| format!("starting node-{n}"))
            }
        });
        // Nodes already started are stopped if another fails: they drop with the join.
        let started = futures_util::future::try_join_all(starting).await?;
        let nodes = RealNodes {
            nodes: started,
            network: Some(network),
        };
        futures_util::future::try_join_all(
            nodes.nodes.iter().map(|node| node.wait_ready(plane, READY)),
        )
        .await?;
        Ok(nodes)
    }

    /// The nodes, `node-0` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes' names.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name().to_owned()).collect()
    }

    /// The network the nodes are on.
    pub fn network(&self) -> anyhow::Result<&Network> {
        self.network.as_ref().context("the nodes were stopped")
    }

    /// The pod range of every node.
    pub fn range(&self) -> String {
        self.network
            .as_ref()
            .map_or_else(String::new, Network::pod_range)
    }

    /// The last lines of every container log of `namespace` on the nodes, read from their
    /// disks (so they can be read while kube-apiserver cannot reach the kubelets).
    pub fn container_logs(&self, namespace: &str) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let pods = node.dir().join("var-log/pods");
            let Ok(entries) = std::fs::read_dir(&pods) else {
                continue;
            };
            for pod in entries.flatten() {
                let name = pod.file_name().to_string_lossy().into_owned();
                if !name.starts_with(&format!("{namespace}_")) {
                    continue;
                }
                for container in std::fs::read_dir(pod.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    for log in std::fs::read_dir(container.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        out.push_str(&format!(
                            "--- {} {name}/{}/{}:\n{}\n",
                            node.name(),
                            container.file_name().to_string_lossy(),
                            log.file_name().to_string_lossy(),
                            lines[lines.len().saturating_sub(15)..].join("\n")
                        ));
                    }
                }
            }
        }
        out
    }

    /// Every log line the containers of pod `namespace/name` wrote, in kubelet's files on the
    /// nodes' disks (readable while kube-apiserver cannot reach the kubelets).
    pub fn pod_log(&self, namespace: &str, name: &str) -> String {
        let prefix = format!("{namespace}_{name}_");
        let mut out = String::new();
        for node in &self.nodes {
            let pods = std::fs::read_dir(node.dir().join("var-log/pods"));
            for pod in pods.into_iter().flatten().flatten() {
                if !pod.file_name().to_string_lossy().starts_with(&prefix) {
                    continue;
                }
                let containers = std::fs::read_dir(pod.path());
                for container in containers.into_iter().flatten().flatten() {
                    let logs = std::fs::read_dir(container.path());
                    for log in logs.into_iter().flatten().flatten() {
                        out.push_str(&std::fs::read_to_string(log.path()).unwrap_or_default());
                    }
                }
            }
        }
        out
    }

    /// Keeps the containers of pod `namespace/name` on `node` from running, as a process that
    /// dies at every start would: kills each (SIGKILL) as soon as containerd runs it, until
    /// the returned guard is dropped. kubelet meanwhile restarts them with its back-off
    /// (`CrashLoopBackOff`).
    pub fn crash_loop(&self, node: &str, namespace: &str, name: &str) -> anyhow::Result<CrashLoop> {
        let containerd = self
            .nodes
            .iter()
            .find(|n| n.name() == node)
            .with_context(|| format!("no node {node}"))?
            .containerd()
            .clone();
        // The pod's containers, not its sandbox: killing that would make kubelet recreate
        // the whole pod.
        let filter = format!(
            "labels.\"io.kubernetes.pod.namespace\"=={namespace},\
             labels.\"io.kubernetes.pod.name\"=={name},\
             labels.\"io.cri-containerd.kind\"==container"
        );
        let kills = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let killed = Arc::clone(&kills);
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(10);
            loop {
                let ids = containerd
                    .ctr_ok(&["containers", "list", "--quiet", &filter])
                    .await
                    .unwrap_or_default();
                for id in ids.split_whitespace() {
                    // Fails when the container has no running task.
                    if containerd
                        .ctr_ok(&["tasks", "kill", "--signal", "SIGKILL", id])
                        .await
                        .is_ok()
                    {
                        killed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        });
        Ok(CrashLoop {
            kills,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        })
    }

    /// How many containers of `image` run on the nodes right now.
    pub async fn running(&self, image: &str) -> anyhow::Result<usize> {
        let mut running = 0;
        for node in &self.nodes {
            let images = node.containerd().running_images().await?;
            running += images.iter().filter(|name| *name == image).count();
        }
        Ok(running)
    }

    /// Stops the nodes and removes the network; errors name what was left.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for node in self.nodes.drain(..) {
            let name = node.name().to_owned();
            if let Err(err) = node.stop() {
                failed.push(format!("{name}: {err:#}"));
            }
        }
        drop(self.network.take());
        if let Err(err) = sweep::sweep() {
            failed.push(format!("{err:#}"));
        }
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }
}

impl Drop for RealNodes {
    fn drop(&mut self) {
        if let Err(err) = self.teardown() {
            tracing::warn!(error = %format!("{err:#}"), "real nodes' teardown incomplete");
        }
    }
}

/// Containers kept from running by [`RealNodes::crash_loop`]; they may run again once this
/// is dropped.
pub struct CrashLoop {
    kills: Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl CrashLoop {
    /// How many running containers were killed so far.
    pub fn kills(&self) -> usize {
        self.kills.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A control plane and its real nodes; dropped nodes first.
pub struct RealCluster {
    /// The worker nodes.
    pub nodes: RealNodes,
    /// The control plane.
    pub plane: ControlPlane,
}

impl RealCluster {
    /// Starts the control plane and `count` nodes ([`RealNodes::start`]).
    pub async fn start(count: usize) -> anyhow::Result<Self> {
        // Before the control plane starts: a machine that cannot run nodes fails at once.
        preflight()?;
        let plane = ControlPlane::start(cluster::Options::default()).await?;
        let nodes = RealNodes::start(&plane, count).await?;
        Ok(RealCluster { nodes, plane })
    }

    /// Runs a busybox pod `name` on `node` in the default namespace, running `command` with
    /// `sh -c`, and waits until it runs; returns its IP.
    pub async fn run_shell_pod(
        &self,
        name: &str,
        node: &str,
        command: &str,
    ) -> anyhow::Result<String> {
        run_shell_pod(&self.plane, name, node, command).await
    }
}

/// Runs a busybox pod `name` on `node` in the default namespace, running `command` with
/// `sh -c`, and waits until it runs; returns its IP.
pub async fn run_shell_pod(
    plane: &ControlPlane,
    name: &str,
    node: &str,
    command: &str,
) -> anyhow::Result<String> {
    run_pod(plane, &shell_pod(name, node, command)).await
}

/// The manifest of a busybox pod `name` on `node` in the default namespace, running
/// `command` with `sh -c` as its container `shell`.
pub fn shell_pod(name: &str, node: &str, command: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "shell",
                "image": image::BUSYBOX_NAME,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", command],
            }],
        },
    })
}

/// Applies the pod `manifest` and waits until it runs and is ready; returns its IP.
pub async fn run_pod(plane: &ControlPlane, manifest: &serde_json::Value) -> anyhow::Result<String> {
    let name = manifest["metadata"]["name"]
        .as_str()
        .context("the pod has no name")?;
    let namespace = manifest["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let node = manifest["spec"]["nodeName"].as_str().unwrap_or("any node");
    let file = plane.dir().join(format!("pod-{namespace}-{name}.json"));
    std::fs::write(&file, serde_json::to_vec(manifest)?)?;
    plane.kubectl_ok(&["apply", "-f", &file.to_string_lossy()])?;
    let running = plane
        .wait_kubectl(
            &format!("pod {name} to run on {node} and be ready"),
            Duration::from_secs(90),
            &[
                "get",
                "pod",
                name,
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.phase} \
                 {.status.conditions[?(@.type==\"Ready\")].status} {.status.podIP}",
            ],
            |out| out.starts_with("Running True "),
        )
        .await?;
    Ok(running
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_commands_are_named_with_their_package() {
        let empty = tempfile::tempdir().unwrap();
        let missing = missing_commands(Some(empty.path().as_os_str()));
        assert_eq!(missing.len(), COMMANDS.len(), "{missing:?}");
        assert!(
            missing.contains(&"runc (from runc (scripts/kube.sh installs it))".to_owned()),
            "{missing:?}"
        );
        assert_eq!(missing_commands(None).len(), COMMANDS.len());
        std::fs::write(empty.path().join("ip"), "").unwrap();
        let missing = missing_commands(Some(empty.path().as_os_str()));
        assert!(!missing.iter().any(|m| m.starts_with("ip ")), "{missing:?}");
    }
}
