//! AdamW exactly as `torch.optim.AdamW` updates a parameter, in f32 tensor operations on the
//! parameters' device.
//!
//! Per step `t` of a parameter (counted only in steps where it has a gradient `g`):
//! `p ← p·(1 − lr·wd)` (decoupled weight decay, first), `m ← m + (1−β₁)(g − m)`,
//! `v ← β₂v + (1−β₂)g²`, `p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`.

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::slots::{load_slots, save_slots};
use super::{check_groups, check_lrs, grad_of, OptimizerState, ParamGroup, ParamOptimizer};
use crate::config::Optimizer;
use crate::train::TrainError;

/// AdamW's hyperparameters (torch's defaults; the weight decay is per group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub betas: (f64, f64),
    pub eps: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

impl AdamWSettings {
    pub(super) fn check(&self) -> Result<(), TrainError> {
        for (key, beta) in [("adam_beta1", self.betas.0), ("adam_beta2", self.betas.1)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(TrainError::Settings {
                    key: key.into(),
                    message: format!("{beta} is not in [0, 1)"),
                });
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(TrainError::Settings {
                key: "adam_epsilon".into(),
                message: format!("{} must be a finite number ≥ 0", self.eps),
            });
        }
        Ok(())
    }
}

/// The names of the saved moments (torch's).
const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// The two moments of one parameter and the number of steps it took.
#[derive(Debug, Clone)]
pub(super) struct AdamMoments {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

impl AdamMoments {
    pub fn zeros_like(p: &Tensor) -> Result<Self, TrainError> {
        Ok(AdamMoments {
            step: 0,
            exp_avg: p.zeros_like()?,
            exp_avg_sq: p.zeros_like()?,
        })
    }
}

/// torch's `exp_avg.lerp_(grad, weight)`: `m + w·(g − m)` below w = 0.5, `g − (g − m)·(1 − w)`
/// from there on.
fn lerp(m: &Tensor, g: &Tensor, weight: f64) -> candle_core::Result<Tensor> {
    let diff = (g - m)?;
    let w = weight as f32;
    if w < 0.5 {
        m + diff.affine(f64::from(w), 0.0)?
    } else {
        g - diff.affine(f64::from(1.0 - w), 0.0)?
    }
}

/// One AdamW update of `p` with gradient `g`; returns the new parameter value and moments.
pub(super) fn adamw_update(
    p: &Tensor,
    g: &Tensor,
    moments: &AdamMoments,
    lr: f64,
    weight_decay: f64,
    settings: &AdamWSettings,
) -> Result<(Tensor, AdamMoments), TrainError> {
    let (beta1, beta2) = settings.betas;
    let step = moments.step + 1;
    let p = if weight_decay != 0.0 {
        p.affine(f64::from((1.0 - lr * weight_decay) as f32), 0.0)?
    } else {
        p.clone()
    };
    let exp_avg = lerp(&moments.exp_avg, g, 1.0 - beta1)?;
    let exp_avg_sq =
        (moments.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
    // The bias corrections in f64 with a float exponent, as Python's `beta ** step`.
    let bias_correction1 = 1.0 - beta1.powf(step as f64);
    let bias_correction2 = 1.0 - beta2.powf(step as f64);
    let step_size = lr / bias_correction1;
    let scalar = |x: f64| Tensor::new(x as f32, p.device());
    let denom = exp_avg_sq
        .sqrt()?
        .broadcast_div(&scalar(bias_correction2.sqrt())?)?
        .affine(1.0, settings.eps)?;
    let update = exp_avg.affine(-step_size, 0.0)?.div(&denom)?;
    let p = (p + update)?;
    Ok((
        p,
        AdamMoments {
            step,
            exp_avg,
            exp_avg_sq,
        },
    ))
}

/// `torch.optim.AdamW` over parameter groups, with its state in f32 on the parameters' device.
pub struct AdamW {
    groups: Vec<ParamGroup>,
    settings: AdamWSettings,
    /// Per group, per parameter; `None` until the parameter first has a gradient.
    state: Vec<Vec<Option<AdamMoments>>>,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, settings: AdamWSettings) -> Result<Self, TrainError> {
        check_groups(&groups)?;
        settings.check()?;
        let state = groups.iter().map(|g| vec![None; g.params.len()]).collect();
        Ok(AdamW {
            groups,
            settings,
            state,
        })
    }
}

impl ParamOptimizer for AdamW {
    fn kind(&self) -> Optimizer {
        Optimizer::AdamW
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<(), TrainError> {
        check_lrs(&self.groups, lrs)?;
        for ((group, slots), &lr) in self.groups.iter().zip(&mut self.state).zip(lrs) {
            for (param, slot) in group.params.iter().zip(slots.iter_mut()) {
                let Some(g) = grad_of(grads, param)? else {
                    continue;
                };
                // Detached: the update builds no autograd graph through the Var.
                let p = param.var.as_tensor().detach();
                let moments = match slot.take() {
                    Some(m) => m,
                    None => AdamMoments::zeros_like(&p)?,
                };
                let (new_p, moments) =
                    adamw_update(&p, &g, &moments, lr, group.weight_decay, &self.settings)?;
                param.var.set(&new_p)?;
                *slot = Some(moments);
            }
        }
        Ok(())
    }

    fn state_tensors(&self) -> Result<OptimizerState, TrainError> {
        save_slots(self.kind(), &self.groups, &self.state, &MOMENTS, |m| {
            (m.step, vec![&m.exp_avg, &m.exp_avg_sq])
        })
    }

    fn load_state(&mut self, state: &OptimizerState, origin: &str) -> Result<(), TrainError> {
        self.state = load_slots(
            self.kind(),
            &self.groups,
            state,
            origin,
            &MOMENTS,
            |step, t| {
                let [exp_avg, exp_avg_sq] = <[Tensor; 2]>::try_from(t).expect("two moments");
                AdamMoments {
                    step,
                    exp_avg,
                    exp_avg_sq,
                }
            },
        )?;
        Ok(())
    }
}
