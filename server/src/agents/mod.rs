//! Agents: the agent port, and the links agents keep to this server.
//!
//! One TCP port takes both kinds of agents, told apart by ALPN after the TLS handshake:
//! - `native`: cplink agents (ALPN `cplink/1`): hello, identity checks, then HTTP/2 with this
//!   server as the client, one stream per tunneled connection.
//! - `konnectivity`: upstream konnectivity agents (ALPN `h2`): the gRPC `AgentService/Connect`
//!   stream carrying every connection.
//! - `watch`: keeps verified links true to their Pods and Nodes while they live.

pub(crate) mod konnectivity;
mod native;
pub(crate) mod watch;

pub(crate) use native::accept;

/// Longest agent id accepted.
const MAX_AGENT_ID_LEN: usize = 253;

/// Checks an agent id from a hello or from konnectivity metadata.
pub(crate) fn validate_agent_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_AGENT_ID_LEN {
        return Err(format!(
            "agent id must be 1 to {MAX_AGENT_ID_LEN} characters"
        ));
    }
    if !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err("agent id must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Counts a link refused because the agent's identity does not back its claims.
pub(crate) fn count_refusal(shared: &crate::Shared, refusal: &crate::identity::Refusal) {
    shared
        .metrics
        .identity_refusals
        .get_or_create(&crate::metrics::LinkErrorLabels {
            reason: refusal.reason(),
        })
        .inc();
}
