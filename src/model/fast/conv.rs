//! Convolution as tiled GEMM on NHWC maps, with the weights laid out once at load and the
//! bias, residual add, upsampled low-frequency add and ReLU applied to each output tile while it
//! is still in cache.
//!
//! One call computes `sum_i conv_i(input_i)` for convolutions that produce the same output grid
//! (the octave branches feeding one frequency), so the partial sums never leave the tile.

use std::cell::RefCell;
use std::ops::Range;

use super::band::tap_block;
use super::kernel::{self, Finish, Gemm, Kernel, Lhs};
use super::map::Map;
use super::term::Term;
use super::threads;
use super::tiles::{blocks, Block};
use crate::alloc::uncounted;
use crate::model::grid::halved;

/// On our micro-kernels the patch rows of one tile stay around this many floats (512 KiB), so
/// they are still in L2 when the GEMM reads them.
const TILE_FLOATS: usize = 1 << 17;

/// The most output rows (pixels) of one tile.
pub const MOST_TILE_ROWS: usize = 512;

/// The fewest output rows of a tile on the `gemm` crate's path. The crate packs the weights
/// again on every call, so a deep layer's tile of ~32 rows (what [`TILE_FLOATS`] allows)
/// spends as long packing its weights as multiplying by them; the crate packs its
/// left-hand rows into cache-sized blocks itself, so the patch rows need not fit L2.
const CRATE_TILE_ROWS: usize = 256;

thread_local! {
    /// Each thread's patch-row buffer, reused across tiles and calls.
    static PATCHES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's addend rows of the block it computes.
    static ADDENDS: RefCell<Vec<[*const f32; 2]>> = const { RefCell::new(Vec::new()) };
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
    /// Panics unless the bias and the addend maps fit an `n x ho x wo x c` output: the GEMMs'
    /// stores read them by pointer.
    fn assert_fits(&self, (n, ho, wo, c): (usize, usize, usize, usize)) {
        assert!(
            self.bias.is_empty() || self.bias.len() == c,
            "one bias per output channel"
        );
        if let Some(residual) = self.residual {
            residual.assert_whole();
            assert_eq!(
                (residual.n, residual.h, residual.w, residual.c),
                (n, ho, wo, c),
                "residual shape"
            );
        }
        if let Some(low) = self.upsampled {
            low.assert_whole();
            assert_eq!(
                (low.n, low.h, low.w, low.c),
                (n, halved(ho), halved(wo), c),
                "upsampled shape"
            );
        }
    }

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

/// The output buffer, written by the tasks in disjoint blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own block of the buffer, which outlives the tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `epilogue(sum of conv(input) over terms)`: all terms must give the same output size.
///
/// The GEMMs read the maps and write the output through raw pointers, so every shape and length
/// they rely on is checked here first; a mismatch panics instead of reading out of bounds.
pub(super) fn conv_sum(terms: &[Term], epilogue: &Epilogue) -> Map {
    let out_grid = |t: &Term| {
        let (h, w) = t.grid();
        (
            t.input.n,
            t.conv.out_len(h),
            t.conv.out_len(w),
            t.conv.c_out(),
        )
    };
    let first = terms
        .first()
        .expect("a convolution sum has at least one term");
    let (n, ho, wo, c_out) = out_grid(first);
    let align = terms
        .iter()
        .map(|t| t.conv.weights.column_align())
        .max()
        .unwrap_or(1);
    for t in terms {
        t.input.assert_whole();
        assert_eq!(
            out_grid(t),
            (n, ho, wo, c_out),
            "octave terms must produce the same output grid"
        );
        let appended = t.appended.map_or(0, |a| {
            a.assert_whole();
            assert_eq!(a.n, t.input.n, "appended images");
            assert_eq!((halved(a.h), halved(a.w)), t.grid(), "appended grid");
            a.c
        });
        assert_eq!(t.input.c + appended, t.conv.c_in, "input channels");
        assert!(!t.pooled || t.conv.reads_pooled(), "pooled on read");
        assert_eq!(align % t.conv.weights.column_align(), 0, "column blocks");
    }
    epilogue.assert_fits((n, ho, wo, c_out));
    let m = n * ho * wo;
    let mut data: Vec<f32> = Vec::with_capacity(m * c_out);
    let depth = terms.iter().map(|t| t.conv.depth()).max().unwrap_or(1);
    let on_crate = terms
        .iter()
        .any(|t| t.conv.weights.kernel() == Kernel::Portable);
    let fewest_rows = if on_crate { CRATE_TILE_ROWS } else { 32 };
    let tile_rows = (TILE_FLOATS / depth).clamp(fewest_rows, MOST_TILE_ROWS);
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::fast::map::avg_pool2x2;
    use crate::model::fast::packed::PackedConv;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    fn map(n: usize, h: usize, w: usize, c: usize, seed: usize) -> Map {
        Map::from_nhwc(values(n * h * w * c, seed), n, h, w, c)
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
        PackedConv::new(&t, s, p, gemm).unwrap()
    }

    /// Two terms (3x3 and 1x1), bias, residual, upsampled addend and ReLU, on shapes with row
    /// and column tails, through every kernel this CPU has: equal to the direct definition.
    /// Odd and even 3x3 input channels: patch rows (the `gemm` crate) or taps read in place
    /// (micro-kernels; odd channels on unpaired panels), on plain and paired panels.
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

    /// The GEMMs read the addends, bias and inputs by pointer: `conv_sum` refuses any whose
    /// shape or length does not fit the output, with a message, before anything is read.
    #[test]
    fn conv_sum_refuses_addends_and_maps_that_do_not_fit() {
        let x = map(2, 6, 5, 4, 1);
        let conv = packed(&values(8 * 4 * 9, 2), 8, 4, 3, 1, 1, kernels()[0]);
        let (fits, bias) = (map(2, 6, 5, 8, 3), values(8, 4));
        let (low, short_bias) = (map(2, 3, 3, 8, 5), values(7, 4));
        let (wrong_residual, wrong_low) = (map(2, 6, 4, 8, 3), map(2, 3, 2, 8, 5));
        let mut truncated = x.clone();
        truncated.data.pop();
        let refusal = |input: &Map, epilogue: Epilogue| {
            let run = || conv_sum(&[Term::of(&conv, input)], &epilogue);
            let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .expect_err("conv_sum must refuse");
            match panic.downcast::<String>() {
                Ok(message) => *message,
                Err(panic) => panic.downcast_ref::<&str>().unwrap_or(&"").to_string(),
            }
        };
        let fitting = Epilogue {
            bias: &bias,
            residual: Some(&fits),
            upsampled: Some(&low),
            relu: true,
        };
        assert_eq!(
            conv_sum(&[Term::of(&conv, &x)], &fitting).data.len(),
            2 * 30 * 8
        );
        let cases = [
            (
                &x,
                Epilogue {
                    residual: Some(&wrong_residual),
                    ..Epilogue::default()
                },
                "residual shape",
            ),
            (
                &x,
                Epilogue {
                    upsampled: Some(&wrong_low),
                    ..Epilogue::default()
                },
                "upsampled shape",
            ),
            (
                &x,
                Epilogue {
                    bias: &short_bias,
                    ..Epilogue::default()
                },
                "one bias per output channel",
            ),
            (&truncated, Epilogue::default(), "feature map length"),
        ];
        for (input, epilogue, message) in cases {
            let got = refusal(input, epilogue);
            assert!(got.contains(message), "{message}: {got}");
        }
    }

    /// Taps read in place give the direct convolution on blocks that start and end inside a
    /// line and span images, on every micro-kernel, for plain and paired panels, at stride 1
    /// and 2 (a 3x3, and a 7x7 stem on 3 channels: odd segments on unpaired panels).
    #[test]
    fn tap_reads_match_the_direct_convolution_on_any_block() {
        let micro_kernels = kernels().iter().filter(|&&k| k != Kernel::Portable);
        let cases = [
            (3, 1, 1, 4, (6, 5)),
            (3, 2, 1, 4, (9, 7)),
            (7, 2, 3, 3, (11, 10)),
        ];
        for (&kernel, (k, stride, pad, c_in, (h, w)), c_out) in micro_kernels.flat_map(|kernel| {
            cases
                .iter()
                .flat_map(move |&case| [8, 16, 24, 40].map(|c_out| (kernel, case, c_out)))
        }) {
            let n = 3;
            let x = map(n, h, w, c_in, 1);
            let weight = values(c_out * c_in * k * k, 2);
            let conv = packed(&weight, c_out, c_in, k, stride, pad, kernel);
            assert!(conv.reads_taps());
            let want = naive(&x, &weight, c_out, k, stride, pad);
            let m = n * want.h * want.w;
            let mut out = vec![f32::NAN; m * c_out];
            let term = Term::of(&conv, &x);
            for rows in [
                0..3,
                3..m / 3 + 2,
                m / 3 + 2..2 * m / 3 + 1,
                2 * m / 3 + 1..m,
            ] {
                let block = Block {
                    rows,
                    cols: 0..c_out,
                };
                gemm_block(&term, &block, OutPtr(out.as_mut_ptr()), c_out, false, None);
            }
            for (i, (got, want)) in out.iter().zip(&want.data).enumerate() {
                assert!(
                    (got - want).abs() < 1e-4,
                    "{kernel:?} {k}x{k} s{stride} {c_in}->{c_out} [{i}]: {got} vs {want}"
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
}
