//! Runs the service: gRPC (Classifier, health, reflection) on one listener, Prometheus text on
//! another, the KServe v2 HTTP/REST routes on a third when given one, models loading in the
//! background, and a shutdown that ends: a graceful drain of
//! accepted requests (at most the grace period), then every connection still open is closed.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::ServeConfig;
use crate::connections::accept;
use crate::deadline::StampDeadlineLayer;
use crate::kserve::InferenceService;
use crate::pb;
use crate::pb::classifier_server::ClassifierServer;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::registry::Registry;
use crate::repository::ModelControl;
use crate::rest::{HttpOptions, HttpServer};
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

/// After the drain, how long connections get to take their GOAWAY and finish writing before
/// they are cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Everything `serve` needs besides its listeners.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub config: ServeConfig,
    /// Where `models/*/manifest.toml` are looked for when the config names none.
    pub models_dir: PathBuf,
    pub device: Device,
    /// Longest wait for accepted requests after shutdown is asked for.
    pub grace_period: Duration,
    /// TLS on the gRPC and HTTP/REST ports (the metrics port stays plain HTTP: bind it to a
    /// private address).
    pub tls: Option<TlsConfig>,
    /// Required on every RPC and HTTP route except health.
    pub api_key: Option<ApiKey>,
}

/// The ports served: gRPC, and optionally Prometheus metrics and KServe v2 HTTP/REST.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

/// [`run_with`] on gRPC and, when given, metrics listeners.
pub async fn run(
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listeners = Listeners {
        grpc,
        metrics,
        http: None,
    };
    run_with(listeners, options, shutdown).await
}

/// Serves until `shutdown` completes, then refuses new requests, answers every accepted one
/// (within the grace period), closes the connections still open and returns: at most the grace
/// period and about two seconds after `shutdown`, whatever clients do.
pub async fn run_with(
    listeners: Listeners,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners {
        grpc,
        metrics,
        http,
    } = listeners;
    // Installed before the models load, so an early SIGHUP cannot end the process; queued
    // hangups reload once the models are in.
    let hangups = hangup_signals();
    let state = Arc::new(ServingState::new(options.config.limits));
    let prometheus = crate::metrics::handle();
    tokio::spawn(crate::metrics::upkeep(prometheus.clone()));
    if let Some(listener) = metrics {
        let state = state.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                state.publish_queue_depths();
                let text = crate::metrics::render(&prometheus);
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

    let loading = {
        let state = state.clone();
        let options = options.clone();
        let set_health = set_health.clone();
        tokio::spawn(async move {
            let registry = Arc::new(new_registry(&options, state.workers.clone()));
            let loading = registry.clone();
            tokio::task::spawn_blocking(move || loading.load_all()).await??;
            state.set_registry(registry.clone());
            set_health(ServingStatus::Serving).await;
            tracing::info!(model_control = %registry.control, "models loaded; serving");
            tokio::spawn(follow_workers(state, set_health));
            if registry.control == ModelControl::Poll {
                let every = Duration::from_secs(options.config.repository_poll_secs());
                tokio::spawn(poll_repository(registry.clone(), every));
            }
            tokio::spawn(reload_on_hangup(registry, hangups));
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
        .max_encoding_message_size(options.config.limits.max_response_bytes + MESSAGE_OVERHEAD);

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
    let connections = options.config.connections;
    let mut builder = Server::builder()
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
        .max_concurrent_streams(connections.max_concurrent_streams)
        .http2_max_header_list_size(connections.max_header_list_bytes)
        .http2_keepalive_interval(connections.keepalive_interval())
        .http2_keepalive_timeout(Some(connections.keepalive_timeout()));
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls.server_config()?)
            .context("TLS configuration")?;
    }
    let (close, closed) = watch::channel(false);
    if let Some(listener) = http {
        let http = HttpOptions {
            api_key: options.api_key.clone(),
            tls: options.tls.clone(),
            connections,
            max_body_bytes: options.config.limits.max_request_bytes + MESSAGE_OVERHEAD,
        };
        let server = HttpServer::new(state.clone(), http).context("HTTP configuration")?;
        tokio::spawn(server.serve(listener, closed.clone()));
    }
    let server = builder
        .layer(StampDeadlineLayer)
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, guard.clone()))
        .add_service(InterceptedService::new(classifier, guard.clone()))
        .add_service(InterceptedService::new(inference, guard))
        .serve_with_incoming_shutdown(accept(grpc, connections, closed), drain);

    // Streams, health watches and idle connections outlive the drain: they get GOAWAY, a
    // moment to finish writing, then their connections are cut.
    let closing = async {
        state.closed().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::pin!(server, closing, loading);
    let mut loaded = false;
    loop {
        tokio::select! {
            served = &mut server => return served.context("gRPC server failed"),
            result = &mut loading, if !loaded => {
                loaded = true;
                result?.context("loading models")?;
            }
            _ = &mut closing => break,
        }
    }
    tracing::info!(
        connections = close.receiver_count(),
        "closing the connections still open"
    );
    close.send_replace(true);
    let _ = tokio::time::timeout(CLOSE_GRACE, &mut server).await;
    Ok(())
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "SIGHUP reloads are off"))
            .ok()
    }
}

/// Makes the served models match the repository on every SIGHUP.
async fn reload_on_hangup(registry: Arc<Registry>, hangups: Hangups) {
    #[cfg(unix)]
    {
        let Some(mut hangups) = hangups else {
            return;
        };
        while hangups.recv().await.is_some() {
            sync_repository(&registry).await;
        }
    }
    #[cfg(not(unix))]
    let _ = (registry, hangups);
}

/// Makes the served models match the repository every `every` (`--model-control poll`).
async fn poll_repository(registry: Arc<Registry>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is now: the models were just loaded
    loop {
        ticks.tick().await;
        sync_repository(&registry).await;
    }
}

async fn sync_repository(registry: &Arc<Registry>) {
    let registry = registry.clone();
    match tokio::task::spawn_blocking(move || registry.sync()).await {
        Ok(Ok(changes)) => {
            tracing::info!(models_changed = changes.len(), "repository re-read");
            for (model, change) in changes {
                tracing::info!(%model, ?change, "model reloaded from the repository");
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "reading the repository failed; nothing changed"),
        Err(e) => tracing::error!(error = %e, "repository reload task failed"),
    }
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

fn new_registry(options: &ServeOptions, workers: WorkerHealth) -> Registry {
    let config = &options.config;
    Registry::new(
        config.repository(&options.models_dir),
        config.model_control,
        config.batching,
        options.device.clone(),
        workers,
    )
}
