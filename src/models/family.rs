//! What a model family is, in one place: its name, its text encoder, what its LoRA files and
//! their metadata call it (`ss_base_model_version`, `modelspec.architecture`). The base model's
//! family is detected once, when the model is found ([`super::source::ModelSource::detect`]), and
//! handed on with it.

use std::fmt;

use super::noise::PredictionType;

/// The Stable Diffusion family of a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x: OpenAI CLIP text encoder (ViT-L/14, 768 wide for the real models).
    Sd1,
    /// SD 2.x: OpenCLIP text encoder (ViT-H/14, 1024 wide), penultimate layer, linear projections.
    Sd2,
}

impl ModelFamily {
    /// `ss_base_model_version` of a model of this family that predicts `prediction`.
    pub fn base_model_version(self, prediction: PredictionType) -> BaseModelVersion {
        match (self, prediction) {
            (ModelFamily::Sd1, _) => BaseModelVersion::SdV1,
            (ModelFamily::Sd2, PredictionType::VPrediction) => BaseModelVersion::SdV2V,
            (ModelFamily::Sd2, _) => BaseModelVersion::SdV2,
        }
    }

    /// The cross-attention width of the released models of this family.
    pub fn standard_cross_attention_dim(self) -> usize {
        match self {
            ModelFamily::Sd1 => 768,
            ModelFamily::Sd2 => 1024,
        }
    }

    /// The text encoder this family conditions on, in words.
    pub fn text_encoder_name(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "OpenAI CLIP text encoder",
            ModelFamily::Sd2 => "OpenCLIP text encoder",
        }
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFamily::Sd1 => "SD 1.x",
            ModelFamily::Sd2 => "SD 2.x",
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
}

impl BaseModelVersion {
    /// kohya's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BaseModelVersion::SdV1 => "sd_v1",
            BaseModelVersion::SdV2 => "sd_v2",
            BaseModelVersion::SdV2V => "sd_v2_v",
        }
    }

    pub fn family(self) -> ModelFamily {
        match self {
            BaseModelVersion::SdV1 => ModelFamily::Sd1,
            BaseModelVersion::SdV2 | BaseModelVersion::SdV2V => ModelFamily::Sd2,
        }
    }

    /// The ModelSpec architecture of a LoRA for this base.
    pub fn modelspec_architecture(self) -> &'static str {
        match self {
            BaseModelVersion::SdV1 => "stable-diffusion-v1/lora",
            BaseModelVersion::SdV2 => "stable-diffusion-v2-512/lora",
            BaseModelVersion::SdV2V => "stable-diffusion-v2-768-v/lora",
        }
    }
}

impl fmt::Display for BaseModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
