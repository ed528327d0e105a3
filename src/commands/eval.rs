//! `octserve eval`: accuracy of a shipped model variant on the Fashion-MNIST test set.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use serde::Serialize;

use octserve::config::{Manifest, ServeConfig};
use octserve::dataset::load_test_set;
use octserve::evaluate::evaluate;
use octserve::variant::build_variant;

use super::print_json;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long, env = "OCTSERVE_MODEL")]
    pub model: String,
    #[arg(long, env = "OCTSERVE_VARIANT")]
    pub variant: String,
    /// Directory with the idx test files (`.gz` or plain).
    #[arg(
        long,
        env = "OCTSERVE_DATA",
        default_value = "/usr/share/datasets/fashion-mnist"
    )]
    pub data: PathBuf,
    #[arg(long, env = "OCTSERVE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Also write every image's logits (`logits`, [n, classes]) to this safetensors file.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
}

#[derive(Serialize)]
struct EvalReport {
    model: String,
    variant: String,
    accuracy: f64,
    n: usize,
    correct: usize,
    seconds: f64,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let manifest = find_manifest(args)?;
    let variant = manifest
        .variants
        .iter()
        .find(|v| v.name == args.variant)
        .with_context(|| format!("model '{}' has no variant '{}'", args.model, args.variant))?;
    let device = Device::Cpu;
    let (model, _) = build_variant(&manifest, variant, &device)?;
    let data = load_test_set(&args.data)?;
    let started = Instant::now();
    let eval = evaluate(&model, &manifest.input, &data, &device)?;
    if let Some(path) = &args.logits_out {
        let tensors = [("logits".to_string(), eval.logits.clone())]
            .into_iter()
            .collect();
        candle_core::safetensors::save(&tensors, path)?;
    }
    let report = EvalReport {
        model: args.model.clone(),
        variant: args.variant.clone(),
        accuracy: eval.accuracy(),
        n: eval.n,
        correct: eval.correct,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        print_json(&report)
    } else {
        println!(
            "{}/{}: {:.2}% top-1 ({}/{}) in {:.1} s",
            report.model,
            report.variant,
            100. * report.accuracy,
            report.correct,
            report.n,
            report.seconds
        );
        Ok(())
    }
}

fn find_manifest(args: &EvalArgs) -> anyhow::Result<Manifest> {
    for path in ServeConfig::default()
        .repository(&args.models_dir)
        .paths()?
    {
        let manifest = Manifest::load(&path)?;
        if manifest.name == args.model {
            return Ok(manifest);
        }
    }
    anyhow::bail!(
        "no model '{}' under {}",
        args.model,
        args.models_dir.display()
    )
}
