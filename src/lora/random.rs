//! Every random number of the LoRA layers, from generators we seed ourselves.
//!
//! A generator is derived from the run's seed, the module's name and a purpose (initialisation,
//! or the dropout masks of one micro-batch of one step), never from a global or device RNG. So
//! the initial weights do not depend on the order layers are built in, a recomputed forward pass
//! draws the same masks, and a resumed run is bit-identical to an uninterrupted one.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// SplitMix64's finaliser: a well-mixed 64-bit value from any input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of a module name (FNV-1a, then mixed).
pub fn name_hash(name: &str) -> u64 {
    let h = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    mix(h)
}

/// The generator for `parts` (seed, module hash, purpose, step...), each folded in turn.
pub fn generator(parts: &[u64]) -> ChaCha8Rng {
    let seed = parts.iter().fold(0u64, |acc, &p| mix(acc ^ mix(p)));
    ChaCha8Rng::seed_from_u64(seed)
}

/// What a generator is for.
pub mod purpose {
    pub const INIT: u64 = 1;
    pub const DROPOUT: u64 = 2;
}

/// Uniform values in `[-bound, bound)` of `shape`, as `dtype` on `device`.
pub fn uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    bound: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// torch's `kaiming_uniform_(w, a = √5)`, the default init of nn.Linear/nn.Conv2d that kohya and
/// PEFT use for `lora_down`: gain √(2 / (1 + a²)) = √(1/3), bound = gain · √3 / √fan_in =
/// 1 / √fan_in, with fan_in = the product of every dimension but the first.
pub fn kaiming_uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let fan_in: usize = shape.iter().skip(1).product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    uniform(rng, shape, bound, dtype, device)
}

/// An inverted-dropout mask: each element is 0 with probability `p`, else `1 / (1 − p)`.
pub fn keep_mask(
    rng: &mut ChaCha8Rng,
    shape: impl Into<Shape>,
    p: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let keep = (1.0 / (1.0 - p)) as f32;
    // One 32-bit draw per element (masks can be large): dropped when below p · 2³².
    let threshold = (p * 4_294_967_296.0) as u64;
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            if u64::from(rng.random::<u32>()) < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_reproducible_and_distinct() {
        let a: u64 = generator(&[1, 2, 3]).random();
        let b: u64 = generator(&[1, 2, 3]).random();
        let c: u64 = generator(&[1, 2, 4]).random();
        let d: u64 = generator(&[2, 1, 3]).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d, "the order of the parts matters");
        assert_ne!(name_hash("a_b"), name_hash("a.b"));
    }

    #[test]
    fn kaiming_bound_is_one_over_sqrt_fan_in() -> Result<()> {
        let mut rng = generator(&[7]);
        let w = kaiming_uniform(&mut rng, &[64, 16, 3, 3], DType::F64, &Device::Cpu)?;
        let v = w.flatten_all()?.to_vec1::<f64>()?;
        let bound = 1.0 / 144f64.sqrt();
        assert!(v.iter().all(|x| x.abs() <= bound));
        let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(max > 0.95 * bound, "uses the whole range: {max} vs {bound}");
        Ok(())
    }

    #[test]
    fn keep_masks_drop_about_p_and_rescale() -> Result<()> {
        let mut rng = generator(&[9]);
        let m = keep_mask(&mut rng, 10_000, 0.25, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?;
        let zeros = m.iter().filter(|&&x| x == 0.0).count();
        assert!((2300..2700).contains(&zeros), "{zeros}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 4.0 / 3.0).abs() < 1e-6));
        Ok(())
    }
}
