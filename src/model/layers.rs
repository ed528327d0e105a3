//! Building blocks shared by every network: convolution, inference-form BatchNorm, pooling and
//! upsampling.
//!
//! Pooling and upsampling are written with reshapes, broadcasts and reductions instead of candle's
//! `avg_pool2d` / `max_pool2d` / `upsample_nearest2d`, because the backward passes of those are
//! wrong in candle 0.11 (max-pool gives 1/(k*k) of the gradient, avg-pool is wrong on odd sizes,
//! upsample overwrites accumulated gradients) and they cannot express ceil-mode or padded pooling.
//! The formulations here use only ops whose gradients candle computes correctly; the tests check
//! them against finite differences.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::cost::{CostTracker, FeatureShape};
use super::fast::{Branches, ConvWeights, FastLayer};
use super::grid::halved;

/// A 2-D convolution, optionally with a bias (a folded BatchNorm puts one there).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv2d {
    /// Loads `{vb}.weight` of shape `[c_out, c_in / groups, k, k]` (PyTorch layout, no bias).
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<Self> {
        // Kaiming normal, fan-out, as torchvision initialises ResNets (used for random weights).
        let fan_out = (c_out * kernel * kernel) as f64;
        let init = Init::Randn {
            mean: 0.,
            stdev: (2.0 / fan_out).sqrt(),
        };
        let weight = vb.get_with_hints((c_out, c_in / groups, kernel, kernel), "weight", init)?;
        Ok(Self {
            weight,
            bias: None,
            stride,
            padding,
            groups,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// What the fast path packs: the weights, bias and geometry.
    pub fn fast_weights(&self) -> ConvWeights<'_> {
        ConvWeights {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
        }
    }

    fn kernel(&self) -> usize {
        self.weight.dim(3).unwrap_or(1)
    }

    /// Scales each output channel and adds `shift` to the bias: how a BatchNorm folds in.
    /// The result is detached from any autograd graph (random weights are candle `Var`s).
    pub fn scale_shift(&self, scale: &Tensor, shift: Option<&Tensor>) -> Result<Self> {
        let weight = self
            .weight
            .broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?
            .detach();
        let scaled_bias = self.bias.as_ref().map(|b| b.mul(scale)).transpose()?;
        let bias = match (scaled_bias, shift) {
            (Some(b), Some(s)) => Some(b.add(s)?),
            (b, s) => b.or_else(|| s.cloned()),
        };
        Ok(Self {
            weight,
            bias: bias.map(|b| b.detach()),
            ..self.clone()
        })
    }

    pub fn cost(&self, input: FeatureShape, t: &mut CostTracker) -> FeatureShape {
        let k = self.kernel();
        let out = FeatureShape {
            c: self.out_channels(),
            h: (input.h + 2 * self.padding - k) / self.stride + 1,
            w: (input.w + 2 * self.padding - k) / self.stride + 1,
        };
        let c_in_per_group = input.c / self.groups;
        t.add_macs(out.numel() * c_in_per_group * k * k);
        t.add_params(self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count()));
        out
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.stride > 1 {
            pad_to_stride_multiple(x, self.stride)?
        } else {
            x.clone()
        };
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Pads height and width with zeros at the end up to a multiple of `stride`.
///
/// candle 0.11's conv2d backward fails for strided convolutions over odd, non-square inputs. The
/// extra row/column is never read by a window that produces an output (every output count
/// `(h + 2p - k) / s + 1` is unchanged), so the forward result is the same.
fn pad_to_stride_multiple(x: &Tensor, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = x.pad_with_zeros(2, 0, h.next_multiple_of(stride) - h)?;
    x.pad_with_zeros(3, 0, w.next_multiple_of(stride) - w)
}

/// BatchNorm2d in inference form (running statistics), PyTorch names and eps.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    /// `weight / sqrt(running_var + eps)` per channel.
    scale: Tensor,
    /// `bias - running_mean * scale` per channel.
    shift: Tensor,
}

impl BatchNorm {
    const EPS: f64 = 1e-5;

    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        let mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.))?;
        let var = vb.get_with_hints(channels, "running_var", Init::Const(1.))?;
        let scale = weight.div(&(var + Self::EPS)?.sqrt()?)?;
        let shift = bias.sub(&mean.mul(&scale)?)?;
        Ok(Self { scale, shift })
    }

    /// Folds this BatchNorm into the convolution that feeds it.
    pub fn fold_into(&self, conv: &Conv2d) -> Result<Conv2d> {
        conv.scale_shift(&self.scale, Some(&self.shift))
    }

    /// Folds only the scale: for a conv whose output is summed with another that takes the shift.
    pub fn fold_scale_into(&self, conv: &Conv2d) -> Result<Conv2d> {
        conv.scale_shift(&self.scale, None)
    }

    pub fn channels(&self) -> usize {
        self.scale.elem_count()
    }
}

impl Module for BatchNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale.reshape((1, (), 1, 1))?)?
            .broadcast_add(&self.shift.reshape((1, (), 1, 1))?)
    }
}

/// A convolution followed by an optional BatchNorm and ReLU: torchvision's `conv`/`bn` pairs.
#[derive(Clone, Debug)]
pub struct ConvBn {
    name: String,
    conv: Conv2d,
    bn: Option<BatchNorm>,
    relu: bool,
}

impl ConvBn {
    /// `name` labels the pair in cost reports (the conv's PyTorch module path).
    pub fn new(name: String, conv: Conv2d, bn: BatchNorm, relu: bool) -> Self {
        Self {
            name,
            conv,
            bn: Some(bn),
            relu,
        }
    }

    /// The same function with the BatchNorm folded into the convolution's weights and bias.
    pub fn folded(&self) -> Result<Self> {
        let conv = match &self.bn {
            Some(bn) => bn.fold_into(&self.conv)?,
            None => self.conv.clone(),
        };
        Ok(Self {
            name: self.name.clone(),
            conv,
            bn: None,
            relu: self.relu,
        })
    }

    /// The fast-path form; BatchNorm must be folded first.
    pub fn fast(&self) -> Result<FastLayer> {
        if self.bn.is_some() {
            candle_core::bail!("fast path: fold the BatchNorm of {} first", self.name);
        }
        let convs = Branches {
            h2h: Some(self.conv.fast_weights()),
            ..Branches::default()
        };
        FastLayer::new(&self.name, convs, false, self.relu)
    }

    /// Forward without the ReLU, for the last conv of a residual branch.
    pub fn forward_linear(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        match &self.bn {
            Some(bn) => bn.forward(&y),
            None => Ok(y),
        }
    }

    pub fn cost(&self, input: FeatureShape, t: &mut CostTracker) -> FeatureShape {
        t.layer(&self.name, |t| {
            let out = self.conv.cost(input, t);
            if let Some(bn) = &self.bn {
                t.add_params(2 * bn.channels());
            }
            out
        })
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_linear(x)?;
        if self.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}

/// The final classifier: `fc.weight` `[classes, features]`, `fc.bias`.
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(vb: VarBuilder, features: usize, classes: usize) -> Result<Self> {
        let bound = 1.0 / (features as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((classes, features), "weight", uniform)?;
        let bias = vb.get_with_hints(classes, "bias", uniform)?;
        Ok(Self {
            inner: candle_nn::Linear::new(weight, Some(bias)),
        })
    }

    /// The same layer without autograd tracking, for inference.
    pub fn detached(&self) -> Self {
        let weight = self.inner.weight().detach();
        let bias = self.inner.bias().map(Tensor::detach);
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    pub fn cost(&self, features: usize, t: &mut CostTracker) -> usize {
        let classes = self.inner.weight().dim(0).unwrap_or(0);
        t.add_macs(features * classes);
        t.add_params(features * classes + classes);
        classes
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}

/// 2x2 average pool, stride 2, ceil mode: a window cut by the border averages the cells it has.
///
/// On even sizes this is exactly PyTorch's `AvgPool2d(2, 2)`; on odd sizes it keeps the vanilla
/// network's `ceil(n / 2)` so the octave branches line up with any input size.
pub fn avg_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (halved(h), halved(w));
    let sums = x
        .pad_with_zeros(2, 0, 2 * ho - h)?
        .pad_with_zeros(3, 0, 2 * wo - w)?
        .reshape((n, c, ho, 2, wo, 2))?
        .sum(5)?
        .sum(3)?;
    if h % 2 == 0 && w % 2 == 0 {
        return sums * 0.25;
    }
    let counts = |len: usize, out: usize| -> Vec<f32> {
        (0..out)
            .map(|i| if 2 * i + 1 < len { 2. } else { 1. })
            .collect()
    };
    let rows = Tensor::new(counts(h, ho), x.device())?.reshape((ho, 1))?;
    let cols = Tensor::new(counts(w, wo), x.device())?.reshape((1, wo))?;
    let inv_counts = rows.broadcast_mul(&cols)?.recip()?.to_dtype(x.dtype())?;
    sums.broadcast_mul(&inv_counts)
}

/// Nearest-neighbour x2 upsampling cropped to `(h, w)`: the inverse of [`avg_pool2x2`]'s sizes.
pub fn upsample2x_to(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, hl, wl) = x.dims4()?;
    let up = x
        .reshape((n, c, hl, 1, wl, 1))?
        .broadcast_as((n, c, hl, 2, wl, 2))?
        .reshape((n, c, 2 * hl, 2 * wl))?;
    up.narrow(2, 0, h)?.narrow(3, 0, w)
}

/// `high + upsample2x_to(low, ...)` without materialising the upsampled map when the sizes are
/// exactly 2:1: the sum broadcasts `low` over each 2x2 cell of `high`.
pub fn add_upsampled(high: &Tensor, low: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = high.dims4()?;
    let (_, _, hl, wl) = low.dims4()?;
    if (h, w) != (2 * hl, 2 * wl) {
        return high.add(&upsample2x_to(low, h, w)?);
    }
    high.reshape((n, c, hl, 2, wl, 2))?
        .broadcast_add(&low.reshape((n, c, hl, 1, wl, 1))?)?
        .reshape((n, c, h, w))
}

/// 3x3 max pool, stride 2, padding 1 (the ResNet stem's), computed separably along each axis.
pub fn max_pool3x3s2p1(x: &Tensor) -> Result<Tensor> {
    let x = max3s2p1_along(x, 2)?;
    max3s2p1_along(&x, 3)
}

/// Along `dim`: `out[i] = max(x[2i-1], x[2i], x[2i+1])` over the padded axis, `ceil(n / 2)` outputs.
fn max3s2p1_along(x: &Tensor, dim: usize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let out = halved(len);
    // Pad with the lowest value on both sides so the padded length is 2 * (out + 1).
    let padded = pad_with_value(x, dim, 1, 2 * out + 1 - len, f32::MIN)?;
    let mut pairs_shape = padded.dims().to_vec();
    pairs_shape[dim] = out + 1;
    pairs_shape.insert(dim + 1, 2);
    let pairs = padded.reshape(pairs_shape)?;
    let even = pairs.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?;
    let odd = pairs.narrow(dim + 1, 1, 1)?.squeeze(dim + 1)?;
    let left = even.narrow(dim, 0, out)?;
    let centre = odd.narrow(dim, 0, out)?;
    let right = even.narrow(dim, 1, out)?;
    left.maximum(&centre)?.maximum(&right)
}

fn pad_with_value(x: &Tensor, dim: usize, left: usize, right: usize, value: f32) -> Result<Tensor> {
    let block = |n: usize| -> Result<Tensor> {
        let mut shape = x.dims().to_vec();
        shape[dim] = n;
        Tensor::full(value, shape, x.device())?.to_dtype(x.dtype())
    };
    Tensor::cat(&[&block(left)?, x, &block(right)?], dim)
}

/// Global average pool: `[n, c, h, w] -> [n, c]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean(D::Minus1)?.mean(D::Minus1)
}

/// Element type size used by the analytic memory figures (the models run in f32 by default).
pub const F32_BYTES: usize = std::mem::size_of::<f32>();
