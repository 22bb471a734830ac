//! cplink's container image, made from the workspace's binaries without a registry or a
//! container engine: an OCI image archive (`oci-layout`, `index.json` and content-addressed
//! blobs) that `ctr images import` loads into containerd.
//!
//! The archive is written here with `oci-spec` (the OCI image types, from the youki project)
//! and `tar`, rather than by umoci or buildah: the layer's bytes are then a function of the
//! binaries alone (no timestamps, owners or history from the host), so the image's digest is
//! stable and the archive can be cached by content; no root, container storage or extra system
//! package is needed; and `index.json` carries containerd's image-name annotation directly.
//!
//! The image holds what the `Dockerfile`'s final stage holds (the three binaries and the
//! kubectl plugin in `/usr/local/bin`, user 65532, the operator as entrypoint) on the files the binaries need
//! to start: their shared libraries (as `ldd` lists them), `/etc/passwd` and `/etc/group`
//! naming the user, and `/tmp`. [`Dockerfile`] reads the final stage, so a test can hold the
//! two in step.
//!
//! The same writer makes the other images a real node needs without a registry: the pod
//! sandbox image of `scripts/kube.sh`'s static `pause`, a shell image of Debian's static
//! busybox, and the test backends' image of `cplink-fixture` ([`Spec`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, ConfigBuilder, Descriptor, Digest, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// The image's name, as containerd and the pods' `image:` fields know it. A name of the
/// project's own domain: no registry serves it, so nothing can be pulled in its place.
pub const NAME: &str = "cplink.dev/cplink:dev";

/// The pod sandbox image [`Spec::pause`] makes, for containerd's `sandbox_image`.
pub const PAUSE_NAME: &str = "cplink.dev/pause:3.4";

/// The shell image [`Spec::busybox`] makes, for test pods.
pub const BUSYBOX_NAME: &str = "cplink.dev/busybox:dev";

/// The image of the test backends ([`Spec::fixture`]): `kubectl port-forward`'s echo, the
/// proxies' HTTP server, an admission webhook and an aggregated API.
pub const FIXTURE_NAME: &str = "cplink.dev/fixture:dev";

/// The binary of [`FIXTURE_NAME`].
pub const FIXTURE_BINARY: &str = "cplink-fixture";

/// The binaries the image carries, as the `Dockerfile` builds them.
pub const BINARIES: [&str; 4] = [
    "cplink-server",
    "cplink-agent",
    "cplink-operator",
    "kubectl-cplink",
];

/// Where the binaries are in the image.
pub const BIN_DIR: &str = "/usr/local/bin";

/// The user the image runs as: distroless's `nonroot`, as the `Dockerfile` sets it.
pub const USER: &str = "65532:65532";

/// containerd's annotation naming an image in an archive's `index.json`.
pub const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// The largest JSON blob [`open`] reads: far above any manifest or configuration.
const SMALL_BLOB: u64 = 1 << 20;

/// Changes whenever what [`build`] puts in an image changes, so older cached archives are not
/// taken for current ones.
const FORMAT: &str = "cplink-image/3";

/// The image's entrypoint: the operator, which runs servers and agents from the same image
/// with explicit commands.
pub fn entrypoint() -> Vec<String> {
    vec![format!("{BIN_DIR}/cplink-operator")]
}

/// A built image archive.
#[derive(Debug, Clone)]
pub struct Image {
    /// The OCI image archive (a tar of an OCI image layout).
    pub archive: PathBuf,
    /// The name in its `index.json` ([`CONTAINERD_IMAGE_NAME`]).
    pub name: String,
    /// The digest of its manifest: what containerd lists as the image's digest.
    pub manifest_digest: String,
    /// Its configuration (user, entrypoint, layer digests).
    pub config: ImageConfiguration,
}

/// Builds the image of the binaries in `bin_dir` (a cargo profile's output directory), or
/// finds it among the archives built before, in [`images_dir`]. The archive is named by a hash
/// of everything put into it, so rebuilding the binaries makes a new one and an unchanged build
/// reuses it.
pub fn build(bin_dir: &Path) -> anyhow::Result<Image> {
    build_in(bin_dir, &images_dir()?)
}

/// [`build`] with the archives kept in `images`.
pub fn build_in(bin_dir: &Path, images: &Path) -> anyhow::Result<Image> {
    Spec::cplink(bin_dir)?.build_in(images)
}

/// Where built archives are kept: `images` in [`crate::workspace::cache`].
pub fn images_dir() -> anyhow::Result<PathBuf> {
    Ok(crate::workspace::cache()?.join("images"))
}

/// What an image is made of: files, symbolic links and the process it runs.
#[derive(Debug)]
pub struct Spec {
    name: String,
    files: Vec<File>,
    /// Symbolic links: path (without the leading `/`) and target.
    links: Vec<(String, String)>,
    user: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl Spec {
    /// cplink's image ([`NAME`]) of the binaries in `bin_dir`.
    pub fn cplink(bin_dir: &Path) -> anyhow::Result<Self> {
        let mut files = binaries_with_libraries(bin_dir, &BINARIES)?;
        files.push(File {
            path: "etc/passwd".into(),
            mode: 0o644,
            source: Source::Bytes(
                b"root:x:0:0:root:/root:/sbin/nologin\n\
                  nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
                    .to_vec(),
            ),
        });
        files.push(File {
            path: "etc/group".into(),
            mode: 0o644,
            source: Source::Bytes(b"root:x:0:\nnonroot:x:65532:\n".to_vec()),
        });
        Ok(Spec {
            name: NAME.to_owned(),
            files,
            links: Vec::new(),
            user: Some(USER.to_owned()),
            entrypoint: entrypoint(),
            cmd: Vec::new(),
        })
    }

    /// The test backends' image ([`FIXTURE_NAME`]): `cplink-fixture` of `bin_dir` with its
    /// shared libraries, run as [`USER`] with the fixture as entrypoint.
    pub fn fixture(bin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Spec {
            name: FIXTURE_NAME.to_owned(),
            files: binaries_with_libraries(bin_dir, &[FIXTURE_BINARY])?,
            links: Vec::new(),
            user: Some(USER.to_owned()),
            entrypoint: vec![format!("{BIN_DIR}/{FIXTURE_BINARY}")],
            cmd: Vec::new(),
        })
    }

    /// The pod sandbox image ([`PAUSE_NAME`]) of the static `pause` in `kube_dir` (built by
    /// `scripts/kube.sh`), with the upstream image's user and entrypoint.
    pub fn pause(kube_dir: &Path) -> anyhow::Result<Self> {
        let pause = kube_dir.join("pause");
        anyhow::ensure!(
            shared_libraries(&pause)?.is_empty(),
            "{} is not static: run scripts/kube.sh",
            pause.display()
        );
        Ok(Spec {
            name: PAUSE_NAME.to_owned(),
            files: vec![File {
                path: "pause".into(),
                mode: 0o755,
                source: Source::Host(pause),
            }],
            links: Vec::new(),
            user: Some("65535:65535".into()),
            entrypoint: vec!["/pause".into()],
            cmd: Vec::new(),
        })
    }

    /// A shell image ([`BUSYBOX_NAME`]): Debian's static busybox as `/bin/busybox`, a link in
    /// `/bin` for each of its applets, `sh` as command, run as root.
    pub fn busybox() -> anyhow::Result<Self> {
        let busybox = PathBuf::from("/bin/busybox");
        anyhow::ensure!(
            busybox.is_file() && shared_libraries(&busybox)?.is_empty(),
            "no static /bin/busybox: install busybox-static (scripts/kube.sh does)"
        );
        let list = Command::new(&busybox).arg("--list").output()?;
        anyhow::ensure!(list.status.success(), "busybox --list: {}", list.status);
        let links = String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(str::trim)
            .filter(|applet| !applet.is_empty() && *applet != "busybox")
            .map(|applet| (format!("bin/{applet}"), "busybox".to_owned()))
            .collect();
        Ok(Spec {
            name: BUSYBOX_NAME.to_owned(),
            files: vec![File {
                path: "bin/busybox".into(),
                mode: 0o755,
                source: Source::Host(busybox),
            }],
            links,
            user: None,
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
        })
    }

    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Builds the image in [`images_dir`], or finds it there.
    pub fn build(self) -> anyhow::Result<Image> {
        self.build_in(&images_dir()?)
    }

    /// Builds the image in `images`, or finds it there: archives are named by a hash of
    /// everything put into them.
    pub fn build_in(mut self, images: &Path) -> anyhow::Result<Image> {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.links.sort();
        let key = self.key()?;
        let stem = self
            .name
            .rsplit('/')
            .next()
            .and_then(|last| last.split(':').next())
            .unwrap_or("image");
        let archive = images.join(format!("{stem}-{}.tar", &key[..24]));
        if archive.is_file() {
            return open(&archive);
        }
        std::fs::create_dir_all(images)?;
        // Written under a temporary name and renamed: a concurrent build of the same key
        // writes the same bytes, and an interrupted one leaves no archive that looks complete.
        let work = tempfile::Builder::new()
            .prefix(".image-")
            .tempdir_in(images)?;
        let partial = work.path().join("image.tar");
        write_archive(&self, work.path(), &partial)?;
        std::fs::rename(&partial, &archive)?;
        prune(images, stem)?;
        open(&archive)
    }

    /// A hash of everything the archive is made of.
    fn key(&self) -> anyhow::Result<String> {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        field(FORMAT.as_bytes());
        field(self.name.as_bytes());
        field(self.user.as_deref().unwrap_or("").as_bytes());
        for word in self
            .entrypoint
            .iter()
            .chain(["--".to_owned()].iter())
            .chain(&self.cmd)
        {
            field(word.as_bytes());
        }
        for (path, target) in &self.links {
            field(path.as_bytes());
            field(target.as_bytes());
        }
        for file in &self.files {
            field(file.path.as_bytes());
            field(&file.mode.to_be_bytes());
        }
        for file in &self.files {
            match &file.source {
                Source::Binary(path) | Source::Host(path) => {
                    let mut source = std::fs::File::open(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    std::io::copy(&mut source, &mut hash)?;
                }
                Source::Bytes(bytes) => hash.update(bytes),
            }
        }
        Ok(hex(&hash.finalize()))
    }
}

/// How many archives of one image the cache keeps: a few builds (debug and release, say) can
/// take turns without rebuilding, and the cache does not grow with every change.
const KEEP: usize = 4;

/// Removes all but the [`KEEP`] newest archives named `<stem>-<key>.tar` in `images`.
fn prune(images: &Path, stem: &str) -> anyhow::Result<()> {
    let mut archives = Vec::new();
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name
            .strip_prefix(stem)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(".tar"))
            .is_some_and(|key| key.len() == 24 && key.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours {
            archives.push((entry.metadata()?.modified()?, entry.path()));
        }
    }
    archives.sort();
    let excess = archives.len().saturating_sub(KEEP);
    for (_, path) in archives.into_iter().take(excess) {
        // Another build may have pruned it already.
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
            _ => {}
        }
    }
    Ok(())
}

/// Reads an image archive's index, manifest and configuration.
pub fn open(archive: &Path) -> anyhow::Result<Image> {
    // Index, manifest and configuration are small; the layer is left unread.
    let blobs = read_members(archive, |path, size| {
        path == "index.json" || (path.starts_with("blobs/sha256/") && size <= SMALL_BLOB)
    })?;
    let index = ImageIndex::from_reader(
        blobs
            .get("index.json")
            .with_context(|| format!("{} has no index.json", archive.display()))?
            .as_slice(),
    )?;
    let [descriptor] = index.manifests().as_slice() else {
        anyhow::bail!("{}: expected one manifest in index.json", archive.display());
    };
    let name = descriptor
        .annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINERD_IMAGE_NAME))
        .with_context(|| format!("{}: the manifest has no image name", archive.display()))?
        .clone();
    let blob = |digest: &Digest| -> anyhow::Result<&Vec<u8>> {
        blobs
            .get(&format!("blobs/sha256/{}", digest.digest()))
            .with_context(|| format!("{}: blob {digest} missing", archive.display()))
    };
    let manifest = ImageManifest::from_reader(blob(descriptor.digest())?.as_slice())?;
    let config = ImageConfiguration::from_reader(blob(manifest.config().digest())?.as_slice())?;
    Ok(Image {
        archive: archive.to_owned(),
        name,
        manifest_digest: descriptor.digest().to_string(),
        config,
    })
}

impl Image {
    /// The files and directories of the image's layer: path (absolute) to mode.
    pub fn files(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        let layers = read_members(&self.archive, |path, _| path.starts_with("blobs/sha256/"))?;
        let mut files = BTreeMap::new();
        for diff_id in self.config.rootfs().diff_ids() {
            let digest = diff_id.trim_start_matches("sha256:");
            let layer = layers
                .get(&format!("blobs/sha256/{digest}"))
                .with_context(|| format!("layer {diff_id} missing"))?;
            for entry in tar::Archive::new(layer.as_slice()).entries()? {
                let entry = entry?;
                let path = entry
                    .path()?
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_owned();
                files.insert(format!("/{path}"), entry.header().mode()?);
            }
        }
        Ok(files)
    }
}

/// The final stage of a `Dockerfile`, as far as the image's contents go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dockerfile {
    /// The image paths of the files its `COPY` lines put in place.
    pub copied: Vec<String>,
    /// Its `USER`.
    pub user: Option<String>,
    /// Its `ENTRYPOINT`, in exec (JSON) form.
    pub entrypoint: Option<Vec<String>>,
}

impl Dockerfile {
    /// Reads the final stage (after the last `FROM`) of a Dockerfile's text: `COPY`
    /// (destinations of each source, `--from` and other flags skipped), `USER` and an exec-form
    /// `ENTRYPOINT`. Comments and line continuations are handled; other instructions are
    /// ignored.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') && current.is_empty() {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(trimmed);
                    if !current.trim().is_empty() {
                        logical.push(std::mem::take(&mut current));
                    }
                    current.clear();
                }
            }
        }
        let start = logical
            .iter()
            .rposition(|l| instruction(l).0 == "FROM")
            .context("the Dockerfile has no FROM")?;
        let mut stage = Dockerfile::default();
        for line in &logical[start + 1..] {
            let (word, args) = instruction(line);
            match (word.as_str(), args) {
                ("COPY", args) => {
                    let words: Vec<&str> = args
                        .split_whitespace()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    let [sources @ .., dest] = words.as_slice() else {
                        anyhow::bail!("COPY without a destination: {line}");
                    };
                    anyhow::ensure!(
                        sources.len() == 1 || dest.ends_with('/'),
                        "COPY of several sources to a file: {line}"
                    );
                    for source in sources {
                        stage.copied.push(if dest.ends_with('/') {
                            let file = source.rsplit('/').next().unwrap_or(source);
                            format!("{dest}{file}")
                        } else {
                            (*dest).to_owned()
                        });
                    }
                }
                ("USER", args) => stage.user = Some(args.trim().to_owned()),
                ("ENTRYPOINT", args) => {
                    stage.entrypoint =
                        Some(serde_json::from_str(args.trim()).with_context(|| {
                            format!("ENTRYPOINT is not in exec (JSON) form: {line}")
                        })?)
                }
                _ => {}
            }
        }
        Ok(stage)
    }
}

/// A logical line's instruction (upper-cased) and the rest.
fn instruction(line: &str) -> (String, &str) {
    let line = line.trim_start();
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    (word.to_ascii_uppercase(), rest)
}

/// A file of the layer and where its bytes come from.
#[derive(Debug)]
struct File {
    /// Its path in the image, without the leading `/`.
    path: String,
    mode: u32,
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// A binary of the workspace, copied without its debug sections.
    Binary(PathBuf),
    /// A host file copied as it is (a shared library).
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// The workspace binaries `names` of `bin_dir`, in [`BIN_DIR`], and the shared libraries
/// they load, each once.
fn binaries_with_libraries(bin_dir: &Path, names: &[&str]) -> anyhow::Result<Vec<File>> {
    let mut files = Vec::new();
    let mut libraries = BTreeMap::new();
    for name in names {
        let binary = bin_dir.join(name);
        anyhow::ensure!(
            binary.is_file(),
            "{} not built: run `cargo build --workspace --bins`",
            binary.display()
        );
        for library in shared_libraries(&binary)? {
            libraries.insert(library.clone(), library);
        }
        files.push(File {
            path: format!("{}/{name}", BIN_DIR.trim_start_matches('/')),
            mode: 0o755,
            source: Source::Binary(binary),
        });
    }
    for (path, _) in libraries {
        files.push(File {
            path: path.to_string_lossy().trim_start_matches('/').to_owned(),
            mode: 0o755,
            source: Source::Host(path),
        });
    }
    Ok(files)
}

/// The shared libraries `ldd` says `binary` loads, the dynamic loader included (the vDSO,
/// which has no file, aside). A static binary has none.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::ensure!(
            stdout.contains("not a dynamic executable")
                || String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable"),
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in stdout.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the loader alone:
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let target = match line.split_once("=>") {
            Some((_, target)) => target,
            None => line,
        };
        let Some(path) = target.split_whitespace().next() else {
            continue;
        };
        anyhow::ensure!(
            path != "not",
            "{}: a library is missing: {line}",
            binary.display()
        );
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Writes the archive of `spec` to `out`, using `work` for intermediate files.
fn write_archive(spec: &Spec, work: &Path, out: &Path) -> anyhow::Result<()> {
    // The layer, uncompressed: the archive never crosses a network, and containerd imports
    // and unpacks an uncompressed layer faster than it would a gzip one.
    let layer_path = work.join("layer.tar");
    let layer = write_layer(spec, work, &layer_path)?;
    let diff_id = Digest::from(layer.digest.clone()).to_string();

    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::default())
        .os(Os::Linux)
        .config({
            let mut config = ConfigBuilder::default()
                .env(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
                ])
                .working_dir("/");
            if let Some(user) = &spec.user {
                config = config.user(user.clone());
            }
            if !spec.entrypoint.is_empty() {
                config = config.entrypoint(spec.entrypoint.clone());
            }
            if !spec.cmd.is_empty() {
                config = config.cmd(spec.cmd.clone());
            }
            config.build()?
        })
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .build()?;
    let config = Blob::new(config.to_string()?.into_bytes());
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config.size(),
            config.digest.clone(),
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayer,
            layer.size,
            layer.digest.clone(),
        )])
        .build()?;
    let manifest = Blob::new(manifest.to_string()?.into_bytes());
    let tag = spec.name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    let mut descriptor = Descriptor::new(
        MediaType::ImageManifest,
        manifest.size(),
        manifest.digest.clone(),
    );
    descriptor.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::default())
            .os(Os::Linux)
            .build()?,
    ));
    // `ref.name` holds the tag, as in an OCI image layout; containerd names the image from
    // its own annotation, the full name.
    descriptor.set_annotations(Some(
        [
            (ANNOTATION_REF_NAME.to_owned(), tag.to_owned()),
            (CONTAINERD_IMAGE_NAME.to_owned(), spec.name.clone()),
        ]
        .into(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![descriptor])
        .build()?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;

    let mut archive = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(out)?));
    append_bytes(
        &mut archive,
        "oci-layout",
        &serde_json::to_vec(&layout)?,
        0o644,
    )?;
    append_bytes(
        &mut archive,
        "index.json",
        index.to_string()?.as_bytes(),
        0o644,
    )?;
    append_dir(&mut archive, "blobs")?;
    append_dir(&mut archive, "blobs/sha256")?;
    // The small blobs before the layer: `open` finds them without reading past it.
    for blob in [&manifest, &config] {
        let path = format!("blobs/sha256/{}", blob.digest.digest());
        append_bytes(&mut archive, &path, &blob.bytes, 0o644)?;
    }
    let mut header = header(tar::EntryType::Regular, 0o644, layer.size);
    archive.append_data(
        &mut header,
        format!("blobs/sha256/{}", layer.digest.digest()),
        std::fs::File::open(&layer_path)?,
    )?;
    archive.into_inner()?.into_inner()?.sync_all()?;
    Ok(())
}

/// A blob held in memory, with its digest.
struct Blob {
    bytes: Vec<u8>,
    digest: Sha256Digest,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = sha256(&Sha256::digest(&bytes));
        Blob { bytes, digest }
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// The layer's digest and size.
struct Layer {
    digest: Sha256Digest,
    size: u64,
}

/// Writes the layer tar: the directories every file and link needs, then the files and links,
/// sorted, owned by root, dated at the epoch.
fn write_layer(spec: &Spec, work: &Path, out: &Path) -> anyhow::Result<Layer> {
    let mut layer = tar::Builder::new(Hashing::new(std::io::BufWriter::new(
        std::fs::File::create(out)?,
    )));
    let mut dirs: BTreeMap<String, u32> = BTreeMap::from([("tmp".to_owned(), 0o1777)]);
    let paths = spec
        .files
        .iter()
        .map(|file| &file.path)
        .chain(spec.links.iter().map(|(path, _)| path));
    for path in paths {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.entry(dir.to_string_lossy().into_owned())
                .or_insert(0o755);
            parent = dir.parent();
        }
    }
    for (dir, mode) in &dirs {
        let mut header = header(tar::EntryType::Directory, *mode, 0);
        layer.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    for file in &spec.files {
        match &file.source {
            Source::Binary(path) => {
                let stripped = strip(path, work)?;
                append_file(&mut layer, &file.path, &stripped, file.mode)?;
            }
            Source::Host(path) => append_file(&mut layer, &file.path, path, file.mode)?,
            Source::Bytes(bytes) => append_bytes(&mut layer, &file.path, bytes, file.mode)?,
        }
    }
    for (path, target) in &spec.links {
        let mut header = header(tar::EntryType::Symlink, 0o777, 0);
        layer.append_link(&mut header, path, target)?;
    }
    let hashing = layer.into_inner()?;
    let (writer, digest, size) = hashing.finish();
    writer.into_inner()?.sync_all()?;
    Ok(Layer { digest, size })
}

/// A copy of `binary` without debug sections (line tables make up much of a debug build's
/// size and nothing in a container reads them), or the binary itself where `objcopy` is
/// missing.
fn strip(binary: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let name = binary.file_name().context("a binary has a file name")?;
    let stripped = work.join(name);
    match Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&stripped)
        .status()
    {
        Ok(status) if status.success() => Ok(stripped),
        Ok(status) => anyhow::bail!("objcopy --strip-debug {}: {status}", binary.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(binary.to_owned()),
        Err(err) => Err(err).context("cannot run objcopy"),
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn append_dir<W: Write>(archive: &mut tar::Builder<W>, path: &str) -> anyhow::Result<()> {
    let mut header = header(tar::EntryType::Directory, 0o755, 0);
    archive.append_data(&mut header, format!("{path}/"), std::io::empty())?;
    Ok(())
}

fn append_bytes<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, bytes.len() as u64);
    archive.append_data(&mut header, path, bytes)?;
    Ok(())
}

fn append_file<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    source: &Path,
    mode: u32,
) -> anyhow::Result<()> {
    let file =
        std::fs::File::open(source).with_context(|| format!("reading {}", source.display()))?;
    let size = file.metadata()?.len();
    let mut header = header(tar::EntryType::Regular, mode, size);
    archive.append_data(&mut header, path, file)?;
    Ok(())
}

/// The members of a tar archive that `wanted` accepts by path and size, read into memory.
fn read_members(
    archive: &Path,
    wanted: impl Fn(&str, u64) -> bool,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let file =
        std::fs::File::open(archive).with_context(|| format!("reading {}", archive.display()))?;
    let mut members = BTreeMap::new();
    for entry in tar::Archive::new(std::io::BufReader::new(file)).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if entry.header().entry_type().is_file() && wanted(&path, entry.size()) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            members.insert(path, bytes);
        }
    }
    Ok(members)
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> (W, Sha256Digest, u64) {
        (self.inner, sha256(&self.hash.finalize()), self.size)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> Sha256Digest {
    hex(bytes)
        .parse()
        .expect("a SHA-256 hash is 64 lowercase hex digits")
}
