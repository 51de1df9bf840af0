//! AutoencoderKL: encodes images to latents and decodes them back.
//!
//! Training needs the encoder (images → the latent distribution, sampled with the run's RNG);
//! the decoder turns latents into preview images. Both are built from the resnets, samplers and
//! attention shared with the UNet, with diffusers' module paths (`encoder.down_blocks.0.resnets.0`,
//! `encoder.mid_block.attentions.0.to_q`, `decoder.up_blocks.0.upsamplers.0.conv`, `quant_conv`...).

use candle_core::{DType, Device, Tensor};

use super::attention::SpatialSelfAttention;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::nn::{activation, Conv2d, ConvConfig, GroupNorm, Scope};
use crate::Result;

pub use super::vae_config::VaeConfig;

/// The VAE's normalisation epsilon (fixed in diffusers' Encoder/Decoder).
const EPS: f64 = 1e-6;

/// The encoder's output: a normal distribution per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `[B, latent_channels, h, w]`.
    pub mean: Tensor,
    /// `[B, latent_channels, h, w]`, clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder's `[B, 2·latent, h, w]` output into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let half = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, half)?;
        let logvar = moments.narrow(1, half, half)?.clamp(-30.0, 20.0)?;
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// `mean + std · noise`; `noise` (standard normal, shaped like `mean`) comes from the caller
    /// so that the run's seeded RNG decides it.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (self.std()? * noise.to_dtype(self.mean.dtype())?)?)?)
    }

    /// The most likely latent, `mean`.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

fn resnet_config(in_channels: usize, out_channels: usize, groups: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: EPS,
        output_scale_factor: 1.0,
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, (self-attention), resnet.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialSelfAttention>,
}

impl UNetMidBlock2D {
    /// Reads `resnets.0`, `resnets.1` and, with `attention`, `attentions.0`.
    pub fn new(scope: Scope, channels: usize, groups: usize, attention: bool) -> Result<Self> {
        let rc = resnet_config(channels, channels, groups);
        let resnets = vec![
            ResnetBlock2D::new(scope.pp("resnets").pp(0), rc)?,
            ResnetBlock2D::new(scope.pp("resnets").pp(1), rc)?,
        ];
        let attentions = if attention {
            vec![SpatialSelfAttention::new(
                scope.pp("attentions").pp(0),
                channels,
                groups,
                EPS,
                1.0,
            )?]
        } else {
            Vec::new()
        };
        Ok(UNetMidBlock2D {
            resnets,
            attentions,
        })
    }

    /// `x: [B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attention) = self.attentions.first() {
            h = attention.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets, then (except in the last block) a stride-2
/// convolution with the asymmetric padding.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsamplers: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn new(
        scope: Scope,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        groups: usize,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                ResnetBlock2D::new(
                    scope.pp("resnets").pp(j),
                    resnet_config(
                        if j == 0 { in_channels } else { out_channels },
                        out_channels,
                        groups,
                    ),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let downsamplers = if add_downsample {
            Some(Downsample2D::new(
                scope.pp("downsamplers").pp(0),
                out_channels,
                out_channels,
                0,
            )?)
        } else {
            None
        };
        Ok(DownEncoderBlock2D {
            resnets,
            downsamplers,
        })
    }

    /// `x: [B, in, H, W]` → `[B, out, H/2, W/2]` (or `[B, out, H, W]` for the last block).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        match &self.downsamplers {
            Some(down) => down.forward(&h),
            None => Ok(h),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then (except in the last block) nearest 2× upsampling
/// and a convolution.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsamplers: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(
        scope: Scope,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        groups: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                ResnetBlock2D::new(
                    scope.pp("resnets").pp(j),
                    resnet_config(
                        if j == 0 { in_channels } else { out_channels },
                        out_channels,
                        groups,
                    ),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let upsamplers = if add_upsample {
            Some(Upsample2D::new(
                scope.pp("upsamplers").pp(0),
                out_channels,
                out_channels,
            )?)
        } else {
            None
        };
        Ok(UpDecoderBlock2D {
            resnets,
            upsamplers,
        })
    }

    /// `x: [B, in, H, W]` → `[B, out, 2H, 2W]` (or `[B, out, H, W]` for the last block).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        match &self.upsamplers {
            Some(up) => up.forward(&h, None),
            None => Ok(h),
        }
    }
}

/// diffusers' VAE `Encoder`: image → `[B, 2·latent, h, w]` moments.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(scope: Scope, c: &VaeConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let n = boc.len();
        let same = ConvConfig::same(3);
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channels = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let input_channels = output_channels;
            output_channels = ch;
            let s = scope.pp("down_blocks").pp(i);
            down_blocks.push(DownEncoderBlock2D::new(
                s,
                input_channels,
                ch,
                c.layers_per_block,
                c.norm_num_groups,
                i + 1 < n,
            )?);
        }
        Ok(Encoder {
            conv_in: Conv2d::new(scope.pp("conv_in"), c.in_channels, boc[0], 3, same, true)?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                scope.pp("mid_block"),
                boc[n - 1],
                c.norm_num_groups,
                c.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(
                scope.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[n - 1],
                EPS,
            )?,
            conv_out: Conv2d::new(
                scope.pp("conv_out"),
                boc[n - 1],
                2 * c.latent_channels,
                3,
                same,
                true,
            )?,
        })
    }

    /// `image: [B, in_channels, H, W]` → `[B, 2·latent_channels, H/f, W/f]`.
    pub fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(image)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        let h = activation::silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}

/// diffusers' VAE `Decoder`: latent → image.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(scope: Scope, c: &VaeConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let n = boc.len();
        let same = ConvConfig::same(3);
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channels = boc[n - 1];
        for i in 0..n {
            let prev = output_channels;
            output_channels = boc[n - 1 - i];
            let s = scope.pp("up_blocks").pp(i);
            up_blocks.push(UpDecoderBlock2D::new(
                s,
                prev,
                output_channels,
                c.layers_per_block + 1,
                c.norm_num_groups,
                i + 1 < n,
            )?);
        }
        Ok(Decoder {
            conv_in: Conv2d::new(
                scope.pp("conv_in"),
                c.latent_channels,
                boc[n - 1],
                3,
                same,
                true,
            )?,
            mid_block: UNetMidBlock2D::new(
                scope.pp("mid_block"),
                boc[n - 1],
                c.norm_num_groups,
                c.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                scope.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[0],
                EPS,
            )?,
            conv_out: Conv2d::new(scope.pp("conv_out"), boc[0], c.out_channels, 3, same, true)?,
        })
    }

    /// `z: [B, latent_channels, h, w]` → `[B, out_channels, h·f, w·f]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        let h = activation::silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}

/// Stable Diffusion's VAE (diffusers' `AutoencoderKL`).
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: VaeConfig,
    dtype: DType,
    device: Device,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds encoder, decoder and the 1×1 `quant_conv`/`post_quant_conv` from `scope` (the root
    /// of the VAE's weight store).
    pub fn new(scope: Scope, config: &VaeConfig) -> Result<Self> {
        let l = config.latent_channels;
        let one = ConvConfig::same(1);
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::new(
                scope.pp("quant_conv"),
                2 * l,
                2 * l,
                1,
                one,
                true,
            )?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(
                scope.pp("post_quant_conv"),
                l,
                l,
                1,
                one,
                true,
            )?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            config: config.clone(),
            dtype: scope.store().dtype(),
            device: scope.store().device().clone(),
            encoder: Encoder::new(scope.pp("encoder"), config)?,
            decoder: Decoder::new(scope.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights (the encoder's input is converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `image: [B, 3, H, W]` in [−1, 1] (H, W multiples of the downsampling factor) → the
    /// latent distribution, `[B, latent_channels, H/f, W/f]` each. Unscaled: apply
    /// [`VaeConfig::scale_latents`] to a sample before giving it to the UNet.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(&image.to_dtype(self.dtype)?)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents `[B, latent_channels, h, w]` → image `[B, 3, h·f, w·f]`, about [−1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = latents.to_dtype(self.dtype)?;
        if let Some(conv) = &self.post_quant_conv {
            z = conv.forward(&z)?;
        }
        self.decoder.forward(&z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gaussian_splits_moments_clamps_logvar_and_samples_with_the_callers_noise() -> Result<()> {
        // [1, 4, 1, 1]: mean (1, -1), logvar (ln 4, 50 → clamped to 20).
        let moments =
            Tensor::new(&[1.0f64, -1.0, 4f64.ln(), 50.0], &Device::Cpu)?.reshape((1, 4, 1, 1))?;
        let g = DiagonalGaussian::from_moments(&moments)?;
        assert_eq!(g.mean.flatten_all()?.to_vec1::<f64>()?, vec![1.0, -1.0]);
        assert_eq!(
            g.logvar.flatten_all()?.to_vec1::<f64>()?,
            vec![4f64.ln(), 20.0]
        );
        let noise = Tensor::new(&[0.5f64, 0.0], &Device::Cpu)?.reshape((1, 2, 1, 1))?;
        let z = g.sample(&noise)?.flatten_all()?.to_vec1::<f64>()?;
        assert!((z[0] - 2.0).abs() < 1e-12 && z[1] == -1.0, "{z:?}");
        assert_eq!(g.mode().flatten_all()?.to_vec1::<f64>()?, vec![1.0, -1.0]);
        Ok(())
    }
}
