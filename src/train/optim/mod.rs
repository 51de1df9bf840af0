//! Optimizers of the LoRA weights, our own code because candle's AdamW keeps its state private
//! (a run could not be resumed). Each one updates candle [`Var`]s arranged in parameter groups
//! (UNet adapters, text-encoder adapters) with one learning rate per group per step, skips a
//! parameter whose gradient is absent as torch skips `p.grad is None`, and hands out its whole
//! state as named tensors plus JSON-able scalars so that a restored optimizer continues
//! bit-identically.
//!
//! | optimizer | reference semantics | state per parameter |
//! |---|---|---|
//! | [`AdamW`] | `torch.optim.AdamW` | `exp_avg`, `exp_avg_sq` (f32) |
//! | [`AdamW8bit`] | `bitsandbytes.optim.AdamW8bit` | the same moments as blockwise 8-bit codes + f32 scales |
//! | [`Lion`] | `lion_pytorch.Lion` | `exp_avg` (f32) |
//! | [`Sgd`] | `torch.optim.SGD` | `momentum_buffer` (f32, only with momentum) |
//!
//! Parameters are f32 master weights (also under mixed precision); gradients of another float
//! dtype are converted to f32 first.

mod adamw;
mod adamw8bit;
mod lion;
mod quantize;
mod sgd;
mod slots;

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use adamw::{AdamW, AdamWSettings};
pub use adamw8bit::{AdamW8bit, AdamW8bitSettings, MIN_8BIT_SIZE};
pub use lion::{Lion, LionSettings};
pub use quantize::{dynamic_map, BlockQuantized, QuantMap, BLOCK_SIZE};
pub use sgd::{Sgd, SgdSettings};

use super::TrainError;
use crate::config::{Optimizer, TrainingSettings};

/// One trainable tensor and the name its state is saved under (the adapter's key, e.g.
/// `lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`).
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub var: Var,
}

/// Parameters that share a learning rate and a weight decay (as a torch `param_group`).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// What the group holds (`unet`, `text_encoder`); used in messages.
    pub name: String,
    pub weight_decay: f64,
    pub params: Vec<NamedParam>,
}

impl ParamGroup {
    pub fn new(
        name: impl Into<String>,
        weight_decay: f64,
        params: impl IntoIterator<Item = (String, Var)>,
    ) -> Self {
        ParamGroup {
            name: name.into(),
            weight_decay,
            params: params
                .into_iter()
                .map(|(name, var)| NamedParam { name, var })
                .collect(),
        }
    }
}

/// An optimizer's complete state: tensors for a safetensors file, scalars for a JSON file.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    /// `<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.exp_avg.codes` (u8) +
    /// `<param>.exp_avg.absmax` (f32), `<param>.momentum_buffer`... on the parameters' device.
    pub tensors: HashMap<String, Tensor>,
    pub scalars: StateScalars,
}

/// The non-tensor part of an optimizer state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateScalars {
    /// The optimizer's name as the config spells it (`AdamW`, `AdamW8bit`, `Lion`, `SGD`).
    pub optimizer: String,
    /// Per parameter, the number of steps in which it had a gradient (torch's `state["step"]`;
    /// AdamW's bias correction uses it). Parameters that never had one are absent.
    pub steps: BTreeMap<String, u64>,
}

/// What every optimizer offers the training loop.
pub trait ParamOptimizer: Send {
    /// Which optimizer this is.
    fn kind(&self) -> Optimizer;

    /// The parameter groups, in the order `step` expects their learning rates.
    fn groups(&self) -> &[ParamGroup];

    /// One update of every parameter that has a gradient in `grads`; `lrs` holds one learning
    /// rate per group (`lrs[i]` for `groups()[i]`).
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<(), TrainError>;

    /// The whole state (moments, 8-bit codes and scales, step counts).
    fn state_tensors(&self) -> Result<OptimizerState, TrainError>;

    /// Restores a state written by [`ParamOptimizer::state_tensors`] of the same optimizer over
    /// the same parameters; `origin` names where it came from in messages. Tensors are moved to
    /// the parameters' device.
    fn load_state(&mut self, state: &OptimizerState, origin: &str) -> Result<(), TrainError>;
}

/// The optimizer choice with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerSettings {
    AdamW(AdamWSettings),
    AdamW8bit(AdamW8bitSettings),
    Lion(LionSettings),
    Sgd(SgdSettings),
}

impl OptimizerSettings {
    /// The reference implementation's defaults for `kind`.
    pub fn defaults(kind: Optimizer) -> Self {
        match kind {
            Optimizer::AdamW => OptimizerSettings::AdamW(AdamWSettings::default()),
            Optimizer::AdamW8bit => OptimizerSettings::AdamW8bit(AdamW8bitSettings::default()),
            Optimizer::Lion => OptimizerSettings::Lion(LionSettings::default()),
            Optimizer::Sgd => OptimizerSettings::Sgd(SgdSettings::default()),
        }
    }

    /// The settings a run's config asks for: `adam_beta1`, `adam_beta2` and `adam_epsilon` apply
    /// to AdamW and AdamW8bit; Lion keeps lion-pytorch's betas (0.9, 0.99) and SGD torch's
    /// momentum 0, as kohya does without `optimizer_args`.
    pub fn from_training(training: &TrainingSettings) -> Self {
        let adam = AdamWSettings {
            betas: (training.adam_beta1, training.adam_beta2),
            eps: training.adam_epsilon,
        };
        match training.optimizer {
            Optimizer::AdamW => OptimizerSettings::AdamW(adam),
            Optimizer::AdamW8bit => OptimizerSettings::AdamW8bit(AdamW8bitSettings {
                adam,
                ..AdamW8bitSettings::default()
            }),
            kind => OptimizerSettings::defaults(kind),
        }
    }
}

/// Builds the chosen optimizer over `groups`.
pub fn build_optimizer(
    settings: OptimizerSettings,
    groups: Vec<ParamGroup>,
) -> Result<Box<dyn ParamOptimizer>, TrainError> {
    Ok(match settings {
        OptimizerSettings::AdamW(s) => Box::new(AdamW::new(groups, s)?),
        OptimizerSettings::AdamW8bit(s) => Box::new(AdamW8bit::new(groups, s)?),
        OptimizerSettings::Lion(s) => Box::new(Lion::new(groups, s)?),
        OptimizerSettings::Sgd(s) => Box::new(Sgd::new(groups, s)?),
    })
}

/// Checks what every optimizer needs of its parameters: unique names, f32, contiguous.
fn check_groups(groups: &[ParamGroup]) -> Result<(), TrainError> {
    let mut seen = HashSet::new();
    for group in groups {
        if !(group.weight_decay.is_finite() && group.weight_decay >= 0.0) {
            return Err(TrainError::Settings {
                key: "weight_decay".into(),
                message: format!(
                    "{} (group `{}`) must be a finite number ≥ 0",
                    group.weight_decay, group.name
                ),
            });
        }
        for p in &group.params {
            if !seen.insert(p.name.as_str()) {
                return Err(TrainError::Usage(format!(
                    "the parameter name `{}` appears twice",
                    p.name
                )));
            }
            if p.var.dtype() != DType::F32 {
                return Err(TrainError::Usage(format!(
                    "parameter `{}` is {:?}; optimizers update f32 master weights",
                    p.name,
                    p.var.dtype()
                )));
            }
            if !p.var.is_contiguous() {
                return Err(TrainError::Usage(format!(
                    "parameter `{}` is not contiguous",
                    p.name
                )));
            }
        }
    }
    Ok(())
}

/// One learning rate per group, each finite and ≥ 0.
fn check_lrs(groups: &[ParamGroup], lrs: &[f64]) -> Result<(), TrainError> {
    if lrs.len() != groups.len() {
        return Err(TrainError::Usage(format!(
            "{} learning rates for {} parameter groups",
            lrs.len(),
            groups.len()
        )));
    }
    if let Some((g, lr)) = groups
        .iter()
        .zip(lrs)
        .find(|(_, lr)| !(lr.is_finite() && **lr >= 0.0))
    {
        return Err(TrainError::Usage(format!(
            "learning rate {lr} for group `{}`",
            g.name
        )));
    }
    Ok(())
}

/// The gradient of `param` as f32, or `None` when it has none this step.
fn grad_of(grads: &GradStore, param: &NamedParam) -> Result<Option<Tensor>, TrainError> {
    let Some(grad) = grads.get(param.var.as_tensor()) else {
        return Ok(None);
    };
    if grad.dims() != param.var.dims() {
        return Err(TrainError::Usage(format!(
            "the gradient of `{}` has shape {:?}, the parameter {:?}",
            param.name,
            grad.dims(),
            param.var.dims()
        )));
    }
    Ok(Some(grad.to_dtype(DType::F32)?))
}

/// Takes a state tensor for `param` out of a saved state, on the parameter's device, checking
/// its dtype and element count.
fn saved_tensor(
    state: &OptimizerState,
    origin: &str,
    key: &str,
    dtype: DType,
    shape: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor, TrainError> {
    let t = state
        .tensors
        .get(key)
        .ok_or_else(|| TrainError::state(origin, format!("the tensor `{key}` is missing")))?;
    if t.dtype() != dtype || t.dims() != shape {
        return Err(TrainError::state(
            origin,
            format!(
                "`{key}` is {:?} {:?}, expected {:?} {:?}",
                t.dtype(),
                t.dims(),
                dtype,
                shape
            ),
        ));
    }
    // A copy, so that the optimizer never shares storage with the caller's tensors.
    Ok(t.to_device(device)?.copy()?)
}

/// Checks the scalars of a saved state against this optimizer and its parameters, and that the
/// state holds no tensor this optimizer would not read (a state of another LoRA layout).
fn check_saved(
    state: &OptimizerState,
    origin: &str,
    kind: Optimizer,
    groups: &[ParamGroup],
    expected_keys: &HashSet<String>,
) -> Result<(), TrainError> {
    if state.scalars.optimizer != kind.as_str() {
        return Err(TrainError::state(
            origin,
            format!(
                "it was written by the optimizer `{}`, this run uses `{kind}`",
                state.scalars.optimizer
            ),
        ));
    }
    let names: HashSet<&str> = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|p| p.name.as_str()))
        .collect();
    if let Some(unknown) = state
        .scalars
        .steps
        .keys()
        .find(|n| !names.contains(n.as_str()))
    {
        return Err(TrainError::state(
            origin,
            format!("it has state for `{unknown}`, which is not a parameter of this run"),
        ));
    }
    let mut extra: Vec<&String> = state
        .tensors
        .keys()
        .filter(|k| !expected_keys.contains(*k))
        .collect();
    extra.sort();
    if let Some(key) = extra.first() {
        return Err(TrainError::state(
            origin,
            format!(
                "{} tensor(s) belong to no parameter of this run, e.g. `{key}`",
                extra.len()
            ),
        ));
    }
    Ok(())
}

/// The per-parameter step counts and names of a set of optimizer slots.
fn steps_of<'a>(slots: impl Iterator<Item = (&'a str, u64)>) -> BTreeMap<String, u64> {
    slots.map(|(n, s)| (n.to_string(), s)).collect()
}

#[cfg(test)]
mod tests;
