//! Parity with the independent PyTorch reference (tools/reference/): same weights, same input,
//! same output, for vanilla and octave nets at even and odd sizes, unfolded and BatchNorm-folded.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;

use octserve::model::{Model, ModelConfig};

#[derive(Deserialize)]
struct Fixture {
    name: String,
    arch: String,
    alpha: f64,
    in_channels: usize,
    num_classes: usize,
    base_channels: usize,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

/// Loads every fixture of `dir` and checks our output against PyTorch's.
fn check_fixtures(dir: &Path) {
    let index = std::fs::read_to_string(dir.join("index.json")).unwrap();
    let fixtures: Vec<Fixture> = serde_json::from_str(&index).unwrap();
    assert!(!fixtures.is_empty());
    let dev = Device::Cpu;
    for f in &fixtures {
        let weights = dir.join(format!("{}.safetensors", f.name));
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev) }.unwrap();
        let config = ModelConfig {
            alpha: f.alpha,
            in_channels: f.in_channels,
            num_classes: f.num_classes,
            base_channels: Some(f.base_channels),
            ..ModelConfig::new(f.arch.parse().unwrap())
        };
        let model = Model::new(config, vb).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let io =
            candle_core::safetensors::load(dir.join(format!("{}.io.safetensors", f.name)), &dev)
                .unwrap();
        let (input, expected) = (&io["input"], &io["output"]);
        let scale = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.);
        for (form, m) in [
            ("unfolded", model.clone()),
            ("folded", model.folded().unwrap()),
        ] {
            let out = m.forward(input).unwrap();
            let diff = common::max_abs_diff(&out, expected);
            assert!(
                diff <= 1e-4 * scale,
                "{} ({form}): max abs diff {diff} vs output scale {scale}",
                f.name
            );
        }
    }
}

#[test]
fn outputs_match_the_pytorch_reference() {
    check_fixtures(&fixtures_dir());
}

/// Our parameter names and shapes: what a model built from scratch asks its VarBuilder for.
fn our_keys(arch: &str) -> BTreeMap<String, Vec<usize>> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Model::new(ModelConfig::new(arch.parse().unwrap()), vb).unwrap();
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

fn reference_keys(arch: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixtures_dir().join(format!("keys_{arch}.txt"))).unwrap();
    text.lines()
        .map(|line| {
            let (name, dims) = line.split_once('\t').unwrap();
            let dims = dims
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            (name.to_string(), dims)
        })
        .collect()
}

#[test]
fn state_dict_keys_and_shapes_match_d_li14_and_torchvision() {
    for arch in ["oct-resnet50", "resnet50"] {
        let (ours, theirs) = (our_keys(arch), reference_keys(arch));
        let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{arch}: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(ours, theirs, "{arch}: shapes differ");
    }
}

/// Full-size oct-resnet50 and resnet50 at 224x224, written by
/// `python3 tools/reference/make_fixtures.py --big DIR` (too large to commit). Without them,
/// tests/model.rs checks both at 224x224 on the fast path against the plain network.
#[test]
#[ignore = "needs OCTSERVE_BIG_FIXTURES from tools/reference/make_fixtures.py --big"]
fn full_size_resnet50s_match_the_pytorch_reference() {
    let dir = std::env::var("OCTSERVE_BIG_FIXTURES").expect("set OCTSERVE_BIG_FIXTURES");
    check_fixtures(Path::new(&dir));
}
