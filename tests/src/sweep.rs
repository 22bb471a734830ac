//! What real nodes leave on the host, found by name and removed once its owner is gone.
//!
//! Everything a run makes on the host carries the id of the process that made it (its
//! owner), so that a later run can tell what an interrupted one left (a test killed by
//! SIGKILL or a CI timeout runs no destructor):
//! - temporary directories `cplink-node-<owner>-*`, `cplink-cluster-<owner>-*` and
//!   `cplink-containerd-<owner>-*` (configuration, logs, etcd's and containerd's data), and
//!   the processes whose command line names a path in them (etcd, kube-apiserver, a node's
//!   first process, containerd, kubelet; a node's containers die with its PID namespace);
//! - mounts below those directories;
//! - cgroups `/cplink-node-<owner>-*` and `/cplink-containerd-<owner>-*` in every hierarchy;
//! - links: bridges `cplbr<owner>n<k>` and veths `cplv<owner>x<j>`;
//! - unreachable routes for a network's ranges in 198.18.0.0/15, which name no owner: a route
//!   is an orphan when no bridge of a running owner claims its network index `k`.
//!
//! [`sweep`] removes what belongs to owners no longer running; [`Leftovers::of`] lists what
//! one owner still has, for tests to check that a teardown left nothing. Claiming a network
//! and sweeping hold one lock ([`lock`]), so that a sweep never takes a route that a running
//! owner is claiming.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// The kinds of temporary directory a run makes, as in `cplink-<kind>-<owner>-*`.
pub const DIR_KINDS: [&str; 3] = ["node", "cluster", "containerd"];

/// The kinds whose directory name is also a top-level cgroup.
const CGROUP_KINDS: [&str; 2] = ["node", "containerd"];

/// How long swept processes get to be gone, and their cgroups to empty.
const GONE: Duration = Duration::from_secs(15);

/// How long [`lock`] waits for another process's claim or sweep.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// The prefix of this process's temporary directories of `kind` (one of [`DIR_KINDS`]).
pub fn dir_prefix(kind: &str) -> String {
    format!("cplink-{kind}-{}-", std::process::id())
}

/// The host bridge of network `index` of `owner` (at most 15 characters, as link names are:
/// a pid has at most 7 digits, an index at most 2).
pub fn bridge(owner: u32, index: u8) -> String {
    format!("cplbr{owner}n{index}")
}

/// The host end of veth number `serial` (below 1000) of `owner`.
pub fn veth(owner: u32, serial: u16) -> String {
    format!("cplv{owner}x{serial}")
}

/// The first address of network `index`'s node range: `198.18.<index>.0/24`.
pub fn node_range(index: u8) -> String {
    format!("198.18.{index}.0/24")
}

/// Network `index`'s pod range: `198.19.<16 index>.0/20`, a `/24` per node.
pub fn pod_range(index: u8) -> String {
    format!("198.19.{}.0/20", u16::from(index) * 16)
}

/// Whether the process `pid` is running (its `/proc` entry exists).
pub fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// An exclusive lock between processes claiming networks and sweeping, released when
/// dropped (or when the process dies).
pub struct Lock {
    _held: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the lock, waiting at most two minutes for another holder.
pub fn lock() -> anyhow::Result<Lock> {
    let path = std::env::temp_dir().join("cplink-real-nodes.lock");
    let give_up = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(Lock { _held: held }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < give_up => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err((_, errno)) => {
                anyhow::bail!(
                    "cannot lock {} (waited {LOCK_WAIT:?}): {errno}",
                    path.display()
                )
            }
        }
    }
}

/// What owners left on the host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Processes naming a path in an owner's directory.
    pub processes: Vec<u32>,
    /// Mount points below an owner's directory.
    pub mounts: Vec<PathBuf>,
    /// Cgroup directories, in every hierarchy.
    pub cgroups: Vec<PathBuf>,
    /// Bridges and veths.
    pub links: Vec<String>,
    /// Unreachable routes in 198.18.0.0/15 that no bridge of a running owner claims.
    pub routes: Vec<String>,
    /// Temporary directories.
    pub dirs: Vec<PathBuf>,
}

impl Leftovers {
    /// What `owner` has on the host, with every orphan route.
    pub fn of(owner: u32) -> anyhow::Result<Self> {
        Self::find(|pid| pid == owner)
    }

    /// What owners no longer running left, with every orphan route.
    pub fn of_stopped_owners() -> anyhow::Result<Self> {
        Self::find(|pid| !running(pid))
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }

    fn find(owned: impl Fn(u32) -> bool) -> anyhow::Result<Self> {
        let tmp = std::env::temp_dir();
        let mut found = Leftovers::default();
        for entry in std::fs::read_dir(&tmp)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if dir_owner(&name).is_some_and(&owned) {
                found.dirs.push(tmp.join(name));
            }
        }
        found.processes = processes(&owned)?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        for line in mountinfo.lines() {
            let Some(point) = line.split_whitespace().nth(4) else {
                continue;
            };
            // Mount points escape spaces and the like as octal; the names matched have none.
            if path_owner(point).is_some_and(&owned) {
                found.mounts.push(PathBuf::from(point));
            }
        }
        for hierarchy in crate::cgroups::hierarchies()? {
            let Ok(entries) = std::fs::read_dir(&hierarchy) else {
                continue;
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = CGROUP_KINDS
                    .iter()
                    .any(|kind| name.starts_with(&format!("cplink-{kind}-")));
                if ours && dir_owner(&name).is_some_and(&owned) && entry.path().is_dir() {
                    found.cgroups.push(entry.path());
                }
            }
        }
        let mut claimed = Vec::new();
        for link in links()? {
            if let Some((owner, index)) = bridge_owner(&link) {
                if running(owner) {
                    claimed.push(index);
                }
                if owned(owner) {
                    found.links.push(link);
                }
            } else if veth_owner(&link).is_some_and(&owned) {
                found.links.push(link);
            }
        }
        found.routes = unreachable_routes()?
            .into_iter()
            .filter(|(_, index)| !claimed.contains(index))
            .map(|(route, _)| route)
            .collect();
        Ok(found)
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut part = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                parts.push(format!("{what} [{}]", items.join(", ")));
            }
        };
        let paths = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect();
        part(
            "processes",
            self.processes.iter().map(u32::to_string).collect(),
        );
        part("mounts", paths(&self.mounts));
        // The same cgroup in every hierarchy, named once.
        let mut cgroups: Vec<String> = self
            .cgroups
            .iter()
            .filter_map(|c| Some(c.file_name()?.to_string_lossy().into_owned()))
            .collect();
        cgroups.sort();
        cgroups.dedup();
        part("cgroups (in every hierarchy)", cgroups);
        part("links", self.links.clone());
        part("routes", self.routes.clone());
        part("directories", paths(&self.dirs));
        if parts.is_empty() {
            write!(f, "nothing")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}

/// Removes what owners no longer running left on the host, and returns what it found.
/// Failures to remove are an error naming what is left.
pub fn sweep() -> anyhow::Result<Leftovers> {
    let _lock = lock()?;
    let found = Leftovers::of_stopped_owners()?;
    if found.is_empty() {
        return Ok(found);
    }
    tracing::info!(%found, "sweeping what earlier runs left");
    let mut failed = Vec::new();
    // Processes first: a node's first process takes its namespaces and containers along.
    for pid in &found.processes {
        if let Ok(pid) = i32::try_from(*pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let give_up = Instant::now() + GONE;
    let mut pause = Duration::from_millis(1);
    while found.processes.iter().any(|pid| running(*pid)) && Instant::now() < give_up {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    for pid in found.processes.iter().filter(|pid| running(**pid)) {
        failed.push(format!("process {pid} still running after {GONE:?}"));
    }
    // Deepest first, detached: nothing may keep a dead run's mount busy.
    let mut mounts = found.mounts.clone();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for mount in &mounts {
        if let Err(err) = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH) {
            failed.push(format!("unmounting {}: {err}", mount.display()));
        }
    }
    for cgroup in &found.cgroups {
        // Killed processes leave their cgroups a moment after they are reaped.
        let give_up = Instant::now() + GONE;
        loop {
            match remove_cgroup_tree(cgroup) {
                Ok(()) => break,
                Err(_) if Instant::now() < give_up => std::thread::sleep(Duration::from_millis(50)),
                Err(err) => {
                    failed.push(format!("{err:#}"));
                    break;
                }
            }
        }
    }
    for route in &found.routes {
        if let Err(err) = ip(&["route", "del", "unreachable", route]) {
            failed.push(format!("{err:#}"));
        }
    }
    for link in &found.links {
        // A veth goes with its peer's namespace: it may be gone by now.
        if let Err(err) = ip(&["link", "del", link])
            && links()?.contains(link)
        {
            failed.push(format!("{err:#}"));
        }
    }
    for dir in &found.dirs {
        match std::fs::remove_dir_all(dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                failed.push(format!("removing {}: {err}", dir.display()));
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "the sweep of earlier runs' leftovers failed: {}",
        failed.join("; ")
    );
    Ok(found)
}

/// The owner in a name `cplink-<kind>-<owner>-...` of one of [`DIR_KINDS`].
fn dir_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("cplink-")?;
    let rest = DIR_KINDS
        .iter()
        .find_map(|kind| rest.strip_prefix(kind)?.strip_prefix('-'))?;
    let (owner, tail) = rest.split_once('-')?;
    (!tail.is_empty()).then_some(())?;
    digits(owner)
}

/// The owner of the first component of `path` below the temporary directory that is one of
/// the run's directories.
fn path_owner(path: &str) -> Option<u32> {
    let tmp = std::env::temp_dir();
    let rest = Path::new(path).strip_prefix(&tmp).ok()?;
    let first = rest.components().next()?;
    dir_owner(&first.as_os_str().to_string_lossy())
}

/// `(owner, index)` of a bridge named by [`bridge`].
fn bridge_owner(name: &str) -> Option<(u32, u8)> {
    let (owner, index) = name.strip_prefix("cplbr")?.split_once('n')?;
    Some((digits(owner)?, index.parse().ok()?))
}

/// The owner of a veth named by [`veth`].
fn veth_owner(name: &str) -> Option<u32> {
    let (owner, serial) = name.strip_prefix("cplv")?.split_once('x')?;
    serial.parse::<u16>().ok()?;
    digits(owner)
}

fn digits(text: &str) -> Option<u32> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// Processes whose command line names a path in a directory of an owner `owned` accepts.
fn processes(owned: &impl Fn(u32) -> bool) -> anyhow::Result<Vec<u32>> {
    crate::procfs::processes_with_arg(|arg| mentioned_owners(arg).any(owned))
}

/// The owners of every `cplink-<kind>-<owner>-` directory name within `arg`
/// (`--config=/tmp/cplink-node-123-ab/kubelet.yaml` names owner 123).
fn mentioned_owners(arg: &str) -> impl Iterator<Item = u32> + '_ {
    arg.match_indices("cplink-").filter_map(|(at, _)| {
        let word: String = arg[at..]
            .chars()
            .take_while(|c| !matches!(c, '/' | ' ' | '=' | ',' | '"'))
            .collect();
        dir_owner(&word)
    })
}

/// The names of the host's links.
fn links() -> anyhow::Result<Vec<String>> {
    let listing = ip_output(&["-o", "link", "show"])?;
    // `7: cplv123x0@if2: <BROADCAST,...> ...`
    Ok(listing
        .lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_owned())
        })
        .collect())
}

/// Unreachable routes in 198.18.0.0/15, with the network index their range belongs to.
fn unreachable_routes() -> anyhow::Result<Vec<(String, u8)>> {
    let listing = ip_output(&["-o", "route", "show", "type", "unreachable"])?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let dst = line.split_whitespace().nth(1)?;
            let (address, _) = dst.split_once('/')?;
            let [a, b, c, _] = address.parse::<Ipv4Addr>().ok()?.octets();
            let index = match (a, b) {
                (198, 18) => c,
                (198, 19) => c / 16,
                _ => return None,
            };
            Some((dst.to_owned(), index))
        })
        .collect())
}

/// Removes a cgroup directory after its children (only directories: a cgroup's files go
/// with `rmdir`).
fn remove_cgroup_tree(dir: &Path) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing cgroup {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Runs `ip args...`.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    ip_output(args).map(drop)
}

/// Runs `ip args...` and returns its standard output.
pub(crate) fn ip_output(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    anyhow::ensure!(
        output.status.success(),
        "ip {}: {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner() {
        assert_eq!(bridge(4_194_304, 15), "cplbr4194304n15");
        assert!(bridge(4_194_304, 15).len() <= 15);
        assert!(veth(4_194_304, 999).len() <= 15);
        assert_eq!(bridge_owner(&bridge(812, 3)), Some((812, 3)));
        assert_eq!(veth_owner(&veth(812, 40)), Some(812));
        assert_eq!(dir_owner("cplink-node-812-Ab3xYz"), Some(812));
        assert_eq!(dir_owner("cplink-cluster-9-q"), Some(9));
        assert_eq!(dir_owner("cplink-containerd-77-z"), Some(77));
        for foreign in [
            "cplink-node-Ab3xYz",
            "cplink-nodes-812-x",
            "cplink-node-812-",
            "cplink-node--x",
            "cplink-images",
        ] {
            assert_eq!(dir_owner(foreign), None, "{foreign}");
        }
        assert_eq!(bridge_owner("cplbrxn1"), None);
        assert_eq!(veth_owner("cplv12n0x1"), None);
        assert_eq!(
            mentioned_owners("--config=/tmp/cplink-node-123-ab/kubelet.yaml").collect::<Vec<_>>(),
            [123]
        );
        assert_eq!(
            mentioned_owners("/tmp/cplink-cluster-5-x/a,/tmp/cplink-node-6-y/b")
                .collect::<Vec<_>>(),
            [5, 6]
        );
        assert_eq!(mentioned_owners("/usr/bin/kubelet").count(), 0);
    }

    #[test]
    fn network_ranges_fall_in_the_benchmarking_block() {
        assert_eq!(node_range(3), "198.18.3.0/24");
        assert_eq!(pod_range(3), "198.19.48.0/20");
        assert_eq!(pod_range(15), "198.19.240.0/20");
    }
}
