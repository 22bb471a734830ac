//! The parts of a real node that `scripts/kube.sh` builds beside the control plane, from the
//! same Debian source: kubelet v1.20.2 and the pod sandbox's static `pause`.

use std::process::Command;

use cplink_e2e::cluster::{self, NODE_BINARIES};

#[test]
fn kubelet_and_pause_are_built_beside_the_control_plane() -> anyhow::Result<()> {
    let dir = cluster::kube_binaries(&NODE_BINARIES)?;
    assert_eq!(
        dir,
        cluster::kube_binaries(&cluster::CONTROL_PLANE_BINARIES)?,
        "one directory holds the control plane and the node binaries"
    );

    let kubelet = Command::new(dir.join("kubelet"))
        .arg("--version")
        .output()?;
    assert!(kubelet.status.success(), "kubelet --version: {kubelet:?}");
    let version = String::from_utf8_lossy(&kubelet.stdout);
    assert_eq!(version.trim(), "Kubernetes v1.20.2", "kubelet --version");

    // `pause -v` prints its version and exits; a dynamic pause would also need the node's
    // libraries inside the sandbox, so it must be static.
    let pause = Command::new(dir.join("pause")).arg("-v").output()?;
    assert!(pause.status.success(), "pause -v: {pause:?}");
    let pause_version = String::from_utf8_lossy(&pause.stdout);
    assert!(
        pause_version.starts_with("pause.c v3.4"),
        "pause -v: {pause_version}"
    );
    let ldd = Command::new("ldd").arg(dir.join("pause")).output()?;
    let ldd = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(ldd.contains("not a dynamic executable"), "ldd pause: {ldd}");
    println!(
        "{} and {} are in {}",
        version.trim(),
        pause_version.trim(),
        dir.display()
    );
    Ok(())
}
