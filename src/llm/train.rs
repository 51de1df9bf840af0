//! A language-model run: the model folder loaded on the run's device and precision, the LoRA
//! adapters built into it (or continued from a PEFT adapter), the optimizer and schedule, a
//! state restored when resuming, then the shared step loop ([`crate::train::run_steps`]) with
//! this task's batches, loss and PEFT adapter folders.
//!
//! The loss of an optimizer step is transformers': the cross-entropy summed over every learned
//! token of the step's micro-batches, divided by their number (so accumulation gives the same
//! gradient as one big batch, whatever the lengths).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Device, Var};

use super::batches::{collate, length_grouped};
use super::data::LmData;
use super::generate::Generator;
use super::network::LmNetwork;
use super::preflight::{prepare_data, LmPreflight};
use super::tokenizer::LmTokenizer;
use crate::log::tags::LR_LORA;
use crate::log::{EventWriter, RunClock};
use crate::models::causal_lm::{CausalLm, LmFolder};
use crate::nn::Scope;
use crate::train::device::Compute;
use crate::train::optim::{build_optimizer, OptimizerSettings, ParamGroup, ParamOptimizer};
use crate::train::outputs::{prepare, unix_now, OutputUse};
use crate::train::trainer::add_gradients;
use crate::train::{
    clip_grad_norm, resume, run_steps, LrSchedule, RunOptions, RunParts, RunReport, StepReport,
    TrainError, TrainTask,
};
use crate::Result;

/// The model, adapters, optimizer and data of a language-model run.
pub struct LmTask {
    pub model: CausalLm,
    pub network: LmNetwork,
    pub optimizer: Box<dyn ParamOptimizer>,
    pub schedule: LrSchedule,
    /// `learning_rate`: the schedule multiplies it.
    pub base_lr: f64,
    pub data: LmData,
    /// The id right padding uses (never learned, never attended by a real position).
    pub pad_id: u32,
    pub seed: u64,
    pub max_grad_norm: f64,
    /// `base_model_name_or_path` written into each adapter's config.
    pub base_model: String,
    pub device: Device,
    pub tokenizer: LmTokenizer,
    /// Validation records, and every how many steps their loss is measured (`None`: at each
    /// epoch's end).
    pub validation: Option<LmData>,
    pub eval_steps: Option<usize>,
    pub batch_size: usize,
    /// Prompts answered during training, the longest answer, and where the answers go.
    pub sample_prompts: Vec<String>,
    pub max_new_tokens: usize,
    pub samples_dir: PathBuf,
    pub output_name: String,
}

impl TrainTask for LmTask {
    /// The sample indices of one micro-batch.
    type Batch = Vec<usize>;

    fn epoch_batches(&self, epoch: usize, batch_size: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.data.samples.iter().map(|s| s.ids.len()).collect();
        length_grouped(&lengths, batch_size, self.seed, epoch as u64)
    }

    fn step(&mut self, step: usize, batches: &[Vec<usize>]) -> Result<StepReport> {
        if batches.is_empty() {
            return Err(TrainError::Usage(format!("step {step} has no batch")).into());
        }
        let learned_of = |batch: &Vec<usize>| -> usize {
            batch.iter().map(|&i| self.data.samples[i].learned()).sum()
        };
        let learned: usize = batches.iter().map(learned_of).sum();
        let vars = self.network.trainable_vars();
        let mut summed = GradStore::default();
        let mut loss_sum = 0f64;
        let (mut samples, mut tokens) = (0, 0);
        self.network.set_training(true);
        for (micro, batch) in batches.iter().enumerate() {
            self.network.set_step(step as u64, micro as u64);
            let records: Vec<_> = batch.iter().map(|&i| &self.data.samples[i]).collect();
            let (ids, labels) = collate(&records, self.pad_id, &self.device)?;
            let Some(mean) = self.model.loss(&ids, &labels)? else {
                continue;
            };
            // This micro-batch's share of the step's mean over all learned tokens.
            let share = learned_of(batch) as f64 / learned.max(1) as f64;
            let value = f64::from(mean.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(not_finite(step, "loss", value));
            }
            let grads = mean.affine(share, 0.0)?.backward()?;
            add_gradients(&mut summed, &grads, &vars)?;
            loss_sum += value * share;
            samples += batch.len();
            tokens += records.iter().map(|r| r.ids.len()).sum::<usize>();
        }
        let grad_norm = clip_grad_norm(&mut summed, &vars, self.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(not_finite(step, "gradient norm", grad_norm));
        }
        let lr = self.base_lr * self.schedule.multiplier(step);
        self.optimizer.step(&summed, &[lr])?;
        Ok(StepReport {
            loss: loss_sum as f32,
            grad_norm,
            lrs: vec![lr],
            samples,
            tokens: Some(tokens),
        })
    }

    fn lr_tags(&self) -> Vec<&'static str> {
        vec![LR_LORA]
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        self.network.named_vars()
    }

    fn optimizer(&self) -> &dyn ParamOptimizer {
        self.optimizer.as_ref()
    }

    fn save_adapters(&self, path: &Path, _step: usize, _last: bool) -> Result<PathBuf> {
        let adapter = self.network.to_peft(Some(self.base_model.clone()))?;
        adapter.save(path)?;
        Ok(path.to_path_buf())
    }

    fn data_identity(&self) -> (Option<String>, BTreeMap<String, String>) {
        (Some(self.data.fingerprint.clone()), BTreeMap::new())
    }

    fn samples(
        &mut self,
        step: usize,
        events: Option<&mut EventWriter>,
    ) -> Option<Result<(Vec<PathBuf>, String)>> {
        if self.sample_prompts.is_empty() {
            return None;
        }
        Some(self.answer_samples(step, events))
    }

    fn validation(&mut self, step: usize, epoch_end: bool, last: bool) -> Option<Result<f32>> {
        let due = match self.eval_steps {
            Some(n) => step.is_multiple_of(n) || last,
            None => epoch_end,
        };
        if !due || self.validation.is_none() {
            return None;
        }
        Some(self.validation_loss())
    }
}

impl LmTask {
    /// The mean loss over every learned token of the validation records, without dropout.
    fn validation_loss(&self) -> Result<f32> {
        let Some(validation) = &self.validation else {
            return Ok(f32::NAN);
        };
        let _inference = self.network.inference();
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in validation.samples.chunks(self.batch_size.max(1)) {
            let records: Vec<_> = chunk.iter().collect();
            let learned: usize = chunk.iter().map(|s| s.learned()).sum();
            let (ids, labels) = collate(&records, self.pad_id, &self.device)?;
            if let Some(mean) = self.model.loss(&ids, &labels)? {
                sum += f64::from(mean.to_scalar::<f32>()?) * learned as f64;
                count += learned;
            }
        }
        Ok((sum / count.max(1) as f64) as f32)
    }

    /// Answers the sample prompts with the adapters as they are; writes them to
    /// `samples/<output_name>_stepNNNNNNNN.txt` and TensorBoard's Text tab.
    fn answer_samples(
        &self,
        step: usize,
        mut events: Option<&mut EventWriter>,
    ) -> Result<(Vec<PathBuf>, String)> {
        let _inference = self.network.inference();
        let generator = Generator::new(&self.model, &self.tokenizer, &self.device)?;
        let mut text = String::new();
        for (i, prompt) in self.sample_prompts.iter().enumerate() {
            let answer = generator.answer(prompt, None, self.max_new_tokens)?;
            text.push_str(&format!("### {prompt}\n\n{answer}\n\n"));
            if let Some(events) = events.as_deref_mut() {
                let markdown = format!("**{prompt}**\n\n{answer}");
                events.add_text(&format!("samples/{i}"), &markdown, step as u64)?;
            }
        }
        std::fs::create_dir_all(&self.samples_dir)
            .map_err(|e| crate::Error::io(&self.samples_dir, e))?;
        let path = self
            .samples_dir
            .join(format!("{}_step{step:08}.txt", self.output_name));
        crate::files::write_atomically(&path, text.as_bytes())?;
        let line = format!(
            "samples at step {step}: {} answer(s) in {}",
            self.sample_prompts.len(),
            path.display()
        );
        Ok((vec![path], line))
    }
}

fn not_finite(step: usize, what: &'static str, value: f64) -> crate::Error {
    TrainError::NotFinite {
        step: step + 1,
        what,
        value,
    }
    .into()
}

/// Trains the adapter `preflight` describes; prints start-up lines and progress to stderr.
pub fn train(preflight: LmPreflight, options: &RunOptions) -> Result<RunReport> {
    let LmPreflight {
        plan,
        folder,
        config,
        tokenizer,
        mut data,
        mut validation,
        sample_prompts,
        steps,
        save_points,
        start,
        modules,
        parameters,
        target_modules,
        ..
    } = preflight;
    let Some(spec) = plan.llm() else {
        return Err(TrainError::Usage("not a language-model config (`task: llm`)".into()).into());
    };
    let out = &plan.output;
    let saved = match &options.resume {
        Some(arg) => {
            let dir = resume::locate(arg, &out.output_dir)?;
            let resumable =
                resume::open_for_records(&dir, &plan, &data.fingerprint, steps.total_steps)?;
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
    prepare(&plan, usage, &[])?;
    let start_step = saved.as_ref().map_or(0, |s| s.manifest.step);
    let clock = RunClock::start(start_step as u64);
    let started_at = saved
        .as_ref()
        .map_or_else(unix_now, |s| s.manifest.training_started_at);
    if saved.is_some() {
        // The records as they were rendered when the run started (templates may write the date).
        (data, validation) = prepare_data(spec, &tokenizer, plan.data.seed, started_at)?;
    }

    let mut compute = Compute::resolve(plan.training.device, plan.training.mixed_precision)?;
    for warning in &compute.warnings {
        eprintln!("warning: {warning}");
    }
    let mut model_folder = LmFolder::open(&folder, compute.dtype, &compute.device)?;
    let elements = model_folder.weights.element_count();
    let available = crate::log::memory::available_bytes();
    if let Some(note) = compute.fit_weights(elements, available) {
        eprintln!("note: {note}");
    }
    model_folder.weights.set_matrix_dtype(compute.matrix_dtype);
    let seed = plan.data.seed;
    let origin = plan
        .lora
        .network_weights
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let network = LmNetwork::new(
        &plan.lora,
        start.map(|a| (a, origin)),
        seed,
        &compute.device,
    );
    let mut model = CausalLm::new(
        Scope::root(&model_folder.weights).with_adapters(&network),
        &config,
    )?;
    model.set_gradient_checkpointing(plan.training.gradient_checkpointing);
    network.check_built()?;
    let t = &plan.training;
    let group = ParamGroup::new("lora", t.weight_decay, network.named_vars());
    let mut optimizer = build_optimizer(OptimizerSettings::from_training(t), vec![group])?;
    if let Some(state) = &saved {
        state.restore(&network.named_vars(), optimizer.as_mut())?;
    }
    let schedule = LrSchedule::from_training(t, steps.total_steps)?;
    let pad_id = tokenizer
        .pad_token
        .as_deref()
        .or(tokenizer.eos_token.as_deref())
        .and_then(|t| tokenizer.token_id(t))
        .unwrap_or(0);
    eprintln!(
        "device {} ({}); {} from {}",
        compute.device_name,
        compute.dtype_name,
        config.architecture.class_name(),
        folder.display()
    );
    eprintln!(
        "{} samples; LoRA r={} on {}: {modules} modules, {parameters} parameters; {} steps{}",
        data.samples.len(),
        plan.lora.rank,
        target_modules.join(", "),
        steps.total_steps,
        match start_step {
            0 => String::new(),
            n => format!(", resuming after step {n}"),
        }
    );
    let mut task = LmTask {
        model,
        network,
        optimizer,
        schedule,
        base_lr: t.learning_rate,
        data,
        pad_id,
        seed,
        max_grad_norm: t.max_grad_norm,
        base_model: plan.model.base_model.clone(),
        device: compute.device.clone(),
        tokenizer,
        validation,
        eval_steps: spec.eval_steps,
        batch_size: t.batch_size,
        sample_prompts,
        max_new_tokens: plan.sampling.max_new_tokens,
        samples_dir: out.output_dir.join("samples"),
        output_name: out.output_name.clone(),
    };
    let parts = RunParts {
        plan: &plan,
        steps,
        save_points: &save_points,
        started_at,
    };
    run_steps(&parts, &mut task, clock, saved.as_ref(), options)
}
