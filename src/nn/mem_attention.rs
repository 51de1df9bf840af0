//! Memory-efficient attention with a real backward: the scores are computed a block of queries
//! at a time and never kept; backward recomputes them from `q`, `k` and each row's log-sum-exp.
//!
//! Naive attention built from candle ops keeps the scores, their exponentials and the
//! probabilities (each `[B·heads, Nq, Nk]`) for backward, ~2 GiB per self-attention layer and
//! sample at 512 px in f32 (DESIGN.md §7). Here forward keeps `q`, `k`, `v`, the output and one
//! number per query row; at any moment only one block of `rows × Nk` scores exists. Backward,
//! per block: `P = exp(q kᵀ·s − lse)`, `dV += Pᵀ dO`, `dP = dO vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
//! `dQ = dS k·s`, `dK += dSᵀ q·s`. The softmax is computed in the inputs' dtype, f32 or f64 (the
//! op only serves those; diffusers' `upcast_attention` concerns half precision, which keeps the
//! naive path).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::frozen::hand_over;
use crate::Result;

/// Scores kept at once, per block of queries (elements): 4 Mi, 16 MiB in f32.
const BLOCK_ELEMENTS: usize = 1 << 22;

/// Whether [`attention`] serves these inputs (CPU, f32/f64, the custom ops switched on).
pub fn applies(q: &Tensor) -> bool {
    matches!(q.dtype(), DType::F32 | DType::F64)
        && q.device().is_cpu()
        && super::frozen::enabled_here()
}

/// `softmax(q kᵀ · scale) v` for `q: [N, Nq, d]`, `k, v: [N, Nk, d]` (N = batch · heads) →
/// `[N, Nq, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let rows = block_rows(&q, &k)?;
    let (out, lse) = forward_blocks(&q.detach(), &k.detach(), &v.detach(), scale, rows)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let op = MemAttention {
        output: Mutex::new(Some(out)),
        lse,
        scale,
        rows,
    };
    Ok(q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))?)
}

fn block_rows(q: &Tensor, k: &Tensor) -> Result<usize> {
    let (n, nq, _) = q.dims3()?;
    let nk = k.dim(1)?;
    Ok((BLOCK_ELEMENTS / (n * nk).max(1)).clamp(1, nq.max(1)))
}

/// The output and each query row's log-sum-exp `[N, Nq, 1]`.
fn forward_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<(Tensor, Tensor)> {
    let nq = q.dim(1)?;
    let kt = k.t()?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut start = 0;
    while start < nq {
        let len = rows.min(nq - start);
        let s = (q.narrow(1, start, len)?.matmul(&kt)? * scale)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        outs.push(e.broadcast_div(&sum)?.matmul(v)?);
        lses.push((sum.log()? + max)?);
        start += len;
    }
    Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
}

struct MemAttention {
    output: Mutex<Option<Tensor>>,
    lse: Tensor,
    scale: f64,
    rows: usize,
}

impl MemAttention {
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v, out) = (q.detach(), k.detach(), v.detach(), out.detach());
        let grad = grad.to_dtype(q.dtype())?.contiguous()?;
        let nq = q.dim(1)?;
        let kt = k.t()?;
        let vt = v.t()?;
        let delta = (&grad * &out)?.sum_keepdim(D::Minus1)?; // [N, Nq, 1]
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        let mut start = 0;
        while start < nq {
            let len = self.rows.min(nq - start);
            let qc = q.narrow(1, start, len)?;
            let gc = grad.narrow(1, start, len)?;
            let s = (qc.matmul(&kt)? * self.scale)?;
            let p = s.broadcast_sub(&self.lse.narrow(1, start, len)?)?.exp()?;
            dv = (dv + p.t()?.matmul(&gc)?)?;
            let dp = gc.matmul(&vt)?;
            let ds = (p * dp.broadcast_sub(&delta.narrow(1, start, len)?)?)?;
            dq.push((ds.matmul(&k)? * self.scale)?);
            dk = (dk + (ds.t()?.matmul(&qc)? * self.scale)?)?;
            start += len;
        }
        Ok((Tensor::cat(&dq, 1)?, dk, dv))
    }
}

impl CustomOp3 for MemAttention {
    fn name(&self) -> &'static str {
        "mem-attention"
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
        hand_over(&self.output, "attention")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self
            .backward(q, k, v, res, grad)
            .map_err(|e| candle_core::Error::Msg(format!("attention backward: {e}")))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random_weights::randn;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let s = (q.matmul(&k.t()?)? * scale)?;
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(v)?)
    }

    #[test]
    fn blocked_attention_equals_naive_attention_and_its_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let q = Var::from_tensor(&randn(&mut rng, &[3, 7, 4], 1.0, 0.0)?)?;
        let k = Var::from_tensor(&randn(&mut rng, &[3, 5, 4], 1.0, 0.0)?)?;
        let v = Var::from_tensor(&randn(&mut rng, &[3, 5, 4], 1.0, 0.0)?)?;
        let mix = randn(&mut rng, &[3, 7, 4], 1.0, 0.0)?;
        let want = naive(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5)?;
        let g_want = (&want * &mix)?.sum_all()?.backward()?;
        // Blocks of 1, 3 and all 7 query rows (the last block shorter than the others).
        for rows in [1, 3, 7] {
            let (out, lse) =
                forward_blocks(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5, rows)?;
            let op = MemAttention {
                output: Mutex::new(Some(out)),
                lse,
                scale: 0.5,
                rows,
            };
            let got = q.as_tensor().apply_op3_arc(
                k.as_tensor(),
                v.as_tensor(),
                Arc::new(Box::new(op)),
            )?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "rows {rows}: {diff}");
            let g = (&got * &mix)?.sum_all()?.backward()?;
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                match (g.get(t.as_tensor()), g_want.get(t.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                        assert!(d < 1e-12, "rows {rows}, d{name}: {d}");
                    }
                    _ => panic!("d{name} missing"),
                }
            }
        }
        // Through the public entry point.
        let got = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5)?;
        assert!((&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }
}
