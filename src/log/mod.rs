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
pub mod memory;
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

/// An integer with thousands separators: `1234567` → `1,234,567`.
pub fn thousands(n: impl std::fmt::Display) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && c.is_ascii_digit() && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(123_456_789u64), "123,456,789");
    }
}
