//! `octserve loadgen`: a closed-loop gRPC load generator. Each of `concurrency` clients sends
//! its next request as soon as the previous one is answered, for `duration` seconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;

use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::ClassifyRequest;

use super::bench::percentile;
use super::{print_json, TargetArgs};

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, env = "OCTSERVE_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds to send for.
    #[arg(long, env = "OCTSERVE_DURATION", default_value_t = 10.)]
    pub duration: f64,
    /// An image file or a directory of images, sent round-robin.
    #[arg(long, env = "OCTSERVE_IMAGES")]
    pub images: PathBuf,
    /// gRPC connections the clients share (HTTP/2 multiplexes the rest).
    #[arg(long, env = "OCTSERVE_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,
    /// Per-request deadline in milliseconds (0: none).
    #[arg(long, env = "OCTSERVE_TIMEOUT_MS", default_value_t = 0)]
    pub timeout_ms: u64,
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
}

#[derive(Serialize)]
struct LoadReport {
    requests: usize,
    errors: usize,
    errors_by_code: BTreeMap<String, usize>,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    /// Mean `Timing.batch_size` the server reported for successful requests.
    mean_batch_size: f64,
}

#[derive(Default)]
struct ClientTally {
    latencies_ms: Vec<f64>,
    errors: BTreeMap<String, usize>,
    batch_sizes: Vec<u32>,
}

pub fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(load(args))
}

async fn load(args: &LoadgenArgs) -> anyhow::Result<()> {
    let images = Arc::new(read_images(&args.images)?);
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(args.target.addr.clone())?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target.addr))?;
        channels.push(channel);
    }
    let started = Instant::now();
    let stop_at = started + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let client = ClassifierClient::new(channels[i % channels.len()].clone());
            let images = images.clone();
            let (model, variant) = (args.target.model.clone(), args.target.variant.clone());
            let timeout = (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms));
            tokio::spawn(client_loop(
                client, images, model, variant, timeout, i, stop_at,
            ))
        })
        .collect();
    let mut total = ClientTally::default();
    for task in tasks {
        let tally = task.await?;
        total.latencies_ms.extend(tally.latencies_ms);
        total.batch_sizes.extend(tally.batch_sizes);
        for (code, n) in tally.errors {
            *total.errors.entry(code).or_default() += n;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    report(args, total, seconds)
}

async fn client_loop(
    mut client: ClassifierClient<Channel>,
    images: Arc<Vec<Vec<u8>>>,
    model: String,
    variant: String,
    timeout: Option<Duration>,
    offset: usize,
    stop_at: Instant,
) -> ClientTally {
    let mut tally = ClientTally::default();
    let mut next = offset;
    while Instant::now() < stop_at {
        let mut request = tonic::Request::new(ClassifyRequest {
            model: model.clone(),
            variant: variant.clone(),
            image: images[next % images.len()].clone(),
            top_k: 1,
            routing_key: String::new(),
        });
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        next += 1;
        let sent = Instant::now();
        let outcome = client.classify(request).await;
        tally.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
        match outcome {
            Ok(reply) => {
                if let Some(t) = reply.into_inner().timing {
                    tally.batch_sizes.push(t.batch_size);
                }
            }
            Err(status) => {
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1
            }
        }
    }
    tally
}

fn report(args: &LoadgenArgs, mut total: ClientTally, seconds: f64) -> anyhow::Result<()> {
    total.latencies_ms.sort_by(f64::total_cmp);
    let lat = &total.latencies_ms;
    let pct = |q| {
        if lat.is_empty() {
            0.
        } else {
            percentile(lat, q)
        }
    };
    let batches = &total.batch_sizes;
    let report = LoadReport {
        requests: lat.len(),
        errors: total.errors.values().sum(),
        errors_by_code: total.errors,
        seconds,
        rps: lat.len() as f64 / seconds,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        mean_batch_size: batches.iter().map(|&b| f64::from(b)).sum::<f64>()
            / batches.len().max(1) as f64,
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "{} requests ({} errors) in {:.1} s: {:.1} req/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, mean batch {:.1}",
        report.requests, report.errors, report.seconds, report.rps, report.p50_ms, report.p90_ms,
        report.p99_ms, report.mean_batch_size
    );
    Ok(())
}

fn read_images(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                ["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"].contains(&ext)
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    anyhow::ensure!(!files.is_empty(), "no images in {}", path.display());
    files
        .iter()
        .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
        .collect()
}
