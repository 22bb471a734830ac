//! Test support for cplink: certificates, in-process servers and agents on loopback, CONNECT
//! clients, destination fixtures, and waiting on conditions.
//!
//! - [`pki`]: a CA and leaf certificates written to a private directory.
//! - [`cluster`]: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler) on loopback.
//! - [`binaries`]: the workspace's binaries; the operator as a process.
//! - [`kubelet`]: a pod runner playing kubelet for simulated nodes on loopback addresses.
//! - [`forwarder`]: a TCP forwarder to a Service's ready endpoints (a load balancer's role).
//! - [`helm`]: releases of the Helm chart through the real Helm engine.
//! - [`stack`]: all of it together: control plane, nodes, cplink installed with its chart, a
//!   link, egress wired.
//! - [`fixture`]: [`fixture::Loopback`] starts servers and agents in-process on `127.0.0.1:0`.
//! - [`client`]: CONNECT clients for the Unix socket and TLS frontends.
//! - [`grpc`]: konnectivity gRPC peers: a Proxy client and a scripted upstream agent.
//! - [`targets`]: destinations: echo, source, sink, a closed port and a black hole.
//! - [`wait`]: polling a condition until a deadline.
//! - [`harness`]: a test body under a deadline, named steps, bounded runtime shutdown and
//!   bounded process stops.

pub mod binaries;
pub mod client;
pub mod cluster;
pub mod fixture;
pub mod forwarder;
pub mod grpc;
pub mod harness;
pub mod helm;
pub mod kubelet;
pub mod pki;
pub mod stack;
pub mod targets;
pub mod wait;

/// Installs a test log subscriber once (filter from `RUST_LOG`, default `warn`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
