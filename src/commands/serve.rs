//! `octserve serve`: runs the service until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;

use octserve::config::ServeConfig;
use octserve::device::parse_device;
use octserve::repository::ModelControl;
use octserve::security::{ApiKey, TlsConfig};
use octserve::server::{run_with as serve, Listeners, ServeOptions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML serve config (models, batching, limits). Without it: every models/*/manifest.toml.
    #[arg(long, env = "OCTSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "OCTSERVE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    #[arg(long, env = "OCTSERVE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// KServe v2 / Open Inference Protocol over HTTP/REST (Triton's port).
    #[arg(long, env = "OCTSERVE_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub http_addr: SocketAddr,
    /// `cpu`, `cuda` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, env = "OCTSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Where model manifests are found when the config names none.
    #[arg(long, env = "OCTSERVE_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Seconds to finish accepted requests after SIGTERM (overrides the config).
    #[arg(long, env = "OCTSERVE_GRACE_PERIOD")]
    pub grace_period: Option<u64>,
    /// Serve gRPC over TLS with this certificate chain (PEM; overrides the config's [tls]).
    #[arg(long, env = "OCTSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "OCTSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    #[arg(long, env = "OCTSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Who may change the served models while the server runs: `none` (SIGHUP only),
    /// `explicit` (also the repository load/unload calls) or `poll` (the server re-reads the
    /// repository itself). Overrides the config.
    #[arg(long, env = "OCTSERVE_MODEL_CONTROL", value_enum)]
    pub model_control: Option<ModelControl>,
    /// With `--model-control poll`: seconds between two reads of the repository (default 15).
    #[arg(long, env = "OCTSERVE_REPOSITORY_POLL_SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub repository_poll_secs: Option<u64>,
    /// Require this key (`authorization: Bearer <key>`) on every RPC except health.
    /// Prefer the environment variable: a flag shows in the process list.
    #[arg(long, env = "OCTSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServeConfig::load(path)?,
        None => ServeConfig::default(),
    };
    config.model_control = args.model_control.unwrap_or(config.model_control);
    config.repository_poll_secs = args.repository_poll_secs.or(config.repository_poll_secs);
    if config.model_control == ModelControl::Explicit && args.api_key.is_none() {
        tracing::warn!(
            "--model-control explicit without an API key: anyone who reaches the port can load \
             and unload models"
        );
    }
    let grace = args.grace_period.or(config.grace_period_secs).unwrap_or(30);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => config.tls.clone(),
    };
    let options = ServeOptions {
        config,
        tls,
        api_key: args.api_key.clone(),
        models_dir: args.models_dir.clone(),
        device: parse_device(&args.device)?,
        grace_period: Duration::from_secs(grace),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let served = runtime.block_on(async {
        let grpc = TcpListener::bind(args.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC to {}", args.grpc_addr))?;
        let metrics = TcpListener::bind(args.metrics_addr)
            .await
            .with_context(|| format!("binding metrics to {}", args.metrics_addr))?;
        let http = TcpListener::bind(args.http_addr)
            .await
            .with_context(|| format!("binding HTTP to {}", args.http_addr))?;
        tracing::info!(
            grpc = %args.grpc_addr,
            metrics = %args.metrics_addr,
            http = %args.http_addr,
            "listening"
        );
        let listeners = Listeners {
            grpc,
            metrics: Some(metrics),
            http: Some(http),
        };
        serve(listeners, options, shutdown_signal()).await
    });
    // A model still loading or an image still decoding on the blocking pool must not hold the
    // exit past the shutdown's bound.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Completes on SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
