//! After many TLS tunnels close, cplink-server gives most of the memory it grew by back to the
//! system (with glibc's malloc its RSS stayed near its peak; it now runs on jemalloc
//! with a background purging thread). The agent, still on glibc's malloc, grows by a few MiB
//! only and is reported, not checked.
//!
//! Runs `cplink-rss` against the `cplink-server` and `cplink-agent` binaries next to it (built
//! by `cargo build --workspace --bins`, as `make test` does). The bound is generous on
//! purpose, not a timing: after the tunnels closed and a short settle, the server's RSS must be
//! back below idle plus half of its growth from idle to peak.

use std::process::Command;

#[test]
fn memory_grown_by_closed_tls_tunnels_is_given_back() {
    let output = Command::new(env!("CARGO_BIN_EXE_cplink-rss"))
        .args([
            "--tunnels",
            "3000",
            "--wave",
            "1000",
            "--settle",
            "3s",
            "--upload-mib",
            "0",
            "--json",
        ])
        .output()
        .expect("cplink-rss starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cplink-rss failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    let outcomes: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let server = &outcomes[0]["server"];
    let kib = |field: &str| {
        server[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no server.{field} in {outcomes:#}"))
    };
    let (idle, peak, settled) = (kib("idle_kib"), kib("peak_kib"), kib("settled_kib"));
    assert!(
        peak > idle,
        "the server never grew ({idle} KiB idle, {peak} KiB peak): the load did not reach it\n\
         {outcomes:#}"
    );
    let bound = idle + (peak - idle) / 2;
    assert!(
        settled <= bound,
        "the server kept {settled} KiB after the tunnels closed: more than idle ({idle} KiB) \
         plus half its growth to the peak ({peak} KiB), {bound} KiB\n{outcomes:#}"
    );
}
