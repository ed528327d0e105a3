//! `octserve bench --parity`: the check the GPU script relies on, run here on the CPU, where the
//! benchmarked model is the fast path and the reference the plain candle network.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use octserve::model::weights::WeightSource;
use octserve::model::{Model, ModelConfig};

fn bench_parity(arch: &str, dtype: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_octserve"))
        .args([
            "--threads",
            "2",
            "bench",
            "--arch",
            arch,
            "--input-size",
            "28",
        ])
        .args([
            "--in-channels",
            "1",
            "--num-classes",
            "10",
            "--batch-size",
            "4",
        ])
        .args(["--iters", "1", "--dtype", dtype, "--parity", "--json"])
        .output()
        .expect("octserve runs");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    report["parity"].clone()
}

#[test]
fn bench_parity_finds_the_fast_path_equal_to_the_reference_and_f16_not_exactly() {
    for arch in ["resnet20", "oct-resnet20"] {
        let f32 = bench_parity(arch, "f32");
        assert_eq!(f32["images"], 4, "{arch}: {f32}");
        assert_eq!(f32["top1_equal"], 4, "{arch}: {f32}");
        assert!(
            f32["max_abs_logit"].as_f64().unwrap() > 0.1,
            "{arch}: {f32}"
        );
        let f32_diff = f32["max_abs_diff"].as_f64().unwrap();
        assert!(f32_diff < 1e-3, "{arch}: f32 parity {f32}");

        // Half precision rounds every weight and activation: the check must see that.
        let f16_diff = bench_parity(arch, "f16")["max_abs_diff"].as_f64().unwrap();
        assert!(
            f16_diff > f32_diff,
            "{arch}: f16 {f16_diff} vs f32 {f32_diff}"
        );
    }
}

#[test]
fn random_twins_share_their_weights() {
    let config = ModelConfig {
        in_channels: 1,
        num_classes: 10,
        ..ModelConfig::new("oct-resnet20".parse().unwrap())
    };
    let (a, b) = WeightSource::Random
        .build_twins(DType::F32, &Device::Cpu, |vb| Model::new(config, vb))
        .unwrap();
    let x = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu).unwrap();
    let diff = (a.forward(&x).unwrap() - b.forward(&x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // Two independent random models differ: the equality above is the shared draw.
    let other = WeightSource::Random
        .build_twins(DType::F32, &Device::Cpu, |vb| Model::new(config, vb))
        .unwrap()
        .0;
    assert!(
        other.forward(&x).unwrap().to_vec2::<f32>().unwrap()
            != a.forward(&x).unwrap().to_vec2::<f32>().unwrap()
    );
}
