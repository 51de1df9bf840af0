//! Several LoRA files applied to one model at their weights: the sum
//! `y = W x + Σ_i w_i · (alpha_i / r_i) · up_i(down_i(x))`.
//!
//! The LoRAs attach through the [`AdapterProvider`] hook while the UNet and the text encoder are
//! built, as the trainer's own adapters do, rather than being merged into the weights: the base
//! weights stay the untouched memory-mapped tensors (merging would copy every adapted matrix,
//! per LoRA combination), the forward pass is the training one (so a preview and `generate`
//! with the exported file agree), and weight 0 leaves every layer's output bit-identical to the
//! base model's. The price is two thin matrix products per adapted layer and LoRA (rank ≪ width:
//! a few percent of the layer's own cost).
//!
//! Each module of each file is matched to a layer by its kohya name (files in diffusers/PEFT
//! layout too, see [`crate::lora::file`]); shapes are checked. A module that matches no layer is
//! an error naming its key, or a warning in lenient mode ([`LoraStack::check_all_matched`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::error::GenerateError;
use super::lora_files::LoadedLora;
use crate::lora::import::FileTargets;
use crate::lora::LoraBase;
use crate::lora::{Dropout, LoraAdapter, LoraModel, TrainingState};
use crate::nn::{Adapter, AdapterProvider, LayerKind};
use crate::Result;

/// One file of the stack.
struct StackedFile {
    targets: FileTargets,
    text_encoder_weight: f64,
    unet_weight: f64,
    /// Kohya names of the modules that found their layer.
    matched: Mutex<HashSet<String>>,
}

/// LoRA files to apply together; hand [`LoraStack::provider`] to each model's builder.
pub struct LoraStack {
    files: Vec<StackedFile>,
    device: Device,
    state: Arc<TrainingState>,
}

impl LoraStack {
    /// The stack of `loras` for `base`, adapters on `device`. A file made for another family
    /// (SDXL on SD 1.x, SD 2.x on SD 1.x...) is refused with the evidence.
    pub fn new(loras: Vec<LoadedLora>, base: &LoraBase, device: &Device) -> Result<Self> {
        let files = loras
            .into_iter()
            .map(|l| {
                Ok(StackedFile {
                    targets: FileTargets::new(l.file, Some(base))?,
                    text_encoder_weight: l.usage.text_encoder_weight,
                    unet_weight: l.usage.unet_weight,
                    matched: Mutex::new(HashSet::new()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraStack {
            files,
            device: device.clone(),
            state: Arc::new(TrainingState::default()),
        })
    }

    /// No LoRA at all.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The adapter provider for `model`'s builder.
    pub fn provider(&self, model: LoraModel) -> StackProvider<'_> {
        StackProvider { stack: self, model }
    }

    /// After both models are built: the file modules that found no layer, as errors naming
    /// their keys, or (when `lenient`) as warnings returned for the user.
    pub fn check_all_matched(&self, lenient: bool) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for file in &self.files {
            let matched = match file.matched.lock() {
                Ok(m) => m.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            let lora = file.targets.file();
            let unmatched: Vec<String> = lora
                .modules
                .iter()
                .filter(|m| !matched.contains(&m.name))
                .map(|m| m.down_key.clone())
                .collect();
            if unmatched.is_empty() {
                continue;
            }
            let shown: Vec<String> = unmatched.iter().take(8).map(|k| format!("`{k}`")).collect();
            let more = if unmatched.len() > shown.len() {
                format!(" and {} more", unmatched.len() - shown.len())
            } else {
                String::new()
            };
            let what = format!(
                "{} of its {} module(s) match no layer of the model: {}{more}",
                unmatched.len(),
                lora.modules.len(),
                shown.join(", ")
            );
            if lenient {
                warnings.push(format!(
                    "{}: {what}; skipped (--lenient)",
                    lora.path.display()
                ));
            } else {
                return Err(GenerateError::new(
                    lora.path.display().to_string(),
                    format!(
                        "{what}; the LoRA was made for a model with other layers (another base \
                         model or architecture). Use --lenient to apply the modules that do match"
                    ),
                )
                .into());
            }
        }
        Ok(warnings)
    }
}

/// [`LoraStack`]'s adapters for one model.
pub struct StackProvider<'a> {
    stack: &'a LoraStack,
    model: LoraModel,
}

impl AdapterProvider for StackProvider<'_> {
    fn adapter_for(&self, module_path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>> {
        let mut adapters: Vec<Arc<dyn Adapter>> = Vec::new();
        for file in &self.stack.files {
            let Some((spec, down, up)) = file.targets.select(self.model, module_path, kind)? else {
                continue;
            };
            if let (Ok(mut matched), Some(name)) = (
                file.matched.lock(),
                file.targets.name_of(self.model, module_path),
            ) {
                matched.insert(name.to_string());
            }
            let weight = match self.model {
                LoraModel::Unet | LoraModel::LanguageModel => file.unet_weight,
                LoraModel::TextEncoder | LoraModel::TextEncoder2 => file.text_encoder_weight,
            };
            let adapter = LoraAdapter::new(
                spec,
                0,
                Dropout::default(),
                self.stack.state.clone(),
                DType::F32,
                &self.stack.device,
            )?;
            // The weight scales the adapter's output; folding it into `up` costs nothing.
            let up = (up.to_dtype(DType::F32)? * weight)?;
            adapter.set_weights(&down, &up)?;
            adapters.push(Arc::new(adapter));
        }
        Ok(match adapters.len() {
            0 => None,
            1 => adapters.pop(),
            _ => Some(Arc::new(AdapterSum(adapters))),
        })
    }
}

/// Several adapters on one layer: the sum of their outputs.
#[derive(Debug)]
struct AdapterSum(Vec<Arc<dyn Adapter>>);

impl Adapter for AdapterSum {
    /// `x`: the layer's input → the sum of every adapter's contribution (the layer output's shape).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for adapter in &self.0 {
            let y = adapter.forward(x)?;
            total = Some(match total {
                Some(t) => (t + y)?,
                None => y,
            });
        }
        match total {
            Some(t) => Ok(t),
            None => Err(candle_core::Error::Msg("an empty adapter sum".to_string()).into()),
        }
    }
}
