//! The mean cross-entropy of rows of logits against target ids — a language model's loss —
//! with a backward of its own on the CPU.
//!
//! Composed from candle ops, `log Σ exp(z − max) − (z_t − max)` over a `[N, vocab]` matrix
//! makes and keeps half a dozen matrices of that size for backward; with Qwen's vocabulary of
//! 151,936 and a thousand tokens, each is 622 MB, and every one is a fresh mapping the kernel
//! must clear page by page (35 % of a step in a profile). Here the forward reads the logits
//! once per row (max, then the sum of exponentials: the log-sum-exp) and keeps only that
//! vector; the backward writes the one matrix it must return, `(softmax(z) − onehot(t)) · g/N`.
//! Other devices use the composed form.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::custom_backward::attach;
use super::dense::with_slice;
use crate::Result;

/// `mean_i(log Σ_j exp(z_ij) − z_i,t_i)` for logits `z: [N, V]` (any float dtype; computed in
/// f32) and `targets: [N]` (each below V). A scalar f32 tensor.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let z = logits.to_dtype(DType::F32)?.contiguous()?;
    let (n, v) = z.dims2()?;
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        return Err(candle_core::Error::Msg(format!(
            "cross entropy: {} targets for {n} rows of {v} logits, or a target out of range",
            targets.len()
        ))
        .into());
    }
    if !z.device().is_cpu() {
        return composed(&z, targets);
    }
    let plain = z.detach();
    let lse: Vec<f32> = with_slice(&plain, "cross entropy", |s: &[f32]| {
        Ok(s.par_chunks(v).map(log_sum_exp).collect())
    })?;
    let total = with_slice(&plain, "cross entropy", |s: &[f32]| {
        Ok((0..n)
            .map(|i| f64::from(lse[i]) - f64::from(s[i * v + targets[i] as usize]))
            .sum::<f64>())
    })?;
    let loss = Tensor::new((total / n as f64) as f32, z.device())?;
    let targets = targets.to_vec();
    attach(
        "cross entropy",
        &z,
        loss,
        Box::new(move |g: &Tensor| {
            let scale = g.to_dtype(DType::F32)?.to_scalar::<f32>()? / n as f32;
            let grad = with_slice(&plain, "cross entropy backward", |s: &[f32]| {
                let mut out = vec![0f32; n * v];
                out.par_chunks_mut(v)
                    .zip(s.par_chunks(v))
                    .enumerate()
                    .for_each(|(i, (o, row))| {
                        let m = lse[i];
                        for (o, &x) in o.iter_mut().zip(row) {
                            *o = (x - m).exp() * scale;
                        }
                        o[targets[i] as usize] -= scale;
                    });
                Ok(out)
            })?;
            Ok(Tensor::from_vec(grad, (n, v), plain.device())?)
        }),
    )
}

/// `log Σ exp(row)`, stable.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    max + sum.ln()
}

/// The same value from candle ops (what devices other than the CPU run).
fn composed(z: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    let targets = Tensor::from_vec(targets.to_vec(), (n, 1), z.device())?;
    let max = z.max_keepdim(1)?.detach();
    let shifted = z.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(1)?.log()?;
    let target = shifted.gather(&targets, 1)?;
    Ok((log_sum - target)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_loss_and_gradient_are_the_composed_ones() -> Result<()> {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..5 * 37)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let targets = [3u32, 0, 36, 17, 17];
        let run = |fused: bool| -> Result<(f32, Vec<f32>)> {
            let z = Var::from_vec(values.clone(), (5, 37), &dev)?;
            let x = (z.as_tensor() * 1.0)?;
            let loss = if fused {
                cross_entropy(&x, &targets)?
            } else {
                composed(&x, &targets)?
            };
            let grads = loss.backward()?;
            let g = grads.get(z.as_tensor()).expect("a gradient");
            Ok((loss.to_scalar()?, g.flatten_all()?.to_vec1()?))
        };
        let (fused, fused_grad) = run(true)?;
        let (plain, plain_grad) = run(false)?;
        assert!((fused - plain).abs() < 1e-5, "{fused} vs {plain}");
        for (a, b) in fused_grad.iter().zip(&plain_grad) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(cross_entropy(&Tensor::zeros((2, 4), DType::F32, &dev)?, &[1, 4]).is_err());
        Ok(())
    }
}
