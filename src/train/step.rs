//! The maths of one micro-batch: noise, timesteps, noisy latents, the target, and the loss.
//!
//! As diffusers' `train_text_to_image_lora.py` and kohya's `train_network.py` do it: noise
//! `ε ~ N(0, I)` (plus `noise_offset · N(0, 1)` per sample and channel), timesteps uniform in
//! `[0, num_train_timesteps)`, `noisy = √ᾱ·x0 + √(1−ᾱ)·ε`, the target ε or v from the schedule,
//! the MSE averaged per sample, optionally weighted by min-SNR-γ, then averaged over the batch.
//! The draws come from streams keyed by (seed, optimizer step, micro-batch), so a resumed run
//! draws exactly what the uninterrupted run drew.

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::models::conditioning::Conditioning;
use crate::models::noise::NoiseSchedule;
use crate::models::unet::UNet2DConditionModel;
use crate::rng::{normal_f32, stream, Purpose};
use crate::Result;

/// The random draws of one micro-batch.
#[derive(Debug, Clone)]
pub struct Draws {
    /// `[B, C, h, w]` f32, the latents' shape.
    pub noise: Tensor,
    /// `[B]` u32, uniform in `[0, num_train_timesteps)`.
    pub timesteps: Tensor,
}

impl Draws {
    /// The draws for micro-batch `micro` of optimizer step `step` (both counted from 0) of a run
    /// seeded with `seed`. `latent_dims`: `[B, C, h, w]`. `noise_offset` adds
    /// `offset · N(0, 1)` to each (sample, channel) plane, as kohya and diffusers do.
    pub fn sample(
        seed: u64,
        step: u64,
        micro: u64,
        latent_dims: &[usize],
        num_train_timesteps: usize,
        noise_offset: f64,
        device: &Device,
    ) -> Result<Self> {
        let n: usize = latent_dims.iter().product();
        let (b, c) = (latent_dims[0], latent_dims[1]);
        let mut rng = stream(seed, step, micro, 0, Purpose::Noise);
        let mut noise = normal_f32(&mut rng, n);
        if noise_offset != 0.0 && n > 0 {
            let offsets = normal_f32(&mut rng, b * c);
            let plane = n / (b * c);
            for (values, offset) in noise.chunks_mut(plane).zip(offsets) {
                let shift = (noise_offset * offset as f64) as f32;
                values.iter_mut().for_each(|v| *v += shift);
            }
        }
        let mut rng = stream(seed, step, micro, 0, Purpose::Timesteps);
        let limit = num_train_timesteps as u32;
        let timesteps: Vec<u32> = (0..b).map(|_| rng.random_range(0..limit)).collect();
        Ok(Draws {
            noise: Tensor::from_vec(noise, latent_dims, device)?,
            timesteps: Tensor::from_vec(timesteps, b, device)?,
        })
    }
}

/// The loss of one micro-batch.
#[derive(Debug, Clone)]
pub struct MicroBatchLoss {
    /// Scalar f32, the batch mean of the (weighted) per-sample MSE; backward from here.
    pub loss: Tensor,
    /// The loss's value.
    pub value: f32,
}

/// The diffusion loss of a micro-batch. `latents`: `[B, C, h, w]` f32, already scaled by the
/// VAE's scaling factor; `conditioning`: the captions' (context `[B, T, cross_attention_dim]`);
/// `size_ids`: `[B, 6]` SDXL's size numbers ([`crate::models::conditioning::size_ids`]), used
/// with the conditioning's pooled output when it has one;
/// `min_snr_gamma`: weight each sample by min-SNR-γ. The UNet runs in its own dtype; the loss is
/// computed in f32.
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    latents: &Tensor,
    conditioning: &Conditioning,
    size_ids: Option<&Tensor>,
    draws: &Draws,
    min_snr_gamma: Option<f64>,
) -> Result<MicroBatchLoss> {
    let dtype = unet.dtype();
    let latents = latents.to_dtype(DType::F32)?;
    let noisy = schedule.add_noise(&latents, &draws.noise, &draws.timesteps)?;
    let target = schedule.target(&latents, &draws.noise, &draws.timesteps)?;
    // SDXL's added conditioning: the pooled text embedding and each sample's size numbers.
    let added = conditioning.text_time(size_ids);
    let prediction = unet.forward_with(
        &noisy.to_dtype(dtype)?,
        &draws.timesteps,
        &conditioning.context.to_dtype(dtype)?,
        added.as_ref(),
        &mut |_, _| Ok(()),
    )?;
    let error = (prediction.to_dtype(DType::F32)? - target)?.sqr()?;
    let per_sample = error.flatten_from(1)?.mean(1)?;
    let per_sample = match min_snr_gamma {
        Some(gamma) => {
            let weights = schedule
                .min_snr_weight(&draws.timesteps, gamma)?
                .to_device(per_sample.device())?;
            (per_sample * weights)?
        }
        None => per_sample,
    };
    let loss = per_sample.mean_all()?;
    let value = loss.to_scalar::<f32>()?;
    Ok(MicroBatchLoss { loss, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::noise::SchedulerConfig;
    use crate::models::random_weights::random_model;
    use crate::models::unet_config::UNetConfig;
    use crate::nn::Scope;

    fn schedule(prediction: &str) -> Result<NoiseSchedule> {
        let config = SchedulerConfig {
            beta_schedule: "scaled_linear".into(),
            beta_start: 0.00085,
            beta_end: 0.012,
            prediction_type: prediction.into(),
            ..SchedulerConfig::default()
        };
        NoiseSchedule::from_config(&config, "test")
    }

    fn tiny_unet() -> Result<UNet2DConditionModel> {
        let config = UNetConfig::from_json_str(
            r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "attention_head_dim": 2, "cross_attention_dim": 6}"#,
            "tiny",
        )?;
        let (unet, _) = random_model(11, |store| {
            UNet2DConditionModel::new(Scope::root(store), &config)
        })?;
        Ok(unet)
    }

    #[test]
    fn draws_are_keyed_by_step_and_micro_batch() -> Result<()> {
        let dev = Device::Cpu;
        let dims = [3, 4, 2, 2];
        let a = Draws::sample(5, 10, 1, &dims, 1000, 0.0, &dev)?;
        let again = Draws::sample(5, 10, 1, &dims, 1000, 0.0, &dev)?;
        let flat = |d: &Draws| d.noise.flatten_all().and_then(|t| t.to_vec1::<f32>());
        assert_eq!(flat(&a)?, flat(&again)?);
        assert_eq!(
            a.timesteps.to_vec1::<u32>()?,
            again.timesteps.to_vec1::<u32>()?
        );
        for other in [
            Draws::sample(5, 11, 1, &dims, 1000, 0.0, &dev)?,
            Draws::sample(5, 10, 0, &dims, 1000, 0.0, &dev)?,
            Draws::sample(6, 10, 1, &dims, 1000, 0.0, &dev)?,
        ] {
            assert_ne!(flat(&a)?, flat(&other)?);
        }
        let ts = Draws::sample(1, 0, 0, &[64, 1, 1, 1], 10, 0.0, &dev)?
            .timesteps
            .to_vec1::<u32>()?;
        assert!(ts.iter().all(|&t| t < 10) && ts.iter().any(|&t| t != ts[0]));
        Ok(())
    }

    #[test]
    fn noise_offset_shifts_each_sample_channel_plane_by_one_value() -> Result<()> {
        let dev = Device::Cpu;
        let dims = [2, 3, 4, 4];
        let plain = Draws::sample(9, 0, 0, &dims, 1000, 0.0, &dev)?.noise;
        let offset = Draws::sample(9, 0, 0, &dims, 1000, 0.1, &dev)?.noise;
        let shift = (offset - plain)?.flatten_from(2)?.to_vec3::<f32>()?;
        let mut distinct = Vec::new();
        for plane in shift.iter().flatten() {
            assert!(
                plane.iter().all(|v| (v - plane[0]).abs() < 1e-6),
                "{plane:?}"
            );
            assert!(plane[0].abs() > 0.0 && plane[0].abs() < 0.5);
            distinct.push(plane[0]);
        }
        distinct.dedup();
        assert_eq!(distinct.len(), 6, "one offset per (sample, channel)");
        Ok(())
    }

    #[test]
    fn loss_is_the_mse_to_the_target_with_min_snr_weights() -> Result<()> {
        let dev = Device::Cpu;
        let unet = tiny_unet()?;
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
        let context = Tensor::randn(0f32, 1.0, (2, 5, 6), &dev)?;
        for prediction in ["epsilon", "v_prediction"] {
            let schedule = schedule(prediction)?;
            let draws = Draws::sample(3, 0, 0, latents.dims(), 1000, 0.0, &dev)?;
            let noisy = schedule.add_noise(&latents, &draws.noise, &draws.timesteps)?;
            let target = schedule.target(&latents, &draws.noise, &draws.timesteps)?;
            let pred = unet
                .forward(
                    &noisy.to_dtype(DType::F64)?,
                    &draws.timesteps,
                    &context.to_dtype(DType::F64)?,
                )?
                .to_dtype(DType::F32)?;
            let per_sample: Vec<f32> = (pred - target)?
                .sqr()?
                .flatten_from(1)?
                .mean(1)?
                .to_vec1()?;
            let weights: Vec<f32> = schedule.min_snr_weight(&draws.timesteps, 0.01)?.to_vec1()?;
            let conditioning = Conditioning {
                context: context.clone(),
                pooled: None,
            };
            let plain = diffusion_loss(
                &unet,
                &schedule,
                &latents,
                &conditioning,
                None,
                &draws,
                None,
            )?;
            let want = (per_sample[0] + per_sample[1]) / 2.0;
            assert!(
                (plain.value - want).abs() <= 1e-5 * want.abs(),
                "{prediction}: {} vs {want}",
                plain.value
            );
            let snr = diffusion_loss(
                &unet,
                &schedule,
                &latents,
                &conditioning,
                None,
                &draws,
                Some(0.01),
            )?;
            let want = (per_sample[0] * weights[0] + per_sample[1] * weights[1]) / 2.0;
            assert!(
                (snr.value - want).abs() <= 1e-5 * want.abs(),
                "{prediction}: {} vs {want}",
                snr.value
            );
            assert!(
                weights.iter().any(|w| (w - 1.0).abs() > 1e-3),
                "the weights must matter"
            );
        }
        Ok(())
    }

    /// With a pooled output and size numbers the loss runs SDXL's UNet with them (the tiny
    /// SDXL-structured fixture); without the numbers that UNet refuses.
    #[test]
    fn sdxl_conditioning_reaches_the_unet() -> Result<()> {
        use crate::models::unet::TextTimeInputs;
        use crate::nn::weights::TensorSource;
        use crate::nn::WeightStore;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl/unet");
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let source = TensorSource::safetensors(&dir.join("diffusion_pytorch_model.safetensors"))?;
        let store = WeightStore::from_source(source, DType::F32, Device::Cpu);
        let unet = UNet2DConditionModel::new(Scope::root(&store), &config)?;
        let dev = Device::Cpu;
        let schedule = schedule("epsilon")?;
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
        let conditioning = Conditioning {
            context: Tensor::randn(0f32, 1.0, (2, 5, 24), &dev)?,
            pooled: Some(Tensor::randn(0f32, 1.0, (2, 16), &dev)?),
        };
        let ids = Tensor::new(
            &[
                [800f32, 1200.0, 42.0, 0.0, 768.0, 1024.0],
                [900.0, 600.0, 0.0, 11.0, 1216.0, 832.0],
            ],
            &dev,
        )?;
        let draws = Draws::sample(3, 0, 0, latents.dims(), 1000, 0.0, &dev)?;
        let loss = diffusion_loss(
            &unet,
            &schedule,
            &latents,
            &conditioning,
            Some(&ids),
            &draws,
            None,
        )?;
        let noisy = schedule.add_noise(&latents, &draws.noise, &draws.timesteps)?;
        let target = schedule.target(&latents, &draws.noise, &draws.timesteps)?;
        let added = TextTimeInputs {
            text_embeds: conditioning.pooled.clone().unwrap(),
            time_ids: ids.clone(),
        };
        let pred = unet.forward_with(
            &noisy,
            &draws.timesteps,
            &conditioning.context,
            Some(&added),
            &mut |_, _| Ok(()),
        )?;
        let want = (pred - target)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!(
            (loss.value - want).abs() <= 1e-6 * want.abs(),
            "{} vs {want}",
            loss.value
        );
        // Other size numbers, another loss: they are used.
        let other = (ids.clone() * 0.5)?;
        let moved = diffusion_loss(
            &unet,
            &schedule,
            &latents,
            &conditioning,
            Some(&other),
            &draws,
            None,
        )?;
        assert!((moved.value - loss.value).abs() > 1e-6);
        assert!(diffusion_loss(
            &unet,
            &schedule,
            &latents,
            &conditioning,
            None,
            &draws,
            None
        )
        .is_err());
        Ok(())
    }
}
