//! `octserve bench`: offline forward-pass benchmark of one model on this machine.

use std::time::Instant;

use candle_core::{DType, Tensor};
use clap::Args;
use serde::Serialize;

use octserve::alloc::measure_peak;
use octserve::device::{device_name, memory_info, parse_device};
use octserve::model::weights::WeightSource;
use octserve::model::Model;

use super::{print_json, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, env = "OCTSERVE_BATCH_SIZE", default_value_t = 1)]
    pub batch_size: usize,
    /// Timed iterations (after two untimed warm-up passes).
    #[arg(long, env = "OCTSERVE_ITERS", default_value_t = 20)]
    pub iters: usize,
    /// A safetensors file by PyTorch names, or `random`.
    #[arg(long, env = "OCTSERVE_WEIGHTS", default_value = "random")]
    pub weights: WeightSource,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "OCTSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weights and activations: f32, f16 or bf16 (half precision is meant for CUDA).
    #[arg(long, env = "OCTSERVE_DTYPE", default_value = "f32")]
    pub dtype: DType,
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
}

#[derive(Serialize)]
struct BenchReport {
    arch: String,
    alpha: f64,
    device: String,
    dtype: String,
    input_size: usize,
    batch_size: usize,
    iters: usize,
    threads: usize,
    latency_ms_p50: f64,
    latency_ms_p90: f64,
    images_per_sec: f64,
    /// Peak bytes allocated during one forward pass (all images of the batch): host memory on
    /// the CPU, device memory taken from the driver on CUDA.
    peak_bytes: usize,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let vb = args.weights.var_builder(args.dtype, &device)?;
    let model = Model::new(args.model.config(), vb)?.folded()?;
    let size = args.model.input_size;
    let shape = (args.batch_size, args.model.in_channels, size, size);
    let input = Tensor::randn(0f32, 1., shape, &device)?.to_dtype(args.dtype)?;

    // Each pass ends by copying the logits back, which waits for an asynchronous device.
    let forward = || {
        model
            .forward(&input)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
    };
    // Device memory is measured from before the first pass: its allocator keeps what it took.
    let untouched = memory_info(&device);
    for _ in 0..2 {
        forward()?;
    }
    let mut latencies = Vec::with_capacity(args.iters);
    let mut peak_bytes = 0;
    for _ in 0..args.iters.max(1) {
        let start = Instant::now();
        let (out, host_peak) = measure_peak(forward);
        out?;
        let peak = match (untouched, memory_info(&device)) {
            (Some(before), Some(now)) => before.free.saturating_sub(now.free),
            _ => host_peak,
        };
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
        peak_bytes = peak_bytes.max(peak);
    }
    latencies.sort_by(f64::total_cmp);
    let p50 = percentile(&latencies, 0.5);
    let report = BenchReport {
        arch: args.model.arch.to_string(),
        alpha: args.model.alpha,
        device: device_name(&device),
        dtype: format!("{:?}", args.dtype).to_lowercase(),
        input_size: size,
        batch_size: args.batch_size,
        iters: latencies.len(),
        threads: candle_core::utils::get_num_threads(),
        latency_ms_p50: p50,
        latency_ms_p90: percentile(&latencies, 0.9),
        images_per_sec: args.batch_size as f64 / (p50 / 1e3),
        peak_bytes,
    };
    if args.json {
        print_json(&report)
    } else {
        println!(
            "{} alpha {} batch {} at {size}x{size}, {} threads: p50 {:.2} ms, p90 {:.2} ms, {:.1} images/s, peak {:.1} MB",
            report.arch, report.alpha, report.batch_size, report.threads, report.latency_ms_p50,
            report.latency_ms_p90, report.images_per_sec, report.peak_bytes as f64 / 1e6
        );
        Ok(())
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
