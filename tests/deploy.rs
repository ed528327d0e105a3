//! The deployment files against the real thing: every metric that a Grafana dashboard, the HPA or
//! the Prometheus adapter queries exists in a scrape of a server running the Kubernetes config on
//! the shipped models; the configs shipped in deploy/k8s load; the README's docker commands match
//! the Dockerfiles and the binary. (.ci/deploy-check lints and schema-checks the same files.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{shipped_models, TestServer};
use octserve::config::{Manifest, ServeConfig};
use octserve::pb::ClassifyRequest;

/// Where the images put the models (Dockerfile: `COPY ... /opt/octserve/models`).
const IMAGE_ROOT: &str = "/opt/octserve/";
/// `octserve serve`'s default ports (docs/contract.md), which the images EXPOSE.
const SERVE_PORTS: [u16; 3] = [50051, 8000, 9090];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The files of `dir` (under the repository) whose names end in `suffix`, recursively.
fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![repo().join(dir)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Every `octserve_*` name in a PromQL expression (or any text that names metrics).
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("octserve_") {
        if text[..start].ends_with(is_name_char) {
            continue; // inside a longer name
        }
        let name = &text[start..];
        let end = name.find(|c| !is_name_char(c)).unwrap_or(name.len());
        names.insert(name[..end].to_string());
    }
    names
}

/// The PromQL of a Grafana dashboard: panel targets' `expr` and template variables' queries.
fn dashboard_queries(value: &Value, queries: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", Value::String(query)) => {
                        queries.push(query.clone())
                    }
                    _ => dashboard_queries(value, queries),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, queries)),
        _ => {}
    }
}

/// Every `octserve_*` metric the deployment queries, with the files that query it.
fn queried_metrics() -> BTreeMap<String, Vec<String>> {
    let mut queried: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut add = |names: BTreeSet<String>, file: &Path| {
        for name in names {
            let file = file.strip_prefix(repo()).unwrap().display().to_string();
            queried.entry(name).or_default().push(file);
        }
    };
    let dashboards = files("deploy/grafana", ".json");
    assert!(!dashboards.is_empty(), "no dashboard in deploy/grafana");
    for path in &dashboards {
        let dashboard: Value = serde_json::from_str(&read(path))
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let mut queries = Vec::new();
        dashboard_queries(&dashboard, &mut queries);
        add(queries.iter().flat_map(|q| metric_names(q)).collect(), path);
    }
    // The HPA's custom metric and the adapter rule that serves it.
    let manifests = [
        ("deploy/k8s", ".yaml"),
        ("deploy/prometheus", ".yaml"),
        ("deploy/prometheus", ".yml"),
    ];
    for path in manifests
        .iter()
        .flat_map(|(dir, suffix)| files(dir, suffix))
    {
        add(metric_names(&read(&path)), &path);
    }
    queried
}

/// A path in the image, as the same file in this repository.
fn in_repo(image_path: &Path) -> PathBuf {
    match image_path.strip_prefix(IMAGE_ROOT) {
        Ok(relative) => repo().join(relative),
        Err(_) => image_path.to_path_buf(),
    }
}

/// The shipped model, with octave shadowing the answers so that the shadow series exist too.
fn shipped_model_with_shadow() -> tempfile::TempDir {
    let shipped = shipped_models().join("fashion-mnist");
    let manifest = read(shipped.join("manifest.toml")).replace(
        "weights = \"",
        &format!("weights = \"{}/", shipped.display()),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("manifest.toml"),
        format!("{manifest}\n[shadow]\nvariant = \"octave\"\nfraction = 1.0\n"),
    )
    .unwrap();
    dir
}

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(shipped_models().join("fashion-mnist/samples").join(name)).unwrap()
}

#[tokio::test]
async fn every_metric_the_dashboards_and_autoscaler_query_is_scraped() {
    let queried = queried_metrics();
    for needed in [
        "octserve_requests_total",
        "octserve_request_duration_seconds_bucket",
        "octserve_queue_depth",
        "octserve_batch_size_bucket",
        "octserve_memory_savings_ratio",
        "octserve_compute_savings_ratio",
        "octserve_latency_savings_ratio",
        "octserve_shadow_agreement_total",
    ] {
        assert!(queried.contains_key(needed), "no dashboard shows {needed}");
    }

    // The server as the Kubernetes Deployment runs it: its config, on the shipped model.
    let mut config = ServeConfig::load(&repo().join("deploy/k8s/base/octserve.toml")).unwrap();
    let model = shipped_model_with_shadow();
    config.models = vec![model.path().join("manifest.toml")];
    let server = TestServer::start(config, &shipped_models()).await;

    // Real requests to both variants (vanilla's are mirrored to the octave shadow).
    let mut client = server.client();
    for (i, image) in ["0000_ankle-boot.png", "0002_trouser.png", "0004_shirt.png"]
        .iter()
        .enumerate()
    {
        for variant in ["vanilla", "octave", ""] {
            let request = ClassifyRequest {
                model: "fashion-mnist".into(),
                variant: variant.into(),
                image: sample(image),
                routing_key: format!("user-{i}"),
                ..Default::default()
            };
            client.classify(request).await.unwrap();
        }
    }
    // Shadow comparisons finish in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        let scrape = server.scrape().await;
        if scrape.contains("octserve_shadow_latency_delta_seconds{") {
            break scrape;
        }
        assert!(Instant::now() < deadline, "no shadow comparison:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Histograms are scraped as _bucket/_sum/_count series, which is what PromQL names.
    let series: BTreeMap<&str, Vec<&str>> = scrape
        .lines()
        .filter(|line| line.starts_with("octserve_"))
        .fold(BTreeMap::new(), |mut series, line| {
            let name = &line[..line.find(['{', ' ']).unwrap()];
            series.entry(name).or_default().push(line);
            series
        });
    for (name, queried_by) in &queried {
        let lines = series.get(name.as_str()).unwrap_or_else(|| {
            panic!("{name}, queried by {queried_by:?}, is not in the scrape:\n{scrape}")
        });
        // The dashboards filter by model and group by variant.
        assert!(
            lines
                .iter()
                .any(|l| l.contains("model=\"fashion-mnist\"") && l.contains("variant=\"")),
            "{name} has no model and variant labels: {lines:?}"
        );
    }
}

#[test]
fn the_kubernetes_configs_load_and_serve_the_image_models() {
    let shipped = Manifest::load(&shipped_models().join("fashion-mnist/manifest.toml")).unwrap();
    let configs = files("deploy/k8s", "octserve.toml");
    assert!(
        configs.len() >= 3,
        "base, ab/vanilla, ab/octave: {configs:?}"
    );
    for path in configs {
        let config = ServeConfig::load(&path).unwrap();
        assert!(!config.models.is_empty(), "{}", path.display());
        for manifest_path in &config.models {
            let manifest = Manifest::load(&in_repo(manifest_path))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(manifest.name, shipped.name);
            assert_eq!(manifest.labels, shipped.labels);
            assert_eq!(manifest.baseline, shipped.baseline);
            assert_eq!(
                format!("{:?}", manifest.input),
                format!("{:?}", shipped.input)
            );
            assert_eq!(manifest.variants.len(), shipped.variants.len());
            for (variant, original) in manifest.variants.iter().zip(&shipped.variants) {
                assert_eq!(
                    (&variant.name, &variant.arch, variant.alpha),
                    (&original.name, &original.arch, original.alpha)
                );
                let weights = in_repo(&manifest.weights_path(variant));
                assert_eq!(
                    weights,
                    shipped.weights_path(original),
                    "{}",
                    path.display()
                );
            }
            // An A/B side (overlays/ab/<variant>/) routes everything to its variant.
            let side = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            if manifest.variants.iter().any(|v| v.name == side) {
                for v in &manifest.variants {
                    assert_eq!(v.routing_weight > 0., v.name == side, "{}", path.display());
                }
            }
        }
    }
}

/// One `docker build` or `docker run` line of the README, split into words.
fn readme_docker_commands(verb: &str) -> Vec<Vec<String>> {
    let readme = read(repo().join("README.md"));
    let deploy = readme
        .split("\n## ")
        .find(|section| section.starts_with("Deploy\n"))
        .expect("README has a Deploy section");
    deploy
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with(&format!("docker {verb} ")))
        .map(|line| {
            let line = line.split(" #").next().unwrap();
            line.split_whitespace().skip(2).map(String::from).collect()
        })
        .collect()
}

/// The value after `flag` in `words`, for each time it appears.
fn flag_values<'a>(words: &'a [String], flag: &str) -> Vec<&'a str> {
    words
        .windows(2)
        .filter(|pair| pair[0] == flag)
        .map(|pair| pair[1].as_str())
        .collect()
}

struct Dockerfile {
    text: String,
    exposed: BTreeSet<u16>,
}

impl Dockerfile {
    fn load(name: &str) -> Self {
        let text = read(repo().join(name));
        let exposed = text
            .lines()
            .filter_map(|line| line.strip_prefix("EXPOSE "))
            .flat_map(|ports| ports.split_whitespace().map(|p| p.parse().unwrap()))
            .collect();
        Self { text, exposed }
    }

    fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.text.lines().filter(|l| l.contains(needle)).collect()
    }
}

#[test]
fn the_readme_docker_commands_match_the_dockerfiles() {
    let cargo: toml::Table = toml::from_str(&read(repo().join("Cargo.toml"))).unwrap();
    let dist = &cargo["profile"]["dist"];
    assert_eq!(dist["lto"].as_str(), Some("fat"));
    assert_eq!(dist["codegen-units"].as_integer(), Some(1));
    let features = cargo["features"].as_table().unwrap();

    // Each Dockerfile: the release build CI's lock file allows, the serve ports and entrypoint.
    let mut images = BTreeMap::new();
    for build in readme_docker_commands("build") {
        let file = flag_values(&build, "-f")
            .first()
            .copied()
            .unwrap_or("Dockerfile");
        let dockerfile = Dockerfile::load(file);
        let cargo_builds = dockerfile.lines_with("cargo build");
        assert_eq!(cargo_builds.len(), 1, "{file}: {cargo_builds:?}");
        assert!(cargo_builds[0].contains("cargo build --locked --profile dist"));
        for feature in flag_values(
            &cargo_builds[0]
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>(),
            "--features",
        ) {
            assert!(
                features.contains_key(feature),
                "{file}: no feature {feature}"
            );
        }
        for arg in flag_values(&build, "--build-arg") {
            let name = arg.split('=').next().unwrap();
            assert!(!dockerfile.lines_with(&format!("ARG {name}")).is_empty());
        }
        assert_eq!(
            dockerfile.lines_with("ENTRYPOINT"),
            ["ENTRYPOINT [\"octserve\", \"serve\"]"],
            "{file}"
        );
        assert_eq!(dockerfile.exposed, BTreeSet::from(SERVE_PORTS), "{file}");
        assert!(
            dockerfile.text.contains(IMAGE_ROOT),
            "{file} puts the models elsewhere"
        );
        images.insert(flag_values(&build, "-t")[0].to_string(), dockerfile);
    }
    assert!(images.values().any(|d| !d.text.contains("--features")));
    assert!(images.values().any(|d| d.text.contains("--features cuda")));

    // Each run: a built image, its EXPOSEd ports published, and arguments `octserve serve` takes.
    let serve_help = std::process::Command::new(env!("CARGO_BIN_EXE_octserve"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let serve_help = String::from_utf8(serve_help.stdout).unwrap();
    let runs = readme_docker_commands("run");
    assert!(runs.len() >= images.len(), "a docker run for each image");
    for run in runs {
        let (image, dockerfile) = images
            .iter()
            .find(|(tag, _)| run.contains(tag))
            .unwrap_or_else(|| panic!("docker run {run:?} runs no image the README builds"));
        let published: BTreeSet<u16> = flag_values(&run, "-p")
            .iter()
            .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(published, dockerfile.exposed, "docker run {run:?}");
        let args = &run[run.iter().position(|w| w == image).unwrap() + 1..];
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                serve_help.contains(&format!("{flag} ")),
                "`octserve serve` has no {flag}"
            );
        }
        if dockerfile.text.contains("--features cuda") {
            assert!(run.contains(&"--gpus".to_string()), "{run:?} needs a GPU");
            assert!(dockerfile.text.contains("ENV OCTSERVE_DEVICE=cuda"));
        }
    }
}
