//! Step arithmetic: how many optimizer steps a run makes, and when checkpoints are written.
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
pub struct StepPlan {
    pub batches_per_epoch: usize,
    pub gradient_accumulation_steps: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub limit: StepLimit,
    /// Learning-rate warm-up in optimizer steps (a ratio in the config is resolved here).
    pub warmup_steps: usize,
}

impl StepPlan {
    /// The plan for a dataset yielding `batches_per_epoch` batches of `training.batch_size`.
    pub fn new(batches_per_epoch: usize, training: &TrainingSettings) -> StepPlan {
        let accumulation = training.gradient_accumulation_steps.max(1);
        let steps_per_epoch = batches_per_epoch.div_ceil(accumulation);
        let (total_steps, limit) = match training.max_train_steps {
            Some(max) => (max, StepLimit::MaxTrainSteps),
            None => (steps_per_epoch * training.epochs, StepLimit::Epochs),
        };
        StepPlan {
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
pub struct CheckpointSchedule {
    /// Every this many optimizer steps (`save_steps`).
    pub every_steps: Option<usize>,
    /// At the end of every this many epochs (`save_every_n_epochs`).
    pub every_epochs: Option<usize>,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl CheckpointSchedule {
    pub fn new(
        save_steps: Option<usize>,
        save_every_n_epochs: Option<usize>,
        steps: &StepPlan,
    ) -> Self {
        CheckpointSchedule {
            every_steps: save_steps,
            every_epochs: save_every_n_epochs,
            steps_per_epoch: steps.steps_per_epoch,
            total_steps: steps.total_steps,
        }
    }

    /// Whether a checkpoint is written after optimizer step `step` (1-based).
    pub fn is_checkpoint(&self, step: usize) -> bool {
        if step == 0 || step >= self.total_steps {
            return false;
        }
        let by_steps = self.every_steps.is_some_and(|n| n > 0 && step % n == 0);
        let by_epochs = self.every_epochs.is_some_and(|n| {
            let period = n * self.steps_per_epoch;
            period > 0 && step % period == 0
        });
        by_steps || by_epochs
    }

    /// Every checkpoint step, in order.
    pub fn steps(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.total_steps).filter(|s| self.is_checkpoint(*s))
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
        let plan = StepPlan::new(10, &t);
        assert_eq!(plan.steps_per_epoch, 3);
        assert_eq!(plan.total_steps, 9);
        assert_eq!(plan.limit, StepLimit::Epochs);
        assert_eq!(plan.epochs_run(), 3);
        assert_eq!(StepPlan::new(8, &t).steps_per_epoch, 2);
        assert_eq!(StepPlan::new(1, &t).steps_per_epoch, 1);
    }

    #[test]
    fn max_train_steps_wins_over_epochs() {
        let t = training("epochs: 100\nmax_train_steps: 25\n");
        let plan = StepPlan::new(10, &t);
        assert_eq!(
            (plan.total_steps, plan.limit),
            (25, StepLimit::MaxTrainSteps)
        );
        assert_eq!(plan.epochs_run(), 3);
    }

    #[test]
    fn warmup_ratio_resolves_against_the_total() {
        let mut t = training("epochs: 10\nscheduler: cosine\nlr_warmup_steps: 0.05\n");
        assert_eq!(StepPlan::new(19, &t).warmup_steps, 9); // 190 steps × 0.05 = 9.5 → 9
        t.warmup = Warmup::Steps(12);
        assert_eq!(StepPlan::new(19, &t).warmup_steps, 12);
    }

    #[test]
    fn cyberpunk_arithmetic() {
        // 40 images, batch 4, accumulation 2, 12 epochs: 10 batches → 5 steps per epoch, 60 steps.
        let t = training("batch_size: 4\ngradient_accumulation_steps: 2\nepochs: 12\n");
        let plan = StepPlan::new(40usize.div_ceil(4), &t);
        assert_eq!((plan.steps_per_epoch, plan.total_steps), (5, 60));
    }

    #[test]
    fn checkpoints_every_n_steps_skip_the_final_step() {
        let t = training("epochs: 3\n");
        let plan = StepPlan::new(100, &t); // 300 steps
        let every_100 = CheckpointSchedule::new(Some(100), None, &plan);
        assert_eq!(every_100.steps().collect::<Vec<_>>(), [100, 200]);
        assert!(
            every_100.is_checkpoint(200)
                && !every_100.is_checkpoint(300)
                && !every_100.is_checkpoint(150)
        );
        let every_7 = CheckpointSchedule::new(Some(7), None, &plan);
        assert_eq!(every_7.steps().count(), 42); // 7..=294
        let never = CheckpointSchedule::new(None, None, &plan);
        assert_eq!(never.steps().count(), 0);
        let too_rare = CheckpointSchedule::new(Some(1000), None, &plan);
        assert_eq!(too_rare.steps().count(), 0);
    }

    #[test]
    fn epoch_checkpoints_land_on_epoch_ends_and_merge_with_step_checkpoints() {
        let t = training("epochs: 4\n");
        let plan = StepPlan::new(30, &t); // 30 steps per epoch, 120 in all
        let by_epoch = CheckpointSchedule::new(None, Some(1), &plan);
        assert_eq!(by_epoch.steps().collect::<Vec<_>>(), [30, 60, 90]);
        let both = CheckpointSchedule::new(Some(50), Some(2), &plan);
        assert_eq!(both.steps().collect::<Vec<_>>(), [50, 60, 100]);
    }
}
