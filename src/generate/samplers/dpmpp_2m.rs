//! DPM++ 2M: diffusers' `DPMSolverMultistepScheduler` with `solver_order` 2, `dpmsolver++`
//! (data prediction), `midpoint`, `lower_order_final` and a final σ of 0 (all its defaults).
//!
//! With `α_t = 1/√(σ²+1)`, `σ'_t = σ·α_t`, `λ = ln α − ln σ'` and the model turned into a
//! clean-latent prediction `D = (x − σ'ε)/α` (v: `D = α·x − σ'·v`), step `i` goes from `s0` to
//! `t` with `h = λ_t − λ_s0`:
//!
//! ```text
//! first order:  x_t = (σ'_t/σ'_s0)·x − α_t(e^(−h) − 1)·D0
//! second order: x_t = (σ'_t/σ'_s0)·x − α_t(e^(−h) − 1)·D0 − ½·α_t(e^(−h) − 1)·(D0 − D1)/r0,
//!               r0 = (λ_s0 − λ_s1)/h
//! ```
//!
//! The first step is first order (no earlier output yet), and so is the last one (its σ is 0,
//! so it returns `D` of the last model output); with fewer than 15 steps the one before the
//! last is second order anyway (`lower_order_second` only matters for third order).

use candle_core::Tensor;

use super::spacing::{arange, linspace, round_even, TimestepSpacing};
use super::{divide, scale, DiffusionSampler, SamplerKind, StepNoise};
use crate::generate::schedule::SamplingSchedule;
use crate::models::noise::PredictionType;
use crate::Result;

/// DPM++ 2M for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct DpmPp2m {
    timesteps: Vec<f64>,
    /// One σ per timestep, then 0.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// The clean-latent prediction of the previous step.
    previous: Option<Tensor>,
}

impl DpmPp2m {
    pub fn new(schedule: &SamplingSchedule, steps: usize) -> Self {
        let n = schedule.num_train_timesteps();
        // `lambda_min_clipped` is −∞ by default: the last usable timestep is N.
        let last = n;
        let offset = schedule.config().steps_offset.unwrap_or(0) as i64;
        let steps_at: Vec<i64> = match SamplerKind::DpmPp2m.spacing(schedule) {
            TimestepSpacing::Linspace => {
                let mut t: Vec<i64> = linspace(0.0, (last - 1) as f64, steps + 1)
                    .into_iter()
                    .rev()
                    .map(|t| round_even(t) as i64)
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = (last / (steps + 1)) as i64;
                let mut t: Vec<i64> = (0..=steps as i64)
                    .rev()
                    .map(|i| i * ratio + offset)
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| round_even(t) as i64 - 1)
                    .collect()
            }
        };
        let table = schedule.sigma_table();
        let top = table.len() as i64 - 1;
        let mut sigmas: Vec<f32> = steps_at
            .iter()
            .map(|&t| table[t.clamp(0, top) as usize])
            .collect();
        sigmas.push(0.0);
        DpmPp2m {
            timesteps: steps_at.into_iter().map(|t| t as f64).collect(),
            sigmas,
            prediction: schedule.prediction_type(),
            previous: None,
        }
    }

    /// The clean-latent prediction `D` from the model's output at step `step`.
    fn data_prediction(
        &self,
        step: usize,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step]);
        match self.prediction {
            PredictionType::Epsilon => divide(&(sample - scale(model_output, sigma)?)?, alpha),
            PredictionType::VPrediction => {
                Ok((scale(sample, alpha)? - scale(model_output, sigma)?)?)
            }
        }
    }
}

/// `(α_t, σ'_t)` of a σ: `1/√(σ²+1)` and `σ·α_t`, in f32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `λ = ln α − ln σ'` (+∞ at σ = 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DiffusionSampler for DpmPp2m {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        step: usize,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let d0 = self.data_prediction(step, model_output, sample)?;
        let is_last = step + 1 == self.timesteps.len();
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let decay = alpha_t * ((-h).exp() - 1.0);
        let carried = scale(sample, sigma_t / sigma_s0)?;
        let next = match (&self.previous, is_last) {
            (Some(d1), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                let d1_term = scale(&(&d0 - d1)?, 1.0 / r0)?;
                ((carried - scale(&d0, decay)?)? - scale(&d1_term, 0.5 * decay)?)?
            }
            _ => (carried - scale(&d0, decay)?)?,
        };
        self.previous = Some(d0);
        Ok(next)
    }
}
