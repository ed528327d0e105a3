//! A/B routing, shadow traffic, runtime reload and the metrics of docs/contract.md, through a real
//! server.

mod common;

use std::collections::HashMap;
use std::io::Cursor;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma};

use common::{shipped_models, TestServer};
use octserve::config::ServeConfig;
use octserve::model::{Model, ModelConfig};
use octserve::pb::{ClassifyRequest, ModelInfo};
use octserve::preprocess::preprocess;

fn png() -> Vec<u8> {
    let image = DynamicImage::ImageLuma8(ImageBuffer::from_fn(28, 28, |x, y| {
        Luma([(x * 9 + y) as u8])
    }));
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .unwrap();
    bytes
}

/// A model "toy" with random-weight variants `vanilla` (baseline) and `octave`.
fn manifest(vanilla_weight: f64, octave_weight: f64, extra: &str) -> String {
    let labels: Vec<String> = (0..10).map(|i| format!("\"c{i}\"")).collect();
    format!(
        r#"name = "toy"
labels = [{}]
baseline = "vanilla"
{extra}
[input]
channels = 1
height = 28
width = 28
mean = [0.5]
std = [0.25]

[[variants]]
name = "vanilla"
arch = "resnet20"
weights = "random"
routing_weight = {vanilla_weight}

[[variants]]
name = "octave"
arch = "oct-resnet20"
alpha = 0.5
weights = "random"
routing_weight = {octave_weight}
"#,
        labels.join(", ")
    )
}

/// A models directory serving `text` as model "toy". The metrics registry is process-wide, so
/// each test runs its own server in its own temporary directory but they share label values;
/// only the shadow and metrics tests read metrics, and they use names of their own.
fn model_dir(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("toy")).unwrap();
    std::fs::write(dir.path().join("toy/manifest.toml"), text).unwrap();
    dir
}

fn classify(key: &str) -> ClassifyRequest {
    ClassifyRequest {
        model: "toy".into(),
        image: png(),
        routing_key: key.into(),
        top_k: 1,
        ..Default::default()
    }
}

async fn model_info(server: &TestServer, name: &str) -> ModelInfo {
    let models = server.models().await;
    models.into_iter().find(|m| m.name == name).unwrap()
}

#[tokio::test]
async fn the_router_splits_by_weight_and_keeps_a_key_on_its_variant() {
    let dir = model_dir(&manifest(3., 1., ""));
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    let mut client = server.client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let n = 400;
    for i in 0..n {
        let reply = client
            .classify(classify(&format!("user-{i}")))
            .await
            .unwrap()
            .into_inner();
        *counts.entry(reply.variant).or_default() += 1;
    }
    // 75% expected; 4 standard deviations of binomial(400, 0.75) is 8.7 points.
    let vanilla = counts["vanilla"] as f64 / n as f64;
    assert!((vanilla - 0.75).abs() < 0.087, "{counts:?}");
    for key in ["alice", "bob", "carol"] {
        let first = client
            .classify(classify(key))
            .await
            .unwrap()
            .into_inner()
            .variant;
        for _ in 0..10 {
            assert_eq!(
                client
                    .classify(classify(key))
                    .await
                    .unwrap()
                    .into_inner()
                    .variant,
                first
            );
        }
    }
}

/// The shipped Fashion-MNIST sample images, in file order.
fn sample_pngs() -> Vec<Vec<u8>> {
    let dir = shipped_models().join("fashion-mnist/samples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// The top-1 class of each image on a shipped variant, computed here without the server: the
/// crate's preprocessing and the plain (unfolded) candle network, not the served fast path.
fn shipped_top1(arch: &str, alpha: f64, weights: &str, images: &[Vec<u8>]) -> Vec<usize> {
    let spec = common::fashion_mnist_input();
    let path = shipped_models().join("fashion-mnist").join(weights);
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    let config = ModelConfig {
        alpha,
        in_channels: 1,
        num_classes: 10,
        ..ModelConfig::new(arch.parse().unwrap())
    };
    let model = Model::new(config, vb).unwrap();
    let values: Vec<f32> = images
        .iter()
        .flat_map(|png| preprocess(png, &spec, &Default::default()).unwrap())
        .collect();
    let x = Tensor::from_vec(values, (images.len(), 1, 28, 28), &Device::Cpu).unwrap();
    let logits: Vec<Vec<f32>> = model.forward(&x).unwrap().to_vec2().unwrap();
    logits
        .iter()
        .map(|row| {
            (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_slow_shadow_adds_nothing_to_the_answer_and_reports_agreement() {
    // The shipped vanilla and octave weights answer and shadow; the octave shadow's batches
    // hold every request (128 > 100) and leave only after 400 ms: artificially slow, by about
    // 200 ms per request on average however fast the requests come.
    let weights = |file: &str| shipped_models().join("fashion-mnist").join(file);
    let text = format!(
        r#"name = "shadowed"
labels = [{labels}]
baseline = "vanilla"

[shadow]
variant = "octave"
fraction = 1.0

[input]
channels = 1
height = 28
width = 28
mean = [0.2860]
std = [0.3530]

[[variants]]
name = "vanilla"
arch = "resnet20"
weights = "{vanilla}"
routing_weight = 1

[[variants]]
name = "octave"
arch = "oct-resnet20"
alpha = 0.5
weights = "{octave}"
routing_weight = 0
batching = {{ max_batch_size = 128, max_queue_delay_us = 400000, max_queue_size = 1024, dispatch = "after_delay" }}
"#,
        labels = (0..10)
            .map(|i| format!("\"c{i}\""))
            .collect::<Vec<_>>()
            .join(", "),
        vanilla = weights("resnet20.safetensors").display(),
        octave = weights("oct-resnet20-a0.50.safetensors").display(),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shadowed")).unwrap();
    std::fs::write(dir.path().join("shadowed/manifest.toml"), text).unwrap();

    // How many images the two nets agree on, worked out without the server.
    let images = sample_pngs();
    let vanilla_top1 = shipped_top1("resnet20", 0., "resnet20.safetensors", &images);
    let octave_top1 = shipped_top1(
        "oct-resnet20",
        0.5,
        "oct-resnet20-a0.50.safetensors",
        &images,
    );
    let agreeing = vanilla_top1
        .iter()
        .zip(&octave_top1)
        .filter(|(a, b)| a == b)
        .count() as u64;
    let requests = images.len() as u64;
    assert!(
        0 < agreeing && agreeing < requests,
        "the samples need agreements and disagreements: {agreeing} of {requests}"
    );

    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    let mut client = server.client();
    for (i, image) in images.iter().enumerate() {
        let sent = Instant::now();
        let request = ClassifyRequest {
            model: "shadowed".into(),
            image: image.clone(),
            routing_key: format!("k{i}"),
            top_k: 1,
            ..Default::default()
        };
        let reply = client.classify(request).await.unwrap().into_inner();
        assert_eq!(reply.variant, "vanilla");
        assert_eq!(
            reply.classes[0].index as usize, vanilla_top1[i],
            "image {i}"
        );
        assert!(
            sent.elapsed() < Duration::from_millis(300),
            "answer took {:?}",
            sent.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = model_info(&server, "shadowed").await;
        assert_eq!(info.shadow_variant, "octave");
        let stats = info
            .variants
            .iter()
            .find(|v| v.name == "octave")
            .unwrap()
            .stats
            .unwrap();
        if stats.shadow_comparisons == requests {
            assert_eq!(stats.shadow_agreements, agreeing, "{stats:?}");
            assert!(
                stats.shadow_latency_delta_ms > 100.,
                "the shadow was slower: {stats:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "shadow comparisons: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = server.scrape().await;
    let counted = |agree: &str| -> f64 {
        let prefix = "octserve_shadow_agreement_total{model=\"shadowed\",variant=\"octave\"";
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(&format!("agree=\"{agree}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(counted("true"), agreeing as f64);
    assert_eq!(counted("false"), (requests - agreeing) as f64);
}

#[tokio::test]
async fn sighup_reloads_routing_without_losing_a_request() {
    let dir = model_dir(&manifest(1., 0., ""));
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    // Steady traffic while the routing changes underneath.
    let load = {
        let mut client = server.client();
        tokio::spawn(async move {
            let mut variants = Vec::new();
            for i in 0..150 {
                let reply = client
                    .classify(classify(&format!("u{i}")))
                    .await
                    .expect("no request is lost");
                variants.push(reply.into_inner().variant);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            variants
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(dir.path().join("toy/manifest.toml"), manifest(0., 1., "")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let variants = load.await.unwrap();
    assert_eq!(variants.first().map(String::as_str), Some("vanilla"));
    assert_eq!(
        variants.last().map(String::as_str),
        Some("octave"),
        "routing followed the reload"
    );
    let weights: Vec<f64> = model_info(&server, "toy")
        .await
        .variants
        .iter()
        .map(|v| v.routing_weight)
        .collect();
    assert_eq!(weights, vec![0., 1.]);
}

/// Every metric of docs/contract.md, with its labels: (name, labels that must appear).
const METRICS: &[(&str, &[&str])] = &[
    ("octserve_requests_total", &["model", "variant", "code"]),
    (
        "octserve_request_duration_seconds_bucket",
        &["model", "variant"],
    ),
    (
        "octserve_queue_duration_seconds_bucket",
        &["model", "variant"],
    ),
    (
        "octserve_inference_duration_seconds_bucket",
        &["model", "variant"],
    ),
    ("octserve_batch_size_bucket", &["model", "variant"]),
    ("octserve_queue_depth", &["model", "variant"]),
    ("octserve_activation_bytes", &["model", "variant"]),
    ("octserve_model_macs", &["model", "variant"]),
    ("octserve_model_params", &["model", "variant"]),
    ("octserve_memory_savings_ratio", &["model", "variant"]),
    ("octserve_compute_savings_ratio", &["model", "variant"]),
    ("octserve_latency_savings_ratio", &["model", "variant"]),
    (
        "octserve_shadow_agreement_total",
        &["model", "variant", "agree"],
    ),
];

fn assert_all_metrics(text: &str) {
    for (name, labels) in METRICS {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("model=\"metered\""))
            .unwrap_or_else(|| panic!("{name} is missing from:\n{text}"));
        for label in *labels {
            assert!(
                line.contains(&format!("{label}=\"")),
                "{name} lacks label {label}: {line}"
            );
        }
    }
}

/// The value of `name{model="toy",variant="<variant>"}`.
fn gauge(text: &str, name: &str, variant: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains(&format!("variant=\"{variant}\""))
                && l.contains("model=\"metered\"")
        })
        .unwrap_or_else(|| panic!("no {name} for {variant}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn metrics_show_from_the_first_scrape_and_measure_the_savings() {
    // The metrics registry is process-wide: this test's model has a name of its own.
    let text = manifest(1., 1., "").replace("name = \"toy\"", "name = \"metered\"");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("metered")).unwrap();
    std::fs::write(dir.path().join("metered/manifest.toml"), text).unwrap();
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    assert_all_metrics(&server.scrape().await);

    // A lone request to each variant first, so the two share at least the batch size 1 that
    // savings are compared at; then concurrent traffic to both, so batches form.
    let mut client = server.client();
    for variant in ["vanilla", "octave"] {
        let mut req = classify("");
        req.model = "metered".into();
        req.variant = variant.into();
        client.classify(req).await.unwrap();
    }
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let mut client = server.client();
            tokio::spawn(async move {
                for j in 0..6 {
                    let mut req = classify("");
                    req.model = "metered".into();
                    req.variant = if (i + j) % 2 == 0 {
                        "vanilla"
                    } else {
                        "octave"
                    }
                    .into();
                    client.classify(req).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Last, a lone request to each, the octave one after the vanilla one: the savings are then
    // compared at batch size 1, where each batch's peak is one pass's alone.
    for variant in ["vanilla", "octave"] {
        let mut req = classify("");
        req.model = "metered".into();
        req.variant = variant.into();
        client.classify(req).await.unwrap();
    }
    let text = server.scrape().await;
    assert_all_metrics(&text);
    assert!(
        text.contains(r#"octserve_requests_total{model="metered",variant="octave",code="OK"} 50"#),
        "{text}"
    );

    // The analytic costs, from the CLI rather than from the server under test.
    let vanilla = inspect(&["--arch", "resnet20", "--alpha", "0"]);
    let octave = inspect(&["--arch", "oct-resnet20", "--alpha", "0.5"]);
    let info = model_info(&server, "metered").await;
    let by_name = |n: &str| info.variants.iter().find(|v| v.name == n).unwrap().clone();
    assert_eq!(by_name("vanilla").macs, vanilla["macs"].as_u64().unwrap());
    assert_eq!(by_name("octave").macs, octave["macs"].as_u64().unwrap());
    let ratio = |key: &str| octave[key].as_f64().unwrap() / vanilla[key].as_f64().unwrap();
    let compute = gauge(&text, "octserve_compute_savings_ratio", "octave");
    assert!(
        (compute - (1. - ratio("macs"))).abs() < 1e-9,
        "compute savings {compute} vs inspect's MACs"
    );
    assert_eq!(
        gauge(&text, "octserve_compute_savings_ratio", "vanilla"),
        0.
    );

    // Memory savings are measured: each variant's bytes per image are the counting allocator's
    // peak over its latest batch (src/alloc.rs), here a lone image: the fast path's pass plus
    // what the worker holds around it. tests/model.rs bounds the pass at this size to the
    // analytic walk's peak less at most the input image (the walk counts the image as a live
    // map). The worker adds the batch's input tensor and the outputs. So each peak is the
    // walk's plus an offset c with -IMAGE <= c <= 2 IMAGE + 1 KiB (the input twice, the 10
    // logits and probabilities with their bookkeeping). Both variants take the same input and
    // give the same outputs, so they share c, and the measured savings, 1 - (O + c) / (V + c),
    // are the analytic 1 - O / V off by c (1 - O / V) / (V + c): about 0.012 here at most.
    const IMAGE: f64 = (28 * 28 * 4) as f64;
    let (low, high) = (-IMAGE, 2. * IMAGE + 1024.);
    for (name, walk) in [("vanilla", &vanilla), ("octave", &octave)] {
        let measured = by_name(name).stats.unwrap().measured_activation_bytes as f64;
        let walk = walk["peak_activation_bytes"].as_f64().unwrap();
        assert!(
            (low..=high).contains(&(measured - walk)),
            "{name}: measured {measured} B per image vs the walk's {walk} B"
        );
    }
    let analytic = 1. - ratio("peak_activation_bytes");
    let tolerance = high * analytic / (vanilla["peak_activation_bytes"].as_f64().unwrap() + low);
    let measured = gauge(&text, "octserve_memory_savings_ratio", "octave");
    assert!(
        (measured - analytic).abs() <= tolerance,
        "measured memory savings {measured:.4} vs analytic {analytic:.4} (tolerance {tolerance:.4})"
    );
    assert!(gauge(&text, "octserve_activation_bytes", "octave") > 0.);
}

/// `octserve inspect --json` for the toy models' input (1x28x28, 10 classes).
fn inspect(model: &[&str]) -> serde_json::Value {
    common::octserve_json(
        ["inspect"]
            .iter()
            .chain(model)
            .chain(&common::TOY_SHAPE_FLAGS)
            .chain(&["--json"]),
    )
}
