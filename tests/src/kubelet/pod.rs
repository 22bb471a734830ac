//! One pod on a simulated node: its volumes written out, each container's command run as a
//! local process in a bubblewrap sandbox that mounts the volumes at their `mountPath`,
//! readiness and liveness probes, restarts with backoff, status written back to the API, and
//! graceful termination when the pod is deleted.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::env::{self, Lookup, PodFacts};
use super::{NodeCtx, Runtime, volumes};

/// Probes run at least this often, whatever the pod asks for, so tests see readiness quickly.
const PROBE_PERIOD_CAP: Duration = Duration::from_secs(1);
/// First and longest wait before restarting a container that exited.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A container that ran this long restarts without accumulated backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// First and longest pause before writing a pod status again after a failed write.
const STATUS_RETRY_START: Duration = Duration::from_millis(200);
const STATUS_RETRY_MAX: Duration = Duration::from_secs(5);
/// The sandbox every container runs in (Debian's `bubblewrap`).
const SANDBOX: &str = "bwrap";

/// How a pod is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Keep running.
    No,
    /// SIGTERM, then SIGKILL after the grace period.
    Graceful(Duration),
    /// SIGKILL now.
    Now,
}

/// A container's state as the API shows it.
#[derive(Debug, Clone)]
enum State {
    Waiting { reason: String, message: String },
    Running { started: Timestamp },
    Terminated(Exit),
}

#[derive(Debug, Clone)]
struct Exit {
    code: i32,
    signal: Option<i32>,
    reason: String,
    started: Timestamp,
    finished: Timestamp,
}

#[derive(Debug, Clone)]
struct ContainerStatus {
    name: String,
    image: String,
    state: State,
    last: Option<State>,
    ready: bool,
    started: bool,
    restarts: i32,
}

/// What the pod worker reports; turned into `status` by [`status_json`].
#[derive(Debug, Clone)]
struct PodStatus {
    host_ip: String,
    pod_ip: String,
    start: Timestamp,
    phase: &'static str,
    message: Option<String>,
    containers: Vec<ContainerStatus>,
}

/// The status shared by a pod's tasks; every change wakes the status writer.
struct Shared {
    status: Mutex<PodStatus>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        f(&mut self.status.lock().expect("pod status"));
        self.changed.send_modify(|n| *n += 1);
    }

    fn container(&self, index: usize, f: impl FnOnce(&mut ContainerStatus)) {
        self.update(|s| f(&mut s.containers[index]));
    }
}

/// Runs `pod` until it is deleted; `updates` carries newer versions of it, `None` once it is
/// gone from the API.
pub(super) async fn run(
    rt: Arc<Runtime>,
    node: Arc<NodeCtx>,
    pod: Pod,
    updates: watch::Receiver<Option<Pod>>,
) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let pod_ip = if host_network {
        Some(node.ip)
    } else {
        node.allocate_ip()
    };
    let Some(pod_ip) = pod_ip else {
        tracing::error!(pod = %name, node = %node.name, "no pod address left on the node");
        return;
    };
    let dir = rt
        .dir
        .join("pods")
        .join(pod.metadata.uid.as_deref().unwrap_or(&name));
    let result = Worker {
        rt: Arc::clone(&rt),
        node: Arc::clone(&node),
        pod,
        pod_ip,
        dir: dir.clone(),
    }
    .run(updates)
    .await;
    if let Err(err) = result {
        tracing::warn!(pod = %name, "pod worker failed: {err:#}");
    }
    if !host_network {
        node.release_ip(pod_ip);
    }
    rt.logs.forget_pod(&namespace, &name);
    let _ = std::fs::remove_dir_all(&dir);
}

struct Worker {
    rt: Arc<Runtime>,
    node: Arc<NodeCtx>,
    pod: Pod,
    pod_ip: Ipv4Addr,
    dir: PathBuf,
}

/// A container ready to start: program, arguments, environment, mounts.
#[derive(Debug, Clone)]
struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    mounts: Vec<Mount>,
    workdir: String,
    user: Option<(i64, i64)>,
}

/// A volume directory bound at a path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
}

impl Worker {
    fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or_default()
    }

    async fn run(self, mut updates: watch::Receiver<Option<Pod>>) -> anyhow::Result<()> {
        let spec = self.pod.spec.clone().context("pod without spec")?;
        let shared = Arc::new(Shared {
            status: Mutex::new(PodStatus {
                host_ip: self.node.ip.to_string(),
                pod_ip: self.pod_ip.to_string(),
                start: Timestamp::now(),
                phase: "Pending",
                message: None,
                containers: spec
                    .containers
                    .iter()
                    .map(|c| ContainerStatus {
                        name: c.name.clone(),
                        image: c.image.clone().unwrap_or_default(),
                        state: waiting("ContainerCreating", ""),
                        last: None,
                        ready: false,
                        started: false,
                        restarts: 0,
                    })
                    .collect(),
            }),
            changed: watch::Sender::new(0),
        });
        let api: Api<Pod> = Api::namespaced(self.rt.client.clone(), self.namespace());
        // Aborted with this worker, whichever way it ends.
        let writer = AbortOnDropHandle::new(tokio::spawn(write_status(
            api.clone(),
            self.name().to_owned(),
            Arc::clone(&shared),
        )));
        let (stop_tx, stop_rx) = watch::channel(Stop::No);

        let containers = tokio::task::JoinSet::new();
        // Volumes and environment are retried like kubelet retries them: a Secret may appear
        // after the pod does.
        let mut pause = BACKOFF_START;
        let prepared = loop {
            let attempt = tokio::select! {
                attempt = self.prepare_all(&spec) => attempt,
                stop = stop_requested(&mut updates) => {
                    return self.finish(&api, stop, writer, containers, &stop_tx).await;
                }
            };
            match attempt {
                Ok(prepared) => break prepared,
                Err(err) => {
                    let message = format!("{err:#}");
                    let unsupported = message.contains("not supported");
                    shared.update(|s| {
                        for c in &mut s.containers {
                            c.state = waiting("CreateContainerConfigError", &message);
                        }
                    });
                    tracing::debug!(pod = %self.name(), "pod not startable yet: {message}");
                    if unsupported {
                        let stop = stop_requested(&mut updates).await;
                        return self.finish(&api, stop, writer, containers, &stop_tx).await;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        stop = stop_requested(&mut updates) => {
                            return self.finish(&api, stop, writer, containers, &stop_tx).await;
                        }
                    }
                    pause = (pause * 2).min(BACKOFF_MAX);
                }
            }
        };
        let restart_policy = spec.restart_policy.clone().unwrap_or_default();
        let grace = Duration::from_secs(
            spec.termination_grace_period_seconds
                .unwrap_or(30)
                .max(0)
                .unsigned_abs(),
        );
        let mut containers = containers;
        for (index, (container, prepared)) in spec.containers.iter().zip(prepared).enumerate() {
            containers.spawn(supervise(
                Arc::clone(&self.rt),
                Arc::clone(&shared),
                format!("{}/{}", self.namespace(), self.name()),
                index,
                container.clone(),
                prepared,
                self.pod_ip,
                restart_policy.clone(),
                grace,
                self.rt.logs.container(
                    self.namespace(),
                    self.name(),
                    &container.name,
                    &self.dir.join("logs").join(&container.name),
                ),
                stop_rx.clone(),
            ));
        }
        let stop = stop_requested(&mut updates).await;
        self.finish(&api, stop, writer, containers, &stop_tx).await
    }

    /// Stops the containers as asked, then removes the pod from the API (after a graceful
    /// deletion, kubelet has the last word).
    async fn finish(
        &self,
        api: &Api<Pod>,
        stop: Stop,
        writer: AbortOnDropHandle<()>,
        mut containers: tokio::task::JoinSet<()>,
        stop_tx: &watch::Sender<Stop>,
    ) -> anyhow::Result<()> {
        let _ = stop_tx.send(stop);
        while containers.join_next().await.is_some() {}
        writer.abort();
        if stop == Stop::Now {
            return Ok(());
        }
        let uid = self.pod.metadata.uid.clone();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(self.name(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(err) => Err(err).context("cannot remove the terminated pod"),
        }
    }

    async fn prepare_all(&self, spec: &PodSpec) -> anyhow::Result<Vec<Prepared>> {
        if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
            anyhow::bail!("init containers are not supported by the cplink pod runner");
        }
        let volumes = spec.volumes.as_deref().unwrap_or_default();
        let lookup = Lookup::new(self.rt.client.clone(), self.namespace());
        let facts = env::facts(
            &self.pod,
            &self.node.ip.to_string(),
            &self.pod_ip.to_string(),
        );
        let volume_dirs = volumes::materialize(
            &self.rt.client,
            &lookup,
            &facts,
            volumes,
            &self.dir.join("volumes"),
        )
        .await?;
        for volume in volumes.iter().filter(|v| v.empty_dir.is_some()) {
            std::fs::set_permissions(
                &volume_dirs[&volume.name],
                std::fs::Permissions::from_mode(0o777),
            )?;
        }
        let mut prepared = Vec::new();
        for container in &spec.containers {
            prepared.push(
                self.prepare(container, &lookup, &facts, &volume_dirs)
                    .await
                    .with_context(|| format!("container {:?}", container.name))?,
            );
        }
        Ok(prepared)
    }

    async fn prepare(
        &self,
        container: &Container,
        lookup: &Lookup,
        facts: &PodFacts,
        volume_dirs: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<Prepared> {
        let base = self.service_env();
        let env = env::container_env(lookup, container, facts, &base).await?;
        let command = container.command.clone().unwrap_or_default();
        let Some((program, command_args)) = command.split_first() else {
            anyhow::bail!(
                "no command: images cannot be pulled here, so the pod runner needs \
                 `command` set to a program on its PATH"
            );
        };
        let program = resolve(&env::expand(program, &env), &self.rt.path)?;
        let args = command_args
            .iter()
            .chain(container.args.iter().flatten())
            .map(|a| env::expand(a, &env))
            .collect();
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let source = volume_dirs
                .get(&mount.name)
                .with_context(|| format!("volumeMount {:?} names no volume", mount.name))?;
            let source = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => source.join(sub),
                None => source.clone(),
            };
            mounts.push(Mount {
                source,
                target: PathBuf::from(&mount.mount_path),
                read_only: mount.read_only.unwrap_or(false),
            });
        }
        let pod_context = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let context = container.security_context.as_ref();
        let uid = context
            .and_then(|c| c.run_as_user)
            .or_else(|| pod_context.and_then(|c| c.run_as_user));
        let gid = context
            .and_then(|c| c.run_as_group)
            .or_else(|| pod_context.and_then(|c| c.run_as_group));
        Ok(Prepared {
            program,
            args,
            env,
            mounts,
            workdir: container.working_dir.clone().unwrap_or_else(|| "/".into()),
            user: uid.map(|u| (u, gid.unwrap_or(u))),
        })
    }

    /// What kubelet injects into every container: the API server's address, the hostname.
    fn service_env(&self) -> BTreeMap<String, String> {
        let (host, port) = (&self.rt.apiserver.0, self.rt.apiserver.1);
        BTreeMap::from([
            ("KUBERNETES_SERVICE_HOST".to_owned(), host.clone()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), port.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".to_owned(), port.to_string()),
            ("KUBERNETES_PORT".to_owned(), format!("tcp://{host}:{port}")),
            ("HOSTNAME".to_owned(), self.name().to_owned()),
        ])
    }
}

fn waiting(reason: &str, message: &str) -> State {
    State::Waiting {
        reason: reason.to_owned(),
        message: message.to_owned(),
    }
}

/// Waits until the pod is being deleted (graceful) or is gone (now).
async fn stop_requested(updates: &mut watch::Receiver<Option<Pod>>) -> Stop {
    loop {
        {
            let pod = updates.borrow_and_update();
            match &*pod {
                None => return Stop::Now,
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    let grace = pod
                        .metadata
                        .deletion_grace_period_seconds
                        .unwrap_or(30)
                        .max(0);
                    return Stop::Graceful(Duration::from_secs(grace.unsigned_abs()));
                }
                Some(_) => {}
            }
        }
        if updates.changed().await.is_err() {
            return Stop::Now;
        }
    }
}

/// Finds `program` on `path` (a `PATH`-style list) unless it is already a path.
fn resolve(program: &str, path: &str) -> anyhow::Result<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        anyhow::ensure!(executable(&p), "executable {program:?} not found");
        return Ok(p);
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .with_context(|| format!("executable {program:?} not found in PATH {path}"))
}

/// The bubblewrap command line: the host's root, fresh `/dev` and `/proc`, a tmpfs where a
/// mount point's parents are missing on the host (directories below it mode 0755), each
/// volume at its mount path, then the
/// program (as the pod's user when one is set).
fn sandbox_args(prepared: &Prepared, exists: impl Fn(&Path) -> bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--die-with-parent",
        "--bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut tmpfs: Vec<PathBuf> = Vec::new();
    for mount in &prepared.mounts {
        let mut first_missing = None;
        let mut at = PathBuf::from("/");
        for part in mount.target.components().skip(1) {
            at.push(part);
            if !exists(&at) {
                first_missing = Some(at.clone());
                break;
            }
        }
        if let Some(missing) = first_missing.filter(|m| *m != mount.target)
            && !tmpfs.iter().any(|t| missing.starts_with(t))
        {
            tmpfs.push(missing);
        }
    }
    for dir in &tmpfs {
        args.push("--tmpfs".into());
        args.push(dir.into());
    }
    // Directories between a tmpfs and a mount point: bubblewrap would create them as root
    // with mode 0700, which a pod running as another user cannot traverse.
    let mut parents: Vec<PathBuf> = Vec::new();
    for mount in &prepared.mounts {
        let mut at = mount.target.clone();
        while at.pop() && at.parent().is_some() {
            if !exists(&at) && !tmpfs.contains(&at) && !parents.contains(&at) {
                parents.push(at.clone());
            }
        }
    }
    parents.sort_by_key(|p| p.components().count());
    for dir in parents {
        for arg in ["--perms", "0755", "--dir"] {
            args.push(arg.into());
        }
        args.push(dir.into());
    }
    let mut mounts = prepared.mounts.clone();
    mounts.sort_by_key(|m| m.target.components().count());
    for mount in &mounts {
        args.push(
            if mount.read_only {
                "--ro-bind"
            } else {
                "--bind"
            }
            .into(),
        );
        args.push(mount.source.clone().into());
        args.push(mount.target.clone().into());
    }
    args.push("--chdir".into());
    args.push(prepared.workdir.clone().into());
    args.push("--".into());
    if let Some((uid, gid)) = prepared.user {
        for arg in [
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
            "--".to_owned(),
        ] {
            args.push(arg.into());
        }
    }
    args.push(prepared.program.clone().into());
    args.extend(prepared.args.iter().map(OsString::from));
    args
}

/// Mount targets as the host resolves them (`/var/run` is a link to `/run` on most systems):
/// bubblewrap creates mount points on the host side, where an absolute link would point
/// outside the sandbox.
fn host_targets(mounts: &mut [Mount]) {
    for mount in mounts {
        let mut existing = mount.target.clone();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_owned());
                    existing = parent.to_owned();
                }
                _ => break,
            }
        }
        if let Ok(mut real) = existing.canonicalize() {
            real.extend(rest.iter().rev());
            mount.target = real;
        }
    }
}

/// Runs one container until the pod stops, restarting it as the restart policy says.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    rt: Arc<Runtime>,
    shared: Arc<Shared>,
    pod_key: String,
    index: usize,
    container: Container,
    mut prepared: Prepared,
    pod_ip: Ipv4Addr,
    restart_policy: String,
    grace: Duration,
    log: Arc<super::logs::ContainerLog>,
    mut stop: watch::Receiver<Stop>,
) {
    host_targets(&mut prepared.mounts);
    let args = sandbox_args(&prepared, Path::exists);
    let mut backoff = BACKOFF_START;
    loop {
        if *stop.borrow() != Stop::No {
            return;
        }
        let mut command = tokio::process::Command::new(SANDBOX);
        command
            .args(&args)
            .env_clear()
            .envs(&prepared.env)
            .env("PATH", &rt.path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let started = Timestamp::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                let message = format!("cannot start {SANDBOX}: {err}");
                shared.container(index, |c| c.state = waiting("RunContainerError", &message));
                tracing::error!("{message}");
                return;
            }
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid {
            rt.processes.add(pid, &pod_key);
        }
        let capture = tokio::spawn(log.clone().capture(
            child.stdout.take().expect("piped stdout"),
            child.stderr.take().expect("piped stderr"),
        ));
        shared.container(index, |c| {
            c.state = State::Running { started };
            c.started = true;
            c.ready = container.readiness_probe.is_none();
        });
        shared.update(|s| s.phase = "Running");
        let (liveness_tx, mut liveness_failed) = watch::channel(false);
        let probes = AbortOnDropHandle::new(tokio::spawn(probe_loop(
            Arc::clone(&shared),
            index,
            container.clone(),
            pod_ip,
            liveness_tx,
        )));
        let ran_since = tokio::time::Instant::now();
        let exit = tokio::select! {
            status = child.wait() => status.ok(),
            () = wait_stop(&mut stop) => {
                let how = *stop.borrow();
                terminate(&mut child, pid, how).await
            }
            () = async { let _ = liveness_failed.wait_for(|failed| *failed).await; } => {
                terminate(&mut child, pid, Stop::Graceful(grace)).await
            }
        };
        probes.abort();
        if let Some(pid) = pid {
            rt.processes.remove(pid);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), capture).await;
        let code = exit.and_then(|s| s.code()).unwrap_or(-1);
        let signal = exit.and_then(|s| s.signal());
        let liveness_restart = *liveness_failed.borrow();
        let exited = Exit {
            code: signal.map_or(code, |s| 128 + s),
            signal,
            reason: if code == 0 && signal.is_none() {
                "Completed".to_owned()
            } else {
                "Error".to_owned()
            },
            started,
            finished: Timestamp::now(),
        };
        let success = exited.code == 0;
        shared.container(index, |c| {
            c.state = State::Terminated(exited);
            c.ready = false;
        });
        if *stop.borrow() != Stop::No {
            return;
        }
        let restart = match restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => !success || liveness_restart,
            _ => true,
        };
        if !restart {
            finish_phase(&shared);
            return;
        }
        if ran_since.elapsed() >= BACKOFF_RESET {
            backoff = BACKOFF_START;
        }
        shared.container(index, |c| {
            c.last = Some(c.state.clone());
            c.state = waiting(
                "CrashLoopBackOff",
                &format!("back-off {backoff:?} restarting failed container"),
            );
            c.restarts += 1;
        });
        tokio::select! {
            () = async {
                tokio::time::sleep(backoff).await;
                // A test holding the pod down keeps it crashed until it lets go.
                rt.processes.wait_released(&pod_key).await;
            } => {}
            () = wait_stop(&mut stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Once no container will run again, the pod succeeded if every container exited with 0.
fn finish_phase(shared: &Shared) {
    shared.update(|s| {
        let done = s
            .containers
            .iter()
            .all(|c| matches!(c.state, State::Terminated(_)));
        if done {
            let ok = s
                .containers
                .iter()
                .all(|c| matches!(&c.state, State::Terminated(e) if e.code == 0));
            s.phase = if ok { "Succeeded" } else { "Failed" };
        }
    });
}

async fn wait_stop(stop: &mut watch::Receiver<Stop>) {
    let _ = stop.wait_for(|s| *s != Stop::No).await;
}

/// SIGTERM to the container's process (the sandbox's child), SIGKILL to the whole process
/// group once the grace period is over.
async fn terminate(
    child: &mut tokio::process::Child,
    pid: Option<i32>,
    how: Stop,
) -> Option<std::process::ExitStatus> {
    let Some(pid) = pid else {
        return child.wait().await.ok();
    };
    if let Stop::Graceful(grace) = how {
        for target in sandbox_children(pid) {
            let _ = kill(Pid::from_raw(target), Signal::SIGTERM);
        }
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            return status.ok();
        }
    }
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    child.wait().await.ok()
}

/// The processes bubblewrap started: the container's main process.
fn sandbox_children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Runs the container's readiness and liveness probes until aborted.
async fn probe_loop(
    shared: Arc<Shared>,
    index: usize,
    container: Container,
    pod_ip: Ipv4Addr,
    liveness_failed: watch::Sender<bool>,
) {
    let readiness = container.readiness_probe.clone();
    let liveness = container.liveness_probe.clone();
    let delay = |p: &Option<Probe>| {
        p.as_ref()
            .and_then(|p| p.initial_delay_seconds)
            .unwrap_or(0)
    };
    let initial = delay(&readiness).min(delay(&liveness)).max(0);
    tokio::time::sleep(Duration::from_secs(u64::from(initial.unsigned_abs()))).await;
    let (mut ready_ok, mut ready_bad, mut live_bad) = (0, 0, 0);
    loop {
        if let Some(probe) = &readiness {
            let ok = check(probe, &container, pod_ip).await.is_ok();
            if ok {
                ready_ok += 1;
                ready_bad = 0;
            } else {
                ready_bad += 1;
                ready_ok = 0;
            }
            let success_needed = probe.success_threshold.unwrap_or(1).max(1);
            let failure_needed = probe.failure_threshold.unwrap_or(3).max(1);
            let current = shared.status.lock().expect("pod status").containers[index].ready;
            if !current && ready_ok >= success_needed {
                shared.container(index, |c| c.ready = true);
            } else if current && ready_bad >= failure_needed {
                shared.container(index, |c| c.ready = false);
            }
        }
        if let Some(probe) = &liveness {
            if check(probe, &container, pod_ip).await.is_ok() {
                live_bad = 0;
            } else {
                live_bad += 1;
                if live_bad >= probe.failure_threshold.unwrap_or(3).max(1) {
                    let _ = liveness_failed.send(true);
                    return;
                }
            }
        }
        let period = [&readiness, &liveness]
            .into_iter()
            .flatten()
            .map(|p| {
                Duration::from_secs(u64::from(
                    p.period_seconds.unwrap_or(10).max(1).unsigned_abs(),
                ))
            })
            .min()
            .unwrap_or(PROBE_PERIOD_CAP);
        tokio::time::sleep(period.min(PROBE_PERIOD_CAP)).await;
    }
}

/// One probe: an HTTP GET answered with 2xx or 3xx, or a TCP connect.
async fn check(probe: &Probe, container: &Container, pod_ip: Ipv4Addr) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(u64::from(
        probe.timeout_seconds.unwrap_or(1).max(1).unsigned_abs(),
    ));
    let port = |port: &IntOrString| -> anyhow::Result<u16> {
        match port {
            IntOrString::Int(p) => Ok(u16::try_from(*p)?),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| u16::try_from(p.container_port))
                .with_context(|| format!("no container port named {name:?}"))?
                .map_err(Into::into),
        }
    };
    let attempt = async {
        if let Some(get) = &probe.http_get {
            anyhow::ensure!(
                get.scheme.as_deref().unwrap_or("HTTP") == "HTTP",
                "only HTTP probes are supported"
            );
            let host = get.host.clone().unwrap_or_else(|| pod_ip.to_string());
            let port = port(&get.port)?;
            let path = get.path.as_deref().unwrap_or("/");
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            stream
                .write_all(
                    format!(
                        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: \
                         kube-probe/1.20\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            let status: u16 = std::str::from_utf8(&head[9..12])?.parse()?;
            anyhow::ensure!((200..400).contains(&status), "HTTP {status}");
            Ok(())
        } else if let Some(tcp) = &probe.tcp_socket {
            let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_string());
            tokio::net::TcpStream::connect((host.as_str(), port(&tcp.port)?)).await?;
            Ok(())
        } else {
            anyhow::bail!("only httpGet and tcpSocket probes are supported")
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .context("probe timed out")?
}

/// Writes the pod status whenever it changes, retrying failed writes with backoff.
async fn write_status(api: Api<Pod>, name: String, shared: Arc<Shared>) {
    let mut changed = shared.changed.subscribe();
    let mut pause = STATUS_RETRY_START;
    loop {
        let status = status_json(&shared.status.lock().expect("pod status"));
        changed.mark_unchanged();
        let patch = Patch::Merge(json!({ "status": status }));
        if let Err(err) = api
            .patch_status(&name, &PatchParams::default(), &patch)
            .await
        {
            tracing::debug!(pod = %name, %err, "cannot write pod status");
            if matches!(&err, kube::Error::Api(s) if s.code == 404) {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(STATUS_RETRY_MAX);
            continue;
        }
        pause = STATUS_RETRY_START;
        if changed.changed().await.is_err() {
            return;
        }
    }
}

fn state_json(state: &State) -> Value {
    match state {
        State::Waiting { reason, message } => {
            json!({ "waiting": { "reason": reason, "message": message } })
        }
        State::Running { started } => json!({ "running": { "startedAt": started.to_string() } }),
        State::Terminated(exit) => json!({ "terminated": {
            "exitCode": exit.code,
            "signal": exit.signal,
            "reason": exit.reason,
            "startedAt": exit.started.to_string(),
            "finishedAt": exit.finished.to_string(),
        }}),
    }
}

/// The pod `status` the API server gets.
fn status_json(status: &PodStatus) -> Value {
    let ready = status.containers.iter().all(|c| c.ready);
    let condition = |kind: &str, ok: bool| {
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastTransitionTime": status.start.to_string(),
        })
    };
    let containers: Vec<Value> = status
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image,
                "imageID": "",
                "containerID": format!("cplink://{}", c.name),
                "ready": c.ready,
                "started": c.started,
                "restartCount": c.restarts,
                "state": state_json(&c.state),
                "lastState": c.last.as_ref().map_or_else(|| json!({}), state_json),
            })
        })
        .collect();
    json!({
        "phase": status.phase,
        "message": status.message,
        "hostIP": status.host_ip,
        "podIP": status.pod_ip,
        "podIPs": [{ "ip": status.pod_ip }],
        "startTime": status.start.to_string(),
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "containerStatuses": containers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(mounts: Vec<Mount>) -> Prepared {
        Prepared {
            program: PathBuf::from("/bin/cplink-agent"),
            args: vec!["--node-name=node-1".into()],
            env: BTreeMap::new(),
            mounts,
            workdir: "/".into(),
            user: None,
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn missing_mount_parents_get_one_tmpfs_and_binds_go_shallow_first() {
        let existing = ["/", "/run", "/etc"];
        let exists = |p: &Path| existing.iter().any(|e| Path::new(e) == p);
        let mount = |source: &str, target: &str, read_only| Mount {
            source: source.into(),
            target: target.into(),
            read_only,
        };
        let args = strings(&sandbox_args(
            &prepared(vec![
                mount(
                    "/v/token",
                    "/run/secrets/kubernetes.io/serviceaccount",
                    true,
                ),
                mount("/v/extra", "/run/secrets/other", false),
                mount("/v/tls", "/etc/tls", true),
            ]),
            exists,
        ));
        let tmpfs: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "--tmpfs")
            .map(|w| &w[1])
            .collect();
        assert_eq!(tmpfs, ["/run/secrets"], "{args:?}");
        // Directories below it are made traversable for users other than root.
        let dirs: Vec<&String> = args
            .windows(4)
            .filter(|w| w[0] == "--perms" && w[2] == "--dir")
            .map(|w| &w[3])
            .collect();
        assert_eq!(dirs, ["/run/secrets/kubernetes.io"], "{args:?}");
        assert_eq!(
            args[args.iter().position(|a| a == "--perms").unwrap() + 1],
            "0755"
        );
        let etc = args.iter().position(|a| a == "/etc/tls").unwrap();
        let token = args
            .iter()
            .position(|a| a == "/run/secrets/kubernetes.io/serviceaccount")
            .unwrap();
        assert!(etc < token, "shallow mounts first: {args:?}");
        assert_eq!(args[etc - 2], "--ro-bind");
        let tail: Vec<&str> = args.iter().rev().take(3).map(String::as_str).collect();
        assert_eq!(tail, ["--node-name=node-1", "/bin/cplink-agent", "--"]);
    }

    #[test]
    fn a_pod_user_runs_the_program_through_setpriv() {
        let mut p = prepared(Vec::new());
        p.user = Some((65532, 65533));
        let args = strings(&sandbox_args(&p, |_| true));
        let at = args.iter().position(|a| a == "setpriv").unwrap();
        assert_eq!(
            args[at..at + 5],
            [
                "setpriv",
                "--reuid=65532",
                "--regid=65533",
                "--clear-groups",
                "--"
            ]
        );
        assert_eq!(args[at + 5], "/bin/cplink-agent");
    }

    #[test]
    fn commands_resolve_on_the_path_or_fail_naming_it() {
        let found = resolve("sh", "/nonexistent:/bin:/usr/bin").unwrap();
        assert!(found.ends_with("sh"), "{}", found.display());
        let err = resolve("cplink-nope", "/bin").unwrap_err().to_string();
        assert!(err.contains("cplink-nope") && err.contains("/bin"), "{err}");
        let err = resolve("/no/such/program", "/bin").unwrap_err().to_string();
        assert!(err.contains("/no/such/program"), "{err}");
    }

    #[test]
    fn status_reports_readiness_restarts_and_the_last_state() {
        let now = Timestamp::now();
        let status = PodStatus {
            host_ip: "127.9.0.1".into(),
            pod_ip: "127.9.1.2".into(),
            start: now,
            phase: "Running",
            message: None,
            containers: vec![ContainerStatus {
                name: "agent".into(),
                image: "cplink:e2e".into(),
                state: State::Running { started: now },
                last: Some(State::Terminated(Exit {
                    code: 137,
                    signal: Some(9),
                    reason: "Error".into(),
                    started: now,
                    finished: now,
                })),
                ready: false,
                started: true,
                restarts: 2,
            }],
        };
        let json = status_json(&status);
        assert_eq!(json["podIP"], "127.9.1.2");
        assert_eq!(json["conditions"][3]["type"], "Ready");
        assert_eq!(json["conditions"][3]["status"], "False");
        let c = &json["containerStatuses"][0];
        assert_eq!(c["restartCount"], 2);
        assert_eq!(c["lastState"]["terminated"]["exitCode"], 137);
        assert!(c["state"]["running"]["startedAt"].is_string());
        // The API server accepts it as a pod status.
        let _: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(json).unwrap();
    }
}
