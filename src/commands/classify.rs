//! `octserve classify`: the gRPC client for `Classify`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::ClassifyRequest;

use super::{print_json, TargetArgs};

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, env = "OCTSERVE_TOP_K", default_value_t = 1)]
    pub top_k: u32,
    #[arg(long, env = "OCTSERVE_ROUTING_KEY", default_value = "")]
    pub routing_key: String,
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct ImageResult {
    image: String,
    variant: String,
    classes: Vec<ClassResult>,
}

#[derive(Serialize)]
struct ClassResult {
    label: String,
    index: u32,
    score: f32,
}

pub fn run(args: &ClassifyArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(classify(args))
}

async fn classify(args: &ClassifyArgs) -> anyhow::Result<()> {
    let connect = &args.target.connect;
    let mut client =
        ClassifierClient::new(connect.channel().await?).max_decoding_message_size(usize::MAX);
    let mut results = Vec::new();
    for path in &args.images {
        let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let request = ClassifyRequest {
            model: args.target.model.clone(),
            variant: args.target.variant.clone(),
            image,
            top_k: args.top_k,
            routing_key: args.routing_key.clone(),
        };
        let response = client
            .classify(connect.request(request))
            .await
            .map_err(|s| anyhow::anyhow!("{}: {} ({:?})", path.display(), s.message(), s.code()))?
            .into_inner();
        let classes = response
            .classes
            .into_iter()
            .map(|c| ClassResult {
                label: c.label,
                index: c.index,
                score: c.score,
            })
            .collect();
        results.push(ImageResult {
            image: path.display().to_string(),
            variant: response.variant,
            classes,
        });
    }
    if args.json {
        return print_json(&serde_json::json!({ "results": results }));
    }
    for r in &results {
        for c in &r.classes {
            println!("{}\t{}\t{:.4}\t{}", r.image, c.label, c.score, r.variant);
        }
    }
    Ok(())
}
