//! The `octserve` command line: one binary, one subcommand per job (docs/contract.md).

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "octserve",
    version,
    about = "Octave-Convolution ResNet inference service"
)]
struct Cli {
    /// Compute threads for the model (default: every core).
    #[arg(long, global = true, env = "OCTSERVE_THREADS")]
    threads: Option<usize>,
    /// Log as JSON lines instead of text (filter with RUST_LOG, default info).
    #[arg(long, global = true, env = "OCTSERVE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC service (Classifier, KServe v2, health, reflection) and the metrics endpoint.
    Serve(commands::serve::ServeArgs),
    /// Classify images with a running server.
    Classify(commands::classify::ClassifyArgs),
    /// A model's analytic cost: params, MACs, activation memory.
    Inspect(commands::inspect::InspectArgs),
    /// Offline forward-pass benchmark on this machine.
    Bench(commands::bench::BenchArgs),
    /// Accuracy of a shipped model variant on the Fashion-MNIST test set.
    Eval(commands::eval::EvalArgs),
    /// Closed-loop gRPC load generator.
    Loadgen(commands::loadgen::LoadgenArgs),
    /// Live side-by-side A/B summary of a model's variants.
    Ab(commands::ab::AbArgs),
}

fn main() -> anyhow::Result<()> {
    ignore_hangups_until_handled();
    octserve::alloc::keep_freed_memory();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        // candle and gemm size their thread pools from this variable on first use.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    init_logging(cli.log_json);
    match &cli.command {
        Command::Serve(args) => commands::serve::run(args),
        Command::Classify(args) => commands::classify::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Loadgen(args) => commands::loadgen::run(args),
        Command::Ab(args) => commands::ab::run(args),
    }
}

/// SIGHUP's default action ends the process. `serve` reloads on it once its models are loaded,
/// and a hangup sent before then (or to another command) must not kill it: ignored from the
/// first instruction, until the server installs its own handler.
fn ignore_hangups_until_handled() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets the disposition of one signal, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// Logs go to stderr so `--json` output on stdout stays clean.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
