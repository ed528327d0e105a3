//! Analytic cost of a forward pass, walked from the model's own structure.
//!
//! Conventions (those of the OctConv paper and d-li14/octconv.pytorch): `macs` counts the
//! multiply-accumulates of convolutions and of the final linear layer for one image; `params`
//! counts weights, biases and BatchNorm affine parameters (not running statistics). Activation
//! memory counts the feature maps each layer produces (f32, one image): BatchNorm, ReLU and the
//! residual add work in place on them, as PyTorch's ResNets do. The peak is the largest total of
//! maps alive at once when a map is freed after its last reader.

use serde::Serialize;

use super::layers::F32_BYTES;

/// Channels and spatial size of one feature map (batch excluded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureShape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl FeatureShape {
    pub fn numel(&self) -> usize {
        self.c * self.h * self.w
    }

    pub fn bytes(&self) -> usize {
        self.numel() * F32_BYTES
    }
}

/// The shapes of an octave feature map: the high-frequency part and the optional low part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OctShape {
    pub high: FeatureShape,
    pub low: Option<FeatureShape>,
}

impl OctShape {
    pub fn bytes(&self) -> usize {
        self.high.bytes() + self.low.map_or(0, |l| l.bytes())
    }
}

impl From<FeatureShape> for OctShape {
    fn from(high: FeatureShape) -> Self {
        Self { high, low: None }
    }
}

/// Cost of one named layer (a conv with its BatchNorm, a pool, the classifier).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LayerCost {
    pub name: String,
    pub macs: usize,
    pub params: usize,
    pub output_bytes: usize,
}

/// Totals for one image, as reported by `octserve inspect`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CostReport {
    pub params: usize,
    pub macs: usize,
    pub activation_bytes: usize,
    pub peak_activation_bytes: usize,
    pub layers: Vec<LayerCost>,
}

/// Accumulates costs while a model walks its layers in forward order.
#[derive(Default, Debug)]
pub struct CostTracker {
    layers: Vec<LayerCost>,
    macs: usize,
    params: usize,
    live_bytes: usize,
    peak_bytes: usize,
    produced_bytes: usize,
}

impl CostTracker {
    pub fn add_macs(&mut self, macs: usize) {
        self.macs += macs;
    }

    pub fn add_params(&mut self, params: usize) {
        self.params += params;
    }

    /// Records a feature map of `bytes` coming alive.
    pub fn produce(&mut self, bytes: usize) {
        self.produced_bytes += bytes;
        self.live_bytes += bytes;
        self.peak_bytes = self.peak_bytes.max(self.live_bytes);
    }

    /// Records a feature map of `bytes` being freed after its last reader.
    pub fn release(&mut self, bytes: usize) {
        self.live_bytes -= bytes;
    }

    /// Runs `walk` (which adds MACs and params and returns the layer's output), records the
    /// output map as produced and the whole as one named layer.
    pub fn layer<S: Into<OctShape> + Copy>(
        &mut self,
        name: &str,
        walk: impl FnOnce(&mut Self) -> S,
    ) -> S {
        let (macs, params) = (self.macs, self.params);
        let out = walk(self);
        let output_bytes = out.into().bytes();
        self.produce(output_bytes);
        self.layers.push(LayerCost {
            name: name.to_string(),
            macs: self.macs - macs,
            params: self.params - params,
            output_bytes,
        });
        out
    }

    pub fn finish(self) -> CostReport {
        CostReport {
            params: self.params,
            macs: self.macs,
            activation_bytes: self.produced_bytes,
            peak_activation_bytes: self.peak_bytes,
            layers: self.layers,
        }
    }
}
