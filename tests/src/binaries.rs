//! The workspace's own binaries, as the end-to-end tests and the demo run them: found next
//! to the running executable (`target/<profile>`), where `cargo build --workspace --bins`
//! puts them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

use crate::cluster::ControlPlane;

/// The directory holding `cplink-server`, `cplink-agent` and `cplink-operator` of this build.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir: Option<&Path> = exe.parent();
    while let Some(d) = dir {
        if ["cplink-server", "cplink-agent", "cplink-operator"]
            .iter()
            .all(|b| d.join(b).is_file())
        {
            return Ok(d.to_owned());
        }
        dir = d.parent();
    }
    anyhow::bail!(
        "cplink binaries not found next to {}: build them with `cargo build --workspace --bins` \
         (`make test` does)",
        exe.display()
    )
}

/// The path of one workspace binary.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    anyhow::ensure!(path.is_file(), "{} not built", path.display());
    Ok(path)
}

/// `cplink-operator` as a local process with the control plane's admin kubeconfig; killed
/// when dropped. Its log is `operator.log` in the control plane's directory.
pub struct Operator(Child);

impl Operator {
    /// Starts the operator with `--default-image image`.
    pub fn start(plane: &ControlPlane, image: &str) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(plane.dir().join("operator.log"))?;
        let child = Command::new(binary("cplink-operator")?)
            .env("KUBECONFIG", &plane.kubeconfig)
            .args(["--default-image", image, "--admin-address", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start cplink-operator")?;
        Ok(Operator(child))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        crate::harness::stop_child(&mut self.0, std::time::Duration::ZERO);
    }
}
