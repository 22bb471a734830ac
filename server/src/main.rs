//! `cplink-server` binary.

use anyhow::Context as _;
use clap::Parser;
use cplink_server::{Args, Listeners, Server};
use tikv_jemalloc_ctl::{Access as _, AsName as _};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc: after a burst of tunnels closes, glibc kept most of the
/// memory they had used (10 000 TLS tunnels, 1 000 at a time: 9 MiB idle, 31 MiB at the peak,
/// still 29 MiB 10 s after the last one closed), jemalloc gives it back (14 MiB) for about
/// 1.5 MiB more when idle. `cplink-rss` measures both.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long freed pages stay mapped before jemalloc's background thread returns them.
const DECAY_MS: isize = 1_000;

/// Returns freed memory to the system within about [`DECAY_MS`], even while the server is
/// idle: a background thread purges, instead of allocations purging as they happen (an idle
/// server does not allocate). `_RJEM_MALLOC_CONF`, when set, is left in charge.
fn configure_allocator() -> Result<(), tikv_jemalloc_ctl::Error> {
    if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
        return Ok(());
    }
    // Arenas made from now on.
    b"arenas.dirty_decay_ms\0".name().write(DECAY_MS)?;
    b"arenas.muzzy_decay_ms\0".name().write(0isize)?;
    // Arenas already made; one not made yet fails, and will take the defaults above.
    for arena in 0..tikv_jemalloc_ctl::arenas::narenas::read()? {
        let _ = format!("arena.{arena}.dirty_decay_ms\0")
            .as_bytes()
            .name()
            .write(DECAY_MS);
        let _ = format!("arena.{arena}.muzzy_decay_ms\0")
            .as_bytes()
            .name()
            .write(0isize);
    }
    tikv_jemalloc_ctl::background_thread::write(true)
}

fn main() -> anyhow::Result<()> {
    // Parsed before the runtime exists: --worker-threads sizes it.
    let args = Args::parse();
    args.log.init()?;
    if let Err(e) = configure_allocator() {
        tracing::warn!(error = %e, "cannot configure jemalloc: freed memory may be kept longer");
    }
    cplink_runtime::executor::build(args.worker_threads)
        .context("cannot start the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.clone().into_config()?;
    let listeners = Listeners::bind(&args).await?;
    let shutdown = CancellationToken::new();
    cplink_runtime::shutdown::cancel_on_signal(shutdown.clone())
        .context("cannot install signal handlers")?;
    Server::new(config).run(listeners, shutdown).await;
    Ok(())
}
