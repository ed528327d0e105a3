//! `octserve inspect`: a model's analytic cost without running it.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use clap::Args;

use octserve::model::{CostReport, Model};

use super::{print_json, ModelArgs};

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object (totals and per-layer costs) instead of a table.
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    // Zero weights: only the structure matters for the cost.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let model = Model::new(args.model.config(), vb)?;
    let size = args.model.input_size;
    let report = model.cost(size, size);
    if args.json {
        print_json(&report)
    } else {
        print_table(&args.model.arch.to_string(), &report);
        Ok(())
    }
}

fn print_table(arch: &str, r: &CostReport) {
    println!(
        "{:<36} {:>14} {:>12} {:>14}",
        "layer", "MACs", "params", "output bytes"
    );
    for l in &r.layers {
        println!(
            "{:<36} {:>14} {:>12} {:>14}",
            l.name, l.macs, l.params, l.output_bytes
        );
    }
    println!(
        "\n{arch}: {:.3} GMACs, {} params, {:.2} MB activations, {:.2} MB peak",
        r.macs as f64 / 1e9,
        r.params,
        r.activation_bytes as f64 / 1e6,
        r.peak_activation_bytes as f64 / 1e6
    );
}
