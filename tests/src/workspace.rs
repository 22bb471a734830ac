//! Where the workspace is: charts, CRDs and helper scripts are found from its root.

use std::path::PathBuf;

/// The repository's root directory.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}
