//! `UNetConfig`: diffusers' `unet/config.json` for UNet2DConditionModel, read with diffusers'
//! defaults and its interpretation of the ambiguous keys, and refused when it asks for a feature
//! our UNet does not implement (class/addition embeddings, dual cross-attention, other block or
//! time-embedding types...).

use std::path::Path;

use serde_json::Value;

use super::config_json::ConfigJson;
use crate::Result;

/// The down block types we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    /// Resnets each followed by a Transformer2DModel.
    CrossAttnDownBlock2D,
    /// Resnets only.
    DownBlock2D,
}

/// The up block types we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    /// Resnets (on the concatenated skip connection) each followed by a Transformer2DModel.
    CrossAttnUpBlock2D,
    /// Resnets only.
    UpBlock2D,
}

/// A validated UNet2DConditionModel config. Per-block lists are expanded to one entry per down
/// block (index `i` = `down_blocks.i`; up block `i` uses entry `n − 1 − i`).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Informational: the latent size the model was trained at, `(height, width)`.
    pub sample_size: Option<(usize, usize)>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Maps the input from [0, 1] to [-1, 1] first (`2x − 1`).
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    /// Padding of the down samplers' stride-2 convolutions (0 = diffusers' asymmetric padding).
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    /// As written in the config. diffusers reads it as the NUMBER OF HEADS of each block (a
    /// historical misnomer), see [`UNetConfig::num_attention_heads`].
    pub attention_head_dim: Vec<usize>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// Width of the time embedding; `None` means `4 · block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// SDXL's added conditioning (`addition_embed_type: "text_time"`); `None` for SD 1.x/2.x.
    pub addition: Option<TextTimeEmbedding>,
}

/// `addition_embed_type: "text_time"`: the pooled text embedding and the sinusoidal features of
/// each size/crop number (`add_time_ids`) are joined and embedded like the timestep
/// (`add_embedding`), and added to the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeEmbedding {
    /// `addition_time_embed_dim`: the sinusoidal features of each time id.
    pub time_ids_dim: usize,
    /// `projection_class_embeddings_input_dim`: pooled text width + time ids × `time_ids_dim`.
    pub input_dim: usize,
}

impl Default for UNetConfig {
    /// diffusers' defaults for every key (an SD1-sized UNet with 1280-wide cross-attention).
    fn default() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        UNetConfig {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                DownBlock2D,
            ],
            up_block_types: vec![
                UpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
            ],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2; 4],
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: vec![1280; 4],
            transformer_layers_per_block: vec![1; 4],
            attention_head_dim: vec![8; 4],
            use_linear_projection: false,
            upcast_attention: false,
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            addition: None,
        }
    }
}

impl UNetConfig {
    /// Reads `unet/config.json`.
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

    /// The number of attention heads of each down block's transformers. diffusers
    /// (unet_2d_condition.py) sets `num_attention_heads = num_attention_heads or
    /// attention_head_dim` and refuses a non-null `num_attention_heads`, so this is
    /// `attention_head_dim`; the head width is `block_out_channels[i] / heads[i]`. The mid block
    /// uses the last entry; up block `i` uses the reversed list.
    pub fn num_attention_heads(&self) -> &[usize] {
        &self.attention_head_dim
    }

    /// Width of the time embedding that every resnet receives.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels[0])
    }

    fn read(c: &mut ConfigJson) -> Result<Self> {
        if let Some(name) = c.peek("_class_name").and_then(Value::as_str) {
            if name != "UNet2DConditionModel" {
                return Err(c.error("_class_name", format!("\"{name}\" is not a UNet2DConditionModel config; point the model path at the `unet/` folder of a Stable Diffusion 1.x/2.x model")));
            }
        }
        let addition = text_time_embedding(c)?;
        refuse_unsupported(c, addition.is_some())?;

        let down_names = c.strings(
            "down_block_types",
            &[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
        )?;
        let up_names = c.strings(
            "up_block_types",
            &[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
        )?;
        let down_block_types = down_names
            .iter()
            .map(|n| match n.strip_prefix("UNetRes").unwrap_or(n) {
                "CrossAttnDownBlock2D" => Ok(DownBlockType::CrossAttnDownBlock2D),
                "DownBlock2D" => Ok(DownBlockType::DownBlock2D),
                other => Err(c.error("down_block_types", format!("the block type \"{other}\" is not supported (only CrossAttnDownBlock2D and DownBlock2D)"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = up_names
            .iter()
            .map(|n| match n.strip_prefix("UNetRes").unwrap_or(n) {
                "CrossAttnUpBlock2D" => Ok(UpBlockType::CrossAttnUpBlock2D),
                "UpBlock2D" => Ok(UpBlockType::UpBlock2D),
                other => Err(c.error("up_block_types", format!("the block type \"{other}\" is not supported (only CrossAttnUpBlock2D and UpBlock2D)"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let n = down_block_types.len();
        if n == 0 {
            return Err(c.error(
                "down_block_types",
                "is empty; a UNet needs at least one block",
            ));
        }
        if up_block_types.len() != n {
            return Err(c.error(
                "up_block_types",
                format!(
                    "has {} entries but `down_block_types` has {n}; they must match",
                    up_block_types.len()
                ),
            ));
        }
        let block_out_channels = c.usizes("block_out_channels", &[320, 640, 1280, 1280])?;
        if block_out_channels.len() != n {
            return Err(c.error(
                "block_out_channels",
                format!(
                    "has {} entries but `down_block_types` has {n}; they must match",
                    block_out_channels.len()
                ),
            ));
        }
        if let Some(Value::Array(items)) = c.peek("transformer_layers_per_block") {
            if items.iter().any(Value::is_array) {
                return Err(c.error("transformer_layers_per_block", "per-layer nested lists (asymmetric UNets such as the SDXL refiner) are not supported"));
            }
        }
        let transformer_layers_per_block =
            c.usize_per_block("transformer_layers_per_block", 1, n)?;
        let layers_per_block = c.usize_per_block("layers_per_block", 2, n)?;
        let cross_attention_dim = c.usize_per_block("cross_attention_dim", 1280, n)?;
        let attention_head_dim = c.usize_per_block("attention_head_dim", 8, n)?;
        let norm_num_groups = match c.peek("norm_num_groups") {
            Some(Value::Null) => {
                return Err(c.error(
                    "norm_num_groups",
                    "null (no output group norm) is not supported",
                ))
            }
            _ => c.usize("norm_num_groups", 32)?,
        };
        let sample_size = match c.peek("sample_size").cloned() {
            None | Some(Value::Null) => {
                c.ignore("sample_size");
                None
            }
            Some(Value::Array(_)) => match c.usizes("sample_size", &[])?.as_slice() {
                [h, w] => Some((*h, *w)),
                other => {
                    return Err(c.error(
                        "sample_size",
                        format!("expected an integer or [height, width], found {other:?}"),
                    ))
                }
            },
            Some(_) => {
                let s = c.usize("sample_size", 0)?;
                Some((s, s))
            }
        };
        let act_fn = c.string("act_fn", "silu")?;
        if act_fn != "silu" && act_fn != "swish" {
            return Err(c.error(
                "act_fn",
                format!("\"{act_fn}\" is not supported (only \"silu\")"),
            ));
        }
        let config = UNetConfig {
            sample_size,
            in_channels: c.usize("in_channels", 4)?,
            out_channels: c.usize("out_channels", 4)?,
            center_input_sample: c.bool("center_input_sample", false)?,
            flip_sin_to_cos: c.bool("flip_sin_to_cos", true)?,
            freq_shift: c.f64("freq_shift", 0.0)?,
            down_block_types,
            up_block_types,
            block_out_channels,
            layers_per_block,
            downsample_padding: c.usize("downsample_padding", 1)?,
            mid_block_scale_factor: c.f64("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: c.f64("norm_eps", 1e-5)?,
            cross_attention_dim,
            transformer_layers_per_block,
            attention_head_dim,
            use_linear_projection: c.bool("use_linear_projection", false)?,
            upcast_attention: c.bool("upcast_attention", false)?,
            time_embedding_dim: c.opt_usize("time_embedding_dim")?,
            conv_in_kernel: c.usize("conv_in_kernel", 3)?,
            conv_out_kernel: c.usize("conv_out_kernel", 3)?,
            addition,
        };
        config.validate(c)?;
        Ok(config)
    }

    fn validate(&self, c: &ConfigJson) -> Result<()> {
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err(c.error("norm_num_groups", "must be at least 1"));
        }
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if ch == 0 || ch % groups != 0 {
                return Err(c.error("block_out_channels", format!("block {i} has {ch} channels, which `norm_num_groups` = {groups} does not divide")));
            }
        }
        let n = self.block_out_channels.len();
        let uses_attention = |i: usize| {
            self.down_block_types[i] == DownBlockType::CrossAttnDownBlock2D
                || self.up_block_types[n - 1 - i] == UpBlockType::CrossAttnUpBlock2D
                || i == n - 1 // the mid block uses the last entry
        };
        for (i, (&ch, &heads)) in self
            .block_out_channels
            .iter()
            .zip(&self.attention_head_dim)
            .enumerate()
        {
            if uses_attention(i) && (heads == 0 || ch % heads != 0) {
                return Err(c.error(
                    "attention_head_dim",
                    format!("block {i}: diffusers reads {heads} as the number of heads, which does not divide its {ch} channels"),
                ));
            }
        }
        for (key, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel % 2 == 0 {
                return Err(c.error(
                    key,
                    format!("{kernel}: only odd kernel sizes keep the image size"),
                ));
            }
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if v == 0 {
                return Err(c.error(key, "must be at least 1"));
            }
        }
        if self.layers_per_block.contains(&0) {
            return Err(c.error("layers_per_block", "must be at least 1 for every block"));
        }
        Ok(())
    }
}

/// Keys whose non-default values switch on features our UNet does not implement.
/// SDXL's `addition_embed_type: "text_time"` with the two widths it needs; `None` when the key
/// is absent or null (its other values are refused).
fn text_time_embedding(c: &mut ConfigJson) -> Result<Option<TextTimeEmbedding>> {
    if !matches!(c.peek("addition_embed_type"), Some(Value::String(_))) {
        return Ok(None);
    }
    let kind = c.string("addition_embed_type", "")?;
    if kind != "text_time" {
        return Err(c.error(
            "addition_embed_type",
            format!("\"{kind}\" is not supported (null, or \"text_time\" as in SDXL)"),
        ));
    }
    let mut need = |key: &str| -> Result<usize> {
        match c.opt_usize(key)? {
            Some(n) if n > 0 => Ok(n),
            _ => Err(c.error(
                key,
                "must be a positive integer with `addition_embed_type: \"text_time\"`",
            )),
        }
    };
    Ok(Some(TextTimeEmbedding {
        time_ids_dim: need("addition_time_embed_dim")?,
        input_dim: need("projection_class_embeddings_input_dim")?,
    }))
}

/// Refuses every key whose value asks for a feature we do not build; `text_time`: SDXL's added
/// conditioning was read, so its keys are allowed.
fn refuse_unsupported(c: &mut ConfigJson, text_time: bool) -> Result<()> {
    let null = Value::is_null;
    let is_false = |v: &Value| v == &Value::Bool(false);
    let all_false = |v: &Value| match v {
        Value::Bool(b) => !b,
        Value::Array(items) => items.iter().all(|i| i == &Value::Bool(false)),
        _ => false,
    };
    let is_str = |s: &'static str| move |v: &Value| v.as_str() == Some(s);
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    if c.peek("num_attention_heads").is_some_and(|v| !v.is_null()) {
        return Err(c.error(
            "num_attention_heads",
            format!(
                "{} is refused (diffusers itself refuses a non-null value: it takes the number of heads from `attention_head_dim`); remove the key and put the heads in `attention_head_dim`",
                c.peek("num_attention_heads").cloned().unwrap_or(Value::Null)
            ),
        ));
    }
    c.ignore("num_attention_heads");
    c.require(
        "mid_block_type",
        "\"UNetMidBlock2DCrossAttn\"",
        is_str("UNetMidBlock2DCrossAttn"),
    )?;
    c.require("only_cross_attention", "false", all_false)?;
    c.require("mid_block_only_cross_attention", "null or false", |v| {
        v.is_null() || is_false(v)
    })?;
    c.require("dual_cross_attention", "false", is_false)?;
    c.require("dropout", "0", zero)?;
    c.require("class_embed_type", "null", null)?;
    c.require("num_class_embeds", "null", null)?;
    c.require("class_embeddings_concat", "false", is_false)?;
    if !text_time {
        c.require("projection_class_embeddings_input_dim", "null", null)?;
        c.require("addition_embed_type", "null or \"text_time\"", null)?;
        c.require("addition_time_embed_dim", "null", null)?;
    }
    c.require("encoder_hid_dim", "null", null)?;
    c.require("encoder_hid_dim_type", "null", null)?;
    c.require("reverse_transformer_layers_per_block", "null", null)?;
    c.require("resnet_time_scale_shift", "\"default\"", is_str("default"))?;
    c.require(
        "time_embedding_type",
        "\"positional\"",
        is_str("positional"),
    )?;
    c.require("time_embedding_act_fn", "null", null)?;
    c.require("timestep_post_act", "null", null)?;
    c.require("time_cond_proj_dim", "null", null)?;
    c.require("attention_type", "\"default\"", is_str("default"))?;
    c.require("cross_attention_norm", "null", null)?;
    // Only read by block types we refuse (ResnetDownsampleBlock2D, SimpleCrossAttn*) or by the
    // addition embedding we refuse: they cannot change the model we build.
    c.ignore("resnet_skip_time_act");
    c.ignore("resnet_out_scale_factor");
    c.ignore("addition_embed_type_num_heads");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults() -> Result<()> {
        let c = UNetConfig::from_json_str("{}", "empty")?;
        assert_eq!(c, UNetConfig::default());
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.num_attention_heads(), &[8, 8, 8, 8]);
        assert_eq!(c.cross_attention_dim, vec![1280; 4]);
        assert_eq!(c.time_embed_dim(), 1280);
        assert!(c.flip_sin_to_cos && !c.use_linear_projection);
        assert_eq!(c.down_block_types[3], DownBlockType::DownBlock2D);
        assert_eq!(c.up_block_types[0], UpBlockType::UpBlock2D);
        Ok(())
    }

    #[test]
    fn reads_an_sd2_style_config() -> Result<()> {
        let text = r#"{
            "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.8.0",
            "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false, "cross_attention_dim": 1024,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
            "sample_size": 96, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "upcast_attention": true, "use_linear_projection": true, "class_embed_type": null,
            "num_attention_heads": null, "some_future_flag": false
        }"#;
        let c = UNetConfig::from_json_str(text, "unet/config.json")?;
        assert_eq!(c.num_attention_heads(), &[5, 10, 20, 20]);
        assert_eq!(c.cross_attention_dim, vec![1024; 4]);
        assert_eq!(c.sample_size, Some((96, 96)));
        assert!(c.upcast_attention && c.use_linear_projection);
        assert_eq!(c.addition, None);
        Ok(())
    }

    #[test]
    fn reads_sdxl_added_conditioning() -> Result<()> {
        let text = r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "addition_embed_type_num_heads": 64,
            "transformer_layers_per_block": [1, 2, 10], "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
            "use_linear_projection": true}"#;
        let c = UNetConfig::from_json_str(text, "unet/config.json")?;
        assert_eq!(
            c.addition,
            Some(TextTimeEmbedding {
                time_ids_dim: 256,
                input_dim: 2816
            })
        );
        assert_eq!(c.transformer_layers_per_block, vec![1, 2, 10]);
        Ok(())
    }

    #[test]
    fn unsupported_features_name_the_key_and_value() {
        let cases = [
            (
                r#"{"class_embed_type": "timestep"}"#,
                "class_embed_type",
                "timestep",
            ),
            (
                r#"{"addition_embed_type": "image"}"#,
                "addition_embed_type",
                "image",
            ),
            (
                r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256}"#,
                "projection_class_embeddings_input_dim",
                "positive integer",
            ),
            (
                r#"{"addition_time_embed_dim": 256}"#,
                "addition_time_embed_dim",
                "256",
            ),
            (
                r#"{"time_embedding_type": "fourier"}"#,
                "time_embedding_type",
                "fourier",
            ),
            (
                r#"{"dual_cross_attention": true}"#,
                "dual_cross_attention",
                "true",
            ),
            (r#"{"num_attention_heads": 8}"#, "num_attention_heads", "8"),
            (
                r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
                "down_block_types",
                "AttnDownBlock2D",
            ),
            (
                r#"{"transformer_layers_per_block": [[1, 2], [1, 2], [1, 2], [1, 2]]}"#,
                "transformer_layers_per_block",
                "nested",
            ),
            (
                r#"{"attention_head_dim": [8, 8]}"#,
                "attention_head_dim",
                "2 entries",
            ),
            (r#"{"attention_head_dim": 7}"#, "attention_head_dim", "7"),
            (r#"{"act_fn": "gelu"}"#, "act_fn", "gelu"),
            (r#"{"mystery": 3}"#, "mystery", "3"),
        ];
        for (text, key, value) in cases {
            let err = UNetConfig::from_json_str(text, "unet/config.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("unet/config.json") && err.contains(key) && err.contains(value),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = UNetConfig::from_file(Path::new("/nonexistent/unet/config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/unet/config.json"), "{err}");
    }
}
