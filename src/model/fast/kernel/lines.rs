//! Where packed weights live: 64-byte cache lines in shared slabs on transparent huge pages.
//!
//! Each K step of a 32-column panel is two whole lines, so no load of the micro-kernel
//! straddles two (a heap `Vec<f32>` is only 16-byte aligned, and a straddling load costs two
//! reads of L1).
//!
//! A pass reads every weight once, and a deep layer's panels come from memory. On 4 KiB pages
//! each page costs a TLB miss and a page walk before the kernel's prefetches into it can
//! start; on 2 MiB pages there are 512 times fewer. So weights are packed one after another
//! into [`SLAB`]-sized mappings advised onto huge pages before anything is written (Linux's
//! transparent huge pages in `madvise` mode, a common default, back only memory advised so),
//! and a network's many small convolutions share those pages too. A slab is unmapped when the
//! last weights in it are dropped: networks loaded at the same time may share one, which then
//! lives as long as the longer lived of them. Where no mapping can be made the weights go on
//! the heap.

use std::sync::{Arc, Mutex, PoisonError, Weak};

/// The mapping weights share. Weights larger than a quarter of it get one of their own.
const SLAB: usize = 32 << 20;
/// A transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Floats in whole 64-byte-aligned lines, zeros until written.
#[derive(Debug)]
pub struct Lines(Place);

#[derive(Debug)]
enum Place {
    /// `len` bytes from `offset` in `slab`, which no other `Lines` overlaps.
    Slab {
        slab: Arc<Slab>,
        offset: usize,
        len: usize,
    },
    Heap(Vec<Line>),
}

/// An anonymous mapping advised onto huge pages, handed out front to back.
#[derive(Debug)]
struct Slab {
    /// Unmapped when the slab is dropped.
    _map: memmap2::MmapMut,
    /// The mapping's start, taken mutably once: the `Lines` in it write their own ranges.
    base: *mut u8,
}

// SAFETY: the mapping is plain memory owned by the slab; `base` is only written through by the
// one `Lines` that owns each range (`&mut` access), and read through shared ones.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

/// The slab now being filled, and how much of it is handed out.
type Filling = Mutex<Option<(Weak<Slab>, usize)>>;

/// The process's filling slab.
static FILLING: Filling = Mutex::new(None);

impl Slab {
    fn map(bytes: usize) -> Option<Arc<Self>> {
        let mut map = memmap2::MmapMut::map_anon(bytes).ok()?;
        // Advice only: where the kernel has no huge pages the weights stay on small ones. Only
        // whole huge pages, so the tail of a mapping of its own costs no memory it does not use.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::HugePage, 0, bytes / HUGE_PAGE * HUGE_PAGE);
        let base = map.as_mut_ptr();
        Some(Arc::new(Self { _map: map, base }))
    }
}

impl Lines {
    /// At least `floats` zeros, in whole lines.
    pub fn zeros(floats: usize) -> Self {
        Self::zeros_in(floats, &FILLING)
    }

    fn zeros_in(floats: usize, filling: &Filling) -> Self {
        let lines = floats.div_ceil(16).max(1);
        let len = lines * size_of::<Line>();
        let place = Self::place(len, filling);
        Self(place.unwrap_or_else(|| Place::Heap(vec![Line([0.; 16]); lines])))
    }

    /// `len` bytes in the filling slab, a new one, or a mapping of their own.
    fn place(len: usize, filling: &Filling) -> Option<Place> {
        let (slab, offset) = if len > SLAB / 4 {
            (Slab::map(len)?, 0)
        } else {
            let mut filling = filling.lock().unwrap_or_else(PoisonError::into_inner);
            let room = filling
                .as_ref()
                .filter(|(_, used)| used + len <= SLAB)
                .and_then(|(slab, used)| Some((slab.upgrade()?, *used)));
            let (slab, offset) = match room {
                Some(room) => room,
                None => (Slab::map(SLAB)?, 0),
            };
            *filling = Some((Arc::downgrade(&slab), offset + len));
            (slab, offset)
        };
        Some(Place::Slab { slab, offset, len })
    }

    pub fn floats(&self) -> &[f32] {
        match &self.0 {
            // SAFETY: the range lies within the slab's mapping (`place`), starts on a line
            // (a mapping starts on a page, ranges are whole lines) and is not written while
            // shared.
            Place::Slab { slab, offset, len } => unsafe {
                std::slice::from_raw_parts(slab.base.add(*offset).cast(), len / 4)
            },
            // SAFETY: a `Line` is 16 floats and nothing else (`repr(C)`, size 64 = its
            // alignment).
            Place::Heap(lines) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16)
            },
        }
    }

    pub fn floats_mut(&mut self) -> &mut [f32] {
        match &mut self.0 {
            // SAFETY: as in `floats`; no other `Lines` overlaps this range, and this one is
            // borrowed mutably.
            Place::Slab { slab, offset, len } => unsafe {
                std::slice::from_raw_parts_mut(slab.base.add(*offset).cast(), *len / 4)
            },
            // SAFETY: as in `floats`.
            Place::Heap(lines) => unsafe {
                std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16)
            },
        }
    }

    /// Whether these lines are in a mapping advised onto huge pages.
    #[cfg(test)]
    fn mapped(&self) -> bool {
        matches!(self.0, Place::Slab { .. })
    }
}

impl Clone for Lines {
    fn clone(&self) -> Self {
        let floats = self.floats();
        let mut copy = Self::zeros(floats.len());
        copy.floats_mut().copy_from_slice(floats);
        copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_zeroed_aligned_disjoint_and_freed_with_their_last_owner() {
        // A filling slab of the test's own: other tests place weights meanwhile. Small weights
        // share a slab, one after another; a large one has its own mapping.
        let filling = Filling::new(None);
        let sizes = [16, 100, 4096, SLAB / 4 / 4 + 1, 3];
        let mut all: Vec<Lines> = sizes
            .iter()
            .map(|&n| Lines::zeros_in(n, &filling))
            .collect();
        for (lines, &n) in all.iter().zip(&sizes) {
            let floats = lines.floats();
            assert!(lines.mapped(), "no mapping for {n} floats");
            assert!(floats.len() >= n && floats.len() % 16 == 0);
            assert_eq!(floats.as_ptr() as usize % 64, 0, "{n} floats off a line");
            assert!(floats.iter().all(|&v| v == 0.));
        }
        for (i, lines) in all.iter_mut().enumerate() {
            lines.floats_mut().fill(i as f32 + 1.);
        }
        for (i, lines) in all.iter().enumerate() {
            assert!(
                lines.floats().iter().all(|&v| v == i as f32 + 1.),
                "overlap"
            );
        }
        #[cfg(target_os = "linux")]
        if thp_available() {
            for lines in &all {
                assert!(huge_page_eligible(lines.floats().as_ptr()), "not advised");
            }
        }
        let copy = all[1].clone();
        assert_ne!(copy.floats().as_ptr(), all[1].floats().as_ptr());
        assert_eq!(copy.floats(), all[1].floats());
        // The filling slab is held only by its weights: dropping them all unmaps it, and the
        // next weights start a fresh one.
        let slab = |lines: &Lines| match &lines.0 {
            Place::Slab { slab, .. } => Arc::downgrade(slab),
            Place::Heap(_) => unreachable!(),
        };
        let (shared, own) = (slab(&all[0]), slab(&all[3]));
        assert!(shared.ptr_eq(&slab(&all[4])) && !shared.ptr_eq(&own));
        drop(all);
        drop(copy);
        assert!(
            shared.upgrade().is_none() && own.upgrade().is_none(),
            "still mapped"
        );
        let fresh = Lines::zeros_in(16, &filling);
        assert!(fresh.mapped() && fresh.floats().iter().all(|&v| v == 0.));
    }

    /// Whether this kernel gives transparent huge pages to memory at all.
    #[cfg(target_os = "linux")]
    fn thp_available() -> bool {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| !mode.contains("[never]"))
    }

    /// Whether the kernel may back the mapping holding `at` with huge pages, as
    /// `/proc/self/smaps` says (its `THPeligible` field).
    #[cfg(target_os = "linux")]
    fn huge_page_eligible(at: *const f32) -> bool {
        let at = at as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((start, end)) = range {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&at);
                    continue;
                }
            }
            if inside && line.starts_with("THPeligible:") {
                return line.ends_with('1');
            }
        }
        false
    }
}
