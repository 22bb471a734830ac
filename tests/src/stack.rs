//! The whole product on one machine: a real control plane, real nodes ([`RealNodes`]: kubelet
//! and containerd, pods running cplink's image), cplink installed with its Helm chart (the
//! operator runs as a pod, with the chart's RBAC), a ControlPlaneLink, and kube-apiserver
//! sending its node and pod traffic through the tunnel. Shared by the end-to-end tests and
//! `make demo`; [`Stack::start`] starts it.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Secret;

use crate::cluster::{ControlPlane, Options};
use crate::forwarder::Forwarder;
use crate::helm::Helm;
use crate::metrics::counter;
use crate::nodes::RealNodes;
use crate::{image, workspace};

/// Namespace of the link and its children.
pub const NAMESPACE: &str = "cplink-system";
/// Name of the link.
pub const LINK: &str = "edge";
/// The frontend Service of the link (kube-apiserver's side).
pub const FRONTEND_SERVICE: &str = "edge-frontend";
/// The Helm release.
pub const RELEASE: &str = "cplink";
/// The operator's Deployment, as the chart names it for [`RELEASE`].
pub const OPERATOR: &str = "cplink";
/// The operator's replicas with the chart's defaults: a leader and a standby.
pub const OPERATOR_REPLICAS: usize = 2;
/// How long any single step may take.
pub const STEP: Duration = Duration::from_secs(90);

/// The user id cplink's servers and agents run as (the operator's `RUN_AS_USER`).
pub const POD_USER: u32 = 65532;

/// How kube-apiserver reaches the link's servers (the link's `spec.server.frontend.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// HTTP CONNECT over mutual TLS, through the forwarder to the frontend Service.
    HttpConnect,
    /// konnectivity gRPC over the server's Unix socket, in a directory of this run on the
    /// host ([`Stack::socket_dir`]), where the server's node and kube-apiserver both see it.
    Grpc,
}

impl Egress {
    /// The server's frontend kube-apiserver connects to in this mode, as the server's metrics
    /// label it (`cplink_server_frontend_connections_total{frontend=...}`).
    pub fn frontend(self) -> &'static str {
        match self {
            Egress::HttpConnect => "tls",
            Egress::Grpc => "grpc",
        }
    }
}

/// What crossed the tunnel so far, as the link's servers (summed over them) and agents count
/// it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TunnelCounts {
    /// Connections accepted by the frontend of the stack's egress mode.
    pub frontend: f64,
    /// Successful dials through the tunnel.
    pub dials: f64,
    /// Bytes from agents to the frontend.
    pub from_agents: f64,
    /// Successful dials of each node's agent, by node.
    pub agent_dials: BTreeMap<String, f64>,
}

impl TunnelCounts {
    /// Successful dials of the agent on `node`; fails if no agent runs there.
    pub fn agent_dials_on(&self, node: &str) -> anyhow::Result<f64> {
        self.agent_dials
            .get(node)
            .copied()
            .with_context(|| format!("no agent on {node}: {:?}", self.agent_dials))
    }

    /// Successful dials of every agent.
    pub fn all_agent_dials(&self) -> f64 {
        self.agent_dials.values().sum()
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Nodes.
    pub nodes: usize,
    /// Server replicas of the link.
    pub servers: u32,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            nodes: 3,
            servers: 1,
        }
    }
}

/// Everything running; dropped in order: the forwarder, the nodes and their pods (the
/// operator among them), then the control plane.
pub struct Stack {
    /// Helm for the control plane.
    pub helm: Helm,
    /// The load balancer in front of the link's frontend Service.
    pub forwarder: Forwarder,
    /// The nodes.
    pub nodes: RealNodes,
    /// The control plane.
    pub plane: ControlPlane,
    options: StackOptions,
    egress: Egress,
}

/// Chart values installing the operator from cplink's image ([`image::NAME`], never pulled),
/// plus `extra` top-level values (`("logging", json!({...}))`).
pub fn chart_values(extra: &[(&str, serde_json::Value)]) -> serde_json::Value {
    let (repository, tag) = image::NAME
        .rsplit_once(':')
        .expect("the image name has a tag");
    let mut values = serde_json::json!({
        "image": { "repository": repository, "tag": tag, "pullPolicy": "Never" },
    });
    for (key, value) in extra {
        values[*key] = value.clone();
    }
    values
}

/// Applies the ControlPlaneLink CRD from `crds/` and waits until the API server serves it.
pub async fn install_crd(plane: &ControlPlane) -> anyhow::Result<()> {
    let crd = workspace::root().join("crds/controlplanelinks.cplink.dev.yaml");
    plane.kubectl_ok(&["apply", "-f", &crd.display().to_string()])?;
    // Not `kubectl wait`: it fails outright while the new CRD has no conditions yet.
    plane
        .wait_kubectl(
            "the ControlPlaneLink CRD is established",
            STEP,
            &[
                "get",
                "crd/controlplanelinks.cplink.dev",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ],
            |out| out.trim() == "True",
        )
        .await?;
    Ok(())
}

impl Stack {
    /// Starts the control plane and `options.nodes` real nodes ([`RealNodes::start`]: the
    /// machine checked, earlier runs' leftovers swept, cplink's image imported into every
    /// node), installs the chart with the operator running from that image, and starts the
    /// forwarder for the link's frontend, which connects from the nodes' network; waits until
    /// the operator is ready. Agents find the servers in the cluster (pods reach pods; the
    /// host's loopback is out of their reach). Servers and agents run from the image too, as
    /// the operator's default. The link itself is applied by [`Stack::apply_link`].
    pub async fn start(options: StackOptions, egress: Egress) -> anyhow::Result<Self> {
        anyhow::ensure!(
            egress != Egress::Grpc || options.servers == 1,
            "GRPC mode runs one server: the nodes share the host's socket directory"
        );
        crate::nodes::preflight()?;
        let plane = ControlPlane::start(Options::default()).await?;
        let nodes = RealNodes::start(&plane, options.nodes).await?;
        let forwarder = Forwarder::start(
            &plane.kubeconfig,
            NAMESPACE,
            &[FRONTEND_SERVICE],
            nodes.network()?.edge().clone(),
        )
        .await?;
        let helm = Helm::new(&plane.kubeconfig)?;
        helm.install(NAMESPACE, RELEASE, &chart_values(&[]))?;
        let stack = Stack {
            helm,
            forwarder,
            nodes,
            plane,
            options,
            egress,
        };
        if stack.egress == Egress::Grpc {
            stack.prepare_socket_dir()?;
        }
        stack.wait_operator_ready().await?;
        Ok(stack)
    }

    /// Stops everything (the forwarder, the nodes with their pods, the control plane) and
    /// fails if this process left anything on the host: processes, mounts, cgroups, links,
    /// directories or the network's routes.
    pub fn stop_leaving_nothing(self) -> anyhow::Result<()> {
        let routes = self.nodes.network()?.routes().to_vec();
        drop(self);
        let left = crate::sweep::Leftovers::of(std::process::id())?;
        anyhow::ensure!(
            left.processes.is_empty()
                && left.mounts.is_empty()
                && left.cgroups.is_empty()
                && left.links.is_empty()
                && left.dirs.is_empty(),
            "left behind: {left}"
        );
        for route in routes {
            let shown = std::process::Command::new("ip")
                .args(["route", "show", &route])
                .output()?;
            anyhow::ensure!(shown.stdout.is_empty(), "route {route} left");
        }
        Ok(())
    }

    /// How kube-apiserver reaches the link's servers.
    pub fn egress(&self) -> Egress {
        self.egress
    }

    /// The link's `socketHostPath` in `GRPC` mode: a directory of this run, never a fixed
    /// system path.
    pub fn socket_dir(&self) -> PathBuf {
        self.plane.dir().join("frontend")
    }

    /// What a cluster operator does on a control-plane node before a GRPC-mode link: a
    /// directory the server's user may create its socket in (kubelet would create a missing one
    /// owned by root, where the unprivileged server cannot).
    fn prepare_socket_dir(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let dir = self.socket_dir();
        std::fs::DirBuilder::new().mode(0o750).create(&dir)?;
        std::os::unix::fs::chown(&dir, Some(POD_USER), Some(POD_USER))
            .with_context(|| format!("cannot hand {} to uid {POD_USER}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
        Ok(())
    }

    /// Waits until node proxy `healthz` answers `ok` through kube-apiserver for every one of
    /// `nodes` (after [`Stack::wire_egress`], through the tunnel).
    pub async fn wait_node_proxy(&self, nodes: &[String]) -> anyhow::Result<()> {
        for node in nodes {
            self.plane
                .wait_kubectl(
                    "node proxy through the tunnel",
                    STEP,
                    &[
                        "get",
                        "--raw",
                        &format!("/api/v1/nodes/{node}/proxy/healthz"),
                    ],
                    |out| out.trim() == "ok",
                )
                .await?;
        }
        Ok(())
    }

    /// Waits until the operator's Deployment has seen its current spec and has all its
    /// replicas ready on it (the leader and the standbys), and no other pod.
    pub async fn wait_operator_ready(&self) -> anyhow::Result<()> {
        self.plane
            .wait_kubectl(
                "the operator to be ready",
                STEP,
                &[
                    "get",
                    "deployment",
                    OPERATOR,
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.metadata.generation}/{.status.observedGeneration} \
                     {.spec.replicas} \
                     {.status.updatedReplicas}/{.status.readyReplicas}/{.status.replicas}",
                ],
                |out| {
                    let fields: Vec<&str> = out.split(' ').collect();
                    let [generations, wanted, replicas] = fields[..] else {
                        return false;
                    };
                    let (generation, observed) = generations.split_once('/').unwrap_or_default();
                    generation == observed && replicas == format!("{wanted}/{wanted}/{wanted}")
                },
            )
            .await
            .with_context(|| self.diagnostics())
            .map(drop)
    }

    /// The ControlPlaneLink: the options' server count and frontend mode, the frontend
    /// Service reached through the forwarder, agents finding the servers in the cluster, the
    /// nodes' range as the pod range.
    pub fn link_yaml(&self) -> String {
        let mode = match self.egress {
            Egress::HttpConnect => String::new(),
            // A GRPC-mode link also asks for the pass-through selections, so that the real
            // kube-apiserver reads a file with all three names.
            Egress::Grpc => format!(
                "      mode: GRPC\n      socketHostPath: \"{}\"\n      directEgress: [etcd, controlplane]\n",
                self.socket_dir().display()
            ),
        };
        format!(
            "apiVersion: cplink.dev/v1alpha1
kind: ControlPlaneLink
metadata:
  name: {LINK}
  namespace: {NAMESPACE}
spec:
  server:
    replicas: {servers}
    frontend:
{mode}      externalAddress: \"{frontend}\"
  network:
    podCIDRs: [\"{range}\"]
",
            servers = self.options.servers,
            frontend = self.forwarder.address(FRONTEND_SERVICE),
            range = self.nodes.range(),
        )
    }

    /// Applies `yaml` with `kubectl apply`.
    pub fn apply(&self, name: &str, yaml: &str) -> anyhow::Result<String> {
        let file = self.plane.dir().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        self.plane
            .kubectl_ok(&["apply", "-f", &file.display().to_string()])
    }

    /// Merge-patches the link with `patch` (JSON).
    pub fn patch_link(&self, patch: &str) -> anyhow::Result<String> {
        self.plane.kubectl_ok(&[
            "patch",
            "controlplanelink",
            LINK,
            "-n",
            NAMESPACE,
            "--type=merge",
            "-p",
            patch,
        ])
    }

    /// The link's fields selected by a kubectl `jsonpath` template.
    pub fn link_jsonpath(&self, template: &str) -> anyhow::Result<String> {
        self.plane.kubectl_ok(&[
            "get",
            "controlplanelink",
            LINK,
            "-n",
            NAMESPACE,
            "-o",
            &format!("jsonpath={template}"),
        ])
    }

    /// Applies the link.
    pub fn apply_link(&self) -> anyhow::Result<()> {
        self.apply("link", &self.link_yaml()).map(drop)
    }

    /// Waits until `kubectl get controlplanelinks` shows the link ready with every server and
    /// agent; returns the table.
    pub async fn wait_link_ready(&self) -> anyhow::Result<String> {
        let servers = format!("{0}/{0}", self.options.servers);
        let agents = format!("{0}/{0}", self.options.nodes);
        self.plane
            .wait_kubectl(
                "the link to be ready",
                STEP,
                &["get", "controlplanelinks", "-n", NAMESPACE],
                |table| {
                    table.lines().skip(1).any(|row| {
                        let cells: Vec<&str> = row.split_whitespace().collect();
                        cells.get(..4) == Some(&[LINK, "True", &servers, &agents])
                    })
                },
            )
            .await
            .with_context(|| self.diagnostics())
    }

    /// Restarts kube-apiserver with the egress selector configuration the operator wrote into
    /// the link's egress Secret, its certificate files next to it (`HTTPConnect` mode reads
    /// them; in `GRPC` mode the file names the server's socket and they go unused).
    pub async fn wire_egress(&mut self) -> anyhow::Result<PathBuf> {
        let secrets: kube::Api<Secret> =
            kube::Api::namespaced(self.plane.client().await?, NAMESPACE);
        let secret = secrets.get(&format!("{LINK}-apiserver-egress")).await?;
        let data = secret.data.unwrap_or_default();
        let dir = self.plane.dir().join("egress");
        std::fs::create_dir_all(&dir)?;
        let mut config = None;
        for (key, value) in data {
            if key.ends_with(".yaml") {
                config = Some(String::from_utf8(value.0)?);
            } else {
                std::fs::write(dir.join(&key), value.0)?;
            }
        }
        let config = config.context("the egress Secret holds no configuration")?;
        // Where a cluster operator would copy the files, /etc/kubernetes/cplink, is this
        // run's private directory here.
        let config = config.replace("/etc/kubernetes/cplink/", &format!("{}/", dir.display()));
        let file = dir.join("egress-selector-configuration.yaml");
        std::fs::write(&file, config)?;
        self.plane.restart_apiserver(Some(&file)).await?;
        Ok(file)
    }

    /// Pods of the link's component (`server` or `agent`), as (name, node, pod IP).
    pub fn pods(&self, component: &str) -> anyhow::Result<Vec<(String, String, String)>> {
        let out = self.plane.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut cells = line.split_whitespace().map(str::to_owned);
                Some((
                    cells.next()?,
                    cells.next()?,
                    cells.next().unwrap_or_default(),
                ))
            })
            .collect())
    }

    /// The end of each component's log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let kubectl = |args: &[&str]| {
            self.plane
                .kubectl_ok(args)
                .unwrap_or_else(|e| format!("{e:#}"))
        };
        let pods = kubectl(&["get", "pods", "-A", "-o", "wide"]);
        let link = kubectl(&[
            "get",
            "cpl",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}: {.status}{\"\\n\"}{end}",
        ]);
        let events = kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
        // Every replica's: the leader's and the standbys'.
        let operator = kubectl(&[
            "logs",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=operator",
            "--prefix",
            "--tail=20",
        ]);
        format!(
            "pods:\n{pods}\nlinks:\n{link}\nevents:\n{events}\n\
             operator log:\n{operator}\nkube-scheduler:\n{}\nkube-apiserver:\n{}\n{}",
            self.plane.log_tail("kube-scheduler"),
            self.plane.log_tail("kube-apiserver"),
            self.nodes_diagnostics()
        )
    }

    /// What the nodes know that the API does not say: container logs of the link's
    /// namespace and the kubelets' logs, read from the nodes' disks.
    fn nodes_diagnostics(&self) -> String {
        let kubelets: Vec<String> = self
            .nodes
            .nodes()
            .iter()
            .map(|node| node.log_tail())
            .collect();
        format!(
            "container logs of {NAMESPACE}:\n{}\n{}",
            self.nodes.container_logs(NAMESPACE),
            kubelets.join("\n")
        )
    }

    /// What the link's servers and agents have counted so far, read from their admin
    /// endpoints.
    pub async fn tunnel_counts(&self) -> anyhow::Result<TunnelCounts> {
        use cplink_operator::resources::{
            daemonset::AGENT_ADMIN_PORT, deployment::SERVER_ADMIN_PORT,
        };
        let mut counts = TunnelCounts::default();
        for (_, _, ip) in self.pods("server")? {
            let address = SocketAddr::new(ip.parse()?, u16::try_from(SERVER_ADMIN_PORT)?);
            let metrics = self.admin_get(address, "/metrics").await?;
            counts.dials += counter(&metrics, "cplink_server_dials_total", "result=\"ok\"");
            counts.frontend += counter(
                &metrics,
                "cplink_server_frontend_connections_total",
                &format!("frontend=\"{}\"", self.egress.frontend()),
            );
            counts.from_agents += counter(
                &metrics,
                "cplink_server_tunnel_bytes_total",
                "direction=\"from_agent\"",
            );
        }
        for (_, node, ip) in self.pods("agent")? {
            let address = SocketAddr::new(ip.parse()?, u16::try_from(AGENT_ADMIN_PORT)?);
            let metrics = self.admin_get(address, "/metrics").await?;
            *counts.agent_dials.entry(node).or_default() +=
                counter(&metrics, "cplink_agent_dials_total", "result=\"ok\"");
        }
        Ok(counts)
    }

    /// `GET path` of a pod's admin endpoint at `address` (`/metrics`, `/readyz`), connecting
    /// from where the nodes' pods are reachable; the body of a 200.
    pub async fn admin_get(&self, address: SocketAddr, path: &str) -> anyhow::Result<String> {
        let edge = self.nodes.network()?.edge();
        let stream = tokio::time::timeout(Duration::from_secs(5), edge.connect(address))
            .await
            .with_context(|| format!("connecting to {address} timed out"))?
            .with_context(|| format!("cannot connect to {address}"))?;
        crate::http1::get_on(stream, address, path).await
    }
}

/// `kubectl logs -f` (or any long-running `kubectl`), its output lines collected as they
/// arrive with the time each arrived; killed when dropped.
pub struct Follow {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Follow {
    /// Starts `kubectl args...` against the stack's control plane.
    pub fn start(stack: &Stack, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = stack
            .plane
            .kubectl(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock()
                    .expect("follow output")
                    .push((Instant::now(), line));
            }
        });
        Ok(Follow { child, lines })
    }

    /// Whether some line contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        self.lines
            .lock()
            .expect("follow output")
            .iter()
            .any(|(_, line)| line.contains(text))
    }

    /// How many lines arrived before `at`.
    pub fn lines_before(&self, at: Instant) -> usize {
        self.lines
            .lock()
            .expect("follow output")
            .iter()
            .take_while(|(arrived, _)| *arrived < at)
            .count()
    }

    /// When the last line arrived.
    pub fn last_line_at(&self) -> Option<Instant> {
        self.lines
            .lock()
            .expect("follow output")
            .last()
            .map(|(at, _)| *at)
    }

    /// The exit status, once `kubectl` has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Ends `kubectl` (SIGTERM, as Ctrl-C would, then SIGKILL after `grace`); its exit
    /// status, or `None` if it could not be reaped.
    pub fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        crate::harness::stop_child(&mut self.child, grace)
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        // Its reader thread ends with the pipe, once kubectl is gone.
        crate::harness::stop_child(&mut self.child, Duration::ZERO);
    }
}
