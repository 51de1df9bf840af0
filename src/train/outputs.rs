//! The output folder of a run: refusing to overwrite a finished run, making sure the folder is
//! writable before any heavy work, and the LoRA header a run writes into each file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::disk_latents;
use super::state::{list_states, list_step_files, CONFIG_FILE};
use super::TrainError;
use crate::config::TrainPlan;
use crate::dataset::Dataset;
use crate::files::write_atomically;
use crate::log::summary::SUMMARY_FILE;
use crate::log::TrainSummary;
use crate::lora::{NetworkMetadata, TrainingMetadata};
use crate::models::family::BaseModelVersion;
use crate::preflight::StepCounts;
use crate::{Error, Result};

/// What a new run may do with an output folder that already holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputUse {
    /// A fresh run: refuse a folder holding a finished or interrupted run.
    Fresh,
    /// `--overwrite`: remove that run's LoRA files, states and summary first.
    Overwrite,
    /// `--resume`: continue the run the folder holds.
    Resume,
}

/// Checks and prepares `output_dir`, removes the temporary files a killed run left there, then
/// writes the resolved config into it, followed by `notes` as comments (what the config's keys
/// do not say). Returns the temporaries removed. Errors: a folder that holds a finished run
/// (fresh runs only), an unwritable folder.
pub fn prepare(plan: &TrainPlan, usage: OutputUse, notes: &[String]) -> Result<Vec<PathBuf>> {
    let out = &plan.output;
    let dir = &out.output_dir;
    let final_file = out.final_file();
    let summary = dir.join(SUMMARY_FILE);
    if usage == OutputUse::Fresh && (final_file.exists() || summary.exists()) {
        let interrupted = TrainSummary::read(&summary).is_ok_and(|s| s.interrupted);
        let what = if final_file.exists() {
            format!("a finished run ({})", final_file.display())
        } else if interrupted {
            "an interrupted run".to_string()
        } else {
            format!("a run ({SUMMARY_FILE})")
        };
        let resume = if interrupted || !list_states(dir).is_empty() {
            "; `--resume latest` continues it"
        } else {
            ""
        };
        return Err(TrainError::OutputTaken(format!(
            "{} already holds {what}{resume}. Choose another `output_dir` (or `output_name`), \
             or pass `--overwrite` to replace it",
            dir.display()
        ))
        .into());
    }
    fs::create_dir_all(dir).map_err(|e| {
        Error::io(
            dir,
            std::io::Error::new(e.kind(), format!("cannot create the output folder: {e}")),
        )
    })?;
    if usage == OutputUse::Overwrite {
        let mut old: Vec<PathBuf> = vec![final_file, summary];
        old.extend(list_step_files(out).into_iter().map(|(_, p)| p));
        old.extend(list_states(dir).into_iter().map(|(_, p)| p));
        for path in old.into_iter().filter(|p| p.exists()) {
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|e| Error::io(&path, e))?;
        }
    }
    let mut removed = Vec::new();
    for folder in [dir.clone(), dir.join(disk_latents::FOLDER)] {
        removed.extend(
            crate::files::remove_stale_temporaries(&folder, is_legacy_temporary)
                .map_err(|e| Error::io(&folder, e))?,
        );
    }
    let mut config = plan.to_resolved_yaml();
    for note in notes {
        config.push_str(&format!("# {note}\n"));
    }
    write_atomically(&dir.join(CONFIG_FILE), config.as_bytes())?;
    Ok(removed)
}

/// The names earlier versions of this program gave their temporaries in an output folder
/// (without the process id [`crate::files::temporary_path`] now adds).
fn is_legacy_temporary(name: &str) -> bool {
    let state =
        name.starts_with("state-step") && (name.ends_with(".tmp") || name.ends_with(".old"));
    state || name.ends_with(".tmp~") || name == ".train_summary.json.tmp"
}

/// What the config and the step plan decide; progress, images, times, tags and the base
/// model's version are left for the trainer (zero, empty, `sd_v1`).
pub fn plan_metadata(plan: &TrainPlan, steps: &StepCounts) -> TrainingMetadata {
    let t = &plan.training;
    let d = &plan.data;
    let sd_model_name = std::path::Path::new(&plan.model.base_model)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| plan.model.base_model.clone());
    TrainingMetadata {
        base_model_version: BaseModelVersion::SdV1,
        sd_model_name,
        output_name: plan.output.output_name.clone(),
        learning_rate: t.learning_rate,
        unet_lr: t.unet_lr,
        text_encoder_lr: t.text_encoder_lr,
        train_text_encoder: plan.lora.train_text_encoder,
        optimizer: t.optimizer.to_string(),
        lr_scheduler: t.scheduler.to_string(),
        lr_warmup_steps: steps.warmup_steps,
        gradient_accumulation_steps: steps.gradient_accumulation_steps,
        batch_size_per_device: t.batch_size,
        max_grad_norm: t.max_grad_norm,
        num_train_images: 0,
        num_batches_per_epoch: steps.batches_per_epoch,
        num_epochs: steps.epochs_run(),
        epoch: 0,
        steps: 0,
        max_train_steps: steps.total_steps,
        resolution: (d.resolution, d.resolution),
        seed: d.seed,
        clip_skip: plan.model.clip_skip,
        mixed_precision: t.mixed_precision.to_string(),
        noise_offset: t.noise_offset,
        min_snr_gamma: t.min_snr_gamma,
        caption_dropout_rate: f64::from(d.caption_dropout_rate),
        flip_aug: d.flip_aug,
        shuffle_caption: d.shuffle_caption,
        keep_tokens: d.keep_tokens,
        enable_bucket: d.enable_bucket,
        training_started_at: 0.0,
        training_finished_at: None,
        tag_frequency: BTreeMap::new(),
        network: NetworkMetadata::from_settings(&plan.lora),
    }
}

/// The header fields that stay the same for every file of a run; each save sets `epoch`,
/// `steps` and (for the final file) `training_finished_at`.
pub fn run_metadata(
    plan: &TrainPlan,
    steps: &StepCounts,
    dataset: &Dataset,
    base: BaseModelVersion,
    started_at: f64,
) -> TrainingMetadata {
    let mut m = plan_metadata(plan, steps);
    m.base_model_version = base;
    m.num_train_images = dataset.len() * plan.data.repeats.max(1) as usize;
    m.training_started_at = started_at;
    let folder = folder_name(&plan.data.train_data_dir);
    m.add_tag_frequency(
        format!("{}_{folder}", plan.data.repeats.max(1)),
        dataset.tag_frequency(),
    );
    m
}

fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".into())
}

/// Unix seconds now.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dir: &Path) -> TrainPlan {
        let text = format!(
            "train_data_dir: d\nbase_model: ./m\noutput_dir: {}\n",
            dir.join("run").display()
        );
        TrainPlan::from_yaml(&text, Path::new("c.yaml"), &[], dir).unwrap()
    }

    #[test]
    fn a_finished_run_is_refused_unless_overwritten() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let plan = plan(tmp.path());
        prepare(&plan, OutputUse::Fresh, &[])?;
        let out = &plan.output.output_dir;
        assert!(out.join(CONFIG_FILE).is_file());
        fs::write(plan.output.final_file(), b"lora").unwrap();
        fs::write(out.join("run-step00000010.safetensors"), b"x").unwrap();
        let e = prepare(&plan, OutputUse::Fresh, &[]).unwrap_err();
        assert!(
            e.to_string().contains("already holds a finished run"),
            "{e}"
        );
        assert!(e.to_string().contains("--overwrite"), "{e}");
        assert_eq!(e.exit_code(), 2);
        prepare(&plan, OutputUse::Resume, &[])?;
        assert!(plan.output.final_file().exists());
        prepare(&plan, OutputUse::Overwrite, &[])?;
        assert!(!plan.output.final_file().exists());
        assert!(!out.join("run-step00000010.safetensors").exists());
        Ok(())
    }

    #[test]
    fn temporaries_left_by_a_killed_run_are_removed_by_the_next() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let plan = plan(tmp.path());
        let out = &plan.output.output_dir;
        let cache = out.join(disk_latents::FOLDER);
        fs::create_dir_all(&cache).unwrap();
        // A process id no process has (Linux's maximum is 2^22).
        let left = [
            out.join(".run.safetensors.4000000000.tmp"),
            out.join(".run-step00000010.safetensors.4000000000.tmp"),
            out.join("config.tmp~"),
            out.join("state-step00000020.tmp"),
            cache.join("0123abcd.tmp~"),
        ];
        for path in &left {
            fs::write(path, b"partial").unwrap();
        }
        fs::write(out.join("run-step00000010.safetensors"), b"whole").unwrap();
        let removed = prepare(&plan, OutputUse::Resume, &[])?;
        assert_eq!(removed.len(), left.len(), "{removed:?}");
        assert!(left.iter().all(|p| !p.exists()));
        assert!(out.join("run-step00000010.safetensors").exists());
        assert!(prepare(&plan, OutputUse::Resume, &[])?.is_empty());
        Ok(())
    }

    #[test]
    fn an_unwritable_output_dir_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("file");
        fs::write(&blocker, b"not a folder").unwrap();
        let text = format!(
            "train_data_dir: d\nbase_model: ./m\noutput_dir: {}\n",
            blocker.join("run").display()
        );
        let plan = TrainPlan::from_yaml(&text, Path::new("c.yaml"), &[], tmp.path()).unwrap();
        let e = prepare(&plan, OutputUse::Fresh, &[]).unwrap_err();
        assert!(
            e.report().contains("cannot create the output folder"),
            "{}",
            e.report()
        );
    }
}
