//! Command line and validated configuration of `cplink-server`.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cplink_proto::keepalive::KeepaliveConfig;
use cplink_proto::tls::{self, Identity, TrustAnchors};
use cplink_runtime::args::{LogArgs, TlsIdentityArgs};
pub use cplink_runtime::config::ConfigError;
use cplink_runtime::kubeapi::{ApiSource, KubeApi};

use crate::identity::tokens::TokenAuth;
use crate::identity::{IdentityMode, NodeBinding};
use crate::registry::{Strategy, parse_strategies};

/// Command line of `cplink-server`. Every flag can also be set through its `CPLINK_*` variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cplink-server",
    version,
    about = "cplink tunnel server: accepts agent links and carries kube-apiserver's egress \
             connections (HTTP CONNECT) to nodes, pods and services through them"
)]
pub struct Args {
    /// Id of this server replica, told to agents. Defaults to $POD_NAME, else the host name.
    #[arg(long, env = "CPLINK_SERVER_ID")]
    pub server_id: Option<String>,

    /// Number of server replicas; agents keep dialing until they are linked to this many.
    #[arg(long, env = "CPLINK_SERVER_COUNT", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub server_count: u32,

    /// Address of the TLS listener agents link to.
    #[arg(long, env = "CPLINK_AGENT_ADDRESS", default_value = "0.0.0.0:8091")]
    pub agent_address: SocketAddr,

    /// Address of the HTTP CONNECT frontend over TCP with mutual TLS (for kube-apiserver's
    /// egress selector). Disabled when unset.
    #[arg(long, env = "CPLINK_FRONTEND_ADDRESS")]
    pub frontend_address: Option<SocketAddr>,

    /// Path of the HTTP CONNECT frontend Unix socket (mode 0660; a stale socket is replaced).
    /// Disabled when unset.
    #[arg(long, env = "CPLINK_FRONTEND_UDS")]
    pub frontend_uds: Option<PathBuf>,

    /// Path of the konnectivity gRPC frontend Unix socket (`/ProxyService/Proxy`, for
    /// kube-apiserver's egress selector in `GRPC` mode; mode 0660, a stale socket is replaced).
    /// Disabled when unset.
    #[arg(long, env = "CPLINK_GRPC_UDS")]
    pub grpc_uds: Option<PathBuf>,

    /// Address of the admin HTTP endpoint (/healthz, /readyz, /metrics).
    #[arg(long, env = "CPLINK_ADMIN_ADDRESS", default_value = "127.0.0.1:8095")]
    pub admin_address: SocketAddr,

    /// Serve the read-only debug views on the admin endpoint: /debug/agents (linked agents,
    /// their identifiers, streams, bytes and keepalive), /debug/connections (tunneled
    /// connections open now), /debug/route (which agent a destination goes to) and
    /// /debug/check (dials a node's kubelet port and closes at once). They name nodes, IPs and
    /// destinations: whoever reaches the admin port reads them.
    #[arg(long, env = "CPLINK_DEBUG_ENDPOINTS")]
    pub debug_endpoints: bool,

    /// The server's certificate, shown to agents and to frontend clients, and its key.
    #[command(flatten)]
    pub tls: TlsIdentityArgs,

    /// CA bundle (PEM) that signs agent client certificates.
    #[arg(long, env = "CPLINK_AGENT_CA")]
    pub agent_ca: PathBuf,

    /// CA bundle (PEM) that signs frontend client certificates; required with
    /// --frontend-address.
    #[arg(long, env = "CPLINK_FRONTEND_CA")]
    pub frontend_ca: Option<PathBuf>,

    /// Namespace of the service account whose tokens authenticate upstream konnectivity agents
    /// that present no client certificate (konnectivity-server's flag of the same name).
    #[arg(
        long,
        env = "CPLINK_AGENT_NAMESPACE",
        requires = "agent_service_account"
    )]
    pub agent_namespace: Option<String>,

    /// Service account whose tokens authenticate upstream konnectivity agents that present no
    /// client certificate; enables token authentication (checked with a TokenReview).
    #[arg(
        long,
        env = "CPLINK_AGENT_SERVICE_ACCOUNT",
        requires = "agent_namespace"
    )]
    pub agent_service_account: Option<String>,

    /// Audience agent tokens are reviewed for (e.g. system:konnectivity-server); the API
    /// server's own audiences when unset.
    #[arg(
        long,
        env = "CPLINK_AUTHENTICATION_AUDIENCE",
        requires = "agent_service_account"
    )]
    pub authentication_audience: Option<String>,

    /// How agents prove which node they are. `declared`: the server believes the node name, host
    /// IPs and pod ranges an agent announces, so any holder of the agent certificate can claim
    /// any node. `token`: each agent also sends its pod's projected service-account token; a
    /// TokenReview names the pod, which must belong to --agent-daemonset, and the pod's Node
    /// decides what the agent routes (needs --agent-namespace, --agent-service-account,
    /// --agent-daemonset and --authentication-audience). `certificate`: for agents outside the
    /// cluster, each with its own certificate whose subject is CN=system:node:<node>; the Node
    /// decides what it routes.
    #[arg(long, env = "CPLINK_AGENT_IDENTITY", value_enum, default_value_t = IdentityMode::Declared)]
    pub agent_identity: IdentityMode,

    /// With --agent-identity token: the DaemonSet, in --agent-namespace, whose pods are the
    /// agents.
    #[arg(long, env = "CPLINK_AGENT_DAEMONSET")]
    pub agent_daemonset: Option<String>,

    /// kubeconfig for token reviews and the Pods and Nodes behind agents' identities; the
    /// in-cluster service account when unset.
    #[arg(long, env = "CPLINK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Publish a Lease named `konnectivity-proxy-server-<server-id>` in --lease-namespace, as
    /// konnectivity-server's lease controller does, so that upstream agents run with
    /// `--count-server-leases` count this server; deleted on shutdown. Needs the Kubernetes API
    /// (--kubeconfig, else in-cluster) and get, create, update, patch and delete on leases in
    /// that namespace.
    #[arg(long, env = "CPLINK_PUBLISH_SERVER_LEASES")]
    pub publish_server_leases: bool,

    /// Namespace of the server Lease (upstream agents' --lease-namespace).
    #[arg(long, env = "CPLINK_LEASE_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,

    /// Labels of the server Lease, `key=value[,key=value]` (upstream agents' --lease-label).
    #[arg(
        long,
        env = "CPLINK_LEASE_LABEL",
        default_value = "k8s-app=konnectivity-server"
    )]
    pub lease_label: String,

    /// How long the server Lease counts after each renewal (its leaseDurationSeconds).
    #[arg(long, env = "CPLINK_LEASE_DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// How often the server Lease is renewed; less than --lease-duration.
    #[arg(long, env = "CPLINK_LEASE_RENEW_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_renew_interval: Duration,

    /// How long to wait for an agent to answer a dial.
    #[arg(long, env = "CPLINK_DIAL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,

    /// How long a dial for a node waits for that node's own agent when the agent has just gone
    /// (its link closed this long ago at most, or it is draining) and no other link of the node
    /// is up: a replaced agent pod (a DaemonSet rolling update) links again within seconds, and
    /// its node's dials wait for it rather than go to another agent, whose destination policy
    /// may refuse them. Counted before the dial timeout. 0 routes at once.
    #[arg(long, env = "CPLINK_NODE_AGENT_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub node_agent_grace: Duration,

    /// On SIGTERM, how long to keep accepting frontend connections while already reporting
    /// not-ready, so that load balancers and Service endpoints stop sending new clients before
    /// the listeners close (a second signal skips it).
    #[arg(long, env = "CPLINK_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// On SIGTERM, how long in-flight tunneled connections may take to finish.
    #[arg(long, env = "CPLINK_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How long a frontend client may take to send its CONNECT request.
    #[arg(long, env = "CPLINK_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Interval between HTTP/2 PINGs on each agent link.
    #[arg(long, env = "CPLINK_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a PING may go unanswered before the link is declared dead.
    #[arg(long, env = "CPLINK_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Most tunneled connections this server carries at once, over all frontends; more are
    /// answered 503 (`server at capacity`). A connection whose reader stalls buffers up to
    /// 256 KiB here, so this bounds the server's memory: 16384 connections, 4 GiB at worst.
    #[arg(long, env = "CPLINK_MAX_TUNNELS", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tunnels: u32,

    /// Connections each listener takes at once while they are still in their TLS handshake,
    /// hello or CONNECT head; more are closed at once and counted in
    /// `cplink_server_connections_shed_total`. Keeps silent or slow clients from taking the
    /// descriptors established connections and the admin port need. Defaults to an eighth of
    /// the open-files limit, at most 1024.
    #[arg(long, env = "CPLINK_MAX_PENDING_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_connections: Option<u32>,

    /// Ordered routing strategies: node (destination is an agent's node name or host IP),
    /// cidr (destination is in an agent's pod CIDR), default-route (agents started with
    /// --default-route), any (least-loaded agent).
    #[arg(long, env = "CPLINK_STRATEGIES", default_value = "node,cidr,any")]
    pub strategies: String,

    /// Threads that run the server's tasks; 1 runs them all on the main thread. Defaults to
    /// one per CPU the process may use: a server replica has its pod to itself and carries
    /// the tunnels of every agent.
    #[arg(
        long,
        env = "CPLINK_WORKER_THREADS",
        value_name = "N",
        value_parser = cplink_runtime::args::parse_worker_threads
    )]
    pub worker_threads: Option<NonZeroUsize>,

    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Validated configuration: TLS material loaded, values checked.
#[derive(Clone)]
pub struct Config {
    /// Id told to agents.
    pub server_id: String,
    /// Replicas told to agents.
    pub server_count: u32,
    /// TLS for agent links.
    pub link_tls: Arc<rustls::ServerConfig>,
    /// TLS for the TCP frontend, when enabled.
    pub frontend_tls: Option<Arc<rustls::ServerConfig>>,
    /// Dial budget.
    pub dial_timeout: Duration,
    /// How long a dial for a node waits for that node's agent to come back.
    pub node_agent_grace: Duration,
    /// Drain budget on shutdown.
    pub drain_timeout: Duration,
    /// How long to keep accepting after SIGTERM, not-ready.
    pub shutdown_delay: Duration,
    /// Whether the admin endpoint serves the debug views.
    pub debug_endpoints: bool,
    /// CONNECT head budget.
    pub header_timeout: Duration,
    /// Budget for the TLS handshake and hello of an agent link.
    pub handshake_timeout: Duration,
    /// Link liveness.
    pub keepalive: KeepaliveConfig,
    /// Routing chain.
    pub strategies: Vec<Strategy>,
    /// Tunneled connections carried at once, at most.
    pub max_tunnels: u32,
    /// Connections per listener in their handshake or header phase, at most.
    pub max_pending_connections: usize,
    /// Token authentication of upstream agents without a client certificate, when enabled.
    pub token_auth: Option<Arc<TokenAuth>>,
    /// How agents are bound to their nodes.
    pub identity: NodeBinding,
    /// The Lease to publish for upstream agents that count servers by Leases, when asked.
    pub leases: Option<crate::leases::LeaseConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server_id", &self.server_id)
            .field("server_count", &self.server_count)
            .field("frontend_tls", &self.frontend_tls.is_some())
            .field("dial_timeout", &self.dial_timeout)
            .field("node_agent_grace", &self.node_agent_grace)
            .field("drain_timeout", &self.drain_timeout)
            .field("keepalive", &self.keepalive)
            .field("strategies", &self.strategies)
            .field(
                "token_auth",
                &self.token_auth.as_ref().map(|t| t.expected_user()),
            )
            .field("identity", &self.identity.mode())
            .field("leases", &self.leases)
            .finish_non_exhaustive()
    }
}

impl Args {
    /// Checks every flag and loads the TLS material, before anything listens.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let identity = Identity::from_pem_files(&self.tls.tls_cert, &self.tls.tls_key)
            .map_err(|e| TlsIdentityArgs::error(e.concerns_key(), e))?;
        let agent_ca = TrustAnchors::from_pem_file(&self.agent_ca)
            .map_err(|e| ConfigError::new("agent-ca", e))?;
        let api = self.api()?;
        let token_auth = self.token_auth(api.as_ref())?.map(Arc::new);
        let node_binding = self.identity(api.clone(), token_auth.as_ref())?;
        let client_auth = if token_auth.is_some() {
            tls::ClientAuth::Optional
        } else {
            tls::ClientAuth::Required
        };
        let link_tls = tls::link_server_config(&identity, &agent_ca, client_auth)
            .map_err(|e| ConfigError::new("tls-key", e))?;
        let frontend_tls = match (&self.frontend_address, &self.frontend_ca) {
            (Some(_), Some(ca)) => {
                let ca = TrustAnchors::from_pem_file(ca)
                    .map_err(|e| ConfigError::new("frontend-ca", e))?;
                Some(
                    tls::frontend_server_config(&identity, &ca)
                        .map_err(|e| ConfigError::new("frontend-ca", e))?,
                )
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "frontend-ca",
                    "required with --frontend-address: the TCP frontend only accepts clients with a certificate",
                ));
            }
            (None, _) => None,
        };
        if self.frontend_address.is_none() && self.frontend_uds.is_none() && self.grpc_uds.is_none()
        {
            tracing::warn!(
                "no frontend configured (--frontend-address, --frontend-uds, --grpc-uds): nothing can dial through this server"
            );
        }
        if let (Some(connect), Some(grpc)) = (&self.frontend_uds, &self.grpc_uds)
            && connect == grpc
        {
            return Err(ConfigError::new(
                "grpc-uds",
                format!(
                    "{} is also --frontend-uds; each frontend needs its own socket",
                    grpc.display()
                ),
            ));
        }
        let strategies =
            parse_strategies(&self.strategies).map_err(|e| ConfigError::new("strategies", e))?;
        for (flag, value) in [
            ("dial-timeout", self.dial_timeout),
            ("header-timeout", self.header_timeout),
            ("keepalive-interval", self.keepalive_interval),
            ("keepalive-timeout", self.keepalive_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(flag, "must be greater than zero"));
            }
        }
        let server_id = match &self.server_id {
            Some(id) if id.trim().is_empty() => {
                return Err(ConfigError::new("server-id", "must not be empty"));
            }
            Some(id) => id.clone(),
            None => default_server_id(),
        };
        let leases = self.leases(api, &server_id)?;
        Ok(Config {
            server_id,
            server_count: self.server_count,
            link_tls,
            frontend_tls,
            dial_timeout: self.dial_timeout,
            node_agent_grace: self.node_agent_grace,
            drain_timeout: self.drain_timeout,
            shutdown_delay: self.shutdown_delay,
            debug_endpoints: self.debug_endpoints,
            header_timeout: self.header_timeout,
            handshake_timeout: Duration::from_secs(10),
            keepalive: KeepaliveConfig {
                interval: self.keepalive_interval,
                timeout: self.keepalive_timeout,
            },
            strategies,
            max_tunnels: self.max_tunnels,
            max_pending_connections: self
                .max_pending_connections
                .map_or_else(cplink_runtime::accept::default_max_pending, |n| n as usize),
            token_auth,
            identity: node_binding,
            leases,
        })
    }

    /// The server Lease, with `--publish-server-leases`.
    fn leases(
        &self,
        api: Option<Arc<KubeApi>>,
        server_id: &str,
    ) -> Result<Option<crate::leases::LeaseConfig>, ConfigError> {
        let Some(api) = api.filter(|_| self.publish_server_leases) else {
            return Ok(None);
        };
        let name = format!("{}{server_id}", crate::leases::NAME_PREFIX);
        if !crate::leases::valid_subdomain(&name) {
            return Err(ConfigError::new(
                "server-id",
                format!(
                    "{server_id:?} makes the Lease name {name:?}, which is not a valid object                      name (lowercase letters, digits, '-' and '.')"
                ),
            ));
        }
        if !crate::leases::valid_subdomain(&self.lease_namespace)
            || self.lease_namespace.contains('.')
        {
            return Err(ConfigError::new(
                "lease-namespace",
                format!("{:?} is not a namespace name", self.lease_namespace),
            ));
        }
        let labels = crate::leases::parse_labels(&self.lease_label)
            .map_err(|e| ConfigError::new("lease-label", e))?;
        let seconds = self.lease_duration.as_secs();
        if seconds == 0 || i32::try_from(seconds).is_err() {
            return Err(ConfigError::new(
                "lease-duration",
                "must be whole seconds, at least 1s",
            ));
        }
        if self.lease_renew_interval.is_zero() || self.lease_renew_interval >= self.lease_duration {
            return Err(ConfigError::new(
                "lease-renew-interval",
                "must be greater than zero and less than --lease-duration, or the Lease lapses \
                 between renewals",
            ));
        }
        Ok(Some(crate::leases::LeaseConfig {
            api,
            namespace: self.lease_namespace.clone(),
            name,
            holder: server_id.to_owned(),
            labels,
            duration: self.lease_duration,
            renew_interval: self.lease_renew_interval,
        }))
    }

    /// The Kubernetes API, when token reviews or node binding need it.
    fn api(&self) -> Result<Option<Arc<KubeApi>>, ConfigError> {
        let needed = self.agent_service_account.is_some()
            || self.agent_identity != IdentityMode::Declared
            || self.publish_server_leases;
        if !needed {
            if self.kubeconfig.is_some() {
                return Err(ConfigError::new(
                    "kubeconfig",
                    "only used with --agent-service-account, --agent-identity token|certificate \
                     or --publish-server-leases",
                ));
            }
            return Ok(None);
        }
        let source = ApiSource::from_flag(self.kubeconfig.as_deref())?;
        Ok(Some(Arc::new(KubeApi::new(source))))
    }

    fn identity(
        &self,
        api: Option<Arc<KubeApi>>,
        token_auth: Option<&Arc<TokenAuth>>,
    ) -> Result<NodeBinding, ConfigError> {
        if self.agent_daemonset.is_some() && self.agent_identity != IdentityMode::Token {
            return Err(ConfigError::new(
                "agent-daemonset",
                "only used with --agent-identity token",
            ));
        }
        let Some(api) = api else {
            return Ok(NodeBinding::declared());
        };
        match self.agent_identity {
            IdentityMode::Declared => Ok(NodeBinding::declared()),
            IdentityMode::Certificate => Ok(NodeBinding::certificate(api)),
            IdentityMode::Token => {
                let tokens = token_auth.ok_or_else(|| {
                    ConfigError::new(
                        "agent-service-account",
                        "required with --agent-identity token (with --agent-namespace): the \
                         agents' service account",
                    )
                })?;
                if self.authentication_audience.is_none() {
                    return Err(ConfigError::new(
                        "authentication-audience",
                        "required with --agent-identity token: without an audience of its own, \
                         the server would accept tokens minted for the API server",
                    ));
                }
                let daemonset = self
                    .agent_daemonset
                    .clone()
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| {
                        ConfigError::new(
                            "agent-daemonset",
                            "required with --agent-identity token: the DaemonSet whose pods \
                             are the agents",
                        )
                    })?;
                Ok(NodeBinding::token(tokens.clone(), daemonset, api))
            }
        }
    }

    fn token_auth(&self, api: Option<&Arc<KubeApi>>) -> Result<Option<TokenAuth>, ConfigError> {
        let (Some(namespace), Some(account)) = (&self.agent_namespace, &self.agent_service_account)
        else {
            return Ok(None);
        };
        for (flag, value) in [
            ("agent-namespace", namespace),
            ("agent-service-account", account),
        ] {
            if value.is_empty() || value.contains(':') || value.contains('/') {
                return Err(ConfigError::new(
                    flag,
                    format!("{value:?} is not a valid name"),
                ));
            }
        }
        let Some(api) = api else {
            return Ok(None);
        };
        Ok(Some(TokenAuth::new(
            namespace.clone(),
            account.clone(),
            self.authentication_audience.clone(),
            api.clone(),
        )))
    }
}

fn default_server_id() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "cplink-server".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "cplink-server",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
            "--agent-ca",
            "/nonexistent/ca.crt",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn defaults_match_the_documented_ports_and_timeouts() {
        let args = args(&[]).unwrap();
        assert_eq!(args.agent_address.port(), 8091);
        assert_eq!(args.admin_address.to_string(), "127.0.0.1:8095");
        assert_eq!(args.keepalive_interval, Duration::from_secs(10));
        assert_eq!(args.keepalive_timeout, Duration::from_secs(20));
        assert_eq!(args.server_count, 1);
        assert_eq!(args.worker_threads, None, "tokio's default: one per CPU");
    }

    #[test]
    fn zero_worker_threads_is_refused_naming_the_flag() {
        let err = args(&["--worker-threads", "0"]).unwrap_err().to_string();
        assert!(err.contains("--worker-threads"), "{err}");
        let one = args(&["--worker-threads", "1"]).unwrap();
        assert_eq!(one.worker_threads.map(NonZeroUsize::get), Some(1));
    }

    #[test]
    fn a_missing_certificate_is_reported_against_its_flag() {
        let err = args(&[]).unwrap().into_config().unwrap_err();
        assert_eq!(err.flag, "tls-cert");
        assert!(err.to_string().contains("/nonexistent/tls.crt"), "{err}");
    }

    #[test]
    fn token_authentication_needs_a_namespace_and_a_service_account() {
        assert!(args(&["--agent-service-account", "konnectivity-agent"]).is_err());
        assert!(args(&["--agent-namespace", "kube-system"]).is_err());
        assert!(args(&["--authentication-audience", "x"]).is_err());
        let a = args(&[
            "--agent-namespace",
            "kube-system",
            "--agent-service-account",
            "a:b",
        ])
        .unwrap();
        let err = a.token_auth(None).unwrap_err();
        assert_eq!(err.flag, "agent-service-account");
        let a = args(&[
            "--agent-namespace",
            "kube-system",
            "--agent-service-account",
            "konnectivity-agent",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .unwrap();
        let err = a.api().unwrap_err();
        assert_eq!(err.flag, "kubeconfig");
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    }

    /// What `--publish-server-leases` is checked for: a Lease name the API accepts, labels
    /// agents can select, and a renewal well inside the duration.
    #[test]
    fn server_leases_are_checked_before_anything_is_published() {
        let kubeconfig = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            kubeconfig.path(),
            "apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n",
        )
        .unwrap();
        let path = kubeconfig.path().display().to_string();
        let leases = |extra: &[&str]| {
            let mut argv = vec!["--publish-server-leases", "--kubeconfig", &path];
            argv.extend_from_slice(extra);
            let args = args(&argv).unwrap();
            let api = args.api().unwrap();
            let id = args.server_id.clone().unwrap_or_else(|| "s-0".into());
            args.leases(api, &id)
        };
        let config = leases(&["--server-id", "cplink-server-0"])
            .unwrap()
            .expect("published");
        assert_eq!(config.name, "konnectivity-proxy-server-cplink-server-0");
        assert_eq!(config.holder, "cplink-server-0");
        assert_eq!(config.namespace, "kube-system");
        assert_eq!(config.labels["k8s-app"], "konnectivity-server");
        assert_eq!(config.duration, Duration::from_secs(30));
        assert_eq!(config.renew_interval, Duration::from_secs(15));

        for (extra, flag) in [
            (&["--server-id", "Server_0"][..], "server-id"),
            (&["--lease-namespace", "Kube-System"], "lease-namespace"),
            (&["--lease-label", "novalue"], "lease-label"),
            (&["--lease-duration", "500ms"], "lease-duration"),
            (&["--lease-renew-interval", "30s"], "lease-renew-interval"),
        ] {
            let err = leases(extra).unwrap_err();
            assert_eq!(err.flag, flag, "{extra:?}: {err}");
        }
        // Without the flag nothing is published and no API is needed.
        let plain = args(&[]).unwrap();
        assert!(plain.leases(None, "s-0").unwrap().is_none());
    }

    #[test]
    fn token_identity_needs_its_account_audience_and_daemonset() {
        let kubeconfig = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            kubeconfig.path(),
            "apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n",
        )
        .unwrap();
        let path = kubeconfig.path().display().to_string();
        let full = [
            "--agent-identity",
            "token",
            "--agent-namespace",
            "cplink",
            "--agent-service-account",
            "agents",
            "--authentication-audience",
            "cplink.dev/cplink/link",
            "--agent-daemonset",
            "agents",
            "--kubeconfig",
            path.as_str(),
        ];
        let identity = |flags: &[&str]| {
            let a = args(flags).unwrap();
            let api = a.api()?;
            let tokens = a.token_auth(api.as_ref())?.map(Arc::new);
            a.identity(api, tokens.as_ref())
        };
        assert_eq!(identity(&full).unwrap().mode(), IdentityMode::Token);
        // Each of the four, left out, is named.
        // (clap ties the namespace and the audience to the account: they go with it.)
        for (cut, flag) in [
            (2..8, "agent-service-account"),
            (6..8, "authentication-audience"),
            (8..10, "agent-daemonset"),
        ] {
            let mut without = full.to_vec();
            without.drain(cut);
            let err = identity(&without).unwrap_err();
            assert_eq!(err.flag, flag, "{err}");
        }
        let err = identity(&["--agent-daemonset", "agents"]).unwrap_err();
        assert_eq!(err.flag, "agent-daemonset");
        let err = identity(&["--kubeconfig", path.as_str()]).unwrap_err();
        assert_eq!(err.flag, "kubeconfig");
        let certificate = identity(&[
            "--agent-identity",
            "certificate",
            "--kubeconfig",
            path.as_str(),
        ]);
        assert_eq!(certificate.unwrap().mode(), IdentityMode::Certificate);
    }

    #[test]
    fn bad_values_are_rejected_by_the_parser() {
        assert!(args(&["--server-count", "0"]).is_err());
        assert!(args(&["--dial-timeout", "soon"]).is_err());
        assert!(args(&["--agent-address", "nowhere"]).is_err());
        assert!(args(&["--log-format", "xml"]).is_err());
    }
}
