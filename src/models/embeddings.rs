//! Timestep embeddings: the sinusoidal features of the diffusion timestep and the MLP
//! (`time_embedding.linear_1/2`) that turns them into the vector every resnet receives.

use candle_core::{DType, Tensor};

use crate::nn::{activation, Linear, Scope};
use crate::Result;

/// Sinusoidal features of `timesteps` as diffusers' `get_timestep_embedding` computes them
/// (in f32, with the same order of operations, so a float timestep gives the same bits).
///
/// `timesteps: [B]` of any numeric dtype → `[B, dim]` f32: `[sin | cos]` of `t · f_i` with
/// `f_i = exp(−ln(10000) · i / (dim/2 − freq_shift))`, swapped to `[cos | sin]` when
/// `flip_sin_to_cos`, zero-padded when `dim` is odd.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let denominator = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_period * i as f32 / denominator).exp())
        .collect();
    let device = timesteps.device();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)?
    } else {
        Tensor::cat(&[&sin, &cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// `in_features` sinusoidal features → `embed_dim`; reads `linear_1` and `linear_2`.
    pub fn new(scope: Scope, in_features: usize, embed_dim: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(scope.pp("linear_1"), in_features, embed_dim, true)?,
            linear_2: Linear::new(scope.pp("linear_2"), embed_dim, embed_dim, true)?,
        })
    }

    /// `features: [B, in_features]` → `[B, embed_dim]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let h = activation::silu(&self.linear_1.forward(features)?)?;
        self.linear_2.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn features_follow_the_diffusers_formula() -> Result<()> {
        let t = Tensor::new(&[0i64, 10, 999], &Device::Cpu)?;
        let (dim, shift) = (8usize, 1.0);
        let got = timestep_features(&t, dim, true, shift)?.to_vec2::<f32>()?;
        let half = dim / 2;
        for (row, &tv) in got.iter().zip([0f64, 10., 999.].iter()) {
            for i in 0..half {
                let f = (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp();
                // flip_sin_to_cos: cos first.
                assert!(
                    (row[i] as f64 - (tv * f).cos()).abs() < 1e-3,
                    "cos {i} at t={tv}"
                );
                assert!(
                    (row[half + i] as f64 - (tv * f).sin()).abs() < 1e-3,
                    "sin {i} at t={tv}"
                );
            }
        }
        let unflipped = timestep_features(&t, dim, false, shift)?.to_vec2::<f32>()?;
        assert_eq!(unflipped[2][0], got[2][half]);
        let odd = timestep_features(&t, 5, false, 0.0)?;
        assert_eq!(odd.dims(), &[3, 5]);
        assert_eq!(odd.to_vec2::<f32>()?[2][4], 0.0);
        Ok(())
    }
}
