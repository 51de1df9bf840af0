//! Group and layer normalisation: our fused custom ops ([`super::fused_norm`]) for frozen
//! parameters on the CPU in f32/f64, candle ops with our own backward ([`super::norm_generic`])
//! on CUDA and in half precision, otherwise (trainable parameters, the custom ops off) primitive
//! candle ops (candle's fused layer norm has no backward).

use candle_core::{DType, Tensor, D};

use super::weights::Scope;
use crate::Result;

/// `GroupNorm(num_groups, channels, eps)` with affine `weight` and `bias` of `[channels]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Reads `weight` and `bias` of shape `[channels]` from `scope`.
    pub fn new(scope: Scope, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::error::ModelError::InvalidConfig {
                origin: scope.store().describe(),
                message: format!(
                    "{}: {channels} channels cannot be split into {groups} groups",
                    scope.path()
                ),
            }
            .into());
        }
        let weight = scope.get("weight", channels)?;
        let bias = scope.get("bias", channels)?;
        Ok(GroupNorm {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `x: [B, C, ...]` → same shape; statistics over each group of channels and all positions,
    /// computed in f32 at least.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused_norm::applies(x, &self.weight, &self.bias) {
            return super::fused_norm::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                false,
            );
        }
        if super::norm_generic::applies(x, &self.weight, &self.bias) {
            let (w, b) = (&self.weight, &self.bias);
            return super::norm_generic::group_norm(x, w, b, self.groups, self.eps, false);
        }
        self.forward_primitive(x)
    }

    /// `silu(self.forward(x))`, fused into one op where [`super::fused_norm`] applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused_norm::applies(x, &self.weight, &self.bias) {
            return super::fused_norm::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                true,
            );
        }
        if super::norm_generic::applies(x, &self.weight, &self.bias) {
            let (w, b) = (&self.weight, &self.bias);
            return super::norm_generic::group_norm(x, w, b, self.groups, self.eps, true);
        }
        Ok(self.forward_primitive(x)?.silu()?)
    }

    fn forward_primitive(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let work = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let xg = x.to_dtype(work)?.reshape((b, self.groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centered = xg.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut affine_shape = vec![1, c];
        affine_shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let w = self
            .weight
            .to_dtype(work)?
            .reshape(affine_shape.as_slice())?;
        let bias = self.bias.to_dtype(work)?.reshape(affine_shape.as_slice())?;
        let y = normed
            .reshape(dims.as_slice())?
            .broadcast_mul(&w)?
            .broadcast_add(&bias)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// `LayerNorm(dim, eps)` over the last dimension with affine `weight` and `bias` of `[dim]`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` of shape `[dim]` from `scope`.
    pub fn new(scope: Scope, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: scope.get("weight", dim)?,
            bias: scope.get("bias", dim)?,
            eps,
        })
    }

    /// `x: [..., dim]` → same shape, computed in f32 at least.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused_norm::applies(x, &self.weight, &self.bias) {
            return super::fused_norm::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        if super::norm_generic::applies(x, &self.weight, &self.bias) {
            return super::norm_generic::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let dtype = x.dtype();
        let work = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = x.to_dtype(work)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&self.weight.to_dtype(work)?)?
            .broadcast_add(&self.bias.to_dtype(work)?)?;
        Ok(y.to_dtype(dtype)?)
    }
}
