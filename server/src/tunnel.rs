//! Opens a tunneled connection: routes the destination to an agent and asks it to dial.
//!
//! A native agent carries the connection on an HTTP/2 stream of its link; an upstream
//! konnectivity agent on its shared `Connect` stream.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cplink_proto::dial::{DialFailure, ERROR_KIND_HEADER, MAX_REASON_LEN};
use cplink_proto::konnectivity::mux::{MuxConn, MuxDialError};
use cplink_proto::target::Target;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};

use crate::Shared;
use crate::connections::{Counted, Tracked};
use crate::metrics::{ResultLabels, StrategyLabels};
use crate::registry::{AgentLink, Carrier, Route};

/// How long a connection whose client finished may wait for the agent to confirm the close
/// (konnectivity has no half-close) or to finish sending.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// An established tunneled connection.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// How the bytes travel.
    pub carried: Carried,
    /// The route, holding the link's stream count.
    pub route: Route,
    /// The connection's entry in the server's table of connections.
    pub tracked: Tracked,
    /// This connection's share of `--max-tunnels`.
    pub _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Where the pump of the tunnel with `route` and `tracked` counts its bytes: `totals` (the
/// server's metrics), the connection and its link.
pub(crate) fn counted<'a>(
    totals: &'a cplink_proto::pump::ByteCounters,
    tracked: &'a Tracked,
    route: &'a Route,
) -> Counted<'a> {
    Counted {
        totals,
        connection: tracked.entry(),
        link: route.guard.link(),
    }
}

/// The agent's end of an established tunneled connection.
#[derive(Debug)]
pub(crate) enum Carried {
    /// An HTTP/2 stream of a native link.
    H2 {
        /// Bytes towards the destination.
        send: SendStream<Bytes>,
        /// Bytes from the destination.
        recv: RecvStream,
    },
    /// A connection on an upstream agent's shared stream.
    Mux(MuxConn),
}

/// [`open`], timed and counted in the dial metrics, entered in the table of connections from
/// `frontend`, the chosen agent recorded in the current span.
pub(crate) async fn open_counted(
    shared: &Shared,
    target: &Target,
    frontend: &'static str,
) -> Result<Tunnel, DialFailure> {
    let metrics = &shared.metrics;
    let started = Instant::now();
    let tracked = shared.connections.track(frontend, target);
    let tunnel = match shared.tunnels.clone().try_acquire_owned() {
        Ok(permit) => open(shared, target, &|route| {
            tracked.entry().set_link(route.guard.link())
        })
        .await
        .map(|(carried, route)| {
            tracked.entry().set_established();
            Tunnel {
                carried,
                route,
                tracked,
                _permit: permit,
            }
        }),
        Err(_) => Err(DialFailure::Busy(format!(
            "{} tunneled connections open (--max-tunnels)",
            shared.config.max_tunnels
        ))),
    };
    metrics
        .dial_duration
        .observe(started.elapsed().as_secs_f64());
    match &tunnel {
        Ok(tunnel) => {
            tracing::Span::current().record("agent_id", tunnel.route.guard.link().id.as_str());
            metrics
                .dials
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
            metrics
                .routed
                .get_or_create(&StrategyLabels {
                    strategy: tunnel.route.strategy.as_str(),
                })
                .inc();
            tracing::debug!(strategy = %tunnel.route.strategy, "dial established");
        }
        Err(failure) => {
            metrics
                .dials
                .get_or_create(&ResultLabels {
                    result: failure.kind(),
                })
                .inc();
            tracing::info!(%failure, "dial failed");
        }
    }
    tunnel
}

/// How one attempt on one agent failed.
enum Attempt {
    /// The agent answered: the dial failed for good.
    Answered(DialFailure),
    /// The link could not take the request (going away, broken); another agent may.
    LinkUnavailable(String),
}

/// Routes `target` and dials it through the chosen agent, within the dial timeout; `routed`
/// learns of each route tried. The caller holds a share of `--max-tunnels`.
pub(crate) async fn open(
    shared: &Shared,
    target: &Target,
    routed: &(dyn Fn(&Route) + Sync),
) -> Result<(Carried, Route), DialFailure> {
    let budget = shared.config.dial_timeout;
    let mut deadline = tokio::time::Instant::now() + budget;
    let mut last_error = None;
    // A link that is going away refuses new streams; try the next best agent a few times.
    for _ in 0..3 {
        // Also after such a refusal: it may have been the node's own agent, going away.
        let holding = tokio::time::Instant::now();
        if let Some(wait) = shared
            .registry
            .await_node_agent(
                target,
                &shared.config.strategies,
                shared.config.node_agent_grace,
            )
            .await
        {
            let metrics = &shared.metrics;
            metrics
                .node_agent_waits
                .get_or_create(&ResultLabels {
                    result: wait.as_str(),
                })
                .inc();
            metrics
                .node_agent_wait_duration
                .observe(holding.elapsed().as_secs_f64());
            // The wait is not the agent's: its answer gets the whole budget.
            deadline = tokio::time::Instant::now() + budget;
        }
        let route = shared.registry.route(target, &shared.config.strategies)?;
        routed(&route);
        let link = route.guard.link().clone();
        match tokio::time::timeout_at(deadline, attempt(&link, target)).await {
            Err(_elapsed) => return Err(DialFailure::Timeout(budget)),
            Ok(Ok(carried)) => return Ok((carried, route)),
            Ok(Err(Attempt::Answered(failure))) => return Err(failure),
            Ok(Err(Attempt::LinkUnavailable(reason))) => {
                tracing::debug!(agent_id = %link.id, %reason, "link unavailable, rerouting");
                link.mark_draining();
                last_error = Some(reason);
            }
        }
    }
    Err(DialFailure::Link(last_error.unwrap_or_default()))
}

async fn attempt(link: &AgentLink, target: &Target) -> Result<Carried, Attempt> {
    match &link.carrier {
        Carrier::Native(sender) => attempt_native(sender, target).await,
        Carrier::Konnectivity(mux) => match mux.dial(&target.to_string()).await {
            Ok(conn) => Ok(Carried::Mux(conn)),
            Err(MuxDialError::Refused(error)) => Err(Attempt::Answered(
                DialFailure::from_konnectivity_error(&error),
            )),
            Err(MuxDialError::StreamClosed(reason)) => Err(Attempt::LinkUnavailable(reason)),
        },
    }
}

async fn attempt_native(
    sender: &h2::client::SendRequest<Bytes>,
    target: &Target,
) -> Result<Carried, Attempt> {
    let unavailable = |e: h2::Error| Attempt::LinkUnavailable(e.to_string());
    let mut sender = sender.clone().ready().await.map_err(unavailable)?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| Attempt::Answered(DialFailure::BadTarget(e.to_string())))?;
    let (response, send) = sender.send_request(request, false).map_err(unavailable)?;
    let response = response.await.map_err(|e| {
        // Streams the agent never processed (above its GOAWAY) are safe to retry elsewhere.
        if e.is_go_away() && e.is_remote() || e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            Attempt::LinkUnavailable(e.to_string())
        } else {
            Attempt::Answered(DialFailure::Link(e.to_string()))
        }
    })?;
    let (parts, mut body) = response.into_parts();
    if parts.status == StatusCode::OK {
        return Ok(Carried::H2 { send, recv: body });
    }
    let kind = parts
        .headers
        .get(ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let reason = read_reason(&mut body).await;
    Err(Attempt::Answered(DialFailure::from_response(
        parts.status,
        kind.as_deref(),
        reason,
    )))
}

/// Reads the agent's one-line reason, bounded in size and time.
async fn read_reason(body: &mut RecvStream) -> String {
    let mut reason = Vec::new();
    let read = async {
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            let room = MAX_REASON_LEN.saturating_sub(reason.len());
            reason.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
    String::from_utf8_lossy(&reason).trim().to_owned()
}
