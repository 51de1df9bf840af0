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

    /// On a linear layer, the adapter as a plain low-rank product, `scale · x downᵀ upᵀ`, when
    /// that is all it computes for this call (no dropout, no casts): the layer may then fold it
    /// into its own fused op ([`super::frozen::linear_low_rank`]) instead of calling
    /// [`Adapter::forward`]. `None` (the default) keeps the separate path.
    fn low_rank(&self) -> Option<LowRank> {
        None
    }
}

/// An adapter that is `scale · x downᵀ upᵀ` with `down: [rank, in]` and `up: [out, rank]`.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// Decides, per layer, whether an adapter is attached.
pub trait AdapterProvider: Send + Sync {
    /// Called once for each adaptable layer while a model is built. `module_path` is the layer's
    /// path inside its model (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    fn adapter_for(&self, module_path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>>;
}
