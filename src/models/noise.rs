//! The DDPM noise schedule: alphas, add_noise, v targets, SNR.
//!
//! Training needs only the forward (noising) process of the scheduler a base model ships with:
//! `ᾱ_t` (`alphas_cumprod`) for each of the `num_train_timesteps` steps, computed from
//! `scheduler/scheduler_config.json` exactly as diffusers does (f32 betas, a cumulative product
//! accumulated in f64 as torch does on the CPU, then rounded to f32), so that our noisy latents,
//! targets and SNR weights match diffusers' and kohya's to the last bit of f32 where possible.
//! (The zero-terminal-SNR rescale can differ by one f32 ulp: torch's vectorised `sqrt` is not
//! correctly rounded.) Every DDPM-family scheduler class (DDPM, DDIM, PNDM, Euler, ...) stores
//! the same keys, so the class name is not checked; a value we cannot reproduce is an error
//! that names it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::ModelError;
use crate::{Error, Result};

/// What the UNet is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise `ε` (SD 1.x, SD 2.x base 512).
    Epsilon,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x0` (SD 2.x 768).
    VPrediction,
}

impl PredictionType {
    /// The name diffusers uses in `scheduler_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// The keys of a diffusers `scheduler_config.json` that define the training noise schedule.
/// Missing keys take `DDPMScheduler`'s defaults; other keys (`_class_name`, `clip_sample`,
/// `steps_offset`, `timestep_spacing`, ...) concern sampling and are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The scheduler class that wrote the file (informational).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas; when given they replace `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon` or `v_prediction`.
    pub prediction_type: String,
    /// Rescale the betas to zero terminal SNR (<https://arxiv.org/abs/2305.08891>).
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            prediction_type: "epsilon".to_string(),
            rescale_betas_zero_snr: false,
        }
    }
}

/// The forward diffusion process of one base model. See the module docs.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    prediction_type: PredictionType,
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Reads `scheduler_config.json` (any DDPM-family scheduler's).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::models::config_json::read_model_file(path)?;
        let config: SchedulerConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
                origin: path.display().to_string(),
                message: format!("not a valid scheduler config: {e}"),
            })?;
        Self::from_config(&config, &path.display().to_string())
    }

    /// Builds the schedule from a parsed config; `origin` names it in errors (a file path).
    pub fn from_config(config: &SchedulerConfig, origin: &str) -> Result<Self> {
        let invalid = |message: String| -> Error {
            ModelError::InvalidConfig {
                origin: origin.to_string(),
                message,
            }
            .into()
        };
        let prediction_type = match config.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err(invalid(format!(
                    "prediction_type `{other}` is not supported for training; use `epsilon` or `v_prediction`"
                )))
            }
        };
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(invalid(format!(
                "num_train_timesteps is {n}; it must be at least 2"
            )));
        }
        let mut betas = match &config.trained_betas {
            Some(trained) => {
                if trained.len() != n {
                    return Err(invalid(format!(
                        "trained_betas has {} values but num_train_timesteps is {n}; they must agree",
                        trained.len()
                    )));
                }
                trained.iter().map(|&b| b as f32).collect()
            }
            None => match config.beta_schedule.as_str() {
                "linear" => linspace_f32(config.beta_start, config.beta_end, n),
                "scaled_linear" => {
                    linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                "squaredcos_cap_v2" => cosine_betas(n),
                other => {
                    return Err(invalid(format!(
                    "beta_schedule `{other}` is not supported; use `linear`, `scaled_linear` or \
                         `squaredcos_cap_v2` (or give `trained_betas`)"
                )))
                }
            },
        };
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(0.0..1.0).contains(*b))
        {
            return Err(invalid(format!(
                "beta at timestep {t} is {b}; every beta must lie in [0, 1) (check beta_start and beta_end)"
            )));
        }
        if config.rescale_betas_zero_snr {
            betas = rescale_to_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(NoiseSchedule {
            prediction_type,
            alphas_cumprod: cumprod(&alphas),
        })
    }

    /// What the model predicts.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// Number of training timesteps (`num_train_timesteps`); valid timesteps are `0..n`.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `ᾱ_t` for every timestep, as diffusers' `scheduler.alphas_cumprod` (f32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `noisy = √ᾱ_t·x0 + √(1−ᾱ_t)·noise`, per sample. `x0`, `noise`: `[B, ...]`, `timesteps`:
    /// `[B]` (any integer dtype) → `[B, ...]` in `x0`'s dtype.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (signal, noise_scale) = self.coefficients(timesteps, x0)?;
        Ok((x0.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?)?)
    }

    /// The v-prediction target `√ᾱ_t·noise − √(1−ᾱ_t)·x0` (diffusers' `get_velocity`), per
    /// sample. Shapes as [`NoiseSchedule::add_noise`].
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (signal, noise_scale) = self.coefficients(timesteps, x0)?;
        Ok((noise.broadcast_mul(&signal)? - x0.broadcast_mul(&noise_scale)?)?)
    }

    /// The training target for this schedule's prediction type: `noise` (epsilon) or
    /// [`NoiseSchedule::velocity`] (v_prediction). Shapes as [`NoiseSchedule::add_noise`].
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
        }
    }

    /// Signal-to-noise ratio `ᾱ_t / (1−ᾱ_t)` per timestep, computed as diffusers'
    /// `compute_snr` and kohya's `all_snr` do (`(√ᾱ / √(1−ᾱ))²` in f32). `timesteps`: `[B]` →
    /// `[B]` f32 (infinite where `ᾱ = 1`, zero at the last step of a zero-terminal-SNR schedule).
    pub fn snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        let values: Vec<f32> = self
            .indices(timesteps)?
            .into_iter()
            .map(|t| self.snr_at(t))
            .collect();
        let n = values.len();
        Ok(Tensor::from_vec(values, n, timesteps.device())?)
    }

    /// Min-SNR-γ loss weight per sample (<https://arxiv.org/abs/2303.09556>), to multiply the
    /// per-sample MSE with: `min(snr, γ)/snr` for epsilon, `min(snr, γ)/(snr + 1)` for
    /// v-prediction. Same formula as kohya's `apply_snr_weight` and current diffusers'
    /// `train_text_to_image*.py`, computed in f32 (kohya precomputes the same SNR table from
    /// `alphas_cumprod`; both scale the per-sample mean, then average over the batch). Older
    /// diffusers scripts (2023) used `min(snr + 1, γ)/(snr + 1)` for v-prediction; we follow the
    /// current ones and kohya. One deliberate difference: where `snr = 0` (last step of a
    /// zero-terminal-SNR schedule) the epsilon weight is its limit 1 instead of their
    /// `0/0 = NaN`. `timesteps`: `[B]` → `[B]` f32.
    pub fn min_snr_weight(&self, timesteps: &Tensor, gamma: f64) -> Result<Tensor> {
        let gamma = gamma as f32;
        let values: Vec<f32> = self
            .indices(timesteps)?
            .into_iter()
            .map(|t| {
                let snr = self.snr_at(t);
                match self.prediction_type {
                    PredictionType::Epsilon if snr == 0.0 => 1.0,
                    PredictionType::Epsilon => snr.min(gamma) / snr,
                    PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
                }
            })
            .collect();
        let n = values.len();
        Ok(Tensor::from_vec(values, n, timesteps.device())?)
    }

    fn snr_at(&self, t: usize) -> f32 {
        let ac = self.alphas_cumprod[t];
        let ratio = ac.sqrt() / (1.0 - ac).sqrt();
        ratio * ratio
    }

    /// `(√ᾱ_t, √(1−ᾱ_t))` per sample, shaped `[B, 1, 1, ...]` to broadcast against `like`.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let indices = self.indices(timesteps)?;
        let batch = like.dims().first().copied().unwrap_or(0);
        if indices.len() != batch {
            return Err(candle_core::Error::Msg(format!(
                "noise schedule: {} timesteps for a batch of {batch} samples",
                indices.len()
            ))
            .into());
        }
        let mut shape = vec![batch];
        shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
        let make = |f: &dyn Fn(f32) -> f32| -> Result<Tensor> {
            let values: Vec<f32> = indices.iter().map(|&t| f(self.alphas_cumprod[t])).collect();
            Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
                .to_dtype(like.dtype())?
                .to_device(like.device())?)
        };
        Ok((make(&|ac| ac.sqrt())?, make(&|ac| (1.0 - ac).sqrt())?))
    }

    /// Timestep indices from a `[B]` integer tensor, each checked to be in range.
    fn indices(&self, timesteps: &Tensor) -> Result<Vec<usize>> {
        let values = timesteps
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        let n = self.num_train_timesteps();
        values
            .into_iter()
            .map(|t| {
                usize::try_from(t).ok().filter(|&t| t < n).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "noise schedule: timestep {t} is outside 0..{n}"
                    ))
                    .into()
                })
            })
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` bit for bit: f32 endpoints and step, each
/// value `start + step·i` (first half) or `end − step·(n−1−i)` (second half) with one rounding.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Cumulative product of f32 values accumulated in f64, as torch's CPU `cumprod` does.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// The "Glide cosine" schedule: `β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999)` with
/// `ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)`, in f64 then rounded to f32 (diffusers'
/// `betas_for_alpha_bar`).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales f32 betas so that `ᾱ` of the last step is exactly 0 and `ᾱ_0` is unchanged
/// (Algorithm 1 of <https://arxiv.org/abs/2305.08891>), step by step in f32 as diffusers does.
fn rescale_to_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod(&alphas).into_iter().map(f32::sqrt).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(json: &str) -> Result<NoiseSchedule> {
        let config: SchedulerConfig =
            serde_json::from_str(json).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        NoiseSchedule::from_config(&config, "scheduler_config.json")
    }

    fn sd15() -> Result<NoiseSchedule> {
        schedule(
            r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": true,
                "set_alpha_to_one": false, "steps_offset": 1, "trained_betas": null}"#,
        )
    }

    #[test]
    fn scaled_linear_matches_known_values() -> Result<()> {
        let s = sd15()?;
        assert_eq!(s.prediction_type(), PredictionType::Epsilon);
        let ac = s.alphas_cumprod();
        assert_eq!(ac.len(), 1000);
        // Values printed by diffusers 0.42.1 (DDPMScheduler, same config), float32.
        assert_eq!(ac[0], 0.99915_f32);
        assert_eq!(ac[500], 0.276_332_47_f32);
        assert_eq!(ac[999], 0.004_660_095_f32);
        assert!(ac.windows(2).all(|w| w[1] < w[0]));
        Ok(())
    }

    #[test]
    fn linspace_is_torch_bit_for_bit_on_a_small_case() {
        // torch.linspace(0.1, 0.7, 7, dtype=torch.float32): 0.2 and 0.3 come out one ulp low.
        let want = [0.1f32, 0.199_999_99, 0.299_999_98, 0.4, 0.5, 0.6, 0.7];
        assert_eq!(linspace_f32(0.1, 0.7, 7), want);
    }

    #[test]
    fn zero_terminal_snr_ends_at_zero_and_keeps_the_first_value() -> Result<()> {
        let plain = sd15()?;
        let zero = schedule(
            r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "rescale_betas_zero_snr": true, "prediction_type": "v_prediction"}"#,
        )?;
        assert_eq!(zero.alphas_cumprod()[999], 0.0);
        assert!((zero.alphas_cumprod()[0] - plain.alphas_cumprod()[0]).abs() < 1e-6);
        let t = Tensor::new(&[999u32, 0], &Device::Cpu)?;
        let snr = zero.snr(&t)?.to_vec1::<f32>()?;
        assert_eq!(snr[0], 0.0);
        let w = zero.min_snr_weight(&t, 5.0)?.to_vec1::<f32>()?;
        assert_eq!(w[0], 0.0);
        assert!((w[1] - 5.0 / (snr[1] + 1.0)).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn noising_and_targets_follow_the_formulas_per_sample() -> Result<()> {
        let dev = Device::Cpu;
        let s = sd15()?;
        let x0 = Tensor::new(&[[[1.0f32, 2.0]], [[3.0, -1.0]]], &dev)?; // [2, 1, 2]
        let noise = Tensor::new(&[[[0.5f32, -0.5]], [[2.0, 1.0]]], &dev)?;
        let t = Tensor::new(&[10i64, 700], &dev)?;
        let noisy = s.add_noise(&x0, &noise, &t)?.to_vec3::<f32>()?;
        let v = s.velocity(&x0, &noise, &t)?.to_vec3::<f32>()?;
        let (x, e) = (x0.to_vec3::<f32>()?, noise.to_vec3::<f32>()?);
        for (b, ts) in [10usize, 700].into_iter().enumerate() {
            let ac = s.alphas_cumprod()[ts];
            let (a, sg) = (ac.sqrt(), (1.0 - ac).sqrt());
            for j in 0..2 {
                assert!((noisy[b][0][j] - (a * x[b][0][j] + sg * e[b][0][j])).abs() < 1e-6);
                assert!((v[b][0][j] - (a * e[b][0][j] - sg * x[b][0][j])).abs() < 1e-6);
            }
        }
        let target = s.target(&x0, &noise, &t)?.to_vec3::<f32>()?;
        assert_eq!(target, e);
        Ok(())
    }

    #[test]
    fn min_snr_weights_per_prediction_type() -> Result<()> {
        let dev = Device::Cpu;
        let eps = sd15()?;
        let t = Tensor::new(&[0u32, 999], &dev)?;
        let snr = eps.snr(&t)?.to_vec1::<f32>()?;
        assert!(snr[0] > 5.0 && snr[1] < 5.0);
        let w = eps.min_snr_weight(&t, 5.0)?.to_vec1::<f32>()?;
        assert!((w[0] - 5.0 / snr[0]).abs() < 1e-7);
        assert_eq!(w[1], 1.0);
        let v = schedule(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}"#,
        )?;
        let w = v.min_snr_weight(&t, 5.0)?.to_vec1::<f32>()?;
        assert!((w[0] - 5.0 / (snr[0] + 1.0)).abs() < 1e-7);
        assert!((w[1] - snr[1] / (snr[1] + 1.0)).abs() < 1e-7);
        let target = v.target(
            &Tensor::ones((2, 1), DType::F32, &dev)?,
            &Tensor::zeros((2, 1), DType::F32, &dev)?,
            &t,
        )?;
        assert!(
            target.to_vec2::<f32>()?[0][0] < 0.0,
            "v target must be −√(1−ᾱ)·x0 when ε = 0"
        );
        Ok(())
    }

    #[test]
    fn bad_values_are_named() {
        let err = schedule(r#"{"prediction_type": "sample"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`sample`") && err.contains("scheduler_config.json"),
            "{err}"
        );
        let err = schedule(r#"{"beta_schedule": "sigmoid"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sigmoid`"), "{err}");
        let err = schedule(r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("trained_betas"), "{err}");
        let err = schedule(r#"{"beta_start": 0.5, "beta_end": 1.5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("beta at timestep"), "{err}");
        let s =
            schedule(r#"{"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3}"#).unwrap();
        assert_eq!(s.alphas_cumprod().len(), 3);
        let err = s
            .snr(&Tensor::new(&[3u32], &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("timestep 3"), "{err}");
    }

    #[test]
    fn reads_a_file_and_names_it_when_broken() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(
            &path,
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2"}"#,
        )
        .map_err(|e| Error::io(&path, e))?;
        let s = NoiseSchedule::from_file(&path)?;
        assert_eq!(s.num_train_timesteps(), 1000);
        std::fs::write(&path, "{ not json").map_err(|e| Error::io(&path, e))?;
        let err = NoiseSchedule::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("scheduler_config.json"), "{err}");
        Ok(())
    }
}
