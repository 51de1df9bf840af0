//! Gradient checkpointing: run a segment of the model without keeping its activations, and
//! recompute them in backward.
//!
//! candle has no recompute facility (DESIGN.md §7), so [`recompute`] builds one from a custom
//! op. Forward runs the segment on detached inputs and detaches its output, which frees the graph
//! (and every activation) the segment built; the op takes the segment's input `x`, a side input
//! (the time embedding or the text context) and the segment's trainable tensors concatenated into
//! one, so that candle's backward reaches it whenever any of them needs a gradient. Its backward
//! re-runs the segment on fresh variables, takes a nested `backward()` of `⟨output, dY⟩`, and
//! returns the gradients of the three inputs; candle's `cat` backward hands each trainable tensor
//! its part. Random masks (LoRA dropout) are drawn from generators keyed by the training step, so
//! the recomputation sees the masks the forward saw.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor, Var};

use super::custom_backward::{cpu, cuda, hand_over};
use crate::Result;

/// A model segment: `f(x, side)`.
pub type Segment = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// `f(x, side)` with its activations recomputed in backward instead of kept. `params` are the
/// trainable tensors `f` uses (the LoRA matrices inside the segment); their gradients, and those
/// of `x` and `side` when they need one, come out of the outer `backward()` as usual.
///
/// On the CPU and on CUDA; other devices, and calls where nothing needs a gradient, run `f`
/// directly.
pub fn recompute(x: &Tensor, side: &Tensor, params: &[Var], f: Arc<Segment>) -> Result<Tensor> {
    let tracked =
        x.track_op() || side.track_op() || params.iter().any(|p| p.as_tensor().track_op());
    if !tracked || !(x.device().is_cpu() || x.device().is_cuda()) {
        return f(x, side);
    }
    let y = f(&x.detach(), &side.detach())?.detach();
    let packed = if params.is_empty() {
        Tensor::zeros(1, x.dtype(), x.device())?
    } else {
        let flat = params
            .iter()
            .map(|p| p.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)?
    };
    let op = Checkpoint {
        output: Mutex::new(Some(y)),
        f,
        params: params.to_vec(),
    };
    Ok(x.apply_op3_arc(side, &packed, Arc::new(Box::new(op)))?)
}

struct Checkpoint {
    output: Mutex<Option<Tensor>>,
    f: Arc<Segment>,
    params: Vec<Var>,
}

impl Checkpoint {
    fn recompute(
        &self,
        x: &Tensor,
        side: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let x_var = Var::from_tensor(&x.detach())?;
        let side_var = if side.track_op() {
            Some(Var::from_tensor(&side.detach())?)
        } else {
            None
        };
        let side_in = match &side_var {
            Some(v) => v.as_tensor().clone(),
            None => side.detach(),
        };
        let out = (self.f)(x_var.as_tensor(), &side_in)?;
        let grads = (out * grad.to_dtype(x.dtype())?)?.sum_all()?.backward()?;
        let dx = match grads.get(x_var.as_tensor()) {
            Some(g) => g.clone(),
            None => x.zeros_like()?,
        };
        let dside = match &side_var {
            Some(v) => Some(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => side.zeros_like()?,
            }),
            None => None,
        };
        let dparams = if self.params.is_empty() {
            None
        } else {
            let flat = self
                .params
                .iter()
                .map(|p| match grads.get(p.as_tensor()) {
                    Some(g) => g.flatten_all(),
                    None => p.as_tensor().zeros_like()?.flatten_all(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&flat, 0)?)
        };
        Ok((dx, dside, dparams))
    }
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_over(&self.output, "checkpoint", cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        hand_over(&self.output, "checkpoint", cuda)
    }

    fn bwd(
        &self,
        x: &Tensor,
        side: &Tensor,
        _packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dside, dparams) = self
            .recompute(x, side, grad)
            .map_err(|e| candle_core::Error::Msg(format!("checkpoint backward: {e}")))?;
        Ok((Some(dx), dside, dparams))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use crate::models::random_weights::randn;

    #[test]
    fn checkpointed_gradients_equal_the_plain_ones() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x = Var::from_tensor(&randn(&mut rng, &[3, 4], 1.0, 0.0)?)?;
        let side = Var::from_tensor(&randn(&mut rng, &[3, 4], 1.0, 0.0)?)?;
        let a = Var::from_tensor(&randn(&mut rng, &[4, 4], 1.0, 0.0)?)?;
        let b = Var::from_tensor(&randn(&mut rng, &[4], 1.0, 0.0)?)?;
        let (a2, b2) = (a.clone(), b.clone());
        let f: Arc<Segment> = Arc::new(move |x: &Tensor, s: &Tensor| -> Result<Tensor> {
            let h = x.matmul(a2.as_tensor())?.broadcast_add(b2.as_tensor())?;
            Ok((h.tanh()? * s)?.exp()?)
        });
        let weights = randn(&mut rng, &[3, 4], 1.0, 0.0)?;
        let plain = (f(x.as_tensor(), side.as_tensor())? * &weights)?.sum_all()?;
        let ckpt = (recompute(
            x.as_tensor(),
            side.as_tensor(),
            &[a.clone(), b.clone()],
            f.clone(),
        )? * &weights)?
            .sum_all()?;
        let diff = (&plain - &ckpt)?.abs()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        let (gp, gc) = (plain.backward()?, ckpt.backward()?);
        for (name, t) in [
            ("x", x.as_tensor()),
            ("side", side.as_tensor()),
            ("a", a.as_tensor()),
            ("b", b.as_tensor()),
        ] {
            match (gp.get(t), gc.get(t)) {
                (Some(p), Some(c)) => {
                    let d = (p - c)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(d < 1e-12, "{name}: {d}");
                }
                _ => panic!("{name}: missing gradient"),
            }
        }
        // An untracked side input gets no gradient and is not required.
        let ckpt = recompute(
            x.as_tensor(),
            &side.as_tensor().detach(),
            std::slice::from_ref(&a),
            f,
        )?;
        let g = ckpt.sum_all()?.backward()?;
        assert!(g.get(x.as_tensor()).is_some() && g.get(a.as_tensor()).is_some());
        Ok(())
    }
}
