//! What every cplink binary runs on, apart from the link itself: the admin endpoint, logs,
//! signals, configuration errors, accept loops, socket handling and the Kubernetes client.
//!
//! Nothing here is part of the link protocol (that is `cplink-proto`), so a binary that speaks
//! none of it, like the operator, can use this crate without compiling HTTP/2 or gRPC.
//!
//! Map of the crate, in layers: each module uses only modules listed above it.
//! - [`malloc`]: glibc allocator settings for the pods the operator makes.
//! - [`config`]: configuration errors naming the flag at fault.
//! - [`backoff`]: pauses between retries, doubling up to a cap, optionally jittered.
//! - [`telemetry`]: log setup (text or JSON), the same for every binary.
//! - [`args`]: flag groups the binaries share (logs, TLS identity), and the worker-thread count.
//! - [`executor`]: the tokio runtime, sized by `--worker-threads`.
//! - [`metrics`]: Prometheus metric shapes more than one binary exports.
//! - [`shutdown`]: SIGTERM/SIGINT handling.
//! - [`net`]: socket tuning and abortive close.
//! - [`readahead`]: a read-ahead buffer under TLS, and [`forward_async_write!`] for wrappers
//!   that change only how a transport is read.
//! - [`accept`]: accept loops with backoff, a rate-limited error log and a handshake cap.
//! - [`introspect`]: what the `/debug/...` views answer (JSON types shared with `kubectl
//!   cplink`), their query parameters and paging.
//! - [`admin`]: the `/healthz`, `/readyz`, `/metrics` HTTP endpoint, and the debug views.
//! - [`kubeapi`]: where the Kubernetes API is, and a client for it made on first use.

pub mod accept;
pub mod admin;
pub mod args;
pub mod backoff;
pub mod config;
pub mod executor;
pub mod introspect;
pub mod kubeapi;
pub mod malloc;
pub mod metrics;
pub mod net;
pub mod readahead;
pub mod shutdown;
pub mod telemetry;
