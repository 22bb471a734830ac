//! The benchmark binary runs end to end (`--quick`) and prints a complete table: every
//! workload moved all its bytes through the three frontends and through the OpenSSH baseline
//! (installed by `scripts/setup.sh`), or the binary would have failed.

use std::process::{Command, Stdio};
use std::time::Duration;

use cplink_e2e::harness;

/// How long the quick run may take: about a minute, ten on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(600);

/// Runs `cplink-bench` with `args` to its end (or fails the test at [`DEADLINE`]) and returns
/// its standard output.
fn run_bench(args: &[&str]) -> String {
    // Output to files, read once the run is over: the deadline holds whatever the run does.
    let dir = tempfile::tempdir().expect("temporary directory");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_cplink-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("cplink-bench starts");
    let status = harness::wait_child(&mut child, DEADLINE);
    if status.is_none() {
        harness::stop_child(&mut child, Duration::from_secs(5));
    }
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    // The last progress line names the workload it was on.
    let status = status.unwrap_or_else(|| {
        panic!("cplink-bench did not finish within {DEADLINE:?}:\n{stdout}\n{stderr}")
    });
    assert!(
        status.success(),
        "cplink-bench failed: {status}\n{stdout}\n{stderr}"
    );
    stdout
}

/// The table's rows, each a list of its cells.
fn rows(stdout: &str) -> Vec<Vec<&str>> {
    stdout
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

#[test]
fn quick_benchmark_prints_a_complete_table() {
    let stdout = run_bench(&["--quick", "--markdown"]);
    let rows = rows(&stdout);
    assert_eq!(rows[0][0], "measurement", "{stdout}");
    for row in &rows {
        assert_eq!(row.len(), 11, "row {row:?} in\n{stdout}");
    }
    let find = |prefix: &str| {
        rows.iter()
            .find(|r| r[0].starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?} in\n{stdout}"))
    };
    let number = |cell: &str| -> f64 {
        cell.split_whitespace()
            .next()
            .and_then(|n| n.trim_end_matches("/s").parse().ok())
            .unwrap_or_else(|| panic!("{cell:?} is not a figure"))
    };
    for prefix in ["64 MiB upload, 1 stream", "64 MiB download, 8 streams"] {
        let row = find(prefix);
        for column in [1, 2, 4, 6, 8] {
            assert!(number(row[column]) > 0.0, "{row:?}");
        }
    }
    // The tunnel's processes did measurable work for every transfer: CPU time is read from
    // /proc, so a figure of zero would mean the reading is broken.
    for prefix in [
        "CPU per GiB, upload, 1 stream",
        "CPU per GiB, download, 8 streams",
        "CPU per dial",
    ] {
        let row = find(prefix);
        for column in [2, 4, 6, 8] {
            let cpu = number(row[column]);
            assert!(cpu.is_finite() && cpu > 0.0, "{row:?}");
        }
    }
    // A relay sleeps while nothing arrives and is woken when something does: a quiet round
    // trip wakes each end at least once, so a figure of zero would mean the reading is broken.
    let woken = find("wake-ups per 64 B round trip");
    for column in [2, 4, 6, 8] {
        let per_round_trip = number(woken[column]);
        assert!(per_round_trip >= 1.0, "{woken:?}");
    }
    // An idle tunneled connection holds buffers and bookkeeping, never a stream window of data
    // (256 KiB): a figure near that would mean idle connections pin their windows.
    let memory = find("memory per idle connection");
    for column in [2, 4, 6] {
        assert!(memory[column].ends_with("KiB"), "{memory:?}");
        let kib = number(memory[column]);
        assert!(kib.is_finite() && kib < 128.0, "{memory:?}");
    }
    let agent = find("agent RSS, linked");
    assert!(number(agent[2]) > 0.0, "{agent:?}");
}

/// With two agents linked (`--agents 2`: the server spreads streams over their links, the
/// least loaded first) the run completes, and every byte arrives: the benchmark checks each
/// transfer.
#[test]
fn two_agents_carry_every_byte() {
    let stdout = run_bench(&[
        "--quick",
        "--markdown",
        "--agents",
        "2",
        "--only",
        "parallel",
        "--through",
        "uds",
    ]);
    let rows = rows(&stdout);
    let row = rows
        .iter()
        .find(|r| r[0].starts_with("64 MiB download, 8 streams"))
        .unwrap_or_else(|| panic!("no 8-stream row in\n{stdout}"));
    assert!(row[2].ends_with("MiB/s"), "{row:?}");
}
