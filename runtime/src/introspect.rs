//! The read-only `/debug/...` views of the admin endpoint: what they answer (the JSON types,
//! shared by the binaries that serve them and by `kubectl cplink`, which reads them), their
//! query parameters, and paging.
//!
//! Every list is bounded: `limit` items at most ([`DEFAULT_LIMIT`] unless asked, never more
//! than [`MAX_LIMIT`]); a list cut short says `truncated: true` and carries a `continue` token
//! to pass back for the next page. Lists are ordered by a stable key (agent id, connection id),
//! so paging through a changing table neither repeats nor skips what stayed.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Items per page unless `limit` asks otherwise (as `kubectl`'s default chunk size).
pub const DEFAULT_LIMIT: usize = 500;
/// Items per page at most, whatever `limit` asks.
pub const MAX_LIMIT: usize = 5000;

/// A query the debug endpoints refuse (answered `400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A parameter the endpoint does not take.
    #[error("unknown query parameter {0:?} (this endpoint takes: {1})")]
    Unknown(String, String),
    /// A parameter given twice.
    #[error("query parameter {0:?} is given more than once")]
    Repeated(String),
    /// A value that does not parse.
    #[error("query parameter {name:?}: {reason}")]
    Invalid {
        /// The parameter.
        name: String,
        /// Why its value is refused.
        reason: String,
    },
    /// A required parameter is missing.
    #[error("{0}")]
    Missing(String),
}

/// The query parameters of a debug request, checked against what the endpoint takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `query` (the part of the URI after `?`, percent-encoded), accepting only the
    /// parameters in `known`, each at most once.
    pub fn parse(query: &str, known: &[&str]) -> Result<Self, QueryError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if !known.contains(&name.as_ref()) {
                let takes = if known.is_empty() {
                    "nothing".to_owned()
                } else {
                    known.join(", ")
                };
                return Err(QueryError::Unknown(name.into_owned(), takes));
            }
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(QueryError::Repeated(name.into_owned()));
            }
            pairs.push((name.into_owned(), value.into_owned()));
        }
        Ok(Query(pairs))
    }

    /// The value of `name`, if given (and not empty).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name` parsed, if given.
    pub fn parsed<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, QueryError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|e: T::Err| QueryError::Invalid {
                    name: name.to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// The page asked for: `limit` (1 or more; above [`MAX_LIMIT`] it is [`MAX_LIMIT`]) and
    /// `continue`.
    pub fn page(&self) -> Result<Page, QueryError> {
        let limit = match self.parsed::<usize>("limit")? {
            Some(0) => {
                return Err(QueryError::Invalid {
                    name: "limit".into(),
                    reason: "must be at least 1".into(),
                });
            }
            Some(limit) => limit.min(MAX_LIMIT),
            None => DEFAULT_LIMIT,
        };
        Ok(Page {
            limit,
            after: self.get("continue").map(str::to_owned),
        })
    }
}

/// One page of a list: at most `limit` items after the `continue` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Items at most.
    pub limit: usize,
    /// The token of the last item of the previous page.
    pub after: Option<String>,
}

impl Default for Page {
    fn default() -> Self {
        Page {
            limit: DEFAULT_LIMIT,
            after: None,
        }
    }
}

impl Page {
    /// Takes this page from `items`, which are in order and start after the `continue` token:
    /// up to `limit` of them; when more remain, the list is truncated and its `continue` token
    /// is `token` of the last item taken.
    pub fn cut<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        token: impl Fn(&T) -> String,
    ) -> Cut<T> {
        let mut items = items.into_iter();
        let taken: Vec<T> = items.by_ref().take(self.limit).collect();
        let truncated = items.next().is_some();
        let continue_token = if truncated {
            taken.last().map(token)
        } else {
            None
        };
        Cut {
            items: taken,
            truncated,
            continue_token,
        }
    }
}

/// A page cut from a list by [`Page::cut`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut<T> {
    /// The page's items.
    pub items: Vec<T>,
    /// Whether more items follow.
    pub truncated: bool,
    /// The token for the next page, when truncated.
    pub continue_token: Option<String>,
}

impl<T> Cut<T> {
    /// The page as a list answered by `header`.
    pub fn into_list<H>(self, header: H) -> List<H, T> {
        List {
            header,
            items: self.items,
            truncated: self.truncated,
            continue_token: self.continue_token,
        }
    }
}

/// A bounded list, with what describes its source (`header`) beside its items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List<H, T> {
    /// Who answered, flattened into the list object.
    #[serde(flatten)]
    pub header: H,
    /// This page's items.
    pub items: Vec<T>,
    /// Whether more items follow this page.
    #[serde(default)]
    pub truncated: bool,
    /// What to pass as `continue` for the next page, when truncated.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

/// The header of a server's lists: which replica answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerHeader {
    /// The server's id (`--server-id`).
    pub server: String,
    /// Whether the server is shutting down.
    #[serde(default)]
    pub draining: bool,
}

/// `/debug/agents` of a server: the agents linked to it.
pub type AgentList = List<ServerHeader, AgentInfo>;
/// `/debug/connections` of a server: its tunneled connections open now.
pub type ConnectionList = List<ServerHeader, ConnectionInfo>;
/// `/debug/links` of an agent: its links to servers.
pub type LinkList = List<AgentHeader, LinkInfo>;

/// An agent linked to a server, with each of its links (usually one; two while it relinks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// The agent's id.
    pub id: String,
    /// The node it routes for, as announced or, when verified, as proven.
    pub node: Option<String>,
    /// `cplink` (native link) or `konnectivity` (an upstream agent).
    pub protocol: String,
    /// Who the agent proved to be; none when the server believes what agents declare.
    pub verified: Option<VerifiedInfo>,
    /// What the agent routes: host IPs, pod ranges, default route.
    pub identifiers: IdentifiersInfo,
    /// Its links to this server, oldest first.
    pub links: Vec<AgentLinkInfo>,
}

/// How an agent proved its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedInfo {
    /// The Node it is bound to.
    pub node: String,
    /// `token` (its pod's service-account token) or `certificate` (its own node certificate).
    pub by: String,
    /// Its pod, `namespace/name`, when proven by token.
    pub pod: Option<String>,
    /// Its pod's uid, when proven by token.
    pub pod_uid: Option<String>,
}

/// What an agent routes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentifiersInfo {
    /// Its host's IP addresses.
    #[serde(rename = "hostIPs")]
    pub host_ips: Vec<String>,
    /// Its node's pod ranges.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// Whether it offers a default route.
    pub default_route: bool,
}

/// One link of an agent to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentLinkInfo {
    /// The server's number for this link.
    pub link_id: u64,
    /// Where the link comes from.
    pub peer: String,
    /// When it was established (RFC 3339, UTC).
    pub linked_since: String,
    /// Tunneled connections on it now.
    pub active_streams: u64,
    /// Bytes it carried towards the agent (from kube-apiserver to destinations).
    pub bytes_to_agent: u64,
    /// Bytes it carried from the agent.
    pub bytes_from_agent: u64,
    /// The round trip of its last answered keepalive PING; none before the first (and for
    /// upstream agents, whose PINGs the HTTP/2 library times without telling).
    pub keepalive_rtt_seconds: Option<f64>,
    /// Whether the agent is going away: no new dials go to this link.
    pub draining: bool,
    /// Whether new dials for this agent take this link.
    pub preferred: bool,
}

/// A tunneled connection open on a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    /// The server's number for it, in the order connections were opened.
    pub id: u64,
    /// The frontend it came in on: `tls`, `uds` or `grpc`.
    pub frontend: String,
    /// Where it goes, `host:port`.
    pub destination: String,
    /// The agent carrying it; none while no agent is chosen yet.
    pub agent: Option<String>,
    /// That agent's node.
    pub node: Option<String>,
    /// `dialing` (waiting for the agent's dial) or `established`.
    pub state: String,
    /// Seconds since the frontend asked for it.
    pub age_seconds: f64,
    /// Bytes from the frontend to the agent.
    pub bytes_to_agent: u64,
    /// Bytes from the agent to the frontend.
    pub bytes_from_agent: u64,
}

/// `/debug/route` of a server: which agent a dial would take now, without dialing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteInfo {
    /// The server that answered.
    pub server: String,
    /// The destination routed, `host:port`.
    pub destination: String,
    /// The server's strategy chain, in order.
    pub strategies: Vec<String>,
    /// The agent chosen; none when no strategy matched.
    pub agent: Option<String>,
    /// The chosen agent's node.
    pub node: Option<String>,
    /// The strategy that chose it.
    pub strategy: Option<String>,
    /// Why no agent was chosen, as a dial would be refused.
    pub refusal: Option<String>,
}

/// `/debug/check` of a server: a dial through the tunnel, closed as soon as it was answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckInfo {
    /// The server that dialed.
    pub server: String,
    /// The destination dialed, `host:port`.
    pub destination: String,
    /// Whether the destination accepted the connection.
    pub ok: bool,
    /// The agent that dialed; none when no agent was chosen.
    pub agent: Option<String>,
    /// That agent's node.
    pub node: Option<String>,
    /// The strategy that chose the agent.
    pub strategy: Option<String>,
    /// Seconds from the start of the dial to its answer.
    pub latency_seconds: f64,
    /// How the dial failed, as a metric label (`no_agent`, `refused`, `timeout`, ...).
    pub error_kind: Option<String>,
    /// How the dial failed, as kube-apiserver would be told.
    pub error: Option<String>,
}

/// The header of an agent's link list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentHeader {
    /// The agent's id.
    pub agent: String,
    /// Its node.
    pub node: Option<String>,
    /// The protocol it links with: `cplink` or `konnectivity`.
    pub protocol: String,
    /// Whether it is linked to every server it knows.
    pub ready: bool,
    /// What is missing, when not ready.
    pub not_ready: Option<String>,
}

/// A server address the agent links to, or one of its links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkInfo {
    /// The server address dialed.
    pub address: String,
    /// The server's id; none for an address with no link up.
    pub server_id: Option<String>,
    /// `up`, `draining` (replaced by a newer link, or the agent is shutting down), `down`
    /// (an address with no link up: see `lastError`) or `retired` (an address discovery no
    /// longer lists, whose link lasts until its server closes it).
    pub state: String,
    /// When the link came up (RFC 3339, UTC).
    pub since: Option<String>,
    /// Tunneled connections on the link now.
    pub active_streams: u64,
    /// Why the last attempt on this address failed, if it did.
    pub last_error: Option<String>,
}

/// An error answered by a debug endpoint, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// What went wrong.
    pub error: String,
}

/// `time` as RFC 3339 in UTC, to the second.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The wall-clock time `age` ago.
pub fn since(age: Duration) -> SystemTime {
    SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_cap_and_refuse_zero() {
        let page = |q: &str| Query::parse(q, &["limit", "continue"]).and_then(|q| q.page());
        assert_eq!(page("").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(page("limit=3").unwrap().limit, 3);
        assert_eq!(page("limit=999999").unwrap().limit, MAX_LIMIT);
        assert!(matches!(page("limit=0"), Err(QueryError::Invalid { .. })));
        let err = page("limit=many").unwrap_err();
        assert!(err.to_string().contains("\"limit\""), "{err}");
        assert_eq!(
            page("limit=2&continue=node%2F1").unwrap().after.as_deref(),
            Some("node/1")
        );
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused_naming_them() {
        let err = Query::parse("limit=1&nodes=a", &["limit", "node"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown query parameter \"nodes\" (this endpoint takes: limit, node)"
        );
        let err = Query::parse("node=a&node=b", &["node"]).unwrap_err();
        assert_eq!(err, QueryError::Repeated("node".into()));
    }

    #[test]
    fn a_cut_list_says_so_and_continues_after_its_last_item() {
        let page = Page {
            limit: 2,
            after: None,
        };
        let cut = page.cut(1..=5, |n| n.to_string());
        assert_eq!(cut.items, [1, 2]);
        assert!(cut.truncated);
        assert_eq!(cut.continue_token.as_deref(), Some("2"));
        let whole = page.cut(1..=2, |n| n.to_string());
        assert_eq!(whole.items, [1, 2]);
        assert!(!whole.truncated, "exactly a page is not truncated");
        assert_eq!(whole.continue_token, None);
    }

    #[test]
    fn lists_flatten_their_header_and_omit_continue_when_whole() {
        let list = Page::default()
            .cut(["a"], |s| (*s).to_owned())
            .into_list(ServerHeader {
                server: "server-0".into(),
                draining: false,
            });
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "server": "server-0",
                "draining": false,
                "items": ["a"],
                "truncated": false,
            })
        );
        let back: List<ServerHeader, String> = serde_json::from_value(json).unwrap();
        assert_eq!(back.items, ["a"]);
    }
}
