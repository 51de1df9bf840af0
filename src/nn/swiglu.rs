//! SwiGLU (`silu(gate) · up`, the gated activation of Llama-family MLPs) as one custom op on the
//! CPU in f32, forward and backward each a single pass.
//!
//! From candle ops it is `silu` then a product: forward keeps `gate`, `silu(gate)` and `up`
//! (each `[B, T, intermediate]`, the widest activation of a decoder layer), and backward rebuilds
//! the sigmoid and the SiLU's slope from about seven more full-size ops. Here forward keeps only
//! `gate` and `up`, and backward writes both input gradients in one pass with the vectorised
//! `exp` of [`super::fast_math`]. Other devices and dtypes use candle's ops.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::dense::{slice, with_slice};
use crate::Result;

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

/// `silu(gate) · up` for two tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _t = super::profile::scope("silu × up");
    let fused = gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.device().is_cpu()
        && super::frozen::cpu_kernels_here();
    if !fused {
        return Ok((gate.silu()? * up)?);
    }
    if gate.dims() != up.dims() {
        return Err(candle_core::Error::Msg(format!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        ))
        .into());
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    Ok(if gate.track_op() || up.track_op() {
        gate.apply_op2(&up, SwiGlu)?
    } else {
        gate.apply_op2_no_bwd(&up, &SwiGlu)?
    })
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let gate: &[f32] = slice(s1, l1, "swiglu")?;
        let up: &[f32] = slice(s2, l2, "swiglu")?;
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| super::fast_math::swiglu(g, u, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = super::profile::scope("silu × up backward");
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_slice::<f32, _>(gate, "swiglu", |g| {
            with_slice::<f32, _>(up, "swiglu", |u| {
                with_slice::<f32, _>(&grad, "swiglu", |dy| {
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                        .zip(dy.par_chunks(CHUNK))
                        .for_each(|(((dg, du), (g, u)), dy)| {
                            super::fast_math::swiglu_backward(g, u, dy, dg, du)
                        });
                    Ok(())
                })
            })
        })?;
        let dg = Tensor::from_vec(dg, gate.shape(), &Device::Cpu)?;
        let du = Tensor::from_vec(du, up.shape(), &Device::Cpu)?;
        Ok((Some(dg), Some(du)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random_weights::randn;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The op against candle's `silu(gate) · up` in f64 (values and both gradients), over
    /// more values than one task holds and large negative and positive gates.
    #[test]
    fn swiglu_matches_silu_times_up_and_its_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = CHUNK + 37;
        let gate64 = (randn(&mut rng, &[n], 4.0, 0.0)? * 1.0)?;
        let gate64 = Tensor::cat(
            &[
                &gate64,
                &Tensor::new(&[-120.0f64, 95.0, 0.0], &Device::Cpu)?,
            ],
            0,
        )?;
        let up64 = randn(&mut rng, &[n + 3], 1.0, 0.2)?;
        let mix = randn(&mut rng, &[n + 3], 1.0, 0.0)?;
        let (g, u) = (Var::from_tensor(&gate64)?, Var::from_tensor(&up64)?);
        let want = (g.as_tensor().silu()? * u.as_tensor())?;
        let wg = (&want * &mix)?.sum_all()?.backward()?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (g32, u32) = (
            Var::from_tensor(&f32(&gate64)?)?,
            Var::from_tensor(&f32(&up64)?)?,
        );
        let got = swiglu(g32.as_tensor(), u32.as_tensor())?;
        let gg = (&got * f32(&mix)?)?.sum_all()?.backward()?;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
            let a = a.to_dtype(DType::F64)?;
            let diff = (&a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            Ok(diff / b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30))
        };
        assert!(rel(&got, &want)? < 1e-6, "output");
        for (name, ours, theirs) in [("gate", &g32, &g), ("up", &u32, &u)] {
            let a = gg.get(ours.as_tensor()).expect("our gradient");
            let b = wg.get(theirs.as_tensor()).expect("reference gradient");
            let r = rel(a, b)?;
            assert!(r < 1e-6, "d{name}: relative difference {r}");
        }
        let err = swiglu(&f32(&gate64)?, &f32(&up64.narrow(0, 0, 5)?)?).unwrap_err();
        assert!(err.to_string().contains("differ in shape"), "{err}");
        Ok(())
    }
}
