//! The TensorBoard tags we log (DESIGN.md §5): kohya's names, so users' dashboards carry over.

/// Loss of the last optimizer step, at the global step.
pub const LOSS_CURRENT: &str = "loss/current";
/// Moving average over the last epoch's worth of steps ([`super::LossTracker::average`]).
pub const LOSS_AVERAGE: &str = "loss/average";
/// Mean loss of an epoch, logged once per epoch. kohya logs it with the epoch number (1, 2, …)
/// as the step, not the global step: `writer.add_scalar(LOSS_EPOCH_AVERAGE, avg, epoch)`.
pub const LOSS_EPOCH_AVERAGE: &str = "loss/epoch_average";
/// A language model's loss on its validation records (`eval_data`, `val_split`), at the
/// global step.
pub const LOSS_VALIDATION: &str = "loss/validation";
/// Learning rate of the UNet adapters.
pub const LR_UNET: &str = "lr/unet";
/// Learning rate of the text-encoder adapters (only when they are trained).
pub const LR_TEXT_ENCODER: &str = "lr/textencoder";
/// Global norm of the adapters' gradients before clipping.
pub const GRAD_NORM: &str = "norm/grad";
/// Training throughput.
pub const SAMPLES_PER_SEC: &str = "perf/samples_per_sec";
/// A language model's throughput: the tokens of the step's batches (padding excluded).
pub const TOKENS_PER_SEC: &str = "perf/tokens_per_sec";
/// Learning rate of a language model's adapters.
pub const LR_LORA: &str = "lr/lora";

/// What one optimizer step logs; `None` fields are left out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepScalars {
    pub loss: f32,
    pub average_loss: f32,
    /// Each parameter group's learning rate under its tag ([`LR_UNET`], [`LR_TEXT_ENCODER`],
    /// [`LR_LORA`]).
    pub lrs: Vec<(&'static str, f64)>,
    pub grad_norm: Option<f32>,
    pub samples_per_sec: Option<f32>,
    pub tokens_per_sec: Option<f32>,
}

impl StepScalars {
    /// `(tag, value)` pairs for [`super::EventWriter::add_scalars`].
    pub fn tagged(&self) -> Vec<(&'static str, f32)> {
        let mut out = vec![(LOSS_CURRENT, self.loss), (LOSS_AVERAGE, self.average_loss)];
        out.extend(self.lrs.iter().map(|&(tag, lr)| (tag, lr as f32)));
        let optional = [
            (GRAD_NORM, self.grad_norm),
            (SAMPLES_PER_SEC, self.samples_per_sec),
            (TOKENS_PER_SEC, self.tokens_per_sec),
        ];
        out.extend(optional.into_iter().filter_map(|(t, v)| Some((t, v?))));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_scalars_leave_out_what_is_not_there() {
        let s = StepScalars {
            loss: 0.5,
            average_loss: 0.25,
            lrs: vec![(LR_UNET, 1e-4)],
            grad_norm: Some(2.0),
            ..StepScalars::default()
        };
        assert_eq!(
            s.tagged(),
            vec![
                ("loss/current", 0.5),
                ("loss/average", 0.25),
                ("lr/unet", 1e-4),
                ("norm/grad", 2.0)
            ]
        );
        let all = StepScalars {
            lrs: vec![(LR_UNET, 1e-4), (LR_TEXT_ENCODER, 5e-5)],
            samples_per_sec: Some(3.0),
            tokens_per_sec: Some(90.0),
            ..s
        };
        let tags: Vec<_> = all.tagged().into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            tags,
            [
                LOSS_CURRENT,
                LOSS_AVERAGE,
                LR_UNET,
                LR_TEXT_ENCODER,
                GRAD_NORM,
                SAMPLES_PER_SEC,
                TOKENS_PER_SEC
            ]
        );
    }
}
