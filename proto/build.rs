//! Generates the konnectivity gRPC types and services from `protos/konnectivity.proto`, with
//! the `konnectivity` feature.
//!
//! protox parses the file in Rust, so building needs no system `protoc`.

#[cfg(not(feature = "konnectivity"))]
fn main() {}

#[cfg(feature = "konnectivity")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "protos/konnectivity.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["protos"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // AgentService has a `Connect` method; the transport helper `connect` would clash.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
