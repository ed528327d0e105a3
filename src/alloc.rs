//! A counting global allocator: measures the bytes a piece of code really allocates.
//!
//! Counters are per thread, so the model worker of one variant measures its own forward pass
//! while other threads allocate freely. Memory freed on another thread than the one that
//! allocated it is counted where it is freed; the model code keeps its temporaries on the thread
//! that runs it, so its peak is exact. Code can opt out with [`uncounted`] (per-thread scratch
//! whose size does not depend on the work, which would be charged to whichever measurement
//! happens to be running on the thread that runs it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct CountingAlloc;

/// Every program linking octserve (the binary, the tests) counts, so the server can always
/// report the memory a forward pass really uses.
#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static COUNTING: Cell<bool> = const { Cell::new(true) };
}

fn record(delta: isize) {
    if !COUNTING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    // `try_with` because allocations also happen while thread-locals are being torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            record(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc_zeroed(layout);
        if !ptr.is_null() {
            record(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        record(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        if !new.is_null() {
            record(new_size as isize - layout.size() as isize);
        }
        new
    }
}

/// Tells glibc's malloc to keep freed feature maps for reuse instead of handing them back to
/// the kernel: by default it maps every block over 128 KiB afresh and trims the heap's free top,
/// so each pass page-faults its maps in again, a cost the small nets feel most at large
/// batches (docs/performance.md). Blocks up to 32 MiB (glibc's most) now come from
/// the heap, and up to 256 MiB of free heap is kept. `MALLOC_MMAP_THRESHOLD_` or
/// `MALLOC_TRIM_THRESHOLD_` in the environment wins over this.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        // SAFETY: mallopt only changes the allocator's thresholds; called before any thread.
        unsafe {
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            }
        }
    }
}

/// Hands the allocator's free memory back to the kernel now (glibc's `malloc_trim`), in every
/// arena. [`keep_freed_memory`] keeps freed blocks for the model's next pass; after a large
/// image decode that would leave the process at its peak footprint for nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `f` and returns its result with the peak bytes it held on this thread above what was
/// live when it started.
///
/// A measurement nested in another on the same thread does not raise the outer one's peak
/// (only what it leaves allocated counts there): a thread-pool thread waiting for its own tasks
/// may run another caller's whole measured job in between. Work done for the caller on another
/// thread is added with [`credit_peak`].
pub fn measure_peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    let outer_peak = PEAK.with(|p| p.replace(start));
    // Counted even when a pool thread picks the job up inside an uncounted section.
    let out = with_counting(true, f);
    let live = LIVE.with(Cell::get);
    let peak = PEAK.with(|p| p.replace(outer_peak.max(live)));
    (out, (peak - start).max(0) as usize)
}

/// Runs `f` with counting on or off as `on`, then restores the thread's setting.
fn with_counting<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COUNTING.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COUNTING.with(|c| c.replace(on)));
    f()
}

/// Runs `f` without counting what it allocates or frees on this thread. `f` must free what it
/// allocates, or keep it for the thread's lifetime (a scratch buffer), so the counts stay whole;
/// a thread pool's parallel section fits, since a thread waiting in it may run other callers'
/// jobs, which are not the caller's to count (measured jobs among them count for themselves).
pub fn uncounted<R>(f: impl FnOnce() -> R) -> R {
    with_counting(false, f)
}

/// Counts `bytes`, held at once by work this thread handed to another thread and waited for
/// (measured there with [`measure_peak`]), as if this thread had held them on top of what it has.
pub fn credit_peak(bytes: usize) {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(p.get().max(live + bytes as isize)));
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;

    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_nested_measurement_does_not_raise_the_outer_peak() {
        let ((), outer) = measure_peak(|| {
            let held = black_box(vec![0u8; MIB]);
            let ((), inner) = measure_peak(|| drop(black_box(vec![0u8; 4 * MIB])));
            assert!(inner >= 4 * MIB, "inner {inner}");
            drop(held);
        });
        assert!((MIB..2 * MIB).contains(&outer), "outer {outer}");
    }

    #[test]
    fn uncounted_allocations_stay_out_of_the_peak() {
        let ((), peak) = measure_peak(|| uncounted(|| drop(black_box(vec![0u8; 4 * MIB]))));
        assert!(peak < MIB, "peak {peak}");
        let ((), peak) = measure_peak(|| drop(black_box(vec![0u8; 4 * MIB])));
        assert!(peak >= 4 * MIB, "counting resumes after: {peak}");
        // A measured job a pool thread runs while waiting in an uncounted section counts.
        let ((), peak) = uncounted(|| measure_peak(|| drop(black_box(vec![0u8; 4 * MIB]))));
        assert!(peak >= 4 * MIB, "measured inside uncounted: {peak}");
    }
}
