//! Linear and convolution with frozen weights, as candle custom ops whose backward returns the
//! input gradient only.
//!
//! candle's own `matmul`/`conv2d` backward computes a gradient for every operand (DESIGN.md §7):
//! each frozen weight costs a full `dW` in time, and the gradients of untracked operands (the
//! weight, the broadcast bias) stay in the `GradStore` until backward ends. Here the forward runs
//! on the detached input (no graph), and a one-input custom op hands its result to the graph with
//! a backward that computes `dX` and nothing else. LoRA adapters keep their own, ordinary path,
//! so their gradients flow as before.
//!
//! The convolution's `dX` is `col2im(Wᵀ · dY)`: one matrix product with the weight viewed as
//! `[out, in·k·k]` (no flipped copy of the kernel), then the columns are scattered back onto the
//! input grid. This handles any stride and padding, odd and even sizes alike, and replaces
//! candle's `conv_transpose2d` (a direct loop on the CPU).
//!
//! Only CPU tensors take this path ([`applies_to`]); on other devices the layers use candle's
//! ordinary ops.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the custom ops on (the default) or off process-wide; off, the layers use candle's
/// ordinary ops (for before/after measurements and gradient comparisons).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

thread_local! {
    static PLAIN_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the custom ops off on this thread only (tests compare both paths).
pub fn with_plain_ops<T>(f: impl FnOnce() -> T) -> T {
    let before = PLAIN_HERE.with(|p| p.replace(true));
    let out = f();
    PLAIN_HERE.with(|p| p.set(before));
    out
}

/// Whether the custom ops are on for this thread (the process-wide switch and
/// [`with_plain_ops`]).
pub fn enabled_here() -> bool {
    ENABLED.load(Ordering::Relaxed) && !PLAIN_HERE.with(Cell::get)
}

/// Whether a layer with input `x` and these parameters takes the custom-op path: a CPU input,
/// the ops enabled, and no parameter that wants a gradient (a weight that is a `Var`, as in the
/// models' gradient checks, keeps candle's ops and gets its gradient).
pub fn applies_to(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && enabled_here()
        && !weight.track_op()
        && !bias.is_some_and(Tensor::track_op)
}

/// `y = x Wᵀ + b` with `W: [out, in]` frozen; `x: [..., in]` → `[..., out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = linear_plain(&x.detach(), weight, bias)?;
    attach(
        x,
        y,
        Backward::Linear {
            weight: weight.clone(),
        },
    )
}

/// The forward of [`linear`] with ordinary candle ops.
pub fn linear_plain(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    let rows = x.elem_count() / in_features.max(1);
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = weight.dim(0)?;
    let mut y = x.reshape((rows, in_features))?.matmul(&weight.t()?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    Ok(y.reshape(out_dims)?)
}

/// 2-D convolution with a frozen square kernel `W: [out, in, k, k]` and bias `[out]`;
/// `x: [B, in, H, W]` → `[B, out, H', W']`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let y = conv2d_gemm(&x.detach(), weight, bias, padding, stride)?;
    let (_, _, h, w) = x.dims4()?;
    attach(
        x,
        y,
        Backward::Conv2d {
            weight: weight.clone(),
            padding,
            stride,
            input_hw: (h, w),
        },
    )
}

/// The forward of [`conv2d`] with ordinary candle ops.
pub fn conv2d_plain(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let mut y = x.conv2d(weight, padding, stride, 1, 1)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?;
    }
    Ok(y)
}

/// The forward of [`conv2d`] as one matrix product: `W [out, in·k·k] · im2col(x)`, then the bias.
/// 1×1 kernels with stride 1 skip the unfolding.
fn conv2d_gemm(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c_in, h, w) = x.dims4()?;
    let (c_out, _, k, _) = weight.dims4()?;
    if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != weight.dtype() {
        return conv2d_plain(x, weight, bias, padding, stride);
    }
    let ho = (h + 2 * padding - k) / stride + 1;
    let wo = (w + 2 * padding - k) / stride + 1;
    let cols = if k == 1 && stride == 1 && padding == 0 {
        x.transpose(0, 1)?
            .contiguous()?
            .reshape((c_in, b * h * w))?
    } else {
        let op = Im2Col(ConvGeometry {
            b,
            c_in,
            k,
            h,
            w,
            ho,
            wo,
            stride,
            padding,
        });
        x.contiguous()?.apply_op1_no_bwd(&op)?
    };
    let mut y = weight.reshape((c_out, c_in * k * k))?.matmul(&cols)?; // [out, B·Ho·Wo]
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.reshape((c_out, 1))?)?;
    }
    let y = y.reshape((c_out, b, ho, wo))?;
    Ok(if b == 1 {
        y.reshape((1, c_out, ho, wo))?
    } else {
        y.transpose(0, 1)?.contiguous()?
    })
}

/// The sizes of one convolution: batch, input channels, kernel side, input and output sides,
/// stride and padding — what unfolding ([`Im2Col`]) and folding back ([`Col2Im`]) both need.
#[derive(Debug, Clone, Copy)]
struct ConvGeometry {
    b: usize,
    c_in: usize,
    k: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    padding: usize,
}

/// Unfolds `[B, in, H, W]` into the columns `[in·k·k, B·Ho·Wo]` of a convolution (zeros where a
/// window leaves the padded input): the inverse bookkeeping of [`Col2Im`].
struct Im2Col(ConvGeometry);

impl Im2Col {
    fn run<T: Copy + Default + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let ConvGeometry {
            b,
            c_in,
            k,
            h,
            w,
            ho,
            wo,
            stride,
            padding,
        } = self.0;
        let ncols = b * ho * wo;
        let mut cols = vec![T::default(); c_in * k * k * ncols];
        // One task per row (input channel, ky, kx).
        cols.par_chunks_mut(ncols).enumerate().for_each(|(r, dst)| {
            let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
            for n in 0..b {
                let src = &x[(n * c_in + c) * h * w..][..h * w];
                let out = &mut dst[n * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let y = (oy * stride + ky) as isize - padding as isize;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    let src_row = &src[y as usize * w..][..w];
                    let out_row = &mut out[oy * wo..][..wo];
                    for (ox, o) in out_row.iter_mut().enumerate() {
                        let xx = (ox * stride + kx) as isize - padding as isize;
                        if xx >= 0 && xx < w as isize {
                            *o = src_row[xx as usize];
                        }
                    }
                }
            }
        });
        cols
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("im2col: input not contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end])),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end])),
            _ => return Err(candle_core::Error::Msg("im2col: f32 and f64 only".into())),
        };
        let g = self.0;
        Ok((out, Shape::from((g.c_in * g.k * g.k, g.b * g.ho * g.wo))))
    }
}

/// Makes `y` (computed from `x` without a graph) the result of a custom op on `x` whose
/// backward is `backward`. When `x` needs no gradient, `y` is returned as is.
fn attach(x: &Tensor, y: Tensor, backward: Backward) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    let op = Bridge {
        output: Mutex::new(Some(y)),
        backward,
    };
    Ok(x.apply_op1_arc(Arc::new(Box::new(op)))?)
}

/// What the backward of a frozen layer needs (the weight, never the input).
#[derive(Debug)]
enum Backward {
    Linear {
        weight: Tensor,
    },
    Conv2d {
        weight: Tensor,
        padding: usize,
        stride: usize,
        input_hw: (usize, usize),
    },
}

/// The custom op: its forward hands over the precomputed output (taken, so the graph does not
/// keep a second copy), its backward computes `dX`.
struct Bridge {
    output: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl CustomOp1 for Bridge {
    fn name(&self) -> &'static str {
        match self.backward {
            Backward::Linear { .. } => "frozen-linear",
            Backward::Conv2d { .. } => "frozen-conv2d",
        }
    }

    fn cpu_fwd(
        &self,
        _storage: &CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        hand_over(&self.output, "frozen layer")
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dx = match &self.backward {
            Backward::Linear { weight } => {
                let out = weight.dim(0)?;
                let rows = grad.elem_count() / out.max(1);
                grad.reshape((rows, out))?
                    .matmul(&weight.to_dtype(grad.dtype())?)?
                    .reshape(arg.shape())?
            }
            Backward::Conv2d {
                weight,
                padding,
                stride,
                input_hw,
            } => conv2d_input_grad(grad, weight, *padding, *stride, *input_hw)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        };
        Ok(Some(dx))
    }
}

/// The result of a custom op whose forward ran before the op entered candle's graph (our ops
/// compute with tensors, then hand the result over): taken out of `slot`, once, as candle's
/// forward output. `op` names the op in errors.
pub(crate) fn hand_over(
    slot: &Mutex<Option<Tensor>>,
    op: &str,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let y = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: forward ran twice")))?;
    Ok((cpu_storage(&y)?, y.shape().clone()))
}

/// A contiguous copy of a CPU tensor's elements as a `CpuStorage`.
pub(crate) fn cpu_storage(t: &Tensor) -> candle_core::Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::F64 => CpuStorage::F64(t.to_vec1()?),
        DType::F16 => CpuStorage::F16(t.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec1()?),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "frozen layer: unsupported dtype {other:?}"
            )))
        }
    })
}

/// `dX` of a convolution: `col2im(Wᵀ · dY)`. `grad: [B, out, Ho, Wo]`, `weight: [out, in, k, k]`
/// → `[B, in, H, W]` with `(H, W) = input_hw`.
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    input_hw: (usize, usize),
) -> Result<Tensor> {
    let (b, c_out, ho, wo) = grad.dims4()?;
    let (_, c_in, k, _) = weight.dims4()?;
    let (h, w) = input_hw;
    let weight = weight.to_dtype(grad.dtype())?;
    // [out, B·Ho·Wo]: batch merged into the columns, one product for the whole batch.
    let g = grad
        .transpose(0, 1)?
        .contiguous()?
        .reshape((c_out, b * ho * wo))?;
    let wt = weight.reshape((c_out, c_in * k * k))?.t()?;
    let cols = wt.matmul(&g)?; // [in·k·k, B·Ho·Wo]
    if k == 1 && stride == 1 && padding == 0 {
        return Ok(cols
            .reshape((c_in, b, h, w))?
            .transpose(0, 1)?
            .contiguous()?);
    }
    let op = Col2Im(ConvGeometry {
        b,
        c_in,
        k,
        h,
        w,
        ho,
        wo,
        stride,
        padding,
    });
    Ok(cols.apply_op1_no_bwd(&op)?)
}

/// Scatters the columns `[in·k·k, B·Ho·Wo]` of an unfolded convolution back onto the input grid
/// `[B, in, H, W]`, adding where windows overlap.
struct Col2Im(ConvGeometry);

impl Col2Im {
    fn run<T: Copy + Default + std::ops::AddAssign + Send + Sync>(&self, cols: &[T]) -> Vec<T> {
        let ConvGeometry {
            b,
            c_in,
            k,
            h,
            w,
            ho,
            wo,
            stride,
            padding,
        } = self.0;
        let plane = h * w;
        let ncols = b * ho * wo;
        let mut out = vec![T::default(); b * c_in * plane];
        // One task per (sample, input channel): each owns its output plane.
        out.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
            let (n, c) = (i / c_in, i % c_in);
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[(c * k * k + ky * k + kx) * ncols + n * ho * wo..][..ho * wo];
                    for oy in 0..ho {
                        let y = (oy * stride + ky) as isize - padding as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let dst_row = &mut dst[y as usize * w..][..w];
                        let src_row = &row[oy * wo..][..wo];
                        for (ox, v) in src_row.iter().enumerate() {
                            let x = (ox * stride + kx) as isize - padding as isize;
                            if x >= 0 && x < w as isize {
                                dst_row[x as usize] += *v;
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = layout.shape().elem_count();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("col2im: columns not contiguous".into()))?;
        if end - start != n {
            return Err(candle_core::Error::Msg("col2im: wrong column count".into()));
        }
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end])),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end])),
            CpuStorage::F16(v) => CpuStorage::F16(self.run(&v[start..end])),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run(&v[start..end])),
            _ => {
                return Err(candle_core::Error::Msg(
                    "col2im: unsupported dtype (f32, f64, f16, bf16 only)".into(),
                ))
            }
        };
        let g = self.0;
        Ok((out, Shape::from((g.b, g.c_in, g.h, g.w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::GradCheck;
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use crate::models::random_weights::randn;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
    }

    /// A loss that weights every output element differently, so that a wrong gradient layout shows.
    fn weighted_sum(y: &Tensor, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = randn(&mut rng, y.dims(), 1.0, 0.0)?;
        Ok((y * w)?.sum_all()?)
    }

    #[test]
    fn linear_gives_candles_output_and_input_gradient_and_no_weight_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 5], 1.0, 0.0)?)?;
        let weight = Var::from_tensor(&randn(&mut rng, &[4, 5], 1.0, 0.0)?)?;
        let bias = randn(&mut rng, &[4], 1.0, 0.0)?;
        let ours = linear(x.as_tensor(), weight.as_tensor(), Some(&bias))?;
        let plain = linear_plain(x.as_tensor(), weight.as_tensor(), Some(&bias))?;
        assert!(max_diff(&ours, &plain)? < 1e-12);
        let g_ours = weighted_sum(&ours, 7)?.backward()?;
        let g_plain = weighted_sum(&plain, 7)?.backward()?;
        let (dx, want) = (g_ours.get(x.as_tensor()), g_plain.get(x.as_tensor()));
        match (dx, want) {
            (Some(dx), Some(want)) => assert!(max_diff(dx, want)? < 1e-12),
            _ => panic!("no input gradient"),
        }
        assert!(
            g_ours.get(weight.as_tensor()).is_none(),
            "frozen weight got a gradient"
        );
        assert!(g_plain.get(weight.as_tensor()).is_some());
        Ok(())
    }

    /// Input gradient of a frozen convolution against finite differences, including strides
    /// with odd sizes and sides of different parity (candle's own backward fails on those).
    #[test]
    fn conv2d_input_gradient_matches_finite_differences() -> Result<()> {
        let cases = [
            // (c_in, c_out, k, stride, padding, h, w)
            (3, 4, 3, 1, 1, 6, 5),
            (3, 4, 3, 2, 1, 8, 8),
            (3, 4, 3, 2, 1, 7, 8),
            (2, 3, 3, 2, 0, 9, 6),
            (3, 2, 1, 1, 0, 4, 3),
            (2, 2, 1, 2, 0, 5, 4),
        ];
        for (i, &(c_in, c_out, k, stride, padding, h, w)) in cases.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
            let x = Var::from_tensor(&randn(&mut rng, &[2, c_in, h, w], 1.0, 0.0)?)?;
            let weight = randn(&mut rng, &[c_out, c_in, k, k], 1.0, 0.0)?;
            let bias = randn(&mut rng, &[c_out], 1.0, 0.0)?;
            let loss = || -> Result<Tensor> {
                let y = conv2d(x.as_tensor(), &weight, Some(&bias), padding, stride)?;
                let plain = conv2d_plain(
                    &x.as_tensor().detach(),
                    &weight,
                    Some(&bias),
                    padding,
                    stride,
                )?;
                assert!(max_diff(&y, &plain)? < 1e-12);
                weighted_sum(&y, 3)
            };
            let check = GradCheck {
                samples: 12,
                ..GradCheck::default()
            };
            let failures = check.failures(loss, &[(format!("case {i} x"), x.clone())])?;
            assert!(failures.is_empty(), "{failures:?}");
        }
        Ok(())
    }

    #[test]
    fn conv2d_input_gradient_equals_candles_where_candle_has_one() -> Result<()> {
        for (stride, padding, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1)] {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 8, 6], 1.0, 0.0)?)?;
            let weight = randn(&mut rng, &[5, 3, k, k], 1.0, 0.0)?;
            let ours = conv2d(x.as_tensor(), &weight, None, padding, stride)?;
            let plain = conv2d_plain(x.as_tensor(), &weight, None, padding, stride)?;
            let g_ours = weighted_sum(&ours, 9)?.backward()?;
            let g_plain = weighted_sum(&plain, 9)?.backward()?;
            match (g_ours.get(x.as_tensor()), g_plain.get(x.as_tensor())) {
                (Some(a), Some(b)) => assert!(max_diff(a, b)? < 1e-10, "stride {stride}"),
                _ => panic!("no input gradient"),
            }
        }
        Ok(())
    }

    #[test]
    fn the_path_is_chosen_by_device_switch_and_trainable_weights() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2), DType::F32, &dev)?;
        let w = Tensor::zeros((2, 2), DType::F32, &dev)?;
        assert!(applies_to(&x, &w, None));
        assert!(!with_plain_ops(|| applies_to(&x, &w, None)));
        assert!(applies_to(&x, &w, None));
        let trainable = Var::from_tensor(&w)?;
        assert!(!applies_to(&x, trainable.as_tensor(), None));
        assert!(!applies_to(&x, &w, Some(trainable.as_tensor())));
        Ok(())
    }
}
