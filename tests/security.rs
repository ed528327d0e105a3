//! TLS, mutual TLS and the API key on a real server, with certificates from a test CA (rcgen).

mod common;

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

use common::{options, random_model_dir, trouser_png, TestServer};
use octserve::config::ServeConfig;
use octserve::pb::classifier_client::ClassifierClient;
use octserve::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use octserve::pb::inference::ServerReadyRequest;
use octserve::pb::{ClassifyRequest, ListModelsRequest};
use octserve::security::{client_tls, ApiKey, TlsConfig};

/// A CA, a server certificate for `localhost` and a client certificate, as PEM files.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        for (name, host) in [("server", "localhost"), ("client", "client.octserve.test")] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![host.to_string()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self, mutual: bool) -> TlsConfig {
        TlsConfig {
            cert: self.path("server.pem"),
            key: self.path("server-key.pem"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        }
    }

    /// A client trusting the test CA, with the client certificate when `identity`.
    fn client(&self, identity: bool) -> ClientTlsConfig {
        let (cert, key) = (self.path("client.pem"), self.path("client-key.pem"));
        let identity = identity.then_some((cert.as_path(), key.as_path()));
        client_tls(&self.path("ca.pem"), identity)
            .unwrap()
            .domain_name("localhost")
    }
}

fn classify(model: &str) -> ClassifyRequest {
    ClassifyRequest {
        model: model.into(),
        image: trouser_png(),
        ..Default::default()
    }
}

async fn channel(
    server: &TestServer,
    scheme: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let mut endpoint = Channel::from_shared(format!("{scheme}://{}", server.grpc)).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await
}

#[tokio::test]
async fn classify_over_tls_and_plain_text_is_refused() {
    let pki = TestPki::new();
    let dir = random_model_dir("tls", &[("vanilla", "resnet20", 0., 1.)], None);
    let mut serve = options(ServeConfig::default(), dir.path());
    serve.tls = Some(pki.server(false));
    let server = TestServer::start_with(serve, Some(pki.client(false))).await;

    let reply = server.client().classify(classify("tls")).await.unwrap();
    assert_eq!(reply.into_inner().variant, "vanilla");

    // A plain-text client gets no answer from a TLS port.
    let plain = channel(&server, "http", None).await;
    assert!(
        refused(plain, "tls").await,
        "a plain-text client was served"
    );
}

/// Whether the server refused a client on `channel`: at connection or at the first call.
async fn refused(channel: Result<Channel, tonic::transport::Error>, model: &str) -> bool {
    match channel {
        Err(_) => true,
        Ok(channel) => ClassifierClient::new(channel)
            .classify(classify(model))
            .await
            .is_err(),
    }
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_ca() {
    let pki = TestPki::new();
    let dir = random_model_dir("mtls", &[("vanilla", "resnet20", 0., 1.)], None);
    let mut serve = options(ServeConfig::default(), dir.path());
    serve.tls = Some(pki.server(true));
    let server = TestServer::start_with(serve, Some(pki.client(true))).await;

    let reply = server.client().classify(classify("mtls")).await.unwrap();
    assert_eq!(reply.into_inner().model, "mtls");

    // Trusting the server is not enough: without a client certificate the handshake fails.
    let anonymous = channel(&server, "https", Some(pki.client(false))).await;
    assert!(
        refused(anonymous, "mtls").await,
        "a client without a certificate was served"
    );
}

#[tokio::test]
async fn the_api_key_guards_every_service_but_health() {
    let dir = random_model_dir("keyed", &[("vanilla", "resnet20", 0., 1.)], None);
    let key: ApiKey = "k3y-for-tests".parse().unwrap();
    let mut serve = options(ServeConfig::default(), dir.path());
    serve.api_key = Some(key.clone());
    // Health needs no key: start_with waits for SERVING through it.
    let server = TestServer::start_with(serve, None).await;
    let mut client = server.client();

    let status = client.classify(classify("keyed")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("k3y"), "{}", status.message());
    let wrong: ApiKey = "k3y-for-tests-2".parse().unwrap();
    let status = client
        .classify(wrong.authorise(classify("keyed")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client.list_models(ListModelsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut kserve = GrpcInferenceServiceClient::new(server.channel.clone());
    let status = kserve
        .server_ready(ServerReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let reply = client
        .classify(key.authorise(classify("keyed")))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().model, "keyed");
    let mut request = tonic::Request::new(ServerReadyRequest {});
    request
        .metadata_mut()
        .insert("x-api-key", "k3y-for-tests".parse().unwrap());
    assert!(
        kserve
            .server_ready(request)
            .await
            .unwrap()
            .into_inner()
            .ready
    );
}
