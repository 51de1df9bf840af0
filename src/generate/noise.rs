//! The randomness of a picture, a function of its seed alone: the starting latent noise and the
//! ancestral sampler's fresh noise at each step, each from its own [`crate::rng`] stream keyed by
//! (seed, step, purpose). Drawn on the CPU and
//! moved to the device, so a seed gives the same picture on every device (up to the device's
//! arithmetic).

use candle_core::{Device, Tensor};

use super::samplers::StepNoise;
use crate::rng::{normal_f32, stream, Purpose};
use crate::Result;

/// Standard normal starting latents of shape `dims` for `seed` (f32 on `device`).
pub fn starting_noise(seed: u64, dims: &[usize], device: &Device) -> Result<Tensor> {
    let n = dims.iter().product();
    let values = normal_f32(&mut stream(seed, 0, 0, 0, Purpose::StartingNoise), n);
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?.to_device(device)?)
}

/// The ancestral sampler's noise for one picture: step `i` draws from stream `(seed, i)`.
#[derive(Debug, Clone, Copy)]
pub struct SeededStepNoise {
    pub seed: u64,
}

impl StepNoise for SeededStepNoise {
    fn noise(&mut self, step: usize, like: &Tensor) -> Result<Tensor> {
        let values = normal_f32(
            &mut stream(self.seed, step as u64, 0, 0, Purpose::StepNoise),
            like.elem_count(),
        );
        Ok(Tensor::from_vec(values, like.dims(), &Device::Cpu)?
            .to_device(like.device())?
            .to_dtype(like.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_depends_on_the_seed_and_the_step_only() -> Result<()> {
        let a = starting_noise(7, &[1, 4, 2, 2], &Device::Cpu)?;
        let b = starting_noise(7, &[1, 4, 2, 2], &Device::Cpu)?;
        let c = starting_noise(8, &[1, 4, 2, 2], &Device::Cpu)?;
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        let mut noise = SeededStepNoise { seed: 7 };
        let s0 = noise.noise(0, &a)?;
        let s1 = noise.noise(1, &a)?;
        assert_ne!(v(&s0), v(&s1));
        assert_ne!(v(&s0), v(&a), "step noise is not the starting noise");
        assert_eq!(v(&noise.noise(0, &a)?), v(&s0));
        Ok(())
    }
}
