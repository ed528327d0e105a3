//! Runs the service: gRPC (Classifier, health, reflection) on one listener, Prometheus text on
//! another, models loading in the background, and a graceful drain on shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::{Manifest, ServeConfig};
use crate::kserve::InferenceService;
use crate::pb;
use crate::pb::classifier_server::ClassifierServer;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::registry::Registry;
use crate::security::{ApiKey, RequireApiKey, TlsConfig};
use crate::service::{ClassifierService, ServingState};
use crate::worker::WorkerHealth;

/// Streams a client may reset before the server accepts them, per connection (h2's default: 20).
const MAX_PENDING_RESET_STREAMS: usize = 1024;

const CLASSIFIER_NAME: &str =
    <ClassifierServer<ClassifierService> as tonic::server::NamedService>::NAME;
const INFERENCE_NAME: &str =
    <GrpcInferenceServiceServer<InferenceService> as tonic::server::NamedService>::NAME;

/// Headroom over the image limit for the rest of a request message.
const MESSAGE_OVERHEAD: usize = 64 << 10;

/// Everything `serve` needs besides its listeners.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub config: ServeConfig,
    /// Where `models/*/manifest.toml` are looked for when the config names none.
    pub models_dir: PathBuf,
    pub device: Device,
    /// Longest wait for accepted requests after shutdown is asked for.
    pub grace_period: Duration,
    /// TLS on the gRPC port (the metrics port stays plain HTTP: bind it to a private address).
    pub tls: Option<TlsConfig>,
    /// Required on every RPC except health.
    pub api_key: Option<ApiKey>,
}

/// Serves until `shutdown` completes, then refuses new requests, answers every accepted one
/// (within the grace period) and returns.
pub async fn run(
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let prometheus = crate::metrics::handle();
    tokio::spawn(crate::metrics::upkeep(prometheus.clone()));
    if let Some(listener) = metrics {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = prometheus.render();
                async move { text }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    let set_health = move |status| {
        let health = health.clone();
        async move {
            for service in ["", CLASSIFIER_NAME, INFERENCE_NAME] {
                health.set_service_status(service, status).await;
            }
        }
    };
    set_health(ServingStatus::NotServing).await;

    let state = Arc::new(ServingState::new(options.config.limits));
    let loading = {
        let state = state.clone();
        let options = options.clone();
        let set_health = set_health.clone();
        tokio::spawn(async move {
            let workers = state.workers.clone();
            let (registry, manifests) =
                tokio::task::spawn_blocking(move || load_registry(&options, &workers)).await??;
            state.set_registry(registry);
            set_health(ServingStatus::Serving).await;
            tracing::info!("models loaded; serving");
            tokio::spawn(follow_workers(state.clone(), set_health));
            tokio::spawn(reload_on_hangup(state, manifests));
            anyhow::Ok(())
        })
    };

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let guard = RequireApiKey(options.api_key.clone());
    let max_message = options.config.limits.max_encoded_bytes + MESSAGE_OVERHEAD;
    let classifier = ClassifierServer::new(ClassifierService::new(state.clone()))
        .max_decoding_message_size(max_message);
    // KServe requests carry a batch: several images or an FP32 tensor.
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(state.clone()))
        .max_decoding_message_size(options.config.limits.max_request_bytes + MESSAGE_OVERHEAD)
        .max_encoding_message_size(usize::MAX);

    let drain = {
        let state = state.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new requests, draining accepted ones");
            set_health(ServingStatus::NotServing).await;
            state.drain(options.grace_period).await;
        }
    };
    // hyper's rapid-reset guard (CVE-2023-44487) closes a connection after 20 streams the client
    // reset before the server took them: with one shared channel, 20 impatient callers would cut
    // off everyone else on it. The guard stays, with room for a busy client's cancellations.
    let mut builder =
        Server::builder().http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS));
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls.server_config()?)
            .context("TLS configuration")?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, guard.clone()))
        .add_service(InterceptedService::new(classifier, guard.clone()))
        .add_service(InterceptedService::new(inference, guard))
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), drain);

    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served.context("gRPC server failed"),
        loaded = loading => loaded?.context("loading models")?,
    }
    server.await.context("gRPC server failed")
}

/// Re-reads the manifests' routing weights and shadow settings on every SIGHUP.
async fn reload_on_hangup(state: Arc<ServingState>, manifests: Vec<PathBuf>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            match state.reload_routing(&manifests) {
                Ok(models) => tracing::info!(?models, "routing reloaded"),
                Err(e) => tracing::error!(error = %e, "reload failed; keeping the old routing"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (state, manifests);
}

/// Keeps health NOT_SERVING while a model worker is down (and once draining starts).
async fn follow_workers<F, Fut>(state: Arc<ServingState>, set_health: F)
where
    F: Fn(ServingStatus) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut workers = state.workers.subscribe();
    while workers.changed().await.is_ok() {
        let status = if state.is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(status).await;
    }
}

fn load_registry(
    options: &ServeOptions,
    workers: &WorkerHealth,
) -> anyhow::Result<(Registry, Vec<PathBuf>)> {
    let paths = options.config.manifest_paths(&options.models_dir)?;
    anyhow::ensure!(
        !paths.is_empty(),
        "no models to serve: no manifest in the config and none under {}",
        options.models_dir.display()
    );
    let manifests = paths
        .iter()
        .map(|p| Manifest::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let registry = Registry::load(
        &manifests,
        options.config.batching,
        &options.device,
        workers,
    )?;
    Ok((registry, paths))
}
