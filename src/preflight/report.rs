//! The dry-run report: the plan in plain words, one section per concern.

use std::fmt::{self, Write as _};

use super::{Preflight, SavePoints, StepCounts, StepLimit};
use crate::config::{LogWith, MixedPrecision, TrainPlan, Warmup};
use crate::log::thousands;

/// How many checkpoint steps and buckets are listed before "…".
const SHOWN: usize = 5;

impl fmt::Display for Preflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = &self.plan;
        writeln!(
            f,
            "Dry run of {}: checked, nothing written.",
            plan.config_path.display()
        )?;
        writeln!(f)?;
        let version = match self.model.architecture() {
            Some(v) => format!(" ({v})"),
            None => String::new(),
        };
        section(f, "Base model", &[format!("{}{version}", self.model)])?;
        section(f, "Dataset", &self.dataset_lines())?;
        section(f, "Steps", &step_lines(plan, &self.steps))?;
        section(f, "Optimizer", &optimizer_lines(plan))?;
        section(f, "LoRA", &self.lora_lines())?;
        section(f, "Output", &output_lines(plan, &self.save_points))?;
        let warnings = self.warnings();
        if !warnings.is_empty() {
            section(f, "Warnings", &warnings)?;
        }
        Ok(())
    }
}

/// A titled block: the title on its first line, the others indented to match.
pub(crate) fn section(f: &mut fmt::Formatter<'_>, title: &str, lines: &[String]) -> fmt::Result {
    for (i, line) in lines.iter().enumerate() {
        let head = if i == 0 { title } else { "" };
        writeln!(f, "{head:<12} {line}")?;
    }
    Ok(())
}

impl Preflight {
    fn dataset_lines(&self) -> Vec<String> {
        let (data, facts) = (&self.plan.data, &self.dataset);
        let samples = facts.images * facts.repeats as usize;
        let mut buckets = facts
            .buckets
            .iter()
            .take(SHOWN * 2)
            .map(|(w, h, n)| format!("{w}×{h}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        if facts.buckets.len() > SHOWN * 2 {
            write!(buckets, " and {} more", facts.buckets.len() - SHOWN * 2).ok();
        }
        let bucketing = if data.enable_bucket {
            "aspect-ratio buckets"
        } else {
            "one size"
        };
        let mut augment = Vec::new();
        if data.flip_aug {
            augment.push("horizontal flips");
        }
        if data.random_crop {
            augment.push("random crops");
        }
        if data.shuffle_caption {
            augment.push("shuffled captions");
        }
        let mut lines = vec![
            data.train_data_dir.display().to_string(),
            format!("captions: {}", facts.caption_source),
            format!(
                "{} images × {} repeats = {samples} samples per epoch, at {} px",
                facts.images, facts.repeats, data.resolution
            ),
            format!("buckets ({bucketing}): {buckets}"),
        ];
        if !augment.is_empty() {
            lines.push(format!("augmentation: {}", augment.join(", ")));
        }
        lines
    }
}

/// Batches, accumulation, steps and warm-up.
pub(crate) fn step_lines(plan: &TrainPlan, s: &StepCounts) -> Vec<String> {
    let t = &plan.training;
    let effective = t.batch_size * s.gradient_accumulation_steps;
    let total = match s.limit {
        StepLimit::Epochs => format!(
            "{} epochs × {} = {} optimizer steps in all",
            t.epochs, s.steps_per_epoch, s.total_steps
        ),
        StepLimit::MaxTrainSteps => format!(
            "{} optimizer steps in all: max_train_steps wins over epochs ({}), so {} epoch(s) \
             are begun",
            s.total_steps,
            t.epochs,
            s.epochs_run()
        ),
    };
    vec![
        format!(
            "batch size {} × gradient accumulation {} = effective batch {effective}",
            t.batch_size, s.gradient_accumulation_steps
        ),
        format!(
            "{} batches per epoch → {} optimizer steps per epoch",
            s.batches_per_epoch, s.steps_per_epoch
        ),
        total,
        match t.warmup {
            Warmup::Ratio(_) => format!(
                "learning-rate warm-up: {} steps ({})",
                s.warmup_steps, t.warmup
            ),
            Warmup::Steps(0) => "learning-rate warm-up: none".to_string(),
            Warmup::Steps(n) => format!("learning-rate warm-up: {n} steps"),
        },
    ]
}

/// The output folder, the step checkpoints, the final adapters and the logs.
pub(crate) fn output_lines(plan: &TrainPlan, save_points: &SavePoints) -> Vec<String> {
    let out = &plan.output;
    let count = save_points.count();
    let mut lines = vec![out.output_dir.display().to_string()];
    if let Some(first) = save_points.steps().next() {
        let mut shown = save_points
            .steps()
            .take(SHOWN)
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        if let (true, Some(last)) = (count > SHOWN, save_points.last()) {
            shown.push(format!("… {last}"));
        }
        let keep = match out.save_last_n {
            Some(n) => format!("; the newest {n} are kept"),
            None => String::new(),
        };
        lines.push(format!(
            "step checkpoints: {count} of them, after steps {}{keep}",
            shown.join(", ")
        ));
        lines.push(format!("  named {}, ...", out.step_file_name(first)));
    } else {
        lines.push("step checkpoints: none".to_string());
    }
    let last = if out.adapter_folders {
        "final adapter folder"
    } else {
        "final LoRA"
    };
    lines.push(format!("{last}: {}", out.final_file().display()));
    lines.push(match out.log_with {
        LogWith::Tensorboard => format!("logs: TensorBoard in {}", out.log_dir.display()),
        LogWith::None => "logs: none".to_string(),
    });
    lines
}

pub(crate) fn optimizer_lines(plan: &TrainPlan) -> Vec<String> {
    let t = &plan.training;
    let te = if plan.lora.train_text_encoder {
        number(t.text_encoder_lr)
    } else {
        "not trained".into()
    };
    let mut lines = vec![
        format!(
            "{}, learning rate {} (UNet {}, text encoder {te})",
            t.optimizer,
            number(t.learning_rate),
            number(t.unet_lr)
        ),
        format!(
            "scheduler {}, weight decay {}, gradient clipping {}",
            t.scheduler,
            number(t.weight_decay),
            if t.max_grad_norm > 0.0 {
                format!("at norm {}", number(t.max_grad_norm))
            } else {
                "off".into()
            }
        ),
        format!(
            "mixed precision {}, device {}, latents cached {}",
            match t.mixed_precision {
                MixedPrecision::No => "no (f32)",
                other => other.as_str(),
            },
            t.device,
            match (t.cache_latents, t.cache_latents_to_disk) {
                (false, _) => "no",
                (true, false) => "in memory",
                (true, true) => "on disk",
            }
        ),
    ];
    let mut loss = Vec::new();
    if let Some(gamma) = t.min_snr_gamma {
        loss.push(format!("min-SNR γ {}", number(gamma)));
    }
    if t.noise_offset > 0.0 {
        loss.push(format!("noise offset {}", number(t.noise_offset)));
    }
    if let Some(p) = plan.model.prediction_type {
        loss.push(format!("prediction type {p}"));
    }
    if !loss.is_empty() {
        lines.push(format!("loss: {}", loss.join(", ")));
    }
    lines
}

impl Preflight {
    fn lora_lines(&self) -> Vec<String> {
        let l = &self.plan.lora;
        if let (Some(file), Some(report)) = (&l.network_weights, &self.lora) {
            let te = if l.train_text_encoder {
                "trained"
            } else {
                "frozen"
            };
            return vec![
                format!("starts from {}", file.display()),
                format!(
                    "{}, dropout {}: the file decides the adapted layers, their ranks and \
                     alphas (lora_rank, lora_alpha, target_modules and conv_lora are not used)",
                    report.layout.describe(),
                    number(l.dropout)
                ),
                format!(
                    "layers: {}; text encoder {te}",
                    report.layout.layers.join(", ")
                ),
                format!(
                    "modules: {report}; {} trainable parameters in all",
                    thousands(report.total_parameters())
                ),
                format!(
                    "saved as {} in {}, {}",
                    l.save_format,
                    l.save_precision,
                    l.save_format.clients()
                ),
            ];
        }
        let mut lines = vec![
            format!(
                "rank {}, alpha {} (scale {}), dropout {}",
                l.rank,
                number(l.alpha),
                number(l.scale()),
                number(l.dropout)
            ),
            format!(
                "targets: {}; text encoder {}; conv LoRA {}",
                l.target_modules,
                if l.train_text_encoder {
                    "trained"
                } else {
                    "frozen"
                },
                if l.conv_lora {
                    format!("rank {}, alpha {}", l.conv_rank, number(l.conv_alpha))
                } else {
                    "off".into()
                }
            ),
            match &self.lora {
                Some(report) => format!(
                    "modules: {report}; {} trainable parameters in all",
                    thousands(report.total_parameters())
                ),
                None => "modules: counted once the hub model is downloaded".to_string(),
            },
            format!(
                "saved as {} in {}, {}",
                l.save_format,
                l.save_precision,
                l.save_format.clients()
            ),
        ];
        if let Some(w) = &l.network_weights {
            lines.push(format!("starts from {}", w.display()));
        }
        lines
    }
}

/// `2e-4` rather than `0.0002`; `0.9`, `16` as usual.
fn number(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-2 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::DatasetFacts;
    use super::*;
    use crate::models::family::{Architecture, ModelFamily};
    use crate::models::source::ModelSource;
    use std::path::{Path, PathBuf};

    fn preflight(extra: &str, facts: DatasetFacts) -> Preflight {
        let text =
            format!("train_data_dir: data/x\nbase_model: ./m\noutput_dir: out/style_v1\n{extra}");
        let plan =
            TrainPlan::from_yaml(&text, Path::new("configs/x.yaml"), &[], Path::new("/p")).unwrap();
        let model = ModelSource::Diffusers {
            root: PathBuf::from("/p/m"),
            architecture: Some(Architecture {
                family: ModelFamily::Sd1,
                cross_attention_dim: 768,
            }),
        };
        Preflight::new(plan, model, facts)
    }

    fn facts(images: usize, batches: usize) -> DatasetFacts {
        DatasetFacts {
            images,
            repeats: 1,
            caption_source: "metadata.csv (/p/data/x/metadata.csv)".into(),
            buckets: vec![(512, 512, images)],
            batches_per_epoch: batches,
            warnings: vec!["2 images in the folder are not in metadata.csv: a.png, b.png".into()],
        }
    }

    #[test]
    fn the_report_states_the_arithmetic_and_the_file_names() {
        let p = preflight(
            "batch_size: 4\ngradient_accumulation_steps: 2\nepochs: 12\nlearning_rate: 2e-4\n\
             save_steps: 10\nlora_alpha: 16\nscheduler: cosine\nlr_warmup_steps: 0.1\n",
            facts(40, 10),
        );
        let text = p.to_string();
        for expected in [
            "Dry run of configs/x.yaml: checked, nothing written.",
            "Base model   diffusers folder /p/m (SD 1.x)",
            "captions: metadata.csv (/p/data/x/metadata.csv)",
            "40 images × 1 repeats = 40 samples per epoch, at 512 px",
            "buckets (one size): 512×512: 40",
            "batch size 4 × gradient accumulation 2 = effective batch 8",
            "10 batches per epoch → 5 optimizer steps per epoch",
            "12 epochs × 5 = 60 optimizer steps in all",
            "learning-rate warm-up: 6 steps (0.1 of the total steps)",
            "AdamW, learning rate 2e-4 (UNet 2e-4, text encoder 2e-4)",
            "rank 8, alpha 16 (scale 2), dropout 0",
            "modules: counted once the hub model is downloaded",
            "step checkpoints: 5 of them, after steps 10, 20, 30, 40, 50",
            "named style_v1-step00000010.safetensors",
            "final LoRA: /p/out/style_v1/style_v1.safetensors",
            "logs: TensorBoard in /p/out/style_v1/logs",
            "Warnings     2 images in the folder are not in metadata.csv",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
    }

    #[test]
    fn max_train_steps_and_missing_checkpoints_are_explained() {
        let p = preflight("max_train_steps: 7\nsave_steps: 100\n", facts(10, 3));
        let text = p.to_string();
        assert!(text.contains("7 optimizer steps in all: max_train_steps wins over epochs (10), so 3 epoch(s) are begun"), "{text}");
        assert!(text.contains("step checkpoints: none"), "{text}");
        assert!(p
            .warnings()
            .iter()
            .any(|w| w.contains("no step checkpoint will be written")));
    }

    #[test]
    fn a_warmup_longer_than_the_run_is_a_warning() {
        let p = preflight(
            "epochs: 1\nlr_warmup_steps: 50\nscheduler: linear\n",
            facts(10, 10),
        );
        assert!(p
            .warnings()
            .iter()
            .any(|w| w.contains("lasts the whole run")));
    }

    #[test]
    fn numbers_read_naturally() {
        assert_eq!(number(2e-4), "2e-4");
        assert_eq!(number(1e-8), "1e-8");
        assert_eq!(number(0.9), "0.9");
        assert_eq!(number(16.0), "16");
        assert_eq!(number(0.0), "0");
    }
}
