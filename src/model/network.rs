//! The ResNet skeleton shared by the vanilla and the octave networks (He et al., "Deep Residual
//! Learning for Image Recognition", CVPR 2016): a stem, residual blocks, global pool and `fc`.
//!
//! The skeleton is generic over its conv unit: torchvision's conv+BN pair on plain tensors, or
//! d-li14's octave `Conv_BN` on two-branch maps. Everything else (residual wiring, cost walk,
//! BatchNorm folding) is written once.

use candle_core::{Module, Result, Tensor};

use super::cost::{CostReport, CostTracker, FeatureShape, OctShape};
use super::fast::{FastBlock, FastLayer, FastNet};
use super::grid::halved;
use super::layers::{global_avg_pool, max_pool3x3s2p1, ConvBn, Linear};
use super::octconv::{OctConvBn, OctTensor};

/// A feature map a residual block can carry: a plain tensor or an octave pair.
pub trait FeatureMap: From<Tensor> + Sized {
    type Shape: Copy + Into<OctShape> + From<FeatureShape>;

    fn add_relu(&self, other: &Self) -> Result<Self>;
    /// The full-resolution part, which the classifier reads.
    fn high(&self) -> &Tensor;
    fn high_shape(shape: Self::Shape) -> FeatureShape;
}

impl FeatureMap for Tensor {
    type Shape = FeatureShape;

    fn add_relu(&self, other: &Self) -> Result<Self> {
        self.add(other)?.relu()
    }

    fn high(&self) -> &Tensor {
        self
    }

    fn high_shape(shape: FeatureShape) -> FeatureShape {
        shape
    }
}

impl FeatureMap for OctTensor {
    type Shape = OctShape;

    fn add_relu(&self, other: &Self) -> Result<Self> {
        OctTensor::add_relu(self, other)
    }

    fn high(&self) -> &Tensor {
        &self.high
    }

    fn high_shape(shape: OctShape) -> FeatureShape {
        shape.high
    }
}

/// A conv layer (with BatchNorm, optionally ReLU) on one kind of feature map.
pub trait ConvUnit: Sized {
    type Map: FeatureMap;

    fn forward(&self, x: &Self::Map) -> Result<Self::Map>;
    fn cost(
        &self,
        x: <Self::Map as FeatureMap>::Shape,
        t: &mut CostTracker,
    ) -> <Self::Map as FeatureMap>::Shape;
    fn folded(&self) -> Result<Self>;
    fn fast(&self) -> Result<FastLayer>;
}

impl ConvUnit for ConvBn {
    type Map = Tensor;

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Module::forward(self, x)
    }

    fn cost(&self, x: FeatureShape, t: &mut CostTracker) -> FeatureShape {
        ConvBn::cost(self, x, t)
    }

    fn folded(&self) -> Result<Self> {
        ConvBn::folded(self)
    }

    fn fast(&self) -> Result<FastLayer> {
        ConvBn::fast(self)
    }
}

impl ConvUnit for OctConvBn {
    type Map = OctTensor;

    fn forward(&self, x: &OctTensor) -> Result<OctTensor> {
        OctConvBn::forward(self, x)
    }

    fn cost(&self, x: OctShape, t: &mut CostTracker) -> OctShape {
        OctConvBn::cost(self, x, t)
    }

    fn folded(&self) -> Result<Self> {
        OctConvBn::folded(self)
    }

    fn fast(&self) -> Result<FastLayer> {
        OctConvBn::fast(self)
    }
}

type ShapeOf<U> = <<U as ConvUnit>::Map as FeatureMap>::Shape;

/// A residual block: a chain of conv units (the last without ReLU), an optional projection
/// shortcut, then add and ReLU. Basic blocks have two units, bottlenecks three.
#[derive(Clone, Debug)]
pub struct Block<U> {
    pub convs: Vec<U>,
    pub downsample: Option<U>,
}

impl<U: ConvUnit> Block<U> {
    fn forward(&self, x: &U::Map) -> Result<U::Map> {
        let mut y = self.convs[0].forward(x)?;
        for conv in &self.convs[1..] {
            y = conv.forward(&y)?;
        }
        match &self.downsample {
            Some(ds) => y.add_relu(&ds.forward(x)?),
            None => y.add_relu(x),
        }
    }

    /// Walks the block; the input stays alive until the shortcut has read it.
    fn cost(&self, x: ShapeOf<U>, t: &mut CostTracker) -> ShapeOf<U> {
        let bytes = |s: ShapeOf<U>| s.into().bytes();
        let mut y = x;
        let mut previous: Option<ShapeOf<U>> = None;
        for conv in &self.convs {
            y = conv.cost(y, t);
            if let Some(p) = previous.replace(y) {
                t.release(bytes(p));
            }
        }
        if let Some(ds) = &self.downsample {
            let shortcut = ds.cost(x, t);
            t.release(bytes(shortcut));
        }
        t.release(bytes(x));
        y
    }

    fn folded(&self) -> Result<Self> {
        Ok(Self {
            convs: self.convs.iter().map(U::folded).collect::<Result<_>>()?,
            downsample: self.downsample.as_ref().map(U::folded).transpose()?,
        })
    }
}

/// Stem, residual blocks in order, global average pool and the classifier.
#[derive(Clone, Debug)]
pub struct Network<U> {
    pub stem: ConvBn,
    /// ImageNet-style stems end with a 3x3/2 max pool; the small-input nets have none.
    pub stem_pool: bool,
    pub blocks: Vec<Block<U>>,
    pub fc: Linear,
}

impl<U: ConvUnit> Network<U> {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = Module::forward(&self.stem, x)?;
        if self.stem_pool {
            x = max_pool3x3s2p1(&x)?;
        }
        let mut x = U::Map::from(x);
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.fc.forward(&global_avg_pool(x.high())?)
    }

    pub fn folded(&self) -> Result<Self> {
        Ok(Self {
            stem: self.stem.folded()?,
            stem_pool: self.stem_pool,
            blocks: self
                .blocks
                .iter()
                .map(Block::folded)
                .collect::<Result<_>>()?,
            fc: self.fc.detached(),
        })
    }

    /// The fast CPU form of a folded network.
    pub fn fast(&self) -> Result<FastNet> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(FastBlock {
                    convs: b.convs.iter().map(U::fast).collect::<Result<_>>()?,
                    downsample: b.downsample.as_ref().map(U::fast).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        FastNet::new(
            self.stem.fast()?,
            self.stem_pool,
            blocks,
            self.fc.weight(),
            self.fc.bias(),
        )
    }

    pub fn cost(&self, input: FeatureShape) -> CostReport {
        let mut t = CostTracker::default();
        let mut x = self.stem.cost(input, &mut t);
        if self.stem_pool {
            let pooled = t.layer("maxpool", |_| FeatureShape {
                h: halved(x.h),
                w: halved(x.w),
                ..x
            });
            t.release(x.bytes());
            x = pooled;
        }
        let mut x = ShapeOf::<U>::from(x);
        for block in &self.blocks {
            x = block.cost(x, &mut t);
        }
        let high = U::Map::high_shape(x);
        let features = FeatureShape {
            c: high.c,
            h: 1,
            w: 1,
        };
        t.layer("avgpool", |_| features);
        t.release(x.into().bytes());
        let classes = t.layer("fc", |t| FeatureShape {
            c: self.fc.cost(features.c, t),
            h: 1,
            w: 1,
        });
        t.release(features.bytes());
        t.release(classes.bytes());
        t.finish()
    }
}
