//! Linear and convolution with frozen weights on devices (and dtypes) that the CPU kernels of
//! [`super::frozen`] do not cover: CUDA, and f16/bf16 anywhere.
//!
//! The forward is candle's own `matmul` / `conv2d` (cuBLAS, and candle's im2col + GEMM or cuDNN
//! convolution on CUDA), run on the detached input so that candle records nothing; the backward
//! ([`super::custom_backward::attach`]) computes the input gradient and nothing else. candle's
//! own backward would also compute every frozen weight's gradient (a full product per layer,
//! kept until backward ends) and, for a convolution, run `conv_transpose2d`, a direct loop on
//! CUDA. Here the convolution's input gradient is `col2im(Wᵀ · dY)`: one matrix product with the
//! weight read in place, then the `k²` kernel offsets' rows added where they belong in the
//! padded input (spread by the stride), so no copy of the weight is made in backward.
//!
//! Everything here is ordinary candle ops, so the CPU tests exercise the exact code CUDA runs.

use candle_core::{DType, Tensor};

use super::adapter::LowRank;
use super::custom_backward::{attach, attach2, attach3};
use super::frozen;
use crate::Result;

/// Whether a layer with input `x` and these parameters can take this path: the custom ops on,
/// a CPU or CUDA input, and no parameter that wants a gradient. (On the CPU in f32/f64,
/// [`frozen::applies_to`] comes first.)
pub fn applies_to(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    (x.device().is_cpu() || x.device().is_cuda())
        && matches!(
            x.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
        && frozen::enabled_here()
        && !weight.track_op()
        && !bias.is_some_and(Tensor::track_op)
}

/// Whether a convolution of this geometry can take this path (besides [`applies_to`]): the
/// transposed convolution of its backward needs `padding < k`.
pub fn conv_fits(weight: &Tensor, padding: usize, stride: usize) -> bool {
    weight
        .dims4()
        .is_ok_and(|(_, _, k, k2)| k == k2 && padding < k && stride > 0)
}

/// `y = x Wᵀ + b` with `W: [out, in]` frozen; `x: [..., in]` → `[..., out]`. Backward: `dX =
/// dY W`, no weight or bias gradient.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = frozen::linear_plain(&x.detach(), weight, bias)?;
    let (w, dims) = (weight.clone(), x.dims().to_vec());
    attach(
        "frozen linear",
        x,
        y,
        Box::new(move |grad| {
            let out = w.dim(0)?;
            let rows = grad.elem_count() / out.max(1);
            Ok(grad
                .reshape((rows, out))?
                .matmul(&w)?
                .reshape(dims.as_slice())?)
        }),
    )
}

/// [`linear`] added to `residual` (the output's shape) in one node: neither the layer's own
/// output nor the sum's inputs are kept for backward (candle keeps every op's inputs, so a
/// separate `+` would keep the layer's output until backward ends). Backward: `dX = dY W`,
/// `dResidual = dY`.
pub fn linear_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    let y = (frozen::linear_plain(&x.detach(), weight, bias)? + residual.detach())?;
    let (w, dims) = (weight.clone(), x.dims().to_vec());
    let want = [x.track_op(), residual.track_op()];
    attach2(
        "frozen linear + residual",
        [x, residual],
        y,
        Box::new(move |grad| {
            let dx = if want[0] {
                let out = w.dim(0)?;
                let rows = grad.elem_count() / out.max(1);
                Some(
                    grad.reshape((rows, out))?
                        .matmul(&w)?
                        .reshape(dims.as_slice())?,
                )
            } else {
                None
            };
            Ok([dx, want[1].then(|| grad.clone())])
        }),
    )
}

/// [`linear`] plus a low-rank adapter in one node, `x Wᵀ + b + s · (x downᵀ) upᵀ`, the adapter
/// computed in its own dtype (f32 under mixed precision) and added in `x`'s: the same sums as
/// the layer and [`crate::lora`]'s adapter run separately. Backward gives `dX`, `d down` and
/// `d up`, recomputing `x downᵀ`; only `x` (kept by the graph anyway) and the adapter's
/// matrices are kept, not the f32 copy of `x` and the adapter's intermediates.
pub fn linear_low_rank(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    low_rank: &LowRank,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_features = weight.dim(1)?;
    let rows = x.elem_count() / in_features.max(1);
    let (down, up, scale) = (low_rank.down.detach(), low_rank.up.detach(), low_rank.scale);
    let adapter_dtype = down.dtype();
    let x2 = x.detach().reshape((rows, in_features))?;
    let frozen_out = frozen::linear_plain(&x2, weight, bias)?;
    let hidden = x2.to_dtype(adapter_dtype)?.matmul(&down.t()?)?;
    let adapter_out = (hidden.matmul(&up.t()?)? * scale)?.to_dtype(x.dtype())?;
    let mut out_dims = dims.clone();
    if let Some(last) = out_dims.last_mut() {
        *last = weight.dim(0)?;
    }
    let y = (frozen_out + adapter_out)?.reshape(out_dims)?;
    let (w, want_dx) = (weight.clone(), x.track_op());
    attach3(
        "frozen linear + lora",
        [x, &low_rank.down, &low_rank.up],
        y,
        Box::new(move |grad, _| {
            let out = w.dim(0)?;
            let g = grad.reshape((rows, out))?;
            let gs = (g.to_dtype(adapter_dtype)? * scale)?;
            let xa = x2.to_dtype(adapter_dtype)?;
            let g_up = gs.matmul(&up)?;
            let d_up = gs.t()?.matmul(&xa.matmul(&down.t()?)?)?;
            let d_down = g_up.t()?.matmul(&xa)?;
            let dx = if want_dx {
                let through_adapter = g_up.matmul(&down)?.to_dtype(g.dtype())?;
                Some((g.matmul(&w)? + through_adapter)?.reshape(dims.as_slice())?)
            } else {
                None
            };
            Ok([dx, Some(d_down), Some(d_up)])
        }),
    )
}

/// 2-D convolution with a frozen square kernel `W: [out, in, k, k]` and bias `[out]` (`padding
/// < k`, see [`conv_fits`]); `x: [B, in, H, W]` → `[B, out, H', W']`. Backward: the input
/// gradient only.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let y = frozen::conv2d_plain(&x.detach(), weight, bias, padding, stride)?;
    let (_, _, h, w) = x.dims4()?;
    let weight = weight.clone();
    attach(
        "frozen conv",
        x,
        y,
        Box::new(move |grad| conv2d_input_grad(grad, &weight, (h, w), padding, stride)),
    )
}

/// [`conv2d`] added to `residual` (the output's shape) in one node, as [`linear_add`].
pub fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    residual: &Tensor,
) -> Result<Tensor> {
    let y =
        (frozen::conv2d_plain(&x.detach(), weight, bias, padding, stride)? + residual.detach())?;
    let (_, _, h, w) = x.dims4()?;
    let weight = weight.clone();
    let want = [x.track_op(), residual.track_op()];
    attach2(
        "frozen conv + residual",
        [x, residual],
        y,
        Box::new(move |grad| {
            let dx = if want[0] {
                Some(conv2d_input_grad(grad, &weight, (h, w), padding, stride)?)
            } else {
                None
            };
            Ok([dx, want[1].then(|| grad.clone())])
        }),
    )
}

/// The gradient of a convolution's input `[B, in, H, W]` (`input` = `(H, W)`) from its output's
/// `grad: [B, out, H', W']`: `col2im(Wᵀ · dY)`. One product with the weight read in place
/// (`[in·k·k, out]`, a transposed view), then each of the `k²` kernel offsets' rows added at
/// their place in the padded input (spread by the stride) and the padding cut off. Nothing of
/// the weight's size is allocated: a flipped, transposed copy of it (what a transposed
/// convolution written as a convolution needs) cost three times a 3×3 kernel's size at every
/// call, 180 MB for SD 1.5's widest convolutions.
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    input: (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (out_c, in_c, k, _) = weight.dims4()?;
    let (b, _, ho, wo) = grad.dims4()?;
    let fits =
        |n: usize, on: usize| n + 2 * padding >= k && (n + 2 * padding - k) / stride + 1 == on;
    if !conv_fits(weight, padding, stride) || !fits(input.0, ho) || !fits(input.1, wo) {
        return Err(candle_core::Error::Msg(format!(
            "frozen conv backward: gradient {:?} does not come from an input of {input:?} with \
             kernel {:?}, padding {padding}, stride {stride}",
            grad.dims(),
            weight.dims()
        ))
        .into());
    }
    // [out, B·H'·W'], then Wᵀ · dY = [in·k·k, B·H'·W'].
    let dy = grad
        .transpose(0, 1)?
        .contiguous()?
        .reshape((out_c, b * ho * wo))?;
    let cols = weight.reshape((out_c, in_c * k * k))?.t()?.matmul(&dy)?;
    let cols = cols.reshape((in_c, k, k, b, ho, wo))?;
    let (hp, wp) = (input.0 + 2 * padding, input.1 + 2 * padding);
    let (span_h, span_w) = ((ho - 1) * stride + 1, (wo - 1) * stride + 1);
    let mut padded: Option<Tensor> = None;
    for a in 0..k {
        for c in 0..k {
            // The rows of offset (a, c): [in, B, H', W'] → [B, in, H', W'], spread by the stride.
            let rows = cols
                .narrow(1, a, 1)?
                .narrow(2, c, 1)?
                .reshape((in_c, b, ho, wo))?
                .transpose(0, 1)?;
            let placed = dilate(&rows, stride)?
                .pad_with_zeros(2, a, hp - a - span_h)?
                .pad_with_zeros(3, c, wp - c - span_w)?;
            padded = Some(match padded {
                None => placed,
                Some(sum) => (sum + placed)?,
            });
        }
    }
    let padded = padded.ok_or_else(|| candle_core::Error::Msg("empty kernel".into()))?;
    Ok(padded
        .narrow(2, padding, input.0)?
        .narrow(3, padding, input.1)?
        .contiguous()?)
}

/// `[B, C, H, W]` → `[B, C, (H−1)s+1, (W−1)s+1]` with `s − 1` zeros between neighbours.
fn dilate(grad: &Tensor, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(grad.clone());
    }
    let (b, c, h, w) = grad.dims4()?;
    let (dtype, device) = (grad.dtype(), grad.device());
    let zeros = Tensor::zeros((b, c, h, w, stride - 1), dtype, device)?;
    let wide = (w - 1) * stride + 1;
    let rows = Tensor::cat(&[&grad.unsqueeze(4)?, &zeros], 4)?
        .reshape((b, c, h, w * stride))?
        .narrow(3, 0, wide)?;
    let zeros = Tensor::zeros((b, c, h, stride - 1, wide), dtype, device)?;
    Ok(Tensor::cat(&[&rows.unsqueeze(3)?, &zeros], 3)?
        .reshape((b, c, h * stride, wide))?
        .narrow(2, 0, (h - 1) * stride + 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use crate::models::random_weights::randn;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// `(y, dL/dx)` for the loss `Σ y ∘ m` with a fixed random `m`, from `layer`.
    fn value_and_grad(
        x: &Tensor,
        seed: u64,
        layer: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let x = Var::from_tensor(x)?;
        let y = layer(x.as_tensor())?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = randn(&mut rng, y.dims(), 1.0, 0.0)?.to_dtype(y.dtype())?;
        let grads = (&y * m)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).cloned().ok_or_else(|| {
            crate::Error::from(candle_core::Error::Msg("no gradient for x".into()))
        })?;
        Ok((y, dx))
    }

    #[test]
    fn conv_matches_candles_op_and_its_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // (channels in, out, kernel, padding, stride, H, W): the UNet's 3×3 and 1×1 convs, its
        // stride-2 downsampler on even and odd sizes, no padding, a 2×2 kernel.
        let cases = [
            (3, 4, 3, 1, 1, 6, 5),
            (3, 2, 1, 0, 1, 4, 4),
            (2, 3, 3, 1, 2, 8, 8),
            (2, 3, 3, 1, 2, 7, 9),
            (2, 2, 3, 0, 2, 9, 6),
            (2, 2, 2, 1, 3, 7, 8),
            (1, 2, 3, 2, 1, 3, 4),
        ];
        for (i, &(ci, co, k, pad, stride, h, w)) in cases.iter().enumerate() {
            let x = randn(&mut rng, &[2, ci, h, w], 1.0, 0.0)?;
            let weight = randn(&mut rng, &[co, ci, k, k], 0.5, 0.0)?;
            let bias = randn(&mut rng, &[co], 0.5, 0.0)?;
            assert!(applies_to(&x, &weight, Some(&bias)) && conv_fits(&weight, pad, stride));
            let ours = value_and_grad(&x, i as u64, |x| {
                conv2d(x, &weight, Some(&bias), pad, stride)
            })?;
            // The reference gradient is the CPU kernel's (itself checked against finite
            // differences): candle's own conv2d backward takes the output padding of both axes
            // from the height, which is wrong when H and W round differently (case 4).
            let cpu = value_and_grad(&x, i as u64, |x| {
                frozen::conv2d(x, &weight, Some(&bias), pad, stride)
            })?;
            let plain = frozen::conv2d_plain(&x, &weight, Some(&bias), pad, stride)?;
            assert_eq!(ours.0.dims(), plain.dims(), "case {i}");
            assert!(max_diff(&ours.0, &plain)? < 1e-12, "case {i}: values");
            assert_eq!(ours.1.dims(), x.dims(), "case {i}");
            let d = max_diff(&ours.1, &cpu.1)?;
            assert!(d < 1e-12, "case {i}: input gradient off by {d}");
        }
        Ok(())
    }

    #[test]
    fn linear_matches_candles_op_and_its_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let x = randn(&mut rng, &[2, 3, 5], 1.0, 0.0)?;
        let weight = randn(&mut rng, &[4, 5], 0.5, 0.0)?;
        let bias = randn(&mut rng, &[4], 0.5, 0.0)?;
        for bias in [Some(&bias), None] {
            let ours = value_and_grad(&x, 1, |x| linear(x, &weight, bias))?;
            let plain = value_and_grad(&x, 1, |x| frozen::linear_plain(x, &weight, bias))?;
            assert!(max_diff(&ours.0, &plain.0)? < 1e-12);
            assert_eq!(ours.1.dims(), x.dims());
            assert!(max_diff(&ours.1, &plain.1)? < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn residual_sums_are_one_node_with_both_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Both inputs trainable: the layer's input and the residual get their gradients, and
        // they equal those of the layer and a separate `+`.
        let check = |x: &Tensor,
                     residual: &Tensor,
                     fused: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
                     plain: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>|
         -> Result<()> {
            let mut outs = Vec::new();
            for f in [fused, plain] {
                let (xv, rv) = (Var::from_tensor(x)?, Var::from_tensor(residual)?);
                let y = f(xv.as_tensor(), rv.as_tensor())?;
                let m = randn(&mut ChaCha8Rng::seed_from_u64(3), y.dims(), 1.0, 0.0)?;
                let grads = (&y * m)?.sum_all()?.backward()?;
                let g = |v: &Var| grads.get(v.as_tensor()).cloned();
                outs.push((y, g(&xv), g(&rv)));
            }
            let (a, b) = (&outs[0], &outs[1]);
            assert!(max_diff(&a.0, &b.0)? < 1e-12, "values");
            assert!(
                max_diff(a.1.as_ref().unwrap(), b.1.as_ref().unwrap())? < 1e-12,
                "dX"
            );
            assert!(
                max_diff(a.2.as_ref().unwrap(), b.2.as_ref().unwrap())? < 1e-12,
                "dR"
            );
            Ok(())
        };
        let x = randn(&mut rng, &[2, 3, 5], 1.0, 0.0)?;
        let weight = randn(&mut rng, &[4, 5], 0.5, 0.0)?;
        let bias = randn(&mut rng, &[4], 0.5, 0.0)?;
        let residual = randn(&mut rng, &[2, 3, 4], 1.0, 0.0)?;
        check(
            &x,
            &residual,
            &|x, r| linear_add(x, &weight, Some(&bias), r),
            &|x, r| Ok((frozen::linear_plain(x, &weight, Some(&bias))? + r)?),
        )?;
        let x = randn(&mut rng, &[2, 3, 6, 5], 1.0, 0.0)?;
        let weight = randn(&mut rng, &[4, 3, 3, 3], 0.5, 0.0)?;
        let residual = randn(&mut rng, &[2, 4, 6, 5], 1.0, 0.0)?;
        check(
            &x,
            &residual,
            &|x, r| conv2d_add(x, &weight, Some(&bias), 1, 1, r),
            &|x, r| {
                let y = value_and_grad_free_conv(x, &weight, &bias)?;
                Ok((y + r)?)
            },
        )?;
        // A residual that needs no gradient (the first block's input) is fine too.
        let y = linear_add(
            &Var::new(&[[1f64, 2.0]], &Device::Cpu)?.as_tensor().clone(),
            &Tensor::new(&[[1f64, 0.0], [0.0, 1.0]], &Device::Cpu)?,
            None,
            &Tensor::new(&[[10f64, 20.0]], &Device::Cpu)?,
        )?;
        assert_eq!(y.to_vec2::<f64>()?, [[11.0, 22.0]]);
        Ok(())
    }

    /// The CPU kernel's convolution (whose gradient is checked against finite differences).
    fn value_and_grad_free_conv(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        frozen::conv2d(x, weight, Some(bias), 1, 1)
    }

    #[test]
    fn linear_with_low_rank_adapter_equals_the_separate_ops() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let x = randn(&mut rng, &[2, 3, 5], 1.0, 0.0)?;
        let weight = randn(&mut rng, &[4, 5], 0.5, 0.0)?;
        let bias = randn(&mut rng, &[4], 0.5, 0.0)?;
        let down = Var::from_tensor(&randn(&mut rng, &[2, 5], 0.5, 0.0)?)?;
        let up = Var::from_tensor(&randn(&mut rng, &[4, 2], 0.5, 0.0)?)?;
        let m = randn(&mut rng, &[2, 3, 4], 1.0, 0.0)?;
        // (x's dtype, tolerance): f64 throughout, and f16 input with f64 adapter matrices as
        // under mixed precision.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F16, 2e-2)] {
            let grads = |fused: bool| -> Result<Vec<Tensor>> {
                let xv = Var::from_tensor(&x.to_dtype(dtype)?)?;
                let (w, b) = (weight.to_dtype(dtype)?, bias.to_dtype(dtype)?);
                let y = if fused {
                    let low_rank = LowRank {
                        down: down.as_tensor().clone(),
                        up: up.as_tensor().clone(),
                        scale: 0.75,
                    };
                    linear_low_rank(xv.as_tensor(), &w, Some(&b), &low_rank)?
                } else {
                    let h = xv
                        .as_tensor()
                        .to_dtype(DType::F64)?
                        .broadcast_matmul(&down.t()?)?;
                    let a = (h.broadcast_matmul(&up.t()?)? * 0.75)?.to_dtype(dtype)?;
                    (frozen::linear_plain(xv.as_tensor(), &w, Some(&b))? + a)?
                };
                let loss = (y.to_dtype(DType::F64)? * &m)?.sum_all()?;
                let g = loss.backward()?;
                let mut out = vec![y.to_dtype(DType::F64)?];
                for t in [xv.as_tensor(), down.as_tensor(), up.as_tensor()] {
                    let gt = g.get(t).cloned().ok_or_else(|| {
                        crate::Error::from(candle_core::Error::Msg("missing gradient".into()))
                    })?;
                    out.push(gt.to_dtype(DType::F64)?);
                }
                Ok(out)
            };
            let (ours, separate) = (grads(true)?, grads(false)?);
            for (i, (a, b)) in ours.iter().zip(&separate).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{dtype:?} #{i}");
                let d = max_diff(a, b)?;
                assert!(d < tol, "{dtype:?}: output/dx/ddown/dup #{i} off by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_takes_this_path_and_stays_close() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = randn(&mut rng, &[1, 4, 6, 6], 1.0, 0.0)?.to_dtype(DType::F32)?;
        let weight = randn(&mut rng, &[3, 4, 3, 3], 0.3, 0.0)?.to_dtype(DType::F32)?;
        // (candle's CPU matmul has no bf16; f16 takes the same path.)
        let (xh, wh) = (x.to_dtype(DType::F16)?, weight.to_dtype(DType::F16)?);
        assert!(!frozen::applies_to(&xh, &wh, None) && applies_to(&xh, &wh, None));
        let ours = value_and_grad(&xh, 3, |x| conv2d(x, &wh, None, 1, 2))?;
        let plain = value_and_grad(&x, 3, |x| frozen::conv2d_plain(x, &weight, None, 1, 2))?;
        assert_eq!(ours.1.dtype(), DType::F16);
        // f16 keeps 11 bits of mantissa: values of a few units are off by ~1e-3.
        assert!(max_diff(&ours.0.to_dtype(DType::F32)?, &plain.0)? < 0.02);
        assert!(max_diff(&ours.1.to_dtype(DType::F32)?, &plain.1)? < 0.02);
        Ok(())
    }

    #[test]
    fn a_gradient_of_the_wrong_size_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::zeros((2, 3, 3, 3), DType::F32, &dev)?;
        let grad = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev)?;
        let err = conv2d_input_grad(&grad, &weight, (9, 9), 1, 1);
        assert!(err.is_err_and(|e| e.to_string().contains("does not come from")));
        Ok(())
    }
}
