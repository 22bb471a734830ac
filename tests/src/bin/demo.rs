//! `cplink-demo`: cplink on a local Kubernetes cluster, in the background.
//!
//! `cplink-demo up` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
//! on loopback, three simulated nodes whose pods run the freshly built binaries, the
//! operator, and the example ControlPlaneLink; then restarts kube-apiserver with the egress
//! configuration the operator wrote, so `kubectl logs`, node and service proxying go
//! through the tunnel. It returns once all of that works and prints how to use the cluster.
//! `cplink-demo down` stops everything.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cplink_e2e::stack::{LINK, NAMESPACE, STEP, Stack, StackOptions};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// cplink on a local Kubernetes cluster.
#[derive(Parser, Debug)]
#[command(name = "cplink-demo", version)]
struct Args {
    /// Where the demo keeps its pid, kubeconfig and log (default: `demo` in `$CPLINK_CACHE`,
    /// `~/.cache/cplink`).
    #[arg(long, env = "CPLINK_DEMO_DIR", global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Start the cluster and cplink in the background; return when the tunnel works.
    Up {
        /// Simulated nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Stop a running demo.
    Down,
    /// Run the demo in the foreground until SIGTERM or Ctrl-C (what `up` starts).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
}

fn state_dir(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.state_dir {
        return Ok(dir.clone());
    }
    Ok(cplink_e2e::workspace::cache()
        .context("no cache directory; pass --state-dir")?
        .join("demo"))
}

fn running_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    kill(Pid::from_raw(pid), None).ok().map(|()| pid)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = state_dir(&args)?;
    match args.command {
        Action::Up { nodes } => up(&dir, nodes),
        Action::Down => down(&dir),
        Action::Serve { nodes } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(serve(&dir, nodes)),
    }
}

fn up(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(dir) {
        anyhow::bail!(
            "a demo is already running (pid {pid}, {}); stop it with `make demo-down`",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    for stale in ["pid", "ready", "summary"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let log = std::fs::File::create(dir.join("demo.log"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--state-dir")
        .arg(dir)
        .args(["serve", "--nodes", &nodes.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the terminal's Ctrl-C after `up` returns does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the demo")?;
    println!(
        "starting a local cluster with {nodes} nodes and cplink (log: {})",
        dir.join("demo.log").display()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        if dir.join("ready").exists() {
            print!("{}", std::fs::read_to_string(dir.join("summary"))?);
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("demo.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!("the demo exited ({status}):\n{}", tail.join("\n"));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the demo was not ready after 10 minutes; see {}",
            dir.join("demo.log").display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(dir) else {
        println!("no demo is running");
        return Ok(());
    };
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while kill(Pid::from_raw(pid), None).is_ok() {
        if std::time::Instant::now() >= deadline {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for file in ["pid", "ready", "summary", "kubeconfig"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    println!("demo stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn stopped() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    Ok(())
}

async fn serve(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("pid"), std::process::id().to_string())?;
    let result = tokio::select! {
        result = run(dir, nodes) => result,
        result = stopped() => result,
    };
    let _ = std::fs::remove_file(dir.join("pid"));
    result
}

async fn run(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    println!("starting the control plane and {nodes} nodes");
    let mut stack = Stack::start(StackOptions { nodes, servers: 1 }).await?;
    println!("applying the ControlPlaneLink {NAMESPACE}/{LINK}");
    stack.apply_link()?;
    stack.wait_link_ready().await?;
    println!("restarting kube-apiserver with the link's egress configuration");
    stack.wire_egress().await?;

    // A log line that crossed the tunnel: kube-apiserver fetches it from the node's kubelet
    // through the server and that node's agent.
    let (agent, node, _) = stack
        .pods("agent")?
        .into_iter()
        .next()
        .context("no agent pod")?;
    let line = stack
        .plane
        .wait_kubectl(
            "kubectl logs through the tunnel",
            STEP,
            &["logs", "-n", NAMESPACE, &agent, "--tail=1"],
            |out| !out.trim().is_empty(),
        )
        .await?;
    let table = stack
        .plane
        .kubectl_ok(&["get", "controlplanelinks", "-n", NAMESPACE])?;

    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(&stack.plane.kubeconfig, &kubeconfig)?;
    let mut summary = Vec::new();
    writeln!(
        summary,
        "\n$ kubectl get controlplanelinks -n {NAMESPACE}\n{table}"
    )?;
    writeln!(
        summary,
        "$ kubectl logs -n {NAMESPACE} {agent} --tail=1    # from {node}, through the tunnel\n{}",
        line.trim_end()
    )?;
    writeln!(
        summary,
        "\nThe cluster is yours:\n  export KUBECONFIG={}\n  kubectl get nodes,pods -A\n  \
         kubectl get --raw /api/v1/nodes/{node}/proxy/healthz\n\
         Stop it with: make demo-down\n",
        kubeconfig.display()
    )?;
    std::fs::write(dir.join("summary"), &summary)?;
    std::fs::write(dir.join("ready"), "")?;
    std::io::stdout().write_all(&summary)?;
    // Runs until stopped; dropping the stack stops every process.
    std::future::pending::<()>().await;
    unreachable!("the demo runs until it is stopped")
}
