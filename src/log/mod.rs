//! What a run tells the user while and after it trains: TensorBoard event files, the progress
//! display, the start-up lines and `train_summary.json`.
//!
//! Nothing here knows about models or tensors; the trainer passes plain numbers in. Logging never
//! stops training by itself: every I/O error is returned, and the caller decides whether to warn
//! and carry on.

pub mod crc32c;
pub mod event;
pub mod event_reader;
pub mod loss;
pub mod progress;
pub mod record;
pub mod startup;
pub mod summary;
pub mod tags;
pub mod tensorboard;

pub use loss::LossTracker;
pub use progress::{Cadence, DisplayMode, StepStatus, TaskProgress, TrainProgress};
pub use startup::StartupFacts;
pub use summary::{RunClock, RunOutcome, TrainSummary};
pub use tags::StepScalars;
pub use tensorboard::EventWriter;
