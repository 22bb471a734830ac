//! Checks the schema cannot express (no CEL on kube-apiserver 1.20) and parses the spec's
//! stringly fields once, so builders work with typed values.
//!
//! A failure becomes a `Ready=False`/`InvalidSpec` condition whose message names the field;
//! it never becomes a reconcile error, which would only retry the same bad spec.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::crd::{AllowedDestination, ControlPlaneLinkSpec, FrontendMode, GRPC_SOCKET_FILE};

/// Longest suffix appended to a link name for a namespaced object that must be a DNS label
/// (Services): `-agent-endpoint`.
const LONGEST_LABEL_SUFFIX: usize = "-agent-endpoint".len();

/// Longest socket path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A spec value the operator cannot act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    /// Path of the offending field, e.g. `spec.tls.validity`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl InvalidSpec {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The parts of a spec that needed parsing, in typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    /// Lifetime of issued certificates.
    pub validity: Duration,
    /// How long before expiry certificates are reissued.
    pub renew_before: Duration,
    /// Where kube-apiserver reaches the frontend, when not the Service DNS name.
    pub frontend_external: Option<ExternalAddress>,
    /// Where agents reach the servers, when not the Service DNS name.
    pub agent_endpoint_external: Option<ExternalAddress>,
    /// Values of the agent's `--allow` flags.
    pub allow: Vec<String>,
    /// In `GRPC` mode: the socket's path on the node, inside `frontend.socketHostPath`.
    pub grpc_socket: Option<String>,
}

/// A host the outside world uses to reach a Service, with an optional port override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalAddress {
    /// DNS name or IP address.
    pub host: Host,
    /// Port, when it differs from the Service port (e.g. a NodePort).
    pub port: Option<u16>,
}

/// A DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    /// A DNS name (RFC 1123 subdomain).
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    /// Formats the host as it appears in a URL or `host:port` (IPv6 in brackets).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Dns(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

impl FromStr for ExternalAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self {
                host: Host::Ip(ip),
                port: None,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            _ if s.starts_with('[') && s.ends_with(']') => (s, None),
            Some((host, port)) => (host, Some(parse_port(port)?)),
            None => (s, None),
        };
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => Host::Ip(IpAddr::V6(
                v6.parse()
                    .map_err(|_| format!("invalid IPv6 address {v6:?}"))?,
            )),
            None => match host.parse::<IpAddr>() {
                Ok(ip @ IpAddr::V4(_)) => Host::Ip(ip),
                Ok(IpAddr::V6(_)) => return Err("IPv6 addresses with a port need brackets".into()),
                Err(_) if is_dns_name(host) => Host::Dns(host.to_owned()),
                Err(_) => return Err(format!("{host:?} is neither an IP address nor a DNS name")),
            },
        };
        Ok(Self { host, port })
    }
}

/// Whether `name` is an RFC 1123 subdomain (lower case, as Kubernetes requires).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(port) if port >= 1 => Ok(port),
        _ => Err(format!("invalid port {s:?} (expected 1-65535)")),
    }
}

fn parse_duration(field: &str, value: &str) -> Result<Duration, InvalidSpec> {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(InvalidSpec::new(field, "duration must be positive")),
        Err(_) => Err(InvalidSpec::new(
            field,
            format!("invalid duration {value:?} (e.g. \"8760h\")"),
        )),
    }
}

const LINK_LOCAL_V4: &str = "169.254.0.0/16";
const LINK_LOCAL_V6: &str = "fe80::/10";

/// Parses a destination range, refusing anything that reaches link-local addresses (cloud
/// metadata services live there; a tunnel must never expose them to the control plane).
fn parse_cidr(field: &str, value: &str) -> Result<IpNet, InvalidSpec> {
    let net: IpNet = value.parse().map_err(|_| {
        InvalidSpec::new(
            field,
            format!("invalid CIDR {value:?} (e.g. \"10.96.0.0/12\")"),
        )
    })?;
    let link_local: IpNet = match net {
        IpNet::V4(_) => LINK_LOCAL_V4.parse(),
        IpNet::V6(_) => LINK_LOCAL_V6.parse(),
    }
    // Both constants are well-formed CIDRs; the fallback is unreachable but harmless.
    .unwrap_or(net);
    if net.contains(&link_local.network()) || link_local.contains(&net.network()) {
        return Err(InvalidSpec::new(
            field,
            format!("{value} overlaps the link-local range {link_local}, which is never allowed"),
        ));
    }
    Ok(net.trunc())
}

fn parse_port_range(field: &str, value: &str) -> Result<String, InvalidSpec> {
    let invalid = || {
        InvalidSpec::new(
            field,
            format!("invalid port {value:?} (expected \"443\" or \"30000-32767\")"),
        )
    };
    match value.split_once('-') {
        None => Ok(parse_port(value).map_err(|_| invalid())?.to_string()),
        Some((lo, hi)) => {
            let (lo, hi) = (
                parse_port(lo).map_err(|_| invalid())?,
                parse_port(hi).map_err(|_| invalid())?,
            );
            if lo > hi {
                return Err(invalid());
            }
            Ok(format!("{lo}-{hi}"))
        }
    }
}

/// `--allow` values for one range: the bare CIDR (all ports) or one value per port entry.
fn allow_args(net: IpNet, ports: &[String]) -> Vec<String> {
    if ports.is_empty() {
        return vec![net.to_string()];
    }
    ports
        .iter()
        .map(|port| match net {
            IpNet::V4(_) => format!("{net}:{port}"),
            IpNet::V6(_) => format!("[{net}]:{port}"),
        })
        .collect()
}

fn allowed_destinations(spec: &ControlPlaneLinkSpec) -> Result<Vec<String>, InvalidSpec> {
    let mut allow = Vec::new();
    if spec.agent.allowed_destinations.is_empty() {
        // The kubelet of the agent's own node; the agent expands $(CPLINK_HOST_IP) from the
        // downward API at container start.
        allow.push("$(CPLINK_HOST_IP)/32:10250".to_owned());
        for (i, cidr) in spec.network.pod_cidrs.iter().enumerate() {
            let net = parse_cidr(&format!("spec.network.podCIDRs[{i}]"), cidr)?;
            allow.extend(allow_args(net, &[]));
        }
        for (i, cidr) in spec.network.service_cidrs.iter().enumerate() {
            let net = parse_cidr(&format!("spec.network.serviceCIDRs[{i}]"), cidr)?;
            allow.extend(allow_args(net, &[]));
        }
        return Ok(allow);
    }
    for (i, AllowedDestination { cidr, ports }) in
        spec.agent.allowed_destinations.iter().enumerate()
    {
        let field = format!("spec.agent.allowedDestinations[{i}]");
        let net = parse_cidr(&format!("{field}.cidr"), cidr)?;
        let ports = ports
            .iter()
            .enumerate()
            .map(|(j, p)| parse_port_range(&format!("{field}.ports[{j}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        allow.extend(allow_args(net, &ports));
    }
    Ok(allow)
}

fn check_port(field: &str, port: i32) -> Result<(), InvalidSpec> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(InvalidSpec::new(
            field,
            format!("port {port} out of range 1-65535"),
        ))
    }
}

fn external(field: &str, value: Option<&str>) -> Result<Option<ExternalAddress>, InvalidSpec> {
    value
        .map(|v| {
            v.parse()
                .map_err(|message| InvalidSpec::new(field, message))
        })
        .transpose()
}

/// The host path of the gRPC frontend's socket in `GRPC` mode, `None` in `HTTPConnect` mode.
fn grpc_socket(spec: &ControlPlaneLinkSpec) -> Result<Option<String>, InvalidSpec> {
    const FIELD: &str = "spec.server.frontend.socketHostPath";
    let frontend = &spec.server.frontend;
    if frontend.mode != FrontendMode::Grpc {
        return Ok(None);
    }
    let Some(dir) = frontend.socket_host_path.as_deref() else {
        return Err(InvalidSpec::new(
            FIELD,
            "required when spec.server.frontend.mode is GRPC: the directory on the node where \
             the server creates the socket kube-apiserver connects to",
        ));
    };
    // By hand, not with `Path::components`, which silently normalizes "." and "//" away.
    let mut parts = dir.split('/');
    let normal = parts.next() == Some("")
        && dir.len() > 1
        && !dir.contains('\0')
        && parts.all(|part| !part.is_empty() && part != "." && part != "..");
    if !normal {
        return Err(InvalidSpec::new(
            FIELD,
            format!(
                "{dir:?} must be an absolute directory other than /, without \".\", \"..\" or \
                 empty components (e.g. \"/etc/kubernetes/cplink-frontend\")"
            ),
        ));
    }
    let socket = format!("{dir}/{GRPC_SOCKET_FILE}");
    if socket.len() > MAX_SOCKET_PATH {
        return Err(InvalidSpec::new(
            FIELD,
            format!(
                "{dir:?} is too long: the socket path {socket} must fit in {MAX_SOCKET_PATH} bytes"
            ),
        ));
    }
    Ok(Some(socket))
}

/// Validates a link's name and spec and parses its stringly fields.
pub fn validate(name: &str, spec: &ControlPlaneLinkSpec) -> Result<ValidSpec, InvalidSpec> {
    if name.len() + LONGEST_LABEL_SUFFIX > 63 {
        return Err(InvalidSpec::new(
            "metadata.name",
            format!(
                "name is too long: at most {} characters so that derived Service names fit in 63",
                63 - LONGEST_LABEL_SUFFIX
            ),
        ));
    }
    if spec.server.replicas < 1 {
        return Err(InvalidSpec::new(
            "spec.server.replicas",
            format!("must be at least 1, got {}", spec.server.replicas),
        ));
    }
    check_port("spec.server.frontend.port", spec.server.frontend.port)?;
    check_port(
        "spec.server.agentEndpoint.port",
        spec.server.agent_endpoint.port,
    )?;
    let validity = parse_duration("spec.tls.validity", &spec.tls.validity)?;
    let renew_before = parse_duration("spec.tls.renewBefore", &spec.tls.renew_before)?;
    if renew_before >= validity {
        return Err(InvalidSpec::new(
            "spec.tls.renewBefore",
            format!(
                "{} must be shorter than spec.tls.validity {}",
                spec.tls.renew_before, spec.tls.validity
            ),
        ));
    }
    if spec.routing.strategies.is_empty() {
        return Err(InvalidSpec::new(
            "spec.routing.strategies",
            "at least one strategy is required",
        ));
    }
    // The server refuses a chain naming a strategy twice; say so here rather than let every
    // server pod fail to start.
    for (n, strategy) in spec.routing.strategies.iter().enumerate() {
        if spec.routing.strategies[..n].contains(strategy) {
            return Err(InvalidSpec::new(
                format!("spec.routing.strategies[{n}]"),
                format!("{} is listed twice", strategy.as_str()),
            ));
        }
    }
    // Servers and agents get it as --log-level and parse it with this function as they start.
    if let Err(e) = cplink_runtime::telemetry::parse_filter(&spec.log_level) {
        return Err(InvalidSpec::new("spec.logLevel", e.to_string()));
    }
    direct_egress(spec)?;
    Ok(ValidSpec {
        validity,
        renew_before,
        frontend_external: external(
            "spec.server.frontend.externalAddress",
            spec.server.frontend.external_address.as_deref(),
        )?,
        agent_endpoint_external: external(
            "spec.server.agentEndpoint.externalAddress",
            spec.server.agent_endpoint.external_address.as_deref(),
        )?,
        allow: allowed_destinations(spec)?,
        grpc_socket: grpc_socket(spec)?,
    })
}

/// Each pass-through egress selection at most once: kube-apiserver refuses a file that names
/// one twice.
fn direct_egress(spec: &ControlPlaneLinkSpec) -> Result<(), InvalidSpec> {
    let listed = &spec.server.frontend.direct_egress;
    for (i, selection) in listed.iter().enumerate() {
        if listed[..i].contains(selection) {
            return Err(InvalidSpec::new(
                "spec.server.frontend.directEgress",
                format!("{} is listed twice", selection.as_str()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ControlPlaneLink, ControlPlaneLinkSpec, FrontendMode, RoutingStrategy};

    fn spec() -> ControlPlaneLinkSpec {
        ControlPlaneLinkSpec::default()
    }

    #[test]
    fn the_default_spec_is_valid_and_allows_only_the_local_kubelet() {
        let valid = validate("link", &spec()).expect("default spec is valid");
        assert_eq!(valid.validity, Duration::from_secs(8760 * 3600));
        assert_eq!(valid.renew_before, Duration::from_secs(720 * 3600));
        assert_eq!(valid.allow, vec!["$(CPLINK_HOST_IP)/32:10250"]);
        assert_eq!(valid.frontend_external, None);
    }

    #[test]
    fn network_ranges_join_the_default_policy() {
        let mut spec = spec();
        spec.network.pod_cidrs = vec!["10.244.0.0/16".into()];
        spec.network.service_cidrs = vec!["fd00:10:96::/112".into()];
        let valid = validate("link", &spec).expect("valid");
        assert_eq!(
            valid.allow,
            vec![
                "$(CPLINK_HOST_IP)/32:10250",
                "10.244.0.0/16",
                "fd00:10:96::/112"
            ]
        );
    }

    #[test]
    fn explicit_destinations_replace_the_default_policy() {
        let mut spec = spec();
        spec.network.pod_cidrs = vec!["10.244.0.0/16".into()];
        spec.agent.allowed_destinations = vec![
            AllowedDestination {
                cidr: "10.0.0.0/8".into(),
                ports: vec!["10250".into(), "30000-32767".into()],
            },
            AllowedDestination {
                cidr: "fd00::/8".into(),
                ports: vec!["443".into()],
            },
            AllowedDestination {
                cidr: "192.168.1.0/24".into(),
                ports: vec![],
            },
        ];
        let valid = validate("link", &spec).expect("valid");
        assert_eq!(
            valid.allow,
            vec![
                "10.0.0.0/8:10250",
                "10.0.0.0/8:30000-32767",
                "[fd00::/8]:443",
                "192.168.1.0/24"
            ]
        );
    }

    #[test]
    fn an_unparsable_duration_names_the_field() {
        let mut spec = spec();
        spec.tls.validity = "abc".into();
        let err = validate("link", &spec).expect_err("invalid");
        assert_eq!(err.field, "spec.tls.validity");
        assert_eq!(
            err.to_string(),
            r#"spec.tls.validity: invalid duration "abc" (e.g. "8760h")"#
        );
    }

    #[test]
    fn renewal_must_come_before_expiry() {
        let mut spec = spec();
        spec.tls.validity = "24h".into();
        spec.tls.renew_before = "48h".into();
        let err = validate("link", &spec).expect_err("invalid");
        assert_eq!(err.field, "spec.tls.renewBefore");
    }

    #[test]
    fn link_local_ranges_are_refused_even_inside_a_larger_range() {
        for cidr in ["169.254.169.254/32", "0.0.0.0/0", "fe80::/64", "::/0"] {
            let mut spec = spec();
            spec.agent.allowed_destinations = vec![AllowedDestination {
                cidr: cidr.into(),
                ports: vec![],
            }];
            let err = validate("link", &spec).expect_err(cidr);
            assert_eq!(
                err.field, "spec.agent.allowedDestinations[0].cidr",
                "{cidr}"
            );
            assert!(
                err.message.contains("link-local"),
                "{cidr}: {}",
                err.message
            );
        }
    }

    #[test]
    fn malformed_cidrs_and_ports_name_their_index() {
        let mut spec = spec();
        spec.network.service_cidrs = vec!["10.96.0.0/12".into(), "10.96.0.0/33".into()];
        assert_eq!(
            validate("link", &spec).expect_err("bad cidr").field,
            "spec.network.serviceCIDRs[1]"
        );

        let mut spec = self::spec();
        spec.agent.allowed_destinations = vec![AllowedDestination {
            cidr: "10.0.0.0/8".into(),
            ports: vec!["443".into(), "900-80".into()],
        }];
        assert_eq!(
            validate("link", &spec).expect_err("bad port").field,
            "spec.agent.allowedDestinations[0].ports[1]"
        );
    }

    #[test]
    fn replicas_ports_strategies_and_log_level_are_checked_in_code_too() {
        let mut s = spec();
        s.server.replicas = 0;
        assert_eq!(
            validate("l", &s).expect_err("").field,
            "spec.server.replicas"
        );
        let mut s = spec();
        s.server.agent_endpoint.port = 70000;
        assert_eq!(
            validate("l", &s).expect_err("").field,
            "spec.server.agentEndpoint.port"
        );
        let mut s = spec();
        s.routing.strategies.clear();
        assert_eq!(
            validate("l", &s).expect_err("").field,
            "spec.routing.strategies"
        );
        let mut s = spec();
        s.routing.strategies = vec![
            RoutingStrategy::Node,
            RoutingStrategy::DefaultRoute,
            RoutingStrategy::Node,
        ];
        let err = validate("l", &s).expect_err("node twice");
        assert_eq!(err.field, "spec.routing.strategies[2]");
        assert_eq!(
            err.to_string(),
            "spec.routing.strategies[2]: node is listed twice"
        );
        s.routing.strategies.pop();
        validate("l", &s).expect("node,default-route is a valid chain");
        let mut s = spec();
        s.log_level = "cplink=loud".into();
        assert_eq!(validate("l", &s).expect_err("").field, "spec.logLevel");
    }

    #[test]
    fn grpc_mode_needs_a_socket_directory_named_in_the_message() {
        let mut s = spec();
        s.server.frontend.mode = FrontendMode::Grpc;
        let err = validate("l", &s).expect_err("no socketHostPath");
        assert_eq!(err.field, "spec.server.frontend.socketHostPath");
        assert!(
            err.to_string()
                .contains("required when spec.server.frontend.mode is GRPC"),
            "{err}"
        );

        s.server.frontend.socket_host_path = Some("/etc/kubernetes/cplink-frontend".into());
        let valid = validate("l", &s).expect("valid");
        assert_eq!(
            valid.grpc_socket.as_deref(),
            Some("/etc/kubernetes/cplink-frontend/konnectivity-server.socket")
        );
    }

    #[test]
    fn the_socket_directory_must_be_a_plain_absolute_path_short_enough_for_a_socket() {
        for bad in [
            "relative/dir",
            "/",
            "",
            "/etc/../root",
            "/etc/./cplink",
            "/etc//cplink",
            "/etc/cplink/",
        ] {
            let mut s = spec();
            s.server.frontend.mode = FrontendMode::Grpc;
            s.server.frontend.socket_host_path = Some(bad.into());
            let err = validate("l", &s).expect_err(bad);
            assert_eq!(err.field, "spec.server.frontend.socketHostPath", "{bad}");
            assert!(err.message.contains("absolute"), "{bad}: {err}");
        }
        let mut s = spec();
        s.server.frontend.mode = FrontendMode::Grpc;
        s.server.frontend.socket_host_path = Some(format!("/{}", "d".repeat(80)));
        let err = validate("l", &s).expect_err("too long");
        assert!(err.message.contains("107 bytes"), "{err}");
        s.server.frontend.socket_host_path = Some(format!("/{}", "d".repeat(79)));
        assert!(validate("l", &s).is_ok(), "80 characters fit");
        s.server.frontend.socket_host_path = Some("/srv/..data/.cplink".into());
        assert!(validate("l", &s).is_ok(), "dots inside names are fine");
    }

    #[test]
    fn the_socket_directory_is_ignored_in_http_connect_mode() {
        let mut s = spec();
        s.server.frontend.socket_host_path = Some("/srv/cplink".into());
        assert_eq!(validate("l", &s).expect("valid").grpc_socket, None);
    }

    #[test]
    fn a_name_too_long_for_service_names_is_refused() {
        let name = "a".repeat(50);
        assert_eq!(
            validate(&name, &spec()).expect_err("too long").field,
            "metadata.name"
        );
    }

    #[test]
    fn external_addresses_accept_names_ips_and_ports() {
        let parse = |s: &str| s.parse::<ExternalAddress>();
        assert_eq!(
            parse("cp.example.com"),
            Ok(ExternalAddress {
                host: Host::Dns("cp.example.com".into()),
                port: None
            })
        );
        assert_eq!(
            parse("10.0.0.5:31090"),
            Ok(ExternalAddress {
                host: Host::Ip("10.0.0.5".parse().expect("ip")),
                port: Some(31090)
            })
        );
        assert_eq!(
            parse("[fd00::1]:443").map(|a| a.host.to_string()),
            Ok("[fd00::1]".into())
        );
        assert_eq!(
            parse("fd00::1").map(|a| a.host),
            Ok(Host::Ip("fd00::1".parse().expect("ip")))
        );
        assert_eq!(
            parse("[fd00::1]").map(|a| (a.host.to_string(), a.port)),
            Ok(("[fd00::1]".into(), None))
        );
        assert!(parse("Bad_Name").is_err());
        assert!(parse("host:0").is_err());
        assert!(parse("host:99999").is_err());
    }

    #[test]
    fn a_bad_external_address_names_the_field() {
        let mut spec = spec();
        spec.server.frontend.external_address = Some("not a host".into());
        assert_eq!(
            validate("link", &spec).expect_err("invalid").field,
            "spec.server.frontend.externalAddress"
        );
    }

    #[test]
    fn a_pass_through_egress_selection_listed_twice_is_refused() {
        use crate::crd::DirectEgress;
        let mut s = spec();
        s.server.frontend.direct_egress = vec![DirectEgress::Etcd, DirectEgress::ControlPlane];
        validate("l", &s).expect("each once is valid");
        s.server.frontend.direct_egress.push(DirectEgress::Etcd);
        let err = validate("l", &s).expect_err("etcd twice");
        assert_eq!(err.field, "spec.server.frontend.directEgress");
        assert_eq!(err.message, "etcd is listed twice");
    }

    /// Every non-empty key of `example` is also in `typed`: catches misspelled example fields,
    /// which serde would otherwise drop silently.
    fn assert_keys_known(path: &str, example: &serde_json::Value, typed: &serde_json::Value) {
        if let Some(map) = example.as_object() {
            for (key, value) in map {
                let empty = value.as_array().is_some_and(Vec::is_empty);
                let child = format!("{path}.{key}");
                assert!(empty || typed.get(key).is_some(), "unknown field {child}");
                if let Some(typed_value) = typed.get(key) {
                    assert_keys_known(&child, value, typed_value);
                }
            }
        }
    }

    #[test]
    fn the_example_uses_only_known_fields_and_is_valid() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/examples/controlplanelink.yaml"
        ))
        .expect("example exists");
        let raw: serde_json::Value = serde_saphyr::from_str(&text).expect("example is YAML");
        let link: ControlPlaneLink = serde_saphyr::from_str(&text).expect("example parses");
        let typed = serde_json::to_value(&link.spec).expect("spec serializes");
        assert_keys_known("spec", &raw["spec"], &typed);
        validate(&link.metadata.name.unwrap_or_default(), &link.spec)
            .expect("example spec is valid");
    }
}
