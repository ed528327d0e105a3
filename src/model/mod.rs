//! The models: vanilla ResNets and Octave-Convolution ResNets in pure candle.
//!
//! [`Model`] is what the rest of octserve sees: build it from a [`ModelConfig`] and a
//! `VarBuilder` (safetensors by PyTorch names, or random), fold its BatchNorms for inference,
//! run it on `[batch, channels, height, width]` tensors, and ask it for its analytic cost.

pub mod arch;
pub mod cost;
pub mod fast;
pub mod grid;
pub mod layers;
pub mod network;
pub mod octconv;
pub mod resnet;
pub mod weights;

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

pub use arch::{Arch, ARCHS};
pub use cost::{CostReport, FeatureShape};

use fast::FastNet;
use layers::ConvBn;
use network::{ConvUnit, Network};
use octconv::OctConvBn;
use resnet::Dims;

/// What to build: an architecture and the sizes it is built for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Low-frequency channel fraction of octave nets, in [0, 1); ignored by vanilla nets.
    pub alpha: f64,
    pub in_channels: usize,
    pub num_classes: usize,
    /// Stem width; `None` takes the architecture's (64, or 16 for the small nets).
    pub base_channels: Option<usize>,
}

impl ModelConfig {
    pub fn new(arch: Arch) -> Self {
        Self {
            arch,
            alpha: 0.5,
            in_channels: 3,
            num_classes: 1000,
            base_channels: None,
        }
    }

    fn dims(&self) -> Dims {
        Dims {
            in_channels: self.in_channels,
            num_classes: self.num_classes,
            base_channels: self
                .base_channels
                .unwrap_or(self.arch.spec().default_base_channels()),
            alpha: self.alpha,
        }
    }
}

#[derive(Clone, Debug)]
enum Net {
    Vanilla(Network<ConvBn>),
    Octave(Network<OctConvBn>),
}

/// A built classifier: logits for a batch of normalised images.
#[derive(Clone, Debug)]
pub struct Model {
    config: ModelConfig,
    net: Net,
    /// The compiled CPU path of a folded f32 model on the CPU: what `forward` runs there.
    fast: Option<Arc<fast::FastNet>>,
}

impl Model {
    pub fn new(config: ModelConfig, vb: VarBuilder) -> Result<Self> {
        let spec = config.arch.spec();
        if spec.octave && !(0.0..1.0).contains(&config.alpha) {
            candle_core::bail!("alpha must be in [0, 1), got {}", config.alpha);
        }
        let net = if spec.octave {
            Net::Octave(resnet::octave(vb, spec, config.dims())?)
        } else {
            Net::Vanilla(resnet::vanilla(vb, spec, config.dims())?)
        };
        Ok(Self {
            config,
            net,
            fast: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `[n, c, h, w]` -> `[n, classes]` logits.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(fast) = self.fast_for(x) {
            return x.contiguous()?.apply_op1_no_bwd(fast.as_ref());
        }
        match &self.net {
            Net::Vanilla(n) => n.forward(x),
            Net::Octave(n) => n.forward(x),
        }
    }

    /// The same function with every BatchNorm folded into the conv before it and no autograd
    /// tracking: the inference form. On the CPU in f32 it also compiles the fast path
    /// ([`fast`]), which `forward` then runs.
    pub fn folded(&self) -> Result<Self> {
        fn fold<U: ConvUnit>(
            n: &Network<U>,
            compile: bool,
        ) -> Result<(Network<U>, Option<FastNet>)> {
            let folded = n.folded()?;
            let fast = compile.then(|| folded.fast()).transpose()?;
            Ok((folded, fast))
        }
        let compile = self.compiles();
        let (net, fast) = match &self.net {
            Net::Vanilla(n) => fold(n, compile).map(|(n, f)| (Net::Vanilla(n), f))?,
            Net::Octave(n) => fold(n, compile).map(|(n, f)| (Net::Octave(n), f))?,
        };
        Ok(Self {
            config: self.config,
            net,
            fast: fast.map(Arc::new),
        })
    }

    /// Per-layer wall time of one fast-path forward pass; `None` off the fast path.
    pub fn profile(&self, x: &Tensor) -> Result<Option<fast::LayerTimes>> {
        let Some(fast) = self.fast_for(x) else {
            return Ok(None);
        };
        let (n, c, h, w) = x.dims4()?;
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let (_, times) = fast.profile(fast::map::Map::from_nchw(&data, n, c, h, w));
        Ok(Some(times))
    }

    /// Whether this model's weights suit the fast path (CPU, f32).
    fn compiles(&self) -> bool {
        let weight = match &self.net {
            Net::Vanilla(n) => n.fc.weight(),
            Net::Octave(n) => n.fc.weight(),
        };
        weight.device().is_cpu() && weight.dtype() == DType::F32
    }

    fn fast_for(&self, x: &Tensor) -> Option<&Arc<fast::FastNet>> {
        self.fast
            .as_ref()
            .filter(|_| x.device().is_cpu() && x.dtype() == DType::F32)
    }

    /// Analytic cost of one image of `height` x `width`.
    pub fn cost(&self, height: usize, width: usize) -> CostReport {
        let input = FeatureShape {
            c: self.config.in_channels,
            h: height,
            w: width,
        };
        match &self.net {
            Net::Vanilla(n) => n.cost(input),
            Net::Octave(n) => n.cost(input),
        }
    }
}
