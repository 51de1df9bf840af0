//! A process-wide count of the floating-point operations the frozen layers perform, so that the
//! benchmark can report achieved GFLOP/s from what the model really ran rather than from a
//! hand-written formula that could drift from the architecture.
//!
//! [`crate::nn::Linear`], [`crate::nn::Conv2d`] and the attention kernel add their forward
//! multiply-adds (counted as 2 FLOPs each) when they run. Counting is two relaxed atomic adds per
//! layer call, negligible next to the layer itself. Only the forward is counted; the benchmark
//! derives the backward from it (see [`TrainingFlops`]).

use std::sync::atomic::{AtomicU64, Ordering};

static DENSE: AtomicU64 = AtomicU64::new(0);
static ATTENTION: AtomicU64 = AtomicU64::new(0);

/// Adds the forward FLOPs of a linear or convolution layer.
pub fn add_dense(flops: u64) {
    DENSE.fetch_add(flops, Ordering::Relaxed);
}

/// Adds the forward FLOPs of the two attention products (`q kᵀ` and `p v`).
pub fn add_attention(flops: u64) {
    ATTENTION.fetch_add(flops, Ordering::Relaxed);
}

/// Forward FLOPs counted since the last [`take`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardFlops {
    /// Linear and convolution layers (the frozen weights' products).
    pub dense: u64,
    /// The attention score and value products.
    pub attention: u64,
}

/// The counts since the last call, and resets them.
pub fn take() -> ForwardFlops {
    ForwardFlops {
        dense: DENSE.swap(0, Ordering::Relaxed),
        attention: ATTENTION.swap(0, Ordering::Relaxed),
    }
}

/// The model FLOPs of one training step, from one forward's counts.
///
/// With frozen base weights, the backward of a linear or convolution layer computes only the
/// input gradient, one product of the forward's size; the attention products need two each
/// (gradients of both operands). So a step is `2 · dense + 3 · attention`. The LoRA adapters,
/// element-wise ops and norms are left out (under 1 % on SD 1.5 with rank 8), as is the
/// recomputation of gradient checkpointing (work done twice is not counted twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingFlops(pub u64);

impl From<ForwardFlops> for TrainingFlops {
    fn from(f: ForwardFlops) -> Self {
        TrainingFlops(2 * f.dense + 3 * f.attention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_step_counts_one_backward_product_per_dense_and_two_per_attention() {
        let f = ForwardFlops {
            dense: 10,
            attention: 4,
        };
        assert_eq!(TrainingFlops::from(f).0, 32);
    }
}
