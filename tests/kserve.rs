//! The KServe v2 / Open Inference Protocol service on a real server: the same batcher, router
//! and metrics as `Classify`, driven by our generated client and by NVIDIA's `tritonclient`.

mod common;

use std::collections::HashMap;

use tonic::transport::Channel;
use tonic::Code;

use common::{random_model_dir, shipped_models, TestServer};
use octserve::config::ServeConfig;
use octserve::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use octserve::pb::inference::infer_parameter::ParameterChoice;
use octserve::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use octserve::pb::inference::*;
use octserve::pb::ClassifyRequest;
use octserve::preprocess::preprocess;

fn client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel.clone())
}

/// The first `n` shipped sample images.
fn sample_pngs(n: usize) -> Vec<Vec<u8>> {
    common::sample_png_files()
        .iter()
        .take(n)
        .map(|f| std::fs::read(f).unwrap())
        .collect()
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

/// A BYTES `[N]` request of encoded images, in Triton's raw layout (4-byte length prefixes).
fn image_request(model: &str, version: &str, images: &[Vec<u8>]) -> ModelInferRequest {
    let mut raw = Vec::new();
    for image in images {
        raw.extend_from_slice(&(image.len() as u32).to_le_bytes());
        raw.extend_from_slice(image);
    }
    ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        inputs: vec![tensor("image", "BYTES", &[images.len() as i64])],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// The FP32 `[N, K]` probabilities of a response, row by row.
fn probabilities(response: &ModelInferResponse) -> Vec<Vec<f32>> {
    let output = &response.outputs[0];
    assert_eq!(
        (output.name.as_str(), output.datatype.as_str()),
        ("probabilities", "FP32")
    );
    let classes = output.shape[1] as usize;
    let values: Vec<f32> = response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), output.shape[0] as usize * classes);
    values.chunks(classes).map(<[f32]>::to_vec).collect()
}

/// Probabilities of `image` on `variant` through `Classify`, in class order.
async fn classify(server: &TestServer, model: &str, variant: &str, image: &[u8]) -> Vec<f32> {
    let request = ClassifyRequest {
        model: model.into(),
        variant: variant.into(),
        image: image.to_vec(),
        top_k: 10,
        ..Default::default()
    };
    let reply = server
        .client()
        .classify(request)
        .await
        .unwrap()
        .into_inner();
    let mut probabilities = vec![0.; 10];
    for class in reply.classes {
        probabilities[class.index as usize] = class.score;
    }
    probabilities
}

fn assert_close(a: &[f32], b: &[f32]) {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-5, "differ by {diff}: {a:?} vs {b:?}");
}

async fn infer_error(
    client: &mut GrpcInferenceServiceClient<Channel>,
    r: ModelInferRequest,
) -> tonic::Status {
    client.model_infer(r).await.unwrap_err()
}

/// One shipped sample image of each of `n` classes (the class is the file name's suffix).
fn one_per_class(n: usize) -> Vec<Vec<u8>> {
    let files = common::sample_png_files();
    let mut classes = Vec::new();
    let mut images = Vec::new();
    for file in files {
        let name = file.file_stem().unwrap().to_str().unwrap().to_string();
        let class = name.split_once('_').unwrap().1.to_string();
        if !classes.contains(&class) && images.len() < n {
            classes.push(class);
            images.push(std::fs::read(&file).unwrap());
        }
    }
    assert_eq!(images.len(), n);
    images
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap()
}

#[tokio::test]
async fn a_batch_of_eight_is_split_into_the_batcher_and_reassembled_in_order() {
    // The shipped (trained) octave net, on images of eight different classes: every image has
    // its own top-1 class and probability row, so a row answered for the wrong image shows.
    let server = TestServer::start(ServeConfig::default(), &shipped_models()).await;
    let mut client = client(&server);
    let images = one_per_class(8);
    let mut expected = Vec::new();
    for image in &images {
        expected.push(classify(&server, "fashion-mnist", "octave", image).await);
    }
    let mut top1: Vec<usize> = expected.iter().map(|row| argmax(row)).collect();
    top1.sort();
    top1.dedup();
    assert_eq!(top1.len(), 8, "the images need distinct top-1 classes");

    let response = client
        .model_infer(image_request("fashion-mnist", "octave", &images))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_version, "octave");
    let rows = probabilities(&response);
    assert_eq!(rows.len(), 8);
    for (row, own) in rows.iter().zip(&expected) {
        assert_close(row, own);
    }

    // The same images as client-normalised FP32 [8, 1, 28, 28] give the same rows.
    let spec = common::fashion_mnist_input();
    let values: Vec<f32> = images
        .iter()
        .flat_map(|png| preprocess(png, &spec, &Default::default()).unwrap())
        .collect();
    let request = ModelInferRequest {
        model_name: "fashion-mnist".into(),
        model_version: "octave".into(),
        inputs: vec![InferInputTensor {
            contents: Some(InferTensorContents {
                fp32_contents: values,
                ..Default::default()
            }),
            ..tensor("input", "FP32", &[8, 1, 28, 28])
        }],
        ..Default::default()
    };
    let response = client.model_infer(request).await.unwrap().into_inner();
    let rows = probabilities(&response);
    assert_eq!(rows.len(), 8);
    for (row, own) in rows.iter().zip(&expected) {
        assert_close(row, own);
    }
}

#[tokio::test]
async fn versions_are_variants_and_the_router_picks_when_none_is_named() {
    let dir = random_model_dir(
        "kserve-routing",
        &[
            ("vanilla", "resnet20", 0., 1.),
            ("octave", "oct-resnet20", 0.5, 1.),
        ],
        None,
    );
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    let mut client = client(&server);
    let image = sample_pngs(1);

    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    for (name, version, expected) in [
        ("kserve-routing", "", true),
        ("kserve-routing", "octave", true),
        ("kserve-routing", "octave-a9", false),
        ("nope", "", false),
    ] {
        let reply = client.model_ready(ready(name, version)).await.unwrap();
        assert_eq!(reply.into_inner().ready, expected, "{name} {version}");
    }
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "kserve-routing".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.versions, ["vanilla", "octave"]);

    // A routing key keeps a client on one variant; over many keys both variants answer.
    let mut answered: HashMap<String, usize> = HashMap::new();
    for key in 0..40 {
        let mut versions = Vec::new();
        for _ in 0..2 {
            let mut request = image_request("kserve-routing", "", &image);
            request.parameters.insert(
                "routing_key".into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::StringParam(format!("user-{key}"))),
                },
            );
            request.id = format!("req-{key}");
            let response = client.model_infer(request).await.unwrap().into_inner();
            assert_eq!(response.id, format!("req-{key}"));
            versions.push(response.model_version);
        }
        assert_eq!(
            versions[0], versions[1],
            "key user-{key} moved between variants"
        );
        *answered.entry(versions[0].clone()).or_default() += 1;
    }
    assert_eq!(answered.len(), 2, "{answered:?}");

    for (request, code) in [
        (image_request("nope", "", &image), Code::NotFound),
        (
            image_request("kserve-routing", "octave-a9", &image),
            Code::NotFound,
        ),
    ] {
        assert_eq!(infer_error(&mut client, request).await.code(), code);
    }
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_and_are_counted() {
    let dir = random_model_dir("kserve-errors", &[("vanilla", "resnet20", 0., 1.)], None);
    let server = TestServer::start(ServeConfig::default(), dir.path()).await;
    let mut client = client(&server);

    let mut wrong_shape = image_request("kserve-errors", "", &sample_pngs(1));
    wrong_shape.inputs[0] = tensor("input", "FP32", &[1, 3, 28, 28]);
    wrong_shape.raw_input_contents = vec![vec![0; 3 * 28 * 28 * 4]];
    let mut not_an_image = image_request("kserve-errors", "", &[b"hello".to_vec()]);
    not_an_image.id = "x".into();
    let mut unknown_output = image_request("kserve-errors", "", &sample_pngs(1));
    unknown_output.outputs = vec![InferRequestedOutputTensor {
        name: "logits".into(),
        ..Default::default()
    }];
    for (request, expected) in [
        (wrong_shape, "this model takes [N, 1, 28, 28]"),
        (not_an_image, "input 'image' element 0: bad image"),
        (unknown_output, "unknown output 'logits'"),
    ] {
        let status = infer_error(&mut client, request).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{}", status.message());
    }
    // The server still answers, and the metrics counted both outcomes.
    let ok = client
        .model_infer(image_request("kserve-errors", "", &sample_pngs(2)))
        .await;
    assert_eq!(probabilities(&ok.unwrap().into_inner()).len(), 2);
    let text = server.scrape().await;
    let count = |code: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("octserve_requests_total{")
                    && l.contains("model=\"kserve-errors\"")
                    && l.contains(&format!("code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {code} count in:\n{text}"))
    };
    assert_eq!(count("OK"), 1.);
    assert_eq!(count("INVALID_ARGUMENT"), 3.);

    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap();
    assert!(metadata
        .into_inner()
        .extensions
        .contains(&"classification".to_string()));
    let health = server.health("inference.GRPCInferenceService").await;
    assert_eq!(health as i32, 1, "SERVING");
}

/// NVIDIA's Python client against the shipped models (`.ci/run` installs it with pip).
#[tokio::test]
async fn tritonclient_works_unchanged_against_the_shipped_models() {
    let server = TestServer::start(ServeConfig::default(), &shipped_models()).await;
    let args = vec!["--url".into(), server.grpc.to_string()];
    common::interop(
        "kserve_tritonclient.py",
        args,
        "all tritonclient checks passed",
    )
    .await;
}
