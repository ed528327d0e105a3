//! The model worker: one OS thread per variant runs its batches, so candle's compute never
//! blocks a tokio worker. A failing or panicking batch answers its own requests with an error
//! and the worker goes on with the next batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use candle_core::{Device, Tensor, D};
use tokio::sync::mpsc;

use crate::alloc::measure_peak;
use crate::batcher::{InferError, Job, Prediction};
use crate::device::{device_name, memory_info};
use crate::model::Model;

/// Anything that maps a batch of normalised CHW images to class probabilities.
pub trait BatchModel: Send + 'static {
    fn infer(&mut self, inputs: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>>;

    /// Device memory the last batch took, where the device is not host memory (CUDA).
    fn device_bytes(&self) -> Option<usize> {
        None
    }
}

/// A candle [`Model`] (BatchNorm folded) on a device.
pub struct CandleClassifier {
    model: Model,
    device: Device,
    /// (channels, height, width) of one input.
    shape: (usize, usize, usize),
    last_device_bytes: Option<usize>,
}

impl CandleClassifier {
    pub fn new(model: Model, device: Device, shape: (usize, usize, usize)) -> Self {
        Self {
            model,
            device,
            shape,
            last_device_bytes: None,
        }
    }
}

impl BatchModel for CandleClassifier {
    fn infer(&mut self, inputs: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        let (c, h, w) = self.shape;
        let data: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        let before = memory_info(&self.device);
        // One upload per batch; only the small probability matrix comes back.
        let batch = Tensor::from_vec(data, (inputs.len(), c, h, w), &self.device)?;
        let logits = self.model.forward(&batch)?;
        let probabilities = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?;
        // Copying the result back synchronised the device, so the query sees the batch's memory.
        if let (Some(before), Some(after)) = (before, memory_info(&self.device)) {
            self.last_device_bytes = Some(before.free.saturating_sub(after.free));
            crate::metrics::device_memory(&device_name(&self.device), after);
        }
        Ok(probabilities)
    }

    fn device_bytes(&self) -> Option<usize> {
        self.last_device_bytes
    }
}

/// What the worker observed computing one batch, for metrics.
#[derive(Clone, Copy, Debug)]
pub struct BatchReport {
    pub size: usize,
    pub compute_time: Duration,
    /// Peak bytes the forward pass allocated: host memory on the worker thread, or on CUDA the
    /// device memory the batch took from the driver.
    pub peak_bytes: usize,
    pub ok: bool,
}

/// Starts the worker thread for one variant. It ends when `batches` closes.
pub fn spawn_worker(
    name: &str,
    mut model: impl BatchModel,
    mut batches: mpsc::Receiver<Vec<Job>>,
    observe: impl Fn(&BatchReport) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("model-{name}"))
        .spawn(move || {
            while let Some(batch) = batches.blocking_recv() {
                // A caller that gave up while the batch waited for the worker is not computed.
                let batch: Vec<Job> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
                if batch.is_empty() {
                    continue;
                }
                let report = run_batch(&mut model, batch);
                observe(&report);
            }
        })
}

fn run_batch(model: &mut impl BatchModel, batch: Vec<Job>) -> BatchReport {
    let started = tokio::time::Instant::now();
    let inputs: Vec<&[f32]> = batch.iter().map(|j| j.input.as_slice()).collect();
    let (outcome, host_peak_bytes) =
        measure_peak(|| catch_unwind(AssertUnwindSafe(|| model.infer(&inputs))));
    let peak_bytes = model.device_bytes().unwrap_or(host_peak_bytes);
    let compute_time = started.elapsed();
    let outputs = match outcome {
        Ok(Ok(outputs)) if outputs.len() == batch.len() => Ok(outputs),
        Ok(Ok(outputs)) => Err(format!(
            "returned {} results for {} inputs",
            outputs.len(),
            batch.len()
        )),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => Err(panic_message(panic.as_ref())),
    };
    let size = batch.len();
    let report = BatchReport {
        size,
        compute_time,
        peak_bytes,
        ok: outputs.is_ok(),
    };
    match outputs {
        Ok(outputs) => {
            for (job, probabilities) in batch.into_iter().zip(outputs) {
                let prediction = Prediction {
                    probabilities,
                    queue_time: started.saturating_duration_since(job.enqueued),
                    compute_time,
                    batch_size: size,
                };
                let _ = job.reply.send(Ok(prediction));
            }
        }
        Err(message) => {
            tracing::error!(%message, size, "batch failed");
            for job in batch {
                let _ = job.reply.send(Err(InferError::Model(message.clone())));
            }
        }
    }
    report
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into());
    format!("the model panicked: {text}")
}
