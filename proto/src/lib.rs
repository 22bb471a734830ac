//! What both ends of a cplink link agree on, and the runtime pieces the server and the agent share.
//!
//! - [`hello`]: the versioned, length-prefixed preface and hello exchanged right after TLS.
//! - [`target`]: `host:port` destinations as they travel in CONNECT requests and `:authority`.
//! - [`dial`]: the outcomes of a dial and the HTTP status each one maps to.
//! - [`tls`]: loading PEM files and building the rustls configurations of the link and frontends.
//! - [`pump`]: moves bytes between a socket and an HTTP/2 stream with per-stream flow control.
//! - [`keepalive`]: HTTP/2 PING liveness for links.
//! - [`konnectivity`]: the konnectivity gRPC protocol (generated), its metadata and packets.
//! - [`net`]: socket tuning and abortive close.
//! - [`config`]: configuration errors naming the flag at fault.
//! - [`admin`]: the `/healthz`, `/readyz`, `/metrics` HTTP endpoint.
//! - [`telemetry`]: log setup (text or JSON).
//! - [`shutdown`]: SIGTERM/SIGINT handling.

pub mod admin;
pub mod config;
pub mod dial;
pub mod hello;
pub mod keepalive;
pub mod konnectivity;
pub mod net;
pub mod pump;
pub mod readahead;
pub mod shutdown;
pub mod target;
pub mod telemetry;
pub mod tls;

/// ALPN protocol id of the native cplink link.
pub const ALPN_LINK: &[u8] = b"cplink/1";

/// ALPN protocol id of HTTP/2, which konnectivity's gRPC links negotiate.
pub const ALPN_H2: &[u8] = b"h2";

/// Version of the cplink software, reported in hellos and logs.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Per-stream HTTP/2 receive window of a link: how much one tunneled connection may have in
/// flight in each direction, socket buffers on the way included.
///
/// It bounds how much of a bulk transfer a small request of another stream can find queued
/// ahead of it, and it caps one stream's throughput at this window per round trip (256 KiB per
/// 10 ms is 25 MiB/s on a distant link, 256 MiB/s at 1 ms).
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Per-link HTTP/2 receive window, shared by all streams of the link. Large against
/// [`STREAM_WINDOW`] so that one stalled reader, or a few, cannot block the link.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Largest HTTP/2 frame a link peer accepts. Bulk transfers move in frames this large, one
/// write each; a small frame of another stream waits behind at most one of them.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// Most tunneled connections one link carries at once.
pub const MAX_STREAMS_PER_LINK: u32 = 16 * 1024;
