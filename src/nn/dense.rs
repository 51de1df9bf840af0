//! Matrix products on CPU slices for the fused ops: strided operands read in place, results
//! written straight into the buffer that becomes the op's output.
//!
//! candle's `matmul` allocates and zeroes its output, needs contiguous or simply-transposed
//! operands, and a bias or a scale is one more full pass and allocation. Through `gemm` directly
//! a product reads a head's columns of `[B, N, heads·d]` without a transposed copy, adds into a
//! destination prefilled with the bias, and writes into the `Vec` handed to candle as the op's
//! result.

use candle_core::{CpuStorage, Layout, Storage, Tensor, WithDType};
use gemm::{gemm, Parallelism};

/// The element types of the fused ops (f32 in training, f64 in the gradient checks).
pub(crate) trait Elem: WithDType + Copy + Send + Sync + Default + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}

/// A strided matrix operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub ptr: *const T,
    pub rs: usize,
    pub cs: usize,
}

impl<T> Mat<T> {
    /// Row-major with row stride `rs`, starting at `s[0]`.
    pub fn rows(s: &[T], rs: usize) -> Self {
        Mat {
            ptr: s.as_ptr(),
            rs,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with row stride `rs` starting at `s[0]`.
    pub fn transposed(s: &[T], rs: usize) -> Self {
        Mat {
            ptr: s.as_ptr(),
            rs: 1,
            cs: rs,
        }
    }
}

/// How a product uses the cores: all of rayon's threads, or only the calling one (inside a task
/// that is already one of many in parallel).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    This,
}

/// `dst[m×n] = beta · lhs[m×k] · rhs[k×n]`, or `dst += …` with `accumulate`; `dst` row-major
/// with row stride `dst_rs`.
///
/// # Safety
/// Every pointer must address a live matrix of the given shape and strides; `dst` writable and
/// overlapping neither input nor, while this runs, anything another thread writes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    beta: T,
    accumulate: bool,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        T::from_f64(1.0),
        beta,
        false,
        false,
        false,
        match threads {
            Threads::All => Parallelism::Rayon(0),
            Threads::This => Parallelism::None,
        },
    );
}

/// A raw pointer that rayon tasks may share, each writing a region no other task touches.
#[derive(Clone, Copy)]
pub(crate) struct Shared<T>(pub *mut T);
// SAFETY: only used for disjoint writes, one region per task (see each use).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer; a method, so closures capture the whole `Shared` (which is `Sync`).
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// The contiguous elements of a CPU storage as seen through `layout`.
pub(crate) fn slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input not contiguous")))?;
    Ok(&T::cpu_storage_as_slice(storage)?[start..end])
}

/// Runs `f` on the contiguous elements of a CPU tensor (read-locked meanwhile).
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(slice(cpu, layout, op)?),
        _ => Err(candle_core::Error::Msg(format!("{op}: CPU tensors only"))),
    }
}

thread_local! {
    /// The buffer [`with_weight`] widens half-precision weights into, kept between calls: a
    /// fresh buffer the size of a large weight (SDXL's biggest kernel is 118 MB in f32) is
    /// mapped anew by the allocator and page-faulted in on every call, which measured 7× the
    /// conversion itself. It grows to the largest weight the thread reads.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a frozen weight's elements as `T`: the tensor's own contiguous slice when it is
/// stored as `T`; for a weight kept in f16 or bf16 (half the memory, [`crate::nn::WeightStore::
/// set_matrix_dtype`]) read as f32, its values widened into a per-thread buffer for this call,
/// so that at most one layer's weight is held in f32 at a time.
pub(crate) fn with_weight<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if t.dtype() == T::DTYPE {
        return with_slice(t, op, f);
    }
    // Taken out for the call (a nested call, which no op makes, would get a fresh buffer).
    let mut wide = WIDENED.with(|w| w.take());
    let n = {
        let (storage, layout) = t.storage_and_layout();
        let cpu = match &*storage {
            Storage::Cpu(cpu) => cpu,
            _ => return Err(candle_core::Error::Msg(format!("{op}: CPU tensors only"))),
        };
        match cpu {
            CpuStorage::F16(_) => widen(slice::<half::f16>(cpu, layout, op)?, &mut wide),
            CpuStorage::BF16(_) => widen(slice::<half::bf16>(cpu, layout, op)?, &mut wide),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{op}: a {:?} weight cannot be read as {:?}",
                    t.dtype(),
                    T::DTYPE
                )))
            }
        }
    };
    let wide = CpuStorage::F32(wide);
    let result = T::cpu_storage_as_slice(&wide).and_then(|values| f(&values[..n]));
    if let CpuStorage::F32(buffer) = wide {
        WIDENED.with(|w| w.replace(buffer));
    }
    result
}

/// Writes `src` in f32 to the start of `dst` (grown when shorter), converting blocks across the
/// threads; returns `src.len()`.
fn widen<H>(src: &[H], dst: &mut Vec<f32>) -> usize
where
    H: Sync,
    [H]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    if dst.len() < src.len() {
        dst.resize(src.len(), 0.0);
    }
    dst[..src.len()]
        .par_chunks_mut(BLOCK)
        .zip(src.par_chunks(BLOCK))
        .for_each(|(dst, src)| src.convert_to_f32_slice(dst));
    src.len()
}

/// Below this many rows, [`linear`] computes `yᵀ = W xᵀ` and transposes: `gemm` runs a short,
/// wide `x Wᵀ` (the weight read transposed) at about half its speed, measured on the SD shapes
/// (64 × 1280 × 1280: ~100 against ~180 GFLOP/s on 2 cores), while a transpose of the small
/// output costs little.
const FEW_ROWS: usize = 256;

/// What a product's output starts from before `x Wᵀ` is added: the bias (per output feature or
/// channel) and a residual of the output's shape, each optional.
#[derive(Clone, Copy)]
pub(crate) struct Start<'a, T> {
    pub bias: Option<&'a [T]>,
    pub residual: Option<&'a [T]>,
}

impl<'a, T: Elem> Start<'a, T> {
    pub fn bias(bias: Option<&'a [T]>) -> Self {
        Start {
            bias,
            residual: None,
        }
    }

    /// Whether the product adds to a prefilled buffer (else it overwrites zeros).
    pub fn any(&self) -> bool {
        self.bias.is_some() || self.residual.is_some()
    }

    /// `groups` blocks of `channels × run` values: the residual (or zeros) plus `bias[c]` on
    /// every value of channel `c` (a linear layer's rows are groups of `out` channels with run 1).
    /// The product is then added, so the result rounds as `(r + b) + x Wᵀ`.
    pub fn fill(&self, groups: usize, channels: usize, run: usize) -> Vec<T> {
        let n = groups * channels * run;
        // Built at its exact size: candle keeps the Vec as the tensor's storage, so spare
        // capacity (a collected flat_map doubles its way up) would be resident memory.
        let mut y = match self.residual {
            Some(r) => r[..n].to_vec(),
            None => vec![T::default(); n],
        };
        if let Some(b) = self.bias {
            for block in y.chunks_mut(channels * run) {
                for (values, b) in block.chunks_mut(run).zip(b) {
                    values.iter_mut().for_each(|v| *v += *b);
                }
            }
        }
        y
    }
}

/// `y = x Wᵀ + b` for `x: [rows, in]`, `W: [out, in]`, `b: [out]` → `[rows, out]`.
pub(crate) fn linear<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, out: usize) -> Vec<T> {
    linear_from(x, w, Start::bias(bias), out)
}

/// [`linear`] added to `start` (bias and residual `[rows, out]`).
pub(crate) fn linear_from<T: Elem>(x: &[T], w: &[T], start: Start<T>, out: usize) -> Vec<T> {
    let in_f = w.len() / out.max(1);
    let rows = x.len() / in_f.max(1);
    if rows <= FEW_ROWS {
        let mut yt = vec![T::default(); out * rows];
        // SAFETY: w is out × in, x is rows × in (read transposed), yt is out × rows.
        unsafe {
            product(
                (out, rows, in_f),
                yt.as_mut_ptr(),
                rows,
                Mat::rows(w, in_f),
                Mat::transposed(x, in_f),
                T::from_f64(1.0),
                false,
                Threads::All,
            )
        };
        return transpose_add(&yt, out, rows, start.fill(rows, out, 1));
    }
    let mut y = start.fill(rows, out, 1);
    // SAFETY: x is rows × in, w is out × in (read transposed), y is rows × out.
    unsafe {
        product(
            (rows, out, in_f),
            y.as_mut_ptr(),
            out,
            Mat::rows(x, in_f),
            Mat::transposed(w, in_f),
            T::from_f64(1.0),
            start.any(),
            Threads::All,
        )
    };
    y
}

/// `t + aᵀ` for row-major `a: [rows, cols]` and `t: [cols, rows]`, in tiles that stay in the
/// L1 cache.
fn transpose_add<T: Elem>(a: &[T], rows: usize, cols: usize, mut t: Vec<T>) -> Vec<T> {
    const TILE: usize = 16;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                let dst = &mut t[c * rows..][..rows];
                for r in r0..(r0 + TILE).min(rows) {
                    dst[r] += a[r * cols + c];
                }
            }
        }
    }
    t
}

/// `dX = dY W` for `dY: [rows, out]`, `W: [out, in]` → `[rows, in]`.
pub(crate) fn linear_input_grad<T: Elem>(grad: &[T], w: &[T], out: usize) -> Vec<T> {
    let in_f = w.len() / out.max(1);
    let rows = grad.len() / out.max(1);
    let mut dx = vec![T::default(); rows * in_f];
    // SAFETY: grad is rows × out, w is out × in, dx is rows × in.
    unsafe {
        product(
            (rows, in_f, out),
            dx.as_mut_ptr(),
            in_f,
            Mat::rows(grad, out),
            Mat::rows(w, in_f),
            T::from_f64(1.0),
            false,
            Threads::All,
        )
    };
    dx
}

/// A frozen linear layer with a low-rank adapter: `y = x Wᵀ + b + s · (x Dᵀ) Uᵀ` for
/// `D: [r, in]` (down), `U: [out, r]` (up).
pub(crate) fn linear_low_rank<T: Elem>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    down: &[T],
    up: &[T],
    scale: f64,
    out: usize,
) -> Vec<T> {
    let mut y = linear(x, w, bias, out);
    let hidden = low_rank_hidden(x, down, w.len() / out.max(1));
    let rank = up.len() / out.max(1);
    let rows = hidden.len() / rank.max(1);
    // SAFETY: hidden is rows × r, up is out × r (read transposed), y is rows × out.
    unsafe {
        product(
            (rows, out, rank),
            y.as_mut_ptr(),
            out,
            Mat::rows(&hidden, rank),
            Mat::transposed(up, rank),
            T::from_f64(scale),
            true,
            Threads::All,
        )
    };
    y
}

/// `x Dᵀ: [rows, r]` for `x: [rows, in]`, `D: [r, in]`.
fn low_rank_hidden<T: Elem>(x: &[T], down: &[T], in_f: usize) -> Vec<T> {
    let rank = down.len() / in_f.max(1);
    let rows = x.len() / in_f.max(1);
    let mut hidden = vec![T::default(); rows * rank];
    // SAFETY: x is rows × in, down is r × in (read transposed), hidden is rows × r.
    unsafe {
        product(
            (rows, rank, in_f),
            hidden.as_mut_ptr(),
            rank,
            Mat::rows(x, in_f),
            Mat::transposed(down, in_f),
            T::from_f64(1.0),
            false,
            Threads::All,
        )
    };
    hidden
}

/// The gradients of [`linear_low_rank`] from `dY: [rows, out]`: `dX` (when `want_dx`), `dD` and
/// `dU`. With `u = dY U`: `dX = dY W + s · u D`, `dD = s · uᵀ x`, `dU = s · dYᵀ (x Dᵀ)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_low_rank_grads<T: Elem>(
    x: &[T],
    w: &[T],
    down: &[T],
    up: &[T],
    grad: &[T],
    scale: f64,
    out: usize,
    want_dx: bool,
) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
    let in_f = w.len() / out.max(1);
    let rank = up.len() / out.max(1);
    let rows = grad.len() / out.max(1);
    let s = T::from_f64(scale);
    let mut u = vec![T::default(); rows * rank];
    let mut d_down = vec![T::default(); rank * in_f];
    let mut d_up = vec![T::default(); out * rank];
    let hidden = low_rank_hidden(x, down, in_f);
    // SAFETY: every operand is a whole slice of the shape its product names (grad rows × out,
    // up out × r, down r × in, x rows × in, u and hidden rows × r); outputs are fresh buffers.
    unsafe {
        product(
            (rows, rank, out),
            u.as_mut_ptr(),
            rank,
            Mat::rows(grad, out),
            Mat::rows(up, rank),
            T::from_f64(1.0),
            false,
            Threads::All,
        );
        product(
            (rank, in_f, rows),
            d_down.as_mut_ptr(),
            in_f,
            Mat::transposed(&u, rank),
            Mat::rows(x, in_f),
            s,
            false,
            Threads::All,
        );
        product(
            (out, rank, rows),
            d_up.as_mut_ptr(),
            rank,
            Mat::transposed(grad, out),
            Mat::rows(&hidden, rank),
            s,
            false,
            Threads::All,
        );
    }
    let dx = want_dx.then(|| {
        let mut dx = linear_input_grad(grad, w, out);
        // SAFETY: u is rows × r, down is r × in, dx is rows × in.
        unsafe {
            product(
                (rows, in_f, rank),
                dx.as_mut_ptr(),
                in_f,
                Mat::rows(&u, rank),
                Mat::rows(down, in_f),
                s,
                true,
                Threads::All,
            )
        };
        dx
    });
    (dx, d_down, d_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_and_its_input_gradient_match_loops() {
        // Few rows (the transposed product) and many (the direct one).
        for rows in [5, FEW_ROWS + 3] {
            linear_case(rows);
        }
    }

    fn linear_case(rows: usize) {
        let (in_f, out) = (3, 4);
        let x: Vec<f64> = (0..rows * in_f).map(|i| (i as f64 * 0.7).sin()).collect();
        let w: Vec<f64> = (0..out * in_f).map(|i| (i as f64 * 0.3).cos()).collect();
        let b: Vec<f64> = (0..out).map(|i| i as f64 - 1.5).collect();
        let y = linear(&x, &w, Some(&b), out);
        let g: Vec<f64> = (0..rows * out).map(|i| (i as f64 * 1.1).cos()).collect();
        let dx = linear_input_grad(&g, &w, out);
        for r in 0..rows {
            for o in 0..out {
                let want: f64 = b[o]
                    + (0..in_f)
                        .map(|i| x[r * in_f + i] * w[o * in_f + i])
                        .sum::<f64>();
                assert!((y[r * out + o] - want).abs() < 1e-12);
            }
            for i in 0..in_f {
                let want: f64 = (0..out).map(|o| g[r * out + o] * w[o * in_f + i]).sum();
                assert!((dx[r * in_f + i] - want).abs() < 1e-12);
            }
        }
    }
}
