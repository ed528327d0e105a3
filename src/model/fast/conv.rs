//! Convolution as tiled GEMM on NHWC maps, with the weights laid out once at load and the
//! bias, residual add, upsampled low-frequency add and ReLU applied to each output tile while it
//! is still in cache.
//!
//! One call computes `sum_i conv_i(input_i)` for convolutions that produce the same output grid
//! (the octave branches feeding one frequency), so the partial sums never leave the tile.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor};

use super::kernel::{self, tap_segment, Finish, Gemm, Kernel, Lhs, PackedB};
use super::map::{avg_pool2x2, pooled_line, Map};
use super::threads;
use crate::alloc::uncounted;
use crate::model::layers::halved;

/// Patch rows of one tile stay around this many floats (512 KiB), so they are still in L2 when
/// the GEMM reads them.
const TILE_FLOATS: usize = 1 << 17;

/// The most output rows (pixels) of one tile.
pub const MOST_TILE_ROWS: usize = 512;

thread_local! {
    /// Each thread's patch-row buffer, reused across tiles and calls.
    static PATCHES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's addend rows of the block it computes.
    static ADDENDS: RefCell<Vec<[*const f32; 2]>> = const { RefCell::new(Vec::new()) };
    /// Each thread's row starts of the block it reads by taps.
    static STARTS: RefCell<Vec<*const f32>> = const { RefCell::new(Vec::new()) };
}

/// A convolution's weights as the GEMM's right-hand matrix, `[(ky, kx, c_in), c_out]` in
/// the order of the patch rows built from an NHWC map, packed into panels once.
#[derive(Clone, Debug)]
pub struct PackedConv {
    kernel: usize,
    stride: usize,
    padding: usize,
    c_in: usize,
    weights: PackedB,
}

impl PackedConv {
    /// From PyTorch's `[c_out, c_in, k, k]` (f32, ungrouped), for this CPU's kernel.
    pub fn new(weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let c_out = weight.dim(0)?;
        let kernel = Kernel::choose(c_out, false, faster_for_wide);
        Self::for_kernel(weight, stride, padding, kernel)
    }

    /// A classifier's `[classes, features]` weight as a 1x1 convolution over the pooled
    /// `[n, 1, 1, features]` map.
    pub fn linear(weight: &Tensor) -> Result<Self> {
        let classes = weight.dim(0)?;
        let as_conv = weight.unsqueeze(2)?.unsqueeze(3)?;
        let kernel = Kernel::choose(classes, true, faster_for_wide);
        Self::for_kernel(&as_conv, 1, 0, kernel)
    }

    fn for_kernel(weight: &Tensor, stride: usize, padding: usize, gemm: Kernel) -> Result<Self> {
        let (c_out, c_in, kernel, kw) = weight.dims4()?;
        if kernel != kw {
            candle_core::bail!("fast path: square kernels only, got {kernel}x{kw}");
        }
        let weight = weight
            .permute((2, 3, 1, 0))?
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let depth = kernel * kernel * c_in;
        let segment = if kernel > 1 && stride == 1 {
            tap_segment(kernel, c_in)
        } else {
            depth
        };
        Ok(Self {
            kernel,
            stride,
            padding,
            c_in,
            weights: PackedB::new(&weight, depth, c_out, gemm, segment),
        })
    }

    pub fn c_in(&self) -> usize {
        self.c_in
    }

    pub fn c_out(&self) -> usize {
        self.weights.n()
    }

    fn depth(&self) -> usize {
        self.kernel * self.kernel * self.c_in
    }

    fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// A 1x1 stride-1 convolution reads its NHWC input directly as the GEMM's left matrix.
    fn reads_input_directly(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// A larger stride-1 kernel on our micro-kernel reads its taps in place from zero-bordered
    /// copies of the input lines (see [`tap_block`]) instead of building patch rows. Paired
    /// panels need each tap's channels in whole pairs.
    fn reads_taps(&self) -> bool {
        self.kernel > 1
            && self.stride == 1
            && self.weights.takes_taps(tap_segment(self.kernel, self.c_in))
    }

    /// Whether the convolution can read `avg_pool2x2(input)` pooled as it goes
    /// ([`Term::pooled`]): where it reads lines of its input rather than patch rows.
    pub fn reads_pooled(&self) -> bool {
        self.reads_input_directly() || self.reads_taps()
    }

    /// Where each K segment of output pixel 0 starts in a band of input lines `padded_width`
    /// wide: the A offsets of a tap-reading GEMM. A segment is one tap `(ky, kx)` or, where the
    /// kernel takes them as one, the whole kernel row `ky` ([`tap_segment`]).
    fn tap_offsets(&self, padded_width: usize) -> Vec<usize> {
        let (k, c) = (self.kernel, self.c_in);
        let per_row = tap_segment(k, c) / c;
        (0..k * k)
            .step_by(per_row)
            .map(|t| ((t / k) * padded_width + t % k) * c)
            .collect()
    }

    /// Writes the patch rows of output pixels `rows` (flat `n * ho * wo` indices) into `dst`.
    fn patches(&self, x: &Map, rows: Range<usize>, dst: &mut [f32]) {
        let (k, c) = (self.kernel, self.c_in);
        let (ho, wo) = (self.out_len(x.h), self.out_len(x.w));
        let run = k * c;
        for (r, row) in rows.zip(dst.chunks_exact_mut(self.depth())) {
            let (image, oy, ox) = (r / (ho * wo), r / wo % ho, r % wo);
            let x0 = (ox * self.stride) as isize - self.padding as isize;
            for (ky, dst) in row.chunks_exact_mut(run).enumerate() {
                let y = (oy * self.stride + ky) as isize - self.padding as isize;
                if y < 0 || y >= x.h as isize {
                    dst.fill(0.);
                    continue;
                }
                let line = (image * x.h + y as usize) * x.w;
                if x0 >= 0 && x0 as usize + k <= x.w {
                    let start = (line + x0 as usize) * c;
                    dst.copy_from_slice(&x.data[start..start + run]);
                    continue;
                }
                for (kx, tap) in dst.chunks_exact_mut(c).enumerate() {
                    let xx = x0 + kx as isize;
                    if xx < 0 || xx >= x.w as isize {
                        tap.fill(0.);
                    } else {
                        let start = (line + xx as usize) * c;
                        tap.copy_from_slice(&x.data[start..start + c]);
                    }
                }
            }
        }
    }
}

/// Which of our micro-kernel `ours` and the gemm crate runs wide convolutions faster on this
/// CPU, measured once per process on three of ResNet-50's (a 3x3 at 56x56 and at 14x14, a 1x1
/// at 14x14, one image), the back ends alternating, fastest of five each. Which wins depends on
/// the core, not just on its vector width: on Intel's AVX-512 cores the crate's larger register
/// tiles did, on AMD's Zen 4 ours did, taps read in place (BENCHMARKS.md).
fn faster_for_wide(ours: Kernel) -> Kernel {
    static FASTER: OnceLock<Kernel> = OnceLock::new();
    *FASTER.get_or_init(|| {
        // (side, input channels, output channels, kernel)
        let shapes = [(56, 64, 64, 3), (14, 256, 256, 3), (14, 256, 1024, 1)];
        let inputs = shapes.map(|(side, c, _, _)| Map {
            n: 1,
            h: side,
            w: side,
            c,
            data: (0..side * side * c)
                .map(|i| (i % 13) as f32 / 13.)
                .collect(),
        });
        let packed = |kernel: Kernel| {
            shapes.map(|(_, c_in, c_out, k)| {
                let weight = Tensor::full(0.01f32, (c_out, c_in, k, k), &Device::Cpu)
                    .and_then(|w| PackedConv::for_kernel(&w, 1, k / 2, kernel));
                weight.expect("the calibration convolutions are well-formed")
            })
        };
        let time = |convs: &[PackedConv]| {
            let start = Instant::now();
            for (conv, input) in convs.iter().zip(&inputs) {
                conv_sum(&[Term::of(conv, input)], &Epilogue::default());
            }
            start.elapsed()
        };
        let (ours_convs, crate_convs) = (packed(ours), packed(Kernel::Portable));
        let (mut fastest_ours, mut fastest_crate) = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            fastest_ours = fastest_ours.min(time(&ours_convs));
            fastest_crate = fastest_crate.min(time(&crate_convs));
        }
        let faster = if fastest_ours <= fastest_crate {
            ours
        } else {
            Kernel::Portable
        };
        tracing::info!(
            ours = ours.name(),
            ours_ms = fastest_ours.as_secs_f64() * 1e3,
            crate_ms = fastest_crate.as_secs_f64() * 1e3,
            chosen = faster.name(),
            "fast path: GEMM back end for wide convolutions"
        );
        faster
    })
}

/// One summand of [`conv_sum`].
pub struct Term<'a> {
    pub conv: &'a PackedConv,
    pub input: &'a Map,
    /// The convolution reads `avg_pool2x2(input)`, pooled line by line as it reads it (no
    /// pooled map): only where `conv.reads_pooled()`.
    pub pooled: bool,
    /// The channels of `avg_pool2x2(appended)`, read after the input's at every pixel: two
    /// convolutions of one output grid as one over the stacked channels (see [`Term::joint`]).
    pub appended: Option<&'a Map>,
}

impl<'a> Term<'a> {
    /// `conv(input)`.
    pub fn of(conv: &'a PackedConv, input: &'a Map) -> Self {
        Self {
            conv,
            input,
            pooled: false,
            appended: None,
        }
    }

    /// `conv(cat(input, avg_pool2x2(appended)))` over channels, `input` pooled too where
    /// `pooled`: an octave layer's L->L and H->L convolutions as one GEMM with their kernels
    /// stacked, read in one pass over one band of lines. Only where `conv.reads_pooled()`.
    pub fn joint(conv: &'a PackedConv, input: &'a Map, pooled: bool, appended: &'a Map) -> Self {
        assert!(conv.reads_pooled(), "a joint term is read line by line");
        Self {
            conv,
            input,
            pooled,
            appended: Some(appended),
        }
    }

    /// `conv(avg_pool2x2(input))`: pooled as the convolution reads it where it can, otherwise
    /// into `store` first.
    pub fn pooled(conv: &'a PackedConv, input: &'a Map, store: &'a mut Option<Map>) -> Self {
        if conv.reads_pooled() {
            return Self {
                conv,
                input,
                pooled: true,
                appended: None,
            };
        }
        Self::of(conv, store.insert(avg_pool2x2(input)))
    }

    /// Whether the input is read as it is: neither pooled nor stacked with another.
    fn reads_as_is(&self) -> bool {
        !self.pooled && self.appended.is_none()
    }

    /// Whether the GEMM reads the input map itself as A, copying nothing.
    fn reads_in_place(&self) -> bool {
        self.conv.reads_input_directly() && self.reads_as_is()
    }

    /// The height and width the convolution reads.
    fn grid(&self) -> (usize, usize) {
        let (h, w) = (self.input.h, self.input.w);
        if self.pooled {
            (halved(h), halved(w))
        } else {
            (h, w)
        }
    }
}

/// What is applied to each output value after the convolutions, in this order.
#[derive(Default)]
pub struct Epilogue<'a> {
    /// Per output channel; empty for none.
    pub bias: &'a [f32],
    /// A map of the output's shape, added.
    pub residual: Option<&'a Map>,
    /// A map of half the output's size (ceil), added nearest-neighbour upsampled: octave L->H.
    pub upsampled: Option<&'a Map>,
    pub relu: bool,
}

impl Epilogue<'_> {
    /// Fills `dst` with the residual and upsampled rows added to output rows `rows` of an
    /// `ho x wo x c` output; leaves it empty where there are none.
    fn locate_addends(
        &self,
        rows: Range<usize>,
        (ho, wo, c): (usize, usize, usize),
        dst: &mut Vec<[*const f32; 2]>,
    ) {
        dst.clear();
        if self.residual.is_none() && self.upsampled.is_none() {
            return;
        }
        // Filled in place, not pushed: `dst` is thread-local, and a push per row stored its
        // length back through TLS every time. Pointers stepped, not indexed per row.
        dst.resize(rows.len(), [std::ptr::null(); 2]);
        if let Some(residual) = self.residual {
            let mut from = residual.data[rows.start * c..].as_ptr();
            for slot in dst.iter_mut() {
                slot[0] = from;
                from = from.wrapping_add(c);
            }
        }
        if let Some(low) = self.upsampled {
            // Output line by output line: each low pixel is read by two output pixels in a row.
            let (mut image, mut y, mut x) = (
                rows.start / (ho * wo),
                rows.start / wo % ho,
                rows.start % wo,
            );
            let mut rest = &mut dst[..];
            while !rest.is_empty() {
                let (line, later) = rest.split_at_mut((wo - x).min(rest.len()));
                let mut from = low.data[((image * low.h + y / 2) * low.w + x / 2) * c..].as_ptr();
                for slot in line.iter_mut() {
                    slot[1] = from;
                    x += 1;
                    if x % 2 == 0 {
                        from = from.wrapping_add(c);
                    }
                }
                rest = later;
                (x, y) = (0, y + 1);
                if y == ho {
                    (y, image) = (0, image + 1);
                }
            }
        }
    }
}

/// The fewest rows per thread of a GEMM that copies its input and is split by rows.
const MIN_SPLIT_ROWS: usize = 16;

/// A rectangle of the output matrix (`pixels x channels`) computed by one task.
#[derive(Clone, Debug)]
struct Block {
    rows: Range<usize>,
    cols: Range<usize>,
}

/// Splits `m x n` into tiles of about `tile_rows` rows, at least one per thread: by rows while
/// there are enough, otherwise by columns as well (the small late layers at batch 1). Where
/// the GEMM reads copies of its input (a band of lines, patch rows), each task copies its own
/// rows' input, so those split by rows down to [`MIN_SPLIT_ROWS`] per thread: split by
/// columns, every task would copy all of it. Column blocks start on multiples of `align`.
fn blocks(
    m: usize,
    n: usize,
    tile_rows: usize,
    threads: usize,
    align: usize,
    copies_input: bool,
) -> Vec<Block> {
    let mut row_tiles = m.div_ceil(tile_rows).max(1);
    let mut col_tiles = 1;
    if row_tiles >= threads {
        row_tiles = row_tiles.next_multiple_of(threads);
    } else if copies_input && m >= threads * MIN_SPLIT_ROWS {
        row_tiles = threads;
    } else {
        col_tiles = threads.min(n.div_ceil(align)).max(1);
    }
    let rows_per = m.div_ceil(row_tiles).max(1);
    let cols_per = n.div_ceil(col_tiles).next_multiple_of(align);
    let mut out = Vec::with_capacity(row_tiles * col_tiles);
    for r0 in (0..m).step_by(rows_per) {
        for c0 in (0..n).step_by(cols_per) {
            out.push(Block {
                rows: r0..(r0 + rows_per).min(m),
                cols: c0..(c0 + cols_per).min(n),
            });
        }
    }
    out
}

/// The output buffer, written by the tasks in disjoint blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own block of the buffer, which outlives the tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `epilogue(sum of conv(input) over terms)`: all terms must give the same output size.
pub fn conv_sum(terms: &[Term], epilogue: &Epilogue) -> Map {
    let out_grid = |t: &Term| {
        let (h, w) = t.grid();
        (
            t.input.n,
            t.conv.out_len(h),
            t.conv.out_len(w),
            t.conv.c_out(),
        )
    };
    let first = &terms[0];
    let (n, ho, wo, c_out) = out_grid(first);
    for t in terms {
        assert_eq!(
            out_grid(t),
            (n, ho, wo, c_out),
            "octave terms must produce the same output grid"
        );
        let appended = t.appended.map_or(0, |a| {
            assert_eq!((halved(a.h), halved(a.w)), t.grid(), "appended grid");
            a.c
        });
        assert_eq!(t.input.c + appended, t.conv.c_in, "input channels");
        assert!(!t.pooled || t.conv.reads_pooled(), "pooled on read");
    }
    let m = n * ho * wo;
    let mut data: Vec<f32> = Vec::with_capacity(m * c_out);
    let depth = terms.iter().map(|t| t.conv.depth()).max().unwrap_or(1);
    let tile_rows = (TILE_FLOATS / depth).clamp(32, MOST_TILE_ROWS);
    let align = first.conv.weights.column_align();
    let dst = OutPtr(data.as_mut_ptr());
    // Patch rows and the GEMM's packing are per-thread scratch bounded by the tile, whatever
    // the batch, and a thread waiting here may run other callers' work: none of it is part of
    // the feature maps this pass holds (see `crate::alloc`).
    uncounted(|| {
        let copies_input = terms.iter().any(|t| !t.reads_in_place());
        let blocks = blocks(
            m,
            c_out,
            tile_rows,
            threads::available(),
            align,
            copies_input,
        );
        threads::for_each_task(blocks, |block| {
            ADDENDS.with_borrow_mut(|addends| {
                epilogue.locate_addends(block.rows.clone(), (ho, wo, c_out), addends);
                let finish = Finish {
                    bias: epilogue.bias,
                    addends,
                    relu: epilogue.relu,
                };
                for (i, term) in terms.iter().enumerate() {
                    let last = i + 1 == terms.len();
                    gemm_block(term, &block, dst, c_out, i > 0, last.then_some(&finish));
                }
            })
        })
    });
    // SAFETY: the blocks cover the output once and each one's first term stores every value
    // without reading it, so no value is read before it is written and all are written.
    unsafe { data.set_len(m * c_out) };
    Map {
        n,
        h: ho,
        w: wo,
        c: c_out,
        data,
    }
}

/// `dst[block] (+)= patches(term.input)[rows] x weight[.., cols]`, then `finish`.
fn gemm_block(
    term: &Term,
    block: &Block,
    dst: OutPtr,
    ld_dst: usize,
    accumulate: bool,
    finish: Option<&Finish>,
) {
    let conv = term.conv;
    let depth = conv.depth();
    let run = |a: Lhs| {
        // SAFETY: `a` holds the block's rows of A as `Lhs` says, the output buffer holds
        // `m x ld_dst`, residual and upsampled rows are `ld_dst` long (checked shapes), and the
        // tasks' blocks are disjoint.
        unsafe {
            kernel::gemm(&Gemm {
                a,
                rows: block.rows.clone(),
                b: &conv.weights,
                cols: block.cols.clone(),
                c: dst.0,
                ldc: ld_dst,
                accumulate,
                finish,
            })
        }
    };
    if term.reads_in_place() {
        let a = term.input.data[block.rows.start * depth..].as_ptr();
        return run(Lhs::Rows {
            a,
            lda: depth,
            in_map: true,
        });
    }
    PATCHES.with_borrow_mut(|scratch| {
        if conv.reads_taps() || !term.reads_as_is() {
            return tap_block(term, block.rows.clone(), scratch, run);
        }
        let len = block.rows.len() * depth;
        if scratch.len() < len {
            scratch.resize(len, 0.);
        }
        conv.patches(term.input, block.rows.clone(), &mut scratch[..len]);
        run(Lhs::Rows {
            a: scratch.as_ptr(),
            lda: depth,
            in_map: false,
        });
    });
}

/// Line `y` of image `image` of what `term`'s convolution reads, into `dst`: the input's line
/// (pooled if the term pools), with the pooled appended map's channels after each pixel's.
fn read_line(term: &Term, image: usize, y: usize, dst: &mut [f32]) {
    let x = term.input;
    let stride = x.c + term.appended.map_or(0, |a| a.c);
    let start = (image * x.h + y) * x.w * x.c;
    if term.pooled {
        pooled_line(x, image, y, dst, stride);
    } else if stride == x.c {
        dst.copy_from_slice(&x.data[start..start + dst.len()]);
    } else {
        let line = x.data[start..].chunks_exact(x.c);
        for (pixel, src) in dst.chunks_exact_mut(stride).zip(line) {
            pixel[..x.c].copy_from_slice(src);
        }
    }
    if let Some(appended) = term.appended {
        pooled_line(appended, image, y, &mut dst[x.c..], stride);
    }
}

/// Output rows `rows` of a stride-1 convolution without patch rows: the input lines they read
/// are copied once (pooled or stacked as the term reads them), with zero borders, into `band`,
/// where tap `(ky, kx)` of every output pixel is the same step from the pixel's start; `run`
/// multiplies them in place. One copy of the input instead of `k * k`. A 1x1 convolution's band is plain
/// rows, which either back end reads.
fn tap_block(term: &Term, rows: Range<usize>, band: &mut Vec<f32>, run: impl Fn(Lhs)) {
    let conv = term.conv;
    let (h, w) = term.grid();
    let (k, pad, c) = (conv.kernel, conv.padding, conv.c_in);
    let (ho, wo) = (conv.out_len(h), conv.out_len(w));
    let line_len = (w + 2 * pad) * c;
    // The block's output lines image by image (the first image from the block's first line,
    // the last to its last line), each image's with the `k - 1` input lines they overlap.
    let (first, last) = (rows.start, rows.end - 1);
    let (first_image, first_line) = (first / (ho * wo), first / wo % ho);
    let (last_image, last_line) = (last / (ho * wo), last / wo % ho);
    let lines = |image: usize| {
        let from = if image == first_image { first_line } else { 0 };
        let to = if image == last_image {
            last_line + 1
        } else {
            ho
        };
        from..to
    };
    // Where an image's lines start in the band: after the first image's, whole images.
    let band_start = |image: usize| match image - first_image {
        0 => 0,
        later => (lines(first_image).len() + (later - 1) * ho + later * (k - 1)) * line_len,
    };
    let len = band_start(last_image + 1);
    if band.len() < len {
        band.resize(len, 0.);
    }
    for image in first_image..=last_image {
        let (lines, start) = (lines(image), band_start(image));
        let band_lines =
            band[start..start + (lines.len() + k - 1) * line_len].chunks_exact_mut(line_len);
        for (dst, y) in band_lines.zip(lines.start as isize - pad as isize..) {
            if y < 0 || y >= h as isize {
                dst.fill(0.);
                continue;
            }
            let (border, inner) = (pad * c, w * c);
            read_line(term, image, y as usize, &mut dst[border..border + inner]);
            dst[..border].fill(0.);
            dst[border + inner..].fill(0.);
        }
    }
    let band = &band[..];
    if k == 1 {
        let skipped = (rows.start % wo) * c;
        return run(Lhs::Rows {
            a: band[skipped..].as_ptr(),
            lda: c,
            in_map: false,
        });
    }
    STARTS.with_borrow_mut(|starts| {
        starts.clear();
        starts.resize(rows.len(), std::ptr::null());
        let (mut image, mut oy, mut ox) = (first_image, first_line, first % wo);
        let mut line = (oy - lines(image).start) * line_len;
        // Output line by output line: within one, the starts are `c` apart.
        let mut rest = &mut starts[..];
        while !rest.is_empty() {
            let (this_line, later) = rest.split_at_mut((wo - ox).min(rest.len()));
            kernel::fill_strided(this_line, band[line + ox * c..].as_ptr(), c);
            rest = later;
            (ox, oy) = (0, oy + 1);
            line += line_len;
            if oy == ho {
                (oy, image) = (0, image + 1);
                line = band_start(image);
            }
        }
        let taps = conv.tap_offsets(w + 2 * pad);
        run(Lhs::Taps {
            starts,
            taps: &taps,
        });
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    fn map(n: usize, h: usize, w: usize, c: usize, seed: usize) -> Map {
        Map {
            n,
            h,
            w,
            c,
            data: values(n * h * w * c, seed),
        }
    }

    /// Every GEMM back end this CPU has.
    fn kernels() -> &'static [Kernel] {
        Kernel::available()
    }

    /// Direct convolution from PyTorch-layout weights, the definition itself.
    fn naive(x: &Map, weight: &[f32], c_out: usize, k: usize, stride: usize, pad: usize) -> Map {
        let out_len = |len: usize| (len + 2 * pad - k) / stride + 1;
        let mut out = Map::zeros(x.n, out_len(x.h), out_len(x.w), c_out);
        for image in 0..x.n {
            for oy in 0..out.h {
                for ox in 0..out.w {
                    for co in 0..c_out {
                        let mut sum = 0.0;
                        for ci in 0..x.c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let y = (oy * stride + ky) as isize - pad as isize;
                                    let xx = (ox * stride + kx) as isize - pad as isize;
                                    if y < 0 || xx < 0 || y >= x.h as isize || xx >= x.w as isize {
                                        continue;
                                    }
                                    let v = x.pixel(image, y as usize, xx as usize)[ci];
                                    sum += v * weight[((co * x.c + ci) * k + ky) * k + kx];
                                }
                            }
                        }
                        out.data[((image * out.h + oy) * out.w + ox) * c_out + co] = sum;
                    }
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn packed(
        weight: &[f32],
        c_out: usize,
        c_in: usize,
        k: usize,
        s: usize,
        p: usize,
        gemm: Kernel,
    ) -> PackedConv {
        let t = Tensor::from_vec(weight.to_vec(), (c_out, c_in, k, k), &Device::Cpu).unwrap();
        PackedConv::for_kernel(&t, s, p, gemm).unwrap()
    }

    /// Two terms (3x3 and 1x1), bias, residual, upsampled addend and ReLU, on shapes with row
    /// and column tails, through every kernel this CPU has: equal to the direct definition.
    /// Odd and even 3x3 input channels: patch rows or taps read in place (stride 1, micro-kernels;
    /// odd channels on unpaired panels), on plain and paired panels.
    #[test]
    fn conv_sum_matches_the_direct_convolution() {
        let shapes = [(37, 1), (10, 1), (64, 2), (16, 1), (8, 2), (8, 1), (5, 1)];
        let channels = [(5, 3), (6, 3), (8, 4)];
        for (&(c_out, stride), (c_a, c_b)) in shapes
            .iter()
            .flat_map(|s| channels.iter().map(move |&c| (s, c)))
        {
            let (n, h, w) = (2, 9, 7);
            let (a, b) = (map(n, h, w, c_a, 1), map(n, h, w, c_b, 2));
            let (wa, wb) = (values(c_out * c_a * 9, 3), values(c_out * c_b, 4));
            let (ya, yb) = (
                naive(&a, &wa, c_out, 3, stride, 1),
                naive(&b, &wb, c_out, 1, stride, 0),
            );
            let (ho, wo) = (ya.h, ya.w);
            let bias = values(c_out, 5);
            let residual = map(n, ho, wo, c_out, 6);
            let low = map(n, ho.div_ceil(2), wo.div_ceil(2), c_out, 7);
            let epilogue = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                upsampled: Some(&low),
                relu: true,
            };
            for &kernel in kernels() {
                let pa = packed(&wa, c_out, c_a, 3, stride, 1, kernel);
                let pb = packed(&wb, c_out, c_b, 1, stride, 0, kernel);
                let terms = [Term::of(&pa, &a), Term::of(&pb, &b)];
                let out = conv_sum(&terms, &epilogue);
                assert_eq!((out.n, out.h, out.w, out.c), (n, ho, wo, c_out));
                for (i, &got) in out.data.iter().enumerate() {
                    let (r, co) = (i / c_out, i % c_out);
                    let (image, y, x) = (r / (ho * wo), r / wo % ho, r % wo);
                    let up = low.pixel(image, y / 2, x / 2)[co];
                    let want = (ya.data[i] + yb.data[i] + bias[co] + residual.data[i] + up).max(0.);
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{kernel:?} {c_a}->{c_out} s{stride} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Taps read in place give the direct convolution on blocks that start and end inside a
    /// line and span images, on every micro-kernel, for plain and paired panels.
    #[test]
    fn tap_reads_match_the_direct_convolution_on_any_block() {
        let (n, h, w, c_in) = (3, 6, 5, 4);
        let x = map(n, h, w, c_in, 1);
        let micro_kernels = kernels().iter().filter(|&&k| k != Kernel::Portable);
        for (&kernel, c_out) in micro_kernels.flat_map(|k| [(k, 8), (k, 16), (k, 24)]) {
            let weight = values(c_out * c_in * 9, 2);
            let conv = packed(&weight, c_out, c_in, 3, 1, 1, kernel);
            assert!(conv.reads_taps());
            let want = naive(&x, &weight, c_out, 3, 1, 1);
            let mut out = vec![f32::NAN; n * h * w * c_out];
            let term = Term::of(&conv, &x);
            for rows in [0..3, 3..17, 17..61, 61..90] {
                let block = Block {
                    rows,
                    cols: 0..c_out,
                };
                gemm_block(&term, &block, OutPtr(out.as_mut_ptr()), c_out, false, None);
            }
            for (i, (got, want)) in out.iter().zip(&want.data).enumerate() {
                assert!(
                    (got - want).abs() < 1e-4,
                    "{kernel:?} {c_out} [{i}]: {got} vs {want}"
                );
            }
        }
    }

    /// A pooled term (pooled as it is read) equals the same convolution of the pooled map, on
    /// odd sizes, for 3x3 taps and 1x1 rows, through every kernel this CPU has.
    #[test]
    fn pooled_terms_equal_convolving_the_pooled_map() {
        let x = map(3, 9, 7, 6, 1);
        let pooled = avg_pool2x2(&x);
        for &kernel in kernels() {
            for (k, pad, c_out) in [(3, 1, 8), (3, 1, 40), (1, 0, 8), (1, 0, 40)] {
                let weight = values(c_out * 6 * k * k, 2);
                let conv = packed(&weight, c_out, 6, k, 1, pad, kernel);
                let mut store = None;
                let term = Term::pooled(&conv, &x, &mut store);
                let on_read = term.pooled;
                let got = conv_sum(&[term], &Epilogue::default());
                // Pooled on read where the conv reads lines (taps, 1x1), else pooled first.
                assert_eq!(on_read, conv.reads_pooled());
                assert_eq!(on_read, store.is_none());
                let want = naive(&pooled, &weight, c_out, k, 1, pad);
                assert_eq!((got.n, got.h, got.w, got.c), (3, 5, 4, c_out));
                for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{kernel:?} {k}x{k}->{c_out} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// A joint term (two inputs' channels stacked, the second pooled on read, the first as is
    /// or pooled) equals the sum of the two convolutions it stacks: an octave layer's L->L and
    /// H->L at stride 1 and 2, with odd high sizes and unequal channel counts.
    #[test]
    fn joint_terms_equal_the_sum_of_the_stacked_convolutions() {
        let (c_low, c_high) = (6, 4);
        let high = map(2, 9, 7, c_high, 3);
        for (pooled, low) in [
            (false, map(2, 5, 4, c_low, 1)),
            (true, map(2, 10, 8, c_low, 1)),
        ] {
            let low_read = if pooled {
                avg_pool2x2(&low)
            } else {
                low.clone()
            };
            for &kernel in kernels() {
                for (k, pad, c_out) in [(3, 1, 8), (3, 1, 40), (1, 0, 8), (1, 0, 40)] {
                    let (w_low, w_high) = (
                        values(c_out * c_low * k * k, 2),
                        values(c_out * c_high * k * k, 5),
                    );
                    let per_out = |w: &[f32], c: usize| {
                        w.chunks(c * k * k).map(<[f32]>::to_vec).collect::<Vec<_>>()
                    };
                    let stacked: Vec<f32> = per_out(&w_low, c_low)
                        .into_iter()
                        .zip(per_out(&w_high, c_high))
                        .flat_map(|(a, b)| [a, b].concat())
                        .collect();
                    let conv = packed(&stacked, c_out, c_low + c_high, k, 1, pad, kernel);
                    if !conv.reads_pooled() {
                        continue; // joint terms are built only where the conv reads lines
                    }
                    let got = conv_sum(
                        &[Term::joint(&conv, &low, pooled, &high)],
                        &Epilogue::default(),
                    );
                    let want_low = naive(&low_read, &w_low, c_out, k, 1, pad);
                    let want_high = naive(&avg_pool2x2(&high), &w_high, c_out, k, 1, pad);
                    assert_eq!((got.n, got.h, got.w, got.c), (2, 5, 4, c_out));
                    for (i, g) in got.data.iter().enumerate() {
                        let w = want_low.data[i] + want_high.data[i];
                        assert!(
                            (g - w).abs() < 1e-4,
                            "{kernel:?} pooled {pooled} {k}x{k}->{c_out} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_cover_the_matrix_once_and_split_by_columns_only_where_rows_are_few() {
        let cases = [(3136, 64, 455, 2), (49, 512, 56, 2), (10, 10, 512, 2)];
        for (&(m, n, tile, threads), copies_input) in
            cases.iter().flat_map(|c| [(c, false), (c, true)])
        {
            let bs = blocks(m, n, tile, threads, 32, copies_input);
            let mut seen = vec![0u8; m * n];
            for b in &bs {
                assert_eq!(b.cols.start % 32, 0);
                for r in b.rows.clone() {
                    for c in b.cols.clone() {
                        seen[r * n + c] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{m}x{n}");
            assert!(bs.len() >= threads.min(n.div_ceil(32)), "{m}x{n}: {bs:?}");
            // Whole rows per task where there are enough rows (the 7x7 map is enough for a
            // GEMM that copies its input) or one column block.
            let by_rows = bs.iter().all(|b| b.cols == (0..n));
            let enough = m > tile || (copies_input && m >= threads * MIN_SPLIT_ROWS);
            assert_eq!(by_rows, enough || n <= 32, "{m}x{n}: {bs:?}");
        }
    }
}
