//! One served variant: its model built from the manifest, warmed up, and running behind its own
//! batcher and worker thread. A variant lives as long as something holds it: when the registry
//! lets go of it and its last request is answered, its queue closes, its batcher and worker end
//! and its weights are freed.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::batcher::{dispatch_channel, spawn_batcher, BatchQueue};
use crate::config::{BatchingConfig, Manifest, VariantManifest};
use crate::metrics::VariantLabels;
use crate::model::weights::WeightSource;
use crate::model::{CostReport, Model, ModelConfig};
use crate::preprocess::InputSpec;
use crate::stats::LiveStats;
use crate::worker::{spawn_worker, BatchReport, CandleClassifier, WorkerHealth};

/// One loaded variant.
pub struct Variant {
    pub name: String,
    pub arch: String,
    pub alpha: f64,
    pub accuracy: Option<f64>,
    pub cost: CostReport,
    pub queue: BatchQueue,
    pub stats: Arc<LiveStats>,
    pub labels: VariantLabels,
    /// What the running model was built from: a reload keeps the variant when it is unchanged.
    pub build: BuildKey,
}

/// Everything a variant's running form depends on. Two equal keys build the same model, so a
/// reload keeps a variant whose key did not change and rebuilds one whose key did.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildKey {
    config: ModelConfig,
    input: InputSpec,
    batching: BatchingConfig,
    /// The weights file and its size and modification time (`None`: random weights).
    weights: Option<(PathBuf, u64, Option<SystemTime>)>,
}

impl BuildKey {
    /// The key of `vm` as `manifest` describes it now, the weights file looked at on disk.
    pub fn of(
        manifest: &Manifest,
        vm: &VariantManifest,
        batching: BatchingConfig,
    ) -> anyhow::Result<Self> {
        let weights = match weights_source(manifest, vm) {
            WeightSource::Random => None,
            WeightSource::File(path) => {
                let meta = std::fs::metadata(&path)
                    .with_context(|| format!("reading weights file {}", path.display()))?;
                Some((path, meta.len(), meta.modified().ok()))
            }
        };
        Ok(Self {
            config: manifest.model_config(vm),
            input: manifest.input.clone(),
            batching: vm.batching.unwrap_or(batching),
            weights,
        })
    }
}

fn weights_source(manifest: &Manifest, vm: &VariantManifest) -> WeightSource {
    if vm.weights.as_os_str() == "random" {
        WeightSource::Random
    } else {
        WeightSource::File(manifest.weights_path(vm))
    }
}

/// Builds a variant's model (analytic cost from the unfolded form), folds its BatchNorms and
/// runs one warm-up batch so the first request pays no start-up cost.
pub fn build_variant(
    manifest: &Manifest,
    vm: &VariantManifest,
    device: &Device,
) -> anyhow::Result<(Model, CostReport)> {
    let vb = weights_source(manifest, vm).var_builder(DType::F32, device)?;
    let model = Model::new(manifest.model_config(vm), vb)?;
    let input = &manifest.input;
    let cost = model.cost(input.height, input.width);
    let model = model.folded()?;
    let warmup = Tensor::zeros(
        (1, input.channels, input.height, input.width),
        DType::F32,
        device,
    )?;
    model.forward(&warmup)?;
    Ok((model, cost))
}

/// Builds `vm` of `manifest` and starts its batcher and worker (reporting to `health`, each
/// batch's costs to `board`). Must run inside a tokio runtime.
pub fn start_variant(
    manifest: &Manifest,
    vm: &VariantManifest,
    build: BuildKey,
    device: &Device,
    health: &WorkerHealth,
    board: &Arc<SavingsBoard>,
) -> anyhow::Result<Variant> {
    let (model, cost) = build_variant(manifest, vm, device)?;
    let input = &manifest.input;
    let stats = Arc::<LiveStats>::default();
    let labels = VariantLabels {
        model: manifest.name.clone(),
        variant: vm.name.clone(),
    };
    labels.register(cost.macs, cost.params);
    let (batch_tx, batch_rx) = dispatch_channel();
    let (queue, _) = spawn_batcher(&vm.name, build.batching, batch_tx);
    let observer = SavingsObserver {
        stats: stats.clone(),
        labels: labels.clone(),
        board: board.clone(),
    };
    spawn_worker(
        &format!("{}-{}", manifest.name, vm.name),
        CandleClassifier::new(
            model,
            device.clone(),
            (input.channels, input.height, input.width),
        ),
        batch_rx,
        move |report| observer.observe(report),
        health.clone(),
    )?;
    Ok(Variant {
        name: vm.name.clone(),
        arch: vm.arch.clone(),
        alpha: vm.alpha,
        accuracy: vm.test_accuracy,
        cost,
        queue,
        stats,
        labels,
        build,
    })
}

/// The variants of one model whose measured costs are compared, and which one is the baseline.
/// Shared by the model's workers and replaced as variants come and go.
#[derive(Default)]
pub struct SavingsBoard {
    members: RwLock<Members>,
}

#[derive(Default)]
struct Members {
    baseline: usize,
    variants: Vec<(Arc<LiveStats>, VariantLabels)>,
}

impl SavingsBoard {
    /// Makes `variants` the compared set, `baseline` the index of the baseline among them.
    pub fn set(&self, variants: &[Arc<Variant>], baseline: usize) {
        let variants = variants
            .iter()
            .map(|v| (v.stats.clone(), v.labels.clone()))
            .collect();
        *self.members.write().unwrap() = Members { baseline, variants };
        self.publish();
    }

    /// Sets every member's memory and latency savings gauges against the baseline's costs.
    fn publish(&self) {
        let members = self.members.read().unwrap();
        let Some((baseline, _)) = members.variants.get(members.baseline) else {
            return;
        };
        let base_costs = baseline.costs();
        for (stats, labels) in &members.variants {
            let (memory, latency) = stats.costs().savings_against(&base_costs);
            labels.savings(memory, latency);
        }
    }
}

/// Updates a variant's stats and metrics after each batch, and the savings of every variant of
/// the model against the baseline.
struct SavingsObserver {
    stats: Arc<LiveStats>,
    labels: VariantLabels,
    board: Arc<SavingsBoard>,
}

impl SavingsObserver {
    fn observe(&self, report: &BatchReport) {
        if !report.ok {
            return;
        }
        let seconds = report.compute_time.as_secs_f64();
        let per_image = report.peak_bytes as f64 / report.size as f64;
        self.stats
            .record_batch(report.size, seconds, report.peak_bytes);
        self.labels.batch(report.size, seconds, per_image);
        self.board.publish();
    }
}
