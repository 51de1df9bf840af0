//! Learning-rate schedules, step for step equal to diffusers' `get_scheduler`: a multiplier of
//! the optimizer step (torch's `LambdaLR`), the same for every parameter group, times the group's
//! base learning rate.
//!
//! The schedule is a pure function of the number of optimizer steps already taken, so resuming a
//! run needs no schedule state. Like diffusers, `constant` ignores the warm-up (the config warns
//! about it); `cosine` is a half cosine (diffusers' `num_cycles = 0.5`); `lr_scheduler_num_cycles`
//! applies to `cosine_with_restarts` only; `polynomial` decays to `lr_end` = 1e-7 relative to the
//! config's `learning_rate`, as diffusers does relative to the optimizer's default lr.

use std::f64::consts::PI;

use super::TrainError;
use crate::config::{LrScheduler, TrainingSettings};

/// diffusers' `lr_end` for the polynomial schedule.
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// A learning-rate schedule over a run's optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    kind: LrScheduler,
    warmup_steps: usize,
    total_steps: usize,
    num_cycles: usize,
    power: f64,
    /// The optimizer's default lr (the config's `learning_rate`); only `polynomial` uses it.
    base_lr: f64,
}

impl LrSchedule {
    /// A schedule of `total_steps` optimizer steps with `warmup_steps` of linear warm-up.
    /// `num_cycles` counts the restarts of `cosine_with_restarts`; `power` shapes `polynomial`,
    /// whose end lr (1e-7) is relative to `base_lr`.
    pub fn new(
        kind: LrScheduler,
        warmup_steps: usize,
        total_steps: usize,
        num_cycles: usize,
        power: f64,
        base_lr: f64,
    ) -> Result<Self, TrainError> {
        if kind == LrScheduler::Polynomial && base_lr <= POLYNOMIAL_LR_END {
            return Err(TrainError::Settings {
                key: "learning_rate".into(),
                message: format!(
                    "{base_lr} must be above the polynomial schedule's end lr \
                     {POLYNOMIAL_LR_END}; raise it or choose another scheduler"
                ),
            });
        }
        if !power.is_finite() {
            return Err(TrainError::Settings {
                key: "lr_scheduler_power".into(),
                message: format!("{power} is not a finite number"),
            });
        }
        Ok(LrSchedule {
            kind,
            warmup_steps,
            total_steps,
            num_cycles,
            power,
            base_lr,
        })
    }

    /// The schedule a config asks for, over a run of `total_steps` optimizer steps.
    pub fn from_training(
        training: &TrainingSettings,
        total_steps: usize,
    ) -> Result<Self, TrainError> {
        LrSchedule::new(
            training.scheduler,
            training.warmup.steps(total_steps),
            total_steps,
            training.lr_scheduler_num_cycles,
            training.lr_scheduler_power,
            training.learning_rate,
        )
    }

    pub fn kind(&self) -> LrScheduler {
        self.kind
    }

    /// The warm-up this schedule applies (0 for `constant`, which ignores it).
    pub fn effective_warmup_steps(&self) -> usize {
        match self.kind {
            LrScheduler::Constant => 0,
            _ => self.warmup_steps,
        }
    }

    /// The multiplier of the base learning rates for optimizer step `step` (0 = the first).
    pub fn multiplier(&self, step: usize) -> f64 {
        let warmup = self.warmup_steps;
        let total = self.total_steps;
        let warming = |denominator_floor: usize| step as f64 / warmup.max(denominator_floor) as f64;
        // Fraction of the post-warm-up phase already done (diffusers' `progress`).
        let progress =
            || (step as f64 - warmup as f64) / total.saturating_sub(warmup).max(1) as f64;
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::ConstantWithWarmup if step < warmup => warming(1),
            LrScheduler::ConstantWithWarmup => 1.0,
            _ if step < warmup => warming(1),
            LrScheduler::Linear => {
                let remaining =
                    (total as f64 - step as f64) / total.saturating_sub(warmup).max(1) as f64;
                remaining.max(0.0)
            }
            LrScheduler::Cosine => {
                let cycles = 0.5;
                (0.5 * (1.0 + (PI * cycles * 2.0 * progress()).cos())).max(0.0)
            }
            LrScheduler::CosineWithRestarts => {
                let progress = progress();
                if progress >= 1.0 {
                    return 0.0;
                }
                let phase = (self.num_cycles as f64 * progress) % 1.0;
                (0.5 * (1.0 + (PI * phase).cos())).max(0.0)
            }
            LrScheduler::Polynomial => {
                let lr_end = POLYNOMIAL_LR_END;
                let lr_init = self.base_lr;
                if step > total {
                    return lr_end / lr_init;
                }
                let decay_steps = total - warmup;
                if decay_steps == 0 {
                    // diffusers divides by zero here (total == warm-up); hold the end lr.
                    return lr_end / lr_init;
                }
                let pct_remaining = 1.0 - (step - warmup) as f64 / decay_steps as f64;
                let decay = (lr_init - lr_end) * pct_remaining.powf(self.power) + lr_end;
                decay / lr_init
            }
        }
    }

    /// The learning rate of each group for optimizer step `step`: `base_lrs[i] × multiplier`.
    pub fn lrs(&self, step: usize, base_lrs: &[f64]) -> Vec<f64> {
        let multiplier = self.multiplier(step);
        base_lrs.iter().map(|lr| lr * multiplier).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrScheduler) -> LrSchedule {
        LrSchedule::new(kind, 10, 100, 3, 2.0, 1e-3).unwrap()
    }

    #[test]
    fn warmup_ramps_from_zero() {
        for kind in [
            LrScheduler::ConstantWithWarmup,
            LrScheduler::Linear,
            LrScheduler::Cosine,
            LrScheduler::CosineWithRestarts,
            LrScheduler::Polynomial,
        ] {
            let s = schedule(kind);
            assert_eq!(s.multiplier(0), 0.0, "{kind}");
            assert_eq!(s.multiplier(5), 0.5, "{kind}");
            assert_eq!(s.multiplier(10), 1.0, "{kind}");
        }
    }

    #[test]
    fn constant_ignores_warmup_like_diffusers() {
        let s = schedule(LrScheduler::Constant);
        assert_eq!(s.multiplier(0), 1.0);
        assert_eq!(s.effective_warmup_steps(), 0);
        assert_eq!(s.lrs(3, &[1e-3, 5e-4]), vec![1e-3, 5e-4]);
    }

    #[test]
    fn decays_reach_their_ends() {
        assert_eq!(schedule(LrScheduler::Linear).multiplier(100), 0.0);
        assert!(schedule(LrScheduler::Cosine).multiplier(100) < 1e-15);
        assert_eq!(
            schedule(LrScheduler::CosineWithRestarts).multiplier(100),
            0.0
        );
        // three restarts: back at the top at 1/3 and 2/3 of the decay phase
        assert_eq!(
            schedule(LrScheduler::CosineWithRestarts).multiplier(40),
            1.0
        );
        let poly = schedule(LrScheduler::Polynomial);
        assert!((poly.multiplier(100) * 1e-3 - 1e-7).abs() < 1e-20);
        assert!((poly.multiplier(150) * 1e-3 - 1e-7).abs() < 1e-20);
    }

    #[test]
    fn polynomial_needs_a_learning_rate_above_its_end() {
        let err = LrSchedule::new(LrScheduler::Polynomial, 0, 10, 1, 1.0, 1e-8).unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        assert!(err.is_user_error());
    }
}
