//! `octserve bench --parity`: the check the GPU script relies on, run here on the CPU, where the
//! benchmarked model is the fast path and the reference the plain candle network.

mod common;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use octserve::model::weights::WeightSource;
use octserve::model::{Model, ModelConfig};

/// `octserve bench` on a small net (batch 4, 28x28, 2 threads) with `extra` flags: its JSON report.
fn bench_json(arch: &str, extra: &[&str]) -> Value {
    common::octserve_json(
        ["--threads", "2", "bench", "--arch", arch]
            .iter()
            .chain(&common::TOY_SHAPE_FLAGS)
            .chain(&["--batch-size", "4", "--json"])
            .chain(extra),
    )
}

fn bench_parity(arch: &str, dtype: &str) -> Value {
    bench_json(arch, &["--iters", "1", "--dtype", dtype, "--parity"])["parity"].clone()
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

/// `--versus` times a second architecture pass for pass in the same run: the report names it and
/// gives its latencies and the median per-pass ratio, beside the benchmarked model's own.
#[test]
fn bench_versus_times_both_architectures_in_one_run() {
    let report = bench_json("oct-resnet20", &["--iters", "4", "--versus", "resnet20"]);
    assert_eq!(report["arch"], "oct-resnet20", "{report}");
    assert!(report["latency_ms_p50"].as_f64().unwrap() > 0., "{report}");
    let versus = &report["versus"];
    assert_eq!(versus["arch"], "resnet20", "{report}");
    let p50 = versus["latency_ms_p50"].as_f64().unwrap();
    assert!(
        p50 > 0. && versus["latency_ms_p90"].as_f64().unwrap() >= p50,
        "{versus}"
    );
    let ratio = versus["ratio_p50"].as_f64().unwrap();
    assert!(ratio.is_finite() && ratio > 0., "{versus}");

    assert!(bench_json("resnet20", &["--iters", "1"])
        .get("versus")
        .is_none());
}

/// `--logits-out` writes the benchmark's input and the fast path's logits for it: the same
/// logits the plain candle network gives for that input on the same (shipped) weights.
#[test]
fn bench_logits_out_holds_the_input_and_the_models_logits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logits.safetensors");
    let weights = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/fashion-mnist/resnet20.safetensors"
    );
    let args = ["--iters", "1", "--weights", weights, "--logits-out"];
    bench_json("resnet20", &[&args[..], &[path.to_str().unwrap()]].concat());

    let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let (input, logits) = (&saved["input"], &saved["logits"]);
    assert_eq!(input.dims(), [4, 1, 28, 28]);
    assert_eq!(logits.dims(), [4, 10]);
    let config = ModelConfig {
        in_channels: 1,
        num_classes: 10,
        ..ModelConfig::new("resnet20".parse().unwrap())
    };
    let vb = WeightSource::File(weights.into())
        .var_builder(DType::F32, &Device::Cpu)
        .unwrap();
    let reference = Model::new(config, vb).unwrap().forward(input).unwrap();
    let diff = common::max_abs_diff(&reference, logits);
    assert!(diff < 1e-3, "max |diff| {diff}");
    let spread = logits.max_all().unwrap().to_scalar::<f32>().unwrap()
        - logits.min_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        spread > 0.1,
        "logits of a trained net differ by class: {spread}"
    );
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
    let diff = common::max_abs_diff(&a.forward(&x).unwrap(), &b.forward(&x).unwrap());
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

/// `octserve` with `args`, expected to be refused at argument parsing: its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_octserve"))
        .args(args)
        .output()
        .expect("octserve runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Clap's usage errors exit 2; a panic exits 101.
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}

#[test]
fn bench_refuses_zero_or_oversized_sizes_without_panicking() {
    let model = ["bench", "--arch", "resnet20", "--input-size", "28"];
    for (flag, expected) in [
        (
            "--batch-size",
            "invalid value '0' for '--batch-size <BATCH_SIZE>'",
        ),
        ("--iters", "invalid value '0' for '--iters <ITERS>'"),
    ] {
        let stderr = refused(&[&model[..], &[flag, "0"]].concat());
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("it must be at least 1"), "{stderr}");
    }
    // The model's sizes: 0 gives an empty tensor, a huge input size overflows the cost walk.
    for (command, flag, value) in [
        ("bench", "--input-size", "0"),
        ("bench", "--in-channels", "0"),
        ("bench", "--num-classes", "0"),
        ("inspect", "--input-size", "10000000000"),
    ] {
        let stderr = refused(&[command, "--arch", "resnet20", flag, value]);
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag}")),
            "{stderr}"
        );
    }
}

/// Values that would panic turning into a `Duration` (or leave nothing to send) are refused
/// before any connection is made.
#[test]
fn loadgen_refuses_values_that_would_panic() {
    let target = ["loadgen", "--model", "m", "--images", "."];
    for (flag, value) in [
        ("--duration", "-1"),
        ("--duration", "NaN"),
        ("--duration", "1e300"),
        ("--duration", "0"),
        ("--rate", "inf"),
        ("--rate", "1e12"),
        ("--rate", "-5"),
        ("--window-secs", "nan"),
        ("--concurrency", "0"),
        ("--connections", "0"),
    ] {
        let arg = format!("{flag}={value}");
        let stderr = refused(&[&target[..], &[arg.as_str()]].concat());
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag}")),
            "{stderr}"
        );
    }
}
