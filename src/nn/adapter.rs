//! The hook through which LoRA (or any other adapter) attaches to a layer.
//!
//! A model asks its [`AdapterProvider`] once per adaptable layer, at build time, with the layer's
//! module path and shape. The provider decides from the path whether that layer is a target and,
//! if it is, returns the adapter whose output the layer adds to its own.

use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use crate::Result;

/// The shape of a layer that may receive an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `y = x Wᵀ + b`, weight `[out_features, in_features]`.
    Linear {
        in_features: usize,
        out_features: usize,
    },
    /// 2-D convolution, weight `[out_channels, in_channels, kernel, kernel]`.
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
}

/// A trainable addition to a frozen layer's output.
pub trait Adapter: Debug + Send + Sync {
    /// The adapter's contribution for the layer input `x`; it has the layer output's shape
    /// (`[..., out_features]` for a linear layer, `[B, out_channels, H', W']` for a convolution).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The adapter's trainable tensors (gradient checkpointing must know which tensors a
    /// recomputed segment uses). Adapters that are not trained return none.
    fn trainable_vars(&self) -> Vec<Var> {
        Vec::new()
    }
}

/// Decides, per layer, whether an adapter is attached.
pub trait AdapterProvider: Send + Sync {
    /// Called once for each adaptable layer while a model is built. `module_path` is the layer's
    /// path inside its model (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    fn adapter_for(&self, module_path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>>;
}
