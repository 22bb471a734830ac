//! The benchmark binary runs end to end (`--quick`) and prints a complete table: every
//! workload moved all its bytes through the three frontends and through the OpenSSH baseline
//! (installed by `scripts/setup.sh`), or the binary would have failed.

use std::process::Command;

#[test]
fn quick_benchmark_prints_a_complete_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_cplink-bench"))
        .args(["--quick", "--markdown"])
        .output()
        .expect("cplink-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cplink-bench failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
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
