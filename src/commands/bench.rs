//! `octserve bench`: offline forward-pass benchmark of one model on this machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;

use octserve::alloc::measure_peak;
use octserve::device::{device_name, parse_device};
use octserve::device_peak::{analytic_peak_bytes, measure_device_peak, PeakSource};
use octserve::model::arch::Arch;
use octserve::model::weights::WeightSource;
use octserve::model::{Model, ModelConfig};
use octserve::stats::percentiles;

use super::{at_least_one, print_json, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per forward pass, at least 1.
    #[arg(long, env = "OCTSERVE_BATCH_SIZE", default_value_t = 1, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Timed iterations (after two untimed warm-up passes), at least 1.
    #[arg(long, env = "OCTSERVE_ITERS", default_value_t = 20, value_parser = at_least_one)]
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
    /// Also time every layer (fast CPU path only) and print where the time goes.
    #[arg(long)]
    pub profile: bool,
    /// Also compare the logits with the plain candle network (BatchNorm unfolded) on the CPU in
    /// f32, on the same weights and input: the check that a device or the fast path is right.
    #[arg(long)]
    pub parity: bool,
    /// Also time this architecture (same alpha, sizes and batch; random weights), its passes
    /// alternating with the benchmarked model's, and report the median per-pass latency ratio.
    /// On a shared, noisy machine both then see the same conditions: the fairest side by side.
    #[arg(long)]
    pub versus: Option<Arch>,
    /// Also write the benchmark's input (NCHW) and the benchmarked model's logits for it to this
    /// safetensors file, as f32 tensors `input` and `logits`: what another engine's output on
    /// the same weights is checked against.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
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
    /// The most bytes one forward pass (all images of the batch) held at once above what was
    /// allocated before it (weights, input): on the CPU host memory, the largest over the
    /// timed passes; on CUDA device memory, of one pass after the warm-up.
    peak_bytes: usize,
    /// How `peak_bytes` was measured: `host-allocator`, `cuda-mempool` (both exact peaks) or
    /// `driver-free-delta` (a device without memory pools: what a pass retained, not its peak).
    peak_source: PeakSource,
    /// The feature maps a pass must hold at once by the analytic cost walk, for this batch and
    /// dtype: a floor for `peak_bytes` wherever the plain candle network runs (CUDA, and the
    /// CPU off f32); the fast CPU path reuses its buffers and may stay below it.
    analytic_peak_bytes: usize,
    /// With `--profile`: per layer, median over the iterations.
    #[serde(skip_serializing_if = "Option::is_none")]
    layers: Option<Vec<LayerProfile>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parity: Option<Parity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    versus: Option<Versus>,
}

/// `--versus`: the other architecture, timed in the same run, pass for pass.
#[derive(Serialize)]
struct Versus {
    arch: String,
    latency_ms_p50: f64,
    latency_ms_p90: f64,
    /// The median over iterations of this model's pass time over the other's in that
    /// iteration (< 1: this model is faster).
    ratio_p50: f64,
}

/// `--parity`: the benchmarked model's logits against the CPU f32 reference.
#[derive(Serialize)]
struct Parity {
    max_abs_diff: f64,
    /// The largest reference logit magnitude, for scale.
    max_abs_logit: f64,
    /// Images whose top-1 class is the reference's.
    top1_equal: usize,
    images: usize,
}

impl Parity {
    fn measure(reference: &Model, model: &Model, input: &Tensor) -> anyhow::Result<Self> {
        let logits = |model: &Model, x: &Tensor| -> anyhow::Result<Vec<Vec<f32>>> {
            Ok(model.forward(x)?.to_dtype(DType::F32)?.to_vec2()?)
        };
        let expected = logits(
            reference,
            &input.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        )?;
        let got = logits(model, input)?;
        let argmax = |row: &[f32]| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
        let rows = || expected.iter().zip(&got);
        let diffs = rows().flat_map(|(e, g)| e.iter().zip(g).map(|(e, g)| (e - g).abs()));
        Ok(Self {
            max_abs_diff: diffs.fold(0f32, f32::max).into(),
            max_abs_logit: expected
                .iter()
                .flatten()
                .fold(0f32, |m, v| m.max(v.abs()))
                .into(),
            top1_equal: rows().filter(|(e, g)| argmax(e) == argmax(g)).count(),
            images: expected.len(),
        })
    }
}

#[derive(Serialize)]
struct LayerProfile {
    name: String,
    ms: f64,
    /// Multiply-accumulates of the whole batch through this layer.
    macs: usize,
    gflops: f64,
}

/// Per-layer medians of `iters` profiled passes, with the layers' MACs from the cost walk.
fn profile_layers(
    model: &Model,
    input: &Tensor,
    iters: usize,
) -> anyhow::Result<Vec<LayerProfile>> {
    let (batch, _, h, w) = input.dims4()?;
    let cost = model.cost(h, w);
    let mut runs = Vec::with_capacity(iters);
    for _ in 0..iters {
        let Some(times) = model.profile(input)? else {
            anyhow::bail!("--profile times the fast CPU path (f32 on the CPU) only");
        };
        runs.push(times);
    }
    let layers = runs[0]
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let ms: Vec<f64> = runs.iter().map(|r| r[i].1.as_secs_f64() * 1e3).collect();
            let [ms] = percentiles(ms, [0.5]);
            let macs = batch
                * cost
                    .layers
                    .iter()
                    .find(|l| &l.name == name)
                    .map_or(0, |l| l.macs);
            LayerProfile {
                name: name.clone(),
                ms,
                macs,
                gflops: 2.0 * macs as f64 / (ms * 1e6),
            }
        })
        .collect();
    Ok(layers)
}

/// `--logits-out`: the input and the model's logits for it, on the CPU in f32.
fn save_logits(model: &Model, input: &Tensor, path: &PathBuf) -> anyhow::Result<()> {
    let on_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let tensors = HashMap::from([
        ("input", on_cpu(input)?),
        ("logits", on_cpu(&model.forward(input)?)?),
    ]);
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let config = args.model.config();
    let (reference, model) = if args.parity {
        let (reference, model) = args
            .weights
            .build_twins(args.dtype, &device, |vb| Model::new(config, vb))?;
        (Some(reference), model)
    } else {
        let vb = args.weights.var_builder(args.dtype, &device)?;
        (None, Model::new(config, vb)?)
    };
    let model = model.folded()?;
    let versus = args
        .versus
        .map(|arch| -> anyhow::Result<Model> {
            let config = ModelConfig { arch, ..config };
            let vb = WeightSource::Random.var_builder(args.dtype, &device)?;
            Ok(Model::new(config, vb)?.folded()?)
        })
        .transpose()?;
    let size = args.model.input_size;
    let shape = (args.batch_size, args.model.in_channels, size, size);
    let bytes = [shape.0, shape.1, size, size, 4]
        .into_iter()
        .try_fold(1usize, usize::checked_mul)
        .filter(|&bytes| bytes <= isize::MAX as usize);
    anyhow::ensure!(
        bytes.is_some(),
        "a batch of {} inputs of {}x{size}x{size} floats is too large to allocate",
        shape.0,
        shape.1
    );
    // Drawn on the CPU (so a parity reference can see the same numbers), uploaded once.
    let input = Tensor::randn(0f32, 1., shape, &Device::Cpu)?
        .to_device(&device)?
        .to_dtype(args.dtype)?;
    let parity = reference
        .map(|reference| Parity::measure(&reference, &model, &input))
        .transpose()?;
    if let Some(path) = &args.logits_out {
        save_logits(&model, &input, path)?;
    }

    // Each pass ends by copying the logits back, which waits for an asynchronous device.
    let forward = |model: &Model| {
        model
            .forward(&input)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
    };
    let timed = |model: &Model| -> anyhow::Result<f64> {
        let start = Instant::now();
        forward(model)?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    for model in std::iter::once(&model).chain(&versus) {
        for _ in 0..2 {
            forward(model)?;
        }
    }
    // A device's memory is measured on one more untimed pass, after the warm-up: reading its
    // pool's counters waits for the device, which the timed passes should not pay for.
    let (out, device_peak) = measure_device_peak(&device, || forward(&model));
    out?;
    let device_peak = device_peak.transpose()?;
    let mut latencies = Vec::with_capacity(args.iters);
    let (mut versus_latencies, mut ratios) = (Vec::new(), Vec::new());
    let mut host_peak_bytes = 0;
    for i in 0..args.iters.max(1) {
        // The other model goes first every other iteration, so neither always runs warm.
        let other_first = versus
            .as_ref()
            .filter(|_| i % 2 == 1)
            .map(timed)
            .transpose()?;
        let start = Instant::now();
        let (out, host_peak) = measure_peak(|| forward(&model));
        out?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        latencies.push(ms);
        host_peak_bytes = host_peak_bytes.max(host_peak);
        let other_second = versus
            .as_ref()
            .filter(|_| i % 2 == 0)
            .map(timed)
            .transpose()?;
        if let Some(other) = other_first.or(other_second) {
            versus_latencies.push(other);
            ratios.push(ms / other);
        }
    }
    let versus = args.versus.map(|arch| {
        let [latency_ms_p50, latency_ms_p90] = percentiles(versus_latencies, [0.5, 0.9]);
        Versus {
            arch: arch.to_string(),
            latency_ms_p50,
            latency_ms_p90,
            ratio_p50: percentiles(ratios, [0.5])[0],
        }
    });
    let iters = latencies.len();
    let [p50, p90] = percentiles(latencies, [0.5, 0.9]);
    let (peak_bytes, peak_source) = match device_peak {
        Some(peak) => (peak.bytes, peak.source),
        None => (host_peak_bytes, PeakSource::HostAllocator),
    };
    let layers = if args.profile {
        Some(profile_layers(&model, &input, args.iters.max(1))?)
    } else {
        None
    };
    let report = BenchReport {
        arch: args.model.arch.to_string(),
        alpha: args.model.alpha,
        device: device_name(&device),
        dtype: format!("{:?}", args.dtype).to_lowercase(),
        input_size: size,
        batch_size: args.batch_size,
        iters,
        threads: candle_core::utils::get_num_threads(),
        latency_ms_p50: p50,
        latency_ms_p90: p90,
        images_per_sec: args.batch_size as f64 / (p50 / 1e3),
        peak_bytes,
        peak_source,
        analytic_peak_bytes: analytic_peak_bytes(&model, args.batch_size, size, size, args.dtype),
        layers,
        parity,
        versus,
    };
    if args.json {
        print_json(&report)
    } else {
        println!(
            "{} alpha {} batch {} at {size}x{size}, {} threads: p50 {:.2} ms, p90 {:.2} ms, {:.1} images/s, peak {:.1} MB",
            report.arch, report.alpha, report.batch_size, report.threads, report.latency_ms_p50,
            report.latency_ms_p90, report.images_per_sec, report.peak_bytes as f64 / 1e6
        );
        if let Some(p) = &report.parity {
            println!(
                "parity with the CPU f32 candle network: max |diff| {:.3e} (logits up to {:.3}), top-1 equal on {}/{} images",
                p.max_abs_diff, p.max_abs_logit, p.top1_equal, p.images
            );
        }
        if let Some(v) = &report.versus {
            println!(
                "versus {}: p50 {:.2} ms, p90 {:.2} ms; {} / {} per pass: median {:.3}",
                v.arch, v.latency_ms_p50, v.latency_ms_p90, report.arch, v.arch, v.ratio_p50
            );
        }
        if let Some(layers) = &report.layers {
            let total: f64 = layers.iter().map(|l| l.ms).sum();
            println!(
                "{:<28} {:>9} {:>6} {:>9} {:>8}",
                "layer", "ms", "%", "MMACs", "GFLOP/s"
            );
            for l in layers {
                println!(
                    "{:<28} {:>9.3} {:>6.1} {:>9.1} {:>8.1}",
                    l.name,
                    l.ms,
                    100.0 * l.ms / total,
                    l.macs as f64 / 1e6,
                    l.gflops
                );
            }
        }
        Ok(())
    }
}
