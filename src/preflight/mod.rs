//! The run before the run: everything that can be checked without loading weights (config,
//! base model, dataset), and the plan that `train --dry-run` prints.
//!
//! [`Preflight::check`] opens the base model's headers and the dataset (which decodes every
//! image) and computes the step arithmetic; it writes nothing. Its `Display` is the report.

pub(crate) mod report;
pub mod steps;

use crate::config::is_hub_id;
use crate::config::SamplePrompt;
use crate::config::{ConfigError, Location, Problem, TrainPlan, MAX_STEPS, STEPS_WHY};
use crate::dataset::Dataset;
use crate::lora::network::LoraNetworks;
use crate::lora::report::LoraReport;
use crate::lora::LoraBase;
use crate::models::load::{BaseModel, LoadOptions};
use crate::models::source::ModelSource;
use crate::Result;
pub use steps::{SavePoints, StepCounts, StepLimit};

/// What the dataset check found, in the terms the plan needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFacts {
    /// Distinct images.
    pub images: usize,
    pub repeats: u32,
    /// Where captions come from ("metadata.csv (…)" or "caption files (*.txt beside each image)").
    pub caption_source: String,
    /// (width, height, images) per bucket.
    pub buckets: Vec<(u32, u32, usize)>,
    /// Batches of `batch_size` per epoch, repeats included, batches never mixing buckets.
    pub batches_per_epoch: usize,
    /// Unlisted images, skipped invalid images...
    pub warnings: Vec<String>,
}

/// A validated run: the plan, the base model found, the dataset checked, the steps computed.
#[derive(Debug, Clone)]
pub struct Preflight {
    pub plan: TrainPlan,
    pub model: ModelSource,
    pub dataset: DatasetFacts,
    pub steps: StepCounts,
    pub save_points: SavePoints,
    /// The adapters the run will train, counted from the model configs; `None` until
    /// [`Preflight::count_adapters`] ran (or when the model is a hub id not downloaded yet).
    pub lora: Option<LoraReport>,
    /// The dataset [`Preflight::check`] opened (every image decoded once), so that the run
    /// does not decode them all again; `None` for a preflight made from facts alone.
    pub checked_dataset: Option<Dataset>,
    /// The preview prompts read from `sample_prompts` (a missing or malformed prompt file fails
    /// the dry run as it would fail the run); `None` without previews.
    pub sample_prompts: Option<Vec<SamplePrompt>>,
}

impl Preflight {
    /// Checks the base model and the dataset of `plan`. Reads files, writes nothing.
    pub fn check(mut plan: TrainPlan) -> Result<Preflight> {
        let model = ModelSource::detect(&plan.model.base_model)?;
        // A `resolution` the config leaves unset is the family's (SDXL trains at 1024).
        if !plan.data.resolution_given {
            match model.architecture() {
                Some(architecture) => {
                    plan.data.resolution = architecture.family.default_resolution()
                }
                None => plan.warnings.push(format!(
                    "`resolution` is not set and the model ({model}) cannot be looked at before \
                     it is downloaded: {} px is used; SDXL models train at 1024, so set \
                     `resolution` for them",
                    plan.data.resolution
                )),
            }
        }
        let sample_prompts = match &plan.sampling.prompts {
            Some(source) => Some(SamplePrompt::from_config(source)?),
            None => None,
        };
        let dataset = Dataset::open(&plan.dataset_spec())?;
        let facts = dataset_facts(&plan, &dataset);
        let mut preflight = Preflight::new(plan, model, facts);
        preflight.check_step_count()?;
        preflight.checked_dataset = Some(dataset);
        preflight.sample_prompts = sample_prompts;
        preflight.count_adapters()?;
        Ok(preflight)
    }

    /// Counts the LoRA modules and parameters from the base model's configs, on shape-only
    /// weights (nothing is read but headers and configs). Fails as training would when
    /// `target_modules` matches nothing or `network_weights` does not fit. A hub model is
    /// counted only when it is in the local cache: a dry run downloads nothing.
    pub fn count_adapters(&mut self) -> Result<()> {
        if let ModelSource::Hub { snapshot: None, .. } = self.model {
            return Ok(());
        }
        // Local files named beside the model are checked now; hub ids are found at setup.
        let local = |given: &Option<String>| given.clone().filter(|v| !is_hub_id(v));
        let m = &self.plan.model;
        let options = LoadOptions {
            vae: local(&m.vae),
            tokenizer: local(&m.tokenizer),
            tokenizer_2: local(&m.tokenizer_2),
            ..LoadOptions::default()
        };
        let checkpoint = BaseModel::open(&self.model, &options)?;
        self.lora = Some(LoraNetworks::report_from_configs(
            &self.plan.lora,
            Some(LoraBase::new(checkpoint.family(), checkpoint.unet_config())),
            checkpoint.unet_config(),
            &checkpoint.text_encoder_configs(),
        )?);
        Ok(())
    }

    /// The step arithmetic for a model and dataset already checked.
    pub fn new(plan: TrainPlan, model: ModelSource, dataset: DatasetFacts) -> Preflight {
        let steps = StepCounts::new(dataset.batches_per_epoch, &plan.training);
        let out = &plan.output;
        let save_points = SavePoints::new(out.save_steps, out.save_every_n_epochs, &steps);
        Preflight {
            plan,
            model,
            dataset,
            steps,
            save_points,
            lora: None,
            checked_dataset: None,
            sample_prompts: None,
        }
    }

    /// Refuses a run of more than [`MAX_STEPS`] optimizer steps (`epochs` × steps per epoch can
    /// be, though each key alone is within bounds).
    pub fn check_step_count(&self) -> Result<()> {
        let s = &self.steps;
        if s.total_steps <= MAX_STEPS {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            problems: vec![Problem {
                at: Location::File {
                    path: self.plan.config_path.clone(),
                    line: None,
                },
                message: format!(
                    "epochs {} × {} optimizer steps per epoch is more than {MAX_STEPS} steps: \
                     {STEPS_WHY}; lower `epochs` or `repeats`, or set `max_train_steps`",
                    self.plan.training.epochs, s.steps_per_epoch
                ),
            }],
        }
        .into())
    }

    /// Everything worth a second look, from the config, the dataset and the step arithmetic.
    pub fn warnings(&self) -> Vec<String> {
        let mut notes = self.plan.warnings.clone();
        notes.extend(self.dataset.warnings.iter().cloned());
        let partial = self.lora.as_ref().map(|r| &r.partial_open_clip_attention);
        if let Some((first, count)) = partial.and_then(|l| l.first().map(|f| (f, l.len()))) {
            notes.push(format!(
                "`target_modules` adapts some but not all of q_proj, k_proj, v_proj and out_proj \
                 in {count} attention layer(s) of SDXL's second text encoder (`{first}`, ...): \
                 A1111 applies such a layer's LoRA only with all four and silently skips these; \
                 add the missing ones, or use the `default` or `attn` preset"
            ));
        }
        let (steps, out) = (&self.steps, &self.plan.output);
        if steps.total_steps > 0 && steps.warmup_steps >= steps.total_steps {
            notes.push(format!(
                "the warm-up ({} steps) lasts the whole run ({} steps): the learning rate never \
                 reaches `learning_rate`",
                steps.warmup_steps, steps.total_steps
            ));
        }
        let asked_for_step_files = out.save_steps.is_some() || out.save_every_n_epochs.is_some();
        if asked_for_step_files && self.save_points.steps().next().is_none() {
            notes.push(format!(
                "no step checkpoint will be written: the run has only {} steps",
                steps.total_steps
            ));
        }
        notes
    }
}

/// What the plan reports of a checked dataset.
fn dataset_facts(plan: &TrainPlan, dataset: &Dataset) -> DatasetFacts {
    DatasetFacts {
        images: dataset.len(),
        repeats: plan.data.repeats,
        caption_source: dataset.caption_source(),
        buckets: dataset.buckets(),
        batches_per_epoch: dataset.batches_per_epoch(plan.training.batch_size),
        warnings: dataset.warnings().to_vec(),
    }
}
