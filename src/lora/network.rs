//! The LoRA networks of a run: one [`LoraNetwork`] per model (UNet, text encoder), each the
//! [`AdapterProvider`] its model is built with, holding the adapters it created.
//!
//! ```text
//! let networks = LoraNetworks::new(&plan.lora, LoraBase::sd(ModelFamily::Sd1), NetworkOptions::new(seed, &device))?;
//! let unet = UNet2DConditionModel::new(Scope::root(&unet_store).with_adapters(&networks.unet), &unet_config)?;
//! if let Some(te) = &networks.text_encoder {
//!     text_encoder = ClipTextModel::new(Scope::root(&te_store).with_adapters(te), &te_config)?;
//! }
//! networks.check_built()?;          // list entries that matched nothing, file keys left over
//! let groups = networks.param_groups(); // UNet vars, text-encoder vars: separate learning rates
//! networks.set_training(true);
//! networks.set_step(step, micro_batch); // before each forward pass: selects the dropout masks
//! networks.save(&path, plan.lora.save_format, plan.lora.save_precision, &metadata.to_header())?;
//! ```
//!
//! With `network_weights`, the file decides which layers get adapters and their ranks and alphas
//! (the config's targets, ranks and alphas are not used); dropout settings still apply.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Var};

use super::adapter::{Dropout, LoraAdapter, TrainingState};
use super::export::{save_lora, SavedLora};
use super::file::LoraFile;
use super::import::FileTargets;
use super::names::{LoraBase, LoraModel};
use super::report::LoraReport;
use super::targets::{ModuleSpec, TargetSelector};
use crate::config::{LoraSettings, SaveFormat, SavePrecision};
use crate::models::clip_text::ClipTextModel;
use crate::models::clip_text_config::ClipTextConfig;
use crate::models::clip_text_projection::ClipTextModelWithProjection;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::nn::{Adapter, AdapterProvider, LayerKind, Scope, WeightStore};
use crate::Result;

/// Where the adapters' randomness and tensors come from.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// The run's seed: initial weights and dropout masks derive from it.
    pub seed: u64,
    /// The dtype of the adapter weights (the master weights): f32 for training; f64 for
    /// gradient checks.
    pub dtype: DType,
    pub device: Device,
}

impl NetworkOptions {
    /// f32 master weights on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        NetworkOptions {
            seed,
            dtype: DType::F32,
            device: device.clone(),
        }
    }
}

/// What decides which layers get adapters: the config's targets, or a file's modules.
#[derive(Debug)]
enum Targets {
    Config(TargetSelector),
    File(Box<FileTargets>),
}

/// A layer that gets an adapter, and its starting weights when they come from a file.
type Selection = (
    ModuleSpec,
    Option<(candle_core::Tensor, candle_core::Tensor)>,
);

impl Targets {
    fn select(&self, model: LoraModel, path: &str, layer: LayerKind) -> Result<Option<Selection>> {
        match self {
            Targets::Config(selector) => Ok(selector
                .select(model, path, layer)?
                .map(|spec| (spec, None))),
            Targets::File(file) => Ok(file
                .select(model, path, layer)?
                .map(|(spec, down, up)| (spec, Some((down, up))))),
        }
    }

    fn check(&self, text_encoder_built: bool) -> Result<()> {
        match self {
            Targets::Config(selector) => selector.check_all_matched(text_encoder_built),
            Targets::File(file) => file.check_all_used(text_encoder_built),
        }
    }
}

/// The adapters of one model; pass it to the model's builder as its adapter provider.
#[derive(Debug)]
pub struct LoraNetwork {
    model: LoraModel,
    targets: Arc<Targets>,
    options: NetworkOptions,
    dropout: Dropout,
    state: Arc<TrainingState>,
    /// Record the selected layers without creating adapters (for reports built from configs).
    plan_only: bool,
    adapters: Mutex<Vec<Arc<LoraAdapter>>>,
    planned: Mutex<Vec<ModuleSpec>>,
}

impl LoraNetwork {
    /// Which model this network adapts.
    pub fn model(&self) -> LoraModel {
        self.model
    }

    /// The adapters created so far, in the order the model's layers were built.
    pub fn adapters(&self) -> Vec<Arc<LoraAdapter>> {
        match self.adapters.lock() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The adapted layers: rank, alpha and shape of each (also for a plan-only network).
    pub fn modules(&self) -> Vec<ModuleSpec> {
        if self.plan_only {
            match self.planned.lock() {
                Ok(p) => p.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            }
        } else {
            self.adapters().iter().map(|a| a.spec().clone()).collect()
        }
    }

    /// The trainable tensors: `lora_down` and `lora_up` of every adapter.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.adapters()
            .iter()
            .flat_map(|a| [a.down().clone(), a.up().clone()])
            .collect()
    }

    /// The trainable tensors by kohya key (`lora_unet_….lora_down.weight`), for optimizer state
    /// files and checks.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.adapters()
            .iter()
            .flat_map(|a| {
                let name = a.spec().kohya_name();
                [
                    (format!("{name}.lora_down.weight"), a.down().clone()),
                    (format!("{name}.lora_up.weight"), a.up().clone()),
                ]
            })
            .collect()
    }
}

impl AdapterProvider for LoraNetwork {
    fn adapter_for(&self, module_path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>> {
        let Some((spec, start)) = self.targets.select(self.model, module_path, kind)? else {
            return Ok(None);
        };
        if self.plan_only {
            if let Ok(mut planned) = self.planned.lock() {
                planned.push(spec);
            }
            return Ok(None);
        }
        let o = &self.options;
        let adapter = LoraAdapter::new(
            spec,
            o.seed,
            self.dropout,
            self.state.clone(),
            o.dtype,
            &o.device,
        )?;
        if let Some((down, up)) = start {
            adapter.set_weights(&down, &up)?;
        }
        let adapter = Arc::new(adapter);
        if let Ok(mut adapters) = self.adapters.lock() {
            adapters.push(adapter.clone());
        }
        Ok(Some(adapter))
    }
}

/// The trainable variables of one model, for an optimizer parameter group.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub model: LoraModel,
    pub vars: Vec<Var>,
}

/// [`LoraNetworks::inference`]'s guard: restores training mode when dropped.
#[must_use = "inference mode ends when the guard is dropped"]
pub struct InferenceMode<'a> {
    state: &'a TrainingState,
    was_training: bool,
}

impl<'a> InferenceMode<'a> {
    /// Inference mode for the adapters sharing `state`, until the guard is dropped.
    pub fn begin(state: &'a TrainingState) -> Self {
        let was_training = state.is_training();
        state.set_training(false);
        state.set_inference(true);
        InferenceMode {
            state,
            was_training,
        }
    }
}

impl Drop for InferenceMode<'_> {
    fn drop(&mut self) {
        self.state.set_inference(false);
        self.state.set_training(self.was_training);
    }
}

/// The networks of a run: the UNet's, and the text encoder's when it is trained.
#[derive(Debug)]
pub struct LoraNetworks {
    pub unet: LoraNetwork,
    /// `None` when `train_text_encoder` is false.
    pub text_encoder: Option<LoraNetwork>,
    /// SDXL's second text encoder's, likewise (`None` for a base with one text encoder).
    pub text_encoder_2: Option<LoraNetwork>,
    targets: Arc<Targets>,
    state: Arc<TrainingState>,
    /// The base model, when known: the family files must fit and the names they are saved with.
    base: Option<LoraBase>,
}

impl LoraNetworks {
    /// The networks `settings` describe. With `network_weights`, the file is read now and
    /// decides the adapted layers, ranks, alphas and starting weights; it must have been made
    /// for `base` (the base model, when known), whose kohya names the networks are saved with.
    pub fn new(
        settings: &LoraSettings,
        base: Option<LoraBase>,
        options: NetworkOptions,
    ) -> Result<Self> {
        LoraNetworks::build(settings, base, options, false)
    }

    /// Networks that record which layers they would adapt without creating any adapter: build
    /// the models on [`crate::nn::WeightStore::shape_only`] stores with them to plan a run.
    pub fn plan_only(settings: &LoraSettings, base: Option<LoraBase>) -> Result<Self> {
        LoraNetworks::build(settings, base, NetworkOptions::new(0, &Device::Cpu), true)
    }

    fn build(
        settings: &LoraSettings,
        base: Option<LoraBase>,
        options: NetworkOptions,
        plan_only: bool,
    ) -> Result<Self> {
        let targets = Arc::new(match &settings.network_weights {
            Some(path) => Targets::File(Box::new(FileTargets::new(
                LoraFile::read(path)?,
                base.as_ref(),
            )?)),
            None => Targets::Config(TargetSelector::new(settings)),
        });
        let state = Arc::new(TrainingState::default());
        let dropout = Dropout {
            input: settings.dropout,
            rank: settings.rank_dropout,
            module: settings.module_dropout,
        };
        let network = |model| LoraNetwork {
            model,
            targets: targets.clone(),
            options: options.clone(),
            dropout,
            state: state.clone(),
            plan_only,
            adapters: Mutex::new(Vec::new()),
            planned: Mutex::new(Vec::new()),
        };
        let two_encoders = base
            .as_ref()
            .is_some_and(|b| b.family.text_encoder_count() > 1);
        Ok(LoraNetworks {
            unet: network(LoraModel::Unet),
            text_encoder: settings
                .train_text_encoder
                .then(|| network(LoraModel::TextEncoder)),
            text_encoder_2: (settings.train_text_encoder && two_encoders)
                .then(|| network(LoraModel::TextEncoder2)),
            targets,
            state,
            base,
        })
    }

    /// After the models are built: fails if a `target_modules` list entry matched no layer, or
    /// a module of the `network_weights` file found none (each error names the entry or key).
    pub fn check_built(&self) -> Result<()> {
        self.targets.check(self.text_encoder.is_some())
    }

    /// The networks, UNet first.
    pub fn networks(&self) -> impl Iterator<Item = &LoraNetwork> {
        std::iter::once(&self.unet)
            .chain(self.text_encoder.as_ref())
            .chain(self.text_encoder_2.as_ref())
    }

    /// The text encoders' adapter providers, in the base model's order (`None`: not trained),
    /// for [`crate::models::load::BaseModel::text_encoders`].
    pub fn text_encoder_providers(&self) -> Vec<Option<&dyn AdapterProvider>> {
        [&self.text_encoder, &self.text_encoder_2]
            .into_iter()
            .map(|n| n.as_ref().map(|n| n as &dyn AdapterProvider))
            .collect()
    }

    /// Training mode turns dropout on; evaluation mode (the default) off.
    pub fn set_training(&self, training: bool) {
        self.state.set_training(training);
    }

    /// Inference outside the loss (preview pictures) until the guard is dropped: dropout off and
    /// the adapters' weights detached, so that no forward pass builds a graph. A sampling loop
    /// run on trainable adapters otherwise keeps every earlier step's activations (DESIGN.md §7).
    pub fn inference(&self) -> InferenceMode<'_> {
        InferenceMode::begin(&self.state)
    }

    /// Call before each forward pass: the dropout masks are a function of the seed, the module
    /// and this (optimizer step, micro-batch) — a resumed run draws the same masks.
    pub fn set_step(&self, step: u64, micro_batch: u64) {
        self.state.set_step(step, micro_batch);
    }

    /// Every adapter, UNet first.
    pub fn adapters(&self) -> Vec<Arc<LoraAdapter>> {
        self.networks().flat_map(LoraNetwork::adapters).collect()
    }

    /// All trainable tensors.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.networks()
            .flat_map(LoraNetwork::trainable_vars)
            .collect()
    }

    /// The trainable tensors per model (`unet_lr` / `text_encoder_lr`), empty groups left out.
    pub fn param_groups(&self) -> Vec<ParamGroup> {
        self.networks()
            .map(|n| ParamGroup {
                model: n.model(),
                vars: n.trainable_vars(),
            })
            .filter(|g| !g.vars.is_empty())
            .collect()
    }

    /// The report from the model configs alone: the models are built on shape-only stores
    /// (no weight is read or allocated) with plan-only networks. Fails like training would on
    /// targets that match nothing or a `network_weights` file that does not fit.
    /// `text_configs`: the base model's text encoders in order (SDXL's second is built with its
    /// projection, as it is trained).
    pub fn report_from_configs(
        settings: &LoraSettings,
        base: Option<LoraBase>,
        unet_config: &UNetConfig,
        text_configs: &[&ClipTextConfig],
    ) -> Result<LoraReport> {
        let networks = Self::plan_only(settings, base)?;
        let store = WeightStore::shape_only(DType::F32, Device::Cpu);
        UNet2DConditionModel::new(
            Scope::root(&store).with_adapters(&networks.unet),
            unet_config,
        )?;
        if let (Some(te), Some(config)) = (&networks.text_encoder, text_configs.first()) {
            ClipTextModel::new(Scope::root(&store).with_adapters(te), config)?;
        }
        if let (Some(te), Some(config)) = (&networks.text_encoder_2, text_configs.get(1)) {
            ClipTextModelWithProjection::new(Scope::root(&store).with_adapters(te), config)?;
        }
        networks.check_built()?;
        Ok(networks.report())
    }

    /// Adapted modules and trainable parameters per model.
    pub fn report(&self) -> LoraReport {
        LoraReport::from_modules(
            self.text_encoder.is_some(),
            self.networks().flat_map(LoraNetwork::modules),
        )
    }

    /// Saves every adapter to `path` (kohya or diffusers keys, in `precision`) with `metadata`
    /// (from [`super::metadata::TrainingMetadata::to_header`]), atomically.
    pub fn save(
        &self,
        path: &std::path::Path,
        format: SaveFormat,
        precision: SavePrecision,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SavedLora> {
        save_lora(
            &self.adapters(),
            self.base.as_ref(),
            path,
            format,
            precision,
            metadata,
        )
    }

    /// The `network_weights` file the networks started from, if any.
    pub fn start_file(&self) -> Option<&LoraFile> {
        match self.targets.as_ref() {
            Targets::File(f) => Some(f.file()),
            Targets::Config(_) => None,
        }
    }
}
