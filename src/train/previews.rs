//! Preview pictures during training (`sample_prompts`): the prompts read once at the start,
//! drawn with the models and adapters of the run as they are after a step, into
//! `<output_dir>/samples/` and TensorBoard's Images tab ([`crate::generate::preview`]).

use std::path::PathBuf;

use super::trainer::Trainer;
use crate::config::TrainPlan;
use crate::generate::pipeline::Pipeline;
use crate::generate::preview::{render_previews, PreviewSettings, SamplePrompt};
use crate::generate::schedule::{SamplerConfig, SamplingSchedule};
use crate::log::EventWriter;
use crate::models::hub::HubCache;
use crate::models::noise::NoiseSchedule;
use crate::models::source::ModelSource;
use crate::Result;

/// The preview prompts of a run and how to draw them.
pub struct Previews {
    prompts: Vec<SamplePrompt>,
    settings: PreviewSettings,
    schedule: SamplingSchedule,
}

impl Previews {
    /// `None` without prompts; `prompts` are those the preflight read from `sample_prompts`
    /// ([`crate::preflight::Preflight::sample_prompts`]), before any training.
    pub fn new(
        plan: &TrainPlan,
        model: &ModelSource,
        prompts: Option<Vec<SamplePrompt>>,
        noise: &NoiseSchedule,
    ) -> Result<Option<Previews>> {
        let sampling = &plan.sampling;
        let Some(prompts) = prompts else {
            return Ok(None);
        };
        let keys = SamplerConfig::for_model(model, &HubCache::from_env())?;
        Ok(Some(Previews {
            prompts,
            settings: PreviewSettings {
                output_dir: plan.output.output_dir.clone(),
                output_name: plan.output.output_name.clone(),
                sampler: sampling.sampler,
                seed: plan.data.seed,
                model_name: std::path::Path::new(&plan.model.base_model)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned()),
            },
            schedule: SamplingSchedule::new(noise, keys),
        }))
    }
}

impl Previews {
    /// Where the pictures go.
    pub fn folder(&self) -> PathBuf {
        self.settings.output_dir.join("samples")
    }

    /// Draws every prompt with `trainer`'s models as they are after optimizer step `step`, in
    /// inference mode (adapter dropout off, no graph built); returns the files written.
    pub fn render(
        &self,
        trainer: &Trainer,
        step: usize,
        events: Option<&mut EventWriter>,
    ) -> Result<Vec<PathBuf>> {
        let (Some(vae), Some(text_encoders)) = (&trainer.vae, &trainer.text_encoders) else {
            return Ok(Vec::new());
        };
        let _inference = trainer.networks.inference();
        let pipeline = Pipeline {
            unet: &trainer.unet,
            text_encoders,
            vae,
            schedule: &self.schedule,
            device: trainer.device.clone(),
        };
        render_previews(
            &pipeline,
            &self.prompts,
            &self.settings,
            step as u64,
            events,
        )
    }
}
