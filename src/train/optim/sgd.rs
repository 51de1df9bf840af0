//! Stochastic gradient descent with `torch.optim.SGD`'s semantics, in f32 tensor operations on
//! the parameters' device: `g ← g + wd·p` (coupled L2 weight decay), with momentum
//! `b ← g` (first step) or `b ← μb + (1−dampening)g`, then `g ← b` (or `g + μb`, Nesterov),
//! and `p ← p − lr·g`.

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::slots::{load_slots, save_slots};
use super::{check_groups, check_lrs, grad_of, OptimizerState, ParamGroup, ParamOptimizer};
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

    /// The saved tensors of a parameter: the momentum buffer, when there is momentum.
    fn names(&self) -> &'static [&'static str] {
        if self.has_momentum() {
            &["momentum_buffer"]
        } else {
            &[]
        }
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
        save_slots(
            self.kind(),
            &self.groups,
            &self.state,
            self.names(),
            |slot| (slot.step, slot.momentum_buffer.iter().collect()),
        )
    }

    fn load_state(&mut self, state: &OptimizerState, origin: &str) -> Result<(), TrainError> {
        let names = self.names();
        self.state = load_slots(
            self.kind(),
            &self.groups,
            state,
            origin,
            names,
            |step, t| SgdSlot {
                step,
                momentum_buffer: t.into_iter().next(),
            },
        )?;
        Ok(())
    }
}
