//! The VAE of an LDM checkpoint (`first_stage_model.*`, or a standalone VAE file such as
//! `vae-ft-mse-840000-ema-pruned.safetensors`): LDM → diffusers key conversion and a diffusers
//! config inferred from the tensor shapes.
//!
//! `encoder.down.i.block.j` ↔ `encoder.down_blocks.i.resnets.j`, `decoder.up.(N−1−i)` ↔
//! `decoder.up_blocks.i` (LDM numbers the decoder's levels from the bottom), `mid.block_1/2` ↔
//! `mid_block.resnets.0/1`, `mid.attn_1.{norm,q,k,v,proj_out}` ↔
//! `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (1×1 convolution weights read
//! as linear weights through a reshape), `nin_shortcut` ↔ `conv_shortcut`, `norm_out` ↔
//! `conv_norm_out`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::MappedKey;
use crate::nn::weights::Transform;

fn index_and_rest(text: &str) -> Option<(usize, &str)> {
    let (index, rest) = text.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// The LDM VAE's tensors (prefix removed) with their shapes.
pub(crate) struct LdmVae {
    shapes: BTreeMap<String, Vec<usize>>,
    /// The number of decoder levels (`decoder.up.N`).
    decoder_levels: usize,
}

impl LdmVae {
    pub(crate) fn new(keys: &[(String, Vec<usize>)]) -> Self {
        let decoder_levels = keys
            .iter()
            .filter_map(|(k, _)| k.strip_prefix("decoder.up."))
            .filter_map(|k| index_and_rest(k).map(|(i, _)| i + 1))
            .max()
            .unwrap_or(0);
        LdmVae {
            shapes: keys.iter().cloned().collect(),
            decoder_levels,
        }
    }

    /// The diffusers key of every tensor; `Err` names a key that fits nowhere.
    pub(crate) fn map_keys(&self, prefix: &str) -> Result<Vec<MappedKey>, String> {
        self.shapes
            .iter()
            .map(|(key, shape)| {
                let bad = || format!("`{prefix}{key}` is not a tensor of a Stable Diffusion VAE");
                let target = self.diffusers_key(key).ok_or_else(bad)?;
                let mut mapped = MappedKey::new(target, format!("{prefix}{key}"));
                let is_attention_weight = key.contains(".mid.attn_1.")
                    && !key.contains(".norm.")
                    && key.ends_with(".weight");
                if is_attention_weight {
                    if let [out, inp, 1, 1] = shape.as_slice() {
                        mapped.transform = Transform::Reshape(vec![*out, *inp]);
                    }
                }
                Ok(mapped)
            })
            .collect()
    }

    fn diffusers_key(&self, key: &str) -> Option<String> {
        for same in ["quant_conv.", "post_quant_conv."] {
            if key.starts_with(same) {
                return Some(key.to_string());
            }
        }
        let (half, rest) = key.split_once('.')?;
        if half != "encoder" && half != "decoder" {
            return None;
        }
        let inner = if let Some(p) = rest.strip_prefix("norm_out.") {
            format!("conv_norm_out.{p}")
        } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
            rest.to_string()
        } else if let Some(p) = rest.strip_prefix("mid.") {
            mid_key(p)?
        } else if let Some(p) = rest.strip_prefix("down.").filter(|_| half == "encoder") {
            let (i, p) = index_and_rest(p)?;
            level_key("down_blocks", i, p, "downsample", "downsamplers")?
        } else if let Some(p) = rest.strip_prefix("up.").filter(|_| half == "decoder") {
            let (i, p) = index_and_rest(p)?;
            let level = self.decoder_levels.checked_sub(i + 1)?;
            level_key("up_blocks", level, p, "upsample", "upsamplers")?
        } else {
            return None;
        };
        Some(format!("{half}.{inner}"))
    }

    fn shape(&self, key: &str) -> Result<&[usize], String> {
        self.shapes
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("the VAE has no `{key}`, which every SD VAE has"))
    }

    /// A diffusers `vae/config.json` from the shapes; `scaling_factor` comes from elsewhere
    /// (the yaml's `scale_factor`, or SD's 0.18215).
    pub(crate) fn infer_config(&self, scaling_factor: f64) -> Result<Value, String> {
        let conv_in = self.shape("encoder.conv_in.weight")?;
        let levels: BTreeSet<usize> = self
            .shapes
            .keys()
            .filter_map(|k| k.strip_prefix("encoder.down."))
            .filter_map(|k| index_and_rest(k).map(|(i, _)| i))
            .collect();
        if levels.is_empty() || levels.len() != levels.last().map_or(0, |l| l + 1) {
            return Err(format!(
                "the VAE encoder's levels are {levels:?}; expected 0, 1, ... without gaps"
            ));
        }
        let mut channels = Vec::new();
        for i in &levels {
            channels.push(self.shape(&format!("encoder.down.{i}.block.0.conv1.weight"))?[0]);
        }
        let layers: BTreeSet<usize> = self
            .shapes
            .keys()
            .filter_map(|k| k.strip_prefix("encoder.down.0.block."))
            .filter_map(|k| index_and_rest(k).map(|(j, _)| j + 1))
            .collect();
        let layers_per_block = layers.last().copied().unwrap_or(0);
        let z2 = self.shape("encoder.conv_out.weight")?[0];
        let latent = z2 / 2;
        if let Some(quant) = self.shapes.get("quant_conv.weight") {
            if quant.first() != Some(&z2) {
                return Err(format!(
                    "`quant_conv.weight` has shape {quant:?} but the encoder gives {z2} channels; \
                     diffusers' AutoencoderKL needs them equal"
                ));
            }
        }
        Ok(json!({
            "in_channels": conv_in.get(1).copied().unwrap_or(0),
            "out_channels": self.shape("decoder.conv_out.weight")?[0],
            "down_block_types": vec!["DownEncoderBlock2D"; channels.len()],
            "up_block_types": vec!["UpDecoderBlock2D"; channels.len()],
            "block_out_channels": channels,
            "layers_per_block": layers_per_block,
            "latent_channels": latent,
            "norm_num_groups": 32,
            "scaling_factor": scaling_factor,
            "use_quant_conv": self.shapes.contains_key("quant_conv.weight"),
            "use_post_quant_conv": self.shapes.contains_key("post_quant_conv.weight"),
            "mid_block_add_attention": self.shapes.contains_key("encoder.mid.attn_1.q.weight"),
        }))
    }
}

/// `block.j.*` / `<sampler>.conv.*` of one level.
fn level_key(
    kind: &str,
    level: usize,
    rest: &str,
    ldm_sampler: &str,
    sampler: &str,
) -> Option<String> {
    if let Some(p) = rest.strip_prefix("block.") {
        let (j, p) = index_and_rest(p)?;
        return Some(format!("{kind}.{level}.resnets.{j}.{}", resnet_key(p)?));
    }
    let p = rest.strip_prefix(ldm_sampler)?.strip_prefix(".conv.")?;
    Some(format!("{kind}.{level}.{sampler}.0.conv.{p}"))
}

fn resnet_key(rest: &str) -> Option<String> {
    if let Some(p) = rest.strip_prefix("nin_shortcut.") {
        return Some(format!("conv_shortcut.{p}"));
    }
    ["norm1.", "conv1.", "norm2.", "conv2."]
        .iter()
        .any(|n| rest.starts_with(n))
        .then(|| rest.to_string())
}

fn mid_key(rest: &str) -> Option<String> {
    if let Some(p) = rest.strip_prefix("block_1.") {
        return Some(format!("mid_block.resnets.0.{}", resnet_key(p)?));
    }
    if let Some(p) = rest.strip_prefix("block_2.") {
        return Some(format!("mid_block.resnets.1.{}", resnet_key(p)?));
    }
    let p = rest.strip_prefix("attn_1.")?;
    let (module, param) = p.split_once('.')?;
    let ours = match module {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        _ => return None,
    };
    Some(format!("mid_block.attentions.0.{ours}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<(String, Vec<usize>)> {
        [
            ("encoder.conv_in.weight", vec![32, 3, 3, 3]),
            ("encoder.down.0.block.0.conv1.weight", vec![32, 32, 3, 3]),
            ("encoder.down.0.block.1.conv1.weight", vec![32, 32, 3, 3]),
            ("encoder.down.0.downsample.conv.weight", vec![32, 32, 3, 3]),
            ("encoder.down.1.block.0.conv1.weight", vec![64, 32, 3, 3]),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                vec![64, 32, 1, 1],
            ),
            ("encoder.mid.attn_1.q.weight", vec![64, 64, 1, 1]),
            ("encoder.mid.attn_1.q.bias", vec![64]),
            ("encoder.mid.attn_1.norm.weight", vec![64]),
            ("encoder.mid.block_2.norm1.weight", vec![64]),
            ("encoder.norm_out.weight", vec![64]),
            ("encoder.conv_out.weight", vec![8, 64, 3, 3]),
            ("quant_conv.weight", vec![8, 8, 1, 1]),
            ("post_quant_conv.weight", vec![4, 4, 1, 1]),
            ("decoder.up.0.block.2.conv2.weight", vec![32, 32, 3, 3]),
            ("decoder.up.1.upsample.conv.weight", vec![64, 64, 3, 3]),
            ("decoder.mid.attn_1.proj_out.weight", vec![64, 64, 1, 1]),
            ("decoder.conv_out.weight", vec![3, 32, 3, 3]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), s))
        .collect()
    }

    #[test]
    fn converts_keys_and_reshapes_attention_weights() {
        let vae = LdmVae::new(&keys());
        let mapped: BTreeMap<String, MappedKey> = vae
            .map_keys("first_stage_model.")
            .unwrap()
            .into_iter()
            .map(|m| {
                (
                    m.file_key
                        .trim_start_matches("first_stage_model.")
                        .to_string(),
                    m,
                )
            })
            .collect();
        let target = |k: &str| mapped[k].target.clone();
        assert_eq!(
            target("encoder.down.0.downsample.conv.weight"),
            "encoder.down_blocks.0.downsamplers.0.conv.weight"
        );
        assert_eq!(
            target("encoder.down.1.block.0.nin_shortcut.weight"),
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            target("encoder.mid.attn_1.norm.weight"),
            "encoder.mid_block.attentions.0.group_norm.weight"
        );
        assert_eq!(
            target("encoder.mid.block_2.norm1.weight"),
            "encoder.mid_block.resnets.1.norm1.weight"
        );
        assert_eq!(
            target("encoder.norm_out.weight"),
            "encoder.conv_norm_out.weight"
        );
        // LDM numbers decoder levels from the bottom.
        assert_eq!(
            target("decoder.up.0.block.2.conv2.weight"),
            "decoder.up_blocks.1.resnets.2.conv2.weight"
        );
        assert_eq!(
            target("decoder.up.1.upsample.conv.weight"),
            "decoder.up_blocks.0.upsamplers.0.conv.weight"
        );
        assert_eq!(
            target("decoder.mid.attn_1.proj_out.weight"),
            "decoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            mapped["encoder.mid.attn_1.q.weight"].transform,
            Transform::Reshape(vec![64, 64])
        );
        assert_eq!(
            mapped["encoder.mid.attn_1.q.bias"].transform,
            Transform::None
        );
        assert_eq!(
            mapped["encoder.mid.attn_1.norm.weight"].transform,
            Transform::None
        );
    }

    #[test]
    fn infers_the_config_and_names_strangers() {
        let vae = LdmVae::new(&keys());
        let config = vae.infer_config(0.5).unwrap();
        assert_eq!(config["block_out_channels"], json!([32, 64]));
        assert_eq!(config["layers_per_block"], json!(2));
        assert_eq!(config["latent_channels"], json!(4));
        assert_eq!(config["scaling_factor"], json!(0.5));
        assert_eq!(config["mid_block_add_attention"], json!(true));
        let mut strange = keys();
        strange.push(("loss.discriminator.main.0.weight".into(), vec![1]));
        let err = LdmVae::new(&strange).map_keys("vae/").unwrap_err();
        assert!(
            err.contains("vae/loss.discriminator.main.0.weight"),
            "{err}"
        );
    }
}
