//! Training: the loss of a micro-batch ([`step`]), the caches that spare the VAE and the text
//! encoder ([`latents`], [`text_cache`]), optimizers with saveable state ([`optim`]), gradient
//! clipping ([`clip_grad`]) and learning-rate schedules ([`schedule`]).
//!
//! Everything here is deterministic and holds no global state: the same gradients and learning
//! rates give bit-identical parameters, also across a save/restore of the optimizer state, and
//! every random draw comes from a stream keyed by where it happens ([`crate::rng`]).

pub mod clip_grad;
mod error;
pub mod latents;
pub mod optim;
pub mod schedule;
pub mod step;
pub mod text_cache;

pub use clip_grad::clip_grad_norm;
pub use error::TrainError;
pub use optim::{
    build_optimizer, AdamW, AdamW8bit, Lion, NamedParam, OptimizerSettings, OptimizerState,
    ParamGroup, ParamOptimizer, Sgd,
};
pub use schedule::LrSchedule;
