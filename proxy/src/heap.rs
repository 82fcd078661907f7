//! Gives freed heap memory back to the operating system after a table swap.
//!
//! Loading a table parses it into an intermediate form, compiles it, and frees the intermediate form and the old
//! table. glibc keeps those freed small chunks mapped (they sit between live allocations, so its automatic trimming
//! of the heap's top does not reach them): with 10 000 clients that was ≈ 5 MiB of RSS held for nothing, half of the
//! proxy's anonymous memory (`docs/benchmarks/README.md`). `malloc_trim(0)` returns every free page of every arena.
//! Other C libraries (musl in the static image) return memory on their own; there this does nothing.

/// Returns free heap pages to the OS (glibc only). Costs a walk over the heap; called once per table swap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc documents it as MT-Safe, so calling it
    // while other threads allocate is allowed.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}

/// [`release_free_memory`] on a blocking thread of the current Tokio runtime, not waited for; calls while one is
/// pending or running are folded into it (a burst of table swaps costs one or two walks, not one each).
pub fn release_free_memory_soon() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PENDING: AtomicBool = AtomicBool::new(false);
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::task::spawn_blocking(|| {
        // Cleared first: a swap that finishes during the walk schedules another one.
        PENDING.store(false, Ordering::Release);
        release_free_memory();
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn can_be_called_repeatedly_from_any_thread() {
        let big: Vec<Vec<u8>> = (0..10_000).map(|i| vec![0u8; 64 + i % 64]).collect();
        drop(big);
        super::release_free_memory();
        std::thread::spawn(super::release_free_memory).join().unwrap();
    }
}
