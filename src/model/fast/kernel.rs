//! The GEMM at the heart of every convolution: `C (+)= A x B` with B pre-packed at load time
//! and the convolution's epilogue (bias, addends, ReLU) applied as the result is stored.
//!
//! On CPUs with AVX-512F a register-blocked micro-kernel computes `MR` rows x one panel of 16 or
//! 32 columns; A is read in place (a map or a tile of patch rows), K is cut into `KC`-deep
//! chunks so the panel chunk stays in L1 while every row strip of the tile passes over it.
//! Elsewhere the same packed panels go through the `gemm` crate and the epilogue runs after.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::ops::Range;

/// Rows per micro-kernel call.
const MR: usize = 8;
/// Depth of one K chunk: a row strip's chunk is 8 KiB of L1.
const KC: usize = 256;
/// Weights of the panel chunks a row strip passes over before the next strip: 256 KiB of L2.
const GROUP_FLOATS: usize = 1 << 16;

/// A `k x n` weight matrix as zero-padded panels of `width` columns, for the kernel that will
/// read it: `data[(panel * k + row) * width + j]`, or with `pairs`, two rows interleaved per
/// column, `data[(panel * k2 + row / 2) * 2 * width + (j / 8) * 16 + 2 * (j % 8) + row % 2]`
/// (`k2` = `k` rounded up to even, halved).
#[derive(Clone, Debug)]
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    width: usize,
    pairs: bool,
    data: Vec<f32>,
}

impl PackedB {
    /// From row-major `[k, n]`. For the AVX-512 kernel, panels are 32 wide, or for narrow
    /// outputs (<= 16 columns) 8 or 16 wide with rows paired, so that one 16-lane register
    /// holds two steps of K and little of the work multiplies padding; the `gemm` crate packs
    /// for itself and takes one panel as wide as the matrix.
    pub fn new(weights: &[f32], k: usize, n: usize, kernel: Kernel) -> Self {
        assert_eq!(weights.len(), k * n);
        let (width, pairs) = match kernel {
            Kernel::Avx512 if n <= 8 => (8, true),
            Kernel::Avx512 if n <= 16 => (16, true),
            Kernel::Avx512 => (32, false),
            Kernel::Portable => (n, false),
        };
        let panel_len = panel_len(k, width);
        let mut data = vec![0f32; n.div_ceil(width) * panel_len];
        for (row, weights) in weights.chunks_exact(n).enumerate() {
            for (col, &w) in weights.iter().enumerate() {
                let (panel, j) = (col / width, col % width);
                let at = if pairs {
                    (row / 2) * 2 * width + (j / 8) * 16 + 2 * (j % 8) + row % 2
                } else {
                    row * width + j
                };
                data[panel * panel_len + at] = w;
            }
        }
        Self {
            kernel,
            k,
            n,
            width,
            pairs,
            data,
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether a GEMM on these panels can read A by taps of `segment` steps ([`Lhs::Taps`]):
    /// on our micro-kernel, in whole pairs where the rows are paired.
    pub fn takes_taps(&self, segment: usize) -> bool {
        self.kernel == Kernel::Avx512 && (segment.is_multiple_of(2) || !self.pairs)
    }

    /// Column blocks handed to different threads start on multiples of this.
    pub fn column_align(&self) -> usize {
        match self.kernel {
            Kernel::Avx512 => self.width,
            Kernel::Portable => 16,
        }
    }

    /// Panel `p` from K step `k0` (even when the rows are paired).
    fn panel_from(&self, p: usize, k0: usize) -> &[f32] {
        let len = panel_len(self.k, self.width);
        &self.data[p * len + k0 * self.width..(p + 1) * len]
    }
}

/// Floats per panel: `k` rows of `width`, padded to an even count for paired panels.
fn panel_len(k: usize, width: usize) -> usize {
    k.next_multiple_of(2) * width
}

/// What the store adds: per-column bias, and per-row addend rows, then ReLU.
pub struct Finish<'a> {
    pub bias: &'a [f32],
    /// The addend rows of each of the call's output rows (pointers to the row's column 0,
    /// `null` for none), located once per call; empty where no row has any.
    pub addends: &'a [[*const f32; 2]],
    pub relu: bool,
}

/// Which implementation runs the GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Our micro-kernel on pre-packed panels with the epilogue in its store.
    Avx512,
    /// The `gemm` crate on the block, then the epilogue over the block while it is in cache.
    Portable,
}

impl Kernel {
    /// The kernel for a weight matrix of `columns` outputs, multiplied by `few_rows` (the
    /// classifier's batch) or by a map's pixels. `OCTSERVE_GEMM=avx512` or `=gemm` forces one;
    /// by default our micro-kernel takes narrow outputs (<= 32 columns: the octave branches, the
    /// small nets), where the crate's wider micro-tiles multiply mostly padding, and the
    /// classifier, whose large matrix the crate would re-pack on every call for a few rows; the
    /// crate the rest, where it was faster side by side (BENCHMARKS.md).
    pub fn choose(columns: usize, few_rows: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            return match std::env::var("OCTSERVE_GEMM").as_deref() {
                Ok("avx512") => Kernel::Avx512,
                Ok("gemm") => Kernel::Portable,
                _ if columns <= 32 || few_rows => Kernel::Avx512,
                _ => Kernel::Portable,
            };
        }
        let _ = (columns, few_rows);
        Kernel::Portable
    }
}

/// Where a GEMM's left matrix is.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    /// `rows.len()` rows of `b.k` floats, `lda` apart, the first at `a`.
    Rows { a: *const f32, lda: usize },
    /// Not stored as rows (AVX-512 kernel only): K is `taps.len()` equal segments, segment `t`
    /// of the call's `i`-th output row at `starts[i] + taps[t]`. A stride-1 convolution reads
    /// its input in place this way, one segment per kernel tap.
    Taps {
        starts: &'a [*const f32],
        taps: &'a [usize],
    },
}

/// One call: output rows `rows` and columns `cols` (starting on a multiple of
/// `b.column_align()`) of `C (+)= A x B`, then `finish` when given.
pub struct Gemm<'a> {
    pub a: Lhs<'a>,
    pub rows: Range<usize>,
    pub b: &'a PackedB,
    pub cols: Range<usize>,
    /// The whole output, rows `ldc` apart.
    pub c: *mut f32,
    pub ldc: usize,
    /// Add to C instead of overwriting it.
    pub accumulate: bool,
    pub finish: Option<&'a Finish<'a>>,
}

/// Runs `g` on the kernel its weights were packed for.
///
/// # Safety
/// `g.a`, `g.c` and the addend rows of `g.finish` (`ldc` long) must hold what [`Gemm`] says,
/// and no one else may touch `c[rows, cols]` meanwhile.
pub unsafe fn gemm(g: &Gemm) {
    debug_assert_eq!(g.cols.start % g.b.column_align(), 0);
    match g.b.kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => avx512::gemm(g),
        _ => portable_gemm(g),
    }
}

unsafe fn portable_gemm(g: &Gemm) {
    let (rows, cols, b, c, ldc) = (&g.rows, &g.cols, g.b, g.c, g.ldc);
    let Lhs::Rows { a, lda } = g.a else {
        unreachable!("taps are read on the AVX-512 kernel only (PackedB::takes_taps)")
    };
    gemm::gemm(
        rows.len(),
        cols.len(),
        b.k,
        c.add(rows.start * ldc + cols.start),
        1,
        ldc as isize,
        g.accumulate,
        a,
        1,
        lda as isize,
        b.data.as_ptr().add(cols.start),
        1,
        b.n as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
    let Some(f) = g.finish else { return };
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        return finish_block_avx512(g, f);
    }
    finish_block(g, f);
}

/// The same passes compiled for 16-lane registers: the crate leaves the epilogue to us, and the
/// baseline x86-64 target would run it 4 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn finish_block_avx512(g: &Gemm, f: &Finish) {
    finish_block(g, f);
}

/// `f` over the block of C that `g` has just computed, row by row while it is in cache.
#[inline(always)]
unsafe fn finish_block(g: &Gemm, f: &Finish) {
    let (cols, c, ldc) = (&g.cols, g.c, g.ldc);
    for (i, r) in g.rows.clone().enumerate() {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc + cols.start), cols.len());
        if !f.bias.is_empty() {
            add(row, &f.bias[cols.clone()]);
        }
        for addend in f.addends.get(i).into_iter().flatten() {
            if !addend.is_null() {
                add(
                    row,
                    std::slice::from_raw_parts(addend.add(cols.start), cols.len()),
                );
            }
        }
        if f.relu {
            row.iter_mut().for_each(|v| *v = v.max(0.));
        }
    }
}

#[inline(always)]
fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

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
        // K chunks: whole taps where A is read by taps, plain `KC` steps otherwise.
        let (seg, chunk) = match a {
            Lhs::Taps { taps, .. } => {
                let seg = b.k / taps.len();
                debug_assert!(seg * taps.len() == b.k && b.takes_taps(seg));
                (seg, (KC / seg).max(1) * seg)
            }
            Lhs::Rows { .. } => (b.k, KC),
        };
        for k0 in (0..b.k).step_by(chunk) {
            let kc = chunk.min(b.k - k0);
            let last_chunk = k0 + kc == b.k;
            let rows_from_k0 = [k0];
            // This chunk's segments of A: its taps, or the rows' K steps from `k0` as one.
            let (chunk_taps, chunk_seg) = match a {
                Lhs::Taps { taps, .. } => (&taps[k0 / seg..(k0 + kc) / seg], seg),
                Lhs::Rows { .. } => (&rows_from_k0[..], kc),
            };
            // A group of panel chunks stays in L2 while each row strip, loaded into L1 by the
            // group's first panel, passes over all of them.
            let group = (GROUP_FLOATS / (kc * w)).max(1);
            for first in panels.clone().step_by(group) {
                for r0 in rows.clone().step_by(MR) {
                    let strip = MR.min(rows.end - r0);
                    let mut a_rows = [std::ptr::null(); MR];
                    // The strip's first row, counted from the call's first.
                    let at = r0 - rows.start;
                    match a {
                        Lhs::Rows { a, lda } => {
                            for (i, row) in a_rows[..strip].iter_mut().enumerate() {
                                *row = a.add((at + i) * lda);
                            }
                        }
                        Lhs::Taps { starts, .. } => {
                            a_rows[..strip].copy_from_slice(&starts[at..at + strip])
                        }
                    }
                    for p in first..(first + group).min(panels.end) {
                        let col0 = p * w;
                        let mut store = Store {
                            width: w.min(b.n - col0),
                            load_c: accumulate || k0 > 0,
                            bias: std::ptr::null(),
                            addends: [[std::ptr::null(); 2]; MR],
                            relu: false,
                        };
                        if let (true, Some(f)) = (last_chunk, finish) {
                            store.finish(f, at, strip, col0);
                        }
                        let tile = Tile {
                            taps: chunk_taps,
                            seg: chunk_seg,
                            a: a_rows,
                            b: b.panel_from(p, k0).as_ptr(),
                            c: c.add(r0 * ldc + col0),
                            ldc,
                        };
                        dispatch(strip, w, b.pairs, &tile, &store);
                    }
                }
            }
        }
    }

    /// How one micro-tile is stored.
    struct Store {
        /// Real columns of the panel (the rest is padding, masked off).
        width: usize,
        load_c: bool,
        bias: *const f32,
        addends: [[*const f32; 2]; MR],
        relu: bool,
    }

    impl Store {
        /// Takes the epilogue of the call's rows `first..first + strip`, columns from `col0`.
        unsafe fn finish(&mut self, f: &Finish, first: usize, strip: usize, col0: usize) {
            if !f.bias.is_empty() {
                self.bias = f.bias.as_ptr().add(col0);
            }
            if !f.addends.is_empty() {
                let rows = &mut self.addends[..strip];
                rows.copy_from_slice(&f.addends[first..first + strip]);
                for p in rows.iter_mut().flatten().filter(|p| !p.is_null()) {
                    *p = p.add(col0);
                }
            }
            self.relu = f.relu;
        }
    }

    /// One micro-kernel call's operands: A's rows (starting at `a`) in segments of `seg` steps
    /// at offsets `taps`, times as many steps of the panel chunk `b`, into C at `c` (rows `ldc`
    /// apart).
    #[derive(Clone, Copy)]
    struct Tile<'a> {
        taps: &'a [usize],
        seg: usize,
        a: [*const f32; MR],
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    }

    unsafe fn dispatch(strip: usize, panel_width: usize, pairs: bool, t: &Tile, s: &Store) {
        macro_rules! call {
            ($($rows:literal)*) => {
                match (strip, panel_width, pairs) {
                    $(
                        ($rows, 32, _) => micro::<$rows, 2>(t, s),
                        ($rows, 16, true) => micro_pairs::<$rows, 2>(t, s),
                        ($rows, 8, true) => micro_pairs::<$rows, 1>(t, s),
                        ($rows, _, _) => micro::<$rows, 1>(t, s),
                    )*
                    _ => unreachable!("strips have 1..=MR rows"),
                }
            };
        }
        call!(1 2 3 4 5 6 7 8)
    }

    /// `ROWS x (16 * NV)` of C from `kc` steps of A (broadcast) times the panel (loaded).
    #[target_feature(enable = "avx512f")]
    unsafe fn micro<const ROWS: usize, const NV: usize>(t: &Tile, s: &Store) {
        let Tile {
            taps,
            seg,
            a,
            mut b,
            c,
            ldc,
        } = *t;
        let mut masks = [0u16; NV];
        for (v, m) in masks.iter_mut().enumerate() {
            let real = s.width.saturating_sub(16 * v).min(16);
            *m = ((1u32 << real) - 1) as u16;
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
        if s.load_c {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v));
                }
            }
        }
        for &tap in taps {
            for k in tap..tap + seg {
                let mut bv = [_mm512_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(b.add((k - tap) * 16 * NV + 16 * v));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a[i].add(k));
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_fmadd_ps(av, bv[v], *x);
                    }
                }
            }
            b = b.add(seg * 16 * NV);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                store(*x, masks[v], s, i, 16 * v, c.add(i * ldc + 16 * v));
            }
        }
    }

    /// Stores `y`, columns `col..` of strip row `i` in lanes `m`, at `dst` after the store's
    /// epilogue (bias, the row's addends, ReLU).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(mut y: __m512, m: u16, s: &Store, i: usize, col: usize, dst: *mut f32) {
        if !s.bias.is_null() {
            y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, s.bias.add(col)));
        }
        for addend in s.addends[i] {
            if !addend.is_null() {
                y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, addend.add(col)));
            }
        }
        if s.relu {
            y = _mm512_max_ps(y, _mm512_setzero_ps());
        }
        _mm512_mask_storeu_ps(dst, m, y);
    }

    /// `ROWS x (8 * NV)` of C from paired panels: each 16-lane register holds 8 columns for
    /// two K steps, multiplied by the row's two A values broadcast as one 64-bit pair; the
    /// halves are summed when stored.
    #[target_feature(enable = "avx512f")]
    unsafe fn micro_pairs<const ROWS: usize, const NV: usize>(t: &Tile, s: &Store) {
        let Tile {
            taps,
            seg,
            a,
            mut b,
            c,
            ldc,
        } = *t;
        let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
        // One paired K step `kp`, with `$a(i)` the A register of row `i`.
        macro_rules! step {
            ($kp:expr, $a:expr) => {{
                let mut bv = [_mm512_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(b.add(($kp * NV + v) * 16));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = $a(i);
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_fmadd_ps(av, bv[v], *x);
                    }
                }
            }};
        }
        for &tap in taps {
            for kp in 0..seg / 2 {
                step!(kp, |i: usize| {
                    let pair = a[i].add(tap + 2 * kp).cast::<f64>().read_unaligned();
                    _mm512_castpd_ps(_mm512_set1_pd(pair))
                });
            }
            if seg % 2 == 1 {
                // The last, unpaired step of K (segments are even where there are several):
                // its partner lanes get 0 (the panel's padding row is 0).
                step!(seg / 2, |i: usize| {
                    _mm512_maskz_mov_ps(0x5555, _mm512_set1_ps(*a[i].add(tap + seg - 1)))
                });
            }
            b = b.add(seg / 2 * 16 * NV);
        }
        let even_lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        for (i, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let real = s.width.saturating_sub(8 * v).min(8);
                let m = ((1u32 << real) - 1) as u16;
                let sum = _mm512_add_ps(x, _mm512_permute_ps::<0b1011_0001>(x));
                let mut y = _mm512_permutexvar_ps(even_lanes, sum);
                let dst = c.add(i * ldc + 8 * v);
                if s.load_c {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, dst));
                }
                store(y, m, s, i, 8 * v, dst);
            }
        }
    }
}
