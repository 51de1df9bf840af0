//! The LoRA adapters of a language model: the [`AdapterProvider`] a [`CausalLm`] is built with.
//! It picks the layers from `target_modules` (peft's rules: a name matches a module path ending
//! in it, `all-linear` every projection but `lm_head`) or from a PEFT adapter to continue
//! (`network_weights`), creates the same [`LoraAdapter`]s the image task trains, and turns them
//! back into a [`PeftAdapter`] to save.
//!
//! [`CausalLm`]: crate::models::causal_lm::CausalLm

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Var};

use super::peft::{PeftAdapter, PeftConfig, PeftModule};
use crate::config::LoraSettings;
use crate::error::ModelError;
use crate::lora::{
    Dropout, InferenceMode, LoraAdapter, LoraError, LoraModel, LoraProblem, ModuleSpec,
    TargetSelector, TrainingState,
};
use crate::nn::{Adapter, AdapterProvider, LayerKind};
use crate::Result;

/// The PEFT key prefix of a causal LM's modules.
const PREFIX: &str = "base_model.model.";

/// Which layers get adapters.
#[derive(Debug)]
enum Targets {
    /// `target_modules`, `lora_rank`, `lora_alpha`.
    Config(TargetSelector),
    /// A PEFT adapter's modules, rank and alpha; the names it has been asked for.
    File {
        adapter: Box<PeftAdapter>,
        origin: String,
        used: Mutex<BTreeSet<String>>,
    },
}

/// The adapters of one language model.
#[derive(Debug)]
pub struct LmNetwork {
    targets: Targets,
    dropout: Dropout,
    state: Arc<TrainingState>,
    seed: u64,
    dtype: DType,
    device: Device,
    adapters: Mutex<Vec<Arc<LoraAdapter>>>,
    /// Every linear layer the model offered, adapted or not (to say `target_modules` exactly).
    offered: Mutex<Vec<String>>,
}

impl LmNetwork {
    /// Adapters as `settings` say (rank, alpha, targets, `lora_dropout`), or as `start` says
    /// when continuing a PEFT adapter (`origin` names it in messages); f32 master weights on
    /// `device`, initialised from `seed`.
    pub fn new(
        settings: &LoraSettings,
        start: Option<(PeftAdapter, String)>,
        seed: u64,
        device: &Device,
    ) -> Self {
        let targets = match start {
            Some((adapter, origin)) => Targets::File {
                adapter: Box::new(adapter),
                origin,
                used: Mutex::new(BTreeSet::new()),
            },
            None => Targets::Config(TargetSelector::new(settings)),
        };
        LmNetwork::build(targets, settings.dropout, seed, device)
    }

    /// The adapters of a PEFT adapter (`origin` names it in messages), for using it (no
    /// dropout).
    pub fn from_adapter(adapter: PeftAdapter, origin: String, device: &Device) -> Self {
        let targets = Targets::File {
            adapter: Box::new(adapter),
            origin,
            used: Mutex::new(BTreeSet::new()),
        };
        LmNetwork::build(targets, 0.0, 0, device)
    }

    fn build(targets: Targets, dropout: f64, seed: u64, device: &Device) -> Self {
        LmNetwork {
            targets,
            dropout: Dropout {
                input: dropout,
                ..Dropout::default()
            },
            state: Arc::new(TrainingState::default()),
            seed,
            dtype: DType::F32,
            device: device.clone(),
            adapters: Mutex::new(Vec::new()),
            offered: Mutex::new(Vec::new()),
        }
    }

    /// The adapters, in the order the model's layers were built.
    pub fn adapters(&self) -> Vec<Arc<LoraAdapter>> {
        lock(&self.adapters).clone()
    }

    /// Fails when a `target_modules` entry selected no layer, or when a module of the adapter
    /// being continued is not a linear layer of this model. Call once the model is built.
    pub fn check_built(&self) -> Result<()> {
        match &self.targets {
            Targets::Config(selector) => {
                let entries = selector.unmatched_entries();
                if entries.is_empty() {
                    return Ok(());
                }
                Err(LoraError::targets(LoraProblem::UnmatchedTarget {
                    entries,
                    models: LoraModel::LanguageModel.to_string(),
                    hint: "; list module names such as `q_proj`, `o_proj`, `mlp.down_proj`, or \
                           a glob such as `model.layers.0.*`"
                        .to_string(),
                })
                .into())
            }
            Targets::File {
                adapter,
                origin,
                used,
            } => {
                let used = lock(used);
                let left: Vec<&String> = adapter
                    .modules
                    .keys()
                    .filter(|k| !used.contains(*k))
                    .collect();
                match left.first() {
                    None => Ok(()),
                    Some(first) => Err(ModelError::InvalidConfig {
                        origin: origin.clone(),
                        message: format!(
                            "{} of its modules are not linear layers of this model (the first: \
                             `{first}`); was it trained on another base model?",
                            left.len()
                        ),
                    }
                    .into()),
                }
            }
        }
    }

    /// The trainable tensors by PEFT key (`base_model.model.….lora_A.weight`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.adapters()
            .iter()
            .flat_map(|a| {
                let path = &a.spec().path;
                [
                    (format!("{PREFIX}{path}.lora_A.weight"), a.down().clone()),
                    (format!("{PREFIX}{path}.lora_B.weight"), a.up().clone()),
                ]
            })
            .collect()
    }

    pub fn trainable_vars(&self) -> Vec<Var> {
        self.adapters()
            .iter()
            .flat_map(|a| [a.down().clone(), a.up().clone()])
            .collect()
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> usize {
        self.adapters().iter().map(|a| a.spec().parameters()).sum()
    }

    /// Dropout on (training) or off.
    pub fn set_training(&self, training: bool) {
        self.state.set_training(training);
    }

    /// Selects the dropout masks of (optimizer step, micro-batch).
    pub fn set_step(&self, step: u64, micro_batch: u64) {
        self.state.set_step(step, micro_batch);
    }

    /// No dropout and no graph until the guard is dropped (generation).
    pub fn inference(&self) -> InferenceMode<'_> {
        InferenceMode::begin(&self.state)
    }

    /// The adapters as a PEFT adapter: one rank and alpha, [`LmNetwork::target_modules`].
    pub fn to_peft(&self, base_model_name_or_path: Option<String>) -> Result<PeftAdapter> {
        let adapters = self.adapters();
        let (r, lora_alpha) = adapters
            .first()
            .map(|a| (a.spec().rank, a.spec().alpha))
            .unwrap_or((1, 1.0));
        let target_modules = self.target_modules();
        let mut modules = std::collections::BTreeMap::new();
        for a in &adapters {
            modules.insert(
                a.spec().path.clone(),
                PeftModule {
                    down: a.down().as_tensor().to_dtype(DType::F32)?,
                    up: a.up().as_tensor().to_dtype(DType::F32)?,
                },
            );
        }
        Ok(PeftAdapter {
            config: PeftConfig {
                r,
                lora_alpha,
                lora_dropout: self.dropout.input,
                target_modules,
                use_rslora: false,
                base_model_name_or_path,
            },
            modules,
        })
    }

    /// `target_modules` as peft should read it back: the layer names when every layer of those
    /// names is adapted, else the full module paths (so peft adapts exactly these layers).
    pub fn target_modules(&self) -> Vec<String> {
        let adapters = self.adapters();
        let adapted: BTreeSet<&str> = adapters.iter().map(|a| a.spec().path.as_str()).collect();
        let leaves: BTreeSet<&str> = adapted.iter().map(|p| leaf(p)).collect();
        let offered = lock(&self.offered).clone();
        let leaves_exact = offered
            .iter()
            .filter(|p| leaves.contains(leaf(p)))
            .all(|p| adapted.contains(p.as_str()));
        if leaves_exact {
            leaves.iter().map(|s| s.to_string()).collect()
        } else {
            adapted.iter().map(|s| s.to_string()).collect()
        }
    }

    /// The spec and starting weights of the layer at `path`, if it gets an adapter.
    fn select(
        &self,
        path: &str,
        layer: LayerKind,
    ) -> Result<Option<(ModuleSpec, Option<PeftModule>)>> {
        match &self.targets {
            Targets::Config(selector) => Ok(selector
                .select(LoraModel::LanguageModel, path, layer)?
                .map(|spec| (spec, None))),
            Targets::File {
                adapter,
                origin,
                used,
            } => {
                let Some(module) = adapter.modules.get(path) else {
                    return Ok(None);
                };
                let LayerKind::Linear {
                    in_features,
                    out_features,
                } = layer
                else {
                    return Ok(None);
                };
                let r = adapter.config.r;
                if module.down.dims() != [r, in_features] || module.up.dims() != [out_features, r] {
                    return Err(ModelError::InvalidConfig {
                        origin: origin.clone(),
                        message: format!(
                            "`{path}`: lora_A {:?} and lora_B {:?} do not fit this model's \
                             layer ({in_features} → {out_features}); was it trained on another \
                             base model?",
                            module.down.dims(),
                            module.up.dims()
                        ),
                    }
                    .into());
                }
                lock(used).insert(path.to_string());
                let spec = ModuleSpec {
                    model: LoraModel::LanguageModel,
                    path: path.to_string(),
                    layer,
                    rank: r,
                    // The scale the adapter was trained with (rsLoRA's alpha/√r as alpha/r).
                    alpha: adapter.config.scale() * r as f64,
                };
                Ok(Some((spec, Some(module.clone()))))
            }
        }
    }
}

impl AdapterProvider for LmNetwork {
    fn adapter_for(&self, module_path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>> {
        if matches!(kind, LayerKind::Linear { .. }) {
            lock(&self.offered).push(module_path.to_string());
        }
        let Some((spec, start)) = self.select(module_path, kind)? else {
            return Ok(None);
        };
        let adapter = LoraAdapter::new(
            spec,
            self.seed,
            self.dropout,
            self.state.clone(),
            self.dtype,
            &self.device,
        )?;
        if let Some(module) = start {
            adapter.set_weights(&module.down, &module.up)?;
        }
        let adapter = Arc::new(adapter);
        lock(&self.adapters).push(adapter.clone());
        Ok(Some(adapter))
    }
}

/// The last name of a module path (`model.layers.0.self_attn.q_proj` → `q_proj`).
fn leaf(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TargetModules;
    use crate::models::causal_lm::{CausalLm, LmFolder};
    use crate::nn::Scope;

    fn settings(targets: TargetModules) -> LoraSettings {
        let text = "base_model: m\ntrain_data: t.jsonl\noutput_dir: o\n";
        let mut plan = crate::config::TrainPlan::from_yaml(
            text,
            std::path::Path::new("c.yaml"),
            &[],
            std::path::Path::new("/w"),
        )
        .unwrap();
        plan.lora.target_modules = targets;
        plan.lora
    }

    /// The adapter config's `target_modules` after building the qwen2 fixture with `targets`.
    fn written_targets(targets: TargetModules) -> Vec<String> {
        let folder = crate::fixtures::root().join("llm/qwen2");
        let lm = LmFolder::open(&folder, DType::F32, &Device::Cpu).unwrap();
        let network = LmNetwork::new(&settings(targets), None, 1, &Device::Cpu);
        CausalLm::new(Scope::root(&lm.weights).with_adapters(&network), &lm.config).unwrap();
        network.check_built().unwrap();
        network.to_peft(None).unwrap().config.target_modules
    }

    #[test]
    fn target_modules_are_layer_names_only_when_peft_would_adapt_the_same_layers() {
        use crate::config::TargetPreset;
        assert_eq!(
            written_targets(TargetModules::Preset(TargetPreset::Default)),
            ["q_proj", "v_proj"]
        );
        assert_eq!(
            written_targets(TargetModules::Preset(TargetPreset::Attn)),
            ["k_proj", "o_proj", "q_proj", "v_proj"]
        );
        // One layer's q_proj only: `q_proj` would make peft adapt both layers' on loading.
        assert_eq!(
            written_targets(TargetModules::Names(vec!["model.layers.1.*q_proj".into()])),
            ["model.layers.1.self_attn.q_proj"]
        );
    }

    #[test]
    fn an_unmatched_entry_names_the_language_model() {
        let folder = crate::fixtures::root().join("llm/qwen2");
        let lm = LmFolder::open(&folder, DType::F32, &Device::Cpu).unwrap();
        let network = LmNetwork::new(
            &settings(TargetModules::Names(vec!["q_proj".into(), "to_q".into()])),
            None,
            1,
            &Device::Cpu,
        );
        CausalLm::new(Scope::root(&lm.weights).with_adapters(&network), &lm.config).unwrap();
        let e = network.check_built().unwrap_err().to_string();
        assert!(e.contains("`to_q`") && e.contains("language model"), "{e}");
    }
}
