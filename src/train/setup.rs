//! Everything before the first step: the base model loaded on the run's device and precision,
//! the LoRA adapters built into it (and restored from a state when resuming), the optimizer and
//! schedule, the start-up lines, the latent and text caches, and the preview prompts.

use super::device::Compute;
use super::disk_latents::{self, DiskLatents};
use super::latents::LatentCache;
use super::lr_schedule::LrSchedule;
use super::optim::{build_optimizer, OptimizerSettings};
use super::previews::Previews;
use super::state::SavedState;
use super::text_cache::TextCache;
use super::trainer::{param_groups, LatentSource, StepSettings, Trainer};
use crate::config::PredictionType as ConfigPrediction;
use crate::dataset::Dataset;
use crate::generate::preview::SamplePrompt;
use crate::log::{DisplayMode, StartupFacts, TaskProgress};
use crate::lora::{LoraBase, LoraNetworks, NetworkOptions};
use crate::models::family::BaseModelVersion;
use crate::models::load::{BaseModel, LoadOptions};
use crate::models::noise::PredictionType;

use crate::preflight::Preflight;
use crate::Result;

/// A run ready for its first step.
pub struct Setup {
    pub trainer: Trainer,
    /// `ss_base_model_version` of the base model.
    pub base: BaseModelVersion,
    pub previews: Option<Previews>,
}

/// Loads and builds everything the steps of `preflight`'s run need, from the base model it
/// found (not looked for again); prints the start-up lines to stderr and shows
/// the latent caching's progress in `display`.
pub fn set_up(
    preflight: &Preflight,
    compute: &Compute,
    dataset: &Dataset,
    saved: Option<&SavedState>,
    sample_prompts: Option<Vec<SamplePrompt>>,
    display: DisplayMode,
) -> Result<Setup> {
    let (plan, model, steps) = (&preflight.plan, &preflight.model, &preflight.steps);
    let load = LoadOptions {
        dtype: compute.dtype,
        matrix_dtype: compute.matrix_dtype,
        device: compute.device.clone(),
        tokenizer: plan.model.tokenizer.clone(),
        tokenizer_2: plan.model.tokenizer_2.clone(),
        vae: plan.model.vae.clone(),
        prediction_type: plan.model.prediction_type.map(|p| match p {
            ConfigPrediction::Epsilon => PredictionType::Epsilon,
            ConfigPrediction::VPrediction => PredictionType::VPrediction,
        }),
        ..LoadOptions::default()
    };
    let mut checkpoint = BaseModel::open(model, &load)?;
    let mut compute = compute.clone();
    let available = crate::log::memory::available_bytes();
    if let Some(note) = compute.fit_weights(checkpoint.weight_elements(), available) {
        checkpoint.set_matrix_dtype(compute.matrix_dtype);
        eprintln!("note: {note}");
    }
    let compute = &compute;
    let seed = plan.data.seed;
    let networks = LoraNetworks::new(
        &plan.lora,
        Some(LoraBase::new(checkpoint.family(), checkpoint.unet_config())),
        NetworkOptions::new(seed, &compute.device),
    )?;
    let mut unet = checkpoint.unet(Some(&networks.unet))?;
    unet.set_gradient_checkpointing(plan.training.gradient_checkpointing);
    let text_encoders =
        checkpoint.text_encoders(&networks.text_encoder_providers(), plan.model.clip_skip)?;
    networks.check_built()?;
    let t = &plan.training;
    let (groups, base_lrs) = param_groups(&networks, t.unet_lr, t.text_encoder_lr, t.weight_decay);
    let mut optimizer = build_optimizer(OptimizerSettings::from_training(t), groups)?;
    if let Some(state) = saved {
        let vars: Vec<_> = networks.networks().flat_map(|n| n.named_vars()).collect();
        state.restore(&vars, optimizer.as_mut())?;
    }
    let schedule = LrSchedule::from_training(t, steps.total_steps)?;
    let noise = checkpoint.noise_schedule().clone();
    let base = checkpoint
        .family()
        .base_model_version(noise.prediction_type());

    let report = networks.report();
    let facts = StartupFacts {
        device: compute.device_name.clone(),
        dtype: compute.dtype_name.clone(),
        model_source: checkpoint.description().to_string(),
        model_version: Some(format!(
            "{} ({})",
            checkpoint.family(),
            noise.prediction_type().as_str()
        )),
        images: dataset.len(),
        repeats: plan.data.repeats,
        lora_modules: report.unet.modules + report.text_encoder.as_ref().map_or(0, |r| r.modules),
        lora_parameters: report.total_parameters() as u64,
        adapters: match networks.start_file() {
            Some(_) => format!("{}, from network_weights", report.layout.describe()),
            None => report.layout.describe(),
        },
        total_steps: steps.total_steps as u64,
        epochs: steps.epochs_run() as u64,
        resume_step: saved.map(|s| s.manifest.step as u64),
    };
    eprint!("{facts}");

    let previews = Previews::new(plan, model, sample_prompts, &noise)?;
    let vae = checkpoint.vae()?;
    let latents = if t.cache_latents {
        let views = LatentCache::views_for_run(dataset, steps.epochs_run().max(1));
        let mut bar = TaskProgress::new(display, "caching latents", views.len() as u64);
        let disk = t
            .cache_latents_to_disk
            .then(|| DiskLatents::new(&plan.output.output_dir, plan, dataset));
        let cache = disk_latents::build(
            dataset,
            &views,
            &vae,
            seed,
            t.batch_size,
            disk.as_ref(),
            |n| bar.inc(n),
        )?;
        bar.finish();
        LatentSource::Cached(cache)
    } else {
        LatentSource::Live
    };
    let keep_vae = !t.cache_latents || previews.is_some();
    let d = &plan.data;
    let captions_fixed = !d.shuffle_caption && d.caption_dropout_rate == 0.0;
    let text_cache = if networks.text_encoder.is_none() && captions_fixed {
        let captions: Vec<String> = (0..dataset.len())
            .flat_map(|i| (0..d.repeats.max(1)).map(move |r| (i, r)))
            .map(|(i, r)| dataset.sample(0, i, r).caption)
            .collect();
        Some(TextCache::build(
            captions.iter().map(String::as_str),
            &text_encoders,
            &compute.device,
            t.batch_size,
        )?)
    } else {
        None
    };

    // Cached conditioning needs no encoder, unless previews draw.
    let keep_text_encoders = text_cache.is_none() || previews.is_some();
    let trainer = Trainer {
        unet,
        text_encoders: keep_text_encoders.then_some(text_encoders),
        text_cache,
        vae: keep_vae.then_some(vae),
        latents,
        noise,
        networks,
        optimizer,
        schedule,
        base_lrs,
        settings: StepSettings {
            seed,
            max_grad_norm: t.max_grad_norm,
            min_snr_gamma: t.min_snr_gamma,
            noise_offset: t.noise_offset,
        },
        device: compute.device.clone(),
    };
    Ok(Setup {
        trainer,
        base,
        previews,
    })
}
