//! Where a model's parameters come from: a safetensors file by PyTorch names, or random.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
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

    /// Two copies of one model over the same parameters: a reference on the CPU in f32, and one
    /// on `device` in `dtype`. Random parameters are drawn once, on the CPU, so the two agree
    /// (each device's random generator would draw different ones).
    pub fn build_twins<T>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl Fn(VarBuilder) -> Result<T>,
    ) -> Result<(T, T)> {
        match self {
            Self::File(path) => Ok((
                build(mmap_safetensors(path, DType::F32, &Device::Cpu)?)?,
                build(mmap_safetensors(path, dtype, device)?)?,
            )),
            Self::Random => {
                let params = VarMap::new();
                let reference = build(VarBuilder::from_varmap(&params, DType::F32, &Device::Cpu))?;
                let drawn: HashMap<String, Tensor> = params
                    .data()
                    .lock()
                    .expect("a VarMap's lock is only poisoned by a panic while building")
                    .iter()
                    .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
                    .collect();
                let twin = build(VarBuilder::from_tensors(drawn, dtype, device))?;
                Ok((reference, twin))
            }
        }
    }
}

fn mmap_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the file is mapped read-only; octserve never writes model files while serving.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .map_err(|e| e.context(format!("loading weights from {}", path.display())))
}
