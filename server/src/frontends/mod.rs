//! Where kube-apiserver's egress connections come in.
//!
//! - [`connect`]: the HTTP CONNECT request head (parsing, answers).
//! - `http_connect`: the CONNECT frontends, over TCP with mutual TLS and over a Unix socket
//!   (kube-apiserver's `HTTPConnect` egress mode).
//! - `grpc`: konnectivity's `ProxyService/Proxy` on a Unix socket (kube-apiserver's `GRPC`
//!   egress mode), one stream per tunneled connection, routed like a CONNECT.

pub mod connect;
pub(crate) mod grpc;
pub(crate) mod http_connect;

use crate::Shared;
use crate::metrics::RequestErrorLabels;

/// Counts a frontend request refused before dialing.
pub(crate) fn count_request_error(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .request_errors
        .get_or_create(&RequestErrorLabels { reason })
        .inc();
}
