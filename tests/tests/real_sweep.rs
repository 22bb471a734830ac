//! A run with real nodes killed mid-run (SIGKILL: no destructor runs) leaves processes,
//! cgroups, a bridge, routes and directories on the host; the next run's start sweeps all of
//! it, and the host's sysctls are as they were.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cplink_e2e::harness::{self, stop_child};
use cplink_e2e::node::protected_sysctls;
use cplink_e2e::nodes::RealCluster;
use cplink_e2e::sweep::{self, Leftovers};

/// How long the killed run gets to be ready.
const READY: Duration = Duration::from_secs(180);

/// How long the test may take: it takes 30 to 60 s.
const DEADLINE: Duration = Duration::from_secs(360);

#[test]
fn what_a_killed_run_left_is_swept_when_the_next_run_starts() -> anyhow::Result<()> {
    let sysctls = protected_sysctls()?;
    harness::run(
        "what_a_killed_run_left_is_swept_when_the_next_run_starts",
        DEADLINE,
        |steps| async move {
            steps.enter("a run with two nodes and a pod on each");
            let log = tempfile::NamedTempFile::new()?;
            let mut child = Command::new(env!("CARGO_BIN_EXE_cplink-real-cluster"))
                .args(["--nodes", "2", "--shell-pods"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log.reopen()?)
                .spawn()?;
            let owner = child.id();
            let stdout = child.stdout.take().expect("stdout is piped");
            let (ready, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.starts_with("ready ") {
                        let _ = ready.send(line);
                    }
                }
            });
            let ready = tokio::task::spawn_blocking(move || lines.recv_timeout(READY)).await?;
            if ready.is_err() {
                stop_child(&mut child, Duration::ZERO);
                anyhow::bail!(
                    "the run was not ready within {READY:?}:\n{}",
                    std::fs::read_to_string(log.path())?
                );
            }
            let running = Leftovers::of(owner)?;
            assert!(
                !running.processes.is_empty()
                    && !running.cgroups.is_empty()
                    && !running.links.is_empty()
                    && !running.dirs.is_empty(),
                "the run's processes, cgroups, links and directories: {running}"
            );

            steps.enter("killing the run");
            let killed = stop_child(&mut child, Duration::ZERO).expect("reaped");
            assert!(!killed.success());
            // What no destructor removed: the control plane's processes (the nodes' go with
            // their parent), the cgroups, the bridge, the routes now no running owner claims,
            // the directories.
            let left = Leftovers::of(owner)?;
            assert!(
                !left.cgroups.is_empty()
                    && left.links.iter().any(|l| l.starts_with("cplbr"))
                    && !left.routes.is_empty()
                    && !left.dirs.is_empty(),
                "the killed run left its cgroups, bridge, routes and directories: {left}"
            );
            println!("the killed run left: {left}");

            steps.enter("the next run starting");
            let next = RealCluster::start(1).await?;
            // Routes the killed run claimed are gone or the next run's now.
            let after = Leftovers::of(owner)?;
            assert!(after.is_empty(), "left after the next start: {after}");
            println!("the next run's start swept it all");
            steps.enter("stopping the next run");
            let RealCluster { nodes, plane } = next;
            nodes.stop()?;
            drop(plane);
            assert!(
                sweep::Leftovers::of(std::process::id())?.dirs.is_empty(),
                "the next run left directories"
            );
            Ok(())
        },
    )?;
    assert_eq!(protected_sysctls()?, sysctls, "host sysctls changed");
    Ok(())
}
