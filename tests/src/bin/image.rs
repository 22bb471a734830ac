//! `cplink-image`: builds cplink's OCI image archive from this build's binaries (the
//! `cplink-server`, `cplink-agent` and `cplink-operator` beside this executable, or those of
//! `--bin-dir`) and prints its path, name and digest. An unchanged build reuses the archive it
//! made before (see `cplink_e2e::image`).
//!
//! ```text
//! cargo build --release -p cplink-server -p cplink-agent -p cplink-operator
//! cargo run --release -p cplink-e2e --bin cplink-image
//! ctr -n k8s.io images import "$(target/release/cplink-image --path-only)"
//! ```

use std::path::PathBuf;

use clap::Parser;

/// Command line of `cplink-image`.
#[derive(Debug, Parser)]
#[command(
    name = "cplink-image",
    version,
    about = "Builds cplink's OCI image archive"
)]
struct Args {
    /// Where the binaries are; default: the directory of this executable.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where archives are kept; default: `$CPLINK_CACHE/images` (`~/.cache/cplink/images`).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Print only the archive's path.
    #[arg(long)]
    path_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => cplink_e2e::binaries::bin_dir()?,
    };
    let image = match args.images {
        Some(images) => cplink_e2e::image::build_in(&bin_dir, &images)?,
        None => cplink_e2e::image::build(&bin_dir)?,
    };
    if args.path_only {
        println!("{}", image.archive.display());
    } else {
        println!("archive: {}", image.archive.display());
        println!("name:    {}", image.name);
        println!("digest:  {}", image.manifest_digest);
    }
    Ok(())
}
