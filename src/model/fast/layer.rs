//! One BatchNorm-folded conv unit of either network on the fast path: a vanilla conv is the
//! octave case with only the H->H convolution.

use candle_core::{Result, Tensor};

use super::calibrate;
use super::conv::{conv_sum, Epilogue};
use super::map::{avg_pool2x2, Map};
use super::packed::PackedConv;
use super::term::Term;

/// An octave feature map on the fast path; vanilla maps have no low part.
#[derive(Clone, Debug)]
pub struct OctMap {
    pub high: Map,
    pub low: Option<Map>,
}

impl OctMap {
    /// Zeros shaped like this one-image map, for `images` images.
    pub fn zeros_for(&self, images: usize) -> Self {
        let zeros = |m: &Map| Map::zeros(images, m.h, m.w, m.c);
        Self {
            high: zeros(&self.high),
            low: self.low.as_ref().map(zeros),
        }
    }

    /// Writes the one-image map `image` as image `at`.
    pub fn put_image(&mut self, at: usize, image: &OctMap) {
        self.high.put_image(at, &image.high);
        if let (Some(low), Some(image)) = (&mut self.low, &image.low) {
            low.put_image(at, image);
        }
    }
}

/// One BatchNorm-folded convolution as the fast path takes it: PyTorch's `[c_out, c_in / groups,
/// k, k]` weight, an optional per-output-channel bias, and its geometry.
#[derive(Clone, Copy, Debug)]
pub struct ConvWeights<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

/// The convolutions of one unit, by the branch they connect.
#[derive(Default)]
pub struct Branches<'a> {
    pub h2h: Option<ConvWeights<'a>>,
    pub h2l: Option<ConvWeights<'a>>,
    pub l2h: Option<ConvWeights<'a>>,
    pub l2l: Option<ConvWeights<'a>>,
}

/// A folded conv unit (conv, BatchNorm, optional ReLU) ready for [`conv_sum`].
#[derive(Clone, Debug)]
pub struct FastLayer {
    pub name: String,
    h2h: Option<PackedConv>,
    h2l: Option<PackedConv>,
    l2h: Option<PackedConv>,
    l2l: Option<PackedConv>,
    /// L->L and H->L as one convolution over the low input's channels stacked with the pooled
    /// high input's (their kernels stacked), where it reads lines; `l2l` and `h2l` are then
    /// `None`.
    low_joint: Option<PackedConv>,
    /// At stride 2, L->H and H->H the same way, over the low input's channels stacked with the
    /// pooled high input's (both outputs are on the low grid there); `l2h` and `h2h` are then
    /// `None`. One pass over the output instead of a second that reloads it.
    high_joint: Option<PackedConv>,
    in_channels: usize,
    /// Octave stride 2: the high input is average-pooled first (the convs keep stride 1).
    pool_first: bool,
    bias_high: Vec<f32>,
    bias_low: Vec<f32>,
    relu: bool,
}

impl FastLayer {
    pub fn new(name: &str, convs: Branches, pool_first: bool, relu: bool) -> Result<Self> {
        let pack = |c: Option<ConvWeights>| c.map(packed).transpose();
        let bias = |a: Option<ConvWeights>, b: Option<ConvWeights>| -> Result<Vec<f32>> {
            let mut sum = Vec::new();
            for bias in [a, b].into_iter().flatten().filter_map(|c| c.bias) {
                let bias: Vec<f32> = bias.to_vec1()?;
                sum.resize(bias.len(), 0.);
                sum.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
            }
            Ok(sum)
        };
        let low_joint = match (convs.l2l, convs.h2l) {
            (Some(l2l), Some(h2l)) => joint(l2l, h2l)?,
            _ => None,
        };
        let high_joint = match (convs.l2h, convs.h2h) {
            (Some(l2h), Some(h2h)) if pool_first => joint(l2h, h2h)?,
            _ => None,
        };
        let unless = |joint: &Option<PackedConv>, c| {
            if joint.is_some() {
                Ok(None)
            } else {
                pack(c)
            }
        };
        Ok(Self {
            name: name.to_string(),
            bias_high: bias(convs.h2h, convs.l2h)?,
            bias_low: bias(convs.h2l, convs.l2l)?,
            h2h: unless(&high_joint, convs.h2h)?,
            h2l: unless(&low_joint, convs.h2l)?,
            l2h: unless(&high_joint, convs.l2h)?,
            l2l: unless(&low_joint, convs.l2l)?,
            low_joint,
            high_joint,
            in_channels: convs.h2h.map_or(0, |c| c.weight.dims()[1]),
            pool_first,
            relu,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// `conv(x)`, ReLU'd if the unit has one; with a residual, `relu(conv(x) + residual)` (the
    /// end of a block). Branch by branch:
    ///
    /// ```text
    /// stride 1: Y_H = h2h(X_H) + up(l2h(X_L))       Y_L = l2l(X_L) + h2l(pool(X_H))
    /// stride 2: Y_H = h2h(P) + l2h(X_L), P = pool(X_H)   Y_L = l2l(pool(X_L)) + h2l(pool(P))
    /// ```
    pub fn forward(&self, x: &OctMap, residual: Option<&OctMap>) -> OctMap {
        let pooled_high = self.pool_first.then(|| avg_pool2x2(&x.high));
        let high_in = pooled_high.as_ref().unwrap_or(&x.high);
        let mut terms = Vec::with_capacity(2);
        if let Some(conv) = &self.high_joint {
            // Pools X_H again as it reads it (the low output reads P): a few percent of the
            // layer, against a second pass over the whole output.
            let x_low = x.low.as_ref().expect("a layer with L->H reads a low input");
            terms.push(Term::joint(conv, x_low, false, &x.high));
        }
        terms.extend(self.h2h.as_ref().map(|conv| Term::of(conv, high_in)));
        let mut upsampled = None;
        if let (Some(conv), Some(x_low)) = (&self.l2h, &x.low) {
            let term = Term::of(conv, x_low);
            if self.pool_first {
                terms.push(term);
            } else {
                upsampled = Some(conv_sum(&[term], &Epilogue::default()));
            }
        }
        let high = conv_sum(
            &terms,
            &Epilogue {
                bias: &self.bias_high,
                residual: residual.map(|r| &r.high),
                upsampled: upsampled.as_ref(),
                relu: self.relu || residual.is_some(),
            },
        );
        // The low output after the high one, once the upsampled `l2h` map is freed: the two
        // outputs and both temporaries are never alive together (Oct-ResNet-50's peak drops
        // below the analytic one, which counts outputs only).
        drop(upsampled);
        let low = self.low_output(high_in, x.low.as_ref(), residual);
        OctMap { high, low }
    }

    fn low_output(
        &self,
        high_in: &Map,
        x_low: Option<&Map>,
        residual: Option<&OctMap>,
    ) -> Option<Map> {
        let (mut pooled_low, mut twice_pooled) = (None, None);
        let mut terms = Vec::with_capacity(2);
        if let (Some(conv), Some(x)) = (&self.low_joint, x_low) {
            terms.push(Term::joint(conv, x, self.pool_first, high_in));
        } else {
            if let (Some(conv), Some(x)) = (&self.l2l, x_low) {
                terms.push(if self.pool_first {
                    Term::pooled(conv, x, &mut pooled_low)
                } else {
                    Term::of(conv, x)
                });
            }
            if let Some(conv) = &self.h2l {
                terms.push(Term::pooled(conv, high_in, &mut twice_pooled));
            }
        }
        if terms.is_empty() {
            return None;
        }
        Some(conv_sum(
            &terms,
            &Epilogue {
                bias: &self.bias_low,
                residual: residual.and_then(|r| r.low.as_ref()),
                upsampled: None,
                relu: self.relu || residual.is_some(),
            },
        ))
    }
}

/// `low` (L->L or L->H) and `high` (H->L or H->H) as one convolution over stacked input
/// channels, low first, where both have the same geometry and the stacked one reads its input
/// line by line (so it can stack the lines).
fn joint(low: ConvWeights, high: ConvWeights) -> Result<Option<PackedConv>> {
    // Everything but the input channels (which differ where alpha != 0.5) must agree.
    let geometry = |c: ConvWeights| {
        let dims = c.weight.dims();
        (dims[0], dims[2], dims[3], c.stride, c.padding, c.groups)
    };
    if geometry(low) != geometry(high) || low.groups != 1 {
        return Ok(None);
    }
    let weight = Tensor::cat(&[low.weight, high.weight], 1)?;
    let conv = PackedConv::new(
        &weight,
        low.stride,
        low.padding,
        calibrate::for_conv(weight.dim(0)?),
    )?;
    Ok(conv.reads_pooled().then_some(conv))
}

fn packed(conv: ConvWeights) -> Result<PackedConv> {
    if conv.groups != 1 {
        candle_core::bail!("fast path: grouped convolutions are not supported");
    }
    let kernel = calibrate::for_conv(conv.weight.dim(0)?);
    PackedConv::new(conv.weight, conv.stride, conv.padding, kernel)
}
