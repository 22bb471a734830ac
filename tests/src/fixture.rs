//! In-process servers and agents on loopback, with certificates made for the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cplink_agent::{Agent, AgentHandle};
use cplink_server::{Listeners, Server, ServerHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pki::{CertFiles, Pki, Usage};
use crate::wait;

/// Builds an argv: program name, base flags, then the test's extra flags.
fn argv(program: &str, base: Vec<String>, extra: &[&str]) -> Vec<String> {
    std::iter::once(program.to_owned())
        .chain(base)
        .chain(extra.iter().map(|s| (*s).to_owned()))
        .collect()
}

/// Certificates and a private directory for one test.
pub struct Loopback {
    dir: tempfile::TempDir,
    /// The link and frontend CA.
    pub pki: Pki,
    /// Server certificate (SANs localhost, 127.0.0.1).
    pub server_cert: CertFiles,
    /// Agent client certificate.
    pub agent_cert: CertFiles,
    /// Frontend client certificate (what kube-apiserver presents).
    pub frontend_cert: CertFiles,
    counter: AtomicUsize,
}

/// A server running in-process.
pub struct RunningServer {
    /// Observes the server.
    pub handle: ServerHandle,
    /// Where agents link.
    pub agent_addr: SocketAddr,
    /// The TLS CONNECT frontend.
    pub tls_addr: SocketAddr,
    /// The Unix socket CONNECT frontend.
    pub uds: PathBuf,
    /// The konnectivity gRPC frontend's Unix socket.
    pub grpc_uds: PathBuf,
    /// The admin endpoint.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Starts the drain (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits until the server has stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        finish(self.task.take()).await;
    }

    /// Waits until the server has stopped by itself (after [`Self::begin_shutdown`]).
    pub async fn join(mut self) {
        finish(self.task.take()).await;
    }

    /// Waits until `n` agents are linked.
    pub async fn wait_for_agents(&self, n: usize) -> anyhow::Result<()> {
        let handle = self.handle.clone();
        wait::until(
            &format!("{n} linked agents"),
            Duration::from_secs(20),
            || handle.linked_agents() == n,
        )
        .await
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An agent running in-process.
pub struct RunningAgent {
    /// Observes the agent.
    pub handle: AgentHandle,
    /// The admin endpoint.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningAgent {
    /// Starts the drain (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits until the agent has stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        finish(self.task.take()).await;
    }

    /// Waits until the agent has stopped by itself.
    pub async fn join(mut self) {
        finish(self.task.take()).await;
    }

    /// Ids of the servers the agent is linked to, sorted (an id twice when linked twice).
    pub fn server_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .handle
            .links()
            .into_iter()
            .map(|l| l.server_id)
            .collect();
        ids.sort();
        ids
    }

    /// Waits until the agent is linked to every server it knows.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let handle = self.handle.clone();
        wait::until("agent readiness", Duration::from_secs(20), || {
            handle.readiness().is_ok()
        })
        .await
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits for an in-process server's or agent's task to end; a panic in it fails the test here
/// rather than vanishing with the task.
async fn finish(task: Option<JoinHandle<()>>) {
    let Some(task) = task else {
        return;
    };
    if let Err(err) = task.await
        && err.is_panic()
    {
        std::panic::resume_unwind(err.into_panic());
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl Loopback {
    /// Creates the certificates for a test.
    pub fn new() -> anyhow::Result<Self> {
        crate::init_logs();
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path(), "link")?;
        let server_cert = pki.issue("server", &["localhost", "127.0.0.1"], Usage::Server)?;
        let agent_cert = pki.issue("agent", &["agent"], Usage::Client)?;
        let frontend_cert = pki.issue("apiserver", &["kube-apiserver"], Usage::Client)?;
        Ok(Loopback {
            dir,
            pki,
            server_cert,
            agent_cert,
            frontend_cert,
            counter: AtomicUsize::new(0),
        })
    }

    /// The test's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn next(&self) -> usize {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts a server on ephemeral ports; `extra` flags are appended.
    pub async fn start_server(&self, extra: &[&str]) -> anyhow::Result<RunningServer> {
        self.start_server_on("127.0.0.1:0".parse()?, extra).await
    }

    /// Starts a server whose agent listener binds `agent_addr` (to restart on a known port).
    pub async fn start_server_on(
        &self,
        agent_addr: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<RunningServer> {
        let n = self.next();
        let uds = self.dir().join(format!("frontend-{n}.sock"));
        let grpc_uds = self.dir().join(format!("grpc-{n}.sock"));
        let base = vec![
            "--server-id".to_owned(),
            format!("server-{n}"),
            "--agent-address".to_owned(),
            agent_addr.to_string(),
            "--frontend-address".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--frontend-uds".to_owned(),
            path(&uds),
            "--grpc-uds".to_owned(),
            path(&grpc_uds),
            "--admin-address".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--tls-cert".to_owned(),
            path(&self.server_cert.cert),
            "--tls-key".to_owned(),
            path(&self.server_cert.key),
            "--agent-ca".to_owned(),
            path(self.pki.ca_file()),
            "--frontend-ca".to_owned(),
            path(self.pki.ca_file()),
        ];
        let parsed = <cplink_server::Args as clap::Parser>::try_parse_from(argv(
            "cplink-server",
            base,
            extra,
        ))?;
        let listeners = Listeners::bind(&parsed).await?;
        let agent_addr = listeners.agent.local_addr()?;
        let tls_addr = match &listeners.frontend_tls {
            Some(l) => l.local_addr()?,
            None => anyhow::bail!("frontend listener missing"),
        };
        let admin_addr = match &listeners.admin {
            Some(l) => l.local_addr()?,
            None => anyhow::bail!("admin listener missing"),
        };
        let server = Server::new(parsed.into_config()?);
        let handle = server.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(listeners, shutdown.clone()));
        Ok(RunningServer {
            handle,
            agent_addr,
            tls_addr,
            uds,
            grpc_uds,
            admin_addr,
            shutdown,
            task: Some(task),
        })
    }

    /// Starts an agent linking to `servers`; `extra` flags are appended.
    pub async fn start_agent(
        &self,
        servers: &[SocketAddr],
        extra: &[&str],
    ) -> anyhow::Result<RunningAgent> {
        self.start_agent_with_cert(servers, &self.agent_cert.clone(), self.pki.ca_file(), extra)
            .await
    }

    /// Starts an agent with a given client certificate and server CA.
    pub async fn start_agent_with_cert(
        &self,
        servers: &[SocketAddr],
        cert: &CertFiles,
        server_ca: &Path,
        extra: &[&str],
    ) -> anyhow::Result<RunningAgent> {
        let n = self.next();
        let mut base = vec![
            "--tls-cert".to_owned(),
            path(&cert.cert),
            "--tls-key".to_owned(),
            path(&cert.key),
            "--server-ca".to_owned(),
            path(server_ca),
            "--reconnect-max-backoff".to_owned(),
            "500ms".to_owned(),
        ];
        if !extra.contains(&"--agent-id") {
            base.push("--agent-id".to_owned());
            base.push(format!("agent-{n}"));
        }
        for server in servers {
            base.push("--server-address".to_owned());
            base.push(server.to_string());
        }
        let parsed = <cplink_agent::Args as clap::Parser>::try_parse_from(argv(
            "cplink-agent",
            base,
            extra,
        ))?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let admin_addr = admin.local_addr()?;
        let agent = Agent::new(parsed.into_config()?);
        let handle = agent.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(Some(admin), shutdown.clone()));
        Ok(RunningAgent {
            handle,
            admin_addr,
            shutdown,
            task: Some(task),
        })
    }

    /// A server and one agent, linked.
    pub async fn pair(&self) -> anyhow::Result<(RunningServer, RunningAgent)> {
        let server = self.start_server(&[]).await?;
        let agent = self.start_agent(&[server.agent_addr], &[]).await?;
        server.wait_for_agents(1).await?;
        agent.wait_ready().await?;
        Ok((server, agent))
    }
}

/// Links to `server` from `from` (any loopback address) with `cert`, trusting `server_ca`, sends
/// `hello` and returns the server's answer, as an agent (or an impostor) would meet it.
pub async fn say_hello(
    server: SocketAddr,
    cert: &CertFiles,
    server_ca: &Path,
    from: std::net::IpAddr,
    hello: &cplink_proto::hello::AgentHello,
) -> anyhow::Result<cplink_proto::hello::HelloOutcome> {
    use cplink_proto::hello::{self, ServerHello};
    use cplink_proto::tls::{Identity, TrustAnchors};
    let identity = Identity::from_pem_files(&cert.cert, &cert.key)?;
    let anchors = TrustAnchors::from_pem_file(server_ca)?;
    let config = cplink_proto::tls::link_client_config(&identity, &anchors)?;
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(server).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    hello::write(&mut tls, hello).await?;
    let theirs: ServerHello = hello::read(&mut tls).await?;
    Ok(theirs.outcome)
}
