//! Group, layer and RMS normalisation (the first optionally followed by SiLU) as single custom
//! ops with an exact, hand-written backward, for frozen affine parameters on the CPU.
//!
//! Built from primitive ops (as [`super::norm`] does otherwise), a group norm + SiLU is about a
//! dozen full-size tensors in forward and more in backward, and the gradients candle computes
//! for the broadcast scale and shift stay in the `GradStore` until backward ends (DESIGN.md §7).
//! Here forward is one pass for the statistics and one for the output, and backward one pass per
//! group, keeping only the input and two numbers per group. The scale and shift are frozen: they
//! get no gradient (a trainable one keeps the primitive-op path, see [`applies`]).
//!
//! The norms are the same computation over contiguous segments: a group norm of `[B, C, H, W]`
//! normalises each sample's run of `C/G · H·W` values, a layer norm each row of `D` values. An
//! RMS norm (the language models') is a layer norm that neither subtracts the mean nor adds a
//! shift: `x · w / √(mean(x²) + ε)`, its backward without the mean's term. The statistics are
//! accumulated in f64.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::fast_math::{self, Param};
use crate::Result;

/// Whether the fused op serves this call: f32/f64 on the CPU, frozen affine parameters, and the
/// frozen-layer switch of [`super::frozen`] on.
pub fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == weight.dtype()
        && super::frozen::applies_to(x, weight, Some(bias))
}

/// Group norm of `x: [B, C, ...]` with `groups`, scale/shift `[C]`, then SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    let c = dims[1];
    let inner: usize = dims[2..].iter().product();
    let spec = Segments {
        len: c / groups * inner,
        groups,
        channels_per_group: c / groups,
        inner,
    };
    run(x, weight, bias, spec, eps, silu, false)
}

/// Whether [`rms_norm`] serves this call: f32/f64 on the CPU, a frozen scale, the frozen-layer
/// switch on.
pub fn rms_applies(x: &Tensor, weight: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == weight.dtype()
        && super::frozen::applies_to(x, weight, None)
}

/// RMS norm of `x: [..., D]` over the last dimension with scale `[D]`:
/// `x · w / √(mean(x²) + ε)`, computed as transformers' `LlamaRMSNorm` does in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let spec = Segments::rows(x.dim(candle_core::D::Minus1)?);
    let bias = weight.zeros_like()?;
    run(x, weight, &bias, spec, eps, false, true)
}

/// Layer norm of `x: [..., D]` over the last dimension with scale/shift `[D]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let spec = Segments::rows(x.dim(candle_core::D::Minus1)?);
    run(x, weight, bias, spec, eps, false, false)
}

/// How the input splits into normalised segments and which affine channel each value uses:
/// value `i` of segment `s` belongs to channel `(s mod groups) · channels_per_group + i / inner`.
#[derive(Debug, Clone, Copy)]
struct Segments {
    len: usize,
    groups: usize,
    channels_per_group: usize,
    inner: usize,
}

impl Segments {
    /// Each row of `d` values, with a parameter per value (layer and RMS norms).
    fn rows(d: usize) -> Self {
        Segments {
            len: d,
            groups: 1,
            channels_per_group: d,
            inner: 1,
        }
    }

    fn channel(&self, segment: usize, i: usize) -> usize {
        (segment % self.groups) * self.channels_per_group + i / self.inner
    }
}

fn run(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    spec: Segments,
    eps: f64,
    silu: bool,
    rms: bool,
) -> Result<Tensor> {
    let _t = super::profile::scope("norm");
    let to_f64 = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    let op = Norm {
        params: Arc::new(Params {
            spec,
            eps,
            silu,
            rms,
            weight32: weight
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            bias32: bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            weight: to_f64(weight)?,
            bias: to_f64(bias)?,
        }),
        stats: Arc::new(Mutex::new(Vec::new())),
    };
    let x = x.contiguous()?;
    Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?)
}

struct Params {
    spec: Segments,
    eps: f64,
    silu: bool,
    /// An RMS norm: no mean subtracted (the statistics are `(0, 1/√(mean(x²) + ε))`).
    rms: bool,
    weight: Vec<f64>,
    bias: Vec<f64>,
    /// The same in f32, for the vectorised f32 kernels.
    weight32: Vec<f32>,
    bias32: Vec<f32>,
}

/// Forward op; keeps `(mean, 1/σ)` per segment for its backward.
struct Norm {
    params: Arc<Params>,
    stats: Arc<Mutex<Vec<(f64, f64)>>>,
}

/// Backward op: `(x, dY) → dX`.
struct NormGrad {
    params: Arc<Params>,
    stats: Vec<(f64, f64)>,
}

/// The float types the kernels run on.
trait Real: Copy + Send + Sync + 'static {
    fn get(self) -> f64;
    fn put(v: f64) -> Self;
}

impl Real for f32 {
    fn get(self) -> f64 {
        f64::from(self)
    }
    fn put(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    fn get(self) -> f64 {
        self
    }
    fn put(v: f64) -> Self {
        v
    }
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

impl Params {
    /// The runs of one segment that share their scale and shift: `(start, len, w, b)`.
    fn runs(&self, segment: usize) -> Vec<(usize, usize, Param<'_>, Param<'_>)> {
        let Segments {
            len,
            groups,
            channels_per_group,
            inner,
        } = self.spec;
        let c0 = (segment % groups) * channels_per_group;
        if inner == 1 {
            let (w, b) = (&self.weight32[c0..], &self.bias32[c0..]);
            vec![(0, len, Param::PerValue(w), Param::PerValue(b))]
        } else {
            (0..channels_per_group)
                .map(|j| {
                    let c = c0 + j;
                    let (w, b) = (self.weight32[c], self.bias32[c]);
                    (j * inner, inner, Param::Const(w), Param::Const(b))
                })
                .collect()
        }
    }

    /// [`Params::forward`] for f32 with the vectorised kernels of [`fast_math`].
    fn forward_f32(&self, x: &[f32]) -> (Vec<f32>, Vec<(f64, f64)>) {
        let n = self.spec.len;
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![(0.0, 0.0); x.len() / n.max(1)];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(s, ((ys, xs), st))| {
                let (mean, var) = if self.rms {
                    let (_, squares) = fast_math::sum_and_squares(xs, 0.0);
                    (0.0, squares / n as f64)
                } else {
                    let shift = xs.first().copied().unwrap_or(0.0);
                    let (sum, squares) = fast_math::sum_and_squares(xs, shift);
                    let m = sum / n as f64;
                    let var = (squares / n as f64 - m * m).max(0.0);
                    (f64::from(shift) + m, var)
                };
                let rstd = 1.0 / (var + self.eps).sqrt();
                *st = (mean, rstd);
                for (start, len, w, b) in self.runs(s) {
                    let run = start..start + len;
                    let stats32 = (mean as f32, rstd as f32);
                    fast_math::norm_forward(
                        &xs[run.clone()],
                        stats32,
                        (w, b),
                        self.silu,
                        &mut ys[run],
                    );
                }
            });
        (y, stats)
    }

    /// [`Params::backward`] for f32 with the vectorised kernels of [`fast_math`].
    fn backward_f32(&self, x: &[f32], dy: &[f32], stats: &[(f64, f64)]) -> Vec<f32> {
        let n = self.spec.len;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
            .enumerate()
            .for_each(|(s, (dxs, (xs, dys)))| {
                let (mean, rstd) = stats[s];
                let stats32 = (mean as f32, rstd as f32);
                let (mut sum1, mut sum2) = (0.0, 0.0);
                for (start, len, w, b) in self.runs(s) {
                    let run = start..start + len;
                    let (a, c) = fast_math::norm_backward_sums(
                        (&xs[run.clone()], &dys[run.clone()]),
                        stats32,
                        (w, b),
                        self.silu,
                        &mut dxs[run],
                    );
                    sum1 += a;
                    sum2 += c;
                }
                let m1 = if self.rms { 0.0 } else { sum1 / n as f64 };
                let means = (m1 as f32, (sum2 / n as f64) as f32);
                fast_math::norm_backward_finish(xs, stats32, means, dxs);
            });
        dx
    }

    fn forward<T: Real>(&self, x: &[T]) -> (Vec<T>, Vec<(f64, f64)>) {
        let n = self.spec.len;
        let mut y = vec![T::put(0.0); x.len()];
        let mut stats = vec![(0.0, 0.0); x.len() / n.max(1)];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(s, ((ys, xs), st))| {
                let mean = if self.rms {
                    0.0
                } else {
                    xs.iter().map(|v| v.get()).sum::<f64>() / n as f64
                };
                let var = xs.iter().map(|v| (v.get() - mean).powi(2)).sum::<f64>() / n as f64;
                let rstd = 1.0 / (var + self.eps).sqrt();
                *st = (mean, rstd);
                for (i, (yv, xv)) in ys.iter_mut().zip(xs).enumerate() {
                    let c = self.spec.channel(s, i);
                    let out = (xv.get() - mean) * rstd * self.weight[c] + self.bias[c];
                    *yv = T::put(if self.silu { out * sigmoid(out) } else { out });
                }
            });
        (y, stats)
    }

    fn backward<T: Real>(&self, x: &[T], dy: &[T], stats: &[(f64, f64)]) -> Vec<T> {
        let n = self.spec.len;
        let mut dx = vec![T::put(0.0); x.len()];
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
            .enumerate()
            .for_each(|(s, (dxs, (xs, dys)))| {
                let (mean, rstd) = stats[s];
                // dx̂ = dY' · γ, with dY' the gradient before SiLU.
                let dxhat = |i: usize| -> (f64, f64) {
                    let c = self.spec.channel(s, i);
                    let xhat = (xs[i].get() - mean) * rstd;
                    let mut g = dys[i].get();
                    if self.silu {
                        let out = xhat * self.weight[c] + self.bias[c];
                        let sg = sigmoid(out);
                        g *= sg * (1.0 + out * (1.0 - sg));
                    }
                    (g * self.weight[c], xhat)
                };
                let (mut sum1, mut sum2) = (0.0, 0.0);
                for i in 0..n {
                    let (d, xhat) = dxhat(i);
                    sum1 += d;
                    sum2 += d * xhat;
                }
                let m1 = if self.rms { 0.0 } else { sum1 / n as f64 };
                let m2 = sum2 / n as f64;
                for (i, out) in dxs.iter_mut().enumerate() {
                    let (d, xhat) = dxhat(i);
                    *out = T::put(rstd * (d - m1 - xhat * m2));
                }
            });
        dx
    }
}

fn contiguous<'a, T>(v: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => Err(candle_core::Error::Msg(
            "fused norm: non-contiguous input".into(),
        )),
    }
}

fn unsupported() -> candle_core::Error {
    candle_core::Error::Msg("fused norm: f32 and f64 only".into())
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, stats) = match storage {
            CpuStorage::F32(v) => {
                let (y, s) = self.params.forward_f32(contiguous(v, layout)?);
                (CpuStorage::F32(y), s)
            }
            CpuStorage::F64(v) => {
                let (y, s) = self.params.forward(contiguous(v, layout)?);
                (CpuStorage::F64(y), s)
            }
            _ => return Err(unsupported()),
        };
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused norm: poisoned lock".into()))? = stats;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let _t = super::profile::scope("norm backward");
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused norm: poisoned lock".into()))?
            .clone();
        let op = NormGrad {
            params: self.params.clone(),
            stats,
        };
        let grad = grad.to_dtype(arg.dtype())?.contiguous()?;
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad, &op)?))
    }
}

impl CustomOp2 for NormGrad {
    fn name(&self) -> &'static str {
        "fused-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(self.params.backward_f32(
                contiguous(x, l1)?,
                contiguous(g, l2)?,
                &self.stats,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(self.params.backward(
                contiguous(x, l1)?,
                contiguous(g, l2)?,
                &self.stats,
            )),
            _ => return Err(unsupported()),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random_weights::randn;
    use crate::nn::gradcheck::GradCheck;
    use candle_core::{Var, D};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn reference_group_norm(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        groups: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let xg = x.reshape((dims[0], groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centered = xg.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(dims.as_slice())?;
        Ok(normed
            .broadcast_mul(&w.reshape((1, dims[1], 1, 1))?)?
            .broadcast_add(&b.reshape((1, dims[1], 1, 1))?)?)
    }

    #[test]
    fn group_norm_and_silu_match_the_definition_and_finite_differences() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x = Var::from_tensor(&randn(&mut rng, &[2, 6, 3, 4], 1.5, 0.3)?)?;
        let w = randn(&mut rng, &[6], 0.5, 1.0)?;
        let b = randn(&mut rng, &[6], 0.5, 0.0)?;
        let mix = randn(&mut rng, &[2, 6, 3, 4], 1.0, 0.0)?;
        for silu in [false, true] {
            let got = group_norm(x.as_tensor(), &w, &b, 3, 1e-5, silu)?;
            let mut want = reference_group_norm(x.as_tensor(), &w, &b, 3, 1e-5)?;
            if silu {
                want = want.silu()?;
            }
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "silu {silu}: {diff}");
            let loss = || -> Result<Tensor> {
                Ok((group_norm(x.as_tensor(), &w, &b, 3, 1e-5, silu)? * &mix)?.sum_all()?)
            };
            let check = GradCheck {
                samples: 16,
                ..GradCheck::default()
            };
            let failures = check.failures(loss, &[(format!("x (silu {silu})"), x.clone())])?;
            assert!(failures.is_empty(), "{failures:?}");
        }
        Ok(())
    }

    /// The f32 kernels against the f64 ones on the same values: group norm with and without
    /// SiLU (runs of 37 values, a tail past the 16 lanes) and layer norm (per-value scale).
    #[test]
    fn the_f32_kernels_match_the_f64_ones() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let check = |name: &str, f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor| -> Result<()> {
            let mix = randn(&mut ChaCha8Rng::seed_from_u64(1), x.dims(), 1.0, 0.0)?;
            let mut out = Vec::new();
            for dtype in [DType::F64, DType::F32] {
                let v = Var::from_tensor(&x.to_dtype(dtype)?)?;
                let y = f(v.as_tensor())?;
                let g = (&y * mix.to_dtype(dtype)?)?.sum_all()?.backward()?;
                let dx = g.get(v.as_tensor()).expect("dx").to_dtype(DType::F64)?;
                out.push((y.to_dtype(DType::F64)?, dx));
            }
            let d = |a: &Tensor, b: &Tensor| -> Result<f64> {
                Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
            };
            let (dy, dg) = (d(&out[0].0, &out[1].0)?, d(&out[0].1, &out[1].1)?);
            assert!(dy < 2e-5 && dg < 2e-4, "{name}: output {dy}, gradient {dg}");
            Ok(())
        };
        // An offset mean (5) and a spread of 2: the shifted sums must not cancel.
        let x = randn(&mut rng, &[2, 6, 37, 1], 2.0, 5.0)?;
        let (w, b) = (
            randn(&mut rng, &[6], 0.5, 1.0)?,
            randn(&mut rng, &[6], 0.5, 0.0)?,
        );
        for silu in [false, true] {
            let f = |x: &Tensor| -> Result<Tensor> {
                let (w, b) = (w.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
                group_norm(x, &w, &b, 2, 1e-5, silu)
            };
            check(&format!("group norm, silu {silu}"), &f, &x)?;
        }
        let x = randn(&mut rng, &[3, 4, 45], 1.0, -0.4)?;
        let (w, b) = (
            randn(&mut rng, &[45], 0.5, 1.0)?,
            randn(&mut rng, &[45], 0.5, 0.0)?,
        );
        let f = |x: &Tensor| -> Result<Tensor> {
            layer_norm(
                x,
                &f32(&w)?.to_dtype(x.dtype())?,
                &b.to_dtype(x.dtype())?,
                1e-5,
            )
        };
        check("layer norm", &f, &x)
    }

    /// RMS norm against its definition (f64) and finite differences; the f32 kernels against
    /// the f64 ones, rows of 45 values (a tail past the 16 lanes) with an offset mean.
    #[test]
    fn rms_norm_matches_the_definition_finite_differences_and_f64() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 45], 1.0, 0.7)?)?;
        let w = randn(&mut rng, &[45], 0.5, 1.0)?;
        let xt = x.as_tensor();
        let want = xt
            .broadcast_div(&(xt.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?
            .broadcast_mul(&w)?;
        let got = rms_norm(xt, &w, 1e-6)?;
        assert!((&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        let mix = randn(&mut rng, &[2, 3, 45], 1.0, 0.0)?;
        let loss = || -> Result<Tensor> { Ok((rms_norm(xt, &w, 1e-6)? * &mix)?.sum_all()?) };
        let check = GradCheck {
            samples: 16,
            ..GradCheck::default()
        };
        let failures = check.failures(loss, &[("x".to_string(), x.clone())])?;
        assert!(failures.is_empty(), "{failures:?}");
        let g64 = (&got * &mix)?.sum_all()?.backward()?;
        let dx64 = g64.get(xt).expect("dx").clone();
        let x32 = Var::from_tensor(&xt.to_dtype(DType::F32)?)?;
        let y32 = rms_norm(x32.as_tensor(), &w.to_dtype(DType::F32)?, 1e-6)?;
        let g32 = (&y32 * mix.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        let dx32 = g32.get(x32.as_tensor()).expect("dx").to_dtype(DType::F64)?;
        let dy = (y32.to_dtype(DType::F64)? - &got)?.abs()?.max_all()?;
        let dg = (dx32 - dx64)?.abs()?.max_all()?;
        let (dy, dg) = (dy.to_scalar::<f64>()?, dg.to_scalar::<f64>()?);
        assert!(dy < 2e-5 && dg < 2e-4, "f32: output {dy}, gradient {dg}");
        Ok(())
    }

    #[test]
    fn layer_norm_matches_the_definition_and_finite_differences() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 5], 1.0, -0.4)?)?;
        let w = randn(&mut rng, &[5], 0.5, 1.0)?;
        let b = randn(&mut rng, &[5], 0.5, 0.0)?;
        let got = layer_norm(x.as_tensor(), &w, &b, 1e-5)?;
        let xt = x.as_tensor();
        let mean = xt.mean_keepdim(D::Minus1)?;
        let centered = xt.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let want = centered
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&w)?
            .broadcast_add(&b)?;
        assert!((&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        let mix = randn(&mut rng, &[2, 3, 5], 1.0, 0.0)?;
        let loss = || -> Result<Tensor> {
            Ok((layer_norm(x.as_tensor(), &w, &b, 1e-5)? * &mix)?.sum_all()?)
        };
        let check = GradCheck {
            samples: 16,
            ..GradCheck::default()
        };
        let failures = check.failures(loss, &[("x".to_string(), x.clone())])?;
        assert!(failures.is_empty(), "{failures:?}");
        Ok(())
    }
}
