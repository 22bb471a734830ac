//! Native links to servers: dial, TLS, hello, then HTTP/2 with the agent as the server.

use std::sync::Arc;

use bytes::Bytes;
use cplink_proto::hello::{self, AgentHello, HelloOutcome, ServerHello};
use cplink_proto::keepalive;

use super::{
    LinkContext, LinkError, LinkTls, ServerSlot, connect_tcp, count_attempt, handshake_tls,
};
use crate::slots::{HeldLink, OnDuplicate};
use crate::token;
use crate::{LinkInfo, Shared, dial};

/// TCP, TLS and the hello exchange, within the link budget.
async fn handshake(
    shared: &Shared,
    target: &ServerSlot,
) -> Result<(LinkTls, ServerHello), LinkError> {
    let config = &shared.config;
    let endpoint = &target.endpoint;
    let budget = config.link_timeout;
    // Read before dialing: an unreadable token fails the attempt without bothering the server.
    let token = match &config.service_account_token_path {
        Some(path) => Some(token::read(path).await?),
        None => None,
    };
    let tcp = connect_tcp(config, endpoint).await?;
    let handshake = async {
        let mut tls = handshake_tls(config, endpoint, tcp, cplink_proto::ALPN_LINK).await?;
        let ours = AgentHello {
            agent_id: config.agent_id.clone(),
            node_name: config.node_name.clone(),
            identifiers: shared.identifiers().clone(),
            software_version: cplink_proto::SOFTWARE_VERSION.to_owned(),
            token,
        };
        hello::write(&mut tls, &ours).await?;
        let theirs: ServerHello = hello::read(&mut tls).await?;
        Ok((tls, theirs))
    };
    tokio::time::timeout(budget, handshake)
        .await
        .map_err(|_| LinkError::Timeout {
            step: "TLS handshake and hello",
            budget,
        })?
}

/// An established native link: the HTTP/2 connection on which the server opens streams.
pub(crate) struct Link {
    info: LinkInfo,
    held: HeldLink,
    connection: h2::server::Connection<LinkTls, Bytes>,
}

impl Link {
    /// Whether this link replaced an older link to the same server.
    pub(crate) fn replaced(&self) -> bool {
        self.held.replaced()
    }
}

/// Establishes one link: TCP, TLS, hello, HTTP/2. A link reaching a server already linked
/// through the same address replaces the older link: the server has already dropped it.
pub(crate) async fn connect(shared: &Shared, target: &ServerSlot) -> Result<Link, LinkError> {
    let (tls, server) = handshake(shared, target).await?;
    if let HelloOutcome::Rejected { reason } = server.outcome {
        return Err(LinkError::Rejected(reason));
    }
    let connection = h2::server::Builder::new()
        .initial_window_size(cplink_proto::STREAM_WINDOW)
        .initial_connection_window_size(cplink_proto::CONNECTION_WINDOW)
        .max_frame_size(cplink_proto::MAX_FRAME_SIZE)
        // The connection window never binds; the stream limit bounds what the link buffers
        // (see `cplink_proto::CONNECTION_WINDOW`).
        .max_concurrent_streams(shared.config.max_streams_per_link)
        .max_send_buffer_size(cplink_proto::STREAM_WINDOW as usize / 2)
        .handshake::<_, Bytes>(tls)
        .await?;

    tracing::Span::current().record("server_id", server.server_id.as_str());
    let info = LinkInfo {
        server_id: server.server_id,
        server_count: server.server_count,
    };
    shared
        .links
        .set_server_count(target.slot, info.server_count);
    let held = shared
        .links
        .hold(target.slot, info.clone(), OnDuplicate::Replace)?;
    Ok(Link {
        info,
        held,
        connection,
    })
}

/// Serves one link until it ends, then says why.
pub(crate) async fn serve_link(shared: Arc<Shared>, link: Link, context: LinkContext) {
    tracing::info!(server_count = link.info.server_count, "linked");
    match serve(&shared, link, &context).await {
        Ok(()) if context.shutdown.is_cancelled() => tracing::info!("link closed"),
        Ok(()) => tracing::info!("link closed by the server"),
        Err(err) => {
            count_attempt(&shared, err.kind());
            tracing::warn!(%err, "link failed");
        }
    }
}

async fn serve(shared: &Arc<Shared>, link: Link, context: &LinkContext) -> Result<(), LinkError> {
    let Link {
        held,
        mut connection,
        ..
    } = link;
    let superseded = held.superseded().clone();
    let ping_pong = connection.ping_pong();
    let keepalive = async {
        match ping_pong {
            Some(ping_pong) => keepalive::run(ping_pong, shared.config.keepalive).await,
            // Only one PingPong exists per connection and it was just created.
            None => std::future::pending().await,
        }
    };
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let Some(accepted) = dial::accept(shared, request, respond) else {
                        continue;
                    };
                    let shared = shared.clone();
                    let counted = held.count_stream();
                    context.streams.spawn(async move {
                        accepted.serve(&shared).await;
                        drop(counted);
                    });
                }
                // While draining, the server may close the link as soon as it has seen the
                // GOAWAY, before h2 finishes its closing handshake: that is the expected end.
                Some(Err(err)) if draining => {
                    tracing::debug!(%err, "link closed by the server while draining");
                    return Ok(());
                }
                Some(Err(err)) => return Err(err.into()),
                None => return Ok(()),
            },
            err = &mut keepalive => return Err(err.into()),
            () = context.shutdown.cancelled(), if !draining => {
                // GOAWAY: the server routes new dials elsewhere; streams in flight finish.
                draining = true;
                connection.graceful_shutdown();
                tracing::info!("draining: no new streams accepted");
            }
            () = superseded.cancelled(), if !draining => {
                draining = true;
                connection.graceful_shutdown();
                tracing::info!("a newer link to the same server replaced this one: draining");
            }
            () = context.force.cancelled() => return Ok(()),
        }
    }
}
