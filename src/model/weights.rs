//! Where a model's parameters come from: a safetensors file by PyTorch names, or random.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};

/// A parameter source, as given by `--weights FILE|random`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightSource {
    /// A safetensors file keyed by PyTorch parameter names (see `tools/convert_checkpoint.py`).
    File(PathBuf),
    /// Kaiming-normal convs, identity BatchNorms: for benchmarks and shape checks.
    Random,
}

impl std::str::FromStr for WeightSource {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if s == "random" {
            Self::Random
        } else {
            Self::File(s.into())
        })
    }
}

impl WeightSource {
    /// A `VarBuilder` over this source. Files are memory-mapped and converted to `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            Self::File(path) => mmap_safetensors(path, dtype, device),
            Self::Random => Ok(VarBuilder::from_varmap(&VarMap::new(), dtype, device)),
        }
    }
}

fn mmap_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the file is mapped read-only; octserve never writes model files while serving.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .map_err(|e| e.context(format!("loading weights from {}", path.display())))
}
