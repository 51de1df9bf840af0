//! A frozen 2-D convolution with an optional adapter. On the CPU the frozen convolution is a custom
//! op whose backward computes the input gradient only ([`super::frozen`]).

use std::sync::Arc;

use candle_core::Tensor;

use super::adapter::{Adapter, LayerKind};
use super::weights::Scope;
use super::{frozen, frozen_generic};
use crate::Result;

/// Stride and symmetric zero padding of a square-kernel convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvConfig {
    pub stride: usize,
    pub padding: usize,
}

impl ConvConfig {
    /// Stride 1 and the padding that keeps the size for a `kernel`×`kernel` kernel.
    pub fn same(kernel: usize) -> Self {
        ConvConfig {
            stride: 1,
            padding: kernel / 2,
        }
    }
}

/// A convolution whose weight `[out, in, k, k]` is read from `<path>.weight` and bias from
/// `<path>.bias`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: ConvConfig,
    adapter: Option<Arc<dyn Adapter>>,
}

impl Conv2d {
    /// Reads the weights from `scope` and asks for an adapter.
    pub fn new(
        scope: Scope,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: ConvConfig,
        bias: bool,
    ) -> Result<Self> {
        let weight = scope.get_matrix("weight", (out_channels, in_channels, kernel, kernel))?;
        let bias = if bias {
            Some(scope.get("bias", out_channels)?)
        } else {
            None
        };
        let adapter = scope.adapter(LayerKind::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride: config.stride,
            padding: config.padding,
        })?;
        Ok(Conv2d {
            weight,
            bias,
            config,
            adapter,
        })
    }

    /// `x: [B, in, H, W]` → `[B, out, H', W']` with `H' = (H + 2·padding − k) / stride + 1`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (pad, stride) = (self.config.padding, self.config.stride);
        let (weight, bias) = (&self.weight, self.bias.as_ref());
        let mut y = if frozen::applies_to(x, weight, bias) {
            frozen::conv2d(x, weight, bias, pad, stride)?
        } else if frozen_generic::applies_to(x, weight, bias)
            && frozen_generic::conv_fits(weight, pad, stride)
        {
            frozen_generic::conv2d(x, weight, bias, pad, stride)?
        } else {
            frozen::conv2d_plain(x, &super::in_dtype_of(weight, x)?, bias, pad, stride)?
        };
        super::flops::add_dense(2 * (y.elem_count() * self.weight.elem_count() / y.dim(1)?) as u64);
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
        let (pad, stride) = (self.config.padding, self.config.stride);
        let (bias, weight) = (self.bias.as_ref(), &self.weight);
        let fused = frozen::applies_to(x, weight, bias);
        let generic = !fused
            && frozen_generic::applies_to(x, weight, bias)
            && frozen_generic::conv_fits(weight, pad, stride);
        if !fused && !generic {
            return Ok((self.forward(x)? + residual)?);
        }
        let y = if fused {
            frozen::conv2d_add(x, weight, bias, pad, stride, Some(residual))?
        } else {
            frozen_generic::conv2d_add(x, weight, bias, pad, stride, residual)?
        };
        super::flops::add_dense(2 * (y.elem_count() * weight.elem_count() / y.dim(1)?) as u64);
        Ok(match &self.adapter {
            Some(adapter) => (y + adapter.forward(x)?)?,
            None => y,
        })
    }

    /// The frozen weight, `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Stride and padding.
    pub fn config(&self) -> ConvConfig {
        self.config
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
}
