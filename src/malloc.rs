//! glibc malloc tuning for a long-running process (Linux with glibc; elsewhere nothing): set at
//! start-up before any thread exists, and a periodic trim that gives freed pages back.

/// Blocks of this size and more get a mapping of their own (see [`tune`]).
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Sets glibc's malloc up for a long-running process whose memory must not grow with its input;
/// a variable of glibc's own (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`) still overrides it
/// (not `GLIBC_TUNABLES`, which glibc reads before these calls).
///
/// Without it, peak RSS grew with the length of a backlog although the live heap did not: freed
/// memory stayed with the allocator (`benches/results/HISTORY.md` has the runs). Two causes:
/// - A thread that finds the arenas busy gets an arena of its own (up to eight per CPU), each
///   keeping what it freed; librdkafka's threads, the consumer and the runtime allocate in turns.
/// - glibc raises its mmap threshold to the largest block freed, so librdkafka's fetch buffers
///   soon came from the heap and left holes in it; a fixed threshold keeps blocks of 128 KiB and
///   more in their own mappings, returned to the kernel when freed.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |name| std::env::var_os(name).is_none();
        // SAFETY: mallopt only sets tunables; this runs before any other thread exists.
        unsafe {
            if unset("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if unset("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            }
        }
    }
}

/// Gives the pages that freed memory left inside the heap back to the kernel every `every`;
/// glibc only gives back the top of a heap on its own. Runs until the runtime stops.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub async fn trim(every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim takes the allocator's locks like any malloc call.
        unsafe { libc::malloc_trim(0) };
    }
}
