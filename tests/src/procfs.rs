//! What `/proc` tells about a process (resident memory, CPU time, its descendants), and this
//! process's open-files limit. The benchmarks read their tunnels' processes through it.

use std::time::Duration;

use anyhow::Context as _;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// CPU time process `pid` has used so far, user and system, its exited threads included
/// (`utime` + `stime` of `/proc/<pid>/stat`, in clock ticks: 10 ms on Linux).
pub fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name in parentheses may hold spaces; the fields follow its last `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    // After the name: state is field 3 of proc(5), utime 14 and stime 15.
    let ticks = |field: usize| -> anyhow::Result<u64> {
        fields
            .get(field - 3)
            .context("short /proc/<pid>/stat")?
            .parse()
            .context("malformed /proc/<pid>/stat")
    };
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .context("no clock tick rate")?;
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
}

/// Voluntary context switches of process `pid` so far: how often its threads went to sleep to
/// wait for something (a socket, a lock, a timer) and were woken again, summed over its live
/// threads (from `/proc/<pid>/task/*/status`; threads that exited are not counted). Switches
/// by preemption are not counted: they tell of the machine's load more than of the process.
pub fn wake_ups(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may exit between the listing and the read.
        if let Ok(status) = std::fs::read_to_string(task?.path().join("status")) {
            total += wake_ups_in(&status).with_context(|| format!("/proc/{pid}/task/*/status"))?;
        }
    }
    Ok(total)
}

/// The voluntary context switches a thread's `status` file counts.
fn wake_ups_in(status: &str) -> anyhow::Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|count| count.trim().parse().ok())
        .context("no voluntary_ctxt_switches")
}

/// `pid` and every live process below it (from `/proc/<pid>/task/*/children`).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut next = 0;
    while let Some(&parent) = found.get(next) {
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            found.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    found
}

/// Raises this process's open-files limit as far as it may go: to `fs.nr_open` where the
/// process may raise its hard limit, else to the hard limit.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(hard)
        .max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, most, most).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The processes other than this one with a command-line argument that `matches` accepts.
pub fn processes_with_arg(matches: impl Fn(&str) -> bool) -> anyhow::Result<Vec<u32>> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read: then it is gone, as wanted.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if pid != me && String::from_utf8_lossy(&cmdline).split('\0').any(&matches) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_spends_cpu() {
        let me = std::process::id();
        assert!(rss_kib(me).expect("VmRSS") > 0);
        let before = cpu(me).expect("stat");
        // Burn CPU until the tick counter moves: a reading that never changes is broken.
        let mut x = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cpu(me).expect("stat") == before {
            assert!(
                std::time::Instant::now() < deadline,
                "CPU time never advanced"
            );
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert!(tree(me).contains(&me));
    }

    #[test]
    fn a_thread_that_sleeps_is_woken_up() {
        // Every sleep gives the CPU up and ends in a wake-up: ten of them are at least ten.
        let own = || {
            wake_ups_in(&std::fs::read_to_string("/proc/thread-self/status").expect("status"))
                .expect("switch counts")
        };
        let switched = std::thread::spawn(move || {
            let before = own();
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(1));
            }
            own() - before
        })
        .join()
        .expect("sleeper");
        assert!(switched >= 10, "{switched} wake-ups for 10 sleeps");
        assert!(wake_ups(std::process::id()).expect("task status") > 0);
    }
}
