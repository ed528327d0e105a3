//! What a hostile or careless client can send a real server, and what it must get back: raw
//! HTTP/2 header values no gRPC library would send, oversized metadata, deadlines that expire
//! in the queue, a stream with a bad item, duplicate KServe outputs, storms that must leave
//! the queue-depth gauge at 0, silent connections. Signals, RSS and file-descriptor limits are
//! per process: tests/process.rs runs the binary for those.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::Code;

use common::{random_model_dir, trouser_png, TestServer};
use octserve::config::{BatchingConfig, Dispatch, ServeConfig};
use octserve::connections::ConnectionLimits;
use octserve::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use octserve::pb::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use octserve::pb::inference::ModelInferRequest;
use octserve::pb::ClassifyRequest;

const MODEL: &str = "toy";

async fn server(config: ServeConfig) -> (TestServer, tempfile::TempDir) {
    let variants = [
        ("vanilla", "resnet20", 0., 1.),
        ("octave", "oct-resnet20", 0.5, 1.),
    ];
    let dir = random_model_dir(MODEL, &variants, None);
    (TestServer::start(config, dir.path()).await, dir)
}

fn classify_request(image: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: MODEL.into(),
        image,
        ..Default::default()
    }
}

#[tokio::test]
async fn no_grpc_timeout_value_panics_a_handler() {
    let (server, _dir) = server(ServeConfig::default()).await;
    let values = [
        "18446744073709551615H",
        "9999999999999999999S",
        "99999999H",
        "0n",
        "-1S",
        "1.5S",
        "S",
        "",
    ];
    for value in values {
        let request = classify_request(trouser_png());
        let (status, _) =
            raw_classify(server.grpc, &request, &[("grpc-timeout", value.into())]).await;
        assert!(
            matches!(status, Some(0) | Some(4)),
            "grpc-timeout {value:?}: grpc-status {status:?}"
        );
    }
    // Nothing above cost the server its health.
    let reply = server
        .client()
        .classify(classify_request(trouser_png()))
        .await;
    assert!(reply.is_ok(), "{reply:?}");
}

#[tokio::test]
async fn oversized_metadata_is_refused_for_its_call_alone() {
    let (server, _dir) = server(ServeConfig::default()).await;
    let mut client = server.client();
    let one_value = vec![("x-big", "v".repeat(64 << 10))];
    let many_values: Vec<_> = (0..64)
        .map(|i| {
            (
                Box::leak(format!("x-meta-{i}").into_boxed_str()) as &str,
                "v".repeat(1 << 10),
            )
        })
        .collect();
    for metadata in [one_value, many_values] {
        // Calls in flight on the same connection while the oversized one is refused.
        let neighbours: Vec<_> = (0..8)
            .map(|_| {
                let mut client = server.client();
                tokio::spawn(async move { client.classify(classify_request(trouser_png())).await })
            })
            .collect();
        let mut request = tonic::Request::new(classify_request(trouser_png()));
        for (key, value) in &metadata {
            request
                .metadata_mut()
                .insert(*key, MetadataValue::try_from(value.as_str()).unwrap());
        }
        let refused = client.classify(request).await;
        assert!(refused.is_err(), "64 KiB of metadata was accepted");
        for neighbour in neighbours {
            let reply = neighbour.await.unwrap();
            assert!(
                reply.is_ok(),
                "a neighbour on the connection failed: {reply:?}"
            );
        }
        let after = client.classify(classify_request(trouser_png())).await;
        assert!(after.is_ok(), "the shared connection is gone: {after:?}");
    }
}

#[tokio::test]
async fn a_request_expiring_in_the_queue_is_deadline_exceeded_and_counted() {
    // Waiting up to 10 s for company keeps a lone request queued past its 200 ms deadline.
    let config = ServeConfig {
        batching: BatchingConfig {
            dispatch: Dispatch::AfterDelay,
            max_queue_delay_us: 10_000_000,
            ..BatchingConfig::default()
        },
        ..ServeConfig::default()
    };
    let (server, _dir) = server(config).await;
    let request = ClassifyRequest {
        variant: "octave".into(),
        ..classify_request(trouser_png())
    };
    // Raw HTTP/2: a gRPC library would give up on its own at the deadline and report its own
    // status; this client waits for the server's.
    for _ in 0..3 {
        let timeout = [("grpc-timeout", "200m".to_string())];
        let (status, _) = raw_classify(server.grpc, &request, &timeout).await;
        assert_eq!(status, Some(Code::DeadlineExceeded as i32));
    }
    let metrics = server.scrape().await;
    let expired = series(
        &metrics,
        "octserve_requests_total",
        &["variant=\"octave\"", "code=\"DEADLINE_EXCEEDED\""],
    );
    assert_eq!(expired, Some(3.), "{metrics}");
}

#[tokio::test]
async fn a_stream_answers_every_request_even_after_a_bad_one() {
    let (server, _dir) = server(ServeConfig::default()).await;
    let requests: Vec<ClassifyRequest> = (0..20)
        .map(|i| {
            let image = if i == 10 {
                b"not an image".to_vec()
            } else {
                trouser_png()
            };
            classify_request(image)
        })
        .collect();
    let mut replies = server
        .client()
        .classify_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answered = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        answered.push(reply);
    }
    assert_eq!(answered.len(), 20);
    for (i, reply) in answered.iter().enumerate() {
        if i == 10 {
            let status = reply.status.as_ref().expect("the bad item has a status");
            assert_eq!(status.code, Code::InvalidArgument as i32);
            assert!(status.message.contains("image"), "{}", status.message);
            assert!(reply.classes.is_empty());
        } else {
            assert!(reply.status.is_none(), "item {i}: {:?}", reply.status);
            assert_eq!(reply.classes.len(), 5);
        }
    }
}

#[tokio::test]
async fn the_queue_depth_gauge_is_zero_on_an_idle_server_after_a_storm() {
    let (server, _dir) = server(ServeConfig::default()).await;
    let calls: Vec<_> = (0..128)
        .map(|i| {
            let mut client = server.client();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(classify_request(trouser_png()));
                // A share of callers give up early, as impatient clients do.
                if i % 4 == 0 {
                    request.set_timeout(Duration::from_millis(1));
                }
                client.classify(request).await
            })
        })
        .collect();
    for call in calls {
        let _ = call.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let metrics = server.scrape().await;
    for variant in ["vanilla", "octave"] {
        let label = format!("variant=\"{variant}\"");
        let depth = series(&metrics, "octserve_queue_depth", &[&label]);
        assert_eq!(depth, Some(0.), "{variant}: {metrics}");
    }
}

#[tokio::test]
async fn duplicate_or_oversized_kserve_outputs_are_refused() {
    let (server, _dir) = server(ServeConfig {
        limits: octserve::preprocess::ImageLimits {
            max_response_bytes: 1 << 10,
            ..Default::default()
        },
        ..ServeConfig::default()
    })
    .await;
    let mut client = GrpcInferenceServiceClient::new(server.channel.clone());
    let output = InferRequestedOutputTensor {
        name: "probabilities".into(),
        ..Default::default()
    };
    let request = |n: usize, outputs: Vec<InferRequestedOutputTensor>| {
        let image = trouser_png();
        let mut raw = Vec::new();
        for _ in 0..n {
            raw.extend_from_slice(&(image.len() as u32).to_le_bytes());
            raw.extend_from_slice(&image);
        }
        ModelInferRequest {
            model_name: MODEL.into(),
            inputs: vec![InferInputTensor {
                name: "image".into(),
                datatype: "BYTES".into(),
                shape: vec![n as i64],
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            outputs,
            ..Default::default()
        }
    };
    let twice = client
        .model_infer(request(1, vec![output.clone(), output.clone()]))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::InvalidArgument);
    assert!(twice.message().contains("twice"), "{}", twice.message());

    // 40 bytes of probabilities an image: 2 images fit in 1 KiB, 32 do not.
    assert!(client
        .model_infer(request(2, vec![output.clone()]))
        .await
        .is_ok());
    let large = client
        .model_infer(request(32, vec![output]))
        .await
        .unwrap_err();
    assert_eq!(large.code(), Code::InvalidArgument);
    assert!(
        large.message().contains("over the limit"),
        "{}",
        large.message()
    );
}

#[tokio::test]
async fn connections_get_the_advertised_stream_limit_and_silent_ones_are_closed() {
    let config = ServeConfig {
        connections: ConnectionLimits {
            max_concurrent_streams: 7,
            handshake_timeout_secs: 1,
            ..ConnectionLimits::default()
        },
        ..ServeConfig::default()
    };
    let (server, _dir) = server(config).await;

    let tcp = TcpStream::connect(server.grpc).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // Driving the connection a moment reads the server's SETTINGS.
    let _ = tokio::time::timeout(Duration::from_millis(300), &mut connection).await;
    assert_eq!(connection.max_concurrent_send_streams(), 7);

    let mut silent = TcpStream::connect(server.grpc).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent connection was kept past the handshake timeout"
    );
}

/// `message` as a Classify over raw HTTP/2 with `headers` added: the gRPC status (none if the stream was
/// reset or the connection failed) and the HTTP status.
async fn raw_classify(
    addr: SocketAddr,
    message: &ClassifyRequest,
    headers: &[(&str, String)],
) -> (Option<i32>, u16) {
    use prost::Message;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/octserve.v1.Classifier/Classify"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (key, value) in headers {
        request = request.header(*key, value.as_str());
    }
    let message = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let (response, mut body) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    body.send_data(Bytes::from(frame), true).unwrap();
    let Ok(response) = response.await else {
        return (None, 0);
    };
    let http_status = response.status().as_u16();
    let (parts, mut body) = response.into_parts();
    let code = |map: &http::HeaderMap| {
        map.get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    if let Some(code) = code(&parts.headers) {
        return (Some(code), http_status);
    }
    while let Some(chunk) = body.data().await {
        if chunk.is_err() {
            return (None, http_status);
        }
    }
    let trailers = body.trailers().await.ok().flatten();
    (trailers.as_ref().and_then(code), http_status)
}

/// The value of the series `name{...}` whose labels include all of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|l| line.contains(l)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}
