//! A/B routing, shadow traffic, runtime reload and the metrics of docs/contract.md, through a real
//! server.

mod common;

use std::collections::HashMap;
use std::io::Cursor;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma};

use common::TestServer;
use octserve::config::ServeConfig;
use octserve::pb::{ClassifyRequest, ModelInfo};

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

#[tokio::test]
async fn a_slow_shadow_adds_nothing_to_the_answer_and_reports_agreement() {
    // The octave shadow waits 400 ms for each batch: artificially slow.
    let shadow = "\n[shadow]\nvariant = \"octave\"\nfraction = 1.0\n";
    let text = manifest(1., 0., shadow).replace(
        "routing_weight = 0\n",
        "routing_weight = 0\nbatching = { max_batch_size = 32, max_queue_delay_us = 400000, max_queue_size = 1024, dispatch = \"after_delay\" }\n",
    );
    let dir = model_dir(&text.replace("name = \"toy\"", "name = \"shadowed\""));
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    let mut client = server.client();
    let requests = 8;
    for i in 0..requests {
        let sent = Instant::now();
        let mut request = classify(&format!("k{i}"));
        request.model = "shadowed".into();
        let reply = client.classify(request).await.unwrap().into_inner();
        assert_eq!(reply.variant, "vanilla");
        assert!(
            sent.elapsed() < Duration::from_millis(300),
            "answer took {:?}",
            sent.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
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
            assert!(stats.shadow_agreements <= requests);
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
    let agreements: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("octserve_shadow_agreement_total{model=\"shadowed\",variant=\"octave\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(agreements, requests as f64);
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
    let text = server.scrape().await;
    assert_all_metrics(&text);
    assert!(
        text.contains(r#"octserve_requests_total{model="metered",variant="octave",code="OK"} 49"#),
        "{text}"
    );

    let info = model_info(&server, "metered").await;
    let by_name = |n: &str| info.variants.iter().find(|v| v.name == n).unwrap().clone();
    let (vanilla, octave) = (by_name("vanilla"), by_name("octave"));
    let analytic = 1. - octave.activation_bytes as f64 / vanilla.activation_bytes as f64;
    let measured = gauge(&text, "octserve_memory_savings_ratio", "octave");
    assert!(
        measured > 0.,
        "octave measured no memory savings: {measured}"
    );
    assert!(
        (measured - analytic).abs() <= 0.15,
        "measured memory savings {measured:.3} vs analytic {analytic:.3}"
    );
    assert!(gauge(&text, "octserve_activation_bytes", "octave") > 0.);
    let compute = gauge(&text, "octserve_compute_savings_ratio", "octave");
    assert!((compute - (1. - octave.macs as f64 / vanilla.macs as f64)).abs() < 1e-9);
    assert_eq!(
        gauge(&text, "octserve_compute_savings_ratio", "vanilla"),
        0.
    );
}
