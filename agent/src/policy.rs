//! Destination policy: which addresses and ports the agent dials for its servers.
//!
//! Rules are `CIDR[:PORT[-PORT]]` (IPv6 with ports in brackets: `[fd00::/8]:443`); a bare IP is a
//! single-address rule. Without rules every destination is allowed except the ones below.
//! Link-local addresses (which include the cloud metadata endpoint 169.254.169.254) are denied
//! unless a rule names them specifically; unspecified, multicast and broadcast addresses are
//! never dialed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allowed addresses.
    pub net: IpNet,
    /// Allowed ports; all when `None`.
    pub ports: Option<RangeInclusive<u16>>,
}

/// Why a rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rule {rule:?}: {reason} (expected CIDR[:PORT[-PORT]], e.g. 10.0.0.0/8:10250 or [fd00::/8]:443)"
)]
pub struct RuleError {
    rule: String,
    reason: &'static str,
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| RuleError {
            rule: s.to_owned(),
            reason,
        };
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or(err("missing ']'"))?;
            let ports = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(err("expected ':' after ']'"))?),
            };
            (net, ports)
        } else if s.matches(':').count() > 1 {
            // An IPv6 network without brackets cannot carry ports.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((net, ports)) => (net, Some(ports)),
                None => (s, None),
            }
        };
        let net = parse_net(net).ok_or(err("not an IP address or CIDR"))?;
        let ports = ports
            .map(|p| parse_ports(p).ok_or(err("invalid port or port range")))
            .transpose()?;
        Ok(Rule { net, ports })
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        // Normalise 10.1.2.3/8 to 10.0.0.0/8 so that what is printed is what is matched.
        s.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

fn parse_ports(s: &str) -> Option<RangeInclusive<u16>> {
    let (low, high) = s.split_once('-').unwrap_or((s, s));
    let low: u16 = low.parse().ok().filter(|p| *p != 0)?;
    let high: u16 = high.parse().ok().filter(|p| *p >= low)?;
    Some(low..=high)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.net, &self.ports) {
            (net, None) => write!(f, "{net}"),
            (IpNet::V6(net), Some(p)) => write!(f, "[{net}]:{}", fmt_ports(p)),
            (net, Some(p)) => write!(f, "{net}:{}", fmt_ports(p)),
        }
    }
}

fn fmt_ports(p: &RangeInclusive<u16>) -> String {
    if p.start() == p.end() {
        p.start().to_string()
    } else {
        format!("{}-{}", p.start(), p.end())
    }
}

impl Rule {
    fn matches(&self, addr: &SocketAddr) -> bool {
        self.net.contains(&addr.ip())
            && self.ports.as_ref().is_none_or(|p| p.contains(&addr.port()))
    }
}

/// The agent's destination policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

fn link_local_nets() -> [IpNet; 2] {
    [
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
        IpNet::V6(Ipv6Net::new_assert(
            std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
            10,
        )),
    ]
}

impl Policy {
    /// A policy allowing exactly `rules`; with no rules, everything but the always-denied ranges.
    pub fn new(rules: Vec<Rule>) -> Self {
        Policy { rules }
    }

    /// Whether any rule was configured.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// The configured rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Allows or denies a resolved destination, with the reason for a denial.
    pub fn check(&self, addr: SocketAddr) -> Result<(), String> {
        let ip = addr.ip().to_canonical();
        let addr = SocketAddr::new(ip, addr.port());
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(format!("{addr} is not a unicast address"));
        }
        let link_local = link_local_nets().iter().any(|n| n.contains(&ip));
        if link_local {
            // Only a rule that names link-local space itself opens it; 0.0.0.0/0 does not.
            let named = self
                .rules
                .iter()
                .any(|r| r.matches(&addr) && link_local_nets().iter().any(|n| n.contains(&r.net)));
            return if named {
                Ok(())
            } else {
                Err(format!(
                    "{addr} is link-local (cloud metadata lives there); allow it explicitly with --allow"
                ))
            };
        }
        if self.rules.is_empty() || self.rules.iter().any(|r| r.matches(&addr)) {
            Ok(())
        } else {
            Err(format!("{addr} is not in the agent's allowed destinations"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy(rules: &[&str]) -> Policy {
        Policy::new(rules.iter().map(|r| rule(r)).collect())
    }

    #[test]
    fn rules_parse_with_and_without_ports() {
        assert_eq!(rule("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(rule("10.0.0.0/8:10250").to_string(), "10.0.0.0/8:10250");
        assert_eq!(
            rule("10.1.2.3/8:8000-9000").to_string(),
            "10.0.0.0/8:8000-9000"
        );
        assert_eq!(rule("192.168.1.7").to_string(), "192.168.1.7/32");
        assert_eq!(rule("192.168.1.7:22").to_string(), "192.168.1.7/32:22");
        assert_eq!(rule("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(rule("[fd00::/8]:443").to_string(), "[fd00::/8]:443");
        assert_eq!(rule("[::1]:80").to_string(), "[::1/128]:80");
    }

    #[test]
    fn bad_rules_are_rejected_with_the_rule_in_the_message() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/8:0",
            "10.0.0.0/8:9-8",
            "10.0.0.0/8:x",
            "nope",
            "[fd00::/8",
            "[fd00::/8]443",
            "10.0.0.0/8:65536",
        ] {
            let err = bad.parse::<Rule>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn without_rules_everything_but_link_local_is_allowed() {
        let open = Policy::default();
        assert!(open.check(addr("10.0.0.5:10250")).is_ok());
        assert!(open.check(addr("[fd00::1]:443")).is_ok());
        assert!(open.check(addr("169.254.169.254:80")).is_err());
        assert!(open.check(addr("[fe80::1]:80")).is_err());
        assert!(
            open.check(addr("[::ffff:169.254.169.254]:80")).is_err(),
            "v4-mapped form"
        );
    }

    #[test]
    fn rules_restrict_addresses_and_ports() {
        let p = policy(&["10.0.0.0/8:10250", "10.244.0.0/16"]);
        assert!(p.check(addr("10.0.0.5:10250")).is_ok());
        assert!(p.check(addr("10.0.0.5:22")).is_err());
        assert!(p.check(addr("10.244.3.4:8080")).is_ok());
        assert!(p.check(addr("192.168.0.1:10250")).is_err());
    }

    #[test]
    fn link_local_needs_a_rule_that_names_it() {
        assert!(
            policy(&["0.0.0.0/0"])
                .check(addr("169.254.169.254:80"))
                .is_err()
        );
        assert!(
            policy(&["169.254.169.254:80"])
                .check(addr("169.254.169.254:80"))
                .is_ok()
        );
        assert!(
            policy(&["169.254.0.0/16:80"])
                .check(addr("169.254.169.254:443"))
                .is_err()
        );
    }

    #[test]
    fn unspecified_multicast_and_broadcast_are_never_dialed() {
        let p = policy(&["0.0.0.0/0", "::/0"]);
        for bad in [
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::]:80",
            "[ff02::1]:80",
        ] {
            assert!(p.check(addr(bad)).is_err(), "{bad}");
        }
    }
}
