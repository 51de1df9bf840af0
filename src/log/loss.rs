//! The three loss numbers a user watches, computed the way kohya's sd-scripts computes them, so
//! curves compare across tools.
//!
//! kohya (`LossRecorder` in library/train_util.py) keeps one slot per step of an epoch: during the
//! first epoch the average is over every step so far; from the second epoch on, each step
//! replaces the slot of the same step one epoch earlier. That is a moving average over the last
//! `steps_per_epoch` steps, which is what [`LossTracker::average`] is. kohya's
//! `loss/epoch_average` is that same average read at the end of an epoch, i.e. the mean of the
//! epoch's steps; [`LossTracker::epoch_average`] is the mean of the current epoch's steps
//! (identical at the end of a whole epoch, and still only this epoch's when a run stops
//! mid-epoch). kohya records one loss per micro-batch; we record one per optimizer step (the mean
//! over its accumulated micro-batches), so the window covers the same samples.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Current, moving-average and epoch-average loss. Serializable, so a resumed run continues its
/// curves where they were.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossTracker {
    window: usize,
    /// The last `window` losses, oldest first.
    recent: VecDeque<f32>,
    epoch_sum: f64,
    epoch_steps: u64,
}

impl LossTracker {
    /// A tracker whose moving average spans `steps_per_epoch` steps (at least one).
    pub fn new(steps_per_epoch: usize) -> LossTracker {
        let window = steps_per_epoch.max(1);
        LossTracker {
            window,
            recent: VecDeque::with_capacity(window),
            epoch_sum: 0.0,
            epoch_steps: 0,
        }
    }

    /// Records the loss of one optimizer step.
    pub fn record(&mut self, loss: f32) {
        while self.recent.len() >= self.window.max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(loss);
        self.epoch_sum += f64::from(loss);
        self.epoch_steps += 1;
    }

    /// Starts a new epoch: the epoch average restarts, the moving average carries on.
    pub fn start_epoch(&mut self) {
        self.epoch_sum = 0.0;
        self.epoch_steps = 0;
    }

    /// The last recorded loss.
    pub fn current(&self) -> Option<f32> {
        self.recent.back().copied()
    }

    /// Mean of the last `steps_per_epoch` losses (fewer during the first epoch).
    pub fn average(&self) -> Option<f32> {
        if self.recent.is_empty() {
            return None;
        }
        // Summed afresh each time: a running sum would drift, and one NaN would stick forever.
        let sum: f64 = self.recent.iter().map(|&l| f64::from(l)).sum();
        Some((sum / self.recent.len() as f64) as f32)
    }

    /// Mean of the losses recorded since the current epoch began.
    pub fn epoch_average(&self) -> Option<f32> {
        (self.epoch_steps > 0).then(|| (self.epoch_sum / self.epoch_steps as f64) as f32)
    }

    /// How many steps the moving average spans once full.
    pub fn window(&self) -> usize {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kohya's recorder, transcribed as its behaviour: slot per step-in-epoch, replaced from the
    /// second epoch on.
    struct KohyaRecorder {
        slots: Vec<f64>,
    }

    impl KohyaRecorder {
        fn add(&mut self, epoch: usize, step: usize, loss: f64) {
            if epoch == 0 {
                self.slots.push(loss);
            } else {
                self.slots[step] = loss;
            }
        }
        fn moving_average(&self) -> f64 {
            self.slots.iter().sum::<f64>() / self.slots.len() as f64
        }
    }

    #[test]
    fn average_matches_kohya_over_several_epochs() {
        let steps_per_epoch = 4;
        let mut ours = LossTracker::new(steps_per_epoch);
        let mut kohya = KohyaRecorder { slots: Vec::new() };
        let mut loss = 1.0f32;
        for epoch in 0..3 {
            ours.start_epoch();
            let mut epoch_losses = Vec::new();
            for step in 0..steps_per_epoch {
                loss = loss * 0.9 + (step as f32) * 0.01;
                ours.record(loss);
                kohya.add(epoch, step, f64::from(loss));
                epoch_losses.push(f64::from(loss));
                let diff = (f64::from(ours.average().unwrap()) - kohya.moving_average()).abs();
                assert!(diff < 1e-6, "epoch {epoch} step {step}: {diff}");
                assert_eq!(ours.current(), Some(loss));
            }
            // At the end of an epoch kohya logs its moving average as `loss/epoch_average`.
            let epoch_mean = epoch_losses.iter().sum::<f64>() / epoch_losses.len() as f64;
            let ours_epoch = f64::from(ours.epoch_average().unwrap());
            assert!((ours_epoch - kohya.moving_average()).abs() < 1e-6);
            assert!((ours_epoch - epoch_mean).abs() < 1e-6);
        }
    }

    #[test]
    fn window_drops_the_oldest_and_epoch_average_restarts() {
        let mut t = LossTracker::new(2);
        assert_eq!(
            (t.current(), t.average(), t.epoch_average()),
            (None, None, None)
        );
        t.record(1.0);
        t.record(3.0);
        t.record(5.0);
        assert_eq!(t.average(), Some(4.0));
        assert_eq!(t.epoch_average(), Some(3.0));
        t.start_epoch();
        assert_eq!(t.epoch_average(), None);
        t.record(7.0);
        assert_eq!((t.average(), t.epoch_average()), (Some(6.0), Some(7.0)));
    }

    #[test]
    fn a_nan_leaves_the_average_once_it_leaves_the_window() {
        let mut t = LossTracker::new(2);
        t.record(f32::NAN);
        assert!(t.average().unwrap().is_nan());
        t.record(1.0);
        t.record(2.0);
        assert_eq!(t.average(), Some(1.5));
    }

    #[test]
    fn zero_steps_per_epoch_still_tracks() {
        let mut t = LossTracker::new(0);
        t.record(2.0);
        t.record(4.0);
        assert_eq!((t.window(), t.average()), (1, Some(4.0)));
    }

    #[test]
    fn state_survives_serialization_for_resume() {
        let mut t = LossTracker::new(3);
        for l in [0.5, 0.25, 0.125, 1.0] {
            t.record(l);
        }
        let json = serde_json::to_string(&t).unwrap();
        let back: LossTracker = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }
}
