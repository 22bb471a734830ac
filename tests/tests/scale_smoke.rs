//! The scale benchmark runs end to end on a small scale and prints every figure: agents link,
//! dials are routed by each strategy, idle connections are held, and the agents come back
//! after the server is killed, or the binary would have failed. The same for the watch load
//! on kube-apiserver.

use std::process::Command;

/// What a benchmark binary printed, one figure per line after its label: runs `binary` with
/// `args`, fails the test unless it succeeded.
struct Printed(String);

impl Printed {
    fn run(binary: &str, args: &[&str]) -> Self {
        let output = Command::new(binary)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{binary} starts: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{binary} failed: {}\n{stdout}\n{stderr}",
            output.status
        );
        Printed(stdout)
    }

    /// The figure printed after `label`.
    fn figure(&self, label: &str) -> String {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no line {label:?} in\n{}", self.0))
            .trim()
            .to_owned()
    }
}

#[test]
fn a_small_scale_run_prints_every_figure() {
    let printed = Printed::run(
        env!("CARGO_BIN_EXE_cplink-scale"),
        &[
            "--agents",
            "12",
            "--agent-processes",
            "2",
            "--streams",
            "120",
            "--grpc-connections",
            "2",
            "--dials",
            "48",
            "--idle-for",
            "1s",
        ],
    );
    let figure = |label: &str| printed.figure(label);
    let number = |text: &str| -> f64 {
        text.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{text:?} does not start with a figure"))
    };
    assert!(number(&figure("server RSS, 12 agents linked")) > 0.0);
    assert!(number(&figure("12 agents linked from cold in")).is_finite());
    for strategy in ["node (host IP)", "pod CIDR", "any"] {
        let cost = figure(&format!("server CPU per dial, {strategy}"));
        assert!(cost.contains("with 12 agents"), "{cost}");
    }
    let idle = figure("server CPU, 12 agents linked, idle");
    assert!(idle.ends_with("% of a core"), "{idle}");
    let held = figure("server RSS, 120 idle connections");
    assert!(held.contains("KiB per connection"), "{held}");
    let storm = figure("relinked after a server restart, 12 agents");
    assert!(storm.contains("all in"), "{storm}");
}

#[test]
fn a_small_watch_load_run_delivers_every_change_and_prints_every_figure() {
    // It fails, naming the change, unless every watcher saw every change.
    let printed = Printed::run(
        env!("CARGO_BIN_EXE_cplink-watch-load"),
        &[
            "--watchers",
            "24",
            "--changes",
            "3",
            "--idle-for",
            "1s",
            "--opening",
            "8",
        ],
    );
    let figure = |label: &str| printed.figure(label);
    assert!(figure("kube-apiserver RSS, 24 watches").contains("KiB per watch"));
    assert!(figure("24 watches opened in").contains("ms of kube-apiserver CPU each"));
    assert!(figure("kube-apiserver CPU, idle").ends_with("% with 24"));
    assert!(
        figure("kube-apiserver CPU per EndpointSlice change, 24 watches")
            .contains("per watcher told")
    );
    assert!(figure("change seen by every watcher after").contains("(3 changes)"));
}
