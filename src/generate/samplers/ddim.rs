//! DDIM with η = 0 (deterministic), as diffusers' `DDIMScheduler.step`:
//!
//! ```text
//! x̂0 = (x − √(1−ᾱ_t)·ε) / √ᾱ_t          (ε prediction; v: x̂0 = √ᾱ_t·x − √(1−ᾱ_t)·v)
//! x_prev = √ᾱ_prev · x̂0 + √(1 − ᾱ_prev) · ε̂
//! ```
//!
//! `prev = t − N / steps` whatever the spacing (diffusers' rule), and past the first timestep
//! `ᾱ_prev` is 1 (`set_alpha_to_one`, the class default) or `ᾱ_0`. `clip_sample` (default on in
//! the class, off in SD's configs) clamps `x̂0`.

use candle_core::Tensor;

use super::spacing::{arange, linspace, round_even, TimestepSpacing};
use super::{divide, scale, DiffusionSampler, SamplerKind, StepNoise};
use crate::generate::schedule::SamplingSchedule;
use crate::models::noise::PredictionType;
use crate::Result;

/// DDIM for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    /// The integer timesteps.
    steps_at: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `N / steps`, integer division.
    step_ratio: i64,
    prediction: PredictionType,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(schedule: &SamplingSchedule, steps: usize) -> Self {
        let config = schedule.config();
        let n = schedule.num_train_timesteps();
        let offset = config.steps_offset.unwrap_or(0) as i64;
        let steps_at: Vec<i64> = match SamplerKind::Ddim.spacing(schedule) {
            TimestepSpacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| round_even(t) as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (n / steps) as i64;
                (0..steps as i64)
                    .rev()
                    .map(|i| i * ratio + offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                arange(n as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| round_even(t) as i64 - 1)
                    .collect()
            }
        };
        let alphas_cumprod = schedule.alphas_cumprod().to_vec();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ddim {
            timesteps: steps_at.iter().map(|&t| t as f64).collect(),
            steps_at,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (n / steps) as i64,
            prediction: schedule.prediction_type(),
            clip,
        }
    }

    fn alpha_at(&self, t: i64) -> f32 {
        let last = self.alphas_cumprod.len() as i64 - 1;
        self.alphas_cumprod[t.clamp(0, last) as usize]
    }
}

impl DiffusionSampler for Ddim {
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
        let t = self.steps_at[step];
        let prev = t - self.step_ratio;
        let alpha_t = self.alpha_at(t);
        let alpha_prev = if prev >= 0 {
            self.alpha_at(prev)
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => {
                let x0 = divide(
                    &(sample - scale(model_output, beta_t.sqrt())?)?,
                    alpha_t.sqrt(),
                )?;
                (x0, model_output.clone())
            }
            PredictionType::VPrediction => {
                let x0 = (scale(sample, alpha_t.sqrt())? - scale(model_output, beta_t.sqrt())?)?;
                let eps = (scale(model_output, alpha_t.sqrt())? + scale(sample, beta_t.sqrt())?)?;
                (x0, eps)
            }
        };
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        // η = 0: no variance term, σ_t = 0.
        let direction = scale(&eps, (1.0 - alpha_prev).sqrt())?;
        Ok((scale(&x0, alpha_prev.sqrt())? + direction)?)
    }
}
