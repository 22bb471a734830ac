//! cplink's container image, as the end-to-end tests build it from the workspace's binaries:
//! it holds what the `Dockerfile` puts in the published image (binaries, user, entrypoint),
//! it is cached by content and reproducible, and a real containerd imports it under its name
//! and digest and runs every binary from it as user 65532, which proves the image carries the
//! shared libraries they need.

use std::collections::BTreeSet;
use std::time::Duration;

use cplink_e2e::containerd::{self, Containerd};
use cplink_e2e::harness;
use cplink_e2e::image::{self, Dockerfile};
use cplink_e2e::{binaries, cgroups, workspace};

/// The image of this build's binaries, built once per cache key.
fn workspace_image() -> anyhow::Result<image::Image> {
    image::build(&binaries::bin_dir()?)
}

#[test]
fn the_image_holds_the_binaries_user_and_entrypoint_of_the_dockerfile() -> anyhow::Result<()> {
    let dockerfile = Dockerfile::parse(&std::fs::read_to_string(
        workspace::root().join("Dockerfile"),
    )?)?;
    let image = workspace_image()?;
    let files = image.files()?;

    let copied: BTreeSet<String> = dockerfile.copied.iter().cloned().collect();
    let in_bin_dir: BTreeSet<String> = files
        .keys()
        .filter(|path| path.starts_with(&format!("{}/", image::BIN_DIR)))
        .cloned()
        .collect();
    assert_eq!(
        in_bin_dir,
        copied,
        "the image's {} differs from what the Dockerfile copies",
        image::BIN_DIR
    );
    for binary in &copied {
        assert_eq!(files[binary] & 0o111, 0o111, "{binary} is not executable");
    }

    let config = image.config.config().clone().unwrap_or_default();
    assert_eq!(config.user().as_deref(), dockerfile.user.as_deref(), "user");
    assert_eq!(config.user().as_deref(), Some(image::USER));
    assert_eq!(
        config.entrypoint().as_ref(),
        dockerfile.entrypoint.as_ref(),
        "entrypoint"
    );
    assert_eq!(image.name, image::NAME);
    println!(
        "the image {} holds {copied:?}, runs as {} with entrypoint {:?}, as the Dockerfile says",
        image.name,
        image::USER,
        image::entrypoint()
    );
    Ok(())
}

#[test]
fn the_dockerfile_reader_follows_the_final_stage_only() -> anyhow::Result<()> {
    let stage = Dockerfile::parse(
        "FROM builder AS b\nCOPY x /nowhere\nUSER 1\n\
         # the runtime stage\n\
         FROM base\n\
         COPY --from=b /out/a \\\n     /out/b /usr/local/bin/\n\
         COPY --chown=2:2 conf /etc/conf\n\
         USER 65532:65532\n\
         ENTRYPOINT [\"/usr/local/bin/a\", \"run\"]\n",
    )?;
    assert_eq!(
        stage,
        Dockerfile {
            copied: vec![
                "/usr/local/bin/a".into(),
                "/usr/local/bin/b".into(),
                "/etc/conf".into()
            ],
            user: Some("65532:65532".into()),
            entrypoint: Some(vec!["/usr/local/bin/a".into(), "run".into()]),
        }
    );
    assert!(Dockerfile::parse("FROM x\nENTRYPOINT /bin/sh -c x\n").is_err());
    Ok(())
}

#[test]
fn an_unchanged_build_reuses_its_archive_and_a_fresh_build_makes_the_same_image()
-> anyhow::Result<()> {
    let cached = workspace_image()?;
    let again = workspace_image()?;
    assert_eq!(again.archive, cached.archive, "the archive was not reused");
    assert_eq!(again.manifest_digest, cached.manifest_digest);

    let elsewhere = tempfile::tempdir()?;
    let fresh = image::build_in(&binaries::bin_dir()?, elsewhere.path())?;
    assert_eq!(
        fresh.manifest_digest, cached.manifest_digest,
        "two builds of the same binaries made different images"
    );
    println!(
        "the same binaries made the same image twice: {}",
        fresh.manifest_digest
    );
    Ok(())
}

/// How long the containerd test may take: it takes 2 to 5 s.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn containerd_imports_the_image_and_runs_each_binary_from_it_as_user_65532() -> anyhow::Result<()> {
    let image = workspace_image()?;
    harness::run(
        "containerd_imports_the_image",
        DEADLINE,
        |steps| async move {
            steps.enter("starting a private containerd");
            let containerd = Containerd::start(containerd::Options::default()).await?;
            let dir = containerd.dir().to_owned();
            let cgroup_parent = containerd.client().cgroup_parent().to_owned();
            let ctr = containerd.client().clone();

            steps.enter("importing the image archive");
            ctr.import(&image.archive).await?;
            let images = ctr.images().await?;
            assert!(
                images.contains(&(image.name.clone(), image.manifest_digest.clone())),
                "{} {} not among the images containerd lists: {images:?}",
                image.name,
                image.manifest_digest
            );

            steps.enter("reading the user of a container made from the image");
            ctr.ctr_ok(&["containers", "create", &image.name, "user-probe"])
                .await?;
            let info: serde_json::Value =
                serde_json::from_str(&ctr.ctr_ok(&["containers", "info", "user-probe"]).await?)?;
            let user = &info["Spec"]["process"]["user"];
            assert_eq!(
                (user["uid"].as_u64(), user["gid"].as_u64()),
                (Some(65532), Some(65532)),
                "the container's user: {user}"
            );
            ctr.ctr_ok(&["containers", "delete", "user-probe"]).await?;

            for binary in image::BINARIES {
                steps.enter(format!("running {binary} --version in a container"));
                let path = format!("{}/{binary}", image::BIN_DIR);
                let run = ctr.run(&image.name, binary, &[&path, "--version"]).await?;
                assert_eq!(run.code, Some(0), "{binary} --version: {run:?}");
                assert_eq!(
                    run.stdout.trim(),
                    format!("{binary} {}", env!("CARGO_PKG_VERSION")),
                    "{binary} --version: {run:?}"
                );
            }

            steps.enter("stopping containerd");
            containerd.stop()?;
            assert_eq!(
                containerd::processes_naming(&dir)?,
                Vec::<u32>::new(),
                "processes left"
            );
            assert_eq!(
                cgroups::existing(&cgroup_parent)?,
                Vec::<std::path::PathBuf>::new(),
                "cgroups left"
            );
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
            assert!(
                !mountinfo.contains(&*dir.to_string_lossy()),
                "mounts left under {}",
                dir.display()
            );
            println!(
                "containerd imported {} as {} and ran {:?} from it as 65532:65532; \
                 nothing was left behind",
                image.name,
                image.manifest_digest,
                image::BINARIES
            );
            Ok(())
        },
    )
}
