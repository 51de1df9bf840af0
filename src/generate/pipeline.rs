//! Text to image: encode the prompt and the negative prompt, denoise seeded latent noise with a
//! sampler under classifier-free guidance, decode with the VAE.
//!
//! [`Pipeline`] borrows the models, so the same code serves `generate` (which builds them with
//! the LoRAs of the command line) and the trainer's previews (which passes its own models, their
//! LoRA adapters attached).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::error::GenerateError;
use super::noise::{starting_noise, SeededStepNoise};
use super::samplers::{SamplerKind, StepNoise};
use super::schedule::SamplingSchedule;
use crate::models::conditioning::{Conditioning, TextEncoders};
use crate::models::unet::{TextTimeInputs, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;
use crate::Result;

/// The models a picture is made with.
pub struct Pipeline<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// With their `clip_skip` (A1111's "Clip skip").
    pub text_encoders: &'a TextEncoders,
    pub vae: &'a AutoencoderKL,
    pub schedule: &'a SamplingSchedule,
    /// Where the latents live (the UNet's device).
    pub device: Device,
}

/// What to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    /// The text the model reads (LoRA tags already taken out).
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative prompt is not used.
    pub cfg_scale: f64,
    pub seed: u64,
    pub sampler: SamplerKind,
}

impl Pipeline<'_> {
    /// The side lengths images must be multiples of: 8 (as WebUI and diffusers ask), and the
    /// VAE's downsampling factor.
    pub fn size_multiple(&self) -> usize {
        self.vae.config().downsampling_factor().max(8)
    }

    /// Checks `width` × `height` before any work; the error names the option and the fix.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let m = self.size_multiple();
        for (option, value) in [("--width", width), ("--height", height)] {
            if value == 0 || value % m != 0 {
                let lower = (value / m).max(1) * m;
                return Err(GenerateError::new(
                    option,
                    format!("{value} is not a multiple of {m}; use for example {lower}"),
                )
                .into());
            }
        }
        Ok(())
    }

    /// The conditioning of `text` (context `[1, 77, hidden]`).
    pub fn encode_prompt(&self, text: &str) -> Result<Conditioning> {
        self.text_encoders.encode(&[text], &self.device)
    }

    /// Draws one picture; `on_step(done, total)` is called after every sampler step.
    pub fn generate(
        &self,
        request: &ImageRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<RgbImage> {
        self.check_size(request.width, request.height)?;
        let latents = self.denoise(request, on_step)?;
        self.decode(&latents)
    }

    /// The sampled latents (scaled, as the UNet sees them): `[1, C, h, w]` f32, from the
    /// request's seeded noise.
    pub fn denoise(
        &self,
        request: &ImageRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let f = self.vae.config().downsampling_factor();
        let channels = self.unet.config().in_channels;
        let dims = [1, channels, request.height / f, request.width / f];
        let unit_noise = starting_noise(request.seed, &dims, &self.device)?;
        let mut noise = SeededStepNoise { seed: request.seed };
        self.denoise_from(&unit_noise, request, &mut noise, on_step)
    }

    /// [`Pipeline::denoise`] from given unit-variance starting noise `[1, C, h, w]` and step
    /// noise (the request's seed is not used).
    pub fn denoise_from(
        &self,
        unit_noise: &Tensor,
        request: &ImageRequest,
        noise: &mut dyn StepNoise,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let guided = request.cfg_scale > 1.0;
        let cond = self.encode_prompt(&request.prompt)?;
        let conditioning = if guided {
            // SDXL (the family whose conditioning carries a pooled output) guides away from
            // zeros when there is no negative prompt, as A1111 (`force_zero_negative_prompt`)
            // and diffusers (`force_zeros_for_empty_prompt` in SDXL's model_index.json) do;
            // the size numbers stay.
            let uncond = if request.negative_prompt.is_empty() && cond.pooled.is_some() {
                cond.zeros_like()?
            } else {
                self.encode_prompt(&request.negative_prompt)?
            };
            Conditioning::cat(&[&uncond, &cond])?
        } else {
            cond
        };
        let context = &conditioning.context;
        // SDXL's size conditioning: the picture as asked, uncropped (diffusers' default
        // original_size = target_size, crops (0, 0)).
        let added = match &conditioning.pooled {
            Some(pooled) => {
                let (h, w) = (request.height as f32, request.width as f32);
                let time_ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], &self.device)?
                    .unsqueeze(0)?
                    .broadcast_as((pooled.dim(0)?, 6))?
                    .contiguous()?;
                Some(TextTimeInputs {
                    text_embeds: pooled.clone(),
                    time_ids,
                })
            }
            None => None,
        };
        let unet = |x: &Tensor, t: &Tensor| {
            self.unet
                .forward_with(x, t, context, added.as_ref(), &mut |_, _| Ok(()))
        };

        let mut sampler = request.sampler.build(self.schedule, request.steps)?;
        let mut x = (unit_noise.to_dtype(DType::F32)? * sampler.init_noise_sigma())?;
        let timesteps = sampler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(&x, i)?;
            let t = Tensor::new(&[t as f32], &self.device)?;
            let output = if guided {
                let batch = Tensor::cat(&[&input, &input], 0)?;
                let out = unet(&batch, &t)?.to_dtype(DType::F32)?;
                let uncond = out.get(0)?.unsqueeze(0)?;
                let cond = out.get(1)?.unsqueeze(0)?;
                // uncond + s · (cond − uncond)
                (&uncond + ((cond - &uncond)? * request.cfg_scale)?)?
            } else {
                unet(&input, &t)?.to_dtype(DType::F32)?
            };
            x = sampler.step(i, &output, &x, noise)?;
            on_step(i + 1, timesteps.len());
        }
        Ok(x)
    }

    /// Scaled latents `[1, C, h, w]` → an RGB picture (VAE decode, `[-1, 1]` → 0..=255).
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        to_rgb(&self.decode_latents(latents)?)
    }

    /// Scaled latents `[1, C, h, w]` → the decoded image `[1, 3, H, W]`, about [−1, 1], f32.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.vae.config().unscale_latents(latents)?;
        Ok(self.vae.decode(&z)?.to_dtype(DType::F32)?)
    }
}

/// A decoded image `[1, 3, H, W]` (about [−1, 1]) → 8-bit RGB, rounding as diffusers does.
pub fn to_rgb(image: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(candle_core::Error::Msg(format!(
            "the VAE decoded {c} channels; an RGB picture needs 3"
        ))
        .into());
    }
    let pixels = ((image.get(0)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    RgbImage::from_raw(w as u32, h as u32, pixels).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "cannot make a {w}×{h} picture from the decoded pixels"
        ))
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_values_map_to_bytes_with_clamping_and_rounding() -> Result<()> {
        // Channel-major [1, 3, 1, 2]: pixel 0 = (−1, 0, 1), pixel 1 = (−2, 0.002, 2).
        let t = Tensor::new(&[-1f32, -2.0, 0.0, 0.002, 1.0, 2.0], &Device::Cpu)?
            .reshape((1, 3, 1, 2))?;
        let rgb = to_rgb(&t)?;
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 128, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 128, 255]);
        Ok(())
    }
}
