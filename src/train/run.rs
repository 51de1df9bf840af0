//! A whole training run, from a checked plan to the exported LoRA: prepare the output folder,
//! load the model and build the adapters, restore a state when resuming, cache latents and text
//! embeddings, then step through the epochs, logging and checkpointing, until the last step, a
//! stop request (Ctrl-C / SIGTERM) or an error.
//!
//! The order of the data is a function of (seed, epoch) and every random draw of a step a
//! function of (seed, step), so the loop needs nothing but the step counter to know where it is:
//! step `s` trains on batches `[k·A, (k+1)·A)` of epoch `s / steps_per_epoch`, where
//! `k = s mod steps_per_epoch` and `A` is `gradient_accumulation_steps`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Var;

use super::device::Compute;
use super::optim::ParamOptimizer;
use super::outputs::{prepare, run_metadata, unix_now, OutputUse};
use super::previews::Previews;
use super::resume;
use super::setup::{set_up, Setup};
use super::state::{prune, state_dir_name, write_state, SavedState, StateManifest, STATE_FORMAT};
use super::task::TrainTask;
use super::trainer::{StepReport, Trainer};
use crate::config::{LogWith, TrainPlan};
use crate::dataset::{Batch, Dataset};
use crate::generate::preview::SamplePrompt;
use crate::log::tags::{LOSS_EPOCH_AVERAGE, LOSS_VALIDATION, LR_TEXT_ENCODER, LR_UNET};
use crate::log::{
    DisplayMode, EventWriter, LossTracker, RunClock, RunOutcome, StepScalars, StepStatus,
    TrainProgress, TrainSummary,
};
use crate::lora::{NetworkMetadata, TrainingMetadata};
use crate::preflight::{Preflight, SavePoints, StepCounts};
use crate::Result;

/// How to run, besides the plan.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--resume`: a state folder, or `latest`.
    pub resume: Option<String>,
    /// `--overwrite`: replace a finished run in `output_dir`.
    pub overwrite: bool,
    pub display: DisplayMode,
    /// Set (by a Ctrl-C / SIGTERM handler) to stop after the current step with a saved state.
    pub stop: Arc<AtomicBool>,
}

impl RunOptions {
    /// A fresh run with the display chosen by the terminal and no stop handler.
    pub fn new() -> Self {
        RunOptions {
            resume: None,
            overwrite: false,
            display: DisplayMode::detect(false),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions::new()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Every step done; the final LoRA written.
    Finished { lora: PathBuf },
    /// Stopped on request; `state` continues it (`None` when no step was done yet).
    Interrupted { state: Option<PathBuf> },
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub end: RunEnd,
    pub summary: TrainSummary,
}

/// What the resolved config cannot say by its keys: with `network_weights`, the adapters the
/// file decides (its ranks, alphas and layers, in place of `lora_rank`, `lora_alpha` and
/// `target_modules`).
fn config_notes(preflight: &Preflight) -> Vec<String> {
    match (&preflight.plan.lora.network_weights, &preflight.lora) {
        (Some(file), Some(report)) => vec![
            format!(
                "network_weights ({}) decides the adapters: {} on {} ({} modules);",
                file.display(),
                report.layout.describe(),
                report.layout.layers.join(", "),
                report.unet.modules + report.text_encoder.as_ref().map_or(0, |t| t.modules)
            ),
            "lora_rank, lora_alpha, target_modules and conv_lora above are not used.".into(),
        ],
        _ => Vec::new(),
    }
}

/// Trains the LoRA `preflight` describes; prints start-up lines and progress to stderr.
pub fn train(preflight: Preflight, options: &RunOptions) -> Result<RunReport> {
    let plan = &preflight.plan;
    let steps = preflight.steps;
    let out = &plan.output;
    let resume_dir = match &options.resume {
        Some(arg) => Some(resume::locate(arg, &out.output_dir)?),
        None => None,
    };
    let dataset = match &preflight.checked_dataset {
        Some(checked) => checked.clone(),
        None => Dataset::open(&plan.dataset_spec())?,
    };
    let saved = match &resume_dir {
        Some(dir) => {
            let resumable = resume::open_for(dir, plan, &dataset, steps.total_steps)?;
            for note in &resumable.notes {
                eprintln!("note: {note}");
            }
            Some(resumable.state)
        }
        None => None,
    };
    let usage = match (&saved, options.overwrite) {
        (Some(_), _) => OutputUse::Resume,
        (None, true) => OutputUse::Overwrite,
        (None, false) => OutputUse::Fresh,
    };
    let removed = prepare(plan, usage, &config_notes(&preflight))?;
    if !removed.is_empty() {
        let names: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "note: removed {} temporary file(s) an interrupted run left behind: {}",
            names.len(),
            names.join(", ")
        );
    }
    let start_step = saved.as_ref().map_or(0, |s| s.manifest.step);
    let clock = RunClock::start(start_step as u64);

    let compute = Compute::resolve(plan.training.device, plan.training.mixed_precision)?;
    for warning in &compute.warnings {
        eprintln!("warning: {warning}");
    }
    // The preflight read the prompt file; a preflight made from facts alone did not.
    let sample_prompts = match (&preflight.sample_prompts, &plan.sampling.prompts) {
        (Some(prompts), _) => Some(prompts.clone()),
        (None, Some(source)) => Some(SamplePrompt::from_config(source)?),
        (None, None) => None,
    };
    let Setup {
        trainer,
        base,
        previews,
    } = set_up(
        &preflight,
        &compute,
        &dataset,
        saved.as_ref(),
        sample_prompts,
        options.display,
    )?;
    let started_at = saved
        .as_ref()
        .map_or_else(unix_now, |s| s.manifest.training_started_at);
    let mut metadata = run_metadata(plan, &steps, &dataset, base, started_at);
    if trainer.networks.start_file().is_some() {
        // The file decided the adapters: record those, not the config's rank and targets.
        let layout = trainer.networks.report().layout;
        metadata.network = NetworkMetadata::from_file_layout(&plan.lora, &layout);
    }
    let mut task = ImageTask {
        trainer,
        dataset: &dataset,
        steps_per_epoch: steps.steps_per_epoch.max(1),
        plan,
        metadata,
        previews,
    };
    let shared = RunParts {
        plan,
        steps,
        save_points: &preflight.save_points,
        started_at,
    };
    run_steps(&shared, &mut task, clock, saved.as_ref(), options)
}

/// What the step loop needs besides the task: the plan, its step counts and save points, and
/// when the run first started.
pub struct RunParts<'a> {
    pub plan: &'a TrainPlan,
    pub steps: StepCounts,
    pub save_points: &'a SavePoints,
    /// Unix seconds (kept across resumes).
    pub started_at: f64,
}

/// The steps of a prepared run (both tasks): from the saved state's step (or 0) to the end or
/// a stop request, then the summary.
pub fn run_steps<T: TrainTask>(
    parts: &RunParts,
    task: &mut T,
    mut clock: RunClock,
    saved: Option<&SavedState>,
    options: &RunOptions,
) -> Result<RunReport> {
    let (plan, steps) = (parts.plan, parts.steps);
    let start_step = saved.map_or(0, |s| s.manifest.step);
    let mut loop_state = Loop {
        parts,
        tracker: saved
            .map(|s| s.manifest.loss.clone())
            .unwrap_or_else(|| LossTracker::new(steps.steps_per_epoch)),
        events: open_events(plan, start_step),
        progress: TrainProgress::new(options.display, steps.total_steps as u64, start_step as u64),
        files: Vec::new(),
        epoch_batches: None,
    };
    clock.steps_begin();
    let end = loop_state.run(task, start_step, &options.stop, saved);
    loop_state.progress.finish();
    if let Some(events) = loop_state.events.take() {
        if let Err(e) = events.close() {
            eprintln!("warning: TensorBoard log: {}", e.report());
        }
    }
    let (end, done) = end?;
    let outcome = RunOutcome {
        interrupted: matches!(end, RunEnd::Interrupted { .. }),
        steps: done as u64,
        total_steps: steps.total_steps as u64,
        epochs: (done / steps.steps_per_epoch.max(1)) as u64,
        final_loss: loop_state.tracker.current(),
        average_loss: loop_state.tracker.average(),
        files_written: loop_state.files.clone(),
    };
    let summary = TrainSummary::new(&clock, outcome);
    // A run stopped before its first step leaves no summary: there is nothing to protect.
    if end != (RunEnd::Interrupted { state: None }) {
        summary.write(&plan.output.output_dir)?;
    }
    Ok(RunReport { end, summary })
}

/// The image task: the UNet, text encoders and their adapters over the pictures of a dataset.
struct ImageTask<'a> {
    trainer: Trainer,
    dataset: &'a Dataset,
    steps_per_epoch: usize,
    plan: &'a TrainPlan,
    metadata: TrainingMetadata,
    previews: Option<Previews>,
}

impl TrainTask for ImageTask<'_> {
    type Batch = Batch;

    fn epoch_batches(&self, epoch: usize, batch_size: usize) -> Vec<Batch> {
        self.dataset.epoch_batches(epoch, batch_size)
    }

    fn step(&mut self, step: usize, batches: &[Batch]) -> Result<StepReport> {
        self.trainer.step(self.dataset, step, batches)
    }

    fn lr_tags(&self) -> Vec<&'static str> {
        // The text encoders' group comes second, when they are trained.
        let mut tags = vec![LR_UNET];
        if self.trainer.networks.text_encoder.is_some() {
            tags.push(LR_TEXT_ENCODER);
        }
        tags
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        self.trainer
            .networks
            .networks()
            .flat_map(|n| n.named_vars())
            .collect()
    }

    fn optimizer(&self) -> &dyn ParamOptimizer {
        self.trainer.optimizer.as_ref()
    }

    fn save_adapters(&self, path: &Path, step: usize, last: bool) -> Result<PathBuf> {
        let per_epoch = self.steps_per_epoch;
        let mut metadata = self.metadata.clone();
        metadata.steps = step;
        metadata.epoch = step.div_ceil(per_epoch);
        if last {
            metadata.training_finished_at = Some(unix_now());
        }
        let lora = &self.plan.lora;
        let saved = self.trainer.networks.save(
            path,
            lora.save_format,
            lora.save_precision,
            &metadata.to_header(),
        )?;
        Ok(saved.path)
    }

    fn data_identity(&self) -> (Option<String>, BTreeMap<String, String>) {
        (
            Some(self.dataset.fingerprint()),
            self.dataset.image_digests(),
        )
    }

    fn samples(
        &mut self,
        step: usize,
        events: Option<&mut EventWriter>,
    ) -> Option<Result<(Vec<PathBuf>, String)>> {
        let previews = self.previews.as_ref()?;
        Some(previews.render(&self.trainer, step, events).map(|files| {
            let line = format!(
                "previews at step {step}: {} picture(s) in {}",
                files.len(),
                previews.folder().display()
            );
            (files, line)
        }))
    }
}

/// The state of the step loop.
struct Loop<'a, B> {
    parts: &'a RunParts<'a>,
    tracker: LossTracker,
    events: Option<EventWriter>,
    progress: TrainProgress,
    files: Vec<PathBuf>,
    /// The batches of the epoch being trained.
    epoch_batches: Option<(usize, Vec<B>)>,
}

impl<B> Loop<'_, B> {
    /// Steps from `start` to the end (or a stop request); returns how it ended and the steps
    /// done.
    fn run<T: TrainTask<Batch = B>>(
        &mut self,
        task: &mut T,
        start: usize,
        stop: &AtomicBool,
        saved: Option<&SavedState>,
    ) -> Result<(RunEnd, usize)> {
        let plan = self.parts.plan;
        let steps = self.parts.steps;
        let per_epoch = steps.steps_per_epoch.max(1);
        let accumulation = steps.gradient_accumulation_steps.max(1);
        let batch_size = plan.training.batch_size;
        let lr_tags = task.lr_tags();
        let mut step = start;
        if start == 0 && plan.sampling.at_first {
            self.samples(task, 0);
        }
        while step < steps.total_steps {
            if stop.load(Ordering::SeqCst) {
                return self.interrupted(task, step, start, saved);
            }
            let epoch = step / per_epoch;
            let k = step % per_epoch;
            if k == 0 {
                self.tracker.start_epoch();
            }
            if self.epoch_batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
                self.epoch_batches = Some((epoch, task.epoch_batches(epoch, batch_size)));
            }
            let batches = &self.epoch_batches.as_ref().map_or(&[][..], |(_, b)| b);
            let from = (k * accumulation).min(batches.len());
            let to = ((k + 1) * accumulation).min(batches.len());
            let began = Instant::now();
            let report = task.step(step, &batches[from..to])?;
            step += 1;
            self.tracker.record(report.loss);
            let average = self.tracker.average().unwrap_or(report.loss);
            let seconds = began.elapsed().as_secs_f32();
            let per_second = |n: usize| (seconds > 0.0).then(|| n as f32 / seconds);
            let scalars = StepScalars {
                loss: report.loss,
                average_loss: average,
                lrs: lr_tags
                    .iter()
                    .copied()
                    .zip(report.lrs.iter().copied())
                    .collect(),
                grad_norm: Some(report.grad_norm as f32),
                samples_per_sec: per_second(report.samples),
                tokens_per_sec: report.tokens.and_then(per_second),
            };
            self.log(|w| w.add_scalars(&scalars.tagged(), step as u64));
            self.progress.update(&StepStatus {
                epoch: epoch as u64 + 1,
                epochs: steps.epochs_run() as u64,
                step: step as u64,
                loss: report.loss,
                average_loss: average,
                lr: report.lrs.first().copied().unwrap_or(0.0),
                tokens_per_sec: scalars.tokens_per_sec,
            });
            let epoch_done = step.is_multiple_of(per_epoch) || step == steps.total_steps;
            if epoch_done {
                if let Some(avg) = self.tracker.epoch_average() {
                    self.log(|w| w.add_scalar(LOSS_EPOCH_AVERAGE, avg, epoch as u64 + 1));
                }
            }
            match task.validation(step, epoch_done, step == steps.total_steps) {
                None => {}
                Some(Ok(loss)) => {
                    self.log(|w| w.add_scalar(LOSS_VALIDATION, loss, step as u64));
                    self.progress
                        .println(&format!("validation loss after step {step}: {loss:.4}"));
                }
                Some(Err(e)) => self.progress.println(&format!(
                    "warning: the validation loss after step {step} failed: {}",
                    e.report()
                )),
            }
            if self.parts.save_points.is_save_point(step) {
                self.save_step_checkpoint(task, step)?;
            }
            if plan.sampling.is_due(step, steps.total_steps) {
                self.samples(task, step);
            }
        }
        let out = &plan.output;
        let last = task.save_adapters(&out.final_file(), steps.total_steps, true)?;
        self.files.push(last.clone());
        self.progress.println(&format!("saved {}", last.display()));
        Ok((RunEnd::Finished { lora: last }, steps.total_steps))
    }

    /// A step adapter and a state folder after `step`, then the pruning of old ones.
    fn save_step_checkpoint<T: TrainTask>(&mut self, task: &T, step: usize) -> Result<()> {
        let out = &self.parts.plan.output;
        let adapters =
            task.save_adapters(&out.output_dir.join(out.step_file_name(step)), step, false)?;
        self.files.push(adapters.clone());
        let state = self.save_state(task, step)?;
        self.progress.println(&format!(
            "step checkpoint at step {step}: {} and {}",
            adapters.display(),
            state.display()
        ));
        if let Some(keep) = out.save_last_n {
            prune(out, keep)?;
        }
        Ok(())
    }

    /// Saves a state for a stop request; nothing when no step was done in this process (a
    /// resumed run's state is already on disk).
    fn interrupted<T: TrainTask>(
        &mut self,
        task: &T,
        step: usize,
        start: usize,
        saved: Option<&SavedState>,
    ) -> Result<(RunEnd, usize)> {
        let state = if step > start {
            Some(self.save_state(task, step)?)
        } else {
            saved.map(|s| s.dir.clone())
        };
        Ok((RunEnd::Interrupted { state }, step))
    }

    fn save_state<T: TrainTask>(&mut self, task: &T, step: usize) -> Result<PathBuf> {
        let (plan, steps) = (self.parts.plan, self.parts.steps);
        let per_epoch = steps.steps_per_epoch.max(1);
        let (dataset, images) = task.data_identity();
        let manifest = StateManifest {
            format: STATE_FORMAT,
            step,
            epoch: step / per_epoch,
            batch_in_epoch: (step % per_epoch) * steps.gradient_accumulation_steps.max(1),
            total_steps: steps.total_steps,
            seed: plan.data.seed,
            optimizer: plan.training.optimizer.to_string(),
            loss: self.tracker.clone(),
            training_started_at: self.parts.started_at,
            dataset,
            images,
            written_by: format!("lora-trainer {}", env!("CARGO_PKG_VERSION")),
        };
        let dir = write_state(
            &plan.output.output_dir,
            &manifest,
            &task.named_vars(),
            task.optimizer(),
            &plan.to_resolved_yaml(),
        )?;
        debug_assert!(dir.ends_with(state_dir_name(step)));
        self.files.push(dir.clone());
        Ok(dir)
    }

    /// Draws the task's samples after `step` (0: before the first); a failure is a warning.
    fn samples<T: TrainTask>(&mut self, task: &mut T, step: usize) {
        match task.samples(step, self.events.as_mut()) {
            None => {}
            Some(Ok((files, line))) => {
                self.progress.println(&line);
                self.files.extend(files);
            }
            Some(Err(e)) => self.progress.println(&format!(
                "warning: samples at step {step} failed: {}",
                e.report()
            )),
        }
    }

    /// Logs to TensorBoard; the first failure is reported and ends the logging, not the run.
    fn log(&mut self, write: impl FnOnce(&mut EventWriter) -> Result<()>) {
        if let Some(events) = self.events.as_mut() {
            if let Err(e) = write(events) {
                self.progress.println(&format!(
                    "warning: TensorBoard logging stopped: {}",
                    e.report()
                ));
                self.events = None;
            }
        }
    }
}

/// The TensorBoard writer, when `log_with: tensorboard`; a failure to create it is a warning.
pub(crate) fn open_events(plan: &TrainPlan, start_step: usize) -> Option<EventWriter> {
    if plan.output.log_with != LogWith::Tensorboard {
        return None;
    }
    let log_dir = &plan.output.log_dir;
    let writer = if start_step > 0 {
        EventWriter::create_resumed(log_dir, start_step as u64)
    } else {
        EventWriter::create(log_dir)
    };
    match writer {
        Ok(w) => Some(w),
        Err(e) => {
            eprintln!("warning: no TensorBoard log: {}", e.report());
            None
        }
    }
}
