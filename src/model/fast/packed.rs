//! A convolution's weights laid out once, at load, as the GEMM's right-hand matrix, and the
//! patch rows it multiplies where it does not read its input in place.

use std::ops::Range;

use candle_core::{Result, Tensor};

use super::kernel::{tap_segment, Kernel, PackedB};
use super::map::Map;

/// A convolution's weights as the GEMM's right-hand matrix, `[(ky, kx, c_in), c_out]` in
/// the order of the patch rows built from an NHWC map, packed into panels once.
#[derive(Clone, Debug)]
pub struct PackedConv {
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) c_in: usize,
    pub(super) weights: PackedB,
}

impl PackedConv {
    /// A classifier's `[classes, features]` weight as a 1x1 convolution over the pooled
    /// `[n, 1, 1, features]` map.
    pub fn linear(weight: &Tensor, gemm: Kernel) -> Result<Self> {
        let as_conv = weight.unsqueeze(2)?.unsqueeze(3)?;
        Self::new(&as_conv, 1, 0, gemm)
    }

    /// From PyTorch's `[c_out, c_in, k, k]` (f32, ungrouped), for the GEMM back end `gemm`.
    pub fn new(weight: &Tensor, stride: usize, padding: usize, gemm: Kernel) -> Result<Self> {
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
        let segment = if kernel > 1 {
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

    pub fn c_out(&self) -> usize {
        self.weights.n()
    }

    pub(super) fn depth(&self) -> usize {
        self.kernel * self.kernel * self.c_in
    }

    pub(super) fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// A 1x1 stride-1 convolution reads its NHWC input directly as the GEMM's left matrix.
    pub(super) fn reads_input_directly(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// A larger kernel on our micro-kernel, at any stride, reads its taps in place from
    /// zero-bordered copies of the input lines (see [`tap_block`]) instead of building patch
    /// rows. Paired panels need each tap's channels in whole pairs.
    pub(super) fn reads_taps(&self) -> bool {
        self.kernel > 1 && self.weights.takes_taps(tap_segment(self.kernel, self.c_in))
    }

    /// Whether the convolution can read `avg_pool2x2(input)` pooled as it goes
    /// ([`Term::pooled`]): where it reads lines of its input rather than patch rows.
    pub fn reads_pooled(&self) -> bool {
        self.reads_input_directly() || self.reads_taps()
    }

    /// Where each K segment of output pixel 0 starts in a band of input lines `padded_width`
    /// wide: the A offsets of a tap-reading GEMM. A segment is one tap `(ky, kx)` or, where the
    /// kernel takes them as one, the whole kernel row `ky` ([`tap_segment`]).
    pub(super) fn tap_offsets(&self, padded_width: usize) -> Vec<usize> {
        let (k, c) = (self.kernel, self.c_in);
        let per_row = tap_segment(k, c) / c;
        (0..k * k)
            .step_by(per_row)
            .map(|t| ((t / k) * padded_width + t % k) * c)
            .collect()
    }

    /// Writes the patch rows of output pixels `rows` (flat `n * ho * wo` indices) into `dst`.
    pub(super) fn patches(&self, x: &Map, rows: Range<usize>, dst: &mut [f32]) {
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
