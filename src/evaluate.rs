//! Top-1 accuracy of a model over a labelled data set, batched.

use candle_core::{Device, Tensor, D};

use crate::dataset::LabelledImages;
use crate::model::Model;
use crate::preprocess::{normalise, InputSpec};

/// Images per forward pass.
const BATCH: usize = 500;

pub struct Evaluation {
    pub correct: usize,
    pub n: usize,
    /// `[n, classes]` logits, in data-set order.
    pub logits: Tensor,
}

impl Evaluation {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.n as f64
    }
}

/// Runs `model` over every image of `data`, normalised as `spec` says.
pub fn evaluate(
    model: &Model,
    spec: &InputSpec,
    data: &LabelledImages,
    device: &Device,
) -> anyhow::Result<Evaluation> {
    anyhow::ensure!(
        (data.height, data.width, spec.channels) == (spec.height, spec.width, 1),
        "the data set is {}x{} grayscale; the model takes {}x{} with {} channels",
        data.height,
        data.width,
        spec.height,
        spec.width,
        spec.channels
    );
    let mut correct = 0;
    let mut logits = Vec::new();
    for first in (0..data.len()).step_by(BATCH) {
        let count = BATCH.min(data.len() - first);
        let inputs: Vec<f32> = (first..first + count)
            .flat_map(|i| normalise(data.image(i), spec))
            .collect();
        let batch = Tensor::from_vec(inputs, (count, 1, spec.height, spec.width), device)?;
        let batch_logits = model.forward(&batch)?;
        let predicted: Vec<u32> = batch_logits.argmax(D::Minus1)?.to_vec1()?;
        correct += predicted
            .iter()
            .zip(&data.labels[first..first + count])
            .filter(|(p, l)| **p == u32::from(**l))
            .count();
        logits.push(batch_logits);
    }
    Ok(Evaluation {
        correct,
        n: data.len(),
        logits: Tensor::cat(&logits, 0)?,
    })
}
