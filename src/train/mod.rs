//! Training: a whole run ([`run::train`]) and its preparation ([`setup`]), one optimizer step
//! ([`trainer`]), the loss of a
//! micro-batch ([`step`]), the caches that spare the VAE and the text encoder ([`latents`],
//! [`disk_latents`], [`text_cache`]), optimizers with saveable state ([`optim`]), gradient
//! clipping ([`clip_grad`]), learning-rate schedules ([`schedule`]), the device and precision
//! ([`device`]), resumable states ([`checkpoint`], [`resume`]), the output folder
//! ([`outputs`]), preview pictures ([`previews`]) and stop requests ([`interrupt`]).
//!
//! Everything here is deterministic and holds no global state: the same gradients and learning
//! rates give bit-identical parameters, also across a save/restore of the optimizer state, and
//! every random draw comes from a stream keyed by where it happens ([`crate::rng`]).

pub mod clip_grad;
pub mod device;
pub mod disk_latents;
pub(crate) mod error;
pub mod interrupt;
pub mod latents;
pub mod lr_schedule;
pub mod optim;
pub mod outputs;
pub mod previews;
pub mod resume;
pub mod run;
pub mod setup;
pub mod state;
pub mod step;
pub mod task;
pub mod text_cache;
pub mod trainer;

pub use clip_grad::clip_grad_norm;
pub use error::TrainError;
pub use lr_schedule::LrSchedule;
pub use optim::{
    build_optimizer, AdamW, AdamW8bit, Lion, NamedParam, OptimizerSettings, OptimizerState,
    ParamGroup, ParamOptimizer, Sgd,
};
pub use run::{run_steps, train, RunEnd, RunOptions, RunParts, RunReport};
pub use task::TrainTask;
pub use trainer::{StepReport, Trainer};
