//! The tokio runtime a binary runs on, sized by its `--worker-threads` flag.
//!
//! The binaries build it by hand rather than with `#[tokio::main]`, so that the flag is parsed
//! before any thread exists.

use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

/// Builds a runtime with `worker_threads` threads running tasks, or tokio's default (one per
/// CPU, or `TOKIO_WORKER_THREADS`) when `None`. I/O and timers are enabled, as with
/// `#[tokio::main]`.
///
/// One worker thread means a current-thread runtime: the thread that calls
/// [`Runtime::block_on`] runs every task. A one-worker multi-thread runtime would offer no more
/// parallelism but would add a thread (its stack, its malloc arena) and a cross-thread wake-up
/// for every task the main future spawns. The cost is that `tokio::task::block_in_place`
/// panics on it; no cplink crate, nor any dependency they use, calls it.
pub fn build(worker_threads: Option<NonZeroUsize>) -> std::io::Result<Runtime> {
    let mut builder = match worker_threads {
        Some(one) if one.get() == 1 => Builder::new_current_thread(),
        Some(n) => {
            let mut builder = Builder::new_multi_thread();
            builder.worker_threads(n.get());
            builder
        }
        None => Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(runtime: &Runtime) -> usize {
        runtime.metrics().num_workers()
    }

    #[test]
    fn one_worker_is_a_current_thread_runtime() {
        let runtime = build(NonZeroUsize::new(1)).unwrap();
        assert_eq!(
            runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        assert_eq!(workers(&runtime), 1);
        assert_eq!(runtime.block_on(async { 40 + 2 }), 42);
    }

    #[test]
    fn several_workers_are_a_pool_of_that_many() {
        let runtime = build(NonZeroUsize::new(3)).unwrap();
        assert_eq!(
            runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(workers(&runtime), 3);
    }

    #[test]
    fn timers_and_sockets_work_without_a_count() {
        let runtime = build(None).unwrap();
        runtime.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        });
    }
}
