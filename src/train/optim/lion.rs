//! Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms") with lion-pytorch's
//! semantics, in f32 tensor operations on the parameters' device:
//! `p ← p·(1 − lr·wd)`, `p ← p − lr·sign(β₁m + (1−β₁)g)`, `m ← β₂m + (1−β₂)g`.

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::slots::{load_slots, save_slots};
use super::{check_groups, check_lrs, grad_of, OptimizerState, ParamGroup, ParamOptimizer};
use crate::config::Optimizer;
use crate::train::TrainError;

/// Lion's hyperparameters (lion-pytorch's defaults; the weight decay is per group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionSettings {
    pub betas: (f64, f64),
}

impl Default for LionSettings {
    fn default() -> Self {
        LionSettings { betas: (0.9, 0.99) }
    }
}

#[derive(Debug, Clone)]
struct LionMomentum {
    step: u64,
    exp_avg: Tensor,
}

/// `lion_pytorch.Lion` over parameter groups.
pub struct Lion {
    groups: Vec<ParamGroup>,
    settings: LionSettings,
    state: Vec<Vec<Option<LionMomentum>>>,
}

impl Lion {
    pub fn new(groups: Vec<ParamGroup>, settings: LionSettings) -> Result<Self, TrainError> {
        check_groups(&groups)?;
        for (key, beta) in [("beta1", settings.betas.0), ("beta2", settings.betas.1)] {
            if !(0.0..=1.0).contains(&beta) {
                return Err(TrainError::Settings {
                    key: format!("Lion {key}"),
                    message: format!("{beta} is not in [0, 1]"),
                });
            }
        }
        let state = groups.iter().map(|g| vec![None; g.params.len()]).collect();
        Ok(Lion {
            groups,
            settings,
            state,
        })
    }
}

impl ParamOptimizer for Lion {
    fn kind(&self) -> Optimizer {
        Optimizer::Lion
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<(), TrainError> {
        check_lrs(&self.groups, lrs)?;
        let (beta1, beta2) = self.settings.betas;
        for ((group, slots), &lr) in self.groups.iter().zip(&mut self.state).zip(lrs) {
            for (param, slot) in group.params.iter().zip(slots.iter_mut()) {
                let Some(g) = grad_of(grads, param)? else {
                    continue;
                };
                let p = param.var.as_tensor().detach();
                let momentum = match slot.take() {
                    Some(m) => m,
                    None => LionMomentum {
                        step: 0,
                        exp_avg: p.zeros_like()?,
                    },
                };
                let m = &momentum.exp_avg;
                let p = p.affine(1.0 - lr * group.weight_decay, 0.0)?;
                let direction = (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?.sign()?;
                let new_p = (p + direction.affine(-lr, 0.0)?)?;
                let exp_avg = (m.affine(beta2, 0.0)? + g.affine(1.0 - beta2, 0.0)?)?;
                param.var.set(&new_p)?;
                *slot = Some(LionMomentum {
                    step: momentum.step + 1,
                    exp_avg,
                });
            }
        }
        Ok(())
    }

    fn state_tensors(&self) -> Result<OptimizerState, TrainError> {
        save_slots(self.kind(), &self.groups, &self.state, &["exp_avg"], |m| {
            (m.step, vec![&m.exp_avg])
        })
    }

    fn load_state(&mut self, state: &OptimizerState, origin: &str) -> Result<(), TrainError> {
        self.state = load_slots(
            self.kind(),
            &self.groups,
            state,
            origin,
            &["exp_avg"],
            |step, mut t| LionMomentum {
                step,
                exp_avg: t.remove(0),
            },
        )?;
        Ok(())
    }
}
