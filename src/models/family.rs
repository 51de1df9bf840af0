//! What a model family is, in one place: its name, its text encoder, what its LoRA files and
//! their metadata call it (`ss_base_model_version`, `modelspec.architecture`). The base model's
//! family is detected once, when the model is found ([`super::source::ModelSource::detect`]), and
//! handed on with it; the rules that tell the families apart from a folder's configs or a
//! file's tensor names are here too.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use super::noise::PredictionType;
use crate::error::ModelError;
use crate::Error;

/// The Stable Diffusion family of a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x: OpenAI CLIP text encoder (ViT-L/14, 768 wide for the real models).
    Sd1,
    /// SD 2.x: OpenCLIP text encoder (ViT-H/14, 1024 wide), penultimate layer, linear projections.
    Sd2,
    /// SDXL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with projection), size and
    /// pooled-text conditioning (`addition_embed_type: text_time`).
    Sdxl,
}

impl ModelFamily {
    /// `ss_base_model_version` of a model of this family that predicts `prediction`.
    pub fn base_model_version(self, prediction: PredictionType) -> BaseModelVersion {
        match (self, prediction) {
            (ModelFamily::Sd1, _) => BaseModelVersion::SdV1,
            (ModelFamily::Sd2, PredictionType::VPrediction) => BaseModelVersion::SdV2V,
            (ModelFamily::Sd2, _) => BaseModelVersion::SdV2,
            (ModelFamily::Sdxl, _) => BaseModelVersion::SdxlBase,
        }
    }

    /// How many text encoders the family conditions on (their LoRA prefixes differ when more
    /// than one: kohya's `lora_te1_`, `lora_te2_`).
    pub fn text_encoder_count(self) -> usize {
        match self {
            ModelFamily::Sd1 | ModelFamily::Sd2 => 1,
            ModelFamily::Sdxl => 2,
        }
    }

    /// The side of the square images the family's models were trained at, the `resolution` a
    /// config leaves unset trains at (SD 2.x's 768-v models too: their 512 px training is the
    /// common choice, as in kohya's default).
    pub fn default_resolution(self) -> u32 {
        match self {
            ModelFamily::Sd1 | ModelFamily::Sd2 => 512,
            ModelFamily::Sdxl => 1024,
        }
    }

    /// The cross-attention width of the released models of this family.
    pub fn standard_cross_attention_dim(self) -> usize {
        match self {
            ModelFamily::Sd1 => 768,
            ModelFamily::Sd2 => 1024,
            ModelFamily::Sdxl => 2048,
        }
    }

    /// The text encoder this family conditions on, in words.
    pub fn text_encoder_name(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "OpenAI CLIP text encoder",
            ModelFamily::Sd2 => "OpenCLIP text encoder",
            ModelFamily::Sdxl => "OpenAI CLIP and OpenCLIP bigG text encoders",
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFamily::Sd1 => "SD 1.x",
            ModelFamily::Sd2 => "SD 2.x",
            ModelFamily::Sdxl => "SDXL",
        })
    }
}

/// What a base model's structure says: its family and the width its UNet cross-attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    pub family: ModelFamily,
    pub cross_attention_dim: usize,
}

impl fmt::Display for Architecture {
    /// `SD 1.x` for the real models; `SD 1.x-style, cross-attention width 32` for others.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cross_attention_dim == self.family.standard_cross_attention_dim() {
            write!(f, "{}", self.family)
        } else {
            write!(
                f,
                "{}-style, cross-attention width {}",
                self.family, self.cross_attention_dim
            )
        }
    }
}

/// `ss_base_model_version`: the family and prediction type of the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModelVersion {
    /// SD 1.x (`sd_v1`).
    SdV1,
    /// SD 2.x predicting ε (`sd_v2`, the 512 px models).
    SdV2,
    /// SD 2.x predicting v (`sd_v2_v`, the 768 px models).
    SdV2V,
    /// SDXL (`sdxl_base_v1-0`, what kohya writes for every SDXL base).
    SdxlBase,
}

impl BaseModelVersion {
    /// kohya's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BaseModelVersion::SdV1 => "sd_v1",
            BaseModelVersion::SdV2 => "sd_v2",
            BaseModelVersion::SdV2V => "sd_v2_v",
            BaseModelVersion::SdxlBase => "sdxl_base_v1-0",
        }
    }

    pub fn family(self) -> ModelFamily {
        match self {
            BaseModelVersion::SdV1 => ModelFamily::Sd1,
            BaseModelVersion::SdV2 | BaseModelVersion::SdV2V => ModelFamily::Sd2,
            BaseModelVersion::SdxlBase => ModelFamily::Sdxl,
        }
    }

    /// The ModelSpec architecture of a LoRA for this base.
    pub fn modelspec_architecture(self) -> &'static str {
        match self {
            BaseModelVersion::SdV1 => "stable-diffusion-v1/lora",
            BaseModelVersion::SdV2 => "stable-diffusion-v2-512/lora",
            BaseModelVersion::SdV2V => "stable-diffusion-v2-768-v/lora",
            BaseModelVersion::SdxlBase => "stable-diffusion-xl-v1-base/lora",
        }
    }
}

impl fmt::Display for BaseModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prefix of the UNet's tensors in an original-layout checkpoint.
pub(crate) const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of an SD 2.x (OpenCLIP) text encoder in an original-layout checkpoint.
pub(crate) const LDM_OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
/// Prefix of an SD 1.x (Hugging Face CLIP) text encoder in an original-layout checkpoint.
pub(crate) const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of SDXL's text encoders in Stability's single file (`0.transformer.` = CLIP ViT-L in
/// Hugging Face layout, `1.model.` = OpenCLIP ViT-bigG).
pub(crate) const LDM_SDXL_CONDITIONER: &str = "conditioner.embedders.";
/// SDXL's size and pooled-text embedding in the LDM UNet (diffusers' `add_embedding`).
pub(crate) const LDM_SDXL_LABEL_EMB: &str = "model.diffusion_model.label_emb.";

/// What `base_model` can name, for messages.
pub(crate) const BASE_MODEL_FORMS: &str =
    "expected a diffusers folder (with model_index.json or unet/config.json), \
                        a .safetensors/.ckpt checkpoint, or a hub id such as `org/name`";

/// The architecture a diffusers folder's configs describe (a problem is one of
/// `unet/config.json`'s): `model_index.json` (when present),
/// `unet/config.json` and `text_encoder/config.json` (when present): `gelu` = OpenCLIP = SD 2.x,
/// `quick_gelu` = OpenAI CLIP = SD 1.x; without a text-encoder config, linear transformer
/// projections mean SD 2.x. SDXL: a `text_time` UNet (with `text_encoder_2` in the index).
pub(crate) fn folder_family(
    index: Option<&Map<String, Value>>,
    unet: &Map<String, Value>,
    text: Option<&Map<String, Value>>,
) -> Result<Architecture, NotABaseModel> {
    let sdxl_index = index.is_some_and(|map| {
        map.contains_key("text_encoder_2")
            || map
                .get("_class_name")
                .and_then(Value::as_str)
                .is_some_and(|class| class.contains("XL"))
    });
    let width = match unet.get("cross_attention_dim") {
        Some(Value::Array(items)) => items.first().and_then(Value::as_u64),
        Some(v) => v.as_u64(),
        None => Some(1280), // diffusers' default
    };
    let Some(width) = width.map(|w| w as usize) else {
        return Err(NotABaseModel::InvalidConfig(
            "`cross_attention_dim` is not a positive integer".to_string(),
        ));
    };
    let sdxl_embedding = unet
        .get("addition_embed_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t == "text_time");
    if sdxl_embedding || sdxl_index || width == 2048 {
        if !sdxl_embedding {
            return Err(NotABaseModel::InvalidConfig(format!(
                "the folder is an SDXL pipeline (two text encoders, or cross-attention width \
                 {width}) but its UNet has no `addition_embed_type: \"text_time\"`, the size and \
                 pooled-text conditioning every SDXL UNet has"
            )));
        }
        return Ok(Architecture {
            family: ModelFamily::Sdxl,
            cross_attention_dim: width,
        });
    }
    let activation = text.and_then(|text| {
        let text = match text.get("text_config") {
            Some(Value::Object(inner)) => inner,
            _ => text,
        };
        text.get("hidden_act").and_then(Value::as_str)
    });
    let linear = unet
        .get("use_linear_projection")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let family = match activation {
        Some("gelu") => ModelFamily::Sd2,
        Some(_) => ModelFamily::Sd1,
        None if linear => ModelFamily::Sd2,
        None => ModelFamily::Sd1,
    };
    Ok(Architecture {
        family,
        cross_attention_dim: width,
    })
}

/// Why a file or folder cannot be used as a base model, before it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotABaseModel {
    /// Not a Stable Diffusion checkpoint at all (a LoRA, one diffusers component, ...).
    Unreadable(String),
    /// A Stable Diffusion checkpoint of a kind we do not train (SDXL, ...).
    Unsupported(String),
    /// A config value that cannot be read.
    InvalidConfig(String),
}

impl NotABaseModel {
    /// The error, naming `path`.
    pub(crate) fn at(self, path: &Path) -> Error {
        match self {
            NotABaseModel::Unreadable(reason) => ModelError::Unreadable {
                path: path.to_path_buf(),
                reason,
            },
            NotABaseModel::Unsupported(message) => ModelError::Unsupported {
                origin: path.display().to_string(),
                message,
            },
            NotABaseModel::InvalidConfig(message) => ModelError::InvalidConfig {
                origin: path.display().to_string(),
                message,
            },
        }
        .into()
    }
}

/// The architecture of an original-layout (LDM) checkpoint from its tensor names and shapes:
/// the text encoder's kind (`cond_stage_model.model.` = OpenCLIP = SD 2.x,
/// `cond_stage_model.transformer.` = CLIP = SD 1.x), else the shape of the transformers'
/// `proj_in` (linear = SD 2.x); SDXL by its `conditioner.embedders.` and `label_emb`; the width
/// of `attn2.to_k`.
pub(crate) fn ldm_architecture(
    keys: &[(String, Vec<usize>)],
) -> std::result::Result<Architecture, NotABaseModel> {
    if !keys.iter().any(|(k, _)| k.starts_with(LDM_UNET_PREFIX)) {
        return Err(NotABaseModel::Unreadable(not_an_sd_checkpoint(
            keys.iter().map(|(k, _)| k.as_str()),
        )));
    }
    let has = |prefix: &str| keys.iter().any(|(k, _)| k.starts_with(prefix));
    let conditioner = keys
        .iter()
        .find(|(k, _)| k.starts_with(LDM_SDXL_CONDITIONER));
    let unet = |suffix: &str| {
        keys.iter()
            .find(|(k, _)| k.starts_with(LDM_UNET_PREFIX) && k.ends_with(suffix))
    };
    let width = match unet("attn2.to_k.weight") {
        Some((_, shape)) if shape.len() == 2 => shape[1],
        Some((key, shape)) => {
            return Err(NotABaseModel::Unreadable(format!(
                "`{key}` has shape {shape:?}; a cross-attention key projection is 2-D"
            )))
        }
        None => {
            return Err(NotABaseModel::Unsupported(
                "its UNet has no cross-attention (`attn2.to_k`): not a text-to-image Stable \
                 Diffusion model"
                    .to_string(),
            ))
        }
    };
    let label_emb = has(LDM_SDXL_LABEL_EMB);
    if conditioner.is_some() || label_emb || width == 2048 {
        if !label_emb {
            let evidence = match conditioner {
                Some((key, _)) => format!("it holds SDXL's text encoders (`{key}`)"),
                None => "its UNet cross-attends to 2048-wide text embeddings".to_string(),
            };
            return Err(NotABaseModel::Unsupported(format!(
                "{evidence} as SDXL does, but its UNet has no size conditioning \
                 (`{LDM_SDXL_LABEL_EMB}`): not a Stable Diffusion model this trainer knows"
            )));
        }
        return Ok(Architecture {
            family: ModelFamily::Sdxl,
            cross_attention_dim: width,
        });
    }
    let version = if has(LDM_OPENCLIP_PREFIX) {
        ModelFamily::Sd2
    } else if has(LDM_CLIP_PREFIX) {
        ModelFamily::Sd1
    } else {
        match unet("proj_in.weight") {
            Some((_, shape)) if shape.len() == 2 => ModelFamily::Sd2,
            _ => ModelFamily::Sd1,
        }
    };
    Ok(Architecture {
        family: version,
        cross_attention_dim: width,
    })
}

/// Why a file without `model.diffusion_model.` tensors is not a base model.
pub(crate) fn not_an_sd_checkpoint<'a>(mut keys: impl Iterator<Item = &'a str> + Clone) -> String {
    if keys
        .clone()
        .any(|k| k.starts_with("lora_") || k.contains(".lora_down.") || k.contains(".lora_A."))
    {
        "this is a LoRA file, not a base model; set `base_model` to the Stable Diffusion \
         checkpoint the LoRA was trained on (and `network_weights` to the LoRA to continue it)"
            .to_string()
    } else if keys.any(|k| k.starts_with("down_blocks.") || k.starts_with("conv_in.")) {
        "this is one component of a diffusers model; set base_model to the whole diffusers folder"
            .to_string()
    } else {
        format!(
            "it holds no `{LDM_UNET_PREFIX}` tensors, so it is not a Stable Diffusion checkpoint; \
             {BASE_MODEL_FORMS}"
        )
    }
}
