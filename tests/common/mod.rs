//! A real octserve server on ephemeral ports, for integration tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use octserve::config::{BatchingConfig, ServeConfig};
use octserve::pb::classifier_client::ClassifierClient;
use octserve::preprocess::InputSpec;
use octserve::server::{run_with, Listeners, ServeOptions};

pub struct TestServer {
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The KServe v2 HTTP/REST port.
    pub http: SocketAddr,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// Serves the manifests of `config` (or every manifest under `models_dir`).
    pub async fn start(config: ServeConfig, models_dir: &Path) -> Self {
        Self::start_with(options(config, models_dir), None).await
    }

    /// Serves with `options`; `tls` is how the test's channel trusts a TLS server.
    pub async fn start_with(options: ServeOptions, tls: Option<ClientTlsConfig>) -> Self {
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_listener.local_addr().unwrap();
        let metrics = metrics_listener.local_addr().unwrap();
        let http = http_listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = Listeners {
            grpc: grpc_listener,
            metrics: Some(metrics_listener),
            http: Some(http_listener),
        };
        let handle = tokio::spawn(run_with(listeners, options, async {
            let _ = rx.await;
        }));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{grpc}")).unwrap();
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = endpoint.connect().await.unwrap();
        let server = Self {
            grpc,
            metrics,
            http,
            channel,
            shutdown: Some(tx),
            handle,
        };
        server.wait_serving().await;
        server
    }

    /// A plain-text connection of its own, as another client's would be.
    pub async fn new_connection(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn client(&self) -> ClassifierClient<Channel> {
        ClassifierClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    /// The served models, from `ListModels`.
    pub async fn models(&self) -> Vec<octserve::pb::ModelInfo> {
        let request = octserve::pb::ListModelsRequest {};
        self.client()
            .list_models(request)
            .await
            .unwrap()
            .into_inner()
            .models
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut health = HealthClient::new(self.channel.clone());
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        let status = health.check(request).await.unwrap().into_inner().status;
        ServingStatus::try_from(status).unwrap()
    }

    async fn wait_serving(&self) {
        for _ in 0..600 {
            if self.health("").await == ServingStatus::Serving {
                return;
            }
            assert!(
                !self.handle.is_finished(),
                "the server stopped while loading"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not become ready in 30 s");
    }

    /// Asks the server to shut down (as SIGTERM does) and returns its run handle.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn scrape(&self) -> String {
        http_get(&format!("http://{}/metrics", self.metrics)).await
    }
}

/// The body of a `GET url` answered 200, through hyper's client.
pub async fn http_get(url: &str) -> String {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(status, http::StatusCode::OK, "{body}");
    body
}

/// Plain-text serving options for `config` and `models_dir`.
pub fn options(config: ServeConfig, models_dir: &Path) -> ServeOptions {
    ServeOptions {
        config,
        models_dir: models_dir.to_path_buf(),
        device: Device::Cpu,
        grace_period: Duration::from_secs(30),
        tls: None,
        api_key: None,
    }
}

/// A manifest directory with one model of random-weight variants, for tests that need a server
/// but no trained weights.
pub fn random_model_dir(
    name: &str,
    variants: &[(&str, &str, f64, f64)],
    batching: Option<BatchingConfig>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join(name);
    std::fs::create_dir_all(&model_dir).unwrap();
    let mut text = format!(
        "name = \"{name}\"\nlabels = [{}]\nbaseline = \"{}\"\n\n[input]\nchannels = 1\nheight = 28\nwidth = 28\nmean = [0.5]\nstd = [0.25]\n",
        (0..10).map(|i| format!("\"class{i}\"")).collect::<Vec<_>>().join(", "),
        variants[0].0
    );
    if let Some(b) = batching {
        text += &format!(
            "\n[batching]\nmax_batch_size = {}\nmax_queue_delay_us = {}\nmax_queue_size = {}\n",
            b.max_batch_size, b.max_queue_delay_us, b.max_queue_size
        );
    }
    for (variant, arch, alpha, weight) in variants {
        text += &format!(
            "\n[[variants]]\nname = \"{variant}\"\narch = \"{arch}\"\nalpha = {alpha}\nweights = \"random\"\nrouting_weight = {weight}\n"
        );
    }
    std::fs::write(model_dir.join("manifest.toml"), text).unwrap();
    dir
}

/// The README's example image: a real Fashion-MNIST trouser (28x28 gray PNG).
pub fn trouser_png() -> Vec<u8> {
    std::fs::read(shipped_models().join("fashion-mnist/samples/0002_trouser.png")).unwrap()
}

/// The repository's shipped models.
pub fn shipped_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// The shipped Fashion-MNIST sample images, in file-name order (`NNNN_class.png`).
pub fn sample_png_files() -> Vec<PathBuf> {
    let dir = shipped_models().join("fashion-mnist/samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

/// The shipped Fashion-MNIST models' input, as their manifest gives it.
pub fn fashion_mnist_input() -> InputSpec {
    InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

/// The `octserve bench` / `inspect` flags for nets shaped like the shipped ones (1x28x28, 10
/// classes).
pub const TOY_SHAPE_FLAGS: [&str; 6] = [
    "--input-size",
    "28",
    "--in-channels",
    "1",
    "--num-classes",
    "10",
];

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Runs `tools/interop/<script>` with `args` and asserts it passed: exit status 0 and `passed`
/// in its output. The Python clients come from `tools/interop/requirements.txt` (`.ci/run`
/// installs them).
pub async fn interop(script: &str, args: Vec<String>, passed: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools/interop")
        .join(script);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(path)
            .args(args)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed (needs `pip install -r tools/interop/requirements.txt`, which .ci/run \
         does):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(passed), "{stdout}");
}

/// Runs the `octserve` binary with `args` (a `--json` command) and returns the JSON it prints.
pub fn octserve_json<I, S>(args: I) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_octserve"))
        .args(args)
        .output()
        .expect("octserve runs");
    assert!(
        out.status.success(),
        "octserve failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}
