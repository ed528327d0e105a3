//! `octserve ab`: the live A/B comparison of a model's variants, from `ListModels`.

use clap::Args;
use serde::Serialize;

use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::{ListModelsRequest, VariantInfo};

use super::{print_json, ConnectArgs};

#[derive(Args, Debug)]
pub struct AbArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long, env = "OCTSERVE_MODEL")]
    pub model: String,
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
}

#[derive(Serialize)]
struct VariantRow {
    variant: String,
    arch: String,
    alpha: f64,
    baseline: bool,
    routing_weight: f64,
    accuracy: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    macs: u64,
    params: u64,
    analytic_activation_bytes: u64,
    measured_activation_bytes: u64,
    compute_savings: f64,
    memory_savings: f64,
    latency_savings: f64,
    shadow_comparisons: u64,
    shadow_agreement: Option<f64>,
    shadow_latency_delta_ms: f64,
}

impl From<VariantInfo> for VariantRow {
    fn from(v: VariantInfo) -> Self {
        let s = v.stats.unwrap_or_default();
        Self {
            variant: v.name,
            arch: v.arch,
            alpha: v.alpha,
            baseline: v.baseline,
            routing_weight: v.routing_weight,
            accuracy: v.accuracy,
            requests: s.requests,
            p50_ms: s.p50_ms,
            p99_ms: s.p99_ms,
            macs: v.macs,
            params: v.params,
            analytic_activation_bytes: v.activation_bytes,
            measured_activation_bytes: s.measured_activation_bytes,
            compute_savings: s.compute_savings_ratio,
            memory_savings: s.memory_savings_ratio,
            latency_savings: s.latency_savings_ratio,
            shadow_comparisons: s.shadow_comparisons,
            shadow_agreement: (s.shadow_comparisons > 0)
                .then(|| s.shadow_agreements as f64 / s.shadow_comparisons as f64),
            shadow_latency_delta_ms: s.shadow_latency_delta_ms,
        }
    }
}

pub fn run(args: &AbArgs) -> anyhow::Result<()> {
    let models = tokio::runtime::Runtime::new()?.block_on(async {
        let mut client = ClassifierClient::new(args.connect.channel().await?);
        anyhow::Ok(
            client
                .list_models(args.connect.request(ListModelsRequest {}))
                .await?
                .into_inner()
                .models,
        )
    })?;
    let model = models
        .into_iter()
        .find(|m| m.name == args.model)
        .ok_or_else(|| anyhow::anyhow!("the server does not serve '{}'", args.model))?;
    let shadow = model.shadow_variant.clone();
    let variants: Vec<VariantRow> = model.variants.into_iter().map(VariantRow::from).collect();
    if args.json {
        return print_json(
            &serde_json::json!({ "model": args.model, "shadow": shadow, "variants": variants }),
        );
    }
    print_table(&variants);
    if !shadow.is_empty() {
        println!(
            "\nshadow: {shadow} mirrors {:.0}% of answered requests",
            100. * model.shadow_fraction
        );
    }
    Ok(())
}

/// A table column: its header and how a row shows in it.
type Column = (&'static str, Box<dyn Fn(&VariantRow) -> String>);

fn print_table(rows: &[VariantRow]) {
    let pct = |x: f64| format!("{:+.1}%", 100. * x);
    let columns: [Column; 16] = [
        (
            "variant",
            Box::new(|r| format!("{}{}", r.variant, if r.baseline { "*" } else { "" })),
        ),
        ("arch", Box::new(|r| r.arch.clone())),
        ("alpha", Box::new(|r| format!("{:.2}", r.alpha))),
        ("weight", Box::new(|r| format!("{}", r.routing_weight))),
        (
            "accuracy",
            Box::new(|r| format!("{:.2}%", 100. * r.accuracy)),
        ),
        ("requests", Box::new(|r| r.requests.to_string())),
        ("p50 ms", Box::new(|r| format!("{:.2}", r.p50_ms))),
        ("p99 ms", Box::new(|r| format!("{:.2}", r.p99_ms))),
        ("MMACs", Box::new(|r| format!("{:.1}", r.macs as f64 / 1e6))),
        (
            "act KB",
            Box::new(|r| format!("{:.0}", r.analytic_activation_bytes as f64 / 1e3)),
        ),
        (
            "meas KB/img",
            Box::new(|r| format!("{:.0}", r.measured_activation_bytes as f64 / 1e3)),
        ),
        ("compute sav", Box::new(move |r| pct(r.compute_savings))),
        ("memory sav", Box::new(move |r| pct(r.memory_savings))),
        ("latency sav", Box::new(move |r| pct(r.latency_savings))),
        (
            "shadow agree",
            Box::new(|r| {
                r.shadow_agreement.map_or("-".into(), |a| {
                    format!("{:.1}% of {}", 100. * a, r.shadow_comparisons)
                })
            }),
        ),
        (
            "shadow Δms",
            Box::new(|r| {
                if r.shadow_comparisons > 0 {
                    format!("{:+.2}", r.shadow_latency_delta_ms)
                } else {
                    "-".into()
                }
            }),
        ),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, f)| f(r)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(h.chars().count())
        })
        .collect();
    let line = |items: Vec<String>| {
        let padded: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:>w$}"))
            .collect();
        println!("{}", padded.join("  "));
    };
    line(columns.iter().map(|(h, _)| h.to_string()).collect());
    for row in cells {
        line(row);
    }
    println!("(* baseline; savings are 1 - variant / baseline)");
}
