//! The workspace's own binaries, as the end-to-end tests and the demo run them: found next
//! to the running executable (`target/<profile>`), where `cargo build --workspace --bins`
//! puts them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::cluster::ControlPlane;

/// The directory holding `cplink-server`, `cplink-agent` and `cplink-operator` of this build.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    dir_holding(&["cplink-server", "cplink-agent", "cplink-operator"])
}

/// The path of one workspace binary of this build.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    Ok(dir_holding(&[name])?.join(name))
}

/// The nearest directory, from this executable's up (test executables live one level below
/// the binaries, in `deps/`), that holds every one of `names`.
fn dir_holding(names: &[&str]) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir: Option<&Path> = exe.parent();
    while let Some(d) = dir {
        if names.iter().all(|b| d.join(b).is_file()) {
            return Ok(d.to_owned());
        }
        dir = d.parent();
    }
    anyhow::bail!(
        "{} not found next to {}: build with `cargo build --workspace --bins` (`make test` \
         does)",
        names.join(", "),
        exe.display()
    )
}

/// `cplink-operator` as a local process with the control plane's admin kubeconfig; killed
/// when dropped. Its log is `operator.log` in the control plane's directory, or the file
/// [`Operator::start_with`] names.
pub struct Operator(Child);

impl Operator {
    /// Starts the operator with `--default-image image`.
    pub fn start(plane: &ControlPlane, image: &str) -> anyhow::Result<Self> {
        Self::start_with(plane, image, "operator.log", &[])
    }

    /// Starts the operator with `--default-image image` and `args`, logging to `log` in the
    /// control plane's directory.
    pub fn start_with(
        plane: &ControlPlane,
        image: &str,
        log: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(plane.dir().join(log))?;
        let child = Command::new(binary("cplink-operator")?)
            .env("KUBECONFIG", &plane.kubeconfig)
            .args(["--default-image", image, "--admin-address", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start cplink-operator")?;
        Ok(Operator(child))
    }

    /// Sends SIGTERM, as kubelet does to a pod being stopped, without waiting for the exit.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Kills the process with SIGKILL, as a crash or the OOM killer would, and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        crate::harness::stop_child(&mut self.0, Duration::ZERO)
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        crate::harness::stop_child(&mut self.0, Duration::ZERO);
    }
}
