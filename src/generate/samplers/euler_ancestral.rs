//! Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's
//! `sample_euler_ancestral` with η = 1) in σ space, `x = x0 + σ·ε`:
//!
//! ```text
//! model input = x / √(σ² + 1)
//! x̂0 = x − σ·ε                    (v: x̂0 = v·(−σ/√(σ²+1)) + x/(σ²+1))
//! σ_up = √(σ_next² (σ² − σ_next²) / σ²),  σ_down = √(σ_next² − σ_up²)
//! x_next = x + (x − x̂0)/σ · (σ_down − σ) + σ_up · z,   z ~ N(0, 1) fresh each step
//! ```
//!
//! The σ of each timestep is interpolated linearly in the table `√((1−ᾱ)/ᾱ)` at (possibly
//! fractional) timesteps; the last σ is 0. Starting noise is scaled by `σ_max` (`linspace`,
//! `trailing`) or `√(σ_max² + 1)` (`leading`), as diffusers does.

use candle_core::Tensor;

use super::spacing::{arange, interp, linspace, round_even, TimestepSpacing};
use super::{divide, scale, DiffusionSampler, SamplerKind, StepNoise};
use crate::generate::schedule::SamplingSchedule;
use crate::models::noise::PredictionType;
use crate::Result;

/// Euler ancestral for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    /// One σ per timestep, then 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerAncestral {
    pub fn new(schedule: &SamplingSchedule, steps: usize) -> Self {
        let n = schedule.num_train_timesteps();
        let offset = schedule.config().steps_offset.unwrap_or(0) as f32;
        let spacing = SamplerKind::EulerAncestral.spacing(schedule);
        // diffusers keeps these timesteps in float32.
        let timesteps: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (n / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| round_even(i as f64 * ratio) as f32 + offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                arange(n as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| round_even(t) as f32 - 1.0)
                    .collect()
            }
        };
        let table: Vec<f64> = schedule.sigma_table().into_iter().map(f64::from).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(t as f64, &table) as f32)
            .collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0.0f32, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        EulerAncestral {
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            init_noise_sigma,
            prediction: schedule.prediction_type(),
        }
    }
}

impl DiffusionSampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        divide(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        step: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        let x0 = match self.prediction {
            PredictionType::Epsilon => (sample - scale(model_output, sigma)?)?,
            PredictionType::VPrediction => {
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                (scale(model_output, c_out)? + divide(sample, sigma * sigma + 1.0)?)?
            }
        };
        let sigma_from = sigma;
        let sigma_to = self.sigmas[step + 1];
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = divide(&(sample - x0)?, sigma)?;
        let dt = sigma_down - sigma;
        let next = (sample + scale(&derivative, dt)?)?;
        let z = noise.noise(step, sample)?;
        Ok((next + scale(&z, sigma_up)?)?)
    }
}
