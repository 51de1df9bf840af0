//! Training: the loss of a step, and (as it lands) the loop around it.

pub mod latents;
pub mod step;
pub mod text_cache;
