//! How the fast path spreads its work over the thread pool.
//!
//! A batch at least as large as the pool is split into one share of images per thread and each
//! share runs the whole network on its own thread ([`shared_out`]): the threads then meet once
//! per pass instead of once per convolution. The octave nets, with four small convolutions per
//! layer, spent most of their second core in those meetings. A smaller batch (batch 1) is
//! spread inside each operation instead, by tiles ([`for_each_task`]).

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

thread_local! {
    /// Set while this thread runs a share of a batch: its operations stay on it.
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Threads one operation may spread over.
pub fn available() -> usize {
    if ALONE.get() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `task` on every item, over the pool unless this thread runs a share alone.
pub fn for_each_task<I: Send>(items: Vec<I>, task: impl Fn(I) + Sync + Send) {
    if ALONE.get() {
        items.into_iter().for_each(task);
    } else {
        items.into_par_iter().for_each(task);
    }
}

/// The images of each thread's share, or `None` when the batch is spread by tiles.
pub fn shares(images: usize) -> Option<Vec<Range<usize>>> {
    let threads = available();
    if threads < 2 || images < threads {
        return None;
    }
    let mut start = 0;
    Some(
        (0..threads)
            .map(|t| {
                let len = images / threads + usize::from(t < images % threads);
                start += len;
                start - len..start
            })
            .collect(),
    )
}

/// Runs `pass` on each share, each on its own pool thread with its operations kept there;
/// returns the results in order.
pub fn shared_out<S: Send, R: Send>(shares: Vec<S>, pass: impl Fn(S) -> R + Sync) -> Vec<R> {
    /// Restores the thread's setting, also when the pass panics (the pool thread lives on).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.set(self.0);
        }
    }
    shares
        .into_par_iter()
        .map(|share| {
            let _restore = Restore(ALONE.replace(true));
            pass(share)
        })
        .collect()
}
