//! Where the workspace is: charts, CRDs and helper scripts are found from its root; and where
//! its scripts keep what they build.

use std::path::PathBuf;

use anyhow::Context as _;

/// The repository's root directory.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The cache `scripts/setup.sh` and `scripts/kube.sh` fill, and where built images are kept:
/// `$CPLINK_CACHE`, default `~/.cache/cplink` (the Makefile's default too).
pub fn cache() -> anyhow::Result<PathBuf> {
    match std::env::var_os("CPLINK_CACHE") {
        Some(cache) => Ok(PathBuf::from(cache)),
        None => Ok(
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/cplink"),
        ),
    }
}
