//! Serves one tunnel stream: checks the destination, dials it, answers, then pumps bytes.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use cplink_proto::dial::{DialFailure, ERROR_KIND_HEADER, classify_connect_error};
use cplink_proto::net::{abort_tcp_halves, tune_stream};
use cplink_proto::pump;
use cplink_proto::target::{Host, Target};
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::Shared;
use crate::metrics::ResultLabels;

/// Handles a `CONNECT` stream opened by a server.
pub(crate) async fn serve(
    shared: &Shared,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, recv) = request.into_parts();
    let target = match parse_target(&parts.method, &parts.uri) {
        Ok(target) => target,
        Err(failure) => return refuse(shared, &mut respond, &failure),
    };
    let span = tracing::info_span!("dial", dest = %target);
    dial_and_pump(shared, target, recv, respond)
        .instrument(span)
        .await;
}

async fn dial_and_pump(
    shared: &Shared,
    target: Target,
    recv: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let dialed = dial(shared, &target).await;
    shared
        .metrics
        .dial_duration
        .observe(started.elapsed().as_secs_f64());
    let tcp = match dialed {
        Ok(tcp) => tcp,
        Err(failure) => {
            tracing::info!(%failure, "dial refused");
            return refuse(shared, &mut respond, &failure);
        }
    };
    shared
        .metrics
        .dials
        .get_or_create(&ResultLabels { result: "ok" })
        .inc();

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
        Ok(stats) => tracing::debug!(
            to_destination = stats.stream_to_socket,
            from_destination = stats.socket_to_stream,
            "tunnel closed"
        ),
        Err(err) => {
            tracing::info!(%err, "tunnel aborted");
            abort_tcp_halves(reader, writer);
        }
    }
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

fn refuse(shared: &Shared, respond: &mut SendResponse<Bytes>, failure: &DialFailure) {
    shared
        .metrics
        .dials
        .get_or_create(&ResultLabels {
            result: failure.kind(),
        })
        .inc();
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

/// Resolves, checks policy and connects, all within the dial timeout.
async fn dial(shared: &Shared, target: &Target) -> Result<TcpStream, DialFailure> {
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
