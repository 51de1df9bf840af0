//! Group norm (optionally followed by SiLU) and layer norm with frozen affine parameters, from
//! ordinary candle ops with our own backward: the norms on CUDA (and in f16/bf16), where the CPU
//! kernels of [`super::fused_norm`] do not run.
//!
//! Built from primitive ops, a group norm + SiLU keeps about ten full-size f32 tensors for
//! backward (the upcast input, the centred values, their squares, the normalised values, the
//! affine products, the SiLU's input...): at 512 px, batch 4, tens of megabytes per norm and
//! gigabytes per step. Here the forward runs on the detached input and keeps two numbers per
//! group (mean and 1/σ); the backward ([`super::custom_backward::attach`]) recomputes the
//! normalised values and applies
//!
//! `dx̂ = dy ∘ w`, `dx = (dx̂ − mean(dx̂) − x̂ ∘ mean(dx̂ ∘ x̂)) / σ` per group,
//!
//! with `dy = dz ∘ s (1 + y (1 − s))`, `s = sigmoid(y)`, through a SiLU. Statistics and
//! gradients are computed in f32 (f64 for f64 inputs).

use candle_core::{DType, Tensor, D};

use super::custom_backward::attach;
use crate::Result;

/// Whether a norm of `x` with these affine parameters takes this path: a CPU or CUDA float
/// input, the custom ops on, frozen parameters. (On the CPU in f32/f64,
/// [`super::fused_norm::applies`] comes first.)
pub fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    super::frozen_generic::applies_to(x, weight, Some(bias))
}

/// Group norm of `x: [B, C, ...]` with `groups` and scale/shift `[C]`, then SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        return Err(candle_core::Error::Msg(format!(
            "group norm: input {dims:?} cannot be split into {groups} groups"
        ))
        .into());
    }
    let mut affine = vec![1; dims.len()];
    affine[1] = dims[1];
    let norm = Norm {
        segments: (dims[0] * groups, x.elem_count() / (dims[0] * groups).max(1)),
        affine,
        eps,
        silu,
    };
    norm.run(x, weight, bias)
}

/// Layer norm of `x: [..., D]` over the last dimension with scale/shift `[D]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let mut affine = vec![1; x.rank()];
    if let Some(last) = affine.last_mut() {
        *last = d;
    }
    let norm = Norm {
        segments: (x.elem_count() / d.max(1), d),
        affine,
        eps,
        silu: false,
    };
    norm.run(x, weight, bias)
}

/// One norm: the input seen as `segments.0` runs of `segments.1` values, each normalised on its
/// own; the scale and shift broadcast from `affine` (the input's rank).
#[derive(Clone)]
struct Norm {
    segments: (usize, usize),
    affine: Vec<usize>,
    eps: f64,
    silu: bool,
}

impl Norm {
    fn run(self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let work = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let w = weight.to_dtype(work)?.reshape(self.affine.as_slice())?;
        let b = bias.to_dtype(work)?.reshape(self.affine.as_slice())?;
        let xs = x.detach().to_dtype(work)?.reshape(self.segments)?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let normed = centered.broadcast_mul(&inv_std)?.reshape(x.dims())?;
        let y = normed.broadcast_mul(&w)?.broadcast_add(&b)?;
        let y = if self.silu { y.silu()? } else { y };
        let y = y.to_dtype(dtype)?;
        let input = x.detach();
        attach(
            "norm",
            x,
            y,
            Box::new(move |grad| self.backward(&input, &mean, &inv_std, &w, &b, grad)),
        )
    }

    /// `dx` from the output's `grad`, recomputing the normalised input from `x` and the
    /// statistics.
    fn backward(
        &self,
        x: &Tensor,
        mean: &Tensor,
        inv_std: &Tensor,
        w: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let work = w.dtype();
        let normed = x
            .to_dtype(work)?
            .reshape(self.segments)?
            .broadcast_sub(mean)?
            .broadcast_mul(inv_std)?;
        let mut dy = grad.to_dtype(work)?;
        if self.silu {
            let y = normed
                .reshape(x.dims())?
                .broadcast_mul(w)?
                .broadcast_add(b)?;
            let s = (y.neg()?.exp()? + 1.0)?.recip()?;
            // d silu(y)/dy = s + y·s·(1 − s) = s · (1 + y·(1 − s)).
            let slope = (&s * ((&y * (s.affine(-1.0, 1.0)?))? + 1.0)?)?;
            dy = (dy * slope)?;
        }
        let d_normed = dy.broadcast_mul(w)?.reshape(self.segments)?;
        let a = d_normed.mean_keepdim(D::Minus1)?;
        let c = (&d_normed * &normed)?.mean_keepdim(D::Minus1)?;
        let dx = d_normed
            .broadcast_sub(&a)?
            .sub(&normed.broadcast_mul(&c)?)?
            .broadcast_mul(inv_std)?;
        Ok(dx.reshape(x.dims())?.to_dtype(x.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use crate::models::random_weights::randn;
    use crate::nn::frozen::{with_generic_ops, with_plain_ops};
    use crate::nn::{GroupNorm, LayerNorm, Scope, WeightStore};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?;
        Ok(d.abs()?.max_all()?.to_scalar::<f64>()?)
    }

    /// `(out, dL/dx)` for `L = Σ out ∘ m`.
    fn value_and_grad(
        x: &Tensor,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let v = Var::from_tensor(x)?;
        let y = f(v.as_tensor())?;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = randn(&mut rng, y.dims(), 1.0, 0.0)?.to_dtype(y.dtype())?;
        let grads = (&y * m)?.sum_all()?.backward()?;
        let dx = grads.get(v.as_tensor()).cloned().ok_or_else(|| {
            crate::Error::from(candle_core::Error::Msg("no gradient for x".into()))
        })?;
        Ok((y, dx))
    }

    #[test]
    fn norms_match_the_primitive_ops_and_their_gradients() -> Result<()> {
        let store = WeightStore::random(5, DType::F64, candle_core::Device::Cpu);
        let group = GroupNorm::new(Scope::root(&store).pp("g"), 3, 6, 1e-5)?;
        let layer = LayerNorm::new(Scope::root(&store).pp("l"), 5, 1e-5)?;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x4 = (randn(&mut rng, &[2, 6, 3, 5], 2.0, 0.0)? + 0.5)?;
        let x3 = randn(&mut rng, &[2, 7, 5], 2.0, 0.0)?;
        type Layer<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;
        let cases: [(&str, &Tensor, Layer); 3] = [
            ("group norm", &x4, Box::new(|x| group.forward(x))),
            (
                "group norm + silu",
                &x4,
                Box::new(|x| group.forward_silu(x)),
            ),
            ("layer norm", &x3, Box::new(|x| layer.forward(x))),
        ];
        for (name, x, f) in cases {
            let ours = with_generic_ops(|| value_and_grad(x, &f))?;
            let plain = with_plain_ops(|| value_and_grad(x, &f))?;
            assert!(max_diff(&ours.0, &plain.0)? < 1e-12, "{name}: values");
            let d = max_diff(&ours.1, &plain.1)?;
            assert!(d < 1e-10, "{name}: input gradient off by {d}");
        }
        Ok(())
    }

    #[test]
    fn half_precision_goes_through_f32() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let x = randn(&mut rng, &[1, 4, 2, 2], 1.0, 0.0)?.to_dtype(DType::F32)?;
        let w = randn(&mut rng, &[4], 1.0, 1.0)?.to_dtype(DType::F32)?;
        let b = randn(&mut rng, &[4], 1.0, 0.0)?.to_dtype(DType::F32)?;
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let (xh, wh, bh) = (half(&x)?, half(&w)?, half(&b)?);
        assert!(applies(&xh, &wh, &bh));
        let ours = value_and_grad(&xh, |x| group_norm(x, &wh, &bh, 2, 1e-5, true))?;
        let exact = value_and_grad(&x, |x| group_norm(x, &w, &b, 2, 1e-5, true))?;
        assert_eq!((ours.0.dtype(), ours.1.dtype()), (DType::F16, DType::F16));
        assert!(max_diff(&ours.0, &exact.0)? < 1e-2);
        assert!(max_diff(&ours.1, &exact.1)? < 2e-2);
        Ok(())
    }
}
