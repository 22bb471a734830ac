//! glibc malloc settings for the binaries that use glibc's allocator (the agent and the
//! operator; the server links jemalloc).
//!
//! glibc returns the top of its heap to the kernel as soon as more than 128 KiB of it is free
//! (`M_TRIM_THRESHOLD`). A tunnel frees and allocates buffers of tens of KiB in turn, so the
//! heap top shrank and grew on every few frames, and each regrowth faulted fresh zeroed pages
//! in: a profile of an agent carrying an upload spent a sixth of its CPU in page faults,
//! zeroing and `munmap`. Keeping up to 1 MiB free removes that (agent CPU per GiB uploaded,
//! `cplink-bench`, same run: 1.00 s before, 0.64-0.80 s after) and costs at most that MiB of
//! resident memory after a burst; an idle agent's RSS is unchanged.
//!
//! glibc reads the setting from the environment at process start, so it is an environment
//! variable of the pods the operator makes rather than code: the crates forbid `unsafe`, and
//! `mallopt` is an FFI call.

/// The environment variable glibc reads its tunables from.
pub const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// Its value for cplink's pods: keep up to 1 MiB free at the heap top.
pub const TUNABLES: &str = "glibc.malloc.trim_threshold=1048576";
