//! The served models, changed live: each model is an immutable generation (its variants and
//! routing), swapped whole when a manifest is (re)loaded or a model unloaded.
//!
//! A request takes the current generation of its model and keeps it until answered, so a change
//! never fails a request in flight: new variants are built and warmed up before the swap and
//! only then routed to; a variant left out of the new generation takes no new requests, answers
//! the ones it accepted and is freed when the last of them is done.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use candle_core::Device;

use crate::config::{BatchingConfig, ConfigError, Manifest, ShadowConfig};
use crate::error::ServeError;
use crate::preprocess::InputSpec;
use crate::repository::{ModelControl, Repository};
use crate::router::Router;
use crate::stats::savings;
use crate::variant::{start_variant, BuildKey, SavingsBoard, Variant};
use crate::worker::WorkerHealth;

/// How requests are spread over a model's variants.
#[derive(Clone, Debug, PartialEq)]
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

/// One generation of a logical model: its variants and how requests are routed to them.
pub struct ServedModel {
    pub name: String,
    pub labels: Vec<String>,
    pub input: InputSpec,
    pub baseline: String,
    pub variants: Vec<Arc<Variant>>,
    pub routing: Routing,
    /// The manifest it was loaded from.
    pub source: PathBuf,
    savings: Arc<SavingsBoard>,
}

impl ServedModel {
    /// The named variant, or the router's pick for `routing_key` when `name` is empty.
    pub fn variant(&self, name: &str, routing_key: &str) -> Result<&Variant, ServeError> {
        if name.is_empty() {
            let picked = self
                .routing
                .router
                .pick(routing_key)
                .ok_or_else(|| ServeError::NoRoutableVariant(self.name.clone()))?;
            return self.find(picked);
        }
        self.find(name)
    }

    /// The variant that shadows `answering` for this request, if any.
    pub fn shadow_for(&self, answering: &Variant) -> Option<&Variant> {
        let shadow = self.routing.shadow.as_ref()?;
        if shadow.variant == answering.name || !crate::router::sample(shadow.fraction) {
            return None;
        }
        self.find(&shadow.variant).ok()
    }

    fn find(&self, name: &str) -> Result<&Variant, ServeError> {
        self.find_arc(name)
            .map(|v| &**v)
            .ok_or_else(|| ServeError::UnknownVariant {
                model: self.name.clone(),
                variant: name.to_string(),
            })
    }

    fn find_arc(&self, name: &str) -> Option<&Arc<Variant>> {
        self.variants.iter().find(|v| v.name == name)
    }

    pub fn baseline(&self) -> &Variant {
        self.find(&self.baseline)
            .expect("the manifest's baseline is validated at load")
    }
}

/// What a (re)load changed in a model.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    /// Variants whose model was rebuilt (new weights file, architecture or batching).
    pub rebuilt: Vec<String>,
    pub removed: Vec<String>,
    /// Anything else: routing weights, shadow, labels, normalisation, baseline.
    pub settings: bool,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One entry of the repository index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// The variant (empty for a model not served).
    pub version: String,
    pub state: ModelState,
    pub reason: String,
}

/// A repository model's state, as Triton names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelState {
    Ready,
    Unavailable,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "READY",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

/// Every served model by name, and what it takes to build more.
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ServedModel>>>,
    pub repository: Repository,
    pub control: ModelControl,
    batching: BatchingConfig,
    device: Device,
    health: WorkerHealth,
    /// One change at a time: two loads of one model must not build it twice.
    changing: Mutex<()>,
}

impl Registry {
    pub fn new(
        repository: Repository,
        control: ModelControl,
        batching: BatchingConfig,
        device: Device,
        health: WorkerHealth,
    ) -> Self {
        Self {
            models: RwLock::default(),
            repository,
            control,
            batching,
            device,
            health,
            changing: Mutex::new(()),
        }
    }

    /// The current generation of the model called `name`.
    pub fn model(&self, name: &str) -> Result<Arc<ServedModel>, ServeError> {
        self.models
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| ServeError::UnknownModel {
                name: name.to_string(),
            })
    }

    /// Every served model's current generation, by name.
    pub fn models(&self) -> Vec<Arc<ServedModel>> {
        self.models.read().unwrap().values().cloned().collect()
    }

    /// Serves `manifest`: builds and warms up its new and changed variants, then swaps the model
    /// to the new generation. On any error the model stays as it was. Blocks while building:
    /// call it from a blocking thread inside the tokio runtime.
    pub fn apply(&self, manifest: &Manifest, source: PathBuf) -> anyhow::Result<Change> {
        let _one_change = self.changing.lock().unwrap();
        let current = self.model(&manifest.name).ok();
        let savings = current
            .as_ref()
            .map(|m| m.savings.clone())
            .unwrap_or_default();
        let batching = manifest.batching.unwrap_or(self.batching);
        let mut change = Change::default();
        let mut variants = Vec::new();
        for vm in &manifest.variants {
            let build = BuildKey::of(manifest, vm, batching)
                .with_context(|| format!("variant '{}'", vm.name))?;
            let running = current.as_ref().and_then(|m| m.find_arc(&vm.name));
            match running {
                Some(v) if v.build == build => variants.push(v.clone()),
                _ => {
                    let started = std::time::Instant::now();
                    let variant =
                        start_variant(manifest, vm, build, &self.device, &self.health, &savings)
                            .with_context(|| format!("variant '{}'", vm.name))?;
                    tracing::info!(
                        model = %manifest.name,
                        variant = %vm.name,
                        seconds = started.elapsed().as_secs_f64(),
                        "variant built and warmed up"
                    );
                    let list = if running.is_some() {
                        &mut change.rebuilt
                    } else {
                        &mut change.added
                    };
                    list.push(vm.name.clone());
                    variants.push(Arc::new(variant));
                }
            }
        }
        let routing = Routing::from_manifest(manifest);
        if let Some(current) = &current {
            change.removed = current
                .variants
                .iter()
                .filter(|v| manifest.variants.iter().all(|vm| vm.name != v.name))
                .map(|v| v.name.clone())
                .collect();
            change.settings = current.routing != routing
                || current.labels != manifest.labels
                || current.input != manifest.input
                || current.baseline != manifest.baseline;
        }
        if current.is_some() && change.is_empty() {
            return Ok(change);
        }
        let model = ServedModel {
            name: manifest.name.clone(),
            labels: manifest.labels.clone(),
            input: manifest.input.clone(),
            baseline: manifest.baseline.clone(),
            variants,
            routing,
            source,
            savings,
        };
        self.publish(&model, &change);
        self.models
            .write()
            .unwrap()
            .insert(model.name.clone(), Arc::new(model));
        Ok(change)
    }

    /// `RepositoryModelLoad`: reads the manifest of the model called `name` from the repository
    /// now and serves it (see [`Self::apply`]). Blocks while building.
    pub fn load(&self, name: &str) -> Result<Change, ServeError> {
        self.allow_client_changes()?;
        let failed = |e: &dyn std::fmt::Display| ServeError::ModelLoad {
            model: name.to_string(),
            reason: e.to_string(),
        };
        let mut entries = self.repository.scan().map_err(|e| failed(&e))?;
        let Some(at) = entries.iter().position(|e| e.name == name) else {
            return Err(ServeError::UnknownModel {
                name: name.to_string(),
            });
        };
        let entry = entries.swap_remove(at);
        let manifest = entry.manifest.map_err(|e| failed(&e))?;
        self.apply(&manifest, entry.path)
            .map_err(|e| failed(&format_args!("{e:#}")))
    }

    /// `RepositoryModelUnload`: [`Self::unload`], when clients may change the served models.
    pub fn unload_by_client(&self, name: &str) -> Result<(), ServeError> {
        self.allow_client_changes()?;
        self.unload(name)
    }

    fn allow_client_changes(&self) -> Result<(), ServeError> {
        match self.control {
            ModelControl::Explicit => Ok(()),
            mode => Err(ServeError::ModelControl(mode)),
        }
    }

    /// `RepositoryIndex`: every served variant (READY), then every model of the repository
    /// that is not served (UNAVAILABLE, with the reason).
    pub fn index(&self) -> Result<Vec<IndexEntry>, ConfigError> {
        let entries = self.repository.scan()?;
        let served = self.models();
        let mut index = Vec::new();
        for model in &served {
            let failing = entries
                .iter()
                .find(|e| e.path == model.source)
                .and_then(|e| e.manifest.as_ref().err());
            let reason = failing.map_or_else(String::new, |e| {
                format!("serving the last manifest that loaded; the current one does not: {e}")
            });
            index.extend(model.variants.iter().map(|v| IndexEntry {
                name: model.name.clone(),
                version: v.name.clone(),
                state: ModelState::Ready,
                reason: reason.clone(),
            }));
        }
        for entry in entries {
            if served.iter().any(|m| m.name == entry.name) {
                continue;
            }
            let reason = match entry.manifest {
                Ok(_) => "not loaded".to_string(),
                Err(e) => e.to_string(),
            };
            index.push(IndexEntry {
                name: entry.name,
                version: String::new(),
                state: ModelState::Unavailable,
                reason,
            });
        }
        Ok(index)
    }

    /// Stops serving the model called `name`: requests in flight are answered, new ones get
    /// NOT_FOUND, and its variants are freed once idle.
    pub fn unload(&self, name: &str) -> Result<(), ServeError> {
        let _one_change = self.changing.lock().unwrap();
        let model =
            self.models
                .write()
                .unwrap()
                .remove(name)
                .ok_or_else(|| ServeError::UnknownModel {
                    name: name.to_string(),
                })?;
        for variant in &model.variants {
            crate::metrics::retire(&variant.labels);
        }
        Ok(())
    }

    /// Sets what the metrics show of `model`'s new generation: the compared set and the compute
    /// savings against its baseline, and no series for the variants it no longer has.
    fn publish(&self, model: &ServedModel, change: &Change) {
        let baseline = model
            .variants
            .iter()
            .position(|v| v.name == model.baseline)
            .expect("the manifest's baseline is validated at load");
        let baseline_macs = model.variants[baseline].cost.macs as f64;
        for variant in &model.variants {
            crate::metrics::unretire(&variant.labels);
            variant
                .labels
                .compute_savings(savings(variant.cost.macs as f64, baseline_macs));
        }
        for name in &change.removed {
            crate::metrics::retire(&crate::metrics::VariantLabels {
                model: model.name.clone(),
                variant: name.clone(),
            });
        }
        model.savings.set(&model.variants, baseline);
    }

    /// Loads every manifest of the repository; fails on the first that does not load.
    pub fn load_all(&self) -> anyhow::Result<()> {
        let entries = self.repository.scan()?;
        anyhow::ensure!(
            !entries.is_empty(),
            "no models to serve: no manifest in the config and none in the models directory"
        );
        for entry in entries {
            let manifest = entry.manifest?;
            self.apply(&manifest, entry.path)
                .with_context(|| format!("loading model '{}'", manifest.name))?;
        }
        Ok(())
    }

    /// Makes the served models match the repository: new manifests loaded, changed ones
    /// reloaded, models whose manifest is gone unloaded. A manifest that fails leaves its model
    /// as it was, and is logged.
    pub fn sync(&self) -> Result<Vec<(String, Change)>, ConfigError> {
        let entries = self.repository.scan()?;
        let mut changes = Vec::new();
        for entry in &entries {
            let result = match &entry.manifest {
                Ok(manifest) => self.apply(manifest, entry.path.clone()),
                Err(e) => Err(anyhow::anyhow!("{e}")),
            };
            match result {
                Ok(change) if change.is_empty() => {}
                Ok(change) => changes.push((entry.name.clone(), change)),
                Err(e) => {
                    tracing::error!(model = %entry.name, error = format!("{e:#}"), "not reloaded; serving it as it was")
                }
            }
        }
        for model in self.models() {
            if entries.iter().all(|e| e.path != model.source) && self.unload(&model.name).is_ok() {
                let removed = model.variants.iter().map(|v| v.name.clone()).collect();
                changes.push((
                    model.name.clone(),
                    Change {
                        removed,
                        ..Change::default()
                    },
                ));
            }
        }
        Ok(changes)
    }
}
