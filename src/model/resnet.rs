//! Builders for the vanilla ResNets (torchvision's layout and parameter names) and the octave
//! ResNets (d-li14/octconv.pytorch's layout and names) on the shared [`Network`] skeleton.

use candle_core::Result;
use candle_nn::VarBuilder;

use super::arch::{block_alphas, ArchSpec, BlockKind};
use super::layers::{BatchNorm, Conv2d, ConvBn, Linear};
use super::network::{Block, ConvUnit, Network};
use super::octconv::{OctConvBn, OctConvConfig};

/// Channel and class counts of one network instance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dims {
    pub in_channels: usize,
    pub num_classes: usize,
    pub base_channels: usize,
    pub alpha: f64,
}

/// One block's position and channels, handed to the block builder.
struct BlockPlan {
    stage: usize,
    index: usize,
    inplanes: usize,
    planes: usize,
    stride: usize,
}

/// Builds stem, stages and classifier; `block` builds each residual block at `layer{s}.{b}`.
fn build<U: ConvUnit>(
    vb: &VarBuilder,
    spec: &ArchSpec,
    dims: Dims,
    block: impl Fn(VarBuilder, &BlockPlan) -> Result<Block<U>>,
) -> Result<Network<U>> {
    let base = dims.base_channels;
    let (kernel, stride) = if spec.small { (3, 1) } else { (7, 2) };
    let stem = conv_bn(
        vb,
        "conv1",
        "bn1",
        dims.in_channels,
        base,
        kernel,
        stride,
        true,
    )?;
    let mut inplanes = base;
    let mut blocks = Vec::new();
    for (stage, &count) in spec.layers.iter().enumerate() {
        let planes = base << stage;
        for index in 0..count {
            let plan = BlockPlan {
                stage,
                index,
                inplanes,
                planes,
                stride: if stage > 0 && index == 0 { 2 } else { 1 },
            };
            blocks.push(block(vb.pp(format!("layer{}.{index}", stage + 1)), &plan)?);
            inplanes = planes * spec.block.expansion();
        }
    }
    Ok(Network {
        stem,
        stem_pool: !spec.small,
        blocks,
        fc: Linear::new(vb.pp("fc"), inplanes, dims.num_classes)?,
    })
}

/// torchvision's `convX` + `bnX` pair.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    relu: bool,
) -> Result<ConvBn> {
    let name = if vb.prefix().is_empty() {
        conv.to_string()
    } else {
        format!("{}.{conv}", vb.prefix())
    };
    let conv = Conv2d::new(vb.pp(conv), c_in, c_out, kernel, stride, kernel / 2, 1)?;
    Ok(ConvBn::new(
        name,
        conv,
        BatchNorm::new(vb.pp(bn), c_out)?,
        relu,
    ))
}

/// A vanilla ResNet with torchvision's parameter names.
pub fn vanilla(vb: VarBuilder, spec: &ArchSpec, dims: Dims) -> Result<Network<ConvBn>> {
    build(&vb, spec, dims, |vb, p| {
        let out = p.planes * spec.block.expansion();
        let convs = match spec.block {
            BlockKind::Basic => vec![
                conv_bn(&vb, "conv1", "bn1", p.inplanes, p.planes, 3, p.stride, true)?,
                conv_bn(&vb, "conv2", "bn2", p.planes, p.planes, 3, 1, false)?,
            ],
            BlockKind::Bottleneck => vec![
                conv_bn(&vb, "conv1", "bn1", p.inplanes, p.planes, 1, 1, true)?,
                conv_bn(&vb, "conv2", "bn2", p.planes, p.planes, 3, p.stride, true)?,
                conv_bn(&vb, "conv3", "bn3", p.planes, out, 1, 1, false)?,
            ],
        };
        let downsample = (p.stride != 1 || p.inplanes != out)
            .then(|| {
                conv_bn(
                    &vb,
                    "downsample.0",
                    "downsample.1",
                    p.inplanes,
                    out,
                    1,
                    p.stride,
                    false,
                )
            })
            .transpose()?;
        Ok(Block { convs, downsample })
    })
}

/// An octave ResNet with d-li14's parameter names and `alpha` in [0, 1).
pub fn octave(vb: VarBuilder, spec: &ArchSpec, dims: Dims) -> Result<Network<OctConvBn>> {
    build(&vb, spec, dims, |vb, p| {
        let a = block_alphas(spec, dims.alpha, p.stage, p.index);
        let out = p.planes * spec.block.expansion();
        let unit = |name: &str, cfg: OctConvConfig, relu| OctConvBn::new(vb.pp(name), cfg, relu);
        let convs = match spec.block {
            BlockKind::Basic => vec![
                unit(
                    "conv1",
                    OctConvConfig::new(p.inplanes, p.planes, 3, a.input, a.inner).stride(p.stride),
                    true,
                )?,
                unit(
                    "conv2",
                    OctConvConfig::new(p.planes, p.planes, 3, a.inner, a.output),
                    false,
                )?,
            ],
            BlockKind::Bottleneck => vec![
                unit(
                    "conv1",
                    OctConvConfig::new(p.inplanes, p.planes, 1, a.input, a.inner),
                    true,
                )?,
                unit(
                    "conv2",
                    OctConvConfig::new(p.planes, p.planes, 3, a.inner, a.inner).stride(p.stride),
                    true,
                )?,
                unit(
                    "conv3",
                    OctConvConfig::new(p.planes, out, 1, a.inner, a.output),
                    false,
                )?,
            ],
        };
        // d-li14 projects in each stage's first block; a change of alpha needs one as well.
        let projects = p.stride != 1 || p.inplanes != out || a.input != a.output;
        let downsample = projects
            .then(|| {
                let cfg =
                    OctConvConfig::new(p.inplanes, out, 1, a.input, a.output).stride(p.stride);
                unit("downsample.0", cfg, false)
            })
            .transpose()?;
        Ok(Block { convs, downsample })
    })
}
