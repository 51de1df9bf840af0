//! Rotary position embeddings (RoPE) applied to the heads of a projection's output in place of
//! layout, `[B, T, heads·d]`, as one pass forward and one backward.
//!
//! transformers rotates `[B, heads, T, d]` tensors as `x·cos + rotate_half(x)·sin`: two halves
//! narrowed, one negated, concatenated, two broadcast products and a sum, each a full-size
//! tensor kept or streamed through memory, and the transposed copies around them. The rotation
//! is the same per pair of channels `(i, i + d/2)`: `(x₁, x₂) → (x₁·c − x₂·s, x₂·c + x₁·s)` with
//! `c, s` the cosine and sine of position × frequency `i`. It is orthogonal, so its backward is
//! the rotation by the opposite angle (`s → −s`) of the output's gradient, and nothing is kept.
//! On the CPU in f32/f64 that is a custom op; elsewhere (CUDA, half precision) the same formula
//! from candle ops, whose backward candle derives.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::dense::slice;
use crate::Result;

/// The cosines and sines of positions `start..start + len` times each frequency, `[len, d/2]`.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    half: usize,
    len: usize,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

impl RotaryTable {
    /// `inv_freq`: one frequency per pair of a head's channels (`d/2` of them). Angles are
    /// `position · frequency` in f32, as transformers computes them.
    pub fn new(inv_freq: &[f32], start: usize, len: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for t in start..start + len {
            for f in inv_freq {
                let angle = t as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RotaryTable {
            half,
            len,
            cos: Arc::new(cos),
            sin: Arc::new(sin),
        }
    }

    /// The number of positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `x: [B, T, heads·d]` (T the table's length, d twice its frequencies) → the same shape, each
    /// head rotated by its position's angles.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, t, width) = x.dims3()?;
        let d = 2 * self.half;
        if t != self.len || d == 0 || width % d != 0 {
            return Err(candle_core::Error::Msg(format!(
                "rotary: input {:?} does not fit {} positions of {d}-channel heads",
                x.dims(),
                self.len
            ))
            .into());
        }
        let _t = super::profile::scope("rotary");
        if matches!(x.dtype(), DType::F32 | DType::F64)
            && x.device().is_cpu()
            && super::frozen::cpu_kernels_here()
        {
            let op = Rotate {
                table: self.clone(),
                inverse: false,
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        self.with_candle_ops(x)
    }

    /// The same rotation from candle ops (any device and dtype): `x·cos + rotate_half(x)·sin`
    /// per head, `cos`/`sin` in `x`'s dtype.
    fn with_candle_ops(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let (half, d) = (self.half, 2 * self.half);
        let table = |values: &[f32]| -> Result<Tensor> {
            let doubled: Vec<f32> = values
                .chunks_exact(half)
                .flat_map(|row| row.iter().chain(row.iter()).copied())
                .collect();
            Ok(Tensor::from_vec(doubled, (t, 1, d), x.device())?.to_dtype(x.dtype())?)
        };
        let (cos, sin) = (table(&self.cos)?, table(&self.sin)?);
        let x4 = x.reshape((b, t, width / d, d))?;
        let first = x4.narrow(3, 0, half)?;
        let second = x4.narrow(3, half, half)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], 3)?;
        let y = (x4.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        Ok(y.reshape((b, t, width))?)
    }
}

/// The CPU op: the rotation, or (`inverse`) the rotation by the opposite angles.
struct Rotate {
    table: RotaryTable,
    inverse: bool,
}

impl Rotate {
    fn run<T: candle_core::WithDType + Send + Sync>(&self, x: &[T], layout: &Layout) -> Vec<T> {
        let (half, t) = (self.table.half, self.table.len);
        let width = layout.dims().last().copied().unwrap_or(0);
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(width.max(1))
            .zip(x.par_chunks(width.max(1)))
            .enumerate()
            .for_each(|(row, (ys, xs))| {
                let pos = row % t.max(1);
                let cos = &self.table.cos[pos * half..][..half];
                let sin = &self.table.sin[pos * half..][..half];
                for (yh, xh) in ys.chunks_exact_mut(2 * half).zip(xs.chunks_exact(2 * half)) {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        let c = T::from_f64(f64::from(cos[i]));
                        let s = T::from_f64(sign * f64::from(sin[i]));
                        let (a, b) = (x1[i], x2[i]);
                        y1[i] = a * c - b * s;
                        y2[i] = b * c + a * s;
                    }
                }
            });
        y
    }
}

impl CustomOp1 for Rotate {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(slice(s, l, "rotary")?, l)),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(slice(s, l, "rotary")?, l)),
            _ => {
                return Err(candle_core::Error::Msg(
                    "rotary: the CPU op takes f32 or f64".into(),
                ))
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _t = super::profile::scope("rotary backward");
        let op = Rotate {
            table: self.table.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random_weights::randn;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The CPU op against the formula from candle ops (values and input gradients), in f64 and
    /// f32, with positions that start past 0 (a continuation).
    #[test]
    fn the_op_matches_the_formula_and_its_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let inv_freq = [1.0f32, 0.1, 0.01];
        let table = RotaryTable::new(&inv_freq, 3, 5);
        let x = randn(&mut rng, &[2, 5, 12], 1.0, 0.0)?;
        let mix = randn(&mut rng, &[2, 5, 12], 1.0, 0.0)?;
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let v = Var::from_tensor(&x.to_dtype(dtype)?)?;
            let mix = mix.to_dtype(dtype)?;
            let got = table.apply(v.as_tensor())?;
            let want = table.with_candle_ops(v.as_tensor())?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                Ok((a - b)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?)
            };
            assert!(diff(&got, &want)? < tol, "{dtype:?} output");
            let g = (&got * &mix)?.sum_all()?.backward()?;
            let gw = (&want * &mix)?.sum_all()?.backward()?;
            let (a, b) = (g.get(v.as_tensor()), gw.get(v.as_tensor()));
            assert!(
                diff(a.expect("dx"), b.expect("dx"))? < tol,
                "{dtype:?} gradient"
            );
        }
        // Position 3, frequency 1: the first pair of head 0 turns by 3 radians.
        let got = table.apply(&x)?.to_vec3::<f64>()?;
        let xs = x.to_vec3::<f64>()?;
        let (a, b) = (xs[0][0][0], xs[0][0][3]);
        let (c, s) = (f64::from(3f32.cos()), f64::from(3f32.sin()));
        assert!((got[0][0][0] - (a * c - b * s)).abs() < 1e-6);
        assert!((got[0][0][3] - (b * c + a * s)).abs() < 1e-6);
        let err = table.apply(&x.narrow(1, 0, 4)?).unwrap_err().to_string();
        assert!(err.contains("does not fit 5 positions"), "{err}");
        Ok(())
    }
}
