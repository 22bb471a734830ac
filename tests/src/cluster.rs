//! A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler as child processes, with certificates and a kubeconfig made for the run.
//!
//! The control-plane binaries come from `scripts/kube.sh`, which builds them once and caches
//! them; [`ControlPlane::binaries`] finds them. Every process is killed when the
//! [`ControlPlane`] is dropped, also when a test panics.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::pki::{CertFiles, Pki, Usage};
use crate::wait;

/// The cluster's service range; its first address is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

/// One control-plane process, killed on drop.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, dir: &Path, mut command: Command) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        // Appending: a restarted process continues the log of the one before.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Process { name, child, log })
    }

    /// Fails if the process has exited, with the end of its log.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited ({status}):\n{}", self.name, tail(&self.log));
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL at once (a test's control plane has nothing to save), reaped within a bound.
        crate::harness::stop_child(&mut self.child, Duration::ZERO);
    }
}

/// The last lines of a log file, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A port the kernel just handed out on 127.0.0.1, for programs that cannot report the port
/// they bound themselves.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Options of a control plane.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--egress-selector-config-file` of kube-apiserver.
    pub egress_selector: Option<PathBuf>,
}

/// A running control plane.
pub struct ControlPlane {
    // Dropped in reverse start order: clients before the API server, etcd last.
    processes: Vec<Process>,
    /// kube-apiserver's binary and flags, without the egress selector (for restarts).
    apiserver: (PathBuf, Vec<String>),
    dir: tempfile::TempDir,
    pki: Pki,
    admin: CertFiles,
    /// The API server's URL.
    pub url: String,
    /// A kubeconfig with cluster-admin rights.
    pub kubeconfig: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(process) = self.processes.pop() {
            drop(process);
        }
    }
}

/// The control plane's binaries, as `scripts/kube.sh` builds them.
pub const CONTROL_PLANE_BINARIES: [&str; 3] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// A real node's binaries, built by `scripts/kube.sh` beside the control plane's from the same
/// source: kubelet and the pod sandbox's `pause`.
pub const NODE_BINARIES: [&str; 2] = ["kubelet", "pause"];

/// The directory holding the Kubernetes binaries `names`: `$CPLINK_KUBE_BIN`, else the
/// directory that `scripts/kube.sh` last built into (`$CPLINK_CACHE/kube-current`).
pub fn kube_binaries(names: &[&str]) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("CPLINK_KUBE_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => crate::workspace::cache()?.join("kube-current"),
    };
    for binary in names {
        anyhow::ensure!(
            dir.join(binary).is_file(),
            "{} not found: run scripts/kube.sh (or set CPLINK_KUBE_BIN)",
            dir.join(binary).display()
        );
    }
    Ok(dir)
}

impl ControlPlane {
    /// Where the control-plane binaries are (see [`kube_binaries`]).
    pub fn binaries() -> anyhow::Result<PathBuf> {
        kube_binaries(&CONTROL_PLANE_BINARIES)
    }

    /// Starts etcd and the control plane and waits until the API server is ready.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        crate::init_logs();
        let bin = Self::binaries()?;
        // Named for this process: a later run sweeps what a killed one left (`sweep`).
        let dir = tempfile::Builder::new()
            .prefix(&crate::sweep::dir_prefix("cluster"))
            .tempdir()?;
        let pki = Pki::new(dir.path(), "cluster")?;
        let serving = pki.issue(
            "kube-apiserver",
            &[
                "localhost",
                "127.0.0.1",
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            Usage::Server,
        )?;
        let admin = pki.issue_in_group("admin", Some("system:masters"), &[], Usage::Client)?;
        let kubelet_client = pki.issue_in_group(
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            &[],
            Usage::Client,
        )?;
        // The aggregation layer's identity towards extension API servers, from a CA of its
        // own, as kubeadm makes them.
        let front_proxy = Pki::new(dir.path(), "front-proxy")?;
        let front_proxy_client = front_proxy.issue("front-proxy-client", &[], Usage::Client)?;
        // Service account tokens are signed with an ECDSA key.
        let sa_key = dir.path().join("service-account.key");
        let sa_pub = dir.path().join("service-account.pub");
        let signing = rcgen::KeyPair::generate()?;
        std::fs::write(&sa_key, signing.serialize_pem())?;
        std::fs::write(&sa_pub, signing.public_key_pem())?;

        let mut processes = Vec::new();
        let etcd_port = free_port()?;
        let etcd_peer = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = Command::new("etcd");
        etcd.args([
            "--name",
            "cplink-e2e",
            "--data-dir",
            &path(&dir.path().join("etcd")),
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{etcd_peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{etcd_peer}"),
            "--initial-cluster",
            &format!("cplink-e2e=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync",
        ]);
        processes.push(Process::spawn("etcd", dir.path(), etcd)?);

        let port = free_port()?;
        let url = format!("https://127.0.0.1:{port}");
        let apiserver_args: Vec<String> = [
            "--etcd-servers",
            &etcd_url,
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            &port.to_string(),
            "--tls-cert-file",
            &path(&serving.cert),
            "--tls-private-key-file",
            &path(&serving.key),
            "--client-ca-file",
            &path(pki.ca_file()),
            "--kubelet-client-certificate",
            &path(&kubelet_client.cert),
            "--kubelet-client-key",
            &path(&kubelet_client.key),
            "--kubelet-certificate-authority",
            &path(pki.ca_file()),
            "--kubelet-preferred-address-types",
            "InternalIP",
            "--service-account-key-file",
            &path(&sa_pub),
            "--service-account-signing-key-file",
            &path(&sa_key),
            "--service-account-issuer",
            "https://kubernetes.default.svc",
            "--service-cluster-ip-range",
            SERVICE_CIDR,
            "--authorization-mode",
            "Node,RBAC",
            "--allow-privileged",
            "--profiling=false",
            // The aggregation layer: the front proxy's client certificate and the headers
            // it passes the user in.
            "--requestheader-client-ca-file",
            &path(front_proxy.ca_file()),
            "--requestheader-allowed-names",
            "front-proxy-client",
            "--requestheader-username-headers",
            "X-Remote-User",
            "--requestheader-group-headers",
            "X-Remote-Group",
            "--requestheader-extra-headers-prefix",
            "X-Remote-Extra-",
            "--proxy-client-cert-file",
            &path(&front_proxy_client.cert),
            "--proxy-client-key-file",
            &path(&front_proxy_client.key),
            // Webhooks and aggregated APIs addressed by a Service are dialed at one of its
            // endpoints (a pod) rather than its cluster IP: no kube-proxy answers cluster
            // IPs where kube-apiserver's egress leads (a real node's network).
            "--enable-aggregator-routing=true",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let apiserver = (bin.join("kube-apiserver"), apiserver_args);
        processes.push(Process::spawn(
            "kube-apiserver",
            dir.path(),
            apiserver_command(&apiserver, options.egress_selector.as_deref()),
        )?);

        let kubeconfig = dir.path().join("admin.kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url, pki.ca_file(), &admin))?;

        let mut plane = ControlPlane {
            processes,
            apiserver,
            dir,
            pki,
            admin,
            url,
            kubeconfig,
        };
        plane.wait_ready().await?;

        let kubeconfig = path(&plane.kubeconfig);
        // What kube-controller-manager and kube-scheduler share: the admin identity, and no
        // serving ports of their own.
        let client_flags = [
            "--kubeconfig",
            &kubeconfig,
            "--authentication-kubeconfig",
            &kubeconfig,
            "--authorization-kubeconfig",
            &kubeconfig,
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            "0",
            "--port",
            "0",
            "--leader-elect=false",
        ];
        let mut controller_manager = Command::new(bin.join("kube-controller-manager"));
        controller_manager.args(client_flags).args([
            "--service-account-private-key-file",
            &path(&sa_key),
            "--root-ca-file",
            &path(plane.pki.ca_file()),
            "--use-service-account-credentials=false",
            "--controllers",
            "*,-nodeipam,-cloud-node-lifecycle,-route,-service,-csrsigning,-csrapproving,-bootstrapsigner,-tokencleaner,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-ttl,-ttl-after-finished",
        ]);
        plane.processes.push(Process::spawn(
            "kube-controller-manager",
            plane.dir.path(),
            controller_manager,
        )?);
        let mut scheduler = Command::new(bin.join("kube-scheduler"));
        scheduler.args(client_flags);
        plane.processes.push(Process::spawn(
            "kube-scheduler",
            plane.dir.path(),
            scheduler,
        )?);
        plane.check_running()?;
        Ok(plane)
    }

    /// Restarts kube-apiserver on the same address with `--egress-selector-config-file`
    /// (or without, for `None`) and waits until it is ready: how an operator wires the
    /// apiserver to a tunnel.
    pub async fn restart_apiserver(
        &mut self,
        egress_selector: Option<&Path>,
    ) -> anyhow::Result<()> {
        let at = self
            .processes
            .iter()
            .position(|p| p.name == "kube-apiserver")
            .context("kube-apiserver is not running")?;
        // Killed and reaped before the new one binds the same port.
        crate::harness::stop_child(&mut self.processes[at].child, Duration::ZERO)
            .context("the old kube-apiserver could not be reaped")?;
        self.processes[at] = Process::spawn(
            "kube-apiserver",
            self.dir.path(),
            apiserver_command(&self.apiserver, egress_selector),
        )?;
        self.wait_ready().await
    }

    /// The process id of the control plane's `name` (`etcd`, `kube-apiserver`, ...).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.child.id())
    }

    /// Fails if any control-plane process has exited, with the end of its log.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for process in &mut self.processes {
            process.check_running()?;
        }
        Ok(())
    }

    /// Waits until `/readyz` answers `ok` (at most 60 s), failing early if a process exited.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            for process in &mut self.processes {
                process.check_running()?;
            }
            let output = self
                .kubectl(&["get", "--raw", "/readyz", "--request-timeout=5s"])
                .output()?;
            if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "ok" {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "kube-apiserver not ready after 60 s: {}\n{}",
                    String::from_utf8_lossy(&output.stderr).trim(),
                    tail(&self.processes[1].log)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A `kubectl` command with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        command
    }

    /// Runs `kubectl` and returns its standard output; fails with its standard error.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.kubectl(args).output().context("cannot run kubectl")?;
        anyhow::ensure!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    /// A kube client with cluster-admin rights.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }

    /// The cluster CA.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The admin client certificate.
    pub fn admin_cert(&self) -> &CertFiles {
        &self.admin
    }

    /// The run's private directory (logs, certificates, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of a component's log (`etcd`, `kube-apiserver`, ...), for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .map_or_else(|| format!("no process {name}"), |p| tail(&p.log))
    }

    /// Waits until `kubectl args...` succeeds and its output satisfies `check`.
    pub async fn wait_kubectl<F: FnMut(&str) -> bool>(
        &self,
        what: &str,
        deadline: Duration,
        args: &[&str],
        mut check: F,
    ) -> anyhow::Result<String> {
        let mut last = String::new();
        let result = wait::until(what, deadline, || match self.kubectl_ok(args) {
            Ok(out) => {
                let ok = check(&out);
                last = out;
                ok
            }
            Err(err) => {
                last = err.to_string();
                false
            }
        })
        .await;
        match result {
            Ok(()) => Ok(last),
            Err(err) => Err(err.context(format!("last `kubectl {}`: {last}", args.join(" ")))),
        }
    }
}

/// A kube client for a kubeconfig file, on the current runtime.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

fn apiserver_command(apiserver: &(PathBuf, Vec<String>), egress: Option<&Path>) -> Command {
    let mut command = Command::new(&apiserver.0);
    command.args(&apiserver.1);
    if let Some(egress) = egress {
        command.arg("--egress-selector-config-file").arg(egress);
    }
    command
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn kubeconfig_yaml(url: &str, ca: &Path, client: &CertFiles) -> String {
    let mut yaml = String::new();
    let _ = write!(
        yaml,
        "apiVersion: v1
kind: Config
clusters:
- name: cplink-e2e
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: cplink-e2e
  context:
    cluster: cplink-e2e
    user: admin
current-context: cplink-e2e
",
        ca = ca.display(),
        cert = client.cert.display(),
        key = client.key.display(),
    );
    yaml
}
