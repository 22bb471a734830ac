//! Command line and validated configuration of `cplink-agent`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cplink_proto::hello::Identifiers;
use cplink_proto::keepalive::KeepaliveConfig;
use cplink_proto::target::{Host, Target};
use cplink_proto::tls::{self, Identity, TrustAnchors};
use cplink_runtime::args::{LogArgs, TlsIdentityArgs};
use cplink_runtime::backoff::Backoff;
pub use cplink_runtime::config::ConfigError;
pub use cplink_runtime::kubeapi::ApiSource;
use ipnet::IpNet;
use rustls_pki_types::ServerName;

use crate::grpc_metadata;
use crate::policy::{Policy, Rule};
use crate::token;

/// Command line of `cplink-agent`. Every flag can also be set through its `CPLINK_*` variable;
/// list-valued variables are comma separated.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cplink-agent",
    version,
    about = "cplink tunnel agent: links out to cplink servers and dials nodes, pods and services \
             on their behalf"
)]
pub struct Args {
    /// Id of this agent, unique among the agents of a server. Defaults to --node-name, else the
    /// host name.
    #[arg(long, env = "CPLINK_AGENT_ID")]
    pub agent_id: Option<String>,

    /// Name of the node this agent runs on (downward API `spec.nodeName`).
    #[arg(long, env = "CPLINK_NODE_NAME")]
    pub node_name: Option<String>,

    /// IP address of the node (downward API `status.hostIP`); dials to it are routed here.
    #[arg(long, env = "CPLINK_HOST_IP", value_delimiter = ',')]
    pub host_ip: Vec<IpAddr>,

    /// Pod address range of the node; dials into it are routed here.
    #[arg(long, env = "CPLINK_POD_CIDR", value_delimiter = ',')]
    pub pod_cidr: Vec<IpNet>,

    /// Offer this agent for destinations no other agent claims.
    #[arg(long, env = "CPLINK_DEFAULT_ROUTE")]
    pub default_route: bool,

    /// Address (host:port) of a cplink server to link to; repeat for several. A sole address
    /// may front several servers (a load balancer, a headless Service name): the agent keeps
    /// dialing it until it is linked to as many distinct servers as they report. Several
    /// addresses are one server each. Required unless --server-service is given; not combined
    /// with it.
    #[arg(long, env = "CPLINK_SERVER_ADDRESS", value_delimiter = ',')]
    pub server_address: Vec<String>,

    /// Name expected in the server certificate. Defaults to the host of each --server-address,
    /// or to <service>.<namespace>.svc with --server-service.
    #[arg(long, env = "CPLINK_SERVER_NAME")]
    pub server_name: Option<String>,

    /// Find the servers in the EndpointSlices of this Service (label
    /// kubernetes.io/service-name), watched, instead of --server-address: one link to every
    /// endpoint listed and not terminating, ready or not (a server becomes ready once agents
    /// link to it). An endpoint that leaves the slices is no longer dialed; its link stays
    /// until the server closes it. The port is the slices' only port, else their port named
    /// `agents`. Needs list and watch on endpointslices.
    #[arg(long, env = "CPLINK_SERVER_SERVICE")]
    pub server_service: Option<String>,

    /// Namespace of --server-service. Defaults to the agent pod's namespace (read from its
    /// service-account mount).
    #[arg(long, env = "CPLINK_SERVER_NAMESPACE")]
    pub server_namespace: Option<String>,

    /// At start-up, read the pod ranges of the Node named by --node-name (spec.podCIDRs) and
    /// announce them with --pod-cidr's. Retried for up to 30s while the API is unreachable,
    /// then the agent starts without them. Needs get on nodes.
    #[arg(long, env = "CPLINK_POD_CIDR_FROM_NODE")]
    pub pod_cidr_from_node: bool,

    /// kubeconfig for --server-service and --pod-cidr-from-node; the in-cluster service
    /// account when unset.
    #[arg(long, env = "CPLINK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The agent's client certificate and key.
    #[command(flatten)]
    pub tls: TlsIdentityArgs,

    /// CA bundle (PEM) that signs the server certificate.
    #[arg(long, env = "CPLINK_SERVER_CA")]
    pub server_ca: PathBuf,

    /// Allowed destination, CIDR[:PORT[-PORT]] (IPv6 with ports in brackets: [fd00::/8]:443);
    /// repeat for several. Without any, every destination but link-local ones is allowed.
    #[arg(long, env = "CPLINK_ALLOW", value_delimiter = ',')]
    pub allow: Vec<Rule>,

    /// How long a dial to a destination may take.
    #[arg(long, env = "CPLINK_DIAL_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,

    /// Address of the admin HTTP endpoint (/healthz, /readyz, /metrics).
    #[arg(long, env = "CPLINK_ADMIN_ADDRESS", default_value = "127.0.0.1:8096")]
    pub admin_address: SocketAddr,

    /// Serve the read-only debug view /debug/links on the admin endpoint: every server address,
    /// its links' servers, states, ages and tunneled connections, and why an address is down.
    /// It names servers and their addresses: whoever reaches the admin port reads it.
    #[arg(long, env = "CPLINK_DEBUG_ENDPOINTS")]
    pub debug_endpoints: bool,

    /// On SIGTERM, how long in-flight tunneled connections may take to finish.
    #[arg(long, env = "CPLINK_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Interval between HTTP/2 PINGs on each link. Defaults to 30s with --protocol
    /// konnectivity. Upstream konnectivity servers older than v0.0.33 accept a PING only every
    /// 5 minutes on a link they send nothing on: they answer with GOAWAY too_many_pings and
    /// close the link; the agent then doubles the interval for that server (at most 10 minutes).
    #[arg(
        long,
        env = "CPLINK_KEEPALIVE_INTERVAL",
        default_value = "10s",
        default_value_if("protocol", "konnectivity", Some("30s")),
        value_parser = humantime::parse_duration
    )]
    pub keepalive_interval: Duration,

    /// How long a PING may go unanswered before the link is declared dead.
    #[arg(long, env = "CPLINK_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Longest pause between two attempts to link to a server.
    #[arg(long, env = "CPLINK_RECONNECT_MAX_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_max_backoff: Duration,

    /// Most tunneled connections one native link carries at once (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS). Each may buffer up to 256 KiB per direction when its
    /// reader stalls, so this bounds a link's memory: 1024 streams, 256 MiB at worst. Dials
    /// beyond it wait for a stream to end, up to the server's dial timeout.
    #[arg(
        long,
        env = "CPLINK_MAX_STREAMS_PER_LINK",
        default_value_t = cplink_proto::DEFAULT_MAX_STREAMS_PER_LINK,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(cplink_proto::MAX_STREAMS_PER_LINK_LIMIT))
    )]
    pub max_streams_per_link: u32,

    /// Threads that run the agent's tasks. 1, the default, runs them all on the main thread.
    /// It suits a DaemonSet, whose agent shares every node, however many cores it has, with
    /// the node's workloads: one thread carries a node's tunnels at about 1 s of CPU per GiB,
    /// costs less CPU per byte and per dial than a pool (no wake-ups between threads) and the
    /// least memory on every node of the cluster. More threads raise the agent's ceiling on
    /// a node that tunnels several Gbit/s.
    #[arg(
        long,
        env = "CPLINK_WORKER_THREADS",
        value_name = "N",
        default_value = "1",
        value_parser = cplink_runtime::args::parse_worker_threads
    )]
    pub worker_threads: NonZeroUsize,

    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,

    /// Protocol spoken to the servers: `cplink` (native links) or `konnectivity` (the
    /// AgentService of an apiserver-network-proxy server, or of cplink-server).
    #[arg(long, env = "CPLINK_PROTOCOL", value_enum, default_value_t = Protocol::Cplink)]
    pub protocol: Protocol,

    /// File holding a service-account token (a projected, pod-bound token in a DaemonSet), sent
    /// in every native hello and, with --protocol konnectivity, as `authorization: Bearer
    /// <token>`. Servers run with `--agent-identity token` bind the agent to its pod's node with
    /// it. Read again for each link, so a rotated token is picked up.
    #[arg(long, env = "CPLINK_SERVICE_ACCOUNT_TOKEN_PATH")]
    pub service_account_token_path: Option<PathBuf>,
}

/// The default PING interval of konnectivity links. Newer upstream servers accept it; those
/// older than v0.0.33 enforce grpc-go's default `MinTime` of 5 minutes on links they send
/// nothing on and answer with GOAWAY `too_many_pings`, after which the agent doubles its
/// interval for that server.
pub const KONNECTIVITY_MIN_PING_INTERVAL: Duration = Duration::from_secs(30);

/// The protocol links speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// Native cplink links: TLS with ALPN `cplink/1`, a hello, then HTTP/2 with one stream per
    /// tunneled connection.
    #[default]
    Cplink,
    /// The konnectivity agent protocol: TLS with ALPN `h2`, one gRPC `AgentService/Connect`
    /// stream per server carrying every tunneled connection.
    Konnectivity,
}

impl Protocol {
    /// The name used on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Cplink => "cplink",
            Protocol::Konnectivity => "konnectivity",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server to link to.
#[derive(Debug, Clone)]
pub struct ServerEndpoint {
    /// Where to dial, `host:port`.
    pub address: String,
    /// Name to verify in its certificate.
    pub server_name: ServerName<'static>,
}

/// Where the servers are found through EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDiscovery {
    /// The servers' Service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Name to verify in the certificate of every server found.
    pub server_name: ServerName<'static>,
}

impl ServerDiscovery {
    /// `namespace/service`, for logs and readiness.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.service)
    }
}

/// Where the pod's namespace is mounted with its service-account token.
pub const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// How long the agent tries to read its Node's pod ranges before starting without them.
pub const NODE_LOOKUP_BUDGET: Duration = Duration::from_secs(30);

/// Backoff between link attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First pause.
    pub initial: Duration,
    /// Longest pause.
    pub max: Duration,
}

impl BackoffConfig {
    /// A backoff starting over: jittered, so that agents cut off together (a server restart, an
    /// API outage) do not redial in lockstep.
    pub(crate) fn start(self) -> Backoff {
        Backoff::jittered(self.initial, self.max)
    }
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Agent id.
    pub agent_id: String,
    /// Node name.
    pub node_name: Option<String>,
    /// Routing identifiers.
    pub identifiers: Identifiers,
    /// Fixed server addresses to link to (none with [`Config::discovery`]).
    pub servers: Vec<ServerEndpoint>,
    /// Servers found through EndpointSlices instead of fixed addresses.
    pub discovery: Option<ServerDiscovery>,
    /// Add the pod ranges of the agent's Node to [`Config::identifiers`] at start-up.
    pub pod_cidr_from_node: bool,
    /// How long to try reading the Node before starting without its pod ranges.
    pub node_lookup_budget: Duration,
    /// The Kubernetes API, when discovery or the Node lookup needs it.
    pub api: Option<ApiSource>,
    /// Protocol spoken on links.
    pub protocol: Protocol,
    /// TLS for links, offering the ALPN id of [`Config::protocol`].
    pub tls: Arc<rustls::ClientConfig>,
    /// Service-account token file sent to konnectivity servers, read at each link attempt.
    pub service_account_token_path: Option<PathBuf>,
    /// Destination policy.
    pub policy: Policy,
    /// Dial budget per destination.
    pub dial_timeout: Duration,
    /// Budget to establish a link (TCP, TLS, hello).
    pub link_timeout: Duration,
    /// Drain budget on shutdown.
    pub drain_timeout: Duration,
    /// Whether the admin endpoint serves the debug view.
    pub debug_endpoints: bool,
    /// Link liveness.
    pub keepalive: KeepaliveConfig,
    /// Pauses between link attempts.
    pub backoff: BackoffConfig,
    /// Concurrent tunneled connections per native link.
    pub max_streams_per_link: u32,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("agent_id", &self.agent_id)
            .field("node_name", &self.node_name)
            .field("identifiers", &self.identifiers)
            .field("servers", &self.servers)
            .field("discovery", &self.discovery)
            .field("pod_cidr_from_node", &self.pod_cidr_from_node)
            .field("api", &self.api)
            .field("protocol", &self.protocol)
            .field(
                "service_account_token_path",
                &self.service_account_token_path,
            )
            .field("policy", &self.policy)
            .field("dial_timeout", &self.dial_timeout)
            .finish_non_exhaustive()
    }
}

impl Args {
    /// Checks every flag and loads the TLS material, before anything connects or listens.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        self.check_server_source()?;
        let identity = Identity::from_pem_files(&self.tls.tls_cert, &self.tls.tls_key)
            .map_err(|e| TlsIdentityArgs::error(e.concerns_key(), e))?;
        let server_ca = TrustAnchors::from_pem_file(&self.server_ca)
            .map_err(|e| ConfigError::new("server-ca", e))?;
        let mut tls = tls::link_client_config(&identity, &server_ca)
            .map_err(|e| ConfigError::new("tls-key", e))?;
        if self.protocol == Protocol::Konnectivity {
            // gRPC runs on plain HTTP/2; everything else about the link's TLS stays the same.
            let mut h2 = (*tls).clone();
            h2.alpn_protocols = vec![cplink_proto::ALPN_H2.to_vec()];
            tls = Arc::new(h2);
        }

        let mut servers = Vec::with_capacity(self.server_address.len());
        for address in &self.server_address {
            let target: Target = address
                .parse()
                .map_err(|e| ConfigError::new("server-address", e))?;
            let name = match (&self.server_name, &target.host) {
                (Some(name), _) => name.clone(),
                (None, Host::Ip(ip)) => ip.to_string(),
                (None, Host::Name(name)) => name.clone(),
            };
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| ConfigError::new("server-name", format!("{name:?}: {e}")))?;
            if self.protocol == Protocol::Konnectivity {
                grpc_metadata::origin(address)
                    .map_err(|e| ConfigError::new("server-address", format!("{address:?}: {e}")))?;
            }
            servers.push(ServerEndpoint {
                address: address.clone(),
                server_name,
            });
        }
        for (flag, value) in [
            ("dial-timeout", self.dial_timeout),
            ("keepalive-interval", self.keepalive_interval),
            ("keepalive-timeout", self.keepalive_timeout),
            ("reconnect-max-backoff", self.reconnect_max_backoff),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(flag, "must be greater than zero"));
            }
        }
        let discovery = match &self.server_service {
            Some(service) => Some(self.discovery(service, Path::new(POD_NAMESPACE_FILE))?),
            None => None,
        };
        let api = if discovery.is_some() || self.pod_cidr_from_node {
            Some(ApiSource::from_flag(self.kubeconfig.as_deref())?)
        } else {
            None
        };
        let agent_id = match (self.agent_id, &self.node_name) {
            (Some(id), _) if id.trim().is_empty() => {
                return Err(ConfigError::new("agent-id", "must not be empty"));
            }
            (Some(id), _) => id,
            (None, Some(node)) if !node.is_empty() => node.clone(),
            (None, _) => hostname().ok_or_else(|| {
                ConfigError::new(
                    "agent-id",
                    "not set and neither --node-name nor the host name is known",
                )
            })?,
        };
        if let Some(path) = &self.service_account_token_path {
            // Checked now so that a wrong path fails the start, not every link attempt.
            token::read_now(path).map_err(|e| ConfigError::new("service-account-token-path", e))?;
        }
        if self.protocol == Protocol::Konnectivity {
            grpc_metadata::agent_id_value(&agent_id).map_err(|e| {
                ConfigError::new(
                    "agent-id",
                    format!("{agent_id:?}: {e} (--protocol konnectivity)"),
                )
            })?;
        }
        Ok(Config {
            agent_id,
            node_name: self.node_name.filter(|n| !n.is_empty()),
            identifiers: Identifiers {
                host_ips: self.host_ip,
                pod_cidrs: self.pod_cidr,
                default_route: self.default_route,
            },
            servers,
            discovery,
            pod_cidr_from_node: self.pod_cidr_from_node,
            node_lookup_budget: NODE_LOOKUP_BUDGET,
            api,
            protocol: self.protocol,
            tls,
            service_account_token_path: self.service_account_token_path,
            policy: Policy::new(self.allow),
            dial_timeout: self.dial_timeout,
            link_timeout: Duration::from_secs(15),
            drain_timeout: self.drain_timeout,
            debug_endpoints: self.debug_endpoints,
            keepalive: KeepaliveConfig {
                interval: self.keepalive_interval,
                timeout: self.keepalive_timeout,
            },
            backoff: BackoffConfig {
                initial: Duration::from_millis(250).min(self.reconnect_max_backoff),
                max: self.reconnect_max_backoff,
            },
            max_streams_per_link: self.max_streams_per_link,
        })
    }
}

impl Args {
    /// Fixed addresses or discovery, one of them, and the flags that only make sense with one.
    fn check_server_source(&self) -> Result<(), ConfigError> {
        let node_name = self.node_name.as_deref().filter(|n| !n.is_empty());
        match (&self.server_service, self.server_address.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::new(
                    "server-service",
                    "cannot be combined with --server-address: discovery finds every server \
                     itself; give one or the other",
                ));
            }
            (None, true) => {
                return Err(ConfigError::new(
                    "server-address",
                    "required: give the servers' address, or --server-service to find them",
                ));
            }
            _ => {}
        }
        if self.server_service.is_none() && self.server_namespace.is_some() {
            return Err(ConfigError::new(
                "server-namespace",
                "only used with --server-service",
            ));
        }
        if self.pod_cidr_from_node && node_name.is_none() {
            return Err(ConfigError::new(
                "pod-cidr-from-node",
                "needs --node-name: the Node whose pod ranges to read",
            ));
        }
        if self.kubeconfig.is_some() && self.server_service.is_none() && !self.pod_cidr_from_node {
            return Err(ConfigError::new(
                "kubeconfig",
                "only used with --server-service or --pod-cidr-from-node",
            ));
        }
        Ok(())
    }

    /// The Service to discover the servers from; the namespace defaults to the one in
    /// `namespace_file`.
    fn discovery(
        &self,
        service: &str,
        namespace_file: &Path,
    ) -> Result<ServerDiscovery, ConfigError> {
        check_dns_label(service).map_err(|e| ConfigError::new("server-service", e))?;
        let namespace = match &self.server_namespace {
            Some(namespace) => namespace.clone(),
            None => std::fs::read_to_string(namespace_file)
                .map(|text| text.trim().to_owned())
                .map_err(|e| {
                    ConfigError::new(
                        "server-namespace",
                        format!(
                            "not set, and the pod's namespace cannot be read from {}: {e}",
                            namespace_file.display()
                        ),
                    )
                })?,
        };
        check_dns_label(&namespace).map_err(|e| ConfigError::new("server-namespace", e))?;
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => format!("{service}.{namespace}.svc"),
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| ConfigError::new("server-name", format!("{name:?}: {e}")))?;
        Ok(ServerDiscovery {
            service: service.to_owned(),
            namespace,
            server_name,
        })
    }
}

/// Checks a Kubernetes object name that must be a DNS label (RFC 1123).
fn check_dns_label(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["cplink-agent"];
        if !extra.contains(&"--server-service") {
            argv.extend_from_slice(&["--server-address", "cplink.example:8091"]);
        }
        argv.extend_from_slice(&[
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
            "--server-ca",
            "/nonexistent/ca.crt",
        ]);
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn bad_cidrs_are_rejected_naming_the_flag() {
        let err = args(&["--allow", "10.0.0.0/33"]).unwrap_err().to_string();
        assert!(err.contains("--allow"), "{err}");
        let err = args(&["--pod-cidr", "nope"]).unwrap_err().to_string();
        assert!(err.contains("--pod-cidr"), "{err}");
    }

    #[test]
    fn lists_accept_repetition_and_commas() {
        let a = args(&[
            "--allow",
            "10.0.0.0/8:10250,10.244.0.0/16",
            "--allow",
            "192.168.0.0/16",
        ])
        .unwrap();
        assert_eq!(a.allow.len(), 3);
        let a = args(&["--server-address", "other:8091"]).unwrap();
        assert_eq!(a.server_address, vec!["cplink.example:8091", "other:8091"]);
    }

    #[test]
    fn one_worker_thread_unless_told_otherwise() {
        assert_eq!(args(&[]).unwrap().worker_threads.get(), 1);
        let two = args(&["--worker-threads", "2"]).unwrap();
        assert_eq!(two.worker_threads.get(), 2);
        let err = args(&["--worker-threads", "0"]).unwrap_err().to_string();
        assert!(err.contains("--worker-threads"), "{err}");
    }

    #[test]
    fn a_missing_certificate_is_reported_against_its_flag() {
        let err = args(&[]).unwrap().into_config().unwrap_err();
        assert_eq!(err.flag, "tls-cert");
        assert!(err.message.contains("/nonexistent/tls.crt"), "{err}");
    }

    /// A self-signed certificate serving as client certificate and server CA alike.
    fn tls_files(dir: &std::path::Path) -> [String; 3] {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&crt, cert.cert.pem()).unwrap();
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        let crt = crt.display().to_string();
        [crt.clone(), key.display().to_string(), crt]
    }

    /// A configuration with a fresh certificate in `dir`, one server address unless `extra`
    /// names a Service, and `extra`'s flags.
    pub(crate) fn config(dir: &std::path::Path, extra: &[&str]) -> Result<Config, ConfigError> {
        let [crt, key, ca] = tls_files(dir);
        let mut argv = vec!["cplink-agent"];
        if !extra.contains(&"--server-service") {
            argv.extend_from_slice(&["--server-address", "cplink.example:8091"]);
        }
        argv.extend_from_slice(&["--tls-cert", &crt, "--tls-key", &key, "--server-ca", &ca]);
        if !extra.contains(&"--agent-id") {
            argv.extend_from_slice(&["--agent-id", "node-1"]);
        }
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap().into_config()
    }

    #[test]
    fn the_protocol_defaults_to_cplink_and_sets_the_alpn_id() {
        let dir = tempfile::tempdir().unwrap();
        let native = config(dir.path(), &[]).unwrap();
        assert_eq!(native.protocol, Protocol::Cplink);
        assert_eq!(native.tls.alpn_protocols, [b"cplink/1".to_vec()]);
        let konnectivity = config(dir.path(), &["--protocol", "konnectivity"]).unwrap();
        assert_eq!(konnectivity.protocol, Protocol::Konnectivity);
        assert_eq!(konnectivity.tls.alpn_protocols, [b"h2".to_vec()]);

        let err = args(&["--protocol", "grpc"]).unwrap_err().to_string();
        assert!(err.contains("--protocol"), "{err}");
    }

    #[test]
    fn konnectivity_links_ping_no_more_often_than_upstream_servers_allow() {
        let native = args(&[]).unwrap();
        assert_eq!(native.keepalive_interval, Duration::from_secs(10));
        let konnectivity = args(&["--protocol", "konnectivity"]).unwrap();
        assert_eq!(
            konnectivity.keepalive_interval,
            KONNECTIVITY_MIN_PING_INTERVAL
        );
        let explicit = args(&["--protocol", "konnectivity", "--keepalive-interval", "5s"]).unwrap();
        assert_eq!(explicit.keepalive_interval, Duration::from_secs(5));
    }

    #[test]
    fn a_token_path_must_hold_a_readable_token_for_either_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let token_arg = token.display().to_string();
        let flags = |protocol| {
            [
                "--protocol",
                protocol,
                "--service-account-token-path",
                token_arg.as_str(),
            ]
        };

        let err = config(dir.path(), &flags("konnectivity")).unwrap_err();
        assert_eq!(err.flag, "service-account-token-path");
        assert!(err.message.contains(&token_arg), "{err}");

        std::fs::write(&token, "\n").unwrap();
        let err = config(dir.path(), &flags("konnectivity")).unwrap_err();
        assert_eq!(err.flag, "service-account-token-path");
        assert!(err.message.contains("empty"), "{err}");

        std::fs::write(&token, "eyJhbGciOi.x.y\n").unwrap();
        let config_ok = config(dir.path(), &flags("konnectivity")).unwrap();
        assert_eq!(
            config_ok.service_account_token_path.as_deref(),
            Some(token.as_path())
        );
        assert!(
            !format!("{config_ok:?}").contains("eyJ"),
            "the token is never held, let alone printed"
        );

        let native = config(dir.path(), &flags("cplink")).unwrap();
        assert_eq!(
            native.service_account_token_path.as_deref(),
            Some(token.as_path()),
            "native hellos carry the token too"
        );
    }

    #[test]
    fn a_konnectivity_agent_id_must_fit_in_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let id = ["--agent-id", "nœud-1"];
        assert!(
            config(dir.path(), &id).is_ok(),
            "the native hello carries any id"
        );
        let err = config(
            dir.path(),
            &[&id[..], &["--protocol", "konnectivity"]].concat(),
        )
        .unwrap_err();
        assert_eq!(err.flag, "agent-id");
    }

    #[test]
    fn a_server_address_or_a_service_is_required_but_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let [crt, key, ca] = tls_files(dir.path());
        let bare = Args::try_parse_from([
            "cplink-agent",
            "--tls-cert",
            &crt,
            "--tls-key",
            &key,
            "--server-ca",
            &ca,
        ])
        .unwrap();
        let err = bare.into_config().unwrap_err();
        assert_eq!(err.flag, "server-address");
        assert!(err.message.contains("--server-service"), "{err}");

        let err = config(
            dir.path(),
            &[
                "--server-service",
                "link-agent-endpoint",
                "--server-address",
                "10.0.0.1:8091",
            ],
        )
        .unwrap_err();
        assert_eq!(err.flag, "server-service");
        assert!(err.message.contains("--server-address"), "{err}");
    }

    /// A kubeconfig holding a token, for flags that need the API.
    fn kubeconfig(dir: &std::path::Path) -> String {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: \"https://127.0.0.1:6443\"}
users:
- name: u
  user: {token: sekrit-token}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
",
        )
        .unwrap();
        path.display().to_string()
    }

    #[test]
    fn discovery_names_the_service_and_defaults_the_server_name_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = kubeconfig(dir.path());
        let flags = [
            "--server-service",
            "link-agent-endpoint",
            "--server-namespace",
            "tunnels",
            "--kubeconfig",
            kubeconfig.as_str(),
        ];
        let found = config(dir.path(), &flags).unwrap();
        assert!(found.servers.is_empty());
        let discovery = found.discovery.clone().unwrap();
        assert_eq!(discovery.qualified_name(), "tunnels/link-agent-endpoint");
        assert_eq!(
            discovery.server_name.to_str(),
            "link-agent-endpoint.tunnels.svc"
        );
        assert!(matches!(found.api, Some(ApiSource::Kubeconfig(..))));
        assert!(
            !format!("{found:?}").contains("sekrit"),
            "credentials are not printed"
        );

        let named = config(
            dir.path(),
            &[&flags[..], &["--server-name", "servers.example"]].concat(),
        )
        .unwrap();
        assert_eq!(
            named.discovery.unwrap().server_name.to_str(),
            "servers.example"
        );
        let konnectivity = config(
            dir.path(),
            &[&flags[..], &["--protocol", "konnectivity"]].concat(),
        );
        assert!(konnectivity.is_ok(), "discovery works with both protocols");

        for (flag, bad) in [
            ("server-service", "Agent_Endpoint"),
            ("server-namespace", "Tunnels"),
        ] {
            let mut bad_flags = flags;
            let at = bad_flags
                .iter()
                .position(|f| *f == format!("--{flag}"))
                .unwrap();
            bad_flags[at + 1] = bad;
            let err = config(dir.path(), &bad_flags).unwrap_err();
            assert_eq!(err.flag, flag);
            assert!(err.message.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_namespace_defaults_to_the_pods() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("namespace");
        let parsed = args(&["--server-service", "link-agent-endpoint"]).unwrap();
        let err = parsed.discovery("link-agent-endpoint", &file).unwrap_err();
        assert_eq!(err.flag, "server-namespace");
        assert!(err.message.contains(&file.display().to_string()), "{err}");
        std::fs::write(&file, "tunnels\n").unwrap();
        let found = parsed.discovery("link-agent-endpoint", &file).unwrap();
        assert_eq!(found.namespace, "tunnels");
    }

    #[test]
    fn kubernetes_flags_need_what_they_serve() {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = kubeconfig(dir.path());
        let err = config(dir.path(), &["--server-namespace", "tunnels"]).unwrap_err();
        assert_eq!(err.flag, "server-namespace");
        let err = config(dir.path(), &["--kubeconfig", &kubeconfig]).unwrap_err();
        assert_eq!(err.flag, "kubeconfig");
        let err = config(dir.path(), &["--pod-cidr-from-node"]).unwrap_err();
        assert_eq!(err.flag, "pod-cidr-from-node");
        assert!(err.message.contains("--node-name"), "{err}");

        let from_node = config(
            dir.path(),
            &[
                "--pod-cidr-from-node",
                "--node-name",
                "node-1",
                "--kubeconfig",
                &kubeconfig,
            ],
        )
        .unwrap();
        assert!(from_node.pod_cidr_from_node);
        assert!(from_node.api.is_some());
        assert_eq!(from_node.servers.len(), 1, "fixed addresses still work");

        let err = config(
            dir.path(),
            &[
                "--pod-cidr-from-node",
                "--node-name",
                "node-1",
                "--kubeconfig",
                "/nonexistent",
            ],
        )
        .unwrap_err();
        assert_eq!(err.flag, "kubeconfig");
        assert!(err.message.contains("/nonexistent"), "{err}");

        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            let err = config(
                dir.path(),
                &["--pod-cidr-from-node", "--node-name", "node-1"],
            )
            .unwrap_err();
            assert_eq!(err.flag, "kubeconfig");
            assert!(err.message.contains("in-cluster"), "{err}");
        }
    }
}
