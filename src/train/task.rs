//! What the step loop ([`super::run`]) needs from the thing it trains, so that the image task
//! and the language-model task share one loop: the same epochs and accumulation, loss curves,
//! TensorBoard tags, step checkpoints, states, pruning and stop handling.
//!
//! A task owns its models, adapters, optimizer and data; the loop owns the step counter and
//! everything that is written about the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Var;

use super::optim::ParamOptimizer;
use super::trainer::StepReport;
use crate::log::EventWriter;
use crate::Result;

/// One trainable thing, seen from the loop.
pub trait TrainTask {
    /// A micro-batch.
    type Batch;

    /// The micro-batches of `epoch` (0-based) in training order: a function of the run's seed
    /// and the epoch only, so that a resumed run finds the same ones.
    fn epoch_batches(&self, epoch: usize, batch_size: usize) -> Vec<Self::Batch>;

    /// Optimizer step `step` (0-based) over `batches` (one to `gradient_accumulation_steps`).
    fn step(&mut self, step: usize, batches: &[Self::Batch]) -> Result<StepReport>;

    /// The TensorBoard tag of each learning rate in [`StepReport::lrs`], in that order.
    fn lr_tags(&self) -> Vec<&'static str>;

    /// The trainable tensors by a stable name, for state files.
    fn named_vars(&self) -> Vec<(String, Var)>;

    fn optimizer(&self) -> &dyn ParamOptimizer;

    /// Writes the adapters after `step` to `path` (a step checkpoint, or the final output when
    /// `last`); returns what was written.
    fn save_adapters(&self, path: &Path, step: usize, last: bool) -> Result<PathBuf>;

    /// What the state records of the data trained on: a fingerprint of the whole, and a digest
    /// per file (images) by name.
    fn data_identity(&self) -> (Option<String>, BTreeMap<String, String>);

    /// Draws the samples (preview pictures, answers) after `step`, when the task has any:
    /// the files written and a line for the console. `None`: nothing to draw.
    fn samples(
        &mut self,
        step: usize,
        events: Option<&mut EventWriter>,
    ) -> Option<Result<(Vec<PathBuf>, String)>>;

    /// The validation loss after `step` (1-based), when the task measures one then:
    /// `epoch_end` says the step ends an epoch, `last` that it is the run's last. `None`: not
    /// due, or no validation data.
    fn validation(&mut self, _step: usize, _epoch_end: bool, _last: bool) -> Option<Result<f32>> {
        None
    }
}
