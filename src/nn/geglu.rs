//! GEGLU (`a · gelu(g)` with `[a | g]` the two halves of the last dimension) as one custom op
//! on the CPU in f32, forward and backward each a single pass.
//!
//! From candle ops, GEGLU is two strided narrows, `gelu_erf` (a scalar libm `erf` per element)
//! and a product; backward rebuilds the GELU's derivative from several more full-size ops and
//! pads each half's gradient to the full width (two `[.., 2·inner]` tensors, then their sum).
//! The feed-forward of every SD transformer block runs it on its widest activation
//! (`[B, N, 2·4·dim]`). Here forward writes `[.., inner]` once and backward writes `[.., 2·inner]`
//! once, with the vectorised `erf` and `exp` of [`super::fast_math`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::dense::{self, slice, with_slice, Start};
use crate::Result;

/// Whether the fused op serves `h`: f32 on the CPU with the custom ops switched on.
pub fn applies(h: &Tensor) -> bool {
    h.dtype() == DType::F32 && h.device().is_cpu() && super::frozen::cpu_kernels_here()
}

/// Whether [`geglu_generic`] serves `h`: a CPU or CUDA float tensor, the custom ops on.
pub fn generic_applies(h: &Tensor) -> bool {
    (h.device().is_cpu() || h.device().is_cuda())
        && matches!(
            h.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
        && super::frozen::enabled_here()
}

/// GEGLU from candle ops with our own backward, for CUDA and half precision (where [`geglu`]
/// does not run): `h: [..., 2·inner]` → `[..., inner]`. Only `h` is kept for backward (candle's
/// own ops keep the gate, its GELU and more); backward is `d a = dY · gelu(g)`,
/// `d g = dY · a · (Φ(g) + g · φ(g))`, computed in f32 at least.
pub fn geglu_generic(h: &Tensor) -> Result<Tensor> {
    let last = h.rank().saturating_sub(1);
    let width = h.dim(last)?;
    if width % 2 != 0 {
        return Err(candle_core::Error::Msg(format!(
            "geglu: the last dimension of {:?} is odd",
            h.dims()
        ))
        .into());
    }
    let inner = width / 2;
    let hd = h.detach();
    let y = geglu_value(&hd, inner)?;
    super::custom_backward::attach(
        "geglu",
        h,
        y,
        Box::new(move |grad| geglu_input_grad(&hd, grad, inner)),
    )
}

/// `h[..., :inner] · gelu(h[..., inner:])` from candle ops (nothing recorded on a detached `h`).
fn geglu_value(h: &Tensor, inner: usize) -> Result<Tensor> {
    let last = h.rank() - 1;
    Ok((h.narrow(last, 0, inner)? * h.narrow(last, inner, inner)?.gelu_erf()?)?)
}

/// GEGLU's input gradient from its output's, `h`'s dtype, computed in f32 at least:
/// `d a = dY · gelu(g)`, `d g = dY · a · (Φ(g) + g · φ(g))`.
fn geglu_input_grad(h: &Tensor, grad: &Tensor, inner: usize) -> Result<Tensor> {
    let last = h.rank() - 1;
    let dtype = h.dtype();
    let work = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let a = h.narrow(last, 0, inner)?.to_dtype(work)?;
    let g = h.narrow(last, inner, inner)?.to_dtype(work)?;
    let dy = grad.to_dtype(work)?;
    let cdf = (((&g * std::f64::consts::FRAC_1_SQRT_2)?.erf()? * 0.5)? + 0.5)?;
    let pdf = ((g.sqr()? * -0.5)?.exp()?
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    let da = (&dy * (&g * &cdf)?)?;
    let dg = ((&dy * &a)? * (cdf + (&g * pdf)?)?)?;
    Ok(Tensor::cat(&[da, dg], last)?.to_dtype(dtype)?)
}

/// `(out, inner)` of the next layer's `weight` `[out, inner]`, when `h`'s last axis is the
/// `2 · inner` GEGLU halves it reads.
fn fitting_shapes(h: &Tensor, weight: &Tensor) -> Result<(usize, usize)> {
    let (out, inner) = weight.dims2()?;
    if h.dim(candle_core::D::Minus1)? != 2 * inner {
        return Err(candle_core::Error::Msg(format!(
            "geglu: input {:?} does not fit the next layer's weight {:?}",
            h.dims(),
            weight.dims()
        ))
        .into());
    }
    Ok((out, inner))
}

/// [`geglu_generic`] followed by a frozen linear layer (`W: [out, inner]`) and, with a
/// `residual`, the sum, in one node: as [`geglu_linear`] does on the CPU, the GEGLU output is
/// not kept for backward (`dG = dY W`, then GEGLU's input gradient from `h`). For CUDA and half
/// precision.
pub fn geglu_linear_generic(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (out, inner) = fitting_shapes(h, weight)?;
    let hd = h.detach();
    let mut y = super::frozen::linear_plain(&geglu_value(&hd, inner)?, weight, bias)?;
    if let Some(r) = residual {
        y = (y + r.detach())?;
    }
    let w = weight.clone();
    let input_grad = move |grad: &Tensor| -> Result<Tensor> {
        let rows = grad.elem_count() / out.max(1);
        let mut dims = hd.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        let dg = grad
            .reshape((rows, out))?
            .matmul(&w)?
            .reshape(dims.as_slice())?;
        geglu_input_grad(&hd, &dg, inner)
    };
    match residual {
        None => super::custom_backward::attach("geglu + frozen linear", h, y, Box::new(input_grad)),
        Some(r) => {
            let want = [h.track_op(), r.track_op()];
            super::custom_backward::attach2(
                "geglu + frozen linear + residual",
                [h, r],
                y,
                Box::new(move |grad| {
                    let dh = if want[0] {
                        Some(input_grad(grad)?)
                    } else {
                        None
                    };
                    Ok([dh, want[1].then(|| grad.clone())])
                }),
            )
        }
    }
}

/// `h: [..., 2·inner]` → `h[..., :inner] · gelu(h[..., inner:])`, `[..., inner]`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let _t = super::profile::scope("geglu");
    run(h, Geglu { then: None })
}

/// GEGLU followed by a frozen linear layer (`W: [out, inner]`, f32, see
/// [`super::frozen::applies_to`]) in one op: `h: [..., 2·inner]` → `[..., out]`. The GEGLU
/// output, which the linear layer's backward does not need, is not kept for backward (the
/// separate ops keep it, `[..., 4·dim]` per transformer block).
///
/// With a `residual` (the output's shape) the result is added to it in the same op.
pub fn geglu_linear(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let _t = super::profile::scope("geglu + frozen linear");
    let (out, _) = fitting_shapes(h, weight)?;
    let then = Then {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        out,
    };
    let op = Geglu { then: Some(then) };
    match residual {
        None => run(h, op),
        Some(r) => {
            let mut dims = h.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = out;
            }
            if r.dims() != dims.as_slice() || r.dtype() != DType::F32 {
                return Err(candle_core::Error::Msg(format!(
                    "geglu: residual {:?} ({:?}) does not match the output {dims:?} (F32)",
                    r.dims(),
                    r.dtype()
                ))
                .into());
            }
            let (h, r) = (h.contiguous()?, r.contiguous()?);
            Ok(if h.track_op() || r.track_op() {
                h.apply_op2(&r, GegluResidual(op))?
            } else {
                h.apply_op2_no_bwd(&r, &GegluResidual(op))?
            })
        }
    }
}

fn run(h: &Tensor, op: Geglu) -> Result<Tensor> {
    let width = h.dim(candle_core::D::Minus1)?;
    if width % 2 != 0 {
        return Err(candle_core::Error::Msg(format!(
            "geglu: last dimension {width} is odd ({:?})",
            h.dims()
        ))
        .into());
    }
    let h = h.contiguous()?;
    Ok(if h.track_op() {
        h.apply_op1(op)?
    } else {
        h.apply_op1_no_bwd(&op)?
    })
}

/// Rows of `[a | g]` per parallel task (a few hundred KiB of activations).
const ROWS_PER_TASK: usize = 16;

/// GEGLU of every row of `h: [rows, 2·inner]` → `[rows, inner]`.
fn forward_rows(h: &[f32], inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; h.len() / 2];
    if inner > 0 {
        out.par_chunks_mut(inner * ROWS_PER_TASK)
            .zip(h.par_chunks(2 * inner * ROWS_PER_TASK))
            .for_each(|(out, h)| {
                for (o, h) in out.chunks_exact_mut(inner).zip(h.chunks_exact(2 * inner)) {
                    let (a, g) = h.split_at(inner);
                    super::fast_math::geglu(a, g, o);
                }
            });
    }
    out
}

/// The gradient `[rows, 2·inner]` with respect to `h` from the output's `dy: [rows, inner]`.
fn backward_rows(h: &[f32], dy: &[f32], inner: usize) -> Vec<f32> {
    let mut dh = vec![0f32; h.len()];
    if inner > 0 {
        dh.par_chunks_mut(2 * inner * ROWS_PER_TASK)
            .zip(h.par_chunks(2 * inner * ROWS_PER_TASK))
            .zip(dy.par_chunks(inner * ROWS_PER_TASK))
            .for_each(|((dh, h), dy)| {
                for ((dh, h), dy) in dh
                    .chunks_exact_mut(2 * inner)
                    .zip(h.chunks_exact(2 * inner))
                    .zip(dy.chunks_exact(inner))
                {
                    let (a, g) = h.split_at(inner);
                    let (da, dg) = dh.split_at_mut(inner);
                    super::fast_math::geglu_backward(a, g, dy, da, dg);
                }
            });
    }
    dh
}

/// The GEGLU op, optionally followed by a frozen linear layer.
struct Geglu {
    then: Option<Then>,
}

/// A frozen linear layer after the GEGLU: `W: [out, inner]`, bias `[out]`.
#[derive(Clone)]
struct Then {
    weight: Tensor,
    bias: Option<Tensor>,
    out: usize,
}

impl Then {
    fn forward(&self, g: &[f32], residual: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let run = |w: &[f32], bias: Option<&[f32]>| {
            dense::linear_from(g, w, Start { bias, residual }, self.out)
        };
        dense::with_weight(&self.weight, "geglu", |w| match &self.bias {
            Some(bias) => with_slice(bias, "geglu", |b| Ok(run(w, Some(b)))),
            None => Ok(run(w, None)),
        })
    }

    fn input_grad(&self, dy: &[f32]) -> candle_core::Result<Vec<f32>> {
        dense::with_weight(&self.weight, "geglu", |w| {
            Ok(dense::linear_input_grad(dy, w, self.out))
        })
    }
}

struct GegluGrad {
    then: Option<Then>,
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice::<f32>(s, l, "geglu")?;
        let mut dims = l.dims().to_vec();
        let inner = dims.last().copied().unwrap_or(0) / 2;
        let (out, width) = self.forward(h, inner, None)?;
        if let Some(last) = dims.last_mut() {
            *last = width;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.input_grad(h, grad).map(Some)
    }
}

impl Geglu {
    /// The output values and their last dimension's width, added to `residual` if given.
    fn forward(
        &self,
        h: &[f32],
        inner: usize,
        residual: Option<&[f32]>,
    ) -> candle_core::Result<(Vec<f32>, usize)> {
        let g = forward_rows(h, inner);
        Ok(match &self.then {
            Some(then) => (then.forward(&g, residual)?, then.out),
            None => (g, inner),
        })
    }

    fn input_grad(&self, h: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let _t = super::profile::scope("geglu backward");
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let op = GegluGrad {
            then: self.then.clone(),
        };
        h.apply_op2_no_bwd(&grad, &op)
    }
}

/// GEGLU and its linear layer added to a residual, as one op on `(h, r)`; `dR = dY`.
struct GegluResidual(Geglu);

impl CustomOp2 for GegluResidual {
    fn name(&self) -> &'static str {
        "geglu-linear-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice::<f32>(s1, l1, "geglu")?;
        let r = slice::<f32>(s2, l2, "geglu")?;
        let inner = l1.dims().last().copied().unwrap_or(0) / 2;
        let (out, _) = self.0.forward(h, inner, Some(r))?;
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dh = if h.track_op() {
            Some(self.0.input_grad(h, grad)?)
        } else {
            None
        };
        Ok((dh, Some(grad.to_dtype(DType::F32)?)))
    }
}

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice::<f32>(s1, l1, "geglu backward")?;
        let dy = slice::<f32>(s2, l2, "geglu backward")?;
        let inner = l1.dims().last().copied().unwrap_or(0) / 2;
        let dg;
        let dy = match &self.then {
            Some(then) => {
                dg = then.input_grad(dy)?;
                &dg[..]
            }
            None => dy,
        };
        if dy.len() * 2 != h.len() {
            return Err(candle_core::Error::Msg(format!(
                "geglu backward: gradient {:?} does not fit input {:?}",
                l2.dims(),
                l1.dims()
            )));
        }
        let dh = backward_rows(h, dy, inner);
        Ok((CpuStorage::F32(dh), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random_weights::randn;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn fused_geglu_equals_candle_ops_and_their_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // 37 rows: more than one task, the last one short.
        let h = randn(&mut rng, &[37, 2 * 24], 3.0, 0.0)?.to_dtype(DType::F32)?;
        let h = Var::from_tensor(&h)?;
        let mix = randn(&mut rng, &[37, 24], 1.0, 0.0)?.to_dtype(DType::F32)?;
        let want = {
            let h = h.as_tensor();
            (h.narrow(1, 0, 24)? * h.narrow(1, 24, 24)?.gelu_erf()?)?
        };
        let got = geglu(h.as_tensor())?;
        assert_eq!(got.dims(), [37, 24]);
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let g_want = (&want * &mix)?.sum_all()?.backward()?;
        let g_got = (&got * &mix)?.sum_all()?.backward()?;
        let (a, b) = (
            g_got.get(h.as_tensor()).expect("dh"),
            g_want.get(h.as_tensor()).expect("dh"),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        Ok(())
    }

    #[test]
    fn generic_geglu_equals_candle_ops_and_their_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let h = Var::from_tensor(&randn(&mut rng, &[2, 5, 2 * 6], 3.0, 0.0)?)?;
        let mix = randn(&mut rng, &[2, 5, 6], 1.0, 0.0)?;
        // The reference: GEGLU from primitive ops with the exact GELU slope (through `erf`).
        let want = {
            let h = h.as_tensor();
            (h.narrow(2, 0, 6)? * super::super::activation::gelu(&h.narrow(2, 6, 6)?)?)?
        };
        assert!(generic_applies(h.as_tensor()));
        let got = geglu_generic(h.as_tensor())?;
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-14, "forward differs by {diff}");
        let g_want = (&want * &mix)?.sum_all()?.backward()?;
        let g_got = (&got * &mix)?.sum_all()?.backward()?;
        let (a, b) = (
            g_got.get(h.as_tensor()).expect("dh"),
            g_want.get(h.as_tensor()).expect("dh"),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "gradient differs by {diff}");
        assert!(geglu_generic(&Tensor::zeros(
            (2, 3),
            DType::F32,
            &candle_core::Device::Cpu
        )?)
        .is_err());
        Ok(())
    }

    #[test]
    fn geglu_then_linear_equals_the_two_ops() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        let h = Var::from_tensor(&f32(randn(&mut rng, &[2, 19, 2 * 12], 2.0, 0.0)?)?)?;
        let weight = f32(randn(&mut rng, &[7, 12], 1.0, 0.0)?)?;
        let bias = f32(randn(&mut rng, &[7], 1.0, 0.0)?)?;
        let mix = f32(randn(&mut rng, &[2, 19, 7], 1.0, 0.0)?)?;
        let r = Var::from_tensor(&f32(randn(&mut rng, &[2, 19, 7], 1.0, 0.0)?)?)?;
        let got = geglu_linear(h.as_tensor(), &weight, Some(&bias), Some(r.as_tensor()))?;
        let want =
            (crate::nn::frozen::linear_plain(&geglu(h.as_tensor())?, &weight, Some(&bias))?
                + r.as_tensor())?;
        assert_eq!(got.dims(), [2, 19, 7]);
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let g_got = (&got * &mix)?.sum_all()?.backward()?;
        let g_want = (&want * &mix)?.sum_all()?.backward()?;
        let (a, b) = (
            g_got.get(h.as_tensor()).expect("dh"),
            g_want.get(h.as_tensor()).expect("dh"),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        let (a, b) = (
            g_got.get(r.as_tensor()).expect("dr"),
            g_want.get(r.as_tensor()).expect("dr"),
        );
        assert!(
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6,
            "residual gradient"
        );
        Ok(())
    }

    #[test]
    fn generic_geglu_then_linear_equals_the_two_generic_ops() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let h = Var::from_tensor(&randn(&mut rng, &[2, 9, 2 * 6], 2.0, 0.0)?)?;
        let weight = randn(&mut rng, &[5, 6], 1.0, 0.0)?;
        let bias = randn(&mut rng, &[5], 1.0, 0.0)?;
        let mix = randn(&mut rng, &[2, 9, 5], 1.0, 0.0)?;
        let r = Var::from_tensor(&randn(&mut rng, &[2, 9, 5], 1.0, 0.0)?)?;
        for residual in [Some(r.as_tensor()), None] {
            let got = geglu_linear_generic(h.as_tensor(), &weight, Some(&bias), residual)?;
            let mut want = crate::nn::frozen::linear_plain(
                &geglu_generic(h.as_tensor())?,
                &weight,
                Some(&bias),
            )?;
            if let Some(r) = residual {
                want = (want + r)?;
            }
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "forward differs by {diff}");
            let g_got = (&got * &mix)?.sum_all()?.backward()?;
            let g_want = (&want * &mix)?.sum_all()?.backward()?;
            let grad =
                |g: &candle_core::backprop::GradStore, v: &Var| g.get(v.as_tensor()).cloned();
            let diff = (grad(&g_got, &h).expect("dh") - grad(&g_want, &h).expect("dh"))?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-12, "gradient differs by {diff}");
            if residual.is_some() {
                let d = (grad(&g_got, &r).expect("dr") - grad(&g_want, &r).expect("dr"))?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert!(d < 1e-12, "residual gradient differs by {d}");
            }
        }
        Ok(())
    }
}
