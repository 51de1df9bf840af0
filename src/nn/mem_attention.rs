//! Fused, memory-efficient attention on the CPU with a real backward: per head and block of query
//! rows, the scores are computed, soft-maxed and multiplied by `v` while they sit in the cache,
//! and never kept; backward recomputes them from `q`, `k` and each row's log-sum-exp.
//!
//! Attention built from candle ops keeps the scores, their exponentials and the probabilities
//! (each `[B·heads, Nq, Nk]`) for backward, ~2 GiB per self-attention layer and sample at 512 px
//! in f32 (DESIGN.md §7), and streams each of them through memory once per element-wise op. Here
//! forward keeps nothing but one number per query row (the inputs and the output are kept by the
//! graph anyway); a block's scores (`ROWS × Nk`) live in a per-task buffer. The heads are read
//! in place from the projections' `[B, N, heads·d]` layout (strided matrix products), so no
//! transposed copies are made either way.
//!
//! Backward, per head and block: `P = exp(q kᵀ·s − lse)`, `dV += Pᵀ dO`, `dP = dO vᵀ`,
//! `dS = P ∘ (dP − rowsum(dO ∘ O))`, `dQ = dS k·s`, `dK += dSᵀ q·s`. The softmax is computed in
//! the inputs' dtype, f32 or f64 (the op only serves those; diffusers' `upcast_attention`
//! concerns half precision, which keeps the naive path).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::dense::{product, slice, with_slice, Mat, Shared, Threads};

use crate::Result;

/// Query rows per block: 64 rows of 1024 keys are 256 KiB of f32 scores, which stay in a core's
/// L2 cache between the two products that use them.
const ROWS: usize = 64;

/// Query rows per block in backward: its `dK += dSᵀ q` and `dV += Pᵀ dO` products run over a
/// block's rows, so each block reads and writes the head's whole `dK` and `dV`; 256 rows make
/// that traffic a quarter of 64 rows' (the two score buffers, 2·256·Nk, then live in L3).
/// Measured 9–11 % faster backward at 256 and 512 px than 64 rows.
const BWD_ROWS: usize = 256;

/// Whether [`attention`] serves these inputs (CPU, f32/f64, the custom ops switched on).
pub fn applies(q: &Tensor) -> bool {
    matches!(q.dtype(), DType::F32 | DType::F64)
        && q.device().is_cpu()
        && super::frozen::cpu_kernels_here()
}

/// That `q: [B, Nq, heads·d]`, `k, v: [B, Nk, heads·d]` fit `heads` heads; an error naming the
/// shapes otherwise.
pub(crate) fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<()> {
    check_grouped_shapes(q, k, v, heads, heads)
}

/// That `q: [B, Nq, heads·d]`, `k, v: [B, Nk, kv_heads·d]` fit `heads` query heads sharing
/// `kv_heads` key/value heads; an error naming the shapes otherwise.
fn check_grouped_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<()> {
    let (b, _, inner) = q.dims3()?;
    let (bk, _, inner_k) = k.dims3()?;
    let fits = heads > 0
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && inner % heads == 0
        && inner_k == inner / heads * kv_heads;
    if bk != b || v.dims() != k.dims() || !fits {
        let kv = if kv_heads == heads {
            String::new()
        } else {
            format!(" ({kv_heads} key/value heads)")
        };
        return Err(candle_core::Error::Msg(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads{kv}",
            q.dims(),
            k.dims(),
            v.dims()
        ))
        .into());
    }
    Ok(())
}

/// `softmax(q kᵀ · scale) v` per head, for `q: [B, Nq, heads·d]`, `k, v: [B, Nk, heads·d]` →
/// `[B, Nq, heads·d]` (head `h` is columns `h·d..(h+1)·d`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    check_shapes(q, k, v, heads)?;
    let (b, nq, inner) = q.dims3()?;
    let dims = Dims {
        b,
        nq,
        nk: k.dim(1)?,
        heads,
        kv_heads: heads,
        d: inner / heads,
        scale,
        causal: false,
    };
    run(q, k, v, dims)
}

/// A decoder's causal self-attention with grouped key/value heads: `q: [B, Nq, heads·d]`,
/// `k, v: [B, Nk, kv_heads·d]` with `Nk ≥ Nq` → `[B, Nq, heads·d]`. Query row `i` is position
/// `Nk − Nq + i` and sees keys `0..=Nk − Nq + i`; query head `h` reads key/value head
/// `h / (heads / kv_heads)`. Nothing of the masked half of the scores is computed.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    check_grouped_shapes(q, k, v, heads, kv_heads)?;
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    if nk < nq {
        return Err(candle_core::Error::Msg(format!(
            "causal attention: {nq} queries but only {nk} keys"
        ))
        .into());
    }
    let dims = Dims {
        b,
        nq,
        nk,
        heads,
        kv_heads,
        d: inner / heads,
        scale,
        causal: true,
    };
    run(q, k, v, dims)
}

fn run(q: &Tensor, k: &Tensor, v: &Tensor, dims: Dims) -> Result<Tensor> {
    let pairs = (dims.b * dims.heads * dims.pairs() * dims.d) as u64;
    let _t = super::profile::scope_flops("attention", 4 * pairs);
    let op = FusedAttention {
        dims,
        lse: Mutex::new(None),
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(if q.track_op() || k.track_op() || v.track_op() {
        q.apply_op3(&k, &v, op)?
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)?
    })
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    nq: usize,
    nk: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f64,
    causal: bool,
}

impl Dims {
    fn inner(&self) -> usize {
        self.heads * self.d
    }

    /// The width of a key/value row: `kv_heads · d`.
    fn kv_inner(&self) -> usize {
        self.kv_heads * self.d
    }

    /// The key/value head that query head `h` reads.
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// How many keys query row `i` sees: all of them, or (causal) `0..=Nk − Nq + i`.
    fn visible(&self, i: usize) -> usize {
        if self.causal {
            (i + 1 + self.nk - self.nq).min(self.nk)
        } else {
            self.nk
        }
    }

    /// The number of (query, key) pairs per head.
    fn pairs(&self) -> usize {
        (0..self.nq).map(|i| self.visible(i)).sum()
    }
}

/// The custom op; forward leaves each query row's log-sum-exp here for backward.
struct FusedAttention {
    dims: Dims,
    lse: Mutex<Option<Lse>>,
}

enum Lse {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// The element types the kernel serves: the softmax's exponential and maximum per type.
trait Elem: super::dense::Elem {
    /// `x ← exp(x − shift)`; returns the sum.
    fn exp_sub_sum(row: &mut [Self], shift: Self) -> Self;
    fn row_max(row: &[Self]) -> Self;
    fn ln(self) -> Self;
}

impl Elem for f32 {
    fn exp_sub_sum(row: &mut [Self], shift: Self) -> Self {
        super::fast_math::exp_sub_sum(row, shift)
    }
    fn row_max(row: &[Self]) -> Self {
        super::fast_math::max(row)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Elem for f64 {
    fn exp_sub_sum(row: &mut [Self], shift: Self) -> Self {
        row.iter_mut().fold(0.0, |s, x| {
            *x = (*x - shift).exp();
            s + *x
        })
    }
    fn row_max(row: &[Self]) -> Self {
        row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x))
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// Forward: the output `[B, Nq, heads·d]` and the log-sum-exp `[B, heads, Nq]`.
fn forward<T: Elem>(q: &[T], k: &[T], v: &[T], dims: Dims) -> (Vec<T>, Vec<T>) {
    let Dims {
        b,
        nq,
        nk,
        heads,
        d,
        scale,
        ..
    } = dims;
    let (inner, kv_inner) = (dims.inner(), dims.kv_inner());
    let mut out = vec![T::default(); b * nq * inner];
    let mut lse = vec![T::default(); b * heads * nq];
    let out_ptr = Shared(out.as_mut_ptr());
    // One task per (sample, head, block of rows): each writes its own rows of `lse` and its own
    // rows × head columns of `out`.
    lse.par_chunks_mut(nq.max(1))
        .enumerate()
        .flat_map(|(bh, head_lse)| {
            head_lse
                .par_chunks_mut(ROWS)
                .enumerate()
                .map(move |(block, rows)| (bh, block, rows))
        })
        .for_each_init(
            || (vec![T::default(); ROWS * nk], vec![T::default(); ROWS * d]),
            |(scores, local), (bh, block, lse_rows)| {
                let (bi, h) = (bh / heads, bh % heads);
                let g = dims.kv_head(h);
                let r0 = block * ROWS;
                let len = lse_rows.len();
                // The keys the block's last row sees; earlier rows see a prefix of them.
                let lim = dims.visible(r0 + len - 1);
                let q_blk = Mat {
                    ptr: q[(bi * nq + r0) * inner + h * d..].as_ptr(),
                    rs: inner,
                    cs: 1,
                };
                // kᵀ of this head: element (c, j) = k[bi, j, g·d + c].
                let kt = Mat {
                    ptr: k[bi * nk * kv_inner + g * d..].as_ptr(),
                    rs: 1,
                    cs: kv_inner,
                };
                let v_h = Mat {
                    ptr: v[bi * nk * kv_inner + g * d..].as_ptr(),
                    rs: kv_inner,
                    cs: 1,
                };
                let s = &mut scores[..len * lim];
                // SAFETY: q, k, v are whole [B, N, ·] slices; s is len × lim.
                unsafe {
                    product(
                        (len, lim, d),
                        s.as_mut_ptr(),
                        lim,
                        q_blk,
                        kt,
                        T::from_f64(scale),
                        false,
                        Threads::This,
                    )
                };
                let mut inv_sums = [0f64; ROWS];
                for (i, row) in s.chunks_exact_mut(lim).enumerate() {
                    let (seen, masked) = row.split_at_mut(dims.visible(r0 + i));
                    let max = T::row_max(seen);
                    let sum = T::exp_sub_sum(seen, max);
                    masked.fill(T::default());
                    lse_rows[i] = max + sum.ln();
                    inv_sums[i] = 1.0 / sum.to_f64();
                }
                // The block's output goes to a contiguous buffer first: the rows of `out` are
                // shared by all heads, and products writing a head's columns in place would keep
                // moving cache lines between the cores that work on other heads.
                let local = &mut local[..len * d];
                // SAFETY: s is len × lim, v's head columns nk × d, local len × d.
                unsafe {
                    let p = Mat {
                        ptr: s.as_ptr(),
                        rs: lim,
                        cs: 1,
                    };
                    let one = T::from_f64(1.0);
                    let dst = local.as_mut_ptr();
                    product((len, d, lim), dst, d, p, v_h, one, false, Threads::This);
                }
                for (i, (row, inv)) in local.chunks_exact(d).zip(&inv_sums).enumerate() {
                    let inv = T::from_f64(*inv);
                    // SAFETY: row r0 + i, columns h·d..(h+1)·d of `out` belong to this task
                    // alone; `out` outlives the parallel loop.
                    let dst = unsafe {
                        let at = out_ptr.get().add((bi * nq + r0 + i) * inner + h * d);
                        std::slice::from_raw_parts_mut(at, d)
                    };
                    dst.iter_mut().zip(row).for_each(|(o, x)| *o = *x * inv);
                }
            },
        );
    (out, lse)
}

/// Backward: `(dq, dk, dv)`, each in its input's layout.
fn backward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    grad: &[T],
    lse: &[T],
    dims: Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        b,
        nq,
        nk,
        heads,
        d,
        scale,
        ..
    } = dims;
    let (inner, kv_inner) = (dims.inner(), dims.kv_inner());
    // Key and value gradients per query head, `[B, Nk, heads·d]`; summed over each group of
    // query heads at the end when heads share key/value heads.
    let mut dq = vec![T::default(); b * nq * inner];
    let mut dk = vec![T::default(); b * nk * inner];
    let mut dv = vec![T::default(); b * nk * inner];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    let scale_t = T::from_f64(scale);
    let one = T::from_f64(1.0);
    // One task per (sample, head): it owns that head's columns of dq, dk and dv.
    // Each task accumulates its head's dq, dk, dv in contiguous buffers and copies them into the
    // shared [B, N, heads·d] rows once at the end (products writing a head's columns in place
    // would keep moving cache lines between the cores that work on other heads).
    (0..b * heads).into_par_iter().for_each_init(
        || {
            let zeros = |n: usize| vec![T::default(); n];
            (
                (zeros(BWD_ROWS * nk), zeros(BWD_ROWS * nk)),
                (zeros(nq * d), zeros(nk * d), zeros(nk * d)),
            )
        },
        |((p_buf, dp_buf), (dq_h, dk_h, dv_h)), bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let g = dims.kv_head(h);
            let kv_head = |t: &[T]| t[bi * nk * kv_inner + g * d..].as_ptr();
            let kt = Mat {
                ptr: kv_head(k),
                rs: 1,
                cs: kv_inner,
            };
            let vt = Mat {
                ptr: kv_head(v),
                rs: 1,
                cs: kv_inner,
            };
            let k_h = Mat {
                ptr: kv_head(k),
                rs: kv_inner,
                cs: 1,
            };
            // The key rows accumulate over blocks (a causal block adds rows the earlier ones
            // did not reach), so they start at zero.
            dk_h.fill(T::default());
            dv_h.fill(T::default());
            for r0 in (0..nq).step_by(BWD_ROWS) {
                let len = BWD_ROWS.min(nq - r0);
                let lim = dims.visible(r0 + len - 1);
                let row0 = (bi * nq + r0) * inner + h * d;
                let q_blk = Mat {
                    ptr: q[row0..].as_ptr(),
                    rs: inner,
                    cs: 1,
                };
                let g_blk = Mat {
                    ptr: grad[row0..].as_ptr(),
                    rs: inner,
                    cs: 1,
                };
                let p = &mut p_buf[..len * lim];
                let dp = &mut dp_buf[..len * lim];
                // SAFETY (all products below): inputs are whole slices of their shapes; p and dp
                // are len × lim; the dq rows r0..r0+len and the dk/dv rows of this sample, each
                // restricted to head h's columns, belong to this task alone.
                unsafe {
                    product(
                        (len, lim, d),
                        p.as_mut_ptr(),
                        lim,
                        q_blk,
                        kt,
                        scale_t,
                        false,
                        Threads::This,
                    );
                    product(
                        (len, lim, d),
                        dp.as_mut_ptr(),
                        lim,
                        g_blk,
                        vt,
                        one,
                        false,
                        Threads::This,
                    );
                }
                let lse_rows = &lse[(bi * heads + h) * nq + r0..][..len];
                for (i, (p_row, dp_row)) in p
                    .chunks_exact_mut(lim)
                    .zip(dp.chunks_exact_mut(lim))
                    .enumerate()
                {
                    let (seen, masked) = p_row.split_at_mut(dims.visible(r0 + i));
                    T::exp_sub_sum(seen, lse_rows[i]);
                    masked.fill(T::default());
                    let o = &out[row0 + i * inner..][..d];
                    let g = &grad[row0 + i * inner..][..d];
                    let delta = o
                        .iter()
                        .zip(g)
                        .fold(0.0, |s, (o, g)| s + o.to_f64() * g.to_f64());
                    let delta = T::from_f64(delta);
                    // dS = P ∘ (dP − delta), written over dP (zero where P is masked).
                    for (ds, p) in dp_row.iter_mut().zip(p_row.iter()) {
                        *ds = *p * (*ds - delta);
                    }
                }
                let (p_t, ds, ds_t) = (
                    Mat {
                        ptr: p.as_ptr(),
                        rs: 1,
                        cs: lim,
                    },
                    Mat {
                        ptr: dp.as_ptr(),
                        rs: lim,
                        cs: 1,
                    },
                    Mat {
                        ptr: dp.as_ptr(),
                        rs: 1,
                        cs: lim,
                    },
                );
                // SAFETY: the head buffers are this task's own: dq_h nq × d, dk_h/dv_h nk × d.
                unsafe {
                    let (dq0, dk0, dv0) = (
                        dq_h.as_mut_ptr().add(r0 * d),
                        dk_h.as_mut_ptr(),
                        dv_h.as_mut_ptr(),
                    );
                    product((lim, d, len), dv0, d, p_t, g_blk, one, true, Threads::This);
                    product(
                        (len, d, lim),
                        dq0,
                        d,
                        ds,
                        k_h,
                        scale_t,
                        false,
                        Threads::This,
                    );
                    product(
                        (lim, d, len),
                        dk0,
                        d,
                        ds_t,
                        q_blk,
                        scale_t,
                        true,
                        Threads::This,
                    );
                }
            }
            // SAFETY: head h's columns of this sample's rows belong to this task alone; the
            // outputs outlive the parallel loop.
            let scatter = |dst: Shared<T>, src: &[T], n: usize| {
                for (j, row) in src.chunks_exact(d).take(n).enumerate() {
                    let at = unsafe { dst.get().add((bi * n + j) * inner + h * d) };
                    unsafe { std::slice::from_raw_parts_mut(at, d) }.copy_from_slice(row);
                }
            };
            scatter(dq_ptr, dq_h, nq);
            scatter(dk_ptr, dk_h, nk);
            scatter(dv_ptr, dv_h, nk);
        },
    );
    if dims.kv_heads == heads {
        return (dq, dk, dv);
    }
    (dq, sum_groups(&dk, dims), sum_groups(&dv, dims))
}

/// `[B, Nk, heads·d]` per query head → `[B, Nk, kv_heads·d]`, each key/value head's columns the
/// sum of its query heads'.
fn sum_groups<T: Elem>(per_head: &[T], dims: Dims) -> Vec<T> {
    let (inner, kv_inner, d) = (dims.inner(), dims.kv_inner(), dims.d);
    let group = dims.heads / dims.kv_heads;
    let mut summed = vec![T::default(); per_head.len() / inner.max(1) * kv_inner];
    summed
        .par_chunks_mut(kv_inner.max(1))
        .zip(per_head.par_chunks(inner.max(1)))
        .for_each(|(dst, src)| {
            for (g, dst) in dst.chunks_exact_mut(d).enumerate() {
                for member in src[g * group * d..][..group * d].chunks_exact(d) {
                    dst.iter_mut().zip(member).for_each(|(a, b)| *a += *b);
                }
            }
        });
    summed
}

impl FusedAttention {
    fn store(&self, lse: Lse) -> candle_core::Result<()> {
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))? = Some(lse);
        Ok(())
    }

    fn backward_typed<T: Elem>(
        &self,
        tensors: [&Tensor; 5],
        lse: &[T],
    ) -> candle_core::Result<[Tensor; 3]> {
        let [q, k, v, o, g] = tensors;
        let (dq, dk, dv) = with_slice::<T, _>(q, "attention", |q| {
            with_slice::<T, _>(k, "attention", |k| {
                with_slice::<T, _>(v, "attention", |v| {
                    with_slice::<T, _>(o, "attention", |o| {
                        with_slice::<T, _>(g, "attention", |g| {
                            Ok(backward(q, k, v, o, g, lse, self.dims))
                        })
                    })
                })
            })
        })?;
        let to = |v: Vec<T>, t: &Tensor| Tensor::from_vec(v, t.shape(), &Device::Cpu);
        Ok([
            to(dq, tensors[0])?,
            to(dk, tensors[1])?,
            to(dv, tensors[2])?,
        ])
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
                let (out, lse) = forward::<f32>(
                    slice(s1, l1, "attention")?,
                    slice(s2, l2, "attention")?,
                    slice(s3, l3, "attention")?,
                    self.dims,
                );
                self.store(Lse::F32(lse))?;
                CpuStorage::F32(out)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (out, lse) = forward::<f64>(
                    slice(s1, l1, "attention")?,
                    slice(s2, l2, "attention")?,
                    slice(s3, l3, "attention")?,
                    self.dims,
                );
                self.store(Lse::F64(lse))?;
                CpuStorage::F64(out)
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "attention: q, k, v must all be f32 or all f64".into(),
                ))
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Five products of `q kᵀ`'s size: the scores again, dP, dV, dQ and dK.
        let d = self.dims;
        let flops = 10 * (d.b * d.heads * d.pairs() * d.d) as u64;
        let _t = super::profile::scope_flops("attention backward", flops);
        let grad = grad.to_dtype(q.dtype())?.contiguous()?;
        let res = res.contiguous()?;
        let tensors = [q, k, v, &res, &grad];
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))?;
        let [dq, dk, dv] = match lse.as_ref() {
            Some(Lse::F32(l)) => self.backward_typed::<f32>(tensors, l)?,
            Some(Lse::F64(l)) => self.backward_typed::<f64>(tensors, l)?,
            None => {
                return Err(candle_core::Error::Msg(
                    "attention: backward before forward".into(),
                ))
            }
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random_weights::randn;
    use candle_core::{Var, D};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Attention from candle ops, heads split out: the reference.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
        let (b, nq, inner) = q.dims3()?;
        let nk = k.dim(1)?;
        let d = inner / heads;
        let split = |t: &Tensor, n| -> Result<Tensor> {
            Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
        let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        let o = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)?;
        Ok(o.transpose(1, 2)?.reshape((b, nq, inner))?)
    }

    fn check(dtype: DType, b: usize, nq: usize, nk: usize, heads: usize, tol: f64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let d = 5;
        let mut var = |n: usize| -> Result<Var> {
            Ok(Var::from_tensor(
                &randn(&mut rng, &[b, n, heads * d], 1.0, 0.0)?.to_dtype(dtype)?,
            )?)
        };
        let (q, k, v) = (var(nq)?, var(nk)?, var(nk)?);
        let mix = randn(&mut rng, &[b, nq, heads * d], 1.0, 0.0)?.to_dtype(dtype)?;
        let want = naive(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, 0.5)?;
        let g_want = (&want * &mix)?.sum_all()?.backward()?;
        let got = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, 0.5)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
            Ok((a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?)
        };
        let diff = max_diff(&got, &want)?;
        assert!(
            diff < tol,
            "{dtype:?} {b}×{nq}×{nk}×{heads}: output differs by {diff}"
        );
        let g = (&got * &mix)?.sum_all()?.backward()?;
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            match (g.get(t.as_tensor()), g_want.get(t.as_tensor())) {
                (Some(a), Some(b)) => {
                    let d = max_diff(a, b)?;
                    assert!(
                        d < tol,
                        "{dtype:?} {b}×{nq}×{nk}×{heads}: d{name} differs by {d}"
                    );
                }
                _ => panic!("d{name} missing"),
            }
        }
        Ok(())
    }

    #[test]
    fn fused_attention_equals_naive_attention_and_its_gradients() -> Result<()> {
        // Query counts below, at and above a block (forward and backward blocks), with a last
        // block shorter than the others; self- and cross-attention lengths; one and several
        // samples and heads.
        for (b, nq, nk, heads) in [
            (1, 7, 5, 1),
            (2, 64, 64, 3),
            (1, 150, 77, 2),
            (2, 129, 200, 4),
            (1, 300, 40, 2),
        ] {
            check(DType::F64, b, nq, nk, heads, 1e-12)?;
            check(DType::F32, b, nq, nk, heads, 2e-5)?;
        }
        Ok(())
    }

    /// Causal attention with grouped key/value heads from candle ops: each key/value head
    /// repeated for its query heads, `-∞` added after each query's position.
    fn naive_causal(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, nq, inner) = q.dims3()?;
        let nk = k.dim(1)?;
        let d = inner / heads;
        let group = heads / kv_heads;
        let split = |t: &Tensor, n: usize, h: usize| -> Result<Tensor> {
            Ok(t.reshape((b, n, h, d))?.transpose(1, 2)?.contiguous()?)
        };
        let repeat = |t: Tensor| -> Result<Tensor> {
            Ok(t.unsqueeze(2)?
                .broadcast_as((b, kv_heads, group, nk, d))?
                .reshape((b, heads, nk, d))?)
        };
        let q = split(q, nq, heads)?;
        let k = repeat(split(k, nk, kv_heads)?)?;
        let v = repeat(split(v, nk, kv_heads)?)?;
        let mask: Vec<f64> = (0..nq)
            .flat_map(|i| {
                (0..nk).map(move |j| {
                    if j <= nk - nq + i {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (nq, nk), q.device())?.to_dtype(q.dtype())?;
        let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        let o = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)?;
        Ok(o.transpose(1, 2)?.reshape((b, nq, inner))?)
    }

    #[test]
    fn causal_grouped_attention_equals_masked_attention_and_its_gradients() -> Result<()> {
        // Blocks of rows below, at and past the forward (64) and backward (256) block sizes;
        // as many keys as queries (training) and more keys (queries at the end, as with a
        // cache); one, shared and grouped key/value heads.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            for (b, nq, nk, heads, kv_heads) in [
                (1, 1, 1, 1, 1),
                (1, 7, 7, 2, 2),
                (2, 70, 70, 4, 2),
                (1, 300, 300, 6, 1),
                (2, 5, 40, 4, 4),
                (1, 100, 130, 6, 3),
            ] {
                let mut rng = ChaCha8Rng::seed_from_u64(21);
                let d = 4;
                let mut var = |n: usize, h: usize| -> Result<Var> {
                    Ok(Var::from_tensor(
                        &randn(&mut rng, &[b, n, h * d], 1.0, 0.0)?.to_dtype(dtype)?,
                    )?)
                };
                let (q, k, v) = (var(nq, heads)?, var(nk, kv_heads)?, var(nk, kv_heads)?);
                let mix = randn(&mut rng, &[b, nq, heads * d], 1.0, 0.0)?.to_dtype(dtype)?;
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let want = naive_causal(qt, kt, vt, heads, kv_heads, 0.7)?;
                let got = causal_attention(qt, kt, vt, heads, kv_heads, 0.7)?;
                let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                    Ok((a - b)?
                        .abs()?
                        .max_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?)
                };
                let case = format!("{dtype:?} {b}×{nq}×{nk}, {heads}/{kv_heads} heads");
                let diff = max_diff(&got, &want)?;
                assert!(diff < tol, "{case}: output differs by {diff}");
                let g_want = (&want * &mix)?.sum_all()?.backward()?;
                let g = (&got * &mix)?.sum_all()?.backward()?;
                for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                    let (Some(a), Some(b)) = (g.get(t.as_tensor()), g_want.get(t.as_tensor()))
                    else {
                        panic!("{case}: d{name} missing");
                    };
                    let diff = max_diff(a, b)?;
                    assert!(diff < tol, "{case}: d{name} differs by {diff}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn causal_attention_refuses_fewer_keys_than_queries_and_misfit_heads() -> Result<()> {
        let q = Tensor::zeros((1, 4, 8), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu)?;
        let err = causal_attention(&q, &k, &k, 2, 1, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 queries but only 3 keys"), "{err}");
        let k = Tensor::zeros((1, 4, 6), DType::F32, &Device::Cpu)?;
        let err = causal_attention(&q, &k, &k, 2, 1, 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("do not fit 2 heads (1 key/value heads)"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn without_gradients_it_returns_the_same_output() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let q = randn(&mut rng, &[1, 70, 8], 1.0, 0.0)?;
        let k = randn(&mut rng, &[1, 9, 8], 1.0, 0.0)?;
        let v = randn(&mut rng, &[1, 9, 8], 1.0, 0.0)?;
        let got = attention(&q, &k, &v, 2, 0.3)?;
        let want = naive(&q, &k, &v, 2, 0.3)?;
        assert!((&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }
}
