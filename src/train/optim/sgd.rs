//! Stochastic gradient descent with `torch.optim.SGD`'s semantics, in f32 tensor operations on
//! the parameters' device: `g ← g + wd·p` (coupled L2 weight decay), with momentum
//! `b ← g` (first step) or `b ← μb + (1−dampening)g`, then `g ← b` (or `g + μb`, Nesterov),
//! and `p ← p − lr·g`.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::{
    check_groups, check_lrs, check_saved, grad_of, saved_tensor, steps_of, OptimizerState,
    ParamGroup, ParamOptimizer, StateScalars,
};
use crate::config::Optimizer;
use crate::train::TrainError;

/// SGD's hyperparameters (torch's defaults: plain SGD; the weight decay is per group).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SgdSettings {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
}

#[derive(Debug, Clone)]
struct SgdSlot {
    step: u64,
    /// Only with momentum.
    momentum_buffer: Option<Tensor>,
}

/// `torch.optim.SGD` over parameter groups.
pub struct Sgd {
    groups: Vec<ParamGroup>,
    settings: SgdSettings,
    state: Vec<Vec<Option<SgdSlot>>>,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, settings: SgdSettings) -> Result<Self, TrainError> {
        check_groups(&groups)?;
        if !(settings.momentum.is_finite() && settings.momentum >= 0.0) {
            return Err(TrainError::Settings {
                key: "SGD momentum".into(),
                message: format!("{} must be a finite number ≥ 0", settings.momentum),
            });
        }
        if settings.nesterov && (settings.momentum <= 0.0 || settings.dampening != 0.0) {
            return Err(TrainError::Settings {
                key: "SGD nesterov".into(),
                message: "Nesterov momentum needs a momentum > 0 and zero dampening".into(),
            });
        }
        let state = groups.iter().map(|g| vec![None; g.params.len()]).collect();
        Ok(Sgd {
            groups,
            settings,
            state,
        })
    }

    fn has_momentum(&self) -> bool {
        self.settings.momentum != 0.0
    }
}

impl ParamOptimizer for Sgd {
    fn kind(&self) -> Optimizer {
        Optimizer::Sgd
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<(), TrainError> {
        check_lrs(&self.groups, lrs)?;
        let SgdSettings {
            momentum,
            dampening,
            nesterov,
        } = self.settings;
        let with_momentum = self.has_momentum();
        for ((group, slots), &lr) in self.groups.iter().zip(&mut self.state).zip(lrs) {
            for (param, slot) in group.params.iter().zip(slots.iter_mut()) {
                let Some(mut g) = grad_of(grads, param)? else {
                    continue;
                };
                let p = param.var.as_tensor().detach();
                if group.weight_decay != 0.0 {
                    g = (g + p.affine(group.weight_decay, 0.0)?)?;
                }
                let previous = slot.take();
                let step = previous.as_ref().map_or(0, |s| s.step) + 1;
                let mut momentum_buffer = None;
                if with_momentum {
                    let buffer = match previous.and_then(|s| s.momentum_buffer) {
                        None => g.copy()?,
                        Some(b) => (b.affine(momentum, 0.0)? + g.affine(1.0 - dampening, 0.0)?)?,
                    };
                    g = if nesterov {
                        (g + buffer.affine(momentum, 0.0)?)?
                    } else {
                        buffer.clone()
                    };
                    momentum_buffer = Some(buffer);
                }
                let new_p = (p + g.affine(-lr, 0.0)?)?;
                param.var.set(&new_p)?;
                *slot = Some(SgdSlot {
                    step,
                    momentum_buffer,
                });
            }
        }
        Ok(())
    }

    fn state_tensors(&self) -> Result<OptimizerState, TrainError> {
        let mut tensors = HashMap::new();
        let mut steps = Vec::new();
        for (group, slots) in self.groups.iter().zip(&self.state) {
            for (param, slot) in group.params.iter().zip(slots) {
                let Some(slot) = slot else { continue };
                if let Some(b) = &slot.momentum_buffer {
                    tensors.insert(format!("{}.momentum_buffer", param.name), b.copy()?);
                }
                steps.push((param.name.as_str(), slot.step));
            }
        }
        Ok(OptimizerState {
            tensors,
            scalars: StateScalars {
                optimizer: self.kind().as_str().to_string(),
                steps: steps_of(steps.into_iter()),
            },
        })
    }

    fn load_state(&mut self, state: &OptimizerState, origin: &str) -> Result<(), TrainError> {
        let expected: HashSet<String> = if self.has_momentum() {
            state
                .scalars
                .steps
                .keys()
                .map(|n| format!("{n}.momentum_buffer"))
                .collect()
        } else {
            HashSet::new()
        };
        check_saved(state, origin, self.kind(), &self.groups, &expected)?;
        let mut restored = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let mut slots = Vec::with_capacity(group.params.len());
            for param in &group.params {
                let Some(&step) = state.scalars.steps.get(&param.name) else {
                    slots.push(None);
                    continue;
                };
                let momentum_buffer = if self.has_momentum() {
                    Some(saved_tensor(
                        state,
                        origin,
                        &format!("{}.momentum_buffer", param.name),
                        DType::F32,
                        param.var.dims(),
                        param.var.device(),
                    )?)
                } else {
                    None
                };
                slots.push(Some(SgdSlot {
                    step,
                    momentum_buffer,
                }));
            }
            restored.push(slots);
        }
        self.state = restored;
        Ok(())
    }
}
