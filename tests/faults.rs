//! Faults on a real server: a failing batch, a dying model worker (injected with fail points,
//! active only in test builds), clients that vanish mid-request, and a 1 GiB message.
//!
//! Fail points are process-wide: every test here holds a `FailScenario`, which runs them one at
//! a time.

mod common;

use std::time::Duration;

use fail::FailScenario;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use common::{random_model_dir, trouser_png, TestServer};
use octserve::config::ServeConfig;
use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use octserve::pb::inference::ServerReadyRequest;
use octserve::pb::ClassifyRequest;

fn classify(model: &str, image: Vec<u8>) -> ClassifyRequest {
    ClassifyRequest {
        model: model.into(),
        image,
        ..Default::default()
    }
}

async fn server(name: &str) -> (TestServer, tempfile::TempDir) {
    let dir = random_model_dir(name, &[("vanilla", "resnet20", 0., 1.)], None);
    (
        TestServer::start(ServeConfig::default(), dir.path()).await,
        dir,
    )
}

async fn server_ready(server: &TestServer) -> bool {
    let mut client = GrpcInferenceServiceClient::new(server.channel.clone());
    let reply = client.server_ready(ServerReadyRequest {}).await.unwrap();
    reply.into_inner().ready
}

#[tokio::test]
async fn a_failing_batch_answers_internal_and_the_next_batch_succeeds() {
    let scenario = FailScenario::setup();
    let (server, _dir) = server("faulty-batch").await;
    let mut client = server.client();

    fail::cfg("model-fails", "1*return").unwrap();
    let status = client
        .classify(classify("faulty-batch", trouser_png()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    // The cause stays in the server log; the client is told where to look.
    assert!(
        status.message().contains("see the server log") && !status.message().contains("injected"),
        "{}",
        status.message()
    );

    let reply = client
        .classify(classify("faulty-batch", trouser_png()))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().variant, "vanilla");
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert!(server_ready(&server).await);
    scenario.teardown();
}

#[tokio::test]
async fn a_dead_worker_is_restarted_and_health_shows_the_gap() {
    let scenario = FailScenario::setup();
    let (server, _dir) = server("dying-worker").await;
    let mut client = server.client();

    fail::cfg("worker-dies", "1*panic(injected worker death)").unwrap();
    let status = client
        .classify(classify("dying-worker", trouser_png()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("worker died"),
        "{}",
        status.message()
    );

    // Down while the supervisor restarts the worker, then back.
    let mut seen_down = false;
    for _ in 0..300 {
        match server.health("").await {
            ServingStatus::NotServing => {
                seen_down = true;
                assert!(!server_ready(&server).await);
            }
            ServingStatus::Serving if seen_down => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_down, "health never showed the dead worker");
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert!(server_ready(&server).await);
    let reply = client
        .classify(classify("dying-worker", trouser_png()))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().model, "dying-worker");
    scenario.teardown();
}

#[tokio::test]
async fn clients_that_vanish_or_send_a_gigabyte_do_not_affect_the_others() {
    let scenario = FailScenario::setup();
    let (server, _dir) = server("hostile").await;

    // Impatient clients, on the same HTTP/2 connection as the ordinary ones: each call is
    // cancelled after 1 ms, mostly while in flight, and its stream reset.
    let impatient_client = server.client();
    let impatient = (0..50).map(|_| {
        let mut client = impatient_client.clone();
        async move {
            let call = client.classify(classify("hostile", trouser_png()));
            let _ = tokio::time::timeout(Duration::from_millis(1), call).await;
        }
    });
    // A 1 GiB image: refused (OUT_OF_RANGE) from the message's length prefix while the client is
    // still sending it; `the_length_prefix_alone_gets_an_over_limit_message_refused` shows no
    // byte of the body is waited for.
    let mut huge_client = ClassifierClient::new(server.new_connection().await);
    let huge = async move {
        let request = classify("hostile", vec![0u8; 1 << 30]);
        huge_client.classify(request).await.unwrap_err()
    };
    // Meanwhile, ordinary clients are all answered.
    let ordinary = (0..20).map(|_| {
        let mut client = server.client();
        async move { client.classify(classify("hostile", trouser_png())).await }
    });
    let (_, status, answers) = tokio::join!(
        futures::future::join_all(impatient),
        huge,
        futures::future::join_all(ordinary)
    );
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    for answer in answers {
        assert_eq!(answer.unwrap().into_inner().model, "hostile");
    }
    assert_eq!(server.health("").await, ServingStatus::Serving);
    scenario.teardown();
}

/// A gRPC message's 5-byte prefix announcing 1 GiB, and then nothing: the server answers
/// OUT_OF_RANGE at once, from the prefix alone. A server that buffered the message before
/// checking its size would wait for the body and never answer.
#[tokio::test]
async fn the_length_prefix_alone_gets_an_over_limit_message_refused() {
    let scenario = FailScenario::setup();
    let (server, _dir) = server("prefix-only").await;
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/octserve.v1.Classifier/Classify",
            server.grpc
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(1u32 << 30).to_be_bytes());
    // The stream stays open: the body is announced, never sent.
    body.send_data(bytes::Bytes::from(prefix), false).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        let (parts, mut body) = response.await.unwrap().into_parts();
        let status = |map: &http::HeaderMap| {
            let code = map.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
            let message = map
                .get("grpc-message")
                .map(|m| m.to_str().unwrap().to_string());
            Some((code, message.unwrap_or_default()))
        };
        if let Some(status) = status(&parts.headers) {
            return status;
        }
        while body.data().await.is_some() {}
        status(&body.trailers().await.unwrap().unwrap()).unwrap()
    })
    .await
    .expect("no answer while the body was outstanding: the message is being buffered");
    assert_eq!(status.0, Code::OutOfRange as i32, "{status:?}");
    assert!(status.1.contains("limit"), "{status:?}");
    assert_eq!(server.health("").await, ServingStatus::Serving);
    scenario.teardown();
}
