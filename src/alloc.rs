//! A counting global allocator: measures the bytes a piece of code really allocates.
//!
//! Counters are per thread, so the model worker of one variant measures its own forward pass
//! while other threads allocate freely. Memory freed on another thread than the one that
//! allocated it is counted where it is freed; the model code keeps its temporaries on the thread
//! that runs it, so its peak is exact.

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
}

fn record(delta: isize) {
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

/// Runs `f` and returns its result with the peak bytes it held on this thread above what was
/// live when it started.
pub fn measure_peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    let saved_peak = PEAK.with(|p| p.replace(start));
    let out = f();
    let peak = PEAK.with(|p| p.replace(saved_peak.max(p.get())));
    (out, (peak - start).max(0) as usize)
}

/// Counts `bytes`, held at once by work this thread handed to another thread and waited for
/// (measured there with [`measure_peak`]), as if this thread had held them on top of what it has.
pub fn credit_peak(bytes: usize) {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(p.get().max(live + bytes as isize)));
}
