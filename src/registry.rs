//! The served models: each logical model's variants loaded, warmed up, and wired to their
//! batcher and worker thread.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::batcher::{dispatch_channel, spawn_batcher, BatchQueue};
use crate::config::{BatchingConfig, Manifest, ShadowConfig, VariantManifest};
use crate::error::ServeError;
use crate::metrics::VariantLabels;
use crate::model::weights::WeightSource;
use crate::model::{CostReport, Model};
use crate::preprocess::InputSpec;
use crate::router::Router;
use crate::stats::{savings, LiveStats};
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
}

/// The part of a model's set-up that can change while serving (SIGHUP reloads it).
#[derive(Clone, Debug)]
pub struct Routing {
    pub router: Router,
    pub shadow: Option<ShadowConfig>,
}

impl Routing {
    fn from_manifest(manifest: &Manifest) -> Self {
        let weights = manifest
            .variants
            .iter()
            .map(|v| (v.name.clone(), v.routing_weight));
        Self {
            router: Router::new(weights.collect()),
            shadow: manifest.shadow.clone(),
        }
    }
}

/// One logical model and its variants.
pub struct ServedModel {
    pub name: String,
    pub labels: Vec<String>,
    pub input: InputSpec,
    pub baseline: String,
    pub variants: Vec<Variant>,
    routing: RwLock<Routing>,
}

impl ServedModel {
    pub fn routing(&self) -> Routing {
        self.routing.read().unwrap().clone()
    }

    /// The named variant, or the router's pick for `routing_key` when `name` is empty.
    pub fn variant(&self, name: &str, routing_key: &str) -> Result<&Variant, ServeError> {
        if name.is_empty() {
            let routing = self.routing.read().unwrap();
            let picked = routing
                .router
                .pick(routing_key)
                .ok_or_else(|| ServeError::NoRoutableVariant(self.name.clone()))?;
            return self.find(picked);
        }
        self.find(name)
    }

    /// The variant that shadows `answering` for this request, if any.
    pub fn shadow_for(&self, answering: &Variant) -> Option<&Variant> {
        let routing = self.routing.read().unwrap();
        let shadow = routing.shadow.as_ref()?;
        if shadow.variant == answering.name || !crate::router::sample(shadow.fraction) {
            return None;
        }
        self.find(&shadow.variant).ok()
    }

    fn find(&self, name: &str) -> Result<&Variant, ServeError> {
        self.variants
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ServeError::UnknownVariant {
                model: self.name.clone(),
                variant: name.to_string(),
            })
    }

    pub fn baseline(&self) -> &Variant {
        self.variants
            .iter()
            .find(|v| v.name == self.baseline)
            .expect("the manifest's baseline is validated at load")
    }
}

/// Every served model by name.
#[derive(Default)]
pub struct Registry {
    models: BTreeMap<String, Arc<ServedModel>>,
}

impl Registry {
    pub fn model(&self, name: &str) -> Result<&Arc<ServedModel>, ServeError> {
        self.models
            .get(name)
            .ok_or_else(|| ServeError::UnknownModel {
                name: name.to_string(),
            })
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.models.values()
    }

    /// Applies the routing weights and shadow settings of re-read manifests to the models
    /// already served (variants, weights files and batching need a restart). Requests keep
    /// flowing: each sees the old or the new routing, never none.
    pub fn reload_routing(&self, manifests: &[Manifest]) -> Vec<String> {
        let mut reloaded = Vec::new();
        for manifest in manifests {
            let Some(model) = self.models.get(&manifest.name) else {
                tracing::warn!(model = %manifest.name, "not served; adding a model needs a restart");
                continue;
            };
            let same_variants = manifest.variants.len() == model.variants.len()
                && manifest
                    .variants
                    .iter()
                    .all(|v| model.find(&v.name).is_ok());
            if !same_variants {
                tracing::warn!(model = %manifest.name, "variants changed; that needs a restart");
                continue;
            }
            *model.routing.write().unwrap() = Routing::from_manifest(manifest);
            reloaded.push(manifest.name.clone());
        }
        reloaded
    }

    /// Loads every manifest's variants on `device`, warms each up, and starts its batcher and
    /// worker (reporting to `health`). Must run inside a tokio runtime.
    pub fn load(
        manifests: &[Manifest],
        batching: BatchingConfig,
        device: &Device,
        health: &WorkerHealth,
    ) -> anyhow::Result<Self> {
        let mut models = BTreeMap::new();
        for manifest in manifests {
            let batching = manifest.batching.unwrap_or(batching);
            let model = load_model(manifest, batching, device, health)
                .with_context(|| format!("loading model '{}'", manifest.name))?;
            models.insert(manifest.name.clone(), Arc::new(model));
        }
        Ok(Self { models })
    }
}

fn load_model(
    manifest: &Manifest,
    batching: BatchingConfig,
    device: &Device,
    health: &WorkerHealth,
) -> anyhow::Result<ServedModel> {
    let input = &manifest.input;
    let all_stats: Vec<Arc<LiveStats>> = manifest.variants.iter().map(|_| Arc::default()).collect();
    let all_labels: Vec<VariantLabels> = manifest
        .variants
        .iter()
        .map(|v| VariantLabels {
            model: manifest.name.clone(),
            variant: v.name.clone(),
        })
        .collect();
    let baseline_index = manifest
        .variants
        .iter()
        .position(|v| v.name == manifest.baseline)
        .expect("validated at load");
    let mut variants = Vec::new();
    let mut baseline_macs = 0;
    for (i, vm) in manifest.variants.iter().enumerate() {
        let (model, cost) = build_variant(manifest, vm, device)
            .with_context(|| format!("variant '{}'", vm.name))?;
        if i == baseline_index {
            baseline_macs = cost.macs;
        }
        let (batch_tx, batch_rx) = dispatch_channel();
        let (queue, _) = spawn_batcher(&vm.name, vm.batching.unwrap_or(batching), batch_tx);
        let shape = (input.channels, input.height, input.width);
        let observer = SavingsObserver {
            index: i,
            baseline: baseline_index,
            stats: all_stats.clone(),
            labels: all_labels.clone(),
        };
        spawn_worker(
            &format!("{}-{}", manifest.name, vm.name),
            CandleClassifier::new(model, device.clone(), shape),
            batch_rx,
            move |report| observer.observe(report),
            health.clone(),
        )?;
        variants.push((vm, cost, queue));
    }
    let variants = variants
        .into_iter()
        .enumerate()
        .map(|(i, (vm, cost, queue))| {
            let labels = all_labels[i].clone();
            labels.register(
                cost.macs,
                cost.params,
                savings(cost.macs as f64, baseline_macs as f64),
            );
            Variant {
                name: vm.name.clone(),
                arch: vm.arch.clone(),
                alpha: vm.alpha,
                accuracy: vm.test_accuracy,
                cost,
                queue,
                stats: all_stats[i].clone(),
                labels,
            }
        })
        .collect();
    Ok(ServedModel {
        name: manifest.name.clone(),
        labels: manifest.labels.clone(),
        input: input.clone(),
        baseline: manifest.baseline.clone(),
        variants,
        routing: RwLock::new(Routing::from_manifest(manifest)),
    })
}

/// Builds a variant's model (analytic cost from the unfolded form), folds its BatchNorms and
/// runs one warm-up batch so the first request pays no start-up cost.
pub fn build_variant(
    manifest: &Manifest,
    vm: &VariantManifest,
    device: &Device,
) -> anyhow::Result<(Model, CostReport)> {
    let source = if vm.weights.as_os_str() == "random" {
        WeightSource::Random
    } else {
        WeightSource::File(manifest.weights_path(vm))
    };
    let vb = source.var_builder(DType::F32, device)?;
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

/// Updates a variant's stats and metrics after each batch, and the savings of every variant of
/// the model against the baseline.
struct SavingsObserver {
    index: usize,
    baseline: usize,
    stats: Vec<Arc<LiveStats>>,
    labels: Vec<VariantLabels>,
}

impl SavingsObserver {
    fn observe(&self, report: &BatchReport) {
        if !report.ok {
            return;
        }
        let seconds = report.compute_time.as_secs_f64();
        let per_image = report.peak_bytes as f64 / report.size as f64;
        self.stats[self.index].record_batch(report.size, seconds, report.peak_bytes);
        self.labels[self.index].batch(report.size, seconds, per_image);
        let base_costs = self.stats[self.baseline].costs();
        for (stats, labels) in self.stats.iter().zip(&self.labels) {
            let (memory, latency) = stats.costs().savings_against(&base_costs);
            labels.savings(memory, latency);
        }
    }
}
