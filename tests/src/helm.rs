//! Helm releases of `charts/cplink`, through the real Helm engine: `tests/helm/helmctl.py` on
//! the Python environment `scripts/setup.sh` prepares (helm-python-sdk, pinned).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::workspace;

/// Runs Helm actions against one cluster.
#[derive(Debug, Clone)]
pub struct Helm {
    python: PathBuf,
    kubeconfig: PathBuf,
}

impl Helm {
    /// The Python interpreter with helm-python-sdk: `$CPLINK_PYTHON`, else the virtualenv
    /// `scripts/setup.sh` makes (`$CPLINK_CACHE/venv`, default `~/.cache/cplink/venv`).
    pub fn python() -> anyhow::Result<PathBuf> {
        if let Some(python) = std::env::var_os("CPLINK_PYTHON") {
            return Ok(PathBuf::from(python));
        }
        let cache = match std::env::var_os("CPLINK_CACHE") {
            Some(cache) => PathBuf::from(cache),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/cplink"),
        };
        let python = cache.join("venv/bin/python");
        anyhow::ensure!(
            python.exists(),
            "{} is missing: run scripts/setup.sh (it installs helm-python-sdk) or set CPLINK_PYTHON",
            python.display()
        );
        Ok(python)
    }

    /// Helm for the cluster of `kubeconfig`.
    pub fn new(kubeconfig: &Path) -> anyhow::Result<Self> {
        Ok(Helm {
            python: Self::python()?,
            kubeconfig: kubeconfig.to_owned(),
        })
    }

    /// `helm install` (creating the namespace).
    pub fn install(
        &self,
        namespace: &str,
        release: &str,
        values: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.run("install", namespace, release, Some(values))
    }

    /// `helm upgrade` with these values (not reusing the old ones).
    pub fn upgrade(
        &self,
        namespace: &str,
        release: &str,
        values: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.run("upgrade", namespace, release, Some(values))
    }

    /// `helm uninstall`, waiting until the release's objects are gone.
    pub fn uninstall(&self, namespace: &str, release: &str) -> anyhow::Result<()> {
        self.run("uninstall", namespace, release, None)
    }

    fn run(
        &self,
        action: &str,
        namespace: &str,
        release: &str,
        values: Option<&serde_json::Value>,
    ) -> anyhow::Result<()> {
        let mut command = Command::new(&self.python);
        command
            .arg(workspace::root().join("tests/helm/helmctl.py"))
            .arg(action)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--namespace", namespace, "--release", release]);
        if let Some(values) = values {
            command.args(["--values", &values.to_string()]);
        }
        let out = command
            .output()
            .with_context(|| format!("cannot run {}", self.python.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "helm {action} {release} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}
