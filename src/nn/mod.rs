//! The layers every model here is built from, written so that LoRA training can use them.
//!
//! Base weights are frozen tensors read from a checkpoint ([`tensor_file`] reads a safetensors
//! file tensor by tensor into owned memory) through a [`weights::Scope`], whose
//! path is the diffusers module path (`down_blocks.1.attentions.0.proj_in`), so a weight key, a
//! layer and a LoRA name are the same word. [`Linear`] and [`Conv2d`] carry an optional
//! [`adapter::Adapter`] chosen at build time by that path. Off the fast path (other devices and
//! dtypes, trainable base weights) norms and softmax are built from primitive candle ops, whose
//! gradients are correct (see DESIGN.md §7 for the ones that are not); on the CPU in f32/f64 the
//! layers run the fused custom ops of [`frozen`], [`fused_norm`], [`mem_attention`] and [`geglu`]
//! (matrix products in [`dense`], and in [`bf16_matmul`] for bf16 weights on processors that
//! multiply bf16; vectorised maths in [`fast_math`], timing in [`profile`]). On
//! CUDA (and in f16/bf16) the frozen layers and attention run [`frozen_generic`] and
//! [`chunked_attention`], the norms [`norm_generic`]: candle's own ops forward, our backward
//! ([`custom_backward`]), so that no frozen weight gets a gradient and neither score matrices nor
//! the norms' intermediates are kept; [`checkpoint`] works on both.

pub mod activation;
pub mod adapter;
pub mod bf16_matmul;
pub mod chunked_attention;
pub mod conv;
pub mod cross_entropy;
pub mod custom_backward;
pub mod dense;
pub mod fast_math;
pub mod flops;
pub mod frozen;
pub mod frozen_generic;
pub mod fused_norm;
pub mod geglu;
pub mod gradcheck;
pub mod linear;
pub mod mem_attention;
pub mod norm;
pub mod norm_generic;
pub mod profile;
pub mod recompute;
pub mod rotary;
pub mod runtime;
pub mod swiglu;
pub mod tensor_file;
pub mod weights;

pub use adapter::{Adapter, AdapterProvider, LayerKind, LowRank};
pub use conv::{Conv2d, ConvConfig};
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};
pub use weights::{Scope, WeightStore};

/// A frozen weight in `x`'s dtype, for the ops that take one dtype throughout: the weight
/// itself, or (one kept in half precision, [`WeightStore::set_matrix_dtype`]) a widened copy
/// for this call.
pub(crate) fn in_dtype_of(
    weight: &candle_core::Tensor,
    x: &candle_core::Tensor,
) -> crate::Result<candle_core::Tensor> {
    Ok(if weight.dtype() == x.dtype() {
        weight.clone()
    } else {
        weight.to_dtype(x.dtype())?
    })
}
