//! What a sampler needs from the base model: the noise schedule (`ᾱ_t`, the prediction type) and
//! the sampling keys of its `scheduler/scheduler_config.json` (`timestep_spacing`,
//! `steps_offset`, `set_alpha_to_one`, `clip_sample`, ...).
//!
//! A key the file does not have takes the default of the sampler that runs, exactly as
//! diffusers' `SamplerClass.from_config(pipe.scheduler.config)` does. So Stable Diffusion 1.5's
//! config (a `PNDMScheduler` one with `steps_offset: 1` and no `timestep_spacing`) samples with
//! `leading` timesteps under DDIM but `linspace` under Euler ancestral and DPM++ 2M, as in
//! diffusers. A single-file checkpoint has no scheduler config; diffusers' `from_single_file`
//! then uses SD 1.5's, and so do we.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::samplers::spacing::TimestepSpacing;
use crate::error::ModelError;
use crate::models::hub::HubCache;
use crate::models::noise::{NoiseSchedule, PredictionType};
use crate::models::source::ModelSource;
use crate::{Error, Result};

/// The sampling keys of a `scheduler_config.json`; `None` = not in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplerConfig {
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<usize>,
    /// DDIM: the `ᾱ` after the last step is 1 (else `ᾱ_0`).
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clamp the predicted clean latent to ±`clip_sample_range`.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    /// Zero terminal SNR: Euler and DPM++ replace `ᾱ` of the last timestep by 2⁻²⁴.
    pub rescale_betas_zero_snr: bool,
    /// Keys set in the file that our samplers do not implement (for the run's notes).
    pub ignored: Vec<String>,
    /// Where the keys came from, for messages.
    pub origin: String,
}

/// The keys as they appear in the JSON (unknown keys are other schedulers' and are ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawKeys {
    timestep_spacing: Option<String>,
    steps_offset: Option<usize>,
    set_alpha_to_one: Option<bool>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    rescale_betas_zero_snr: Option<bool>,
    thresholding: Option<bool>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    use_lu_lambdas: Option<bool>,
}

impl SamplerConfig {
    /// Parses the sampling keys of a `scheduler_config.json`; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let invalid = |message: String| -> Error {
            ModelError::InvalidConfig {
                origin: origin.to_string(),
                message,
            }
            .into()
        };
        let raw: RawKeys = serde_json::from_str(text)
            .map_err(|e| invalid(format!("not a valid scheduler config: {e}")))?;
        let timestep_spacing = raw
            .timestep_spacing
            .as_deref()
            .map(str::parse::<TimestepSpacing>)
            .transpose()
            .map_err(invalid)?;
        let mut ignored = Vec::new();
        for (key, on) in [
            ("thresholding", raw.thresholding),
            ("use_karras_sigmas", raw.use_karras_sigmas),
            ("use_exponential_sigmas", raw.use_exponential_sigmas),
            ("use_beta_sigmas", raw.use_beta_sigmas),
            ("use_lu_lambdas", raw.use_lu_lambdas),
        ] {
            if on == Some(true) {
                ignored.push(key.to_string());
            }
        }
        Ok(SamplerConfig {
            timestep_spacing,
            steps_offset: raw.steps_offset,
            set_alpha_to_one: raw.set_alpha_to_one,
            clip_sample: raw.clip_sample,
            clip_sample_range: raw.clip_sample_range,
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr.unwrap_or(false),
            ignored,
            origin: origin.to_string(),
        })
    }

    /// Reads `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// The scheduler config of Stable Diffusion 1.5 (also SD 2.x's sampling keys): what
    /// diffusers uses for a single-file checkpoint.
    pub fn stable_diffusion_default() -> Self {
        SamplerConfig {
            timestep_spacing: None,
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            clip_sample_range: None,
            rescale_betas_zero_snr: false,
            ignored: Vec::new(),
            origin: "Stable Diffusion's default scheduler config (steps_offset 1)".to_string(),
        }
    }

    /// The config of the base model `source` (a diffusers folder, a hub id already in
    /// `hub_cache`, or a single file), read from its `scheduler/scheduler_config.json`; the
    /// default when there is none.
    pub fn for_model(source: &ModelSource, hub_cache: &HubCache) -> Result<Self> {
        let folder: Option<PathBuf> = match source {
            ModelSource::Diffusers { root, .. } => Some(root.clone()),
            ModelSource::Hub { id, snapshot, .. } => {
                snapshot.clone().or_else(|| hub_cache.snapshot(id))
            }
            ModelSource::SingleFile { .. } => None,
        };
        match folder.map(|f| f.join("scheduler").join("scheduler_config.json")) {
            Some(path) if path.is_file() => Self::from_file(&path),
            _ => Ok(Self::stable_diffusion_default()),
        }
    }
}

/// Everything a sampler reads: `ᾱ_t`, the prediction type and the sampling keys.
#[derive(Debug, Clone)]
pub struct SamplingSchedule {
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    config: SamplerConfig,
}

impl SamplingSchedule {
    /// The model's noise schedule (with any prediction-type override applied) and its sampling
    /// keys.
    pub fn new(noise: &NoiseSchedule, config: SamplerConfig) -> Self {
        SamplingSchedule {
            alphas_cumprod: noise.alphas_cumprod().to_vec(),
            prediction_type: noise.prediction_type(),
            config,
        }
    }

    /// `ᾱ_t` for every training timestep (f32, as diffusers').
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// `ᾱ` as the Euler and DPM++ samplers see it: the last one lifted to 2⁻²⁴ under zero
    /// terminal SNR (so that σ stays finite).
    pub(crate) fn alphas_cumprod_for_sigmas(&self) -> Vec<f32> {
        let mut alphas = self.alphas_cumprod.clone();
        if self.config.rescale_betas_zero_snr {
            if let Some(last) = alphas.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        alphas
    }

    /// `σ_t = √((1 − ᾱ_t) / ᾱ_t)` for every training timestep, in f32 as torch computes it.
    pub(crate) fn sigma_table(&self) -> Vec<f32> {
        self.alphas_cumprod_for_sigmas()
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_and_missing_ones_stay_unset() -> Result<()> {
        let c = SamplerConfig::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "steps_offset": 1, "set_alpha_to_one": false,
                "skip_prk_steps": true, "use_karras_sigmas": true}"#,
            "x.json",
        )?;
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.steps_offset, Some(1));
        assert_eq!(c.set_alpha_to_one, Some(false));
        assert_eq!(c.clip_sample, None);
        assert_eq!(c.ignored, vec!["use_karras_sigmas".to_string()]);
        let c = SamplerConfig::from_json_str(r#"{"timestep_spacing": "trailing"}"#, "x.json")?;
        assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));
        Ok(())
    }

    #[test]
    fn a_bad_spacing_names_the_file_and_the_value() {
        let err = SamplerConfig::from_json_str(r#"{"timestep_spacing": "karras"}"#, "s.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("s.json: ") && err.contains("`karras`"),
            "{err}"
        );
    }

    #[test]
    fn model_folders_give_their_file_and_single_files_the_default() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let cache = HubCache::at(root.join("no-such-cache")).with_offline(true);
        let detect = |path: &Path| ModelSource::detect_with(&path.to_string_lossy(), &cache);
        let folder = SamplerConfig::for_model(&detect(&root.join("tiny-sd1"))?, &cache)?;
        assert_eq!(folder.timestep_spacing, Some(TimestepSpacing::Leading));
        assert!(folder.origin.ends_with("scheduler_config.json"));
        let single = crate::fixtures::path("tiny-sd1.safetensors");
        let file = SamplerConfig::for_model(&detect(&single)?, &cache)?;
        assert_eq!(file, SamplerConfig::stable_diffusion_default());
        Ok(())
    }
}
