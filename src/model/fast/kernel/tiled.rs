//! The loops around a micro-kernel: K chunks, groups of panels kept in L2, strips of up to
//! `MR` rows kept in L1, and each micro-tile's epilogue.

use std::ops::Range;

use super::{avx2, avx512, fill_strided, Finish, Gemm, Kernel, Lhs, PackedB, KC};

/// The most rows of one micro-kernel call.
pub const MR: usize = 14;
/// Rows per call elsewhere on 16-lane registers.
const NARROW_MR: usize = 8;
/// Weights of the panel chunks a row strip passes over before the next strip: 256 KiB of L2.
const GROUP_FLOATS: usize = 1 << 16;

/// Runs `g` on the micro-kernel its panels were packed for (see [`super::gemm`]).
pub unsafe fn gemm(g: &Gemm) {
    let Gemm {
        a,
        ref rows,
        b,
        ref cols,
        c,
        ldc,
        accumulate,
        finish,
    } = *g;
    let w = b.width;
    let panels = cols.start / w..cols.end.div_ceil(w);
    let strip_rows = strip_rows(b, panels.len());
    // A whose next strip the kernel prefetches: a map read from memory (taps, bands and patch
    // rows are built just before, in cache).
    let prefetched = match a {
        Lhs::Rows {
            a,
            lda,
            in_map: true,
        } => Some((a, lda)),
        _ => None,
    };
    // K chunks: whole taps where A is read by taps, plain `KC` steps otherwise.
    let (seg, chunk) = match a {
        Lhs::Taps { taps, .. } => {
            let seg = b.k / taps.len();
            debug_assert!(seg * taps.len() == b.k && b.takes_taps(seg));
            (seg, (KC / seg).max(1) * seg)
        }
        Lhs::Rows { .. } => (b.k, KC),
    };
    // A group of panel chunks stays in L2 while each row strip, loaded into L1 by the group's
    // first panel, passes over all of them; the next group is prefetched meanwhile.
    let mut groups = groups(b, chunk, panels).peekable();
    while let Some(Group { k0, kc, panels }) = groups.next() {
        let mut lookahead = Lookahead::of(b, groups.peek().cloned());
        let last_chunk = k0 + kc == b.k;
        let rows_from_k0 = [k0];
        // This chunk's segments of A: its taps, or the rows' K steps from `k0` as one.
        let (chunk_taps, chunk_seg) = match a {
            Lhs::Taps { taps, .. } => (&taps[k0 / seg..(k0 + kc) / seg], seg),
            Lhs::Rows { .. } => (&rows_from_k0[..], kc),
        };
        for r0 in rows.clone().step_by(strip_rows) {
            let strip = strip_rows.min(rows.end - r0);
            let strip_c = c.add(r0 * ldc);
            // One tile per strip, its panel and C pointers set for each panel below.
            let mut tile = Tile {
                taps: chunk_taps,
                seg: chunk_seg,
                a: [std::ptr::null(); MR],
                next: std::ptr::null(),
                b: std::ptr::null(),
                ahead: std::ptr::null(),
                c: strip_c,
                ldc,
            };
            // The strip's first row, counted from the call's first.
            let at = r0 - rows.start;
            match a {
                Lhs::Rows { a, lda, .. } => {
                    fill_strided(&mut tile.a[..strip], a.add(at * lda), lda)
                }
                Lhs::Taps { starts, .. } => {
                    tile.a[..strip].copy_from_slice(&starts[at..at + strip])
                }
            }
            let mut next = [std::ptr::null(); MR];
            if let Some((a, lda)) = prefetched {
                let next_strip = strip_rows.min(rows.end - r0 - strip);
                fill_strided(&mut next[..next_strip], a.add((at + strip) * lda), lda);
            }
            for p in panels.clone() {
                let col0 = p * w;
                let mut store = Store {
                    width: w.min(b.n - col0),
                    load_c: accumulate || k0 > 0,
                    bias: std::ptr::null(),
                    addends: std::ptr::null(),
                    col0,
                    relu: false,
                };
                if let (true, Some(f)) = (last_chunk, finish) {
                    store.finish(f, at, col0);
                }
                // Loaded by the group's first panel only; the others find A in L1.
                tile.next = if p == panels.start && !next[0].is_null() {
                    &next
                } else {
                    std::ptr::null()
                };
                tile.b = b.panel_from(p, k0).as_ptr();
                tile.ahead = lookahead.take(kc * 64).unwrap_or(std::ptr::null());
                tile.c = strip_c.add(col0);
                dispatch(b.kernel, strip, w, b.pairs, &tile, &store);
            }
        }
    }
}

/// Rows per micro-kernel call on `b` for a call over `panels` of its panels. With 16
/// registers of 8 lanes, 6 rows of two accumulators ([`avx2`]). With 32 of 16 lanes, a call
/// over several 32-column panels takes 14 rows: 28 accumulators, two panel registers and one
/// A broadcast, so each panel load feeds 14 FMAs (against 8, ~10% faster on ResNet-50). Other
/// calls keep 8 rows: there a strip passes over one panel and waits on its A rows, and longer
/// strips measured 20-30% slower on the ResNet-20s (docs/performance.md).
fn strip_rows(b: &PackedB, panels: usize) -> usize {
    match b.kernel {
        Kernel::Avx2 => 6,
        _ if panels > 1 && !b.pairs => MR,
        _ => NARROW_MR,
    }
}

/// Panels of `kc` steps and `width` columns in one group ([`GROUP_FLOATS`]).
fn panels_per_group(kc: usize, width: usize) -> usize {
    (GROUP_FLOATS / (kc * width)).max(1)
}

/// One group of panel chunks: K steps `k0..k0 + kc` of `panels`.
#[derive(Clone, Debug, PartialEq)]
struct Group {
    k0: usize,
    kc: usize,
    panels: Range<usize>,
}

/// The groups of a GEMM over `panels` of `b`, in the order it runs them: K chunk by K chunk
/// of `chunk` steps, each chunk's panels [`panels_per_group`] at a time.
fn groups(b: &PackedB, chunk: usize, panels: Range<usize>) -> impl Iterator<Item = Group> + '_ {
    (0..b.k).step_by(chunk).flat_map(move |k0| {
        let kc = chunk.min(b.k - k0);
        let (size, end) = (panels_per_group(kc, b.width), panels.end);
        panels.clone().step_by(size).map(move |first| Group {
            k0,
            kc,
            panels: first..(first + size).min(end),
        })
    })
}

/// The weights of the group after the current one (the same panels' next K chunk, or the
/// next panels'), handed out to the current group's kernel calls to prefetch into L2: the
/// current group's first strip otherwise waits on memory for every panel line, which costs
/// most where strips are few (ResNet-50's layer4: 14 strips of a thread's 4 images).
struct Lookahead<'a> {
    b: &'a PackedB,
    /// The next group, its panels narrowed to those not yet handed out; `None` after the last.
    next: Option<Group>,
    /// Bytes of the first panel's chunk already handed out.
    taken: usize,
}

impl<'a> Lookahead<'a> {
    fn of(b: &'a PackedB, next: Option<Group>) -> Self {
        Self { b, next, taken: 0 }
    }

    /// The start of the next `bytes` to prefetch, within one panel's chunk; `None` once all
    /// are handed out.
    fn take(&mut self, bytes: usize) -> Option<*const i8> {
        let group = self.next.as_mut()?;
        if self.taken >= group.kc * self.b.width * 4 {
            group.panels.start += 1;
            self.taken = 0;
        }
        if group.panels.is_empty() {
            return None;
        }
        let from = self.b.panel_from(group.panels.start, group.k0).as_ptr();
        let at = from.cast::<i8>().wrapping_add(self.taken);
        self.taken += bytes;
        Some(at)
    }
}

/// How one micro-tile is stored.
pub struct Store {
    /// Real columns of the panel (the rest is padding, masked off).
    pub width: usize,
    /// Add to what C holds (a later K chunk, or an accumulating call).
    pub load_c: bool,
    /// The bias from the panel's first column, or null.
    pub bias: *const f32,
    /// The strip's first row's addend rows, then the next rows' (pointers to column 0, null for
    /// none), or null where no row has any.
    pub addends: *const [*const f32; 2],
    /// The panel's first column, where the addend rows are read from.
    pub col0: usize,
    pub relu: bool,
}

impl Store {
    /// Takes the epilogue of the call's rows from `first`, columns from `col0`.
    unsafe fn finish(&mut self, f: &Finish, first: usize, col0: usize) {
        if !f.bias.is_empty() {
            self.bias = f.bias.as_ptr().add(col0);
        }
        if !f.addends.is_empty() {
            self.addends = f.addends[first..].as_ptr();
        }
        self.relu = f.relu;
    }
}

/// One micro-kernel call's operands: A's rows (starting at `a`) in segments of `seg` steps
/// at offsets `taps`, times as many steps of the panel chunk `b`, into C at `c` (rows `ldc`
/// apart).
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    pub taps: &'a [usize],
    pub seg: usize,
    pub a: [*const f32; MR],
    /// The next strip's A rows (then nulls), or null for none: the kernel prefetches their
    /// lines as it steps through K. A strip of a narrow GEMM passes over few panels, so it
    /// waits on memory for A: prefetching the next strip's rows while this one computes hides
    /// most of that wait.
    pub next: *const [*const f32; MR],
    pub b: *const f32,
    /// Where the kernel prefetches into L2, one line per K step: its share of the panel
    /// chunks the next group will read ([`Lookahead`]), or null for none. (The paired-panel
    /// kernels, one panel per narrow output, skip it.)
    pub ahead: *const i8,
    pub c: *mut f32,
    pub ldc: usize,
}

unsafe fn dispatch(
    kernel: Kernel,
    strip: usize,
    panel_width: usize,
    pairs: bool,
    t: &Tile,
    s: &Store,
) {
    match kernel {
        Kernel::Avx512 => avx512::micro_tile(strip, panel_width, pairs, t, s),
        Kernel::Avx2 => avx2::micro_tile(strip, panel_width, t, s),
        Kernel::Portable => unreachable!("the gemm crate has its own tiling"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every start the lookahead of the group at `k0` from panel `first`, in a call over
    /// `panels`, hands out `KC * 64` bytes at a time.
    fn handed_out(b: &PackedB, panels: Range<usize>, k0: usize, first: usize) -> Vec<*const i8> {
        let mut groups =
            groups(b, KC, panels).skip_while(|g| (g.k0, g.panels.start) != (k0, first));
        assert!(groups.next().is_some(), "no group at ({k0}, {first})");
        let mut lookahead = Lookahead::of(b, groups.next());
        std::iter::from_fn(|| lookahead.take(KC * 64)).collect()
    }

    /// The two halves of each of `panels`' chunks at `k0`, in order.
    fn halves(b: &PackedB, panels: Range<usize>, k0: usize) -> Vec<*const i8> {
        panels
            .flat_map(|p| {
                let chunk = b.panel_from(p, k0).as_ptr().cast::<i8>();
                [chunk, chunk.wrapping_add(KC * 64)]
            })
            .collect()
    }

    #[test]
    fn groups_run_chunk_by_chunk_each_chunks_panels_a_group_at_a_time() {
        // 20 panels of 32 columns, K of two full chunks and a short one.
        let (k, n) = (2 * KC + 16, 640);
        let b = PackedB::new(&vec![0.; k * n], k, n, Kernel::Avx512, k);
        let group = |k0, kc, panels| Group { k0, kc, panels };
        let short = panels_per_group(16, b.width);
        assert!(short >= 20, "a 16-step chunk's group takes every panel");
        assert_eq!(
            groups(&b, KC, 2..20).collect::<Vec<_>>(),
            [
                group(0, KC, 2..10),
                group(0, KC, 10..18),
                group(0, KC, 18..20),
                group(KC, KC, 2..10),
                group(KC, KC, 10..18),
                group(KC, KC, 18..20),
                group(2 * KC, 16, 2..20),
            ]
        );
    }

    #[test]
    fn lookahead_hands_out_the_next_groups_panel_chunks_once_each() {
        // 32 panels of 32 columns in two K chunks: groups of 8 panels.
        let (k, n) = (2 * KC, 1024);
        let b = PackedB::new(&vec![0.; k * n], k, n, Kernel::Avx512, k);
        assert_eq!(panels_per_group(KC, b.width), 8);
        // The next panels of the same chunk.
        assert_eq!(handed_out(&b, 0..32, 0, 8), halves(&b, 16..24, 0));
        // After a chunk's last group, the next chunk's first.
        assert_eq!(handed_out(&b, 0..32, 0, 24), halves(&b, 0..8, KC));
        // A call over some of the panels stays within them.
        assert_eq!(handed_out(&b, 4..10, 0, 4), halves(&b, 4..10, KC));
        // Nothing after the last chunk's last group.
        assert!(handed_out(&b, 0..32, KC, 24).is_empty());
    }
}
