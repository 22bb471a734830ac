//! Dials destinations for servers, and serves native tunnel streams.
//!
//! [`open`] is what both link protocols share: the destination policy, the connect within the
//! dial timeout, and the dial metrics. [`accept`] takes one native `CONNECT` stream and
//! [`Accepted::serve`] answers it with [`open`], then pumps bytes; the konnectivity side
//! answers dial requests on its shared stream.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use cplink_proto::dial::{DialFailure, ERROR_KIND_HEADER, classify_connect_error};
use cplink_proto::pump;
use cplink_proto::target::{Host, Target};
use cplink_runtime::net::{abort_tcp_halves, abort_tcp_halves_after_sent, tune_stream};
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::Shared;
use crate::metrics::ResultLabels;

/// A `CONNECT` stream opened by a server, its destination parsed: what the stream's task holds
/// for as long as the tunnel lives, so the request's head is not part of it.
pub(crate) struct Accepted {
    target: Target,
    recv: RecvStream,
    respond: SendResponse<Bytes>,
}

/// Takes a `CONNECT` stream opened by a server: its destination, or the refusal of a request
/// that names none, answered at once.
pub(crate) fn accept(
    shared: &Shared,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<Accepted> {
    let (parts, recv) = request.into_parts();
    match parse_target(&parts.method, &parts.uri) {
        Ok(target) => Some(Accepted {
            target,
            recv,
            respond,
        }),
        Err(failure) => {
            count(shared, failure.kind());
            refuse(&mut respond, &failure);
            None
        }
    }
}

impl Accepted {
    /// Dials the destination, answers the stream, then pumps bytes until the tunnel ends.
    pub(crate) async fn serve(self, shared: &Shared) {
        let span = tracing::info_span!("dial", dest = %self.target);
        dial_and_pump(shared, self).instrument(span).await;
    }
}

async fn dial_and_pump(shared: &Shared, accepted: Accepted) {
    let Accepted {
        target,
        recv,
        mut respond,
    } = accepted;
    let dialed = tokio::select! {
        dialed = open(shared, &target) => dialed,
        // The server gave up on the dial (its client cancelled or left): stop dialing rather
        // than finish a connection nobody will use.
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            count(shared, "cancelled");
            tracing::info!("dial cancelled by the server");
            return;
        }
    };
    // Not held for the tunnel's life.
    drop(target);
    let tcp = match dialed {
        Ok(tcp) => tcp,
        Err(failure) => return refuse(&mut respond, &failure),
    };

    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(err) => {
            tracing::debug!(%err, "stream gone before the dial was answered");
            return;
        }
    };
    let _active = pump::ActiveStream::new(&shared.metrics.streams_active);
    let (mut reader, mut writer) = tcp.into_split();
    match pump::pump(
        &mut reader,
        &mut writer,
        send,
        recv,
        Bytes::new(),
        &shared.metrics.bytes,
    )
    .await
    {
        Ok(stats) => closed(stats),
        Err(err) if err.delivered_then_aborted() => {
            tracing::info!(%err, "tunnel aborted after its bytes were written");
            abort_tcp_halves_after_sent(reader, writer, pump::ABORT_LINGER).await;
        }
        Err(err) => aborted(&err, reader, writer),
    }
}

/// Logs a tunneled connection that ended cleanly.
pub(crate) fn closed(stats: pump::PumpStats) {
    tracing::debug!(
        to_destination = stats.stream_to_socket,
        from_destination = stats.socket_to_stream,
        "tunnel closed"
    );
}

/// Logs a tunneled connection that failed and resets its destination socket, so that the
/// destination sees an error rather than a clean end.
pub(crate) fn aborted(
    err: &dyn std::fmt::Display,
    reader: tokio::net::tcp::OwnedReadHalf,
    writer: tokio::net::tcp::OwnedWriteHalf,
) {
    tracing::info!(%err, "tunnel aborted");
    abort_tcp_halves(reader, writer);
}

fn parse_target(method: &Method, uri: &http::Uri) -> Result<Target, DialFailure> {
    if method != Method::CONNECT {
        return Err(DialFailure::BadTarget(format!(
            "method {method} is not CONNECT"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| DialFailure::BadTarget("CONNECT without :authority".into()))?;
    authority
        .as_str()
        .parse()
        .map_err(|e: cplink_proto::target::TargetError| DialFailure::BadTarget(e.to_string()))
}

fn refuse(respond: &mut SendResponse<Bytes>, failure: &DialFailure) {
    let response = Response::builder()
        .status(failure.status())
        .header(ERROR_KIND_HEADER, failure.kind())
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(())
        .unwrap_or_else(|_| {
            // Status and header values above are constants; this cannot be reached.
            let mut r = Response::new(());
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        });
    match respond.send_response(response, false) {
        Ok(mut send) => {
            // The reason is tiny and the stream fresh, so its window always has room.
            let _ = send.send_data(Bytes::from(failure.reason_line()), true);
        }
        Err(err) => tracing::debug!(%err, "stream gone before the refusal was sent"),
    }
}

/// Dials `target` for a server: resolves it, checks the destination policy and connects, all
/// within the dial timeout, and counts the outcome.
pub(crate) async fn open(shared: &Shared, target: &Target) -> Result<TcpStream, DialFailure> {
    let started = Instant::now();
    let dialed = connect(shared, target).await;
    shared
        .metrics
        .dial_duration
        .observe(started.elapsed().as_secs_f64());
    match &dialed {
        Ok(_) => count(shared, "ok"),
        Err(failure) => {
            tracing::info!(%failure, "dial refused");
            count(shared, failure.kind());
        }
    }
    dialed
}

/// Counts a dial outcome: `ok`, a [`DialFailure::kind`], or another fixed label.
pub(crate) fn count(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .dials
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Resolves, checks policy and connects, all within the dial timeout.
async fn connect(shared: &Shared, target: &Target) -> Result<TcpStream, DialFailure> {
    let budget = shared.config.dial_timeout;
    let attempt = async {
        let candidates: Vec<SocketAddr> = match &target.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(|e| DialFailure::Unreachable(format!("cannot resolve {name}: {e}")))?
                .collect(),
        };
        let mut denial = None;
        let mut last_error = None;
        for addr in candidates {
            if let Err(reason) = shared.config.policy.check(addr) {
                denial = Some(reason);
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    tune_stream(&tcp);
                    return Ok(tcp);
                }
                Err(err) => {
                    last_error = Some(classify_connect_error(&err, &addr.to_string(), budget))
                }
            }
        }
        Err(last_error
            .or(denial.map(DialFailure::Forbidden))
            .unwrap_or_else(|| {
                DialFailure::Unreachable(format!("{} resolved to no address", target.host))
            }))
    };
    tokio::time::timeout(budget, attempt)
        .await
        .unwrap_or(Err(DialFailure::Timeout(budget)))
}
