//! Step arithmetic: how many optimizer steps a run makes, and when step files are written.
//!
//! One optimizer step consumes `gradient_accumulation_steps` batches; an epoch's last, partial
//! accumulation still makes a step (as accelerate and kohya do), so
//! `steps_per_epoch = ⌈batches_per_epoch / gradient_accumulation_steps⌉`.

use crate::config::TrainingSettings;

/// What ends the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepLimit {
    /// `epochs` full epochs.
    Epochs,
    /// `max_train_steps`, which wins over `epochs`.
    MaxTrainSteps,
}

/// The optimizer steps of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCounts {
    pub batches_per_epoch: usize,
    pub gradient_accumulation_steps: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub limit: StepLimit,
    /// Learning-rate warm-up in optimizer steps (a ratio in the config is resolved here).
    pub warmup_steps: usize,
}

impl StepCounts {
    /// The step counts for a dataset yielding `batches_per_epoch` batches of `training.batch_size`.
    pub fn new(batches_per_epoch: usize, training: &TrainingSettings) -> StepCounts {
        let accumulation = training.gradient_accumulation_steps.max(1);
        let steps_per_epoch = batches_per_epoch.div_ceil(accumulation);
        let (total_steps, limit) = match training.max_train_steps {
            Some(max) => (max, StepLimit::MaxTrainSteps),
            None => (
                steps_per_epoch.saturating_mul(training.epochs),
                StepLimit::Epochs,
            ),
        };
        StepCounts {
            batches_per_epoch,
            gradient_accumulation_steps: accumulation,
            steps_per_epoch,
            total_steps,
            limit,
            warmup_steps: training.warmup.steps(total_steps),
        }
    }

    /// Epochs begun by the run (the last one may be partial under `max_train_steps`).
    pub fn epochs_run(&self) -> usize {
        if self.steps_per_epoch == 0 {
            return 0;
        }
        self.total_steps.div_ceil(self.steps_per_epoch)
    }
}

/// Which optimizer steps end with a step checkpoint (`<output_name>-stepNNNNNNNN.safetensors`).
///
/// Steps are counted from 1 (the step just taken). The last step is never a step checkpoint:
/// the final export is written then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavePoints {
    /// Every this many optimizer steps (`save_steps`).
    pub every_steps: Option<usize>,
    /// At the end of every this many epochs (`save_every_n_epochs`).
    pub every_epochs: Option<usize>,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl SavePoints {
    pub fn new(
        save_steps: Option<usize>,
        save_every_n_epochs: Option<usize>,
        steps: &StepCounts,
    ) -> Self {
        SavePoints {
            every_steps: save_steps,
            every_epochs: save_every_n_epochs,
            steps_per_epoch: steps.steps_per_epoch,
            total_steps: steps.total_steps,
        }
    }

    /// Whether a step file is written after optimizer step `step` (1-based).
    pub fn is_save_point(&self, step: usize) -> bool {
        step > 0
            && step < self.total_steps
            && self
                .periods()
                .into_iter()
                .flatten()
                .any(|p| step.is_multiple_of(p))
    }

    /// Every step that ends with a step file, in order, computed as it is asked for (a run of a billion steps
    /// costs nothing until its save points are walked).
    pub fn steps(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(self.next_after(0), |&s| self.next_after(s))
    }

    /// How many step files the run writes.
    pub fn count(&self) -> usize {
        let before = self.total_steps.saturating_sub(1) as u128;
        match self.periods() {
            [None, None] => 0,
            [Some(p), None] | [None, Some(p)] => (before / p as u128) as usize,
            [Some(a), Some(b)] => {
                let (a, b) = (a as u128, b as u128);
                let lcm = a / gcd(a, b) * b;
                (before / a + before / b - before / lcm) as usize
            }
        }
    }

    /// The last step with a step file, if any.
    pub fn last(&self) -> Option<usize> {
        let before = self.total_steps.checked_sub(1)?;
        self.periods()
            .into_iter()
            .flatten()
            .map(|p| before / p * p)
            .filter(|&s| s > 0)
            .max()
    }

    /// The first step with a step file after `step`.
    fn next_after(&self, step: usize) -> Option<usize> {
        self.periods()
            .into_iter()
            .flatten()
            .filter_map(|p| (step / p).checked_add(1)?.checked_mul(p))
            .filter(|&s| s < self.total_steps)
            .min()
    }

    /// The two periods in optimizer steps (by steps, by epochs); `None` where not asked for.
    fn periods(&self) -> [Option<usize>; 2] {
        let by_steps = self.every_steps.filter(|&n| n > 0);
        let by_epochs = self
            .every_epochs
            .and_then(|n| n.checked_mul(self.steps_per_epoch))
            .filter(|&p| p > 0);
        [by_steps, by_epochs]
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TrainPlan, Warmup};
    use std::path::Path;

    fn training(extra: &str) -> TrainingSettings {
        let text = format!("train_data_dir: d\nbase_model: ./m\noutput_dir: o\n{extra}");
        TrainPlan::from_yaml(&text, Path::new("c.yaml"), &[], Path::new("/"))
            .unwrap()
            .training
    }

    #[test]
    fn steps_per_epoch_round_the_last_accumulation_up() {
        let t = training("gradient_accumulation_steps: 4\nepochs: 3\n");
        let counts = StepCounts::new(10, &t);
        assert_eq!(counts.steps_per_epoch, 3);
        assert_eq!(counts.total_steps, 9);
        assert_eq!(counts.limit, StepLimit::Epochs);
        assert_eq!(counts.epochs_run(), 3);
        assert_eq!(StepCounts::new(8, &t).steps_per_epoch, 2);
        assert_eq!(StepCounts::new(1, &t).steps_per_epoch, 1);
    }

    #[test]
    fn max_train_steps_wins_over_epochs() {
        let t = training("epochs: 100\nmax_train_steps: 25\n");
        let counts = StepCounts::new(10, &t);
        assert_eq!(
            (counts.total_steps, counts.limit),
            (25, StepLimit::MaxTrainSteps)
        );
        assert_eq!(counts.epochs_run(), 3);
    }

    #[test]
    fn warmup_ratio_resolves_against_the_total() {
        let mut t = training("epochs: 10\nscheduler: cosine\nlr_warmup_steps: 0.05\n");
        assert_eq!(StepCounts::new(19, &t).warmup_steps, 9); // 190 steps × 0.05 = 9.5 → 9
        t.warmup = Warmup::Steps(12);
        assert_eq!(StepCounts::new(19, &t).warmup_steps, 12);
    }

    #[test]
    fn cyberpunk_arithmetic() {
        // 40 images, batch 4, accumulation 2, 12 epochs: 10 batches → 5 steps per epoch, 60 steps.
        let t = training("batch_size: 4\ngradient_accumulation_steps: 2\nepochs: 12\n");
        let counts = StepCounts::new(40usize.div_ceil(4), &t);
        assert_eq!((counts.steps_per_epoch, counts.total_steps), (5, 60));
    }

    #[test]
    fn checkpoints_every_n_steps_skip_the_final_step() {
        let t = training("epochs: 3\n");
        let counts = StepCounts::new(100, &t); // 300 steps
        let every_100 = SavePoints::new(Some(100), None, &counts);
        assert_eq!(every_100.steps().collect::<Vec<_>>(), [100, 200]);
        assert!(
            every_100.is_save_point(200)
                && !every_100.is_save_point(300)
                && !every_100.is_save_point(150)
        );
        let every_7 = SavePoints::new(Some(7), None, &counts);
        assert_eq!(every_7.steps().count(), 42); // 7..=294
        let never = SavePoints::new(None, None, &counts);
        assert_eq!(never.steps().count(), 0);
        let too_rare = SavePoints::new(Some(1000), None, &counts);
        assert_eq!(too_rare.steps().count(), 0);
    }

    #[test]
    fn epoch_checkpoints_land_on_epoch_ends_and_merge_with_step_checkpoints() {
        let t = training("epochs: 4\n");
        let counts = StepCounts::new(30, &t); // 30 steps per epoch, 120 in all
        let by_epoch = SavePoints::new(None, Some(1), &counts);
        assert_eq!(by_epoch.steps().collect::<Vec<_>>(), [30, 60, 90]);
        let both = SavePoints::new(Some(50), Some(2), &counts);
        assert_eq!(both.steps().collect::<Vec<_>>(), [50, 60, 100]);
    }

    #[test]
    fn counts_and_last_steps_agree_with_walking_every_step() {
        for (spe, epochs) in [(1, 1), (7, 3), (30, 4), (13, 11)] {
            let t = training(&format!("epochs: {epochs}\n"));
            let counts = StepCounts::new(spe, &t);
            for every_steps in [None, Some(1), Some(3), Some(50)] {
                for every_epochs in [None, Some(1), Some(2), Some(5)] {
                    let c = SavePoints::new(every_steps, every_epochs, &counts);
                    let walked: Vec<usize> = (1..counts.total_steps)
                        .filter(|&s| c.is_save_point(s))
                        .collect();
                    assert_eq!(c.steps().collect::<Vec<_>>(), walked);
                    assert_eq!(c.count(), walked.len());
                    assert_eq!(c.last(), walked.last().copied());
                }
            }
        }
    }

    #[test]
    fn a_huge_plan_is_described_without_walking_it() {
        let t = training("max_train_steps: 99999999\n");
        let counts = StepCounts::new(10, &t);
        let c = SavePoints::new(Some(1), Some(1), &counts);
        assert_eq!(c.count(), 99_999_998);
        assert_eq!(c.last(), Some(99_999_998));
        assert_eq!(c.steps().take(3).collect::<Vec<_>>(), [1, 2, 3]);
        let counts = StepCounts {
            total_steps: usize::MAX,
            ..counts
        };
        let c = SavePoints::new(Some(usize::MAX / 2 + 1), Some(3), &counts);
        assert_eq!(c.steps().nth(1), Some(60));
        assert!(c.count() > 0 && c.last().is_some());
        let none = SavePoints::new(None, None, &counts);
        assert_eq!(
            (none.steps().next(), none.count(), none.last()),
            (None, 0, None)
        );
    }
}
