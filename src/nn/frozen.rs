//! Linear and convolution with frozen weights, as candle custom ops whose backward returns the
//! input gradient only.
//!
//! candle's own `matmul`/`conv2d` backward computes a gradient for every operand (DESIGN.md §7):
//! each frozen weight costs a full `dW` in time, and the gradients of untracked operands (the
//! weight, the broadcast bias) stay in the `GradStore` until backward ends. Here a one-input
//! custom op computes the layer's forward as one matrix product straight into its output buffer
//! (prefilled with the bias, so no extra pass), and its backward computes `dX` and nothing else.
//! LoRA adapters keep their own, ordinary path, so their gradients flow as before.
//!
//! The convolution's forward is `W [out, in·k·k] · im2col(x)`; its `dX` is `col2im(Wᵀ · dY)`:
//! one matrix product with the weight read transposed in place (no flipped copy of the kernel),
//! then the columns are scattered back onto the input grid. This handles any stride and padding,
//! odd and even sizes alike, and replaces candle's `conv_transpose2d` (a direct loop on the CPU).
//!
//! Only f32/f64 CPU tensors take this path ([`applies_to`]); on other devices and dtypes the
//! layers use candle's ordinary ops.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::adapter::LowRank;
use super::bf16_matmul::{self, Orientation};
use super::dense::{self, product, slice, with_slice, Elem, Mat, Start, Threads};

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

/// Runs `f` with `flag` set on this thread, then restores it.
fn with_flag<T>(flag: &'static std::thread::LocalKey<Cell<bool>>, f: impl FnOnce() -> T) -> T {
    let before = flag.with(|p| p.replace(true));
    let out = f();
    flag.with(|p| p.set(before));
    out
}

/// Runs `f` with the custom ops off on this thread only (tests compare both paths).
pub fn with_plain_ops<T>(f: impl FnOnce() -> T) -> T {
    with_flag(&PLAIN_HERE, f)
}

/// Whether the custom ops are on for this thread (the process-wide switch and
/// [`with_plain_ops`]).
pub fn enabled_here() -> bool {
    ENABLED.load(Ordering::Relaxed) && !PLAIN_HERE.with(Cell::get)
}

thread_local! {
    static GENERIC_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the CPU kernels (this module's, [`super::mem_attention`]'s, the fused norms
/// and GEGLU) off on this thread, and the device-generic paths of [`super::frozen_generic`],
/// [`super::chunked_attention`], [`super::norm_generic`] and [`super::geglu::geglu_generic`] on:
/// on the CPU, the path a CUDA device takes (tests, `bench --generic-ops`).
pub fn with_generic_ops<T>(f: impl FnOnce() -> T) -> T {
    with_flag(&GENERIC_HERE, f)
}

/// Whether the CPU kernels are on for this thread ([`enabled_here`] and not
/// [`with_generic_ops`]).
pub fn cpu_kernels_here() -> bool {
    enabled_here() && !GENERIC_HERE.with(Cell::get)
}

/// Whether a layer with input `x` and these parameters takes the custom-op path: a CPU input in
/// f32 or f64 with parameters of the same dtype (or a weight kept in f16/bf16 under an f32
/// input), the ops enabled, and no parameter that wants a
/// gradient (a weight that is a `Var`, as in the models' gradient checks, keeps candle's ops and
/// gets its gradient).
pub fn applies_to(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && readable_as(weight.dtype(), x.dtype())
        && bias.is_none_or(|b| b.dtype() == x.dtype())
        && cpu_kernels_here()
        && !weight.track_op()
        && !bias.is_some_and(Tensor::track_op)
}

/// Whether the kernels read a weight of `stored` dtype in `compute`: the same dtype, or f16/bf16
/// widened to f32 ([`dense::with_weight`]).
fn readable_as(stored: DType, compute: DType) -> bool {
    stored == compute || (compute == DType::F32 && matches!(stored, DType::F16 | DType::BF16))
}

/// `y = x Wᵀ + b` with `W: [out, in]` frozen; `x: [..., in]` → `[..., out]` (f32 or f64, one
/// dtype throughout).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_add(x, weight, bias, None)
}

/// [`linear`] added to `residual` (the output's shape) in one op, when there is one.
pub fn linear_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let flops = 2 * x.elem_count() as u64 * weight.dim(0)? as u64;
    let _t = super::profile::scope_flops("frozen linear", flops);
    let (out, in_features) = weight.dims2()?;
    if x.dim(D::Minus1)? != in_features {
        return Err(candle_core::Error::Msg(format!(
            "linear: input {:?} does not end in the weight's {in_features} input features",
            x.dims()
        ))
        .into());
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    apply(
        x,
        weight,
        bias,
        Layer::Linear { out },
        Shape::from(dims),
        residual,
    )
}

/// Whether a low-rank adapter can join [`linear_low_rank`]: its matrices on the CPU in `x`'s
/// dtype (the layer itself must pass [`applies_to`]).
pub fn low_rank_applies(x: &Tensor, low_rank: &LowRank) -> bool {
    [&low_rank.down, &low_rank.up]
        .iter()
        .all(|t| t.dtype() == x.dtype() && t.device().is_cpu())
}

/// [`linear`] plus its low-rank adapter in one op, `x Wᵀ + b + s · (x downᵀ) upᵀ`: the same
/// maths as adding the adapter's own output, without the three full-size tensors (the layer's
/// output, the adapter's and their sum) that the separate path keeps for backward. Backward
/// gives `dX`, `d down` and `d up`.
pub fn linear_low_rank(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    low_rank: &LowRank,
) -> Result<Tensor> {
    let (out, in_features) = weight.dims2()?;
    let rank = low_rank.down.dim(0)?;
    let flops = 2 * x.elem_count() as u64 * (out + rank) as u64;
    let _t = super::profile::scope_flops("frozen linear + lora", flops);
    if x.dim(D::Minus1)? != in_features
        || low_rank.down.dims() != [rank, in_features]
        || low_rank.up.dims() != [out, rank]
    {
        return Err(candle_core::Error::Msg(format!(
            "linear: input {:?}, weight {:?}, lora down {:?} and up {:?} do not fit",
            x.dims(),
            weight.dims(),
            low_rank.down.dims(),
            low_rank.up.dims()
        ))
        .into());
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    let op = LowRankLinear {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale: low_rank.scale,
        out,
        output: Shape::from(dims),
    };
    let x = x.contiguous()?;
    let (down, up) = (low_rank.down.contiguous()?, low_rank.up.contiguous()?);
    Ok(if x.track_op() || down.track_op() || up.track_op() {
        x.apply_op3(&down, &up, op)?
    } else {
        x.apply_op3_no_bwd(&down, &up, &op)?
    })
}

/// The custom op of [`linear_low_rank`] on `(x, down, up)`.
struct LowRankLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    out: usize,
    output: Shape,
}

const LOW_RANK: &str = "frozen linear + lora";

impl LowRankLinear {
    fn forward<T: Elem>(&self, x: &[T], down: &[T], up: &[T]) -> candle_core::Result<Vec<T>> {
        dense::with_weight(&self.weight, LOW_RANK, |w| {
            let run =
                |b: Option<&[T]>| dense::linear_low_rank(x, w, b, down, up, self.scale, self.out);
            match &self.bias {
                Some(bias) => with_slice(bias, LOW_RANK, |b| Ok(run(Some(b)))),
                None => Ok(run(None)),
            }
        })
    }

    fn backward<T: Elem>(
        &self,
        [x, down, up]: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let want_dx = x.track_op();
        let (dx, d_down, d_up) = with_slice::<T, _>(x, LOW_RANK, |xs| {
            with_slice::<T, _>(down, LOW_RANK, |ds| {
                with_slice::<T, _>(up, LOW_RANK, |us| {
                    with_slice::<T, _>(grad, LOW_RANK, |gs| {
                        dense::with_weight::<T, _>(&self.weight, LOW_RANK, |ws| {
                            Ok(dense::linear_low_rank_grads(
                                xs, ws, ds, us, gs, self.scale, self.out, want_dx,
                            ))
                        })
                    })
                })
            })
        })?;
        let cpu = candle_core::Device::Cpu;
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), &cpu))
                .transpose()?,
            Tensor::from_vec(d_down, down.shape(), &cpu)?,
            Tensor::from_vec(d_up, up.shape(), &cpu)?,
        ))
    }
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-low-rank"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.forward(
                    slice(s1, l1, LOW_RANK)?,
                    slice(s2, l2, LOW_RANK)?,
                    slice(s3, l3, LOW_RANK)?,
                )?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.forward(
                    slice(s1, l1, LOW_RANK)?,
                    slice(s2, l2, LOW_RANK)?,
                    slice(s3, l3, LOW_RANK)?,
                )?)
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{LOW_RANK}: x, down and up must all be f32 or all f64"
                )))
            }
        };
        Ok((out, self.output.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, in_f) = (
            self.out as u64,
            (self.weight.elem_count() / self.out.max(1)) as u64,
        );
        let flops = 2 * (grad.elem_count() as u64 / out.max(1)) * in_f * out;
        let _t = super::profile::scope_flops("frozen linear + lora backward", flops);
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let args = [x, down, up];
        let (dx, d_down, d_up) = match x.dtype() {
            DType::F32 => self.backward::<f32>(args, &grad)?,
            DType::F64 => self.backward::<f64>(args, &grad)?,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{LOW_RANK}: unsupported dtype {other:?}"
                )))
            }
        };
        Ok((dx, Some(d_down), Some(d_up)))
    }
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
/// `x: [B, in, H, W]` → `[B, out, H', W']` (f32 or f64, one dtype throughout).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    conv2d_add(x, weight, bias, padding, stride, None)
}

/// [`conv2d`] added to `residual` (the output's shape) in one op, when there is one.
pub fn conv2d_add(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let _t = super::profile::scope_flops("frozen conv", conv_flops(x, weight, padding, stride)?);
    let (b, c_in, h, w) = x.dims4()?;
    let (c_out, c_in_w, k, k2) = weight.dims4()?;
    if c_in_w != c_in || k2 != k || stride == 0 || h + 2 * padding < k || w + 2 * padding < k {
        return Err(candle_core::Error::Msg(format!(
            "conv2d: input {:?} does not fit kernel {:?} (padding {padding}, stride {stride})",
            x.dims(),
            weight.dims()
        ))
        .into());
    }
    let geometry = ConvGeometry {
        b,
        c_in,
        k,
        h,
        w,
        ho: (h + 2 * padding - k) / stride + 1,
        wo: (w + 2 * padding - k) / stride + 1,
        stride,
        padding,
    };
    let shape = Shape::from((b, c_out, geometry.ho, geometry.wo));
    apply(
        x,
        weight,
        bias,
        Layer::Conv { geometry, c_out },
        shape,
        residual,
    )
}

/// The multiply-add FLOPs of a convolution's forward.
fn conv_flops(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<u64> {
    let (b, _, h, w) = x.dims4()?;
    let (c_out, c_in, k, _) = weight.dims4()?;
    let side = |n: usize| (n + 2 * padding).saturating_sub(k) / stride.max(1) + 1;
    Ok(2 * (b * c_out * side(h) * side(w) * c_in * k * k) as u64)
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

/// Runs `layer` on `x` as a custom op (one with a backward when `x` or the residual needs a
/// gradient), added to `residual` when there is one.
fn apply(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    layer: Layer,
    output: Shape,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = Frozen {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        layer,
        output,
    };
    let x = x.contiguous()?;
    Ok(match residual {
        None if x.track_op() => x.apply_op1(op)?,
        None => x.apply_op1_no_bwd(&op)?,
        Some(r) => {
            if r.dims() != op.output.dims() || r.dtype() != x.dtype() {
                return Err(candle_core::Error::Msg(format!(
                    "{}: residual {:?} ({:?}) does not match the output {:?} ({:?})",
                    layer.name(),
                    r.dims(),
                    r.dtype(),
                    op.output.dims(),
                    x.dtype()
                ))
                .into());
            }
            let r = r.contiguous()?;
            if x.track_op() || r.track_op() {
                x.apply_op2(&r, FrozenResidual(op))?
            } else {
                x.apply_op2_no_bwd(&r, &FrozenResidual(op))?
            }
        }
    })
}

/// Which frozen layer, with what it needs besides its parameters.
#[derive(Debug, Clone, Copy)]
enum Layer {
    Linear {
        out: usize,
    },
    Conv {
        geometry: ConvGeometry,
        c_out: usize,
    },
}

impl Layer {
    fn name(&self) -> &'static str {
        match self {
            Layer::Linear { .. } => "frozen linear",
            Layer::Conv { .. } => "frozen conv",
        }
    }
}

/// The custom op of a frozen layer: forward is one product into the output buffer (the bias
/// prefilled), backward the input gradient only.
struct Frozen {
    weight: Tensor,
    bias: Option<Tensor>,
    layer: Layer,
    output: Shape,
}

/// A linear layer's output width when its products run in bf16 ([`bf16_matmul`]): a weight kept
/// in bf16 on a processor that multiplies bf16.
fn bf16_linear(layer: Layer, weight: &Tensor) -> Option<usize> {
    match layer {
        Layer::Linear { out } if weight.dtype() == DType::BF16 && bf16_matmul::available() => {
            Some(out)
        }
        _ => None,
    }
}

impl Frozen {
    fn check_residual<T>(&self, residual: Option<&[T]>) -> candle_core::Result<()> {
        if residual.is_some_and(|r| r.len() != self.output.elem_count()) {
            return Err(candle_core::Error::Msg(format!(
                "{}: the residual does not have the output's shape {:?}",
                self.layer.name(),
                self.output.dims()
            )));
        }
        Ok(())
    }

    /// [`Frozen::forward`] for an f32 input: in bf16 ([`bf16_matmul`]) when the weight is kept
    /// in bf16 and the processor multiplies bf16, else widened.
    fn forward_f32(&self, x: &[f32], residual: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let Some(out) = bf16_linear(self.layer, &self.weight) else {
            return self.forward(x, residual);
        };
        self.check_residual(residual)?;
        let name = self.layer.name();
        let inp = self.weight.dim(1)?;
        let rows = x.len() / inp.max(1);
        let fill = |bias: Option<&[f32]>| Start { bias, residual }.fill(rows, out, 1);
        let mut y = match &self.bias {
            Some(bias) => with_slice(bias, name, |b| Ok(fill(Some(b))))?,
            None => fill(None),
        };
        with_slice::<half::bf16, _>(&self.weight, name, |w| {
            bf16_matmul::add_product(x, w, (out, inp), Orientation::Transposed, &mut y);
            Ok(())
        })?;
        Ok(y)
    }

    /// The layer's output for `x`, added to `residual` when there is one.
    fn forward<T: Elem>(&self, x: &[T], residual: Option<&[T]>) -> candle_core::Result<Vec<T>> {
        let name = self.layer.name();
        self.check_residual(residual)?;
        dense::with_weight(&self.weight, name, |w| {
            let run = |bias: Option<&[T]>| {
                let start = Start { bias, residual };
                match self.layer {
                    Layer::Linear { out } => dense::linear_from(x, w, start, out),
                    Layer::Conv { geometry, c_out } => conv_forward(geometry, x, w, start, c_out),
                }
            };
            match &self.bias {
                Some(bias) => with_slice(bias, name, |b| Ok(run(Some(b)))),
                None => Ok(run(None)),
            }
        })
    }
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        match self.layer {
            Layer::Linear { .. } => "frozen-linear",
            Layer::Conv { .. } => "frozen-conv2d",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.layer.name();
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward_f32(slice(storage, layout, name)?, None)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(slice(storage, layout, name)?, None)?)
            }
            _ => return Err(candle_core::Error::Msg(format!("{name}: f32 and f64 only"))),
        };
        Ok((out, self.output.clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.input_grad(arg, grad).map(Some)
    }
}

impl Frozen {
    fn input_grad(&self, arg: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        // The input gradient is one product of the forward's size: dY's elements times the
        // weight's fan-in.
        let fan_in = self.weight.elem_count() / self.weight.dim(0)?.max(1);
        let flops = 2 * grad.elem_count() as u64 * fan_in as u64;
        let name = match self.layer {
            Layer::Linear { .. } => "frozen linear backward",
            Layer::Conv { .. } => "frozen conv backward",
        };
        let _t = super::profile::scope_flops(name, flops);
        let op = InputGrad {
            weight: self.weight.clone(),
            layer: self.layer,
            input: arg.shape().clone(),
        };
        grad.to_dtype(arg.dtype())?
            .contiguous()?
            .apply_op1_no_bwd(&op)
    }
}

/// A frozen layer whose output is added to a residual, `layer(x) + r`, as one op on `(x, r)`:
/// the layer's own output is never a separate tensor (the separate add would keep it for
/// backward). Backward: `dX` as for the layer, `dR = dY`.
struct FrozenResidual(Frozen);

impl CustomOp2 for FrozenResidual {
    fn name(&self) -> &'static str {
        match self.0.layer {
            Layer::Linear { .. } => "frozen-linear-residual",
            Layer::Conv { .. } => "frozen-conv2d-residual",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.0.layer.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(
                self.0
                    .forward_f32(slice(s1, l1, name)?, Some(slice(s2, l2, name)?))?,
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(
                self.0
                    .forward(slice(s1, l1, name)?, Some(slice(s2, l2, name)?))?,
            ),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{name}: input and residual must both be f32 or both f64"
                )))
            }
        };
        Ok((out, self.0.output.clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(self.0.input_grad(x, grad)?)
        } else {
            None
        };
        Ok((dx, Some(grad.to_dtype(residual.dtype())?)))
    }
}

/// `dX` of a frozen layer from `dY` (a custom op without backward, to reach the CPU slices).
struct InputGrad {
    weight: Tensor,
    layer: Layer,
    input: Shape,
}

impl InputGrad {
    /// [`InputGrad::run`] for f32: `dY W` in bf16 when the layer's forward ran in bf16.
    fn run_f32(&self, grad: &[f32]) -> candle_core::Result<Vec<f32>> {
        let Some(out) = bf16_linear(self.layer, &self.weight) else {
            return self.run(grad);
        };
        let inp = self.weight.dim(1)?;
        let mut dx = vec![0f32; grad.len() / out.max(1) * inp];
        with_slice::<half::bf16, _>(&self.weight, self.layer.name(), |w| {
            bf16_matmul::add_product(grad, w, (out, inp), Orientation::AsIs, &mut dx);
            Ok(())
        })?;
        Ok(dx)
    }

    fn run<T: Elem>(&self, grad: &[T]) -> candle_core::Result<Vec<T>> {
        dense::with_weight(&self.weight, self.layer.name(), |w| {
            Ok(match self.layer {
                Layer::Linear { out } => dense::linear_input_grad(grad, w, out),
                Layer::Conv { geometry, c_out } => conv_input_grad(geometry, grad, w, c_out),
            })
        })
    }
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-input-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.layer.name();
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(self.run_f32(slice(storage, layout, name)?)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(slice(storage, layout, name)?)?),
            _ => return Err(candle_core::Error::Msg(format!("{name}: f32 and f64 only"))),
        };
        Ok((out, self.input.clone()))
    }
}

/// The most elements of one block of convolution columns (`in·k·k × rows·Wo`): 4 Mi, 16 MiB in
/// f32. Unfolding a whole 512 px level-0 input at once takes 47–141 MiB, above glibc's mmap
/// threshold (32 MiB even as [`super::runtime::tune_process`] sets it), so every call mapped
/// fresh pages and faulted them in (the product ran at ~60 % speed into them) and held that much
/// more at the step's peak. A block below the threshold is reused from the heap.
const COLUMN_BLOCK_ELEMENTS: usize = 4 << 20;

/// The fewest output positions (columns) a block of columns has when the input has that many:
/// the products lose speed on narrower blocks (measured: blocks of 480–700 columns made the
/// 256 px convolutions ~10 % slower than unblocked ones).
const MIN_BLOCK_COLUMNS: usize = 1024;

/// Output rows per block of columns: as many as fit `budget` elements, but at least
/// [`MIN_BLOCK_COLUMNS`] columns' worth, at least one, at most all.
fn rows_per_block(g: &ConvGeometry, budget: usize, min_columns: usize) -> usize {
    let fan_in = g.c_in * g.k * g.k;
    let fit = budget / (fan_in * g.wo).max(1);
    let wide = min_columns.div_ceil(g.wo.max(1));
    fit.max(wide).clamp(1, g.ho.max(1))
}

/// A convolution's forward as `W [out, in·k·k] · im2col(x)`, per sample and block of output
/// rows, into `[B, out, Ho·Wo]` prefilled with the bias. 1×1 kernels with stride 1 and no
/// padding read `x` as the columns.
fn conv_forward<T: Elem>(
    g: ConvGeometry,
    x: &[T],
    w: &[T],
    start: Start<T>,
    c_out: usize,
) -> Vec<T> {
    conv_forward_blocked(
        g,
        x,
        w,
        start,
        c_out,
        COLUMN_BLOCK_ELEMENTS,
        MIN_BLOCK_COLUMNS,
    )
}

/// [`conv_forward`] with blocks of at most `budget` column elements and at least `min_columns`
/// columns (see [`rows_per_block`]).
fn conv_forward_blocked<T: Elem>(
    g: ConvGeometry,
    x: &[T],
    w: &[T],
    start: Start<T>,
    c_out: usize,
    budget: usize,
    min_columns: usize,
) -> Vec<T> {
    let fan_in = g.c_in * g.k * g.k;
    let hw_out = g.ho * g.wo;
    let mut y = start.fill(g.b, c_out, hw_out);
    let one = T::from_f64(1.0);
    if g.pointwise() {
        for n in 0..g.b {
            // SAFETY: w is out × in; sample n of x is in × H·W; y's block of sample n is
            // out × Ho·Wo (= H·W).
            unsafe {
                product(
                    (c_out, hw_out, fan_in),
                    y.as_mut_ptr().add(n * c_out * hw_out),
                    hw_out,
                    Mat::rows(w, fan_in),
                    Mat::rows(&x[n * fan_in * hw_out..], hw_out),
                    one,
                    start.any(),
                    Threads::All,
                )
            };
        }
        return y;
    }
    each_column_block(g, budget, min_columns, |n, oy0, cols| {
        let nb = cols.len() / fan_in;
        {
            let _t = super::profile::scope("im2col (in frozen conv)");
            Im2Col(g).fill(x, n, oy0, cols);
        }
        // SAFETY: w is out × in·k·k; the block's columns are in·k·k × nb; y's block is
        // out × nb with row stride Ho·Wo, starting at sample n, output row oy0.
        unsafe {
            product(
                (c_out, nb, fan_in),
                y.as_mut_ptr().add(n * c_out * hw_out + oy0 * g.wo),
                hw_out,
                Mat::rows(w, fan_in),
                Mat::rows(cols, nb),
                one,
                start.any(),
                Threads::All,
            )
        };
    });
    y
}

/// `dX` of a convolution: `col2im(Wᵀ · dY)` per sample and block of output rows (1×1 kernels
/// with stride 1 and no padding write `Wᵀ · dY` straight into `dX`). `grad: [B, out, Ho·Wo]` →
/// `[B, in, H·W]`.
fn conv_input_grad<T: Elem>(g: ConvGeometry, grad: &[T], w: &[T], c_out: usize) -> Vec<T> {
    conv_input_grad_blocked(g, grad, w, c_out, COLUMN_BLOCK_ELEMENTS, MIN_BLOCK_COLUMNS)
}

/// [`conv_input_grad`] with blocks as in [`conv_forward_blocked`].
fn conv_input_grad_blocked<T: Elem>(
    g: ConvGeometry,
    grad: &[T],
    w: &[T],
    c_out: usize,
    budget: usize,
    min_columns: usize,
) -> Vec<T> {
    let fan_in = g.c_in * g.k * g.k;
    let hw_out = g.ho * g.wo;
    let plane = g.c_in * g.h * g.w;
    let mut dx = vec![T::default(); g.b * plane];
    let one = T::from_f64(1.0);
    if g.pointwise() {
        for n in 0..g.b {
            // SAFETY: Wᵀ is in × out (w read transposed); dY of sample n is out × H·W; dX's
            // block of sample n is in × H·W.
            unsafe {
                product(
                    (fan_in, hw_out, c_out),
                    dx.as_mut_ptr().add(n * plane),
                    hw_out,
                    Mat::transposed(w, fan_in),
                    Mat::rows(&grad[n * c_out * hw_out..], hw_out),
                    one,
                    false,
                    Threads::All,
                )
            };
        }
        return dx;
    }
    each_column_block(g, budget, min_columns, |n, oy0, cols| {
        let nb = cols.len() / fan_in;
        // SAFETY: Wᵀ is in·k·k × out (w read transposed); dY's block (sample n, output
        // rows from oy0) is out × nb with row stride Ho·Wo; the columns are in·k·k × nb.
        unsafe {
            product(
                (fan_in, nb, c_out),
                cols.as_mut_ptr(),
                nb,
                Mat::transposed(w, fan_in),
                Mat::rows(&grad[n * c_out * hw_out + oy0 * g.wo..], hw_out),
                one,
                false,
                Threads::All,
            )
        };
        let _t = super::profile::scope("col2im (in conv backward)");
        Col2Im(g).add(cols, oy0, &mut dx[n * plane..][..plane]);
    });
    dx
}

/// Calls `f(sample, first output row, columns)` for each block of output rows of each sample,
/// with a column buffer (`in·k·k × rows·Wo`) reused from block to block (see
/// [`rows_per_block`]).
fn each_column_block<T: Copy + Default>(
    g: ConvGeometry,
    budget: usize,
    min_columns: usize,
    mut f: impl FnMut(usize, usize, &mut [T]),
) {
    let fan_in = g.c_in * g.k * g.k;
    let rows = rows_per_block(&g, budget, min_columns);
    let mut cols = vec![T::default(); fan_in * rows * g.wo];
    for n in 0..g.b {
        for oy0 in (0..g.ho).step_by(rows) {
            let nb = rows.min(g.ho - oy0) * g.wo;
            f(n, oy0, &mut cols[..fan_in * nb]);
        }
    }
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

impl ConvGeometry {
    /// A 1×1 kernel with stride 1 and no padding: the input is its own column matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Unfolds the output rows `oy0..` of sample `n` of `[B, in, H, W]` into columns
/// `[in·k·k, rows·Wo]` (zeros where a window leaves the padded input): the inverse bookkeeping
/// of [`Col2Im`].
struct Im2Col(ConvGeometry);

impl Im2Col {
    /// Writes every element of `cols` (`in·k·k × rows·Wo`, the row count read from its length).
    fn fill<T: Copy + Default + Send + Sync>(&self, x: &[T], n: usize, oy0: usize, cols: &mut [T]) {
        let ConvGeometry {
            c_in,
            k,
            h,
            w,
            wo,
            stride,
            padding,
            ..
        } = self.0;
        let nb = cols.len() / (c_in * k * k).max(1);
        // One task per row (input channel, ky, kx).
        cols.par_chunks_mut(nb.max(1))
            .enumerate()
            .for_each(|(r, dst)| {
                let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
                let src = &x[(n * c_in + c) * h * w..][..h * w];
                for (i, out_row) in dst.chunks_exact_mut(wo).enumerate() {
                    let y = ((oy0 + i) * stride + ky) as isize - padding as isize;
                    if y < 0 || y >= h as isize {
                        out_row.fill(T::default());
                        continue;
                    }
                    let src_row = &src[y as usize * w..][..w];
                    for (ox, o) in out_row.iter_mut().enumerate() {
                        let xx = (ox * stride + kx) as isize - padding as isize;
                        *o = if xx >= 0 && xx < w as isize {
                            src_row[xx as usize]
                        } else {
                            T::default()
                        };
                    }
                }
            });
    }
}

/// Scatters the columns `[in·k·k, rows·Wo]` of output rows `oy0..` of one sample back onto its
/// input grid `[in, H, W]`, adding where windows overlap.
struct Col2Im(ConvGeometry);

impl Col2Im {
    fn add<T: Copy + std::ops::AddAssign + Send + Sync>(
        &self,
        cols: &[T],
        oy0: usize,
        dx: &mut [T],
    ) {
        let ConvGeometry {
            c_in,
            k,
            h,
            w,
            wo,
            stride,
            padding,
            ..
        } = self.0;
        let plane = h * w;
        let nb = cols.len() / (c_in * k * k).max(1);
        // One task per input channel: each owns its plane of dX.
        dx.par_chunks_mut(plane).enumerate().for_each(|(c, dst)| {
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[(c * k * k + ky * k + kx) * nb..][..nb];
                    for (i, src_row) in row.chunks_exact(wo).enumerate() {
                        let y = ((oy0 + i) * stride + ky) as isize - padding as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let dst_row = &mut dst[y as usize * w..][..w];
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
    fn column_blocks_are_bounded_but_not_narrow() {
        let g = |c_in: usize, side: usize| ConvGeometry {
            b: 1,
            c_in,
            k: 3,
            h: side,
            w: side,
            ho: side,
            wo: side,
            stride: 1,
            padding: 1,
        };
        let rows = |c_in, side| rows_per_block(&g(c_in, side), COLUMN_BLOCK_ELEMENTS, 1024);
        // 512 px, level 0: 320 channels fit 22 rows of 64 in 4 Mi elements; 960 channels would
        // fit 7, raised to 16 (1024 columns).
        assert_eq!((rows(320, 64), rows(960, 64)), (22, 16));
        // 256 px: every level-0 convolution is one block.
        assert_eq!((rows(320, 32), rows(960, 32)), (32, 32));
        // Small inputs: one block, never zero rows.
        assert_eq!(rows(1280, 4), 4);
    }

    #[test]
    fn column_blocks_give_the_whole_unfolding_s_results() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        // (in, out, k, padding, stride, H, W), batch 2; budgets of one output row, of a few
        // rows with a shorter last block, and of everything.
        for (ci, co, k, padding, stride, h, w) in [
            (3, 4, 3, 1, 1, 7, 5),
            (2, 3, 3, 1, 2, 9, 8),
            (2, 2, 2, 0, 1, 6, 6),
        ] {
            let ho = (h + 2 * padding - k) / stride + 1;
            let wo = (w + 2 * padding - k) / stride + 1;
            let g = ConvGeometry {
                b: 2,
                c_in: ci,
                k,
                h,
                w,
                ho,
                wo,
                stride,
                padding,
            };
            let x = randn(&mut rng, &[2 * ci * h * w], 1.0, 0.0)?.to_vec1::<f64>()?;
            let wt = randn(&mut rng, &[co * ci * k * k], 1.0, 0.0)?.to_vec1::<f64>()?;
            let dy = randn(&mut rng, &[2 * co * ho * wo], 1.0, 0.0)?.to_vec1::<f64>()?;
            let bias = randn(&mut rng, &[co], 1.0, 0.0)?.to_vec1::<f64>()?;
            let start = || Start {
                bias: Some(&bias[..]),
                residual: None,
            };
            let fan_in = ci * k * k;
            let whole_y = conv_forward_blocked(g, &x, &wt, start(), co, usize::MAX, 1);
            let whole_dx = conv_input_grad_blocked(g, &dy, &wt, co, usize::MAX, 1);
            for budget in [1, 3 * fan_in * wo - 1, usize::MAX / 2] {
                let y = conv_forward_blocked(g, &x, &wt, start(), co, budget, 1);
                let dx = conv_input_grad_blocked(g, &dy, &wt, co, budget, 1);
                let diff = |a: &[f64], b: &[f64]| {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max)
                };
                assert!(diff(&y, &whole_y) < 1e-12, "forward, budget {budget}");
                assert!(diff(&dx, &whole_dx) < 1e-12, "backward, budget {budget}");
            }
            // And the whole unfolding is candle's convolution (its input gradient is checked
            // against finite differences above).
            let dev = Device::Cpu;
            let x_t = Tensor::from_vec(x.clone(), (2, ci, h, w), &dev)?;
            let w_t = Tensor::from_vec(wt.clone(), (co, ci, k, k), &dev)?;
            let b_t = Tensor::from_vec(bias.clone(), co, &dev)?;
            let y_candle = conv2d_plain(&x_t, &w_t, Some(&b_t), padding, stride)?;
            let y_ours = Tensor::from_vec(whole_y, (2, co, ho, wo), &dev)?;
            assert!(max_diff(&y_ours, &y_candle)? < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn linear_with_low_rank_adapter_equals_the_separate_ops_and_their_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // 300 rows: the direct product path of `dense::linear`; 6 rows: the transposed one.
        for rows in [6, 300] {
            let weight = randn(&mut rng, &[7, 5], 1.0, 0.0)?;
            let bias = randn(&mut rng, &[7], 1.0, 0.0)?;
            let down = Var::from_tensor(&randn(&mut rng, &[3, 5], 1.0, 0.0)?)?;
            let up = Var::from_tensor(&randn(&mut rng, &[7, 3], 1.0, 0.0)?)?;
            let low_rank = LowRank {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                scale: 0.75,
            };
            // The input both tracked (a gradient wanted) and not.
            for tracked in [true, false] {
                let x0 = randn(&mut rng, &[2, rows / 2, 5], 1.0, 0.0)?;
                let x = Var::from_tensor(&x0)?;
                let x_in = if tracked {
                    x.as_tensor().clone()
                } else {
                    x0.clone()
                };
                let ours = linear_low_rank(&x_in, &weight, Some(&bias), &low_rank)?;
                let hidden = x_in.broadcast_matmul(&down.as_tensor().t()?)?;
                let plain = (linear_plain(&x_in, &weight, Some(&bias))?
                    + (hidden.broadcast_matmul(&up.as_tensor().t()?)? * 0.75)?)?;
                assert!(max_diff(&ours, &plain)? < 1e-12, "rows {rows}: output");
                let g_ours = weighted_sum(&ours, 8)?.backward()?;
                let g_plain = weighted_sum(&plain, 8)?.backward()?;
                let mut wanted = vec![("down", down.as_tensor()), ("up", up.as_tensor())];
                if tracked {
                    wanted.push(("x", x.as_tensor()));
                } else {
                    assert!(g_ours.get(x.as_tensor()).is_none());
                }
                for (name, t) in wanted {
                    match (g_ours.get(t), g_plain.get(t)) {
                        (Some(a), Some(b)) => {
                            assert!(max_diff(a, b)? < 1e-12, "rows {rows}: d{name}")
                        }
                        _ => panic!("rows {rows}: no gradient for {name}"),
                    }
                }
            }
        }
        Ok(())
    }

    /// `layer(x) + r` in one op against the separate add: output and both gradients, for a
    /// linear layer with few and many rows and a strided convolution with a batch of two.
    #[test]
    fn a_fused_residual_equals_the_separate_add() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![2, 3, 5], vec![4, 5]),
            (vec![2, 150, 5], vec![4, 5]),
            (vec![2, 3, 8, 6], vec![4, 3, 3, 3]),
        ];
        for (x_dims, w_dims) in cases {
            let x = Var::from_tensor(&randn(&mut rng, &x_dims, 1.0, 0.0)?)?;
            let weight = randn(&mut rng, &w_dims, 1.0, 0.0)?;
            let bias = randn(&mut rng, &w_dims[..1], 1.0, 0.0)?;
            let conv = w_dims.len() == 4;
            let plain = if conv {
                conv2d_plain(x.as_tensor(), &weight, Some(&bias), 1, 2)?
            } else {
                linear_plain(x.as_tensor(), &weight, Some(&bias))?
            };
            let r = Var::from_tensor(&randn(&mut rng, plain.dims(), 1.0, 0.0)?)?;
            let want = (&plain + r.as_tensor())?;
            let got = if conv {
                conv2d_add(
                    x.as_tensor(),
                    &weight,
                    Some(&bias),
                    1,
                    2,
                    Some(r.as_tensor()),
                )?
            } else {
                linear_add(x.as_tensor(), &weight, Some(&bias), Some(r.as_tensor()))?
            };
            assert!(max_diff(&got, &want)? < 1e-12, "{x_dims:?}: output");
            let g_got = weighted_sum(&got, 2)?.backward()?;
            let g_want = weighted_sum(&want, 2)?.backward()?;
            for (name, t) in [("x", &x), ("r", &r)] {
                match (g_got.get(t.as_tensor()), g_want.get(t.as_tensor())) {
                    (Some(a), Some(b)) => assert!(max_diff(a, b)? < 1e-10, "{x_dims:?}: d{name}"),
                    _ => panic!("{x_dims:?}: no gradient for {name}"),
                }
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

    /// A weight kept in f16 or bf16 under an f32 input computes exactly as its f32 values do:
    /// outputs and input gradients of the linear layer (both product shapes, with a residual,
    /// with a LoRA), the strided convolution and GEGLU + linear, bit for bit.
    #[test]
    fn a_weight_kept_in_half_precision_computes_as_its_widened_values() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let mut f32_randn = |dims: &[usize]| -> Result<Tensor> {
            Ok(randn(&mut rng, dims, 1.0, 0.0)?.to_dtype(DType::F32)?)
        };
        let down = f32_randn(&[3, 5])?;
        let up = f32_randn(&[7, 3])?;
        let low_rank = LowRank {
            down,
            up,
            scale: 0.5,
        };
        let cases = [
            (vec![2, 3, 5], vec![7, 5]),
            (vec![2, 150, 5], vec![7, 5]),
            (vec![2, 3, 8, 6], vec![7, 3, 3, 3]),
            (vec![2, 3, 10], vec![7, 5]),
        ];
        for half in [DType::F16, DType::BF16] {
            for (i, (x_dims, w_dims)) in cases.iter().enumerate() {
                let stored = f32_randn(w_dims)?.to_dtype(half)?;
                let wide = stored.to_dtype(DType::F32)?;
                let bias = f32_randn(&w_dims[..1])?;
                let x = Var::from_tensor(&f32_randn(x_dims)?)?;
                let residual = f32_randn(&[2, 150, 7])?;
                let run = |w: &Tensor| -> Result<Vec<Tensor>> {
                    let xt = x.as_tensor();
                    let outputs = match i {
                        0 => vec![
                            linear(xt, w, Some(&bias))?,
                            linear_low_rank(xt, w, Some(&bias), &low_rank)?,
                        ],
                        1 => vec![linear_add(xt, w, None, Some(&residual))?],
                        2 => vec![conv2d(xt, w, Some(&bias), 1, 2)?],
                        _ => vec![crate::nn::geglu::geglu_linear(xt, w, Some(&bias), None)?],
                    };
                    let mut all = Vec::new();
                    for (k, y) in outputs.into_iter().enumerate() {
                        let grads =
                            weighted_sum(&y.to_dtype(DType::F64)?, 5 + k as u64)?.backward()?;
                        all.push(y);
                        all.push(grads.get(xt).expect("an input gradient").clone());
                    }
                    Ok(all)
                };
                assert!(applies_to(x.as_tensor(), &stored, Some(&bias)));
                // A bf16 linear layer on a processor that multiplies bf16 rounds its input (and
                // output gradient) to bf16 too (`bf16_matmul`, whose products are tested
                // exactly there): here, within bf16's precision.
                let bf16_products = half == DType::BF16 && bf16_matmul::available() && i <= 1;
                for (a, b) in run(&stored)?.iter().zip(run(&wide)?.iter()) {
                    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
                    let diff = max_diff(&a, &b)?;
                    if bf16_products {
                        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
                        assert!(diff < 2e-2 * scale, "{half:?}, case {i}: {diff}");
                    } else {
                        assert_eq!(diff, 0.0, "{half:?}, case {i}");
                    }
                }
            }
        }
        Ok(())
    }
}
