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
use crate::repository::{ModelControl, Repository};
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
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    /// A batch goes when full or when its oldest request has waited this long.
    pub max_queue_delay_us: u64,
    /// Requests beyond this many waiting are refused at once (RESOURCE_EXHAUSTED).
    pub max_queue_size: usize,
    /// A request that waited this long is refused (RESOURCE_EXHAUSTED) instead of computed;
    /// 0 for no limit (Triton's `default_timeout_microseconds` with `timeout_action: REJECT`).
    pub queue_timeout_us: u64,
    /// When a batch goes to an idle model worker.
    pub dispatch: Dispatch,
}

/// When a formed batch is handed to the model worker.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Dispatch {
    /// As soon as the worker is idle, with whatever is queued: a lone request never waits for
    /// company, and batches form from the requests that arrive while the worker computes.
    #[default]
    WhenIdle,
    /// Also wait, up to `max_queue_delay_us` from the oldest request's arrival, for the batch
    /// to fill, even when the worker is idle.
    AfterDelay,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay_us: 2000,
            max_queue_size: 1024,
            queue_timeout_us: 0,
            dispatch: Dispatch::WhenIdle,
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
    /// Connection limits of the gRPC port.
    pub connections: crate::connections::ConnectionLimits,
    /// Who may change the served models while the server runs: `none`, `explicit` or `poll`.
    pub model_control: ModelControl,
    /// With `model_control = "poll"`: seconds between two reads of the repository (default 15).
    pub repository_poll_secs: Option<u64>,
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        config.models = config.models.iter().map(|m| dir.join(m)).collect();
        config.tls = config.tls.map(|tls| tls.relative_to(dir));
        if config.repository_poll_secs == Some(0) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "repository_poll_secs must be at least 1".into(),
            });
        }
        Ok(config)
    }

    /// Seconds between two reads of the repository with `model_control = "poll"`.
    pub fn repository_poll_secs(&self) -> u64 {
        self.repository_poll_secs.unwrap_or(15).max(1)
    }

    /// Where the served models' manifests are: the configured ones, or every
    /// `manifest.toml` one level under `models_dir`.
    pub fn repository(&self, models_dir: &Path) -> Repository {
        Repository::new(self.models.clone(), models_dir.to_path_buf())
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
#[serde(deny_unknown_fields)]
pub struct TrainingInfo {
    pub recipe: Option<String>,
    pub command: Option<String>,
}

/// Largest `input.height` and `input.width` a manifest may give, in pixels.
pub const MAX_INPUT_SIDE: usize = 4096;

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
        if self.labels.is_empty() {
            return Err("labels is empty; the model needs one label per class".into());
        }
        let input = &self.input;
        if ![1, 3].contains(&input.channels) {
            return Err(format!(
                "input.channels must be 1 or 3, not {}",
                input.channels
            ));
        }
        for (key, size) in [("height", input.height), ("width", input.width)] {
            if !(1..=MAX_INPUT_SIDE).contains(&size) {
                return Err(format!(
                    "input.{key} must be 1 to {MAX_INPUT_SIDE} pixels, not {size}"
                ));
            }
        }
        if input.mean.len() != input.channels || input.std.len() != input.channels {
            return Err("input.mean and input.std need one value per channel".into());
        }
        if !input.mean.iter().all(|m| m.is_finite()) {
            return Err("input.mean values must be finite".into());
        }
        if !input.std.iter().all(|s| s.is_finite() && *s > 0.) {
            return Err("input.std values must be positive and finite".into());
        }
        if !self.variants.iter().any(|v| v.name == self.baseline) {
            return Err(format!(
                "baseline '{}' is not one of the variants",
                self.baseline
            ));
        }
        for (i, v) in self.variants.iter().enumerate() {
            if v.name.is_empty() {
                return Err(format!("variant {} has an empty name", i + 1));
            }
            if self.variants[..i].iter().any(|w| w.name == v.name) {
                return Err(format!("variant name '{}' is used twice", v.name));
            }
            v.arch.parse::<Arch>()?;
            if !(0.0..1.0).contains(&v.alpha) {
                return Err(format!(
                    "variant '{}': alpha must be in [0, 1), not {}",
                    v.name, v.alpha
                ));
            }
            if !(v.routing_weight >= 0. && v.routing_weight.is_finite()) {
                return Err(format!("variant '{}': routing_weight must be >= 0", v.name));
            }
        }
        // A request that names no variant is routed by weight: with every weight 0 each such
        // request would fail, so a manifest (and a SIGHUP reload) must route somewhere.
        if self.variants.iter().all(|v| v.routing_weight == 0.) {
            return Err(
                "every variant has routing_weight 0, so requests that name no variant could \
                 not be routed; give at least one variant a positive routing_weight"
                    .into(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
name = "toy"
labels = ["a", "b", "c"]
baseline = "vanilla"

[input]
channels = 1
height = 28
width = 28
mean = [0.5]
std = [0.25]

[training]
recipe = "SGD"

[[variants]]
name = "vanilla"
arch = "resnet20"
weights = "random"
routing_weight = 1

[[variants]]
name = "octave"
arch = "oct-resnet20"
alpha = 0.5
weights = "random"
routing_weight = 1
"#;

    /// Why `text` (a manifest) is refused, from parsing or validation.
    fn refusal(text: &str) -> String {
        match toml::from_str::<Manifest>(text) {
            Ok(manifest) => manifest
                .validate()
                .expect_err("the manifest should be refused"),
            Err(e) => e.to_string(),
        }
    }

    /// The example manifest with `from` replaced by `to` (which must be there).
    fn with(from: &str, to: &str) -> String {
        assert!(MANIFEST.contains(from), "{from}");
        MANIFEST.replacen(from, to, 1)
    }

    fn assert_refused(text: &str, expected: &str) {
        let message = refusal(text);
        assert!(message.contains(expected), "'{message}' lacks '{expected}'");
    }

    #[test]
    fn the_example_manifest_is_valid() {
        toml::from_str::<Manifest>(MANIFEST)
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn a_misspelt_key_is_refused_by_name() {
        let error = toml::from_str::<ServeConfig>("[batching]\nmax_queue_delay = 5000\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `max_queue_delay`"), "{error}");
        let error = toml::from_str::<ServeConfig>("[limits]\nmax_pixel = 5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `max_pixel`"), "{error}");
        let variant_batching = with(
            "routing_weight = 1\n\n[[variants]]",
            "routing_weight = 1\nbatching = { max_batch_sise = 8 }\n\n[[variants]]",
        );
        assert_refused(&variant_batching, "unknown field `max_batch_sise`");
        assert_refused(
            &with("recipe = \"SGD\"", "recipie = \"SGD\""),
            "unknown field `recipie`",
        );
        assert_refused(
            &with("std = [0.25]", "std = [0.25]\nstdev = [0.25]"),
            "unknown field `stdev`",
        );
        let connections = toml::from_str::<ServeConfig>("[connections]\nmax_connection = 5\n");
        let error = connections.unwrap_err().to_string();
        assert!(error.contains("unknown field `max_connection`"), "{error}");
    }

    #[test]
    fn empty_labels_are_refused() {
        assert_refused(
            &with("labels = [\"a\", \"b\", \"c\"]", "labels = []"),
            "labels is empty",
        );
    }

    #[test]
    fn zero_and_huge_input_sizes_are_refused() {
        for (from, to, expected) in [
            (
                "height = 28",
                "height = 0",
                "input.height must be 1 to 4096 pixels, not 0",
            ),
            (
                "width = 28",
                "width = 0",
                "input.width must be 1 to 4096 pixels, not 0",
            ),
            (
                "width = 28",
                "width = 4097",
                "input.width must be 1 to 4096 pixels, not 4097",
            ),
            (
                "height = 28",
                "height = 1000000000",
                "input.height must be 1 to 4096",
            ),
        ] {
            assert_refused(&with(from, to), expected);
        }
        toml::from_str::<Manifest>(&with("width = 28", "width = 4096"))
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn non_finite_normalisation_is_refused() {
        for (from, to, expected) in [
            (
                "std = [0.25]",
                "std = [nan]",
                "input.std values must be positive",
            ),
            (
                "std = [0.25]",
                "std = [inf]",
                "input.std values must be positive",
            ),
            (
                "std = [0.25]",
                "std = [0.0]",
                "input.std values must be positive",
            ),
            (
                "mean = [0.5]",
                "mean = [nan]",
                "input.mean values must be finite",
            ),
            (
                "mean = [0.5]",
                "mean = [-inf]",
                "input.mean values must be finite",
            ),
        ] {
            assert_refused(&with(from, to), expected);
        }
    }

    #[test]
    fn empty_and_duplicate_variant_names_are_refused() {
        assert_refused(
            &with("name = \"octave\"", "name = \"\""),
            "variant 2 has an empty name",
        );
        assert_refused(
            &with("name = \"octave\"", "name = \"vanilla\""),
            "variant name 'vanilla' is used twice",
        );
    }

    #[test]
    fn alpha_outside_zero_to_one_is_refused() {
        for alpha in ["1.0", "1.5", "-0.25", "nan", "inf"] {
            assert_refused(
                &with("alpha = 0.5", &format!("alpha = {alpha}")),
                "variant 'octave': alpha must be in [0, 1)",
            );
        }
    }

    #[test]
    fn a_manifest_that_routes_nowhere_is_refused() {
        let text = MANIFEST.replace("routing_weight = 1", "routing_weight = 0");
        assert_refused(&text, "every variant has routing_weight 0");
        // One routed variant is enough; the others stay reachable by name.
        toml::from_str::<Manifest>(&MANIFEST.replacen(
            "routing_weight = 1",
            "routing_weight = 0",
            1,
        ))
        .unwrap()
        .validate()
        .unwrap();
    }
}
