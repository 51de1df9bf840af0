//! `VaeConfig`: diffusers' `vae/config.json` for AutoencoderKL, with diffusers' defaults, and
//! the latent scaling (`scaling_factor`, `shift_factor`) the training loop applies.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::config_json::ConfigJson;
use crate::Result;

/// A validated AutoencoderKL config.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// One entry per block; every block is a `DownEncoderBlock2D` / `UpDecoderBlock2D`.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Informational: the image size the VAE was trained at.
    pub sample_size: Option<usize>,
    /// Latents given to the UNet are `(z − shift_factor) · scaling_factor`.
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    /// Informational: diffusers runs this VAE in f32 even in half-precision pipelines.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' defaults for every key.
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Reads `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut c = ConfigJson::from_file(path)?;
        let config = Self::read(&mut c)?;
        c.finish()?;
        Ok(config)
    }

    /// Parses a config given as JSON text; `origin` names it in error messages.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let mut c = ConfigJson::from_str(text, origin)?;
        let config = Self::read(&mut c)?;
        c.finish()?;
        Ok(config)
    }

    /// How much smaller the latent is than the image: `2^(blocks − 1)` (8 for SD).
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// VAE latents → the UNet's latents: `(z − shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.shift_factor.unwrap_or(0.0);
        Ok(z.affine(self.scaling_factor, -shift * self.scaling_factor)?)
    }

    /// The inverse of [`VaeConfig::scale_latents`]: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.affine(1.0 / self.scaling_factor, self.shift_factor.unwrap_or(0.0))?)
    }

    fn read(c: &mut ConfigJson) -> Result<Self> {
        if let Some(name) = c.peek("_class_name").and_then(Value::as_str) {
            if name != "AutoencoderKL" {
                return Err(c.error("_class_name", format!("\"{name}\" is not an AutoencoderKL config; point the model path at the `vae/` folder of a Stable Diffusion 1.x/2.x model")));
            }
        }
        let block_out_channels = c.usizes("block_out_channels", &[64])?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(c.error(
                "block_out_channels",
                "is empty; the VAE needs at least one block",
            ));
        }
        for (key, expected) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let types = c.strings(key, &vec![expected; n])?;
            if types.len() != n {
                return Err(c.error(
                    key,
                    format!(
                        "has {} entries but `block_out_channels` has {n}; they must match",
                        types.len()
                    ),
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != expected) {
                return Err(c.error(
                    key,
                    format!("the block type \"{other}\" is not supported (only {expected})"),
                ));
            }
        }
        let act_fn = c.string("act_fn", "silu")?;
        if act_fn != "silu" && act_fn != "swish" {
            return Err(c.error(
                "act_fn",
                format!("\"{act_fn}\" is not supported (only \"silu\")"),
            ));
        }
        c.require(
            "latents_mean",
            "null (no per-channel latent normalisation)",
            Value::is_null,
        )?;
        c.require(
            "latents_std",
            "null (no per-channel latent normalisation)",
            Value::is_null,
        )?;
        let sample_size = match c.peek("sample_size") {
            Some(Value::Array(_)) => c.usizes("sample_size", &[])?.first().copied(),
            None => Some(32),
            _ => c.opt_usize("sample_size")?,
        };
        let config = VaeConfig {
            in_channels: c.usize("in_channels", 3)?,
            out_channels: c.usize("out_channels", 3)?,
            block_out_channels,
            layers_per_block: c.usize("layers_per_block", 1)?,
            latent_channels: c.usize("latent_channels", 4)?,
            norm_num_groups: c.usize("norm_num_groups", 32)?,
            sample_size,
            scaling_factor: c.f64("scaling_factor", 0.18215)?,
            shift_factor: c.opt_f64("shift_factor")?,
            force_upcast: c.bool("force_upcast", true)?,
            use_quant_conv: c.bool("use_quant_conv", true)?,
            use_post_quant_conv: c.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: c.bool("mid_block_add_attention", true)?,
        };
        let groups = config.norm_num_groups;
        if groups == 0 {
            return Err(c.error("norm_num_groups", "must be at least 1"));
        }
        if let Some((i, ch)) = config
            .block_out_channels
            .iter()
            .enumerate()
            .find(|(_, &ch)| ch == 0 || ch % groups != 0)
        {
            return Err(c.error("block_out_channels", format!("block {i} has {ch} channels, which `norm_num_groups` = {groups} does not divide")));
        }
        if config.scaling_factor == 0.0 || !config.scaling_factor.is_finite() {
            return Err(c.error(
                "scaling_factor",
                format!(
                    "{} cannot scale latents; it must be a finite non-zero number",
                    config.scaling_factor
                ),
            ));
        }
        if config.layers_per_block == 0 || config.latent_channels == 0 {
            return Err(c.error(
                "layers_per_block",
                "`layers_per_block` and `latent_channels` must be at least 1",
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reads_the_sd_vae_config_and_scales_latents() -> Result<()> {
        let text = r#"{
            "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }"#;
        let c = VaeConfig::from_json_str(text, "vae/config.json")?;
        assert_eq!(c.downsampling_factor(), 8);
        assert_eq!(c.scaling_factor, 0.18215);
        assert_eq!(c.shift_factor, None);
        let z = Tensor::new(&[1.0f64, -2.0], &Device::Cpu)?;
        let shifted = VaeConfig {
            scaling_factor: 0.5,
            shift_factor: Some(0.25),
            ..c
        };
        let scaled = shifted.scale_latents(&z)?;
        assert_eq!(scaled.to_vec1::<f64>()?, vec![0.375, -1.125]);
        assert_eq!(
            shifted.unscale_latents(&scaled)?.to_vec1::<f64>()?,
            vec![1.0, -2.0]
        );
        assert_eq!(
            VaeConfig::from_json_str("{}", "empty")?,
            VaeConfig::default()
        );
        Ok(())
    }

    #[test]
    fn unsupported_vae_features_name_the_key() {
        let cases = [
            (r#"{"latents_mean": [0.1, 0.2, 0.3, 0.4]}"#, "latents_mean"),
            (
                r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#,
                "AttnDownEncoderBlock2D",
            ),
            (r#"{"block_out_channels": [64, 48]}"#, "48"),
            (r#"{"_class_name": "AutoencoderTiny"}"#, "AutoencoderTiny"),
        ];
        for (text, needle) in cases {
            let err = VaeConfig::from_json_str(text, "vae/config.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("vae/config.json") && err.contains(needle),
                "{text}: {err}"
            );
        }
    }
}
