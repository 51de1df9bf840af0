//! One optimizer step, testable alone: [`Trainer::step`] takes the batches of the step and does
//! everything between two optimizer updates.
//!
//! Per micro-batch: latents (cached, or encoded now), the text embedding (cached, or the text
//! encoder run now with `clip_skip`, through its adapters when it is trained), the draws keyed
//! by (seed, step, micro-batch), the loss scaled by 1/(micro-batches in this step), backward,
//! and the adapters' gradients summed. Then the global gradient norm is clipped to
//! `max_grad_norm`, the learning rates of the step are read from the schedule (one per
//! parameter group: UNet, text encoder), and the optimizer updates the adapters. A NaN or
//! infinite loss or gradient norm stops before the update, so the weights are never poisoned.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::latents::{encode_batch, LatentCache};
use super::lr_schedule::LrSchedule;
use super::optim::{ParamGroup, ParamOptimizer};
use super::step::{diffusion_loss, Draws};
use super::text_cache::TextCache;
use super::{clip_grad_norm, TrainError};
use crate::dataset::{Batch, Dataset, ImageView};
use crate::lora::LoraNetworks;
use crate::models::conditioning::{size_ids, Conditioning, TextEncoders};
use crate::models::noise::NoiseSchedule;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::Result;

/// Where a micro-batch's latents come from.
pub enum LatentSource {
    /// Every view encoded before the first step (`cache_latents`).
    Cached(LatentCache),
    /// The VAE ([`Trainer::vae`]) encodes each micro-batch (`cache_latents: false`); the same
    /// draws as the cache.
    Live,
}

/// The loss options of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    pub seed: u64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub min_snr_gamma: Option<f64>,
    pub noise_offset: f64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Mean loss over the step's micro-batches.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate of each parameter group for this step (UNet first).
    pub lrs: Vec<f64>,
    /// Samples seen in this step.
    pub samples: usize,
    /// Tokens seen in this step (a language model's, padding excluded).
    pub tokens: Option<usize>,
}

/// The models, caches, adapters and optimizer of a run.
pub struct Trainer {
    pub unet: UNet2DConditionModel,
    /// The base model's text encoders (with `clip_skip`); they carry adapters when trained.
    /// `None` once every caption's conditioning is cached and no preview needs them: their
    /// weights are freed (SDXL's two encoders are 0.8 B parameters).
    pub text_encoders: Option<TextEncoders>,
    /// Every caption's conditioning, when the text encoders are frozen and captions never change
    /// (no tag shuffling, no caption dropout); otherwise the encoders run at every micro-batch.
    pub text_cache: Option<TextCache>,
    /// Kept when latents are not cached or previews are drawn.
    pub vae: Option<AutoencoderKL>,
    pub latents: LatentSource,
    pub noise: NoiseSchedule,
    pub networks: LoraNetworks,
    pub optimizer: Box<dyn ParamOptimizer>,
    pub schedule: LrSchedule,
    /// Base learning rate of each optimizer group, in the optimizer's group order.
    pub base_lrs: Vec<f64>,
    pub settings: StepSettings,
    pub device: Device,
}

impl Trainer {
    /// Optimizer step `step` (0-based: the number of steps already taken) over `batches`, one
    /// micro-batch each (1 ≤ `batches.len()` ≤ `gradient_accumulation_steps`).
    pub fn step(
        &mut self,
        dataset: &Dataset,
        step: usize,
        batches: &[Batch],
    ) -> Result<StepReport> {
        if batches.is_empty() {
            return Err(TrainError::Usage(format!("step {step} has no batch")).into());
        }
        let vars = self.networks.trainable_vars();
        let scale = 1.0 / batches.len() as f64;
        let mut summed = GradStore::default();
        let mut loss_sum = 0f64;
        let mut samples = 0;
        self.networks.set_training(true);
        for (micro, batch) in batches.iter().enumerate() {
            self.networks.set_step(step as u64, micro as u64);
            let latents = self.latents_of(dataset, batch)?;
            let conditioning = self.conditioning_of(batch)?;
            let size_ids = match conditioning.pooled {
                Some(_) => Some(size_ids_of(dataset, batch, &self.device)?),
                None => None,
            };
            let draws = Draws::sample(
                self.settings.seed,
                step as u64,
                micro as u64,
                latents.dims(),
                self.noise.num_train_timesteps(),
                self.settings.noise_offset,
                &self.device,
            )?;
            let out = diffusion_loss(
                &self.unet,
                &self.noise,
                &latents,
                &conditioning,
                size_ids.as_ref(),
                &draws,
                self.settings.min_snr_gamma,
            )?;
            if !out.value.is_finite() {
                return Err(not_finite(step, "loss", f64::from(out.value)));
            }
            let grads = out.loss.affine(scale, 0.0)?.backward()?;
            add_gradients(&mut summed, &grads, &vars)?;
            loss_sum += f64::from(out.value);
            samples += batch.items.len();
        }
        let grad_norm = clip_grad_norm(&mut summed, &vars, self.settings.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(not_finite(step, "gradient norm", grad_norm));
        }
        let multiplier = self.schedule.multiplier(step);
        let lrs: Vec<f64> = self.base_lrs.iter().map(|lr| lr * multiplier).collect();
        self.optimizer.step(&summed, &lrs)?;
        Ok(StepReport {
            loss: (loss_sum * scale) as f32,
            grad_norm,
            lrs,
            samples,
            tokens: None,
        })
    }

    /// `[B, C, h, w]` f32 latents of a batch on the training device.
    fn latents_of(&self, dataset: &Dataset, batch: &Batch) -> Result<Tensor> {
        let views: Vec<ImageView> = batch.items.iter().map(|i| i.view()).collect();
        match (&self.latents, &self.vae) {
            (LatentSource::Cached(cache), _) => cache.batch(&views, &self.device),
            (LatentSource::Live, Some(vae)) => {
                encode_batch(dataset, &views, vae, self.settings.seed, &self.device)
            }
            (LatentSource::Live, None) => {
                Err(TrainError::Usage("latents are not cached and no VAE is loaded".into()).into())
            }
        }
    }

    /// The conditioning of a batch's captions (context `[B, 77, hidden]`).
    fn conditioning_of(&self, batch: &Batch) -> Result<Conditioning> {
        let captions: Vec<&str> = batch.items.iter().map(|i| i.caption.as_str()).collect();
        match (&self.text_cache, &self.text_encoders) {
            (Some(cache), _) => cache.batch(&captions, &self.device),
            (None, Some(encoders)) => encoders.encode(&captions, &self.device),
            (None, None) => Err(TrainError::Usage(
                "the captions are not cached and no text encoder is loaded".into(),
            )
            .into()),
        }
    }
}

/// SDXL's size numbers of a batch's samples, `[B, 6]` f32 on `device`.
fn size_ids_of(dataset: &Dataset, batch: &Batch, device: &Device) -> Result<Tensor> {
    let images = dataset.images();
    let mut rows = Vec::with_capacity(batch.items.len() * 6);
    for item in &batch.items {
        let image = images.get(item.image).ok_or_else(|| {
            TrainError::Usage(format!(
                "batch item {} is not an image of the dataset",
                item.image
            ))
        })?;
        rows.extend(size_ids(image.size, image.bucket, item.flip));
    }
    Ok(Tensor::from_vec(rows, (batch.items.len(), 6), device)?)
}

/// The optimizer groups of `networks`: UNet adapters at `unet_lr`, text-encoder adapters at
/// `text_encoder_lr`, each parameter named by its kohya key. Returns the groups and their base
/// learning rates.
pub fn param_groups(
    networks: &LoraNetworks,
    unet_lr: f64,
    text_encoder_lr: f64,
    weight_decay: f64,
) -> (Vec<ParamGroup>, Vec<f64>) {
    let mut groups = Vec::new();
    let mut lrs = Vec::new();
    let unet = networks.unet.named_vars();
    if !unet.is_empty() {
        groups.push(ParamGroup::new("unet", weight_decay, unet));
        lrs.push(unet_lr);
    }
    // SDXL's two text encoders share the text encoder's group and rate.
    let te_networks = [&networks.text_encoder, &networks.text_encoder_2];
    if te_networks.iter().any(|n| n.is_some()) {
        let vars: Vec<_> = te_networks
            .iter()
            .filter_map(|n| n.as_ref())
            .flat_map(|n| n.named_vars())
            .collect();
        if !vars.is_empty() {
            groups.push(ParamGroup::new("text_encoder", weight_decay, vars));
            lrs.push(text_encoder_lr);
        }
    }
    (groups, lrs)
}

/// Adds the gradients of `vars` in `grads` to `sum` (the other tensors' gradients are dropped
/// with `grads`).
pub fn add_gradients(sum: &mut GradStore, grads: &GradStore, vars: &[Var]) -> Result<()> {
    for var in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let total = match sum.get(var.as_tensor()) {
            Some(acc) => (acc + g)?,
            None => g.clone(),
        };
        sum.insert(var.as_tensor(), total);
    }
    Ok(())
}

fn not_finite(step: usize, what: &'static str, value: f64) -> crate::Error {
    TrainError::NotFinite {
        step: step + 1,
        what,
        value,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_of_micro_batches_add_up_per_variable() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, 2.0], &dev)?;
        let b = Var::new(&[3f32], &dev)?;
        let vars = [a.clone(), b.clone()];
        let mut sum = GradStore::default();
        // loss₁ = Σ a² → 2a; loss₂ = 3·Σ a + b → 3, 1.
        let g1 = a.as_tensor().sqr()?.sum_all()?.backward()?;
        add_gradients(&mut sum, &g1, &vars)?;
        assert!(sum.get(b.as_tensor()).is_none());
        let loss2 = ((a.as_tensor().sum_all()? * 3.0)? + b.as_tensor().sum_all()?)?;
        add_gradients(&mut sum, &loss2.backward()?, &vars)?;
        let ga: Vec<f32> = sum.get(a.as_tensor()).unwrap().to_vec1()?;
        let gb: Vec<f32> = sum.get(b.as_tensor()).unwrap().to_vec1()?;
        assert_eq!((ga, gb), (vec![5.0, 7.0], vec![1.0]));
        Ok(())
    }
}
