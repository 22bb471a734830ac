//! Test support for cplink: certificates, in-process servers and agents on loopback, CONNECT
//! clients, destination fixtures, a real control plane with real nodes, cplink's container
//! image and private containerds, and waiting on conditions.
//!
//! Map of the crate, in layers: each module uses only modules listed above it.
//!
//! Foundations:
//! - [`wait`]: polling a condition until a deadline.
//! - [`harness`]: a test body under a deadline, named steps, bounded runtime shutdown and
//!   bounded process stops.
//! - [`pki`]: a CA and leaf certificates written to a private directory.
//! - [`workspace`]: the repository's root, where charts, CRDs and scripts are found, and the
//!   cache the scripts fill.
//! - [`cli`]: a binary's command line: refused flags, `--help`.
//! - [`cgroups`]: removing the cgroups test containers leave on the host.
//! - [`http1`]: plain HTTP/1.1 requests, to admin endpoints.
//! - [`metrics`]: counters in the Prometheus text admin endpoints serve; the metric families
//!   the binaries export.
//! - [`procfs`]: a process's memory, CPU time and descendants, from `/proc`.
//! - [`netns`]: a network namespace held by a thread: sockets and commands made inside it.
//! - [`pty`]: a child process on a pseudo-terminal, for programs that act differently on one.
//! - [`sweep`]: what runs with real nodes make on the host, named for their process, and the
//!   sweep of what killed runs left.
//!
//! In-process, on loopback:
//! - [`targets`]: destinations: echo, source, sink, a closed port and a black hole.
//! - [`client`]: CONNECT clients for the Unix socket and TLS frontends.
//! - [`grpc`]: konnectivity gRPC peers: a Proxy client and a scripted upstream agent.
//! - [`grpc_wire`]: a Proxy client at the HTTP/2 frame level, sending kube-apiserver's exact
//!   header blocks.
//! - [`fixture`]: [`fixture::Loopback`] starts servers and agents in-process on `127.0.0.1:0`.
//!
//! Containers:
//! - [`image`]: cplink's OCI image archive, built from the workspace's binaries and cached by
//!   content; the `Dockerfile`'s final stage, read for comparison.
//! - [`containerd`]: a private containerd in namespaces of its own: import images, run
//!   containers, stop with nothing left behind.
//!
//! A cluster on one machine:
//! - [`cluster`]: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler) on loopback.
//! - [`binaries`]: the workspace's binaries; the operator as a process.
//! - [`node`]: real worker nodes: kubelet and containerd in namespaces of their own, on a
//!   network kube-apiserver has no route to.
//! - [`nodes`]: N real nodes of one cluster, started in parallel after a check of the machine
//!   and a sweep; the run's images imported into each.
//! - [`forwarder`]: a TCP forwarder to a Service's ready endpoints (a load balancer's role).
//! - [`helm`]: releases of the Helm chart through the real Helm engine.
//! - [`stack`]: all of it together: control plane, nodes, cplink installed with its chart, a
//!   link, egress wired.
//! - [`prober`]: node proxy requests through kube-apiserver in a loop, each outcome kept.

pub mod binaries;
pub mod cgroups;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod containerd;
pub mod fixture;
pub mod forwarder;
pub mod grpc;
pub mod grpc_wire;
pub mod harness;
pub mod helm;
pub mod http1;
pub mod image;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod nodes;
pub mod pki;
pub mod prober;
pub mod procfs;
pub mod pty;
pub mod stack;
pub mod sweep;
pub mod targets;
pub mod wait;
pub mod workspace;

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
