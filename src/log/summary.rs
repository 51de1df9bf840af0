//! `train_summary.json`: what a finished (or interrupted) run did, for people and scripts.
//!
//! [`RunClock`] measures the run; [`TrainSummary::new`] turns it and the trainer's counts into the
//! record; [`TrainSummary::write`] replaces the file atomically (temporary file, sync, rename), so a
//! reader never sees half a summary.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The summary's file name inside `output_dir`.
pub const SUMMARY_FILE: &str = "train_summary.json";

/// Wall-clock facts of one process's run.
#[derive(Debug, Clone)]
pub struct RunClock {
    started_at: SystemTime,
    started: Instant,
    start_step: u64,
    /// When the first optimizer step of this process began (after loading and caching).
    steps_started: Option<Instant>,
}

impl RunClock {
    /// Starts the clock for a run whose first step in this process is `start_step + 1`.
    pub fn start(start_step: u64) -> RunClock {
        RunClock {
            started_at: SystemTime::now(),
            started: Instant::now(),
            start_step,
            steps_started: None,
        }
    }

    /// Marks the start of the optimizer steps, so loading and latent caching do not count in
    /// the seconds per step. Only the first call counts.
    pub fn steps_begin(&mut self) {
        self.steps_started.get_or_insert_with(Instant::now);
    }
}

/// What the trainer knows at the end of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunOutcome {
    /// Stopped by Ctrl-C / SIGTERM (a resumable state was written) rather than finished.
    pub interrupted: bool,
    /// Optimizer steps done, counting those before a resume.
    pub steps: u64,
    pub total_steps: u64,
    /// Epochs finished.
    pub epochs: u64,
    pub final_loss: Option<f32>,
    /// The moving average at the end ([`super::LossTracker::average`]).
    pub average_loss: Option<f32>,
    /// LoRA files, state folders and other outputs written by this process.
    pub files_written: Vec<PathBuf>,
}

/// The content of `train_summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub interrupted: bool,
    pub steps: u64,
    pub total_steps: u64,
    /// The step this process resumed from, if it did.
    pub resumed_from_step: Option<u64>,
    pub epochs: u64,
    /// UTC, RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    /// This process's whole run, loading and caching included.
    pub wall_time_secs: f64,
    /// Mean time of this process's optimizer steps; `None` if it did none.
    pub seconds_per_step: Option<f64>,
    pub final_loss: Option<f32>,
    pub average_loss: Option<f32>,
    pub files_written: Vec<PathBuf>,
    /// The process's peak resident memory over the whole run (loading, caching, previews and
    /// steps), bytes; `None` where the platform does not say.
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
}

impl TrainSummary {
    /// The summary of a run measured by `clock`, ending now.
    pub fn new(clock: &RunClock, outcome: RunOutcome) -> TrainSummary {
        Self::ending_at(clock, outcome, SystemTime::now(), Instant::now())
    }

    fn ending_at(
        clock: &RunClock,
        outcome: RunOutcome,
        now: SystemTime,
        instant: Instant,
    ) -> TrainSummary {
        let steps_here = outcome.steps.saturating_sub(clock.start_step);
        let stepping =
            instant.saturating_duration_since(clock.steps_started.unwrap_or(clock.started));
        TrainSummary {
            interrupted: outcome.interrupted,
            steps: outcome.steps,
            total_steps: outcome.total_steps,
            resumed_from_step: (clock.start_step > 0).then_some(clock.start_step),
            epochs: outcome.epochs,
            started_at: rfc3339(clock.started_at),
            finished_at: rfc3339(now),
            wall_time_secs: round_ms(
                instant
                    .saturating_duration_since(clock.started)
                    .as_secs_f64(),
            ),
            seconds_per_step: (steps_here > 0)
                .then(|| round_ms(stepping.as_secs_f64() / steps_here as f64)),
            final_loss: outcome.final_loss.filter(|l| l.is_finite()),
            average_loss: outcome.average_loss.filter(|l| l.is_finite()),
            files_written: outcome.files_written,
            peak_memory_bytes: super::memory::peak_rss_bytes(),
        }
    }

    /// Writes `<output_dir>/train_summary.json` atomically and returns its path.
    pub fn write(&self, output_dir: &Path) -> Result<PathBuf> {
        let path = output_dir.join(SUMMARY_FILE);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| {
            Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        json.push(b'\n');
        crate::files::write_atomically(&path, &json)?;
        Ok(path)
    }

    /// Reads a summary back (tests, tools).
    pub fn read(path: &Path) -> Result<TrainSummary> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&text).map_err(|e| {
            Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })
    }
}

/// Seconds to the millisecond, so the JSON stays readable.
fn round_ms(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// `2024-05-01T12:34:56Z` (UTC, whole seconds).
fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01: count in 400-year eras (146 097 days),
/// with years starting on 1 March so the leap day falls at the end of the year.
pub(crate) fn civil_date(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(951_868_799)), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(at(951_868_800)), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339(at(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(at(4_107_542_400)), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339(at(1_709_164_800)), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_735_689_599)), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn seconds_per_step_counts_only_this_processes_steps() {
        let t0 = Instant::now();
        let clock = RunClock {
            started_at: at(1_700_000_000),
            started: t0,
            start_step: 100,
            steps_started: Some(t0 + Duration::from_secs(30)),
        };
        let outcome = RunOutcome {
            interrupted: true,
            steps: 150,
            total_steps: 400,
            epochs: 3,
            final_loss: Some(0.125),
            average_loss: Some(f32::NAN),
            files_written: vec![PathBuf::from("out/x-step00000150.safetensors")],
        };
        let s = TrainSummary::ending_at(
            &clock,
            outcome,
            at(1_700_000_130),
            t0 + Duration::from_secs(130),
        );
        assert_eq!(s.seconds_per_step, Some(2.0)); // 100 s for 50 steps
        assert_eq!(s.wall_time_secs, 130.0);
        assert_eq!(s.resumed_from_step, Some(100));
        assert_eq!(s.finished_at, "2023-11-14T22:15:30Z");
        assert_eq!(s.average_loss, None, "a NaN is not written as a number");

        let idle = TrainSummary::ending_at(
            &RunClock::start(0),
            RunOutcome::default(),
            at(0),
            Instant::now(),
        );
        assert_eq!(
            (idle.seconds_per_step, idle.resumed_from_step),
            (None, None)
        );
    }

    #[test]
    fn write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = TrainSummary::new(&RunClock::start(0), RunOutcome::default());
        std::fs::write(dir.path().join(SUMMARY_FILE), "old").unwrap();
        let path = s.write(dir.path()).unwrap();
        assert_eq!(TrainSummary::read(&path).unwrap(), s);
        s.steps = 7;
        s.write(dir.path()).unwrap();
        assert_eq!(TrainSummary::read(&path).unwrap().steps, 7);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SUMMARY_FILE]);
    }

    #[test]
    fn an_unwritable_output_dir_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "x").unwrap();
        let s = TrainSummary::new(&RunClock::start(0), RunOutcome::default());
        let err = s.write(&not_a_dir).unwrap_err().to_string();
        assert!(err.contains("train_summary.json"), "{err}");
    }
}
