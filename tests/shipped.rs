//! The shipped Fashion-MNIST models: served from `models/` exactly as the README's serve command
//! does, and held to the accuracy recorded in their manifest on the full test set.

mod common;

use std::path::Path;

use candle_core::Device;

use common::{shipped_models, trouser_png, TestServer};
use octserve::config::{Manifest, ServeConfig};
use octserve::dataset::load_test_set;
use octserve::evaluate::evaluate;
use octserve::pb::ClassifyRequest;
use octserve::variant::build_variant;

const DATA: &str = "/usr/share/datasets/fashion-mnist";

fn manifest() -> Manifest {
    Manifest::load(&shipped_models().join("fashion-mnist/manifest.toml")).unwrap()
}

/// `(file, label)` of every sample image, from `samples/labels.csv`.
fn samples() -> Vec<(std::path::PathBuf, String)> {
    let dir = shipped_models().join("fashion-mnist/samples");
    let csv = std::fs::read_to_string(dir.join("labels.csv")).unwrap();
    csv.lines()
        .skip(1)
        .map(|line| {
            let mut fields = line.splitn(3, ',');
            let file = fields.next().unwrap();
            let label = fields.nth(1).unwrap().trim_matches('"');
            (dir.join(file), label.to_string())
        })
        .collect()
}

#[tokio::test]
async fn sample_images_are_classified_correctly_by_every_variant() {
    let server = TestServer::start(ServeConfig::default(), &shipped_models()).await;
    let mut client = server.client();
    let samples = samples();
    assert_eq!(samples.len(), 100);
    for variant in manifest().variants.iter().map(|v| v.name.clone()) {
        let mut correct = 0;
        for (file, label) in &samples {
            let request = ClassifyRequest {
                model: "fashion-mnist".into(),
                variant: variant.clone(),
                image: std::fs::read(file).unwrap(),
                top_k: 1,
                ..Default::default()
            };
            let reply = client.classify(request).await.unwrap().into_inner();
            correct += usize::from(&reply.classes[0].label == label);
        }
        // The README's example image.
        let trouser = trouser_png();
        let request = ClassifyRequest {
            model: "fashion-mnist".into(),
            variant: variant.clone(),
            image: trouser,
            ..Default::default()
        };
        let reply = client.classify(request).await.unwrap().into_inner();
        assert_eq!(reply.classes[0].label, "Trouser", "{variant}");
        assert!(correct >= 85, "{variant}: {correct}/100 samples right");
    }
}

#[test]
fn every_shipped_variant_keeps_its_recorded_test_accuracy() {
    assert!(
        Path::new(DATA).is_dir(),
        "the Fashion-MNIST test set is missing: apt-get install dataset-fashion-mnist (.ci/run does)"
    );
    let data = load_test_set(Path::new(DATA)).unwrap();
    let manifest = manifest();
    for variant in &manifest.variants {
        let recorded = variant
            .test_accuracy
            .expect("the manifest records each variant's accuracy");
        let (model, _) = build_variant(&manifest, variant, &Device::Cpu).unwrap();
        let eval = evaluate(&model, &manifest.input, &data, &Device::Cpu).unwrap();
        assert_eq!(eval.n, 10_000);
        assert!(
            eval.accuracy() >= recorded - 0.001,
            "{}: {:.4} measured, {recorded:.4} recorded",
            variant.name,
            eval.accuracy()
        );
    }
}
