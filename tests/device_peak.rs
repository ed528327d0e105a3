//! The peak-memory figure on the CPU side, where the counting allocator is exact: the analytic
//! floor that the GPU check holds the CUDA memory pool's watermark to, checked here against
//! what the plain candle network really allocates, and `octserve bench`'s report of both.

mod common;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use octserve::alloc::measure_peak;
use octserve::device_peak::analytic_peak_bytes;
use octserve::model::weights::WeightSource;
use octserve::model::{Model, ModelConfig};

const SIDE: usize = 28;

fn small(arch: &str) -> ModelConfig {
    ModelConfig {
        in_channels: 1,
        num_classes: 10,
        ..ModelConfig::new(arch.parse().unwrap())
    }
}

/// The host bytes the plain candle network (BatchNorm unfolded, no fast path) holds at once for
/// one forward pass of `batch` images, counted by the global allocator.
fn plain_peak(model: &Model, batch: usize) -> usize {
    let x = Tensor::randn(0f32, 1., (batch, 1, SIDE, SIDE), &Device::Cpu).unwrap();
    let (logits, peak) = measure_peak(|| model.forward(&x).unwrap());
    assert_eq!(logits.dims(), [batch, 10]);
    peak
}

#[test]
fn the_plain_network_holds_at_least_the_analytic_peak_of_feature_maps() {
    for arch in ["resnet20", "oct-resnet20"] {
        let vb = WeightSource::Random
            .var_builder(DType::F32, &Device::Cpu)
            .unwrap();
        let model = Model::new(small(arch), vb).unwrap();
        let mut last = 0;
        for batch in [1, 4] {
            let floor = analytic_peak_bytes(&model, batch, SIDE, SIDE, DType::F32);
            let peak = plain_peak(&model, batch);
            assert!(
                peak >= floor,
                "{arch} batch {batch}: peak {peak} < floor {floor}"
            );
            assert!(peak > last, "{arch}: batch {batch} peak {peak} <= {last}");
            last = peak;
        }
    }
}

#[test]
fn the_analytic_floor_scales_with_the_batch_and_the_dtype() {
    let vb = WeightSource::Random
        .var_builder(DType::F32, &Device::Cpu)
        .unwrap();
    let model = Model::new(small("resnet20"), vb).unwrap();
    let one = analytic_peak_bytes(&model, 1, SIDE, SIDE, DType::F32);
    assert_eq!(one, model.cost(SIDE, SIDE).peak_activation_bytes);
    assert_eq!(
        analytic_peak_bytes(&model, 8, SIDE, SIDE, DType::F32),
        8 * one
    );
    assert_eq!(
        analytic_peak_bytes(&model, 8, SIDE, SIDE, DType::F16),
        4 * one
    );
}

/// `octserve bench` on a small net at `batch` in `dtype`: its JSON report.
fn bench(arch: &str, batch: usize, dtype: &str) -> Value {
    let (side, batch) = (SIDE.to_string(), batch.to_string());
    common::octserve_json([
        "--threads",
        "2",
        "bench",
        "--arch",
        arch,
        "--input-size",
        &side,
        "--in-channels",
        "1",
        "--num-classes",
        "10",
        "--iters",
        "2",
        "--batch-size",
        &batch,
        "--dtype",
        dtype,
        "--json",
    ])
}

fn bytes(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key}: {report}"))
}

/// On the CPU off f32, bench runs the plain network, as CUDA does: its peak comes from the
/// counting allocator and reaches the floor it reports beside it, the relation `check.sh`
/// asserts for the memory pool's figure on a GPU.
#[test]
fn bench_reports_the_peak_with_its_source_and_floor() {
    for arch in ["resnet20", "oct-resnet20"] {
        let half = bench(arch, 4, "f16");
        assert_eq!(half["peak_source"], "host-allocator", "{half}");
        let (peak, floor) = (
            bytes(&half, "peak_bytes"),
            bytes(&half, "analytic_peak_bytes"),
        );
        assert!(floor > 0 && peak >= floor, "{arch}: {half}");

        // candle's CPU kernels pick their scratch by shape, so the host peak of one image is not
        // always below that of four; the floor of the maps is.
        let single = bench(arch, 1, "f16");
        assert_eq!(4 * bytes(&single, "analytic_peak_bytes"), floor, "{single}");
        assert!(
            bytes(&single, "peak_bytes") >= floor / 4,
            "{arch}: {single}"
        );

        // The fast f32 path: same source, the floor in f32 (it may stay under it).
        let full = bench(arch, 4, "f32");
        assert_eq!(full["peak_source"], "host-allocator", "{full}");
        assert_eq!(bytes(&full, "analytic_peak_bytes"), 2 * floor, "{full}");
        assert!(bytes(&full, "peak_bytes") > 0, "{full}");
    }
}
