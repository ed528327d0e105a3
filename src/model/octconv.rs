//! Octave convolution (Chen et al., "Drop an Octave: Reducing Spatial Redundancy in Convolutional
//! Neural Networks with Octave Convolution", ICCV 2019, arXiv:1904.05049).
//!
//! A feature map is split into a high-frequency part at full resolution and a low-frequency part
//! holding `floor(alpha * C)` channels at half resolution. Semantics and parameter names follow
//! d-li14/octconv.pytorch:
//!
//! ```text
//! Y_H = h2h(X_H) + upsample2x(l2h(X_L))        Y_L = l2l(X_L) + h2l(avgpool2x2(X_H))
//! ```
//!
//! Stride 2 is never a strided conv: X_H is average-pooled before H->H (so H->L pools twice),
//! L->L pools once and L->H is not upsampled. Unlike the reference, any input size works: pools
//! are ceil-mode and the upsampled L->H map is cropped to the H->H map's size (see
//! [`super::layers::avg_pool2x2`]); on sizes the reference accepts the results are identical.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::cost::{CostTracker, FeatureShape, OctShape};
use super::fast::{Branches, FastLayer};
use super::grid::halved;
use super::layers::{add_upsampled, avg_pool2x2, BatchNorm, Conv2d};

/// An octave feature map: the full-resolution part and the optional half-resolution part.
#[derive(Clone, Debug)]
pub struct OctTensor {
    pub high: Tensor,
    pub low: Option<Tensor>,
}

impl From<Tensor> for OctTensor {
    fn from(high: Tensor) -> Self {
        Self { high, low: None }
    }
}

impl OctTensor {
    /// Branch-wise residual add followed by ReLU.
    pub fn add_relu(&self, other: &OctTensor) -> Result<OctTensor> {
        let high = self.high.add(&other.high)?.relu()?;
        let low = match (&self.low, &other.low) {
            (Some(a), Some(b)) => Some(a.add(b)?.relu()?),
            (None, None) => None,
            _ => candle_core::bail!("residual add of octave maps with different branches"),
        };
        Ok(OctTensor { high, low })
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<OctTensor> {
        Ok(OctTensor {
            high: f(&self.high)?,
            low: self.low.as_ref().map(f).transpose()?,
        })
    }
}

/// Low-frequency channel count, `int(alpha * channels)` as in the reference.
pub fn low_channels(channels: usize, alpha: f64) -> usize {
    (alpha * channels as f64).floor() as usize
}

/// Shape and alphas of one octave convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OctConvConfig {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub alpha_in: f64,
    pub alpha_out: f64,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl OctConvConfig {
    pub fn new(c_in: usize, c_out: usize, kernel: usize, alpha_in: f64, alpha_out: f64) -> Self {
        Self {
            c_in,
            c_out,
            kernel,
            alpha_in,
            alpha_out,
            stride: 1,
            padding: kernel / 2,
            groups: 1,
        }
    }

    pub fn stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }

    pub fn groups(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    fn low_in(&self) -> usize {
        low_channels(self.c_in, self.alpha_in)
    }

    fn low_out(&self) -> usize {
        low_channels(self.c_out, self.alpha_out)
    }

    fn is_depthwise(&self) -> bool {
        self.groups == self.c_in
    }
}

/// The four convolutions between the frequency branches; each is absent when a branch is empty.
#[derive(Clone, Debug)]
pub struct OctaveConv {
    h2h: Option<Conv2d>,
    h2l: Option<Conv2d>,
    l2h: Option<Conv2d>,
    l2l: Option<Conv2d>,
    stride: usize,
}

impl OctaveConv {
    pub fn new(vb: VarBuilder, cfg: OctConvConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.alpha_in) || !(0.0..1.0).contains(&cfg.alpha_out) {
            candle_core::bail!("octave alphas must be in [0, 1), got {cfg:?}");
        }
        if cfg.stride != 1 && cfg.stride != 2 {
            candle_core::bail!(
                "octave convolution stride must be 1 or 2, got {}",
                cfg.stride
            );
        }
        let (low_in, low_out) = (cfg.low_in(), cfg.low_out());
        let (high_in, high_out) = (cfg.c_in - low_in, cfg.c_out - low_out);
        let groups_low = (cfg.alpha_in * cfg.groups as f64).ceil() as usize;
        let groups_high = (cfg.groups as f64 - cfg.alpha_in * cfg.groups as f64).ceil() as usize;
        let conv = |name: &str, c_in: usize, c_out: usize, groups: usize| {
            Conv2d::new(vb.pp(name), c_in, c_out, cfg.kernel, 1, cfg.padding, groups)
        };
        let has_low_in = low_in > 0;
        let has_low_out = low_out > 0;
        let dw = cfg.is_depthwise();
        Ok(Self {
            h2h: Some(conv("conv_h2h", high_in, high_out, groups_high)?),
            h2l: (has_low_out && !dw)
                .then(|| conv("conv_h2l", high_in, low_out, cfg.groups))
                .transpose()?,
            l2h: (has_low_in && !dw)
                .then(|| conv("conv_l2h", low_in, high_out, cfg.groups))
                .transpose()?,
            l2l: (has_low_in && has_low_out)
                .then(|| conv("conv_l2l", low_in, low_out, groups_low))
                .transpose()?,
            stride: cfg.stride,
        })
    }

    /// Applies `f` to every present convolution (BatchNorm folding).
    fn map_convs(
        &self,
        f_high: impl Fn(&Conv2d, bool) -> Result<Conv2d>,
        f_low: impl Fn(&Conv2d, bool) -> Result<Conv2d>,
    ) -> Result<Self> {
        // The first conv feeding a branch carries that branch's bias; the other only scales.
        Ok(Self {
            h2h: self.h2h.as_ref().map(|c| f_high(c, true)).transpose()?,
            l2h: self
                .l2h
                .as_ref()
                .map(|c| f_high(c, self.h2h.is_none()))
                .transpose()?,
            l2l: self.l2l.as_ref().map(|c| f_low(c, true)).transpose()?,
            h2l: self
                .h2l
                .as_ref()
                .map(|c| f_low(c, self.l2l.is_none()))
                .transpose()?,
            stride: self.stride,
        })
    }

    pub fn cost(&self, x: OctShape, t: &mut CostTracker) -> OctShape {
        let pooled = |s: FeatureShape| FeatureShape {
            h: halved(s.h),
            w: halved(s.w),
            ..s
        };
        let x_high = if self.stride == 2 {
            pooled(x.high)
        } else {
            x.high
        };
        let h2h = self.h2h.as_ref().map(|c| c.cost(x_high, t));
        let h2l = self.h2l.as_ref().map(|c| c.cost(pooled(x_high), t));
        let (mut l2h, mut l2l) = (None, None);
        if let Some(x_low) = x.low {
            let l2l_in = if self.stride == 2 {
                pooled(x_low)
            } else {
                x_low
            };
            l2l = self.l2l.as_ref().map(|c| c.cost(l2l_in, t));
            l2h = self.l2h.as_ref().map(|c| c.cost(x_low, t));
        }
        let high = h2h
            .or(l2h)
            .expect("an octave conv always has a high output");
        OctShape {
            high,
            low: l2l.or(h2l),
        }
    }

    pub fn forward(&self, x: &OctTensor) -> Result<OctTensor> {
        let x_high = if self.stride == 2 {
            avg_pool2x2(&x.high)?
        } else {
            x.high.clone()
        };
        let h2h = self.h2h.as_ref().map(|c| c.forward(&x_high)).transpose()?;
        let h2l = match &self.h2l {
            Some(c) => Some(c.forward(&avg_pool2x2(&x_high)?)?),
            None => None,
        };
        let Some(x_low) = &x.low else {
            let high = h2h.expect("h2h exists when there is no low input");
            return Ok(OctTensor { high, low: h2l });
        };
        let l2l = match &self.l2l {
            Some(c) if self.stride == 2 => Some(c.forward(&avg_pool2x2(x_low)?)?),
            Some(c) => Some(c.forward(x_low)?),
            None => None,
        };
        let l2h = self.l2h.as_ref().map(|c| c.forward(x_low)).transpose()?;
        let high = match (h2h, l2h) {
            (Some(h), Some(l)) if self.stride == 1 => add_upsampled(&h, &l)?,
            (Some(h), Some(l)) => h.add(&l)?,
            (Some(h), None) => h,
            (None, _) => candle_core::bail!("octave conv without a high output"),
        };
        let low = match (h2l, l2l) {
            (Some(a), Some(b)) => Some(a.add(&b)?),
            (None, low) => low,
            (Some(_), None) => None,
        };
        Ok(OctTensor { high, low })
    }
}

/// d-li14's `Conv_BN` / `Conv_BN_ACT`: an [`OctaveConv`] as `.conv`, BatchNorm per branch
/// (`bn_h`, `bn_l`), and optionally ReLU per branch.
#[derive(Clone, Debug)]
pub struct OctConvBn {
    name: String,
    conv: OctaveConv,
    bn_h: Option<BatchNorm>,
    bn_l: Option<BatchNorm>,
    relu: bool,
}

impl OctConvBn {
    pub fn new(vb: VarBuilder, cfg: OctConvConfig, relu: bool) -> Result<Self> {
        let conv = OctaveConv::new(vb.pp("conv"), cfg)?;
        let low_out = cfg.low_out();
        let bn_h = Some(BatchNorm::new(vb.pp("bn_h"), cfg.c_out - low_out)?);
        let bn_l = (low_out > 0)
            .then(|| BatchNorm::new(vb.pp("bn_l"), low_out))
            .transpose()?;
        Ok(Self {
            name: vb.prefix(),
            conv,
            bn_h,
            bn_l,
            relu,
        })
    }

    /// The same function with each branch's BatchNorm folded into the convs that feed it.
    pub fn folded(&self) -> Result<Self> {
        let fold = |bn: &Option<BatchNorm>, c: &Conv2d, with_shift: bool| match bn {
            Some(bn) if with_shift => bn.fold_into(c),
            Some(bn) => bn.fold_scale_into(c),
            None => Ok(c.clone()),
        };
        let conv = self.conv.map_convs(
            |c, shift| fold(&self.bn_h, c, shift),
            |c, shift| fold(&self.bn_l, c, shift),
        )?;
        Ok(Self {
            name: self.name.clone(),
            conv,
            bn_h: None,
            bn_l: None,
            relu: self.relu,
        })
    }

    /// The fast-path form; BatchNorms must be folded first.
    pub fn fast(&self) -> Result<FastLayer> {
        if self.bn_h.is_some() || self.bn_l.is_some() {
            candle_core::bail!("fast path: fold the BatchNorms of {} first", self.name);
        }
        let c = &self.conv;
        let convs = Branches {
            h2h: c.h2h.as_ref().map(Conv2d::fast_weights),
            h2l: c.h2l.as_ref().map(Conv2d::fast_weights),
            l2h: c.l2h.as_ref().map(Conv2d::fast_weights),
            l2l: c.l2l.as_ref().map(Conv2d::fast_weights),
        };
        FastLayer::new(&self.name, convs, c.stride == 2, self.relu)
    }

    pub fn cost(&self, x: OctShape, t: &mut CostTracker) -> OctShape {
        t.layer(&self.name, |t| {
            let out = self.conv.cost(x, t);
            let bn_params: usize = [&self.bn_h, &self.bn_l]
                .into_iter()
                .flatten()
                .map(|bn| 2 * bn.channels())
                .sum();
            t.add_params(bn_params);
            out
        })
    }

    pub fn forward(&self, x: &OctTensor) -> Result<OctTensor> {
        let y = self.conv.forward(x)?;
        let high = match &self.bn_h {
            Some(bn) => bn.forward(&y.high)?,
            None => y.high,
        };
        let low = match (&self.bn_l, y.low) {
            (Some(bn), Some(l)) => Some(bn.forward(&l)?),
            (_, low) => low,
        };
        let y = OctTensor { high, low };
        if self.relu {
            y.map(|t| t.relu())
        } else {
            Ok(y)
        }
    }
}
