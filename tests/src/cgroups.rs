//! Cgroups the tests' container runtimes create on the host, removed again.
//!
//! runc makes a container's cgroup under every hierarchy mounted on the host (one per
//! controller on a cgroup v1 machine, plus the unified one), and deleting the container removes
//! only its own directory, not the parents it created. A test gives its containers a parent of
//! its own and removes that parent's tree here once they are gone.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The mount points of the cgroup hierarchies (v1 and v2) this process sees.
pub fn hierarchies() -> anyhow::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| {
            // `<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ...`
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect())
}

/// The directories named `relative` (a path below the root of each hierarchy) that exist.
pub fn existing(relative: &str) -> anyhow::Result<Vec<PathBuf>> {
    Ok(hierarchies()?
        .into_iter()
        .map(|hierarchy| hierarchy.join(relative.trim_start_matches('/')))
        .filter(|dir| dir.is_dir())
        .collect())
}

/// Creates the cgroup `relative` in every hierarchy (a parent for others, such as a kubelet's
/// `--cgroup-root`).
pub fn create(relative: &str) -> anyhow::Result<()> {
    for hierarchy in hierarchies()? {
        let dir = hierarchy.join(relative.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Removes the cgroup `relative` and every cgroup below it, in every hierarchy. Cgroups still
/// holding a process cannot be removed: that is an error naming them.
pub fn remove(relative: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !relative.trim_matches('/').is_empty(),
        "refusing to remove the root cgroup"
    );
    let mut failed = Vec::new();
    for dir in existing(relative)? {
        if let Err(err) = remove_tree(&dir) {
            failed.push(format!("{}: {err:#}", dir.display()));
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "cgroups left behind: {}",
        failed.join("; ")
    );
    Ok(())
}

/// Removes a cgroup directory after its children. A cgroup's files (`tasks`, `cgroup.procs`,
/// ...) belong to the kernel and go with `rmdir`; only directories are removed.
fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}
