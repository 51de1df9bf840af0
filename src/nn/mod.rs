//! The layers every model here is built from, written so that LoRA training can use them.
//!
//! Base weights are frozen tensors read from a checkpoint through a [`weights::Scope`], whose
//! path is the diffusers module path (`down_blocks.1.attentions.0.proj_in`), so a weight key, a
//! layer and a LoRA name are the same word. [`Linear`] and [`Conv2d`] carry an optional
//! [`adapter::Adapter`] chosen at build time by that path. Norms and softmax are built from
//! primitive candle ops, whose gradients are correct (see DESIGN.md §7 for the ones that are not).

pub mod activation;
pub mod adapter;
pub mod checkpoint;
pub mod conv;
pub mod dense;
pub mod fast_math;
pub mod flops;
pub mod frozen;
pub mod fused_norm;
pub mod geglu;
pub mod gradcheck;
pub mod linear;
pub mod mem_attention;
pub mod norm;
pub mod profile;
pub mod runtime;
pub mod weights;

pub use adapter::{Adapter, AdapterProvider, LayerKind, LowRank};
pub use conv::{Conv2d, ConvConfig};
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};
pub use weights::{Scope, WeightStore};
