//! The model repository, live: variants and models loaded, swapped and unloaded while a real
//! server answers steady traffic, through Triton's repository calls, polling and SIGHUP.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Code;

use common::{shipped_models, trouser_png, TestServer};
use octserve::config::ServeConfig;
use octserve::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use octserve::pb::inference::*;
use octserve::pb::ClassifyRequest;
use octserve::repository::ModelControl;

/// A variant of the shipped model: (name, weights file, alpha, routing weight).
type Spec<'a> = (&'a str, &'a str, f64, f64);

const VANILLA: Spec = ("vanilla", "resnet20.safetensors", 0., 1.);
const OCTAVE: Spec = ("octave", "oct-resnet20-a0.50.safetensors", 0.5, 1.);

/// A models directory holding the shipped model as `model` with `variants`, weights copied in.
/// Each test names its model differently: the metrics recorder is shared by the whole process.
fn models_dir(model: &str, variants: &[Spec]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(model)).unwrap();
    let shipped = shipped_models().join("fashion-mnist");
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::copy(
                &path,
                dir.path().join(model).join(path.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    write_manifest(dir.path(), model, variants);
    dir
}

fn write_manifest(models: &Path, model: &str, variants: &[Spec]) {
    let mut text = format!(
        "name = \"{model}\"\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \
         \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]\n\
         baseline = \"vanilla\"\n\n[input]\nchannels = 1\nheight = 28\nwidth = 28\n\
         mean = [0.2860]\nstd = [0.3530]\n"
    );
    for (name, weights, alpha, routing_weight) in variants {
        let arch = if *alpha > 0. {
            "oct-resnet20"
        } else {
            "resnet20"
        };
        text += &format!(
            "\n[[variants]]\nname = \"{name}\"\narch = \"{arch}\"\nalpha = {alpha}\n\
             weights = \"{weights}\"\nrouting_weight = {routing_weight}\n"
        );
    }
    std::fs::write(models.join(model).join("manifest.toml"), text).unwrap();
}

async fn start(models: &Path, control: ModelControl) -> TestServer {
    let config = ServeConfig {
        model_control: control,
        repository_poll_secs: Some(1),
        ..ServeConfig::default()
    };
    TestServer::start(config, models).await
}

fn kserve(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel.clone())
}

async fn load(server: &TestServer, model: &str) -> Result<(), tonic::Status> {
    let request = RepositoryModelLoadRequest {
        model_name: model.into(),
        ..Default::default()
    };
    kserve(server)
        .repository_model_load(request)
        .await
        .map(drop)
}

async fn unload(server: &TestServer, model: &str) -> Result<(), tonic::Status> {
    let request = RepositoryModelUnloadRequest {
        model_name: model.into(),
        ..Default::default()
    };
    kserve(server)
        .repository_model_unload(request)
        .await
        .map(drop)
}

async fn index(server: &TestServer) -> Vec<(String, String, String, String)> {
    let request = RepositoryIndexRequest::default();
    let response = kserve(server).repository_index(request).await.unwrap();
    let mut entries: Vec<_> = response
        .into_inner()
        .models
        .into_iter()
        .map(|m| (m.name, m.version, m.state, m.reason))
        .collect();
    entries.sort();
    entries
}

fn classify(model: &str, variant: &str) -> ClassifyRequest {
    ClassifyRequest {
        model: model.into(),
        variant: variant.into(),
        image: trouser_png(),
        top_k: 1,
        ..Default::default()
    }
}

/// The variants `ListModels` shows for the model, with their alphas.
async fn served_variants(server: &TestServer, model: &str) -> Vec<(String, f64)> {
    let models = server.models().await;
    let model = models.iter().find(|m| m.name == model).expect("served");
    model
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.alpha))
        .collect()
}

/// Requests sent without pause on one variant (empty: the router picks) until stopped.
struct Traffic {
    answered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<tonic::Status>>>,
}

impl Traffic {
    fn start(server: &TestServer, model: &str, variants: &[&str]) -> Self {
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = variants
            .iter()
            .map(|variant| {
                let (mut client, model) = (server.client(), model.to_string());
                let variant = variant.to_string();
                let (answered, stop) = (answered.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match client.classify(classify(&model, &variant)).await {
                            Ok(reply) => {
                                assert_eq!(reply.into_inner().classes[0].label, "Trouser");
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(status) => failures.push(status),
                        }
                    }
                    failures
                })
            })
            .collect();
        Self {
            answered,
            stop,
            tasks,
        }
    }

    /// Stops the traffic; returns how many requests were answered and every failure.
    async fn finish(self) -> (u64, Vec<tonic::Status>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.unwrap());
        }
        (self.answered.load(Ordering::Relaxed), failures)
    }
}

/// Sends requests naming `variant` until one is answered; returns when.
async fn first_answer(server: &TestServer, model: &str, variant: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if server
            .client()
            .classify(classify(model, variant))
            .await
            .is_ok()
        {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "'{variant}' never answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn variants_come_and_go_under_traffic_without_a_failed_request() {
    const MODEL: &str = "live-changes";
    let models = models_dir(MODEL, &[VANILLA, OCTAVE]);
    let server = start(models.path(), ModelControl::Explicit).await;
    let traffic = Traffic::start(&server, MODEL, &["vanilla", "octave", "", ""]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_changes = traffic.answered.load(Ordering::Relaxed);

    // A new variant: built and warmed up, then routed to.
    let candidate: Spec = ("candidate", "oct-resnet20-a0.25.safetensors", 0.25, 1.);
    write_manifest(models.path(), MODEL, &[VANILLA, OCTAVE, candidate]);
    let asked = Instant::now();
    load(&server, MODEL).await.unwrap();
    let loaded = asked.elapsed();
    let first = first_answer(&server, MODEL, "candidate")
        .await
        .duration_since(asked);
    eprintln!("load call {loaded:?}; first answer by the new variant {first:?} after the call");
    assert!(served_variants(&server, MODEL)
        .await
        .contains(&("candidate".into(), 0.25)));

    // New weights for a variant under traffic: swapped the same way.
    let swapped: Spec = ("octave", "oct-resnet20-a0.75.safetensors", 0.75, 1.);
    write_manifest(models.path(), MODEL, &[VANILLA, swapped, candidate]);
    load(&server, MODEL).await.unwrap();
    assert!(served_variants(&server, MODEL)
        .await
        .contains(&("octave".into(), 0.75)));

    // A variant removed: it stops taking requests, its metrics disappear.
    write_manifest(models.path(), MODEL, &[VANILLA, swapped]);
    load(&server, MODEL).await.unwrap();
    let gone = server.client().classify(classify(MODEL, "candidate")).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    let names: Vec<String> = served_variants(&server, MODEL)
        .await
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert_eq!(names, ["vanilla", "octave"]);
    let metrics = server.scrape().await;
    assert!(!metrics.contains("variant=\"candidate\""), "{metrics}");
    assert!(metrics.contains("variant=\"octave\""));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (answered, failures) = traffic.finish().await;
    eprintln!("{answered} requests answered, {before_changes} before the changes began");
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(answered > before_changes, "the traffic kept going");
}

#[tokio::test]
async fn a_manifest_that_fails_to_load_leaves_the_model_as_it_was() {
    const MODEL: &str = "bad-manifest";
    let models = models_dir(MODEL, &[VANILLA, OCTAVE]);
    let server = start(models.path(), ModelControl::Explicit).await;
    write_manifest(
        models.path(),
        MODEL,
        &[VANILLA, ("octave", "missing.safetensors", 0.5, 1.)],
    );
    let refused = load(&server, MODEL).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("missing.safetensors"),
        "{refused:?}"
    );
    assert_eq!(
        served_variants(&server, MODEL).await,
        [("vanilla".into(), 0.), ("octave".into(), 0.5)]
    );
    server
        .client()
        .classify(classify(MODEL, "octave"))
        .await
        .unwrap();

    std::fs::write(models.path().join(MODEL).join("manifest.toml"), "name = [").unwrap();
    assert_eq!(
        load(&server, MODEL).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let entries = index(&server).await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    for (name, _, state, reason) in &entries {
        assert_eq!((name.as_str(), state.as_str()), (MODEL, "READY"));
        assert!(reason.contains("the current one does not"), "{reason}");
    }
}

#[tokio::test]
async fn an_unloaded_model_answers_not_found_until_loaded_again() {
    const MODEL: &str = "unload";
    let models = models_dir(MODEL, &[VANILLA]);
    let server = start(models.path(), ModelControl::Explicit).await;
    assert_eq!(
        index(&server).await,
        [(
            MODEL.into(),
            "vanilla".into(),
            "READY".into(),
            String::new()
        )]
    );
    unload(&server, MODEL).await.unwrap();
    let refused = server
        .client()
        .classify(classify(MODEL, ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    let ready = kserve(&server)
        .model_ready(ModelReadyRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert!(!ready.into_inner().ready);
    assert_eq!(
        index(&server).await,
        [(
            MODEL.into(),
            String::new(),
            "UNAVAILABLE".into(),
            "not loaded".into()
        )]
    );
    let metrics = server.scrape().await;
    let shown: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains(&format!("model=\"{MODEL}\"")))
        .collect();
    assert!(shown.is_empty(), "{shown:?}");
    assert_eq!(
        unload(&server, MODEL).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        load(&server, "other").await.unwrap_err().code(),
        Code::NotFound
    );

    load(&server, MODEL).await.unwrap();
    server.client().classify(classify(MODEL, "")).await.unwrap();
    assert!(server
        .scrape()
        .await
        .contains(&format!("model=\"{MODEL}\"")));
}

#[tokio::test]
async fn clients_change_nothing_unless_model_control_is_explicit() {
    const MODEL: &str = "control";
    let models = models_dir(MODEL, &[VANILLA]);
    for control in [ModelControl::None, ModelControl::Poll] {
        let server = start(models.path(), control).await;
        for refused in [load(&server, MODEL).await, unload(&server, MODEL).await] {
            let refused = refused.unwrap_err();
            assert_eq!(refused.code(), Code::FailedPrecondition);
            assert!(
                refused.message().contains("--model-control explicit"),
                "{refused:?}"
            );
        }
        server.client().classify(classify(MODEL, "")).await.unwrap();
        assert_eq!(
            index(&server).await.len(),
            1,
            "the index is read in every mode"
        );
    }
}

#[tokio::test]
async fn loads_take_no_model_from_the_client() {
    const MODEL: &str = "parameters";
    let models = models_dir(MODEL, &[VANILLA]);
    let server = start(models.path(), ModelControl::Explicit).await;
    for key in ["config", "file:1/model.safetensors"] {
        let request = RepositoryModelLoadRequest {
            model_name: MODEL.into(),
            parameters: [(key.to_string(), ModelRepositoryParameter::default())].into(),
            ..Default::default()
        };
        let refused = kserve(&server).repository_model_load(request).await;
        assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument, "{key}");
    }
    let request = RepositoryIndexRequest {
        repository_name: "elsewhere".into(),
        ready: false,
    };
    let refused = kserve(&server).repository_index(request).await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn polling_follows_the_repository() {
    const MODEL: &str = "polling";
    let models = models_dir(MODEL, &[VANILLA]);
    let server = start(models.path(), ModelControl::Poll).await;
    write_manifest(models.path(), MODEL, &[VANILLA, OCTAVE]);
    first_answer(&server, MODEL, "octave").await;

    let removed = models.path().join(MODEL).join("manifest.toml");
    std::fs::remove_file(&removed).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.models().await.is_empty() {
        assert!(Instant::now() < deadline, "the model outlived its manifest");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = server
        .client()
        .classify(classify(MODEL, ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
}

/// NVIDIA's Python client's repository calls, over gRPC and HTTP (`.ci/run` installs it).
#[tokio::test]
async fn tritonclient_loads_and_unloads_models() {
    for http in [false, true] {
        tritonclient_repository_checks(http).await;
    }
}

async fn tritonclient_repository_checks(http: bool) {
    let model = if http {
        "tritonclient-http"
    } else {
        "tritonclient-grpc"
    };
    let models = models_dir(model, &[VANILLA, OCTAVE]);
    let server = start(models.path(), ModelControl::Explicit).await;
    let url = if http { server.http } else { server.grpc };
    let mut args = vec![
        "--model".into(),
        model.into(),
        "--url".into(),
        url.to_string(),
    ];
    if http {
        args.push("--http".into());
    }
    common::interop(
        "repository_tritonclient.py",
        args,
        "all repository checks passed",
    )
    .await;
}
