//! The GEMM at the heart of every convolution: `C (+)= A x B` with B pre-packed at load time
//! and the convolution's epilogue (bias, addends, ReLU) applied as the result is stored.
//!
//! On CPUs with AVX-512F or AVX2 and FMA a register-blocked micro-kernel ([`avx512`], [`avx2`])
//! computes `MR` rows x one panel of 8 to 32 columns; A is read in place (a map, a tile of patch
//! rows or a band of lines read by taps), K is cut into `KC`-deep chunks so the panel chunk stays
//! in L1 while every row strip of the tile passes over it ([`tiled`]). Elsewhere the packed
//! weights go through the `gemm` crate and the epilogue runs after.

use std::ops::Range;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod lines;
#[cfg(target_arch = "x86_64")]
mod tiled;

use lines::Lines;

/// Depth of one K chunk of our micro-kernels: a row strip's chunk is 8 KiB of L1.
const KC: usize = 256;

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
    data: Lines,
}

impl PackedB {
    /// From row-major `[k, n]`, for a GEMM that reads A in segments of `segment` K steps
    /// (`k` for plain rows, see [`Lhs::Taps`]). For the AVX-512 kernel, panels are 32 wide,
    /// or for narrow outputs (<= 16 columns) 8 or 16 wide with rows paired, so that one
    /// 16-lane register holds two steps of K and little of the work multiplies padding. For
    /// the AVX2 kernel, 16 wide (two registers), or for outputs of up to 8 columns 8 wide with
    /// rows paired (two registers of 4 columns x 2 steps). Pairs must not straddle segments,
    /// so odd segments (a kernel row of a 1- or 3-channel input) get unpaired panels of 16.
    /// The `gemm` crate packs for itself and takes one panel as wide as the matrix.
    pub fn new(weights: &[f32], k: usize, n: usize, kernel: Kernel, segment: usize) -> Self {
        assert_eq!(weights.len(), k * n);
        let pairs_fit = segment.is_multiple_of(2) || segment == k;
        let (width, pairs) = match kernel {
            Kernel::Avx512 if n <= 8 && pairs_fit => (8, true),
            Kernel::Avx512 if n <= 16 => (16, pairs_fit),
            Kernel::Avx512 => (32, false),
            Kernel::Avx2 if n <= 8 && pairs_fit => (8, true),
            Kernel::Avx2 => (16, false),
            Kernel::Portable => (n, false),
        };
        let panel_len = panel_len(k, width);
        let mut data = Lines::zeros(n.div_ceil(width) * panel_len);
        let floats = data.floats_mut();
        for (row, weights) in weights.chunks_exact(n).enumerate() {
            for (col, &w) in weights.iter().enumerate() {
                let (panel, j) = (col / width, col % width);
                let at = if pairs {
                    (row / 2) * 2 * width + (j / 8) * 16 + 2 * (j % 8) + row % 2
                } else {
                    row * width + j
                };
                floats[panel * panel_len + at] = w;
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

    /// The back end these panels were packed for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Whether a GEMM on these panels can read A by taps of `segment` steps ([`Lhs::Taps`]):
    /// on our micro-kernels, in whole pairs where the rows are paired.
    pub fn takes_taps(&self, segment: usize) -> bool {
        self.kernel != Kernel::Portable && (segment.is_multiple_of(2) || !self.pairs)
    }

    /// Column blocks handed to different threads start on multiples of this.
    pub fn column_align(&self) -> usize {
        match self.kernel {
            Kernel::Portable => 16,
            _ => self.width,
        }
    }

    /// Panel `p` from K step `k0` (even when the rows are paired).
    fn panel_from(&self, p: usize, k0: usize) -> &[f32] {
        let len = panel_len(self.k, self.width);
        &self.data.floats()[p * len + k0 * self.width..(p + 1) * len]
    }
}

/// K steps per segment of a convolution read by taps (`k x k` taps of `c` input channels, see
/// [`Lhs::Taps`]): a kernel row's `k` taps lie next to each other in a line of the input, so
/// where they fit in one K chunk they are one segment. Fewer, longer inner loops for the
/// narrow octave layers, whose taps are 8 or 16 steps.
pub fn tap_segment(k: usize, c: usize) -> usize {
    if k * c <= KC {
        k * c
    } else {
        c
    }
}

/// Floats per panel: `k` rows of `width`, padded to an even count for paired panels.
fn panel_len(k: usize, width: usize) -> usize {
    k.next_multiple_of(2) * width
}

/// Fills `slots` with pointers from `first`, `step` floats apart: by adding, which LLVM does
/// not turn into emulated 64-bit vector multiplies as it did `first + i * step` (once per
/// strip or output row, a few percent of the octave nets).
pub fn fill_strided(slots: &mut [*const f32], first: *const f32, step: usize) {
    let mut at = first;
    for slot in slots {
        *slot = at;
        at = at.wrapping_add(step);
    }
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
    /// Our micro-kernel for 16-lane registers on pre-packed panels, with the epilogue in its
    /// store.
    Avx512,
    /// The same for 8-lane registers (AVX2 and FMA).
    Avx2,
    /// The `gemm` crate on the block, then the epilogue over the block while it is in cache.
    Portable,
}

impl Kernel {
    /// The back ends this CPU runs, best first; the `gemm` crate runs everywhere.
    pub fn available() -> &'static [Kernel] {
        static AVAILABLE: OnceLock<Vec<Kernel>> = OnceLock::new();
        AVAILABLE.get_or_init(|| {
            let mut kernels = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    kernels.push(Kernel::Avx512);
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    kernels.push(Kernel::Avx2);
                }
            }
            kernels.push(Kernel::Portable);
            kernels
        })
    }

    /// The name `OCTSERVE_GEMM` forces it by.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "gemm",
        }
    }

    /// The kernel for a weight matrix of `columns` outputs, multiplied by `few_rows` (the
    /// classifier's batch) or by a map's pixels. `OCTSERVE_GEMM=avx512`, `=avx2` or `=gemm`
    /// forces one this CPU has. By default our micro-kernel takes narrow outputs (<= 32
    /// columns: its paired panels have no match in the crate) and the classifier (pre-packed,
    /// where the crate packs 8 MB per call); for wide outputs over many rows, `wide(ours)` says
    /// which of ours and the crate's runs faster on this CPU.
    pub fn choose(columns: usize, few_rows: bool, wide: impl FnOnce(Kernel) -> Kernel) -> Self {
        let available = Self::available();
        let forced = std::env::var("OCTSERVE_GEMM").ok();
        if let Some(kernel) = available
            .iter()
            .find(|k| Some(k.name()) == forced.as_deref())
        {
            return *kernel;
        }
        match available[0] {
            Kernel::Portable => Kernel::Portable,
            ours if columns > 32 && !few_rows => wide(ours),
            ours => ours,
        }
    }
}

/// Where a GEMM's left matrix is.
#[derive(Clone, Copy)]
pub enum Lhs<'a> {
    /// `rows.len()` rows of `b.k` floats, `lda` apart, the first at `a`; `in_map` where they
    /// are a feature map's pixels (read from memory, so our kernels prefetch them), not rows
    /// just built in cache.
    Rows {
        a: *const f32,
        lda: usize,
        in_map: bool,
    },
    /// Not stored as rows (our micro-kernels only): K is `taps.len()` equal segments, segment `t`
    /// of the call's `i`-th output row at `starts[i] + taps[t]`. A convolution of any stride
    /// reads its input in place this way, one segment per kernel tap or per kernel row.
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
        Kernel::Portable => portable_gemm(g),
        #[cfg(target_arch = "x86_64")]
        _ => tiled::gemm(g),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("micro-kernels are built for x86-64 only"),
    }
}

unsafe fn portable_gemm(g: &Gemm) {
    let (rows, cols, b, c, ldc) = (&g.rows, &g.cols, g.b, g.c, g.ldc);
    let Lhs::Rows { a, lda, .. } = g.a else {
        unreachable!("taps are read on our micro-kernels only (PackedB::takes_taps)")
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
        b.data.floats().as_ptr().add(cols.start),
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
    match Kernel::available()[0] {
        Kernel::Avx512 => return finish_block_avx512(g, f),
        Kernel::Avx2 => return finish_block_avx2(g, f),
        Kernel::Portable => {}
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

/// And for 8-lane registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn finish_block_avx2(g: &Gemm, f: &Finish) {
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
