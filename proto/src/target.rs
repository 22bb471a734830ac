//! Tunnel destinations: `host:port`, with IPv6 literals in brackets (`[::1]:80`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Longest DNS name accepted as a destination host.
const MAX_HOST_LEN: usize = 253;

/// Where a tunneled connection should go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host part: an IP literal or a DNS name.
    pub host: Host,
    /// Destination TCP port, never 0.
    pub port: u16,
}

/// Host part of a [`Target`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name (or a node name), lower-cased.
    Name(String),
}

/// Why a destination string is not a valid `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No `:port` suffix.
    #[error("destination {0:?} has no port (expected host:port)")]
    MissingPort(String),
    /// Port is not a number in 1..=65535.
    #[error("destination {0:?} has an invalid port")]
    InvalidPort(String),
    /// Host is empty, malformed, or too long.
    #[error("destination {0:?} has an invalid host")]
    InvalidHost(String),
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| TargetError::InvalidHost(s.to_owned()))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| TargetError::MissingPort(s.to_owned()))?;
            let ip: std::net::Ipv6Addr = host
                .parse()
                .map_err(|_| TargetError::InvalidHost(s.to_owned()))?;
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| TargetError::MissingPort(s.to_owned()))?;
            if host.contains(':') {
                // An IPv6 literal must be bracketed, otherwise the port is ambiguous.
                return Err(TargetError::InvalidHost(s.to_owned()));
            }
            (
                parse_host(host).ok_or_else(|| TargetError::InvalidHost(s.to_owned()))?,
                port,
            )
        };
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(TargetError::InvalidPort(s.to_owned())),
            Ok(p) if !port.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(TargetError::InvalidPort(format!("{s} ({p})")));
            }
            Ok(p) => p,
        };
        Ok(Target { host, port })
    }
}

fn parse_host(host: &str) -> Option<Host> {
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    let valid = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !host.starts_with('.')
        && !host.starts_with('-');
    valid.then(|| Host::Name(host.to_ascii_lowercase()))
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Target {
    /// The IP literal of the host, if it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip),
            Host::Name(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Result<Target, TargetError> {
        s.parse()
    }

    #[test]
    fn ipv4_name_and_bracketed_ipv6_parse() {
        assert_eq!(
            target("10.0.0.5:10250").unwrap().to_string(),
            "10.0.0.5:10250"
        );
        assert_eq!(
            target("Node-A.example:443").unwrap().to_string(),
            "node-a.example:443"
        );
        let v6 = target("[::1]:80").unwrap();
        assert_eq!(v6.ip(), Some("::1".parse().unwrap()));
        assert_eq!(v6.port, 80);
        assert_eq!(v6.to_string(), "[::1]:80");
    }

    #[test]
    fn missing_or_bad_ports_are_rejected() {
        assert!(matches!(
            target("10.0.0.5"),
            Err(TargetError::MissingPort(_))
        ));
        assert!(matches!(target("[::1]"), Err(TargetError::MissingPort(_))));
        assert!(matches!(target("h:0"), Err(TargetError::InvalidPort(_))));
        assert!(matches!(
            target("h:65536"),
            Err(TargetError::InvalidPort(_))
        ));
        assert!(matches!(target("h:+80"), Err(TargetError::InvalidPort(_))));
        assert!(matches!(target("h:"), Err(TargetError::InvalidPort(_))));
    }

    #[test]
    fn bad_hosts_are_rejected() {
        for bad in [
            ":80",
            "::1:80",
            "[nope]:80",
            "a b:80",
            "-x:80",
            "x/y:80",
            "[::1:80",
        ] {
            assert!(
                matches!(target(bad), Err(TargetError::InvalidHost(_))),
                "{bad} must be rejected"
            );
        }
        let long = format!("{}:80", "a".repeat(MAX_HOST_LEN + 1));
        assert!(matches!(target(&long), Err(TargetError::InvalidHost(_))));
    }
}
