//! Configuration: the serve settings (TOML file, overridden by flags) and the model manifests.
//!
//! A manifest (`models/<name>/manifest.toml`) describes one logical model: its labels, input
//! spec, and variants (architecture, alpha, weights file, A/B routing weight, recorded accuracy).
//! The serve config names the manifests to load; without one, every `models/*/manifest.toml` is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{Arch, ModelConfig};
use crate::preprocess::{ImageLimits, InputSpec};
use crate::security::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Triton-style dynamic batching settings of one variant.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    /// A batch goes when full or when its oldest request has waited this long.
    pub max_queue_delay_us: u64,
    /// Requests beyond this many waiting are refused at once (RESOURCE_EXHAUSTED).
    pub max_queue_size: usize,
    /// A request that waited this long is refused (RESOURCE_EXHAUSTED) instead of computed;
    /// 0 for no limit (Triton's `default_timeout_microseconds` with `timeout_action: REJECT`).
    pub queue_timeout_us: u64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay_us: 2000,
            max_queue_size: 1024,
            queue_timeout_us: 0,
        }
    }
}

impl BatchingConfig {
    pub fn max_queue_delay(&self) -> Duration {
        Duration::from_micros(self.max_queue_delay_us)
    }

    pub fn queue_timeout(&self) -> Option<Duration> {
        (self.queue_timeout_us > 0).then(|| Duration::from_micros(self.queue_timeout_us))
    }
}

/// The `serve --config` file.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Manifest files, relative to the config file. Empty: every `models/*/manifest.toml`.
    pub models: Vec<PathBuf>,
    pub batching: BatchingConfig,
    pub limits: ImageLimits,
    /// Seconds to finish accepted requests after SIGTERM before exiting.
    pub grace_period_secs: Option<u64>,
    /// TLS for the gRPC port; paths relative to the config file.
    pub tls: Option<TlsConfig>,
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        config.models = config.models.iter().map(|m| dir.join(m)).collect();
        config.tls = config.tls.map(|tls| tls.relative_to(dir));
        Ok(config)
    }

    /// The manifests to serve: the configured ones, or all under `models_dir`.
    pub fn manifest_paths(&self, models_dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
        if !self.models.is_empty() {
            return Ok(self.models.clone());
        }
        let read_err = |source| ConfigError::Read {
            path: models_dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(models_dir)
            .map_err(read_err)?
            .filter_map(|entry| Some(entry.ok()?.path().join("manifest.toml")))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        Ok(paths)
    }
}

/// One variant of a logical model.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantManifest {
    pub name: String,
    pub arch: String,
    #[serde(default)]
    pub alpha: f64,
    /// Safetensors file, relative to the manifest.
    pub weights: PathBuf,
    /// A/B share of traffic for requests that name no variant (0: reachable by name only).
    #[serde(default)]
    pub routing_weight: f64,
    /// Test accuracy recorded when the weights were trained (fraction).
    pub test_accuracy: Option<f64>,
    pub epochs: Option<u32>,
    pub train_seconds: Option<f64>,
    /// Overrides the model's batching for this variant.
    pub batching: Option<BatchingConfig>,
}

/// Shadow traffic: a variant that also computes (a share of) the answered requests, in the
/// background, to compare its top-1 and latency with the variant that answered.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    pub variant: String,
    /// Share of requests mirrored, in [0, 1].
    #[serde(default = "one")]
    pub fraction: f64,
}

fn one() -> f64 {
    1.0
}

/// How the shipped weights were made; informational.
#[derive(Clone, Debug, Deserialize, Default)]
pub struct TrainingInfo {
    pub recipe: Option<String>,
    pub command: Option<String>,
}

/// `models/<name>/manifest.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub labels: Vec<String>,
    /// The variant the others are compared with (the vanilla twin).
    pub baseline: String,
    pub input: InputSpec,
    #[serde(default)]
    pub training: TrainingInfo,
    /// Overrides the serve config's batching for this model's variants.
    pub batching: Option<BatchingConfig>,
    pub shadow: Option<ShadowConfig>,
    pub variants: Vec<VariantManifest>,
    /// Directory of the manifest file, which variant weights are relative to.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut manifest: Self = read_toml(path)?;
        manifest.dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        manifest
            .validate()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        let input = &self.input;
        if ![1, 3].contains(&input.channels) {
            return Err(format!(
                "input.channels must be 1 or 3, not {}",
                input.channels
            ));
        }
        if input.mean.len() != input.channels || input.std.len() != input.channels {
            return Err("input.mean and input.std need one value per channel".into());
        }
        if input.std.iter().any(|s| *s <= 0.) {
            return Err("input.std values must be positive".into());
        }
        if !self.variants.iter().any(|v| v.name == self.baseline) {
            return Err(format!(
                "baseline '{}' is not one of the variants",
                self.baseline
            ));
        }
        for v in &self.variants {
            v.arch.parse::<Arch>()?;
            if !(v.routing_weight >= 0. && v.routing_weight.is_finite()) {
                return Err(format!("variant '{}': routing_weight must be >= 0", v.name));
            }
        }
        if let Some(shadow) = &self.shadow {
            if !self.variants.iter().any(|v| v.name == shadow.variant) {
                return Err(format!(
                    "shadow variant '{}' is not one of the variants",
                    shadow.variant
                ));
            }
            if !(0.0..=1.0).contains(&shadow.fraction) {
                return Err("shadow.fraction must be in [0, 1]".into());
            }
        }
        Ok(())
    }

    pub fn model_config(&self, variant: &VariantManifest) -> ModelConfig {
        let arch: Arch = variant.arch.parse().expect("validated at load");
        ModelConfig {
            alpha: variant.alpha,
            in_channels: self.input.channels,
            num_classes: self.labels.len(),
            ..ModelConfig::new(arch)
        }
    }

    pub fn weights_path(&self, variant: &VariantManifest) -> PathBuf {
        self.dir.join(&variant.weights)
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
