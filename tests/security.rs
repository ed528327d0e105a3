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
    // The connection is made and then dropped, not refused.
    let plain = refusal(channel(&server, "http", None).await, "tls").await;
    assert!(
        plain.contains("connection error") && !plain.contains("refused"),
        "{plain}"
    );
    // What it was sent: a TLS alert record, the TLS layer refusing bytes that are not TLS
    // (content type 21, alert; level 2, fatal; 50, decode_error).
    let reply = plain_text_reply(&server).await;
    assert!(
        reply.len() == 7 && reply[0] == 21 && reply[5..] == [2, 50],
        "not a fatal TLS decode_error alert: {reply:?}"
    );

    // A client that trusts another CA refuses the server's certificate.
    let stranger = TestPki::new();
    let untrusting = refusal(
        channel(&server, "https", Some(stranger.client(false))).await,
        "tls",
    )
    .await;
    // rustls's certificate verification error (BadSignature: the stranger CA has the same
    // empty name as the server's issuer, so only the signature tells them apart).
    assert!(
        untrusting.contains("invalid peer certificate: BadSignature"),
        "{untrusting}"
    );
}

/// What the server answers a plain-text HTTP/2 client's first bytes with, until it closes.
async fn plain_text_reply(server: &TestServer) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let read = tcp.read_to_end(&mut reply);
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .expect("the server neither answered nor closed")
        // A reset after the reply keeps what was read.
        .ok();
    reply
}

/// Why a client on `channel` was refused, at connection or at its first call: the error with
/// its causes. Panics if the client was served.
async fn refusal(channel: Result<Channel, tonic::transport::Error>, model: &str) -> String {
    let error: Box<dyn std::error::Error> = match channel {
        Err(e) => Box::new(e),
        Ok(channel) => Box::new(
            ClassifierClient::new(channel)
                .classify(classify(model))
                .await
                .expect_err("the client was served"),
        ),
    };
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text += &format!(": {e}");
        cause = e.source();
    }
    text
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
    let anonymous = refusal(
        channel(&server, "https", Some(pki.client(false))).await,
        "mtls",
    )
    .await;
    // The server's TLS 1.3 alert, as rustls reports it to the client.
    assert!(
        anonymous.contains("received fatal alert: CertificateRequired"),
        "{anonymous}"
    );
}

/// `GET path` over HTTP/1.1 on `stream`: the status and body.
async fn http_get_on<S>(stream: S, path: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Empty};
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The HTTP/REST port serves TLS with the gRPC port's certificate, and mutual TLS with its
/// client CA: an HTTPS client trusting the CA is answered, a plain-text one is not, and under
/// mutual TLS a client without a certificate is refused in the handshake.
#[tokio::test]
async fn the_http_port_speaks_tls_and_mutual_tls_like_the_grpc_port() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = TestPki::new();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
        .unwrap();
    let builder = || {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
    };
    let anonymous = std::sync::Arc::new(builder().with_no_client_auth());
    let with_identity = std::sync::Arc::new(
        builder()
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(pki.path("client.pem")).unwrap()],
                PrivateKeyDer::from_pem_file(pki.path("client-key.pem")).unwrap(),
            )
            .unwrap(),
    );
    let https = |config: std::sync::Arc<rustls::ClientConfig>, addr| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let localhost = ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(localhost, tcp)
            .await
    };

    for mutual in [false, true] {
        let dir = random_model_dir("tls", &[("vanilla", "resnet20", 0., 1.)], None);
        let mut serve = options(ServeConfig::default(), dir.path());
        serve.tls = Some(pki.server(mutual));
        let server = TestServer::start_with(serve, Some(pki.client(mutual))).await;

        let client = if mutual { &with_identity } else { &anonymous };
        let tls = https(client.clone(), server.http).await.unwrap();
        let (status, body) = http_get_on(tls, "/v2/models/tls").await;
        assert_eq!(status, 200, "mutual {mutual}: {body}");
        assert!(body.contains("\"versions\":[\"vanilla\"]"), "{body}");

        // Plain text to the TLS port: the TLS layer answers with a fatal alert, never HTTP.
        let mut plain = tokio::net::TcpStream::connect(server.http).await.unwrap();
        plain
            .write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        let _ = plain.read_to_end(&mut reply).await;
        assert!(
            !reply.starts_with(b"HTTP/") && reply.first() == Some(&21),
            "mutual {mutual}: not a TLS alert: {:?}",
            String::from_utf8_lossy(&reply)
        );

        if mutual {
            // Trusting the server is not enough: the handshake wants a client certificate. In
            // TLS 1.3 the client learns it on its first read.
            let refused = match https(anonymous.clone(), server.http).await {
                Err(e) => e.to_string(),
                Ok(mut tls) => {
                    let _ = tls
                        .write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n\r\n")
                        .await;
                    let mut buf = Vec::new();
                    tls.read_to_end(&mut buf).await.unwrap_err().to_string()
                }
            };
            assert!(refused.contains("CertificateRequired"), "{refused}");
        }
    }
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
