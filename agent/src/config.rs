//! Command line and validated configuration of `cplink-agent`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
pub use cplink_proto::config::ConfigError;
use cplink_proto::hello::Identifiers;
use cplink_proto::keepalive::KeepaliveConfig;
use cplink_proto::target::{Host, Target};
use cplink_proto::telemetry::LogFormat;
use cplink_proto::tls::{self, Identity, TrustAnchors};
use ipnet::IpNet;
use rustls_pki_types::ServerName;

use crate::policy::{Policy, Rule};

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

    /// Address (host:port) of a cplink server to link to; repeat for several.
    #[arg(
        long,
        env = "CPLINK_SERVER_ADDRESS",
        value_delimiter = ',',
        required = true
    )]
    pub server_address: Vec<String>,

    /// Name expected in the server certificate. Defaults to the host of each --server-address.
    #[arg(long, env = "CPLINK_SERVER_NAME")]
    pub server_name: Option<String>,

    /// Agent client certificate chain (PEM).
    #[arg(long, env = "CPLINK_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "CPLINK_TLS_KEY")]
    pub tls_key: PathBuf,

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

    /// On SIGTERM, how long in-flight tunneled connections may take to finish.
    #[arg(long, env = "CPLINK_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Interval between HTTP/2 PINGs on each link.
    #[arg(long, env = "CPLINK_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a PING may go unanswered before the link is declared dead.
    #[arg(long, env = "CPLINK_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Longest pause between two attempts to link to a server.
    #[arg(long, env = "CPLINK_RECONNECT_MAX_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_max_backoff: Duration,

    /// Log output format.
    #[arg(long, env = "CPLINK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `cplink_agent=debug,info`.
    #[arg(long, env = "CPLINK_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// A server to link to.
#[derive(Debug, Clone)]
pub struct ServerEndpoint {
    /// Where to dial, `host:port`.
    pub address: String,
    /// Name to verify in its certificate.
    pub server_name: ServerName<'static>,
}

/// Backoff between link attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First pause.
    pub initial: Duration,
    /// Longest pause.
    pub max: Duration,
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
    /// Servers to link to.
    pub servers: Vec<ServerEndpoint>,
    /// TLS for links.
    pub tls: Arc<rustls::ClientConfig>,
    /// Destination policy.
    pub policy: Policy,
    /// Dial budget per destination.
    pub dial_timeout: Duration,
    /// Budget to establish a link (TCP, TLS, hello).
    pub link_timeout: Duration,
    /// Drain budget on shutdown.
    pub drain_timeout: Duration,
    /// Link liveness.
    pub keepalive: KeepaliveConfig,
    /// Pauses between link attempts.
    pub backoff: BackoffConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("agent_id", &self.agent_id)
            .field("node_name", &self.node_name)
            .field("identifiers", &self.identifiers)
            .field("servers", &self.servers)
            .field("policy", &self.policy)
            .field("dial_timeout", &self.dial_timeout)
            .finish_non_exhaustive()
    }
}

impl Args {
    /// Checks every flag and loads the TLS material, before anything connects or listens.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let identity = Identity::from_pem_files(&self.tls_cert, &self.tls_key)
            .map_err(|e| ConfigError::tls(e, "tls-cert", "tls-key"))?;
        let server_ca = TrustAnchors::from_pem_file(&self.server_ca)
            .map_err(|e| ConfigError::new("server-ca", e))?;
        let tls = tls::link_client_config(&identity, &server_ca)
            .map_err(|e| ConfigError::new("tls-key", e))?;

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
        Ok(Config {
            agent_id,
            node_name: self.node_name.filter(|n| !n.is_empty()),
            identifiers: Identifiers {
                host_ips: self.host_ip,
                pod_cidrs: self.pod_cidr,
                default_route: self.default_route,
            },
            servers,
            tls,
            policy: Policy::new(self.allow),
            dial_timeout: self.dial_timeout,
            link_timeout: Duration::from_secs(15),
            drain_timeout: self.drain_timeout,
            keepalive: KeepaliveConfig {
                interval: self.keepalive_interval,
                timeout: self.keepalive_timeout,
            },
            backoff: BackoffConfig {
                initial: Duration::from_millis(250).min(self.reconnect_max_backoff),
                max: self.reconnect_max_backoff,
            },
        })
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "cplink-agent",
            "--server-address",
            "cplink.example:8091",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
            "--server-ca",
            "/nonexistent/ca.crt",
        ];
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
    fn a_missing_certificate_is_reported_against_its_flag() {
        let err = args(&[]).unwrap().into_config().unwrap_err();
        assert_eq!(err.flag, "tls-cert");
        assert!(err.message.contains("/nonexistent/tls.crt"), "{err}");
    }

    #[test]
    fn a_server_address_is_required() {
        assert!(
            Args::try_parse_from([
                "cplink-agent",
                "--tls-cert",
                "a",
                "--tls-key",
                "b",
                "--server-ca",
                "c"
            ])
            .is_err()
        );
    }
}
