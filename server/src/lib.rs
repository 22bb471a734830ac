//! cplink-server: takes kube-apiserver's egress connections and carries them over agent links.
//!
//! Modules, from the edges inwards:
//! - [`frontends`]: where kube-apiserver's connections come in: HTTP CONNECT over mutual TLS or
//!   a Unix socket, and konnectivity's gRPC `ProxyService` on a Unix socket.
//! - `agents`: the agent port: native links and upstream konnectivity agents, and the watch that
//!   keeps verified links true to their Pods and Nodes.
//! - `tunnel`: opening a tunneled connection through an agent (routing, dial, answer).
//! - [`registry`]: linked agents and the routing strategies that pick one.
//! - `connections`: the tunneled connections open now, bytes counted as they move.
//! - `debug`: the admin endpoint's read-only views of agents, connections and routes
//!   (`--debug-endpoints`).
//! - [`identity`]: which node an agent is, proven by its pod's token or its certificate and
//!   backed by the Node object.
//! - [`leases`]: the Lease upstream agents count servers by, when asked to publish one.
//! - `grpc`: serving tonic services one HTTP/2 connection at a time.
//! - [`config`]: command line and validated configuration; [`metrics`]: Prometheus metrics.
//!
//! [`Server::run`] takes already-bound [`Listeners`] and a shutdown token, so tests run servers
//! in-process on ephemeral ports.

mod agents;
pub mod config;
mod connections;
mod debug;
pub mod frontends;
mod grpc;
pub mod identity;
pub mod leases;
pub mod metrics;
pub mod registry;
mod tunnel;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cplink_runtime::admin;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config, ConfigError};

use metrics::Metrics;
use registry::Registry;

/// State shared by every task of a server.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    /// One permit per tunneled connection: `--max-tunnels`.
    pub(crate) tunnels: Arc<tokio::sync::Semaphore>,
    /// The tunneled connections open now.
    pub(crate) connections: Arc<connections::Connections>,
    /// When the server was made (it runs at once): for the first `--node-agent-grace` after,
    /// the Nodes it learns of wait for their agents ([`Registry::expect_node`]).
    pub(crate) started: std::time::Instant,
    /// Whether the Nodes behind agents' identities have been listed once (always, when the
    /// server binds no agent to a node): until then the server cannot know which Nodes'
    /// dials to hold for their agents, so it does not report ready.
    nodes_listed: AtomicBool,
    draining: AtomicBool,
}

/// The sockets a server serves, bound before it starts.
#[derive(Debug)]
pub struct Listeners {
    /// Agent links.
    pub agent: TcpListener,
    /// CONNECT over TCP with TLS.
    pub frontend_tls: Option<TcpListener>,
    /// CONNECT over a Unix socket, and its path (removed on shutdown).
    pub frontend_uds: Option<(UnixListener, PathBuf)>,
    /// The konnectivity gRPC frontend's Unix socket, and its path (removed on shutdown).
    pub grpc_uds: Option<(UnixListener, PathBuf)>,
    /// Admin endpoint.
    pub admin: Option<TcpListener>,
}

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {address}: {source}")]
pub struct BindError {
    /// The flag naming the address.
    pub flag: &'static str,
    /// The address.
    pub address: String,
    /// Why binding failed.
    #[source]
    pub source: std::io::Error,
}

impl Listeners {
    /// Binds every listener the command line asks for.
    pub async fn bind(args: &Args) -> Result<Self, BindError> {
        let tcp = |flag: &'static str, addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| BindError {
                flag,
                address: addr.to_string(),
                source,
            })
        };
        let agent = tcp("agent-address", args.agent_address).await?;
        let frontend_tls = match args.frontend_address {
            Some(addr) => Some(tcp("frontend-address", addr).await?),
            None => None,
        };
        let frontend_uds = match &args.frontend_uds {
            Some(path) => Some((bind_uds("frontend-uds", path)?, path.clone())),
            None => None,
        };
        let grpc_uds = match &args.grpc_uds {
            Some(path) => Some((bind_uds("grpc-uds", path)?, path.clone())),
            None => None,
        };
        let admin = Some(tcp("admin-address", args.admin_address).await?);
        Ok(Listeners {
            agent,
            frontend_tls,
            frontend_uds,
            grpc_uds,
            admin,
        })
    }
}

/// Binds a Unix socket with mode 0660, replacing a stale socket left by a previous run; errors
/// name `flag`.
pub fn bind_uds(flag: &'static str, path: &Path) -> Result<UnixListener, BindError> {
    let err = |source| BindError {
        flag,
        address: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            // Nothing answers on a socket file whose server is gone; a live one would.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is serving this socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// A cplink server.
pub struct Server {
    shared: Arc<Shared>,
    prometheus: Arc<prometheus_client::registry::Registry>,
}

/// A cheap handle to observe a running server.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    prometheus: Arc<prometheus_client::registry::Registry>,
}

impl ServerHandle {
    /// Agents currently linked.
    pub fn linked_agents(&self) -> usize {
        self.shared.registry.len()
    }

    /// Ids of the agents currently linked.
    pub fn agent_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .shared
            .registry
            .agents()
            .iter()
            .map(|a| a.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The agent a dial to `target` (`host:port`) would go to now, and the strategy that picks
    /// it, without dialing; the refusal a client would get otherwise.
    pub fn route_of(&self, target: &str) -> Result<(String, registry::Strategy), String> {
        let target: cplink_proto::target::Target = target.parse().map_err(|e| format!("{e}"))?;
        self.shared
            .registry
            .route(&target, &self.shared.config.strategies)
            .map(|route| (route.guard.link().id.clone(), route.strategy))
            .map_err(|e| e.to_string())
    }

    /// Tunneled connections currently open through this server's frontends.
    pub fn active_streams(&self) -> i64 {
        self.shared.metrics.streams_active.get()
    }

    /// Tunneled bytes so far: frontend to agent (read from clients and sent on), and agent to
    /// frontend (written to clients).
    pub fn tunneled_bytes(&self) -> cplink_proto::pump::PumpStats {
        self.shared.metrics.bytes.totals()
    }

    /// Metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.prometheus);
        text
    }

    /// Whether the server is ready to take frontend connections.
    pub fn readiness(&self) -> Result<(), String> {
        readiness(&self.shared)
    }
}

impl Shared {
    /// Records that the Nodes have been listed once (see [`Shared::nodes_listed`]).
    pub(crate) fn nodes_were_listed(&self) {
        if !self.nodes_listed.swap(true, Ordering::Relaxed) {
            tracing::info!("the Nodes are listed: which nodes' dials to hold is known");
        }
    }

    /// Whether the server is shutting down.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The accept side of `listener`: the handshake cap, shed connections counted.
    pub(crate) fn acceptor(&self, listener: &'static str) -> cplink_runtime::accept::Acceptor {
        let shed = self
            .metrics
            .connections_shed
            .get_or_create(&metrics::ListenerLabels { listener })
            .clone();
        cplink_runtime::accept::Acceptor::new(listener, self.config.max_pending_connections, shed)
    }

    /// Registers a new agent link and updates the gauge; a link whose agent id is held from
    /// another address is refused.
    pub(crate) fn link_up(
        &self,
        link: &Arc<registry::AgentLink>,
    ) -> Result<(), registry::DuplicateAgent> {
        let links = self.registry.insert(link.clone())?;
        if links > 1 {
            tracing::info!(
                agent_id = %link.id,
                links,
                "agent linked again; new dials take the new link until the agent closes one"
            );
        }
        self.metrics.agents_linked.set(self.registry.len() as i64);
        Ok(())
    }

    /// Logs and counts a konnectivity link refused for an agent id held from another address
    /// (native links are counted and logged with their other failures).
    pub(crate) fn refuse_duplicate(&self, refused: &registry::DuplicateAgent, peer: SocketAddr) {
        self.metrics
            .link_errors
            .get_or_create(&metrics::LinkErrorLabels {
                reason: "duplicate_id",
            })
            .inc();
        tracing::warn!(
            agent_id = %refused.id,
            linked_from = %refused.linked_from,
            refused_peer = %peer,
            "link refused: this agent id is already linked from another address"
        );
    }

    /// Unregisters an agent link that ended and updates the gauge.
    pub(crate) fn link_down(&self, link: &registry::AgentLink) {
        self.registry.remove(&link.id, link.link_id);
        self.metrics.agents_linked.set(self.registry.len() as i64);
    }
}

fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.is_draining() {
        Err("shutting down".into())
    } else if shared.registry.is_empty() {
        Err("no agent linked".into())
    } else if !shared.nodes_listed.load(Ordering::Relaxed) {
        Err("the Nodes are not listed yet".into())
    } else {
        Ok(())
    }
}

impl Server {
    /// Creates a server from a validated configuration.
    pub fn new(config: Config) -> Self {
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);
        let tunnels = Arc::new(tokio::sync::Semaphore::new(config.max_tunnels as usize));
        let nodes_listed = AtomicBool::new(config.identity.api().is_none());
        Server {
            shared: Arc::new(Shared {
                config,
                registry: Registry::default(),
                metrics,
                tunnels,
                connections: Arc::default(),
                started: std::time::Instant::now(),
                nodes_listed,
                draining: AtomicBool::new(false),
            }),
            prometheus: Arc::new(prometheus),
        }
    }

    /// A handle to observe the server while it runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
            prometheus: self.prometheus.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled, then drains: reports not-ready at once, keeps
    /// accepting for the shutdown delay, stops accepting, lets in-flight tunneled connections
    /// finish up to the drain timeout, closes the agent links.
    pub async fn run(self, listeners: Listeners, shutdown: CancellationToken) {
        let shared = self.shared;
        let accepting = TaskTracker::new();
        let frontends = TaskTracker::new();
        let links = TaskTracker::new();
        let force = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        // Listeners close after the shutdown delay, not at the signal.
        let stop_accepting = CancellationToken::new();

        // Every bound address, so that whoever started the server with port 0 learns it.
        let tcp = |listener: Option<&TcpListener>| {
            listener
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string())
                .unwrap_or_default()
        };
        let uds = |listener: &Option<(UnixListener, PathBuf)>| {
            listener
                .as_ref()
                .map(|(_, path)| path.display().to_string())
                .unwrap_or_default()
        };
        tracing::info!(
            server_id = %shared.config.server_id,
            agents = %tcp(Some(&listeners.agent)),
            frontend = %tcp(listeners.frontend_tls.as_ref()),
            frontend_uds = %uds(&listeners.frontend_uds),
            grpc_uds = %uds(&listeners.grpc_uds),
            admin = %tcp(listeners.admin.as_ref()),
            "cplink-server started"
        );
        if shared.config.identity.mode() == identity::IdentityMode::Declared {
            tracing::warn!(
                "--agent-identity declared: agents' node names, host IPs and pod ranges are \
                 believed as announced; any holder of the agent certificate can claim any node"
            );
        }
        accepting.spawn(agents::accept(
            listeners.agent,
            shared.clone(),
            links.clone(),
            stop_accepting.clone(),
        ));
        if let (Some(listener), Some(tls)) = (listeners.frontend_tls, &shared.config.frontend_tls) {
            accepting.spawn(frontends::http_connect::accept_tls(
                listener,
                TlsAcceptor::from(tls.clone()),
                shared.clone(),
                frontends.clone(),
                stop_accepting.clone(),
                force.clone(),
            ));
        }
        let uds_paths: Vec<PathBuf> = [&listeners.frontend_uds, &listeners.grpc_uds]
            .into_iter()
            .flatten()
            .map(|(_, path)| path.clone())
            .collect();
        if let Some((listener, _)) = listeners.frontend_uds {
            accepting.spawn(frontends::http_connect::accept_uds(
                listener,
                shared.clone(),
                frontends.clone(),
                stop_accepting.clone(),
                force.clone(),
            ));
        }
        if let Some((listener, _)) = listeners.grpc_uds {
            accepting.spawn(frontends::grpc::accept_uds(
                listener,
                frontends::grpc::ProxyFrontend::new(
                    shared.clone(),
                    frontends.clone(),
                    force.clone(),
                ),
                frontends.clone(),
                stop_accepting.clone(),
                force.clone(),
            ));
        }
        let lease_stop = CancellationToken::new();
        let lease_task = shared.config.leases.clone().map(|config| {
            let shared = shared.clone();
            let stop = lease_stop.clone();
            tokio::spawn(async move { leases::run(config, &shared.metrics, stop).await })
        });
        let identity_stop = CancellationToken::new();
        let identity_watch =
            tokio::spawn(agents::watch::run(shared.clone(), identity_stop.clone()));
        let admin_task = listeners.admin.map(|listener| {
            let probe = shared.clone();
            let views = shared
                .config
                .debug_endpoints
                .then(|| Arc::new(debug::Views::new(shared.clone())) as Arc<dyn admin::Introspect>);
            tokio::spawn(admin::serve_with_debug(
                listener,
                self.prometheus.clone(),
                Arc::new(move || readiness(&probe)),
                views,
                admin_stop.clone(),
            ))
        });

        shutdown.cancelled().await;
        shared.draining.store(true, Ordering::Relaxed);
        // Agents that count Leases stop counting this server now, not when its Lease expires.
        lease_stop.cancel();
        let delay = shared.config.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(
                delay = %humantime::format_duration(delay),
                "not ready; still accepting until endpoints and load balancers have caught up"
            );
            tokio::time::sleep(delay).await;
        }
        stop_accepting.cancel();
        accepting.close();
        accepting.wait().await;
        for path in uds_paths {
            let _ = std::fs::remove_file(path);
        }

        frontends.close();
        let drain = shared.config.drain_timeout;
        if tokio::time::timeout(drain, frontends.wait()).await.is_err() {
            tracing::warn!(
                remaining = frontends.len(),
                "drain timeout reached: cutting remaining tunneled connections"
            );
            force.cancel();
            frontends.wait().await;
        }

        identity_stop.cancel();
        if let Err(err) = identity_watch.await
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
        if let Some(task) = lease_task
            && let Err(err) = task.await
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
        shared.registry.close_all();
        links.close();
        links.wait().await;
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        tracing::info!("cplink-server stopped");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::tests::link;

    /// A server made from `flags` (plus a throwaway certificate).
    pub(crate) fn server(flags: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (crt, pem_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&pem_key, key.serialize_pem()).unwrap();
        let (crt, pem_key) = (crt.display().to_string(), pem_key.display().to_string());
        let mut args = vec![
            "cplink-server".to_owned(),
            "--server-id=server-a".to_owned(),
            format!("--tls-cert={crt}"),
            format!("--tls-key={pem_key}"),
            format!("--agent-ca={crt}"),
        ];
        args.extend(flags.iter().map(|flag| (*flag).to_owned()));
        let args = <Args as clap::Parser>::try_parse_from(args).unwrap();
        Server::new(args.into_config().unwrap())
    }

    #[tokio::test]
    async fn a_server_binding_agents_to_nodes_is_ready_once_it_has_listed_the_nodes() {
        let server = server(&["--agent-identity=certificate", "--kubeconfig=/dev/null"]);
        let shared = &server.shared;
        assert_eq!(readiness(shared), Err("no agent linked".to_owned()));
        link(&shared.registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        assert_eq!(
            readiness(shared),
            Err("the Nodes are not listed yet".to_owned())
        );
        shared.nodes_were_listed();
        assert_eq!(readiness(shared), Ok(()));
        shared.draining.store(true, Ordering::Relaxed);
        assert_eq!(readiness(shared), Err("shutting down".to_owned()));
    }

    #[tokio::test]
    async fn a_server_taking_agents_at_their_word_needs_no_node_list() {
        let server = server(&[]);
        let shared = &server.shared;
        assert_eq!(readiness(shared), Err("no agent linked".to_owned()));
        link(&shared.registry, "a", "node-a", "10.0.0.1", "10.244.1.0/24").await;
        assert_eq!(readiness(shared), Ok(()));
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frontend.sock");
        // A socket file whose server is gone, as after a crash.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = bind_uds("frontend-uds", &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        // While it is served, a second server must not steal it.
        let err = bind_uds("frontend-uds", &path).unwrap_err();
        assert_eq!(err.source.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        // A regular file is never deleted.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"data").unwrap();
        assert!(bind_uds("grpc-uds", &file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
