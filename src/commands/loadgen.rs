//! `octserve loadgen`: a gRPC load generator. Closed loop by default: each of `concurrency`
//! clients sends its next request as soon as the previous one is answered. With `--rate`, open
//! loop: requests start at that rate whatever the answers (at most `concurrency` in flight), which
//! is how overload is offered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;

use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::{ClassifyRequest, Timing};
use octserve::stats::percentiles as nearest_rank;

use super::{at_least_one, number_in, print_json, TargetArgs};

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Closed loop: clients. Open loop (`--rate`): most requests in flight at once.
    #[arg(long, env = "OCTSERVE_CONCURRENCY", default_value_t = 32, value_parser = at_least_one)]
    pub concurrency: usize,
    /// Open loop: requests started per second, at most 1e6 (0: closed loop).
    #[arg(long, env = "OCTSERVE_RATE", default_value_t = 0., value_parser = number_in(0., MAX_RATE))]
    pub rate: f64,
    /// Seconds to send for (more than 0, at most a year).
    #[arg(long, env = "OCTSERVE_DURATION", default_value_t = 10., value_parser = positive_seconds)]
    pub duration: f64,
    /// An image file or a directory of images, sent round-robin.
    #[arg(long, env = "OCTSERVE_IMAGES")]
    pub images: PathBuf,
    /// gRPC connections the clients share (HTTP/2 multiplexes the rest).
    #[arg(long, env = "OCTSERVE_CONNECTIONS", default_value_t = 4, value_parser = at_least_one)]
    pub connections: usize,
    /// Per-request deadline in milliseconds (0: none).
    #[arg(long, env = "OCTSERVE_TIMEOUT_MS", default_value_t = 0)]
    pub timeout_ms: u64,
    /// Also report each window of this many seconds (0: none), to see drift over a long run.
    #[arg(long, env = "OCTSERVE_WINDOW_SECS", default_value_t = 0., value_parser = number_in(0., MAX_SECONDS))]
    pub window_secs: f64,
    #[arg(long, env = "OCTSERVE_JSON")]
    pub json: bool,
}

/// Most requests per second `--rate` starts (a faster tick would round to no interval at all).
const MAX_RATE: f64 = 1e6;
/// Longest `--duration` and `--window-secs`: a year.
const MAX_SECONDS: f64 = 365. * 24. * 3600.;

fn positive_seconds(s: &str) -> Result<f64, String> {
    let seconds = number_in(0., MAX_SECONDS)(s)?;
    if seconds == 0. {
        return Err("0 seconds sends nothing; give more than 0".into());
    }
    Ok(seconds)
}

#[derive(Serialize)]
struct LoadReport {
    requests: usize,
    errors: usize,
    errors_by_code: BTreeMap<String, usize>,
    seconds: f64,
    rps: f64,
    /// Successful requests per second.
    ok_rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    /// p99 of successful requests only.
    ok_p99_ms: f64,
    /// Mean `Timing.batch_size` the server reported for successful requests.
    mean_batch_size: f64,
    /// Medians of the server's `Timing` over successful requests: where a request's time went.
    server_ms: ServerTiming,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    windows: Vec<Window>,
}

/// Median milliseconds of each `Timing` field; `overhead` is the server's total less decode,
/// queue and compute (reading the request, thread hand-offs, writing the reply).
#[derive(Serialize, Default)]
struct ServerTiming {
    decode: f64,
    queue: f64,
    compute: f64,
    total: f64,
    overhead: f64,
}

#[derive(Serialize)]
struct Window {
    start_s: f64,
    requests: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
}

/// One answered request.
struct Sample {
    /// Seconds from the start of the run to when it was sent.
    sent_s: f64,
    latency_ms: f64,
    /// The server's timing of the request, or the error code.
    outcome: Result<Timing, tonic::Code>,
}

pub fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(load(args))
}

async fn load(args: &LoadgenArgs) -> anyhow::Result<()> {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(args.target.connect.channel().await?);
    }
    let sender = Arc::new(Sender {
        images: read_images(&args.images)?,
        target: args.target.clone(),
        timeout: (args.timeout_ms > 0).then(|| Duration::from_millis(args.timeout_ms)),
        started: Instant::now(),
    });
    let stop_at = sender.started + Duration::from_secs_f64(args.duration);
    let client = |i: usize| ClassifierClient::new(channels[i % channels.len()].clone());
    let (samples_tx, mut samples_rx) = mpsc::unbounded_channel();
    if args.rate > 0. {
        let in_flight = Arc::new(Semaphore::new(args.concurrency.max(1)));
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1. / args.rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for i in 0.. {
            ticks.tick().await;
            if Instant::now() >= stop_at {
                break;
            }
            let permit = in_flight.clone().acquire_owned().await?;
            let (sender, mut client, tx) = (sender.clone(), client(i), samples_tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(sender.send(&mut client, i).await);
                drop(permit);
            });
        }
    } else {
        for i in 0..args.concurrency {
            let (sender, mut client, tx) = (sender.clone(), client(i), samples_tx.clone());
            tokio::spawn(async move {
                let mut next = i;
                while Instant::now() < stop_at {
                    let _ = tx.send(sender.send(&mut client, next).await);
                    next += 1;
                }
            });
        }
    }
    drop(samples_tx);
    let mut samples = Vec::new();
    while let Some(sample) = samples_rx.recv().await {
        samples.push(sample);
    }
    let seconds = sender.started.elapsed().as_secs_f64();
    report(args, samples, seconds)
}

/// What every request shares.
struct Sender {
    images: Vec<Vec<u8>>,
    target: TargetArgs,
    timeout: Option<Duration>,
    started: Instant,
}

impl Sender {
    /// Sends request number `n` and times it.
    async fn send(&self, client: &mut ClassifierClient<Channel>, n: usize) -> Sample {
        let mut request = self.target.connect.request(ClassifyRequest {
            model: self.target.model.clone(),
            variant: self.target.variant.clone(),
            image: self.images[n % self.images.len()].clone(),
            top_k: 1,
            routing_key: String::new(),
        });
        if let Some(t) = self.timeout {
            request.set_timeout(t);
        }
        let sent = Instant::now();
        let outcome = client.classify(request).await;
        Sample {
            sent_s: sent.duration_since(self.started).as_secs_f64(),
            latency_ms: sent.elapsed().as_secs_f64() * 1e3,
            outcome: match outcome {
                Ok(reply) => Ok(reply.into_inner().timing.unwrap_or_default()),
                Err(status) => Err(status.code()),
            },
        }
    }
}

/// p50, p90 and p99 of `latencies`; zeros for none.
fn percentiles(latencies: Vec<f64>) -> [f64; 3] {
    nearest_rank(latencies, [0.5, 0.9, 0.99])
}

fn report(args: &LoadgenArgs, samples: Vec<Sample>, seconds: f64) -> anyhow::Result<()> {
    let mut errors_by_code = BTreeMap::new();
    for s in &samples {
        if let Err(code) = s.outcome {
            *errors_by_code.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_ok()).collect();
    let [p50_ms, p90_ms, p99_ms] = percentiles(samples.iter().map(|s| s.latency_ms).collect());
    let timings: Vec<&Timing> = ok.iter().filter_map(|s| s.outcome.as_ref().ok()).collect();
    let batch_sum: f64 = timings.iter().map(|t| f64::from(t.batch_size)).sum();
    let report = LoadReport {
        requests: samples.len(),
        errors: samples.len() - ok.len(),
        errors_by_code,
        seconds,
        rps: samples.len() as f64 / seconds,
        ok_rps: ok.len() as f64 / seconds,
        p50_ms,
        p90_ms,
        p99_ms,
        ok_p99_ms: percentiles(ok.iter().map(|s| s.latency_ms).collect())[2],
        mean_batch_size: batch_sum / ok.len().max(1) as f64,
        server_ms: server_timing(&timings),
        windows: windows(&samples, args.window_secs),
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "{} requests ({} errors) in {:.1} s: {:.1} req/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, mean batch {:.1}",
        report.requests, report.errors, report.seconds, report.rps, report.p50_ms, report.p90_ms,
        report.p99_ms, report.mean_batch_size
    );
    let t = &report.server_ms;
    println!(
        "  server medians: decode {:.3} ms, queue {:.3} ms, compute {:.3} ms, total {:.3} ms (overhead {:.3} ms)",
        t.decode, t.queue, t.compute, t.total, t.overhead
    );
    for w in &report.windows {
        println!(
            "  from {:>6.1} s: {} requests ({} errors), p50 {:.2} ms, p99 {:.2} ms",
            w.start_s, w.requests, w.errors, w.p50_ms, w.p99_ms
        );
    }
    Ok(())
}

fn server_timing(timings: &[&Timing]) -> ServerTiming {
    let median = |field: fn(&Timing) -> f64| {
        percentiles(timings.iter().map(|t| field(t) / 1e3).collect())[0]
    };
    ServerTiming {
        decode: median(|t| t.decode_us as f64),
        queue: median(|t| t.queue_us as f64),
        compute: median(|t| t.compute_us as f64),
        total: median(|t| t.total_us as f64),
        overhead: median(|t| {
            t.total_us
                .saturating_sub(t.decode_us + t.queue_us + t.compute_us) as f64
        }),
    }
}

/// The samples grouped by when they were sent, `width` seconds per window.
fn windows(samples: &[Sample], width: f64) -> Vec<Window> {
    if width <= 0. {
        return Vec::new();
    }
    let mut grouped: BTreeMap<u64, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        grouped
            .entry((s.sent_s / width) as u64)
            .or_default()
            .push(s);
    }
    grouped
        .into_iter()
        .map(|(i, group)| {
            let [p50_ms, _, p99_ms] = percentiles(group.iter().map(|s| s.latency_ms).collect());
            Window {
                start_s: i as f64 * width,
                requests: group.len(),
                errors: group.iter().filter(|s| s.outcome.is_err()).count(),
                p50_ms,
                p99_ms,
            }
        })
        .collect()
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
