//! The samplers that turn noise into a latent image: DDIM (η = 0), Euler ancestral and DPM++ 2M,
//! each a port of the step maths of diffusers' scheduler of the same name (`DDIMScheduler`,
//! `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler` with `solver_order` 2,
//! `dpmsolver++`, `midpoint`, `lower_order_final`), tested against recorded diffusers
//! trajectories (`tools/make_sampler_fixtures.py`).
//!
//! A sampler is made for one number of steps. Its loop, with a model `ε_θ`:
//!
//! ```text
//! let mut x = unit_noise * sampler.init_noise_sigma();
//! for i in 0..sampler.timesteps().len() {
//!     let out = model(&sampler.scale_model_input(&x, i)?, sampler.timesteps()[i])?;
//!     x = sampler.step(i, &out, &x, &mut noise)?;
//! }
//! ```
//!
//! Scalars follow diffusers' f32 arithmetic; latents stay f32.

mod ddim;
mod dpmpp_2m;
mod euler_ancestral;
pub(crate) mod spacing;

use candle_core::Tensor;

pub use ddim::Ddim;
pub use dpmpp_2m::DpmPp2m;
pub use euler_ancestral::EulerAncestral;
pub use spacing::TimestepSpacing;

use super::schedule::{SamplerConfig, SamplingSchedule};
pub use crate::config::SamplerKind;
use crate::error::ModelError;
use crate::Result;

impl SamplerKind {
    /// The spacing diffusers' class uses when the scheduler config names none.
    pub fn default_spacing(self) -> TimestepSpacing {
        match self {
            SamplerKind::Ddim => TimestepSpacing::Leading,
            SamplerKind::EulerAncestral | SamplerKind::DpmPp2m => TimestepSpacing::Linspace,
        }
    }

    /// The spacing this sampler uses with `schedule`'s config.
    pub fn spacing(self, schedule: &SamplingSchedule) -> TimestepSpacing {
        self.spacing_for(schedule.config())
    }

    /// The spacing this sampler uses with the sampling keys `config`.
    pub fn spacing_for(self, config: &SamplerConfig) -> TimestepSpacing {
        config.timestep_spacing.unwrap_or(self.default_spacing())
    }

    /// A sampler of this kind for `steps` steps on `schedule`.
    pub fn build(
        self,
        schedule: &SamplingSchedule,
        steps: usize,
    ) -> Result<Box<dyn DiffusionSampler>> {
        check_steps(schedule, steps)?;
        Ok(match self {
            SamplerKind::Ddim => Box::new(Ddim::new(schedule, steps)),
            SamplerKind::EulerAncestral => Box::new(EulerAncestral::new(schedule, steps)),
            SamplerKind::DpmPp2m => Box::new(DpmPp2m::new(schedule, steps)),
        })
    }
}

/// Where the ancestral sampler's fresh noise comes from, one draw per step.
pub trait StepNoise {
    /// Standard normal noise of `like`'s shape (f32, on its device) for step `step`.
    fn noise(&mut self, step: usize, like: &Tensor) -> Result<Tensor>;
}

/// One sampler, set up for a number of steps.
pub trait DiffusionSampler: Send {
    /// The timesteps the model is evaluated at, in order (fractional for Euler with
    /// `linspace`).
    fn timesteps(&self) -> &[f64];

    /// The factor unit noise is scaled by to make the first sample (1 for samplers that work
    /// on the unscaled sample, as DDIM and DPM++ do).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The model's input at step `step` for the sample `sample` (the sample itself unless the
    /// sampler scales it, as Euler's do).
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// The sample after step `step`, from the model's (guided) output at that step. Steps must
    /// be taken in order, once each (multistep samplers remember earlier outputs).
    fn step(
        &mut self,
        step: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor>;
}

fn check_steps(schedule: &SamplingSchedule, steps: usize) -> Result<()> {
    let n = schedule.num_train_timesteps();
    if steps == 0 || steps > n {
        return Err(ModelError::InvalidConfig {
            origin: "steps".to_string(),
            message: format!(
                "{steps} sampling steps; the model was trained on {n} timesteps, so use 1..={n}"
            ),
        }
        .into());
    }
    Ok(())
}

/// `x / a`, dividing as torch does (not multiplying by the reciprocal, which can differ in the
/// last bit).
pub(crate) fn divide(x: &Tensor, a: f32) -> Result<Tensor> {
    let a = Tensor::new(&[a], x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&a)?)
}

/// `x · a` in `x`'s dtype (`a` an f32 scalar, as torch multiplies by a 0-dim f32 tensor).
pub(crate) fn scale(x: &Tensor, a: f32) -> Result<Tensor> {
    Ok(x.affine(a as f64, 0.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        for kind in SamplerKind::ALL {
            assert_eq!(kind.as_str().parse::<SamplerKind>(), Ok(kind));
            assert_eq!(kind.a1111_name().parse::<SamplerKind>(), Ok(kind));
        }
        assert_eq!("k_euler_a".parse(), Ok(SamplerKind::EulerAncestral));
        assert_eq!("dpmsolver++".parse(), Ok(SamplerKind::DpmPp2m));
        let err = "lms".parse::<SamplerKind>().unwrap_err();
        assert!(err.contains("`lms`") && err.contains("euler_a"), "{err}");
    }
}
