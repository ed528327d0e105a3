//! Architecture presets: the names of `--arch` and the layout each one builds.

use std::fmt;
use std::str::FromStr;

/// Residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34 and the small nets).
    Basic,
    /// 1x1 -> 3x3 -> 1x1 with 4x expansion, stride on the 3x3 (torchvision's "ResNet v1.5").
    Bottleneck,
}

impl BlockKind {
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// One `--arch` preset.
#[derive(Debug, PartialEq, Eq)]
pub struct ArchSpec {
    pub name: &'static str,
    pub octave: bool,
    pub block: BlockKind,
    /// Blocks per stage; stage `i` has `base_channels * 2^i` planes, stride 2 from the second on.
    pub layers: &'static [usize],
    /// Small-input nets (3 stages, 16 base channels): 3x3 stem, no max pool.
    pub small: bool,
}

impl ArchSpec {
    pub fn default_base_channels(&self) -> usize {
        if self.small {
            16
        } else {
            64
        }
    }
}

const fn spec(
    name: &'static str,
    octave: bool,
    block: BlockKind,
    layers: &'static [usize],
    small: bool,
) -> ArchSpec {
    ArchSpec {
        name,
        octave,
        block,
        layers,
        small,
    }
}

use BlockKind::{Basic, Bottleneck};

/// Every architecture octserve builds (names as in docs/contract.md).
pub static ARCHS: &[ArchSpec] = &[
    spec("resnet18", false, Basic, &[2, 2, 2, 2], false),
    spec("resnet34", false, Basic, &[3, 4, 6, 3], false),
    spec("resnet26", false, Bottleneck, &[2, 2, 2, 2], false),
    spec("resnet50", false, Bottleneck, &[3, 4, 6, 3], false),
    spec("resnet101", false, Bottleneck, &[3, 4, 23, 3], false),
    spec("resnet152", false, Bottleneck, &[3, 8, 36, 3], false),
    spec("oct-resnet26", true, Bottleneck, &[2, 2, 2, 2], false),
    spec("oct-resnet50", true, Bottleneck, &[3, 4, 6, 3], false),
    spec("oct-resnet101", true, Bottleneck, &[3, 4, 23, 3], false),
    spec("oct-resnet152", true, Bottleneck, &[3, 8, 36, 3], false),
    spec("resnet20", false, Basic, &[3, 3, 3], true),
    spec("resnet32", false, Basic, &[5, 5, 5], true),
    spec("resnet56", false, Basic, &[9, 9, 9], true),
    spec("oct-resnet20", true, Basic, &[3, 3, 3], true),
    spec("oct-resnet32", true, Basic, &[5, 5, 5], true),
    spec("oct-resnet56", true, Basic, &[9, 9, 9], true),
];

/// A validated architecture name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch(&'static ArchSpec);

impl Arch {
    pub fn spec(&self) -> &'static ArchSpec {
        self.0
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ARCHS.iter().find(|a| a.name == s).map(Arch).ok_or_else(|| {
            let names: Vec<_> = ARCHS.iter().map(|a| a.name).collect();
            format!(
                "unknown architecture '{s}'; expected one of {}",
                names.join(", ")
            )
        })
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

/// Octave alphas of one residual block: its input, its inner convs, its output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockAlphas {
    pub input: f64,
    pub inner: f64,
    pub output: f64,
}

/// Where each block of an octave net splits and merges the frequency branches.
///
/// The first block splits (input 0 -> alpha). Bottleneck nets merge as d-li14's Oct-ResNet does:
/// the last stage's first `conv1` goes alpha -> 0 and the stage stays at 0. The small 3-stage
/// nets merge only in the last block's second conv, so the savings cover all three stages
/// (one third of their compute each) and the classifier still reads one full-resolution map.
pub fn block_alphas(spec: &ArchSpec, alpha: f64, stage: usize, block: usize) -> BlockAlphas {
    let uniform = |a| BlockAlphas {
        input: a,
        inner: a,
        output: a,
    };
    let last_stage = stage + 1 == spec.layers.len();
    let last_block = block + 1 == spec.layers[stage];
    match (spec.block, stage, block) {
        (_, 0, 0) => BlockAlphas {
            input: 0.,
            ..uniform(alpha)
        },
        (BlockKind::Bottleneck, _, 0) if last_stage => BlockAlphas {
            input: alpha,
            ..uniform(0.)
        },
        (BlockKind::Bottleneck, _, _) if last_stage => uniform(0.),
        (BlockKind::Basic, _, _) if last_stage && last_block => BlockAlphas {
            output: 0.,
            ..uniform(alpha)
        },
        _ => uniform(alpha),
    }
}
