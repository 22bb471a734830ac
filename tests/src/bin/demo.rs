//! `cplink-demo`: cplink on a local Kubernetes cluster, in the background.
//!
//! `cplink-demo up` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler
//! on loopback, three real worker nodes (kubelet and containerd, each in namespaces of its
//! own on a network kube-apiserver has no route to), installs cplink's chart with every pod
//! running cplink's image, applies the example ControlPlaneLink, then restarts
//! kube-apiserver with the egress configuration the operator wrote, so `kubectl logs`,
//! `exec`, `port-forward` and the node proxy go through the tunnel. It returns once a pod on
//! a worker node answers all three and prints how to use the cluster. `cplink-demo down`
//! stops everything. Real nodes need root.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cplink_e2e::cluster::ControlPlane;
use cplink_e2e::nodes;
use cplink_e2e::stack::{Egress, LINK, NAMESPACE, STEP, Stack, StackOptions};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

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
        /// Worker nodes.
        #[arg(long, default_value_t = nodes::DEFAULT_NODES)]
        nodes: usize,
    },
    /// Stop a running demo.
    Down,
    /// Run the demo in the foreground until SIGTERM or Ctrl-C (what `up` starts).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = nodes::DEFAULT_NODES)]
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
    // A machine that cannot run real nodes fails here, naming what is missing.
    nodes::preflight()?;
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

/// The demo's web pod: busybox's httpd on this port, on the last worker node.
const WEB_PORT: u16 = 8080;

async fn run(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    println!("starting the control plane and {nodes} real nodes (kubelet and containerd)");
    let mut stack = Stack::start(StackOptions { nodes, servers: 1 }, Egress::HttpConnect).await?;
    println!("applying the ControlPlaneLink {NAMESPACE}/{LINK}");
    stack.apply_link()?;
    stack.wait_link_ready().await?;
    println!("restarting kube-apiserver with the link's egress configuration");
    stack.wire_egress().await?;

    let node = stack
        .nodes
        .names()
        .pop()
        .context("the cluster has no node")?;
    println!("starting the pod web on {node}");
    let greeting = format!("hello from web on {node}");
    nodes::run_shell_pod(
        &stack.plane,
        "web",
        &node,
        &format!(
            "mkdir -p /www && echo '{greeting}' >/www/index.html && echo '{greeting}, \
             serving :{WEB_PORT}' && exec httpd -f -p {WEB_PORT} -h /www"
        ),
    )
    .await
    .map_err(|err| err.context(stack.diagnostics()))?;

    // Each of these crosses the tunnel: kube-apiserver reaches web's kubelet through the
    // server and the agent on web's node.
    let logs = stack
        .plane
        .wait_kubectl(
            "kubectl logs through the tunnel",
            STEP,
            &["logs", "web"],
            |out| out.contains(&greeting),
        )
        .await?;
    let exec = stack
        .plane
        .kubectl_ok(&["exec", "web", "--", "cat", "/www/index.html"])?;
    anyhow::ensure!(exec.contains(&greeting), "kubectl exec printed {exec:?}");
    let page = through_port_forward(&stack.plane, "pod/web", WEB_PORT).await?;
    anyhow::ensure!(
        page.contains(&greeting),
        "kubectl port-forward served {page:?}"
    );
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
        "$ kubectl logs web    # web runs on {node}; every command below crosses the tunnel\n{}",
        logs.trim_end()
    )?;
    writeln!(
        summary,
        "$ kubectl exec web -- cat /www/index.html\n{}",
        exec.trim_end()
    )?;
    writeln!(
        summary,
        "$ kubectl port-forward pod/web :{WEB_PORT}    # then fetch / from the port it prints\n{}",
        page.trim_end()
    )?;
    writeln!(
        summary,
        "\nThe cluster is yours:\n  export KUBECONFIG={}\n  kubectl get nodes,pods -A\n  \
         kubectl exec -it web -- sh\n  kubectl port-forward pod/web {WEB_PORT}:{WEB_PORT} &  \
         wget -qO- http://127.0.0.1:{WEB_PORT}/\n  \
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

/// Runs `kubectl port-forward target :port`, fetches `/` through the local port it chose
/// and returns the response's body; the port-forward ends with the call.
async fn through_port_forward(
    plane: &ControlPlane,
    target: &str,
    port: u16,
) -> anyhow::Result<String> {
    let mut forward = tokio::process::Command::from(plane.kubectl(&[
        "port-forward",
        target,
        &format!(":{port}"),
    ]))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .kill_on_drop(true)
    .spawn()
    .context("cannot run kubectl port-forward")?;
    let stdout = forward.stdout.take().context("stdout is piped")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // "Forwarding from 127.0.0.1:40123 -> 8080"
    let local = tokio::time::timeout(STEP, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(address) = line
                .strip_prefix("Forwarding from ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|address| address.parse::<std::net::SocketAddr>().ok())
            {
                return Ok(address);
            }
        }
        anyhow::bail!("kubectl port-forward exited before it forwarded")
    })
    .await
    .context("kubectl port-forward printed no local port in time")??;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(local).await?;
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(STEP, fetch)
        .await
        .context("no answer through kubectl port-forward in time")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "through kubectl port-forward: {head}"
    );
    forward.start_kill()?;
    let _ = tokio::time::timeout(STEP, forward.wait()).await;
    Ok(body.to_owned())
}
