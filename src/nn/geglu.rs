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

use crate::Result;

/// Whether the fused op serves `h`: f32 on the CPU with the custom ops switched on.
pub fn applies(h: &Tensor) -> bool {
    h.dtype() == DType::F32 && h.device().is_cpu() && super::frozen::enabled_here()
}

/// `h: [..., 2·inner]` → `h[..., :inner] · gelu(h[..., inner:])`, `[..., inner]`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let _t = super::profile::scope("geglu");
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
        h.apply_op1(Geglu)?
    } else {
        h.apply_op1_no_bwd(&Geglu)?
    })
}

/// Rows of `[a | g]` per parallel task (a few hundred KiB of activations).
const ROWS_PER_TASK: usize = 16;

struct Geglu;

struct GegluGrad;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!("{op}: f32 only"))),
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l, "geglu")?;
        let mut dims = l.dims().to_vec();
        let inner = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
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
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = super::profile::scope("geglu backward");
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(h.apply_op2_no_bwd(&grad, &GegluGrad)?))
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
        let h = f32_slice(s1, l1, "geglu backward")?;
        let dy = f32_slice(s2, l2, "geglu backward")?;
        let inner = l1.dims().last().copied().unwrap_or(0) / 2;
        if dy.len() * 2 != h.len() {
            return Err(candle_core::Error::Msg(format!(
                "geglu backward: gradient {:?} does not fit input {:?}",
                l2.dims(),
                l1.dims()
            )));
        }
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
}
