//! One module per `octserve` subcommand.

pub mod ab;
pub mod bench;
pub mod classify;
pub mod eval;
pub mod inspect;
pub mod loadgen;
pub mod serve;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tonic::transport::Channel;
use tonic::Request;

use octserve::config::MAX_INPUT_SIDE;
use octserve::model::{Arch, ModelConfig};
use octserve::security::{client_tls, ApiKey};

/// Flags that pick an architecture and the sizes it is built for.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture (resnet18..152, resnet26, oct-resnet26..152, resnet20/32/56, oct-resnet20/32/56).
    #[arg(long, env = "OCTSERVE_ARCH")]
    pub arch: Arch,
    /// Low-frequency channel fraction of octave nets, in [0, 1).
    #[arg(long, env = "OCTSERVE_ALPHA", default_value_t = 0.5)]
    pub alpha: f64,
    /// Square input size in pixels, 1 to 4096 (a manifest's largest).
    #[arg(long, env = "OCTSERVE_INPUT_SIZE", default_value_t = 224, value_parser = one_to(MAX_INPUT_SIDE))]
    pub input_size: usize,
    /// Input channels, 1 to 4096.
    #[arg(long, env = "OCTSERVE_IN_CHANNELS", default_value_t = 3, value_parser = one_to(4096))]
    pub in_channels: usize,
    /// Classes, 1 to 2^20.
    #[arg(long, env = "OCTSERVE_NUM_CLASSES", default_value_t = 1000, value_parser = one_to(1 << 20))]
    pub num_classes: usize,
}

impl ModelArgs {
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            alpha: self.alpha,
            in_channels: self.in_channels,
            num_classes: self.num_classes,
            ..ModelConfig::new(self.arch)
        }
    }
}

/// How a client command reaches the server: address, TLS and API key.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// `http://host:port`, or `https://host:port` with `--tls-ca`.
    #[arg(long, env = "OCTSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// CA certificate (PEM) that signed the server's certificate: connect with TLS.
    #[arg(long, env = "OCTSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a server that requires mutual TLS.
    #[arg(long, env = "OCTSERVE_TLS_CLIENT_CERT", requires_all = ["tls_client_key", "tls_ca"])]
    pub tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "OCTSERVE_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Sent as `authorization: Bearer <key>` on every call.
    #[arg(long, env = "OCTSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
}

impl ConnectArgs {
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut endpoint = Channel::from_shared(self.addr.clone())
            .with_context(|| format!("bad address {}", self.addr))?;
        if let Some(ca) = &self.tls_ca {
            let identity = self
                .tls_client_cert
                .as_deref()
                .zip(self.tls_client_key.as_deref());
            endpoint = endpoint.tls_config(client_tls(ca, identity)?)?;
        }
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.addr))
    }

    /// `message` with the API key, when one is set.
    pub fn request<T>(&self, message: T) -> Request<T> {
        match &self.api_key {
            Some(key) => key.authorise(message),
            None => Request::new(message),
        }
    }
}

/// Which server, model and variant a client command talks to.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[arg(long, env = "OCTSERVE_MODEL")]
    pub model: String,
    /// Empty: the server's A/B router picks.
    #[arg(long, env = "OCTSERVE_VARIANT", default_value = "")]
    pub variant: String,
}

/// Clap's parser for a count that must be at least 1 (0 would leave nothing to do).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|e| e.to_string())? {
        0 => Err("it must be at least 1".into()),
        n => Ok(n),
    }
}

/// Clap's parser for a size from 1 to `max`: 0 leaves an empty tensor, which the model's
/// kernels do not take, and the bound keeps the analytic cost from overflowing.
pub fn one_to(max: usize) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=max as u64)
}

/// Clap's parser for a number from `min` to `max` (finite: NaN and infinities are refused), for
/// flags that become a `Duration`, which panics on negative, NaN or overflowing seconds.
pub fn number_in(
    min: f64,
    max: f64,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s| {
        let value: f64 = s.parse().map_err(|e| format!("{e}"))?;
        if !(min..=max).contains(&value) {
            return Err(format!("{s} is not a number from {min} to {max}"));
        }
        Ok(value)
    }
}

/// Prints `value` as one JSON object on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
