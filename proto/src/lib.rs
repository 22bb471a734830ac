//! What both ends of a cplink link agree on. What the binaries run on besides (admin endpoint,
//! logs, signals, accept loops, sockets) is `cplink-runtime`.
//!
//! - [`hello`]: the versioned, length-prefixed preface and hello exchanged right after TLS.
//! - [`target`]: `host:port` destinations as they travel in CONNECT requests and `:authority`.
//! - [`dial`]: the outcomes of a dial and the HTTP status each one maps to.
//! - [`tls`]: loading PEM files and building the rustls configurations of the link and frontends.
//! - [`pump`]: moves bytes between a socket and an HTTP/2 stream with per-stream flow control.
//! - [`keepalive`]: HTTP/2 PING liveness for links.
//! - `konnectivity`: the konnectivity gRPC protocol (generated), its metadata and packets; with
//!   the `konnectivity` feature (on by default), which compiles tonic and prost.

pub mod dial;
pub mod hello;
pub mod keepalive;
#[cfg(feature = "konnectivity")]
pub mod konnectivity;
pub mod pump;
pub mod target;
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

/// Per-connection HTTP/2 receive window of links and of gRPC connections: the largest HTTP/2
/// allows, so that it never binds. Memory is bounded by [`STREAM_WINDOW`] times the
/// concurrent-stream limit instead ([`MAX_STREAMS_PER_LINK_LIMIT`]).
///
/// Why not a smaller connection window: h2 hands connection capacity back only together with
/// stream capacity, once the application consumed the bytes (`release_capacity` returns both).
/// A stalled stream therefore keeps its whole stream window of the connection window. With a
/// connection window of W, W / [`STREAM_WINDOW`] stalled readers take all of it and every other
/// stream of the link stops: 32 MiB froze links at 128 stalled readers, in either direction.
/// Returning connection capacity on receipt and accounting buffered bytes per stream would need
/// a flow-control layer h2 does not offer. With a connection window of at least
/// `streams × STREAM_WINDOW`, a stalled stream can only ever stall itself, and the worst case a
/// receiver buffers is `streams × STREAM_WINDOW`, which the concurrent-stream limit
/// (`--max-streams-per-link` on the agent, `--max-tunnels` on the server) keeps small.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Highest concurrent-stream limit a link or gRPC connection may be given: with more streams,
/// stalled ones could together fill [`CONNECTION_WINDOW`] and stop the others.
pub const MAX_STREAMS_PER_LINK_LIMIT: u32 = CONNECTION_WINDOW / STREAM_WINDOW;

/// Default concurrent-stream limit of a native link (`cplink-agent --max-streams-per-link`):
/// at most 256 MiB (1024 × [`STREAM_WINDOW`]) buffered per link and direction, reached only
/// when every stream is stalled with its window full.
pub const DEFAULT_MAX_STREAMS_PER_LINK: u32 = 1024;

/// Receive window of the one konnectivity `Connect` stream that carries every connection of a
/// link. Its bytes are taken off at once into per-connection queues, so the window sets the
/// link's throughput per round trip, not what a stalled connection may hold.
pub const MUX_STREAM_WINDOW: u32 = 32 * 1024 * 1024;

/// Largest HTTP/2 frame a link peer accepts. Bulk transfers move in frames this large, one
/// write each; a small frame of another stream waits behind at most one of them.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
