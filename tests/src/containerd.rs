//! A private containerd: its own root, state, socket and configuration in a temporary
//! directory, inside mount and PID namespaces of its own, so that several can run beside each
//! other and none leaves anything on the host.
//!
//! containerd runs as the first process of a new PID namespace (`unshare --pid --fork`), with
//! `/proc` mounted for that namespace and a directory of its own bound over `/run` (where
//! runc's shims put their sockets whatever the configuration says). Stopping it kills the
//! namespace: the kernel kills every shim and container process in it, and the mount namespace
//! goes with its last process. Containers run with `ctr run` get cgroups under a parent named
//! for this containerd, removed on stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::harness::stop_child;
use crate::wait;

/// The containerd namespace the tests use: kubelet's (CRI's), so that images imported here are
/// the ones a kubelet on this containerd sees.
pub const NAMESPACE: &str = "k8s.io";

/// How long containerd gets to answer on its socket after it starts.
const START: Duration = Duration::from_secs(30);

/// How long a `ctr` command may take.
const CTR: Duration = Duration::from_secs(60);

/// How long the namespace's processes get to be gone after containerd is killed.
const GONE: Duration = Duration::from_secs(10);

/// What the containerd serves besides its own API.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Kubernetes' container runtime interface (CRI), for a kubelet; off when `None`.
    pub cri: Option<Cri>,
}

/// Settings of containerd's CRI plugin.
#[derive(Debug, Clone)]
pub struct Cri {
    /// The pod sandbox image (imported beforehand: a missing one would be pulled).
    pub sandbox_image: String,
    /// The address of the streaming server (`exec`, `attach`, `port-forward`).
    pub stream_address: String,
    /// The streaming server's port: one per containerd where several share an address.
    pub stream_port: u16,
    /// The CNI plugins' directory.
    pub cni_bin_dir: PathBuf,
    /// The CNI network configuration directory.
    pub cni_conf_dir: PathBuf,
}

/// A running private containerd; stopped, with everything it started, when dropped.
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    client: Client,
    stopped: bool,
}

impl Containerd {
    /// Starts containerd and waits until it answers on its socket.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&crate::sweep::dir_prefix("containerd"))
            .tempdir()?;
        std::fs::create_dir(dir.path().join("run"))?;
        let config = write_config(dir.path(), &options)?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let dir_name = dir
            .path()
            .file_name()
            .context("a temporary directory has a name")?
            .to_string_lossy()
            .into_owned();
        // `--pdeathsig`: should the test process die, unshare dies with it (the signal follows
        // the thread that spawned it, hence the spawner thread); `--kill-child`: should unshare
        // die, the namespace goes too.
        let mut command = Command::new("setpriv");
        command
            .args([
                "--pdeathsig",
                "KILL",
                "--",
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                r#"mount --bind "$1" /run && exec containerd --config "$2""#,
                "sh",
            ])
            .arg(dir.path().join("run"))
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = crate::harness::spawn_for_process_lifetime(command)
            .context("cannot start containerd under unshare")?;
        let mut containerd = Containerd {
            child,
            client: Client::new(dir.path(), &dir_name),
            stopped: false,
            dir,
        };
        let Containerd { child, client, .. } = &mut containerd;
        let serving = client
            .wait_serving(START, || matches!(child.try_wait(), Ok(Some(_))))
            .await;
        if let Ok(Some(status)) = containerd.child.try_wait() {
            anyhow::bail!(
                "containerd exited ({status}) before serving: {}",
                containerd.client.log_tail()
            );
        }
        serving?;
        Ok(containerd)
    }

    /// `ctr` against this containerd.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The directory holding containerd's configuration, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops containerd and everything it started, and removes its cgroups. Dropping does the
    /// same, reporting failures as warnings only.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        // unshare dies of SIGKILL, its child (containerd, the namespace's first process) of
        // the parent-death signal `--kill-child` set, and the namespace's other processes
        // with it.
        stop_child(&mut self.child, Duration::ZERO);
        wait_gone(self.dir.path(), GONE)?;
        crate::cgroups::remove(&self.client.cgroup_parent)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(err) = self.teardown() {
            tracing::warn!(error = %format!("{err:#}"), "containerd teardown incomplete");
        }
    }
}

/// Waits until no process names a path under `dir` (see [`processes_naming`]), for at most
/// `deadline`.
pub fn wait_gone(dir: &Path, deadline: Duration) -> anyhow::Result<()> {
    let give_up = std::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        let left = processes_naming(dir)?;
        if left.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < give_up,
            "processes of {} still running after {deadline:?}: {left:?}",
            dir.display()
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// `ctr` against one containerd, in [`NAMESPACE`].
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    /// Where `ctr run` puts its standard I/O FIFOs.
    fifo_dir: PathBuf,
    /// The cgroup (below each hierarchy's root) under which `run` puts its containers.
    cgroup_parent: String,
    /// containerd's log, quoted in errors.
    log: PathBuf,
}

impl Client {
    /// The client of the containerd configured by [`write_config`] in `dir`, whose
    /// containers' cgroups go under `cgroup_parent`.
    pub fn new(dir: &Path, cgroup_parent: &str) -> Self {
        Client {
            socket: dir.join("containerd.sock"),
            fifo_dir: dir.join("fifo"),
            cgroup_parent: cgroup_parent.to_owned(),
            log: dir.join("containerd.log"),
        }
    }

    /// containerd's API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The cgroup under which [`Client::run`] puts containers.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// Waits until containerd answers on its socket, for at most `deadline`, or until
    /// `exited` says it is gone.
    pub async fn wait_serving(
        &self,
        deadline: Duration,
        mut exited: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        wait::until("containerd to answer on its socket", deadline, || {
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok() || exited()
        })
        .await
        .with_context(|| self.log_tail())
    }

    /// The last lines of containerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "containerd log:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// A `ctr` command against this containerd, in [`NAMESPACE`].
    pub fn ctr(&self) -> tokio::process::Command {
        let mut ctr = tokio::process::Command::new("ctr");
        ctr.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        ctr
    }

    /// Runs `ctr args...` and returns its standard output; fails on a non-zero exit or after
    /// a minute.
    pub async fn ctr_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut ctr = self.ctr();
        ctr.args(args);
        let output = tokio::time::timeout(CTR, ctr.output())
            .await
            .with_context(|| format!("ctr {args:?} took more than {CTR:?}"))?
            .context("cannot run ctr")?;
        anyhow::ensure!(
            output.status.success(),
            "ctr {args:?}: {}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log_tail()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Imports an OCI or Docker image archive.
    pub async fn import(&self, archive: &Path) -> anyhow::Result<()> {
        let archive = archive.to_string_lossy();
        self.ctr_ok(&["images", "import", &archive]).await?;
        Ok(())
    }

    /// The images containerd holds: name and manifest (or index) digest.
    pub async fn images(&self) -> anyhow::Result<Vec<(String, String)>> {
        let listing = self.ctr_ok(&["images", "list"]).await?;
        // `REF TYPE DIGEST SIZE PLATFORMS LABELS`, one image a line after the header.
        Ok(listing
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut columns = line.split_whitespace();
                let name = columns.next()?;
                let digest = columns.nth(1)?;
                Some((name.to_owned(), digest.to_owned()))
            })
            .collect())
    }

    /// The image of every container whose task is running (pod sandboxes' included).
    pub async fn running_images(&self) -> anyhow::Result<Vec<String>> {
        // `TASK PID STATUS` and `CONTAINER IMAGE RUNTIME`, one a line after the header.
        let tasks = self.ctr_ok(&["tasks", "list"]).await?;
        let containers = self.ctr_ok(&["containers", "list"]).await?;
        let images: std::collections::HashMap<&str, &str> = containers
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut columns = line.split_whitespace();
                Some((columns.next()?, columns.next()?))
            })
            .collect();
        Ok(tasks
            .lines()
            .skip(1)
            .filter_map(|line| {
                let columns: Vec<&str> = line.split_whitespace().collect();
                match columns[..] {
                    [task, _, "RUNNING"] => {
                        Some(images.get(task).copied().unwrap_or("").to_owned())
                    }
                    _ => None,
                }
            })
            .collect())
    }

    /// Runs `args` in a container of `image` with the image's user and environment, removes
    /// the container, and returns its output and exit code.
    pub async fn run(&self, image: &str, id: &str, args: &[&str]) -> anyhow::Result<RunOutput> {
        let cgroup = format!("/{}/{id}", self.cgroup_parent);
        let mut ctr = self.ctr();
        ctr.arg("run")
            .arg("--rm")
            .arg("--fifo-dir")
            .arg(&self.fifo_dir)
            .args(["--cgroup", &cgroup, image, id])
            .args(args);
        let output = tokio::time::timeout(CTR, ctr.output())
            .await
            .with_context(|| format!("ctr run {image} {args:?} took more than {CTR:?}"))?
            .context("cannot run ctr")?;
        Ok(RunOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// What a container printed and how it ended.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Its exit code, `None` if `ctr` was killed by a signal.
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// The processes whose command line names a path under `dir`: a private containerd's own
/// processes (containerd is started with its configuration there, shims with its socket).
pub fn processes_naming(dir: &Path) -> anyhow::Result<Vec<u32>> {
    let needle = dir.to_string_lossy().into_owned();
    crate::procfs::processes_with_arg(|arg| arg.contains(&needle))
}

/// Writes containerd's configuration into `dir` and makes the directories it names; returns
/// the configuration's path. Everything is under `dir` (the socket is `containerd.sock`, and
/// callers log to `containerd.log`), nothing listens but the socket (and the CRI streaming
/// server when asked for), and no plugin writes outside `dir`.
pub fn write_config(dir: &Path, options: &Options) -> anyhow::Result<PathBuf> {
    for sub in ["root", "state", "opt", "fifo"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let config = dir.join("config.toml");
    std::fs::write(&config, config_toml(dir, options))?;
    Ok(config)
}

fn config_toml(dir: &Path, options: &Options) -> String {
    let socket = dir.join("containerd.sock");
    let socket = socket.display();
    let dir = dir.display();
    // Top-level keys before the first table: TOML puts later keys in the table above them.
    let disabled = match options.cri {
        None => r#"["io.containerd.grpc.v1.cri"]"#,
        Some(_) => "[]",
    };
    let mut config = format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = {disabled}

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
"#
    );
    if let Some(cri) = &options.cri {
        config.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  stream_server_address = "{stream_address}"
  stream_server_port = "{stream_port}"
  enable_selinux = false
  # The VM lacks CAP_SYS_RESOURCE: without this, runc fails every pod sandbox when kubelet
  # asks for an oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
            sandbox = cri.sandbox_image,
            stream_address = cri.stream_address,
            stream_port = cri.stream_port,
            cni_bin = cri.cni_bin_dir.display(),
            cni_conf = cri.cni_conf_dir.display(),
        ));
    }
    config
}
