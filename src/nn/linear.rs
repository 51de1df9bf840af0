//! A frozen linear layer with an optional adapter. On the CPU the frozen product is a custom op
//! whose backward computes the input gradient only ([`super::frozen`]).

use std::sync::Arc;

use candle_core::Tensor;

use super::adapter::{Adapter, LayerKind};
use super::weights::Scope;
use super::{frozen, frozen_generic};
use crate::Result;

/// `y = x Wᵀ + b (+ adapter(x))` with `W: [out_features, in_features]` read from `<path>.weight`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn Adapter>>,
}

impl Linear {
    /// Reads `weight` (and `bias` when `bias` is true) from `scope` and asks the scope's adapter
    /// provider whether this layer gets an adapter.
    pub fn new(scope: Scope, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = scope.get_matrix("weight", (out_features, in_features))?;
        let bias = if bias {
            Some(scope.get("bias", out_features)?)
        } else {
            None
        };
        let adapter = scope.adapter(LayerKind::Linear {
            in_features,
            out_features,
        })?;
        Ok(Linear {
            weight,
            bias,
            adapter,
        })
    }

    /// A layer from tensors already at hand, with no adapter.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            adapter: None,
        }
    }

    /// `x: [..., in_features]` → `[..., out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features.max(1);
        super::flops::add_dense(2 * (rows * in_features * self.out_features()) as u64);
        let fused = frozen::applies_to(x, &self.weight, self.bias.as_ref());
        if let Some(low_rank) = self.adapter.as_ref().and_then(|a| a.low_rank()) {
            if fused && frozen::low_rank_applies(x, &low_rank) {
                return frozen::linear_low_rank(x, &self.weight, self.bias.as_ref(), &low_rank);
            }
            if !fused && frozen_generic::applies_to(x, &self.weight, self.bias.as_ref()) {
                let (w, b) = (&self.weight, self.bias.as_ref());
                return frozen_generic::linear_low_rank(x, w, b, &low_rank);
            }
        }
        let (weight, bias) = (&self.weight, self.bias.as_ref());
        let mut y = if fused {
            frozen::linear(x, weight, bias)?
        } else if frozen_generic::applies_to(x, weight, bias) {
            frozen_generic::linear(x, weight, bias)?
        } else {
            frozen::linear_plain(x, &super::in_dtype_of(weight, x)?, bias)?
        };
        if let Some(adapter) = &self.adapter {
            y = (y + adapter.forward(x)?)?;
        }
        Ok(y)
    }

    /// `forward(x) + residual` (`residual` of the output's shape). On the frozen path the layer
    /// and the sum are one op, so the layer's own output is not kept for backward; an adapter's
    /// output is added after it (with a zero adapter the result is the same, bit for bit, as
    /// without one).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (weight, bias) = (&self.weight, self.bias.as_ref());
        let fused = frozen::applies_to(x, weight, bias);
        let generic = !fused && frozen_generic::applies_to(x, weight, bias);
        if !fused && !generic {
            return Ok((self.forward(x)? + residual)?);
        }
        let in_features = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_features.max(1);
        super::flops::add_dense(2 * (rows * in_features * self.out_features()) as u64);
        let y = if fused {
            frozen::linear_add(x, weight, bias, Some(residual))?
        } else {
            frozen_generic::linear_add(x, weight, bias, residual)?
        };
        Ok(match &self.adapter {
            Some(adapter) => (y + adapter.forward(x)?)?,
            None => y,
        })
    }

    /// The frozen weight, `[out_features, in_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out_features]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The attached adapter's trainable tensors (none without an adapter).
    pub fn trainable_vars(&self) -> Vec<candle_core::Var> {
        self.adapter
            .as_ref()
            .map(|a| a.trainable_vars())
            .unwrap_or_default()
    }

    /// The attached adapter, if any.
    pub fn adapter(&self) -> Option<&Arc<dyn Adapter>> {
        self.adapter.as_ref()
    }

    /// Number of output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}
