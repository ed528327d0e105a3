//! One module per `octserve` subcommand.

pub mod ab;
pub mod bench;
pub mod classify;
pub mod eval;
pub mod inspect;
pub mod loadgen;
pub mod serve;

use clap::Args;

use octserve::model::{Arch, ModelConfig};

/// Flags that pick an architecture and the sizes it is built for.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture (resnet18..152, resnet26, oct-resnet26..152, resnet20/32/56, oct-resnet20/32/56).
    #[arg(long, env = "OCTSERVE_ARCH")]
    pub arch: Arch,
    /// Low-frequency channel fraction of octave nets, in [0, 1).
    #[arg(long, env = "OCTSERVE_ALPHA", default_value_t = 0.5)]
    pub alpha: f64,
    /// Square input size in pixels.
    #[arg(long, env = "OCTSERVE_INPUT_SIZE", default_value_t = 224)]
    pub input_size: usize,
    #[arg(long, env = "OCTSERVE_IN_CHANNELS", default_value_t = 3)]
    pub in_channels: usize,
    #[arg(long, env = "OCTSERVE_NUM_CLASSES", default_value_t = 1000)]
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

/// Which server, model and variant a client command talks to.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    #[arg(long, env = "OCTSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    #[arg(long, env = "OCTSERVE_MODEL")]
    pub model: String,
    /// Empty: the server's A/B router picks.
    #[arg(long, env = "OCTSERVE_VARIANT", default_value = "")]
    pub variant: String,
}

/// Prints `value` as one JSON object on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
