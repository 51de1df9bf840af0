//! Errors of the training machinery (optimizers, their saved state, LR schedules) and of a
//! run (a non-finite loss, a state that cannot be resumed, an output folder already used).

use std::fmt;

/// Problems met by the optimizers, the gradient clipping and the LR schedule.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A saved optimizer state does not fit the optimizer and parameters of this run (another
    /// optimizer, another LoRA layout, a damaged checkpoint).
    #[error("{origin}: the optimizer state cannot be restored: {message}; resume with the config the state was written with, or start a new run")]
    State { origin: String, message: String },
    /// The settings of the optimizer or schedule are unusable.
    #[error("`{key}`: {message}")]
    Settings { key: String, message: String },
    /// The loss or the gradient norm became NaN or infinite: the weights were not updated with
    /// it, and the run stops.
    #[error("step {step}: the {what} is {value} (not a finite number); training stopped without applying this step, and the checkpoints written so far are kept. Lower `learning_rate` (and `unet_lr`/`text_encoder_lr`), keep `max_grad_norm` at 1.0, or train with `mixed_precision: no`")]
    NotFinite {
        step: usize,
        what: &'static str,
        value: f64,
    },
    /// `--resume` names a state that does not exist, is damaged, or belongs to another config.
    #[error("--resume {origin}: {message}")]
    Resume { origin: String, message: String },
    /// The output folder holds a finished run, which a new run would overwrite.
    #[error("{0}")]
    OutputTaken(String),
    /// The caller broke the optimizer's contract (wrong number of learning rates, a parameter
    /// that is not f32...): a bug in the training loop, not in the user's input.
    #[error("optimizer misuse: {0}")]
    Usage(String),
}

impl TrainError {
    pub(crate) fn state(origin: impl fmt::Display, message: impl Into<String>) -> Self {
        TrainError::State {
            origin: origin.to_string(),
            message: message.into(),
        }
    }

    /// Whether the user's input is at fault (a mismatched resume state, unusable settings), so
    /// the process should exit with status 2 rather than 1.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            TrainError::State { .. }
                | TrainError::Settings { .. }
                | TrainError::Resume { .. }
                | TrainError::OutputTaken(_)
        )
    }
}
