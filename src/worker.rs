//! The model worker: one OS thread per variant runs its batches, so candle's compute never
//! blocks a tokio worker. A failing or panicking batch answers its own requests with an error
//! and the worker goes on with the next batch. Should the thread die anyway, a supervisor
//! thread starts a new one on a fresh copy of the model, and [`WorkerHealth`] shows the gap.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{Device, Tensor, D};
use tokio::sync::watch;

use crate::alloc::measure_peak;
use crate::batcher::{drop_expired, BatchReceiver, InferError, Job, Prediction};
use crate::device::{device_name, memory_info};
use crate::device_peak::measure_device_peak;
use crate::model::Model;

/// Anything that maps a batch of normalised CHW images to class probabilities.
pub trait BatchModel: Send + 'static {
    fn infer(&mut self, inputs: &[&[f32]]) -> anyhow::Result<Vec<Vec<f32>>>;

    /// Peak device memory the last batch held, where the device is not host memory (CUDA).
    fn device_bytes(&self) -> Option<usize> {
        None
    }
}

/// A candle [`Model`] (BatchNorm folded) on a device. Clones share the (immutable) weights.
#[derive(Clone)]
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
        // The upload counts: the input is part of what the batch holds on the device.
        let (probabilities, peak) = measure_device_peak(&self.device, || {
            // One upload per batch; only the small probability matrix comes back.
            let batch = Tensor::from_vec(data, (inputs.len(), c, h, w), &self.device)?;
            let logits = self.model.forward(&batch)?;
            candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()
        });
        self.last_device_bytes = match peak {
            Some(Ok(peak)) => Some(peak.bytes),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "device peak memory not measured for this batch");
                None
            }
            None => None,
        };
        if let Some(after) = memory_info(&self.device) {
            crate::metrics::device_memory(&device_name(&self.device), after);
        }
        Ok(probabilities?)
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
    /// Peak bytes the forward pass held at once: host memory on the worker thread, or on CUDA
    /// device memory (the memory pool's watermark: `crate::device_peak`).
    pub peak_bytes: usize,
    pub ok: bool,
}

/// A dead worker is restarted after this pause, so a model that dies at once cannot spin.
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// How many model workers are down right now; the server's health follows it.
#[derive(Clone, Debug)]
pub struct WorkerHealth(Arc<watch::Sender<usize>>);

impl Default for WorkerHealth {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl WorkerHealth {
    pub fn all_up(&self) -> bool {
        *self.0.borrow() == 0
    }

    /// Changes whenever a worker dies or is back.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.0.subscribe()
    }

    fn change(&self, delta: isize) {
        self.0
            .send_modify(|down| *down = down.saturating_add_signed(delta));
    }
}

type Batches = Arc<Mutex<BatchReceiver>>;

/// Starts one variant's worker thread, and its supervisor, which restarts the worker on a fresh
/// clone of `model` if it dies. Both end when `batches` closes.
pub fn spawn_worker(
    name: &str,
    model: impl BatchModel + Clone,
    batches: BatchReceiver,
    observe: impl Fn(&BatchReport) + Send + Sync + 'static,
    health: WorkerHealth,
) -> std::io::Result<JoinHandle<()>> {
    let batches: Batches = Arc::new(Mutex::new(batches));
    let observe = Arc::new(observe);
    let thread_name = format!("model-{name}");
    let start = move || {
        let (model, batches, observe) = (model.clone(), batches.clone(), observe.clone());
        std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || serve_batches(model, &batches, &*observe))
    };
    let mut worker = start()?;
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("supervise-{name}"))
        .spawn(move || loop {
            let Err(panic) = worker.join() else {
                return; // `batches` closed: a normal end
            };
            health.change(1);
            let cause = panic_message(panic.as_ref());
            tracing::error!(worker = %name, %cause, "model worker died; restarting it");
            std::thread::sleep(RESTART_DELAY);
            match start() {
                Ok(restarted) => worker = restarted,
                Err(e) => {
                    tracing::error!(worker = %name, error = %e, "could not restart the model worker");
                    return;
                }
            }
            health.change(-1);
            tracing::info!(worker = %name, "model worker restarted");
        })
}

fn serve_batches(mut model: impl BatchModel, batches: &Batches, observe: &dyn Fn(&BatchReport)) {
    loop {
        // A worker that died never holds the lock: it is only held while waiting.
        let batch = batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_batch();
        let Some(batch) = batch else { return };
        // A job whose caller gave up or whose time ran out while the batch waited for the
        // worker is not computed.
        let batch = drop_expired(batch);
        if batch.is_empty() {
            continue;
        }
        // Test hook (tests/faults.rs): kills this thread with the batch unanswered.
        fail::fail_point!("worker-dies");
        let report = run_batch(&mut model, batch);
        observe(&report);
    }
}

fn run_batch(model: &mut impl BatchModel, batch: Vec<Job>) -> BatchReport {
    let started = tokio::time::Instant::now();
    let inputs: Vec<&[f32]> = batch.iter().map(|j| j.input.as_slice()).collect();
    let (outcome, host_peak_bytes) = measure_peak(|| {
        catch_unwind(AssertUnwindSafe(|| {
            // Test hook (tests/faults.rs): this batch fails.
            fail::fail_point!("model-fails", |_| Err(anyhow::anyhow!("injected fault")));
            model.infer(&inputs)
        }))
    });
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
