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
    // A 1 GiB image: refused from the message's length prefix, never buffered whole (the client
    // sees OUT_OF_RANGE, or a reset stream while it is still sending).
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
    assert_ne!(status.code(), Code::Ok);
    for answer in answers {
        assert_eq!(answer.unwrap().into_inner().model, "hostile");
    }
    assert_eq!(server.health("").await, ServingStatus::Serving);
    scenario.teardown();
}
