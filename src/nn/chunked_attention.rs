//! Memory-efficient attention from ordinary candle ops, for what the CPU kernel of
//! [`super::mem_attention`] does not cover: CUDA, and f16/bf16 anywhere.
//!
//! Naive attention keeps each call's `[B, heads, Nq, Nk]` scores and probabilities (and the
//! softmax's intermediates) until backward ends: at 512 px (N = 4096 tokens, batch 4) that is
//! gigabytes per self-attention. Here the forward runs over blocks of query rows on detached
//! inputs and keeps only each row's log-sum-exp (the output is candle's anyway); the backward
//! ([`super::custom_backward::attach3`]) recomputes each block's probabilities from it and
//! follows flash attention's backward with ordinary matrix products:
//!
//! `P = exp(S − lse)`, `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
//! `dQ = dS K · scale`, `dK += dSᵀ Q · scale`.
//!
//! The scores are computed in the inputs' dtype (f32 with `upcast`, diffusers'
//! `upcast_attention`), the softmax and its gradient in f32 at least: the naive path's policy.
//! A block holds at most [`BLOCK_ELEMENTS`] scores.

use candle_core::{DType, Tensor, D};

use super::custom_backward::attach3;
use crate::Result;

/// The most scores (`B · heads · rows · Nk`) one block of query rows computes at once: 2²⁴,
/// 64 MiB in f32 (128 query rows at 512 px, batch 4, 8 heads); a block's backward holds about
/// six such matrices.
pub const BLOCK_ELEMENTS: usize = 1 << 24;

/// Whether attention on `q` takes this path: a CPU or CUDA float tensor, the custom ops on.
/// (On the CPU in f32/f64, [`super::mem_attention::applies`] comes first.)
pub fn applies(q: &Tensor) -> bool {
    (q.device().is_cpu() || q.device().is_cuda())
        && matches!(
            q.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
        && super::frozen::enabled_here()
}

/// `softmax(q kᵀ · scale) v` per head, for `q: [B, Nq, heads·d]`, `k, v: [B, Nk, heads·d]` →
/// `[B, Nq, heads·d]` (head `h` is columns `h·d..(h+1)·d`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    let (b, _, _) = q.dims3()?;
    let nk = k.dim(1)?;
    let rows = (BLOCK_ELEMENTS / (b * heads * nk).max(1)).max(1);
    attention_in_blocks(q, k, v, heads, scale, upcast, rows)
}

/// [`attention`] with `rows` query rows per block.
pub(crate) fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
    rows: usize,
) -> Result<Tensor> {
    super::mem_attention::check_shapes(q, k, v, heads)?;
    let nq = q.dim(1)?;
    let (qi, ki, vi) = (q.detach(), k.detach(), v.detach());
    let form = Form::new(q, upcast, scale, heads, rows.max(1));
    let blocks = form.split(&qi, &ki, &vi)?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (start, len) in form.blocks(nq) {
        // Each block matrix is dropped as soon as the next is made.
        let (e, max) = {
            let s = blocks.scores(start, len, form.soft)?;
            let max = s.max_keepdim(D::Minus1)?;
            (s.broadcast_sub(&max)?.exp()?, max)
        };
        let sum = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&sum)?;
        drop(e);
        outs.push(p.to_dtype(v.dtype())?.matmul(&blocks.v)?);
        lses.push((max + sum.log()?)?);
    }
    let y = merge(&Tensor::cat(&outs, 2)?)?;
    let lse = Tensor::cat(&lses, 2)?;
    let want = [q.track_op(), k.track_op(), v.track_op()];
    attach3(
        "attention",
        [q, k, v],
        y,
        Box::new(move |grad, output| {
            form.backward(&form.split(&qi, &ki, &vi)?, &lse, grad, output, want)
        }),
    )
}

/// The dtypes, scale and block size of one call.
#[derive(Clone, Copy)]
struct Form {
    /// The dtype of the scores and of `dS` in products (the inputs', or f32 with upcast).
    scores: DType,
    /// The dtype of the softmax and its gradient (f32, or f64 for f64 inputs).
    soft: DType,
    scale: f64,
    heads: usize,
    rows: usize,
}

/// `q · scale` and `k` in the scores' dtype, and `v`, each `[B, heads, N, d]`.
struct Split {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl Split {
    /// The scores of query rows `start..start + len` against every key, `[B, heads, len, Nk]`,
    /// in `soft`.
    fn scores(&self, start: usize, len: usize, soft: DType) -> Result<Tensor> {
        let q = self.q.narrow(2, start, len)?;
        Ok(q.matmul(&self.k.t()?)?.to_dtype(soft)?)
    }
}

impl Form {
    fn new(q: &Tensor, upcast: bool, scale: f64, heads: usize, rows: usize) -> Self {
        let dtype = q.dtype();
        let wide = matches!(dtype, DType::F32 | DType::F64);
        Form {
            scores: if upcast && !wide { DType::F32 } else { dtype },
            soft: if dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            },
            scale,
            heads,
            rows,
        }
    }

    /// `(start, len)` of each block of `n` query rows.
    fn blocks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> {
        let rows = self.rows;
        (0..n).step_by(rows).map(move |s| (s, rows.min(n - s)))
    }

    fn split(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Split> {
        let heads = |t: &Tensor| split(t, self.heads);
        Ok(Split {
            q: (heads(q)?.to_dtype(self.scores)? * self.scale)?,
            k: heads(k)?.to_dtype(self.scores)?,
            v: heads(v)?,
        })
    }

    /// The gradients of `q`, `k`, `v` (those in `want`) from the output's `grad`.
    fn backward(
        &self,
        blocks: &Split,
        lse: &Tensor,
        grad: &Tensor,
        output: &Tensor,
        want: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        let (dtype, v_dtype) = (output.dtype(), blocks.v.dtype());
        let d_out = split(grad, self.heads)?.to_dtype(v_dtype)?;
        let nq = d_out.dim(2)?;
        let o = split(output, self.heads)?;
        let rowsum =
            (d_out.to_dtype(self.soft)? * o.to_dtype(self.soft)?)?.sum_keepdim(D::Minus1)?;
        let mut dq = Vec::new();
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        let add = |sum: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            let t = t.to_dtype(self.soft)?;
            Ok(Some(match sum {
                Some(s) => (s + t)?,
                None => t,
            }))
        };
        // Each block matrix is dropped as soon as the next is made: at most three of them live
        // at once.
        for (start, len) in self.blocks(nq) {
            let p = {
                let s = blocks.scores(start, len, self.soft)?;
                s.broadcast_sub(&lse.narrow(2, start, len)?)?.exp()?
            };
            let d_out_b = d_out.narrow(2, start, len)?;
            if want[2] {
                dv = add(dv, p.to_dtype(v_dtype)?.t()?.matmul(&d_out_b)?)?;
            }
            if !(want[0] || want[1]) {
                continue;
            }
            let centered = {
                let dp = d_out_b.matmul(&blocks.v.t()?)?.to_dtype(self.soft)?;
                dp.broadcast_sub(&rowsum.narrow(2, start, len)?)?
            };
            let ds = (p * centered)?.to_dtype(self.scores)?;
            if want[0] {
                dq.push(ds.matmul(&blocks.k)?);
            }
            if want[1] {
                dk = add(dk, ds.t()?.matmul(&blocks.q.narrow(2, start, len)?)?)?;
            }
        }
        let finish = |t: Option<Tensor>, scale: f64| -> Result<Option<Tensor>> {
            t.map(|t| merge(&(t.to_dtype(self.soft)? * scale)?.to_dtype(dtype)?))
                .transpose()
        };
        let dq = if want[0] {
            Some(Tensor::cat(&dq, 2)?)
        } else {
            None
        };
        Ok([finish(dq, self.scale)?, finish(dk, 1.0)?, finish(dv, 1.0)?])
    }
}

/// `[B, N, heads·d]` → `[B, heads, N, d]`.
fn split(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, inner) = t.dims3()?;
    Ok(t.reshape((b, n, heads, inner / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, heads, N, d]` → `[B, N, heads·d]`.
fn merge(t: &Tensor) -> Result<Tensor> {
    let (b, heads, n, d) = t.dims4()?;
    Ok(t.transpose(1, 2)?.reshape((b, n, heads * d))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use crate::models::attention::scaled_dot_product_attention;
    use crate::models::random_weights::randn;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?;
        Ok(d.abs()?.max_all()?.to_scalar::<f64>()?)
    }

    /// Output and the gradients of q, k, v for the loss `Σ out ∘ m`.
    fn run(
        inputs: [&Tensor; 3],
        seed: u64,
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs
            .iter()
            .map(|t| Var::from_tensor(t))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        )?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let m = randn(&mut rng, out.dims(), 1.0, 0.0)?.to_dtype(out.dtype())?;
        let grads = (&out * m)?.sum_all()?.backward()?;
        let g = vars
            .iter()
            .map(|v| {
                grads.get(v.as_tensor()).cloned().ok_or_else(|| {
                    crate::Error::from(candle_core::Error::Msg("missing gradient".into()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((out, g))
    }

    #[test]
    fn blocks_match_naive_attention_and_its_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // (B, Nq, Nk, heads, d, rows per block): self-attention with a partial last block,
        // cross-attention (Nk ≠ Nq), one block for everything, one row per block.
        for (i, &(b, nq, nk, heads, d, rows)) in [
            (2, 7, 7, 2, 3, 3),
            (1, 5, 4, 3, 2, 2),
            (1, 6, 6, 1, 4, 16),
            (2, 3, 5, 2, 2, 1),
        ]
        .iter()
        .enumerate()
        {
            let q = randn(&mut rng, &[b, nq, heads * d], 1.0, 0.0)?;
            let k = randn(&mut rng, &[b, nk, heads * d], 1.0, 0.0)?;
            let v = randn(&mut rng, &[b, nk, heads * d], 1.0, 0.0)?;
            let scale = (d as f64).powf(-0.5);
            let ours = run([&q, &k, &v], i as u64, |q, k, v| {
                attention_in_blocks(q, k, v, heads, scale, false, rows)
            })?;
            let naive = run([&q, &k, &v], i as u64, |q, k, v| {
                crate::nn::frozen::with_plain_ops(|| {
                    scaled_dot_product_attention(q, k, v, heads, false)
                })
            })?;
            assert!(max_diff(&ours.0, &naive.0)? < 1e-12, "case {i}: output");
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(ours.1.iter().zip(&naive.1)) {
                let diff = max_diff(a, b)?;
                assert!(diff < 1e-12, "case {i}: d{name} off by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_with_upcast_stays_close_to_f64() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (b, n, heads, d) = (1, 9, 2, 4);
        let t = |rng: &mut ChaCha8Rng| randn(rng, &[b, n, heads * d], 1.0, 0.0);
        let (q, k, v) = (t(&mut rng)?, t(&mut rng)?, t(&mut rng)?);
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let (qh, kh, vh) = (half(&q)?, half(&k)?, half(&v)?);
        let exact = run([&q, &k, &v], 5, |q, k, v| {
            attention_in_blocks(q, k, v, heads, 0.5, false, 4)
        })?;
        for upcast in [false, true] {
            let ours = run([&qh, &kh, &vh], 5, |q, k, v| {
                attention_in_blocks(q, k, v, heads, 0.5, upcast, 4)
            })?;
            assert_eq!(ours.0.dtype(), DType::F16);
            assert!(max_diff(&ours.0, &exact.0)? < 1e-2, "upcast {upcast}");
            for (a, b) in ours.1.iter().zip(&exact.1) {
                assert_eq!(a.dtype(), DType::F16);
                assert!(max_diff(a, b)? < 2e-2, "upcast {upcast}");
            }
        }
        Ok(())
    }

    #[test]
    fn untracked_keys_and_values_get_no_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let q = Var::from_tensor(&randn(&mut rng, &[1, 4, 4], 1.0, 0.0)?)?;
        let k = randn(&mut rng, &[1, 3, 4], 1.0, 0.0)?;
        let out = attention_in_blocks(q.as_tensor(), &k, &k, 2, 0.5, false, 2)?;
        let grads = out.sum_all()?.backward()?;
        assert!(grads.get(q.as_tensor()).is_some() && grads.get(&k).is_none());
        Ok(())
    }

    #[test]
    fn backward_builds_no_graph_of_its_own() -> Result<()> {
        // The backward reads the op's output, a node of the graph: without detaching it, every
        // block's probabilities and score gradients were recorded into a graph of the backward
        // and kept until the gradients were consumed (2.2 GiB for one 512 px self-attention).
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut vars = Vec::new();
        for _ in 0..3 {
            vars.push(Var::from_tensor(&randn(&mut rng, &[1, 12, 8], 1.0, 0.0)?)?);
        }
        let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
        let out = attention_in_blocks(q, k, v, 2, 0.5, false, 4)?;
        let grads = (&out * &randn(&mut rng, out.dims(), 1.0, 0.0)?)?
            .sum_all()?
            .backward()?;
        for (name, var) in ["q", "k", "v"].iter().zip(&vars) {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            assert!(!g.track_op(), "d{name} carries a graph");
        }
        Ok(())
    }
}
