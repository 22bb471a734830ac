//! Outcomes of a dial through the tunnel and how they travel.
//!
//! The agent answers a tunnel `CONNECT` with `200` or with one of these failures: an HTTP status,
//! the [`ERROR_KIND_HEADER`] naming the kind, and a one-line text reason as the body. The server
//! passes the same status and reason on to its frontend client.

use std::time::Duration;

use http::StatusCode;

/// Response header carrying the [`DialFailure::kind`] of a failed dial.
pub const ERROR_KIND_HEADER: &str = "cplink-error";

/// Longest reason text accepted from a peer; longer reasons are cut.
pub const MAX_REASON_LEN: usize = 1024;

/// Why a dial failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialFailure {
    /// The destination is not a valid `host:port`.
    #[error("bad destination: {0}")]
    BadTarget(String),
    /// The destination policy denies it.
    #[error("destination not allowed: {0}")]
    Forbidden(String),
    /// No linked agent can take the dial.
    #[error("no agent available: {0}")]
    NoAgent(String),
    /// The server carries as many tunneled connections as it is allowed to.
    #[error("server at capacity: {0}")]
    Busy(String),
    /// The destination actively refused the connection.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The destination could not be reached (no route, name not resolved, ...).
    #[error("destination unreachable: {0}")]
    Unreachable(String),
    /// The dial did not complete in time.
    #[error("dial timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The link to the agent failed while the dial was in progress.
    #[error("tunnel link failed: {0}")]
    Link(String),
}

impl DialFailure {
    /// HTTP status reported for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            DialFailure::BadTarget(_) => StatusCode::BAD_REQUEST,
            DialFailure::Forbidden(_) => StatusCode::FORBIDDEN,
            DialFailure::NoAgent(_) | DialFailure::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            DialFailure::Refused(_) | DialFailure::Unreachable(_) | DialFailure::Link(_) => {
                StatusCode::BAD_GATEWAY
            }
            DialFailure::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable, low-cardinality name of the failure, used in metrics and headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DialFailure::BadTarget(_) => "bad_target",
            DialFailure::Forbidden(_) => "forbidden",
            DialFailure::NoAgent(_) => "no_agent",
            DialFailure::Busy(_) => "busy",
            DialFailure::Refused(_) => "refused",
            DialFailure::Unreachable(_) => "unreachable",
            DialFailure::Timeout(_) => "timeout",
            DialFailure::Link(_) => "link_error",
        }
    }

    /// Rebuilds a failure reported by a peer from its status, kind header and reason.
    ///
    /// The reason is the peer's [`DialFailure::reason_line`], which already starts with the
    /// kind's words ("destination not allowed: ..."); they are taken off so that the rebuilt
    /// failure does not say them twice.
    pub fn from_response(status: StatusCode, kind: Option<&str>, reason: String) -> Self {
        let reason = match kind.and_then(prefix_of_kind) {
            Some(prefix) => strip_prefix(prefix, reason),
            None => reason,
        };
        match kind {
            Some("bad_target") => DialFailure::BadTarget(reason),
            Some("forbidden") => DialFailure::Forbidden(reason),
            Some("no_agent") => DialFailure::NoAgent(reason),
            Some("busy") => DialFailure::Busy(reason),
            Some("refused") => DialFailure::Refused(reason),
            Some("unreachable") => DialFailure::Unreachable(reason),
            Some("link_error") => DialFailure::Link(reason),
            Some("timeout") => timeout_from_reason(&reason),
            _ => match status {
                StatusCode::BAD_REQUEST => DialFailure::BadTarget(reason),
                StatusCode::FORBIDDEN => DialFailure::Forbidden(reason),
                StatusCode::SERVICE_UNAVAILABLE => DialFailure::NoAgent(reason),
                StatusCode::GATEWAY_TIMEOUT => timeout_from_reason(&reason),
                _ => DialFailure::Link(format!("agent answered {status}: {reason}")),
            },
        }
    }

    /// Rebuilds a failure from the error text of a konnectivity dial answer. cplink agents send
    /// [`DialFailure::reason_line`]; upstream agents send Go's dial errors
    /// (`dial tcp 10.0.0.5:10250: connect: connection refused`, `... i/o timeout`).
    pub fn from_konnectivity_error(text: &str) -> Self {
        let text = text.trim();
        let rest = |prefix: &str| {
            text[prefix.len()..]
                .trim_start_matches(':')
                .trim()
                .to_owned()
        };
        if text.starts_with("destination not allowed") {
            DialFailure::Forbidden(rest("destination not allowed"))
        } else if text.starts_with("bad destination") {
            DialFailure::BadTarget(rest("bad destination"))
        } else if text.starts_with("no agent available") {
            DialFailure::NoAgent(rest("no agent available"))
        } else if text.starts_with("server at capacity") {
            DialFailure::Busy(rest("server at capacity"))
        } else if text.starts_with("dial timed out") {
            timeout_from_reason(text)
        } else if text.starts_with("connection refused") {
            DialFailure::Refused(rest("connection refused"))
        } else if text.contains("connection refused") {
            DialFailure::Refused(text.to_owned())
        } else if text.starts_with("destination unreachable") {
            DialFailure::Unreachable(rest("destination unreachable"))
        } else if text.starts_with("tunnel link failed") {
            DialFailure::Link(rest("tunnel link failed"))
        } else if text.contains("i/o timeout") {
            DialFailure::Timeout(Duration::ZERO)
        } else {
            DialFailure::Unreachable(text.to_owned())
        }
    }

    /// The reason text sent to a peer or a frontend client: one line, bounded.
    pub fn reason_line(&self) -> String {
        let mut line: String = self
            .to_string()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if line.len() > MAX_REASON_LEN {
            let mut cut = MAX_REASON_LEN;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        line
    }
}

/// The words [`DialFailure`]'s `Display` puts before the detail, by kind.
fn prefix_of_kind(kind: &str) -> Option<&'static str> {
    match kind {
        "bad_target" => Some("bad destination"),
        "forbidden" => Some("destination not allowed"),
        "no_agent" => Some("no agent available"),
        "busy" => Some("server at capacity"),
        "refused" => Some("connection refused"),
        "unreachable" => Some("destination unreachable"),
        "link_error" => Some("tunnel link failed"),
        _ => None,
    }
}

/// `reason` without a leading `prefix` and the colon after it; unchanged when it lacks them.
fn strip_prefix(prefix: &str, reason: String) -> String {
    match reason.strip_prefix(prefix) {
        Some(rest) if rest.starts_with(':') => rest[1..].trim().to_owned(),
        _ => reason,
    }
}

/// Rebuilds a timeout from a peer's reason text ("... after 5s"); the duration is informational.
fn timeout_from_reason(reason: &str) -> DialFailure {
    let duration = reason
        .rsplit_once("after ")
        .and_then(|(_, d)| humantime::parse_duration(d.trim()).ok())
        .unwrap_or_default();
    DialFailure::Timeout(duration)
}

/// Maps an I/O error from connecting to `target` to a [`DialFailure`]; `timeout` is the dial
/// budget, reported when the kernel itself gave up.
pub fn classify_connect_error(
    err: &std::io::Error,
    target: &str,
    timeout: Duration,
) -> DialFailure {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionRefused => DialFailure::Refused(target.to_owned()),
        ErrorKind::TimedOut => DialFailure::Timeout(timeout),
        _ => DialFailure::Unreachable(format!("{target}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn konnectivity_error_texts_map_back_to_failures() {
        for failure in [
            DialFailure::BadTarget("x".into()),
            DialFailure::Forbidden("10.0.0.1:22".into()),
            DialFailure::NoAgent("none".into()),
            DialFailure::Busy("16384 tunneled connections".into()),
            DialFailure::Refused("10.0.0.1:10250".into()),
            DialFailure::Unreachable("10.0.0.1:10250: no route".into()),
            DialFailure::Timeout(Duration::from_secs(5)),
            DialFailure::Link("reset".into()),
        ] {
            let back = DialFailure::from_konnectivity_error(&failure.reason_line());
            assert_eq!(back, failure);
        }
        let go = "dial tcp 10.0.0.5:10250: connect: connection refused";
        assert_eq!(
            DialFailure::from_konnectivity_error(go).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(DialFailure::from_konnectivity_error(go).kind(), "refused");
        let go = "dial tcp 10.0.0.5:10250: i/o timeout";
        assert_eq!(DialFailure::from_konnectivity_error(go).kind(), "timeout");
    }

    #[test]
    fn statuses_match_the_frontend_contract() {
        let cases = [
            (DialFailure::BadTarget("x".into()), 400),
            (DialFailure::Forbidden("x".into()), 403),
            (DialFailure::NoAgent("x".into()), 503),
            (DialFailure::Busy("x".into()), 503),
            (DialFailure::Refused("x".into()), 502),
            (DialFailure::Unreachable("x".into()), 502),
            (DialFailure::Link("x".into()), 502),
            (DialFailure::Timeout(Duration::from_secs(5)), 504),
        ];
        for (failure, status) in cases {
            assert_eq!(failure.status().as_u16(), status, "{failure:?}");
        }
    }

    #[test]
    fn failures_survive_the_trip_through_a_response() {
        let failures = [
            DialFailure::BadTarget("a".into()),
            DialFailure::Forbidden("b".into()),
            DialFailure::Refused("c".into()),
            DialFailure::Unreachable("d".into()),
            DialFailure::NoAgent("e".into()),
            DialFailure::Busy("g".into()),
            DialFailure::Link("f".into()),
            DialFailure::Timeout(Duration::from_secs(5)),
        ];
        for failure in failures {
            let back = DialFailure::from_response(
                failure.status(),
                Some(failure.kind()),
                failure.reason_line(),
            );
            assert_eq!(back, failure, "rebuilt from {:?}", failure.reason_line());
            assert_eq!(back.status(), failure.status());
            // The words of the kind appear once, not once per hop.
            let line = back.reason_line();
            let words = line.split(':').next().unwrap_or_default();
            assert_eq!(line.matches(words).count(), 1, "{line}");
        }
        // A reason without the kind's words (an older peer, a hand-written answer) is kept.
        assert_eq!(
            DialFailure::from_response(StatusCode::FORBIDDEN, Some("forbidden"), "port 22".into()),
            DialFailure::Forbidden("port 22".into())
        );
        assert_eq!(
            DialFailure::from_response(
                StatusCode::GATEWAY_TIMEOUT,
                Some("timeout"),
                "dial timed out after 5s".into()
            ),
            DialFailure::Timeout(Duration::from_secs(5))
        );
    }

    #[test]
    fn reason_lines_are_single_line_and_bounded() {
        let failure = DialFailure::Unreachable(format!("a\nb{}", "é".repeat(2000)));
        let line = failure.reason_line();
        assert!(!line.contains('\n'));
        assert!(line.len() <= MAX_REASON_LEN);
    }
}
