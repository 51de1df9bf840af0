//! Activations and softmax from primitive candle ops, so that their gradients are exact.
//!
//! `candle_nn::ops::softmax_last_dim` has no backward and silently drops gradients (DESIGN.md §7);
//! everything here is composed from ops whose backward candle implements.

use candle_core::{DType, Tensor, D};

use crate::Result;

/// `x · sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// The exact (erf) GELU, as `torch.nn.functional.gelu` computes by default:
/// `x · (1 + erf(x/√2)) / 2`. Built from `erf` rather than candle's `gelu_erf`, whose backward
/// uses 0.398942 for 1/√(2π) (a 7·10⁻⁷ relative error in the slope); `erf`'s is exact.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? * 0.5)? + 0.5;
    Ok((x * cdf?)?)
}

/// OpenAI CLIP's `x · sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = (x * 1.702)?.neg()?.exp()?.affine(1.0, 1.0)?.recip()?;
    Ok((x * s)?)
}

/// Numerically stable softmax over the last dimension, computed in f32 at least.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = if dtype == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() -> Result<()> {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [-1.0, 0.0, 1000.0]], &Device::Cpu)?;
        let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        let e = [1f32.exp(), 2f32.exp(), 3f32.exp()];
        let s: f32 = e.iter().sum();
        for (got, want) in y[0].iter().zip(e.iter().map(|v| v / s)) {
            assert!((got - want).abs() < 1e-6);
        }
        assert!((y[1][2] - 1.0).abs() < 1e-6 && y[1][0] < 1e-30);
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_its_formula() -> Result<()> {
        let x = Tensor::new(&[-2.0f32, 0.0, 0.5, 3.0], &Device::Cpu)?;
        let y = quick_gelu(&x)?.to_vec1::<f32>()?;
        for (v, got) in [-2.0f32, 0.0, 0.5, 3.0].iter().zip(y) {
            let want = v / (1.0 + (-1.702 * v).exp());
            assert!((got - want).abs() < 1e-6, "{v}: {got} vs {want}");
        }
        Ok(())
    }
}
