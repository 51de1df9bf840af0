//! How many layers get adapters and how many parameters they train, per model: for the dry-run
//! plan (computed from the model configs alone, on shape-only weight stores) and at the start of
//! training (from the live networks).

use std::fmt;

use candle_core::{DType, Device};

use super::names::LoraModel;
use super::network::LoraNetworks;
use super::targets::ModuleSpec;
use crate::config::LoraSettings;
use crate::log::thousands;
use crate::models::clip_text::ClipTextModel;
use crate::models::clip_text_config::ClipTextConfig;
use crate::models::source::SdVersion;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::nn::{LayerKind, Scope, WeightStore};
use crate::Result;

/// The adapters of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelReport {
    pub model: LoraModel,
    /// Adapted layers.
    pub modules: usize,
    /// Of which convolutions with a kernel larger than 1×1 (LoCon).
    pub conv_modules: usize,
    /// Trainable parameters (elements of every `lora_down` and `lora_up`).
    pub parameters: usize,
}

/// The adapters of a run, per model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraReport {
    pub unet: ModelReport,
    /// `None` when the text encoder is not trained.
    pub text_encoder: Option<ModelReport>,
}

impl LoraReport {
    /// Counts `modules`; `text_encoder_trained` decides whether the text encoder is reported.
    pub fn from_modules(
        text_encoder_trained: bool,
        modules: impl IntoIterator<Item = ModuleSpec>,
    ) -> Self {
        let empty = |model| ModelReport {
            model,
            modules: 0,
            conv_modules: 0,
            parameters: 0,
        };
        let mut unet = empty(LoraModel::Unet);
        let mut text_encoder = empty(LoraModel::TextEncoder);
        for m in modules {
            let r = match m.model {
                LoraModel::Unet => &mut unet,
                LoraModel::TextEncoder => &mut text_encoder,
            };
            r.modules += 1;
            r.parameters += m.parameters();
            if matches!(m.layer, LayerKind::Conv2d { kernel, .. } if kernel > 1) {
                r.conv_modules += 1;
            }
        }
        LoraReport {
            unet,
            text_encoder: text_encoder_trained.then_some(text_encoder),
        }
    }

    /// The report from the model configs alone: both models are built on shape-only stores
    /// (no weight is read or allocated) with plan-only networks. Fails like training would on
    /// targets that match nothing or a `network_weights` file that does not fit.
    pub fn from_configs(
        settings: &LoraSettings,
        base: Option<SdVersion>,
        unet_config: &UNetConfig,
        text_config: &ClipTextConfig,
    ) -> Result<Self> {
        let networks = LoraNetworks::plan_only(settings, base)?;
        let store = WeightStore::shape_only(DType::F32, Device::Cpu);
        UNet2DConditionModel::new(
            Scope::root(&store).with_adapters(&networks.unet),
            unet_config,
        )?;
        if let Some(te) = &networks.text_encoder {
            ClipTextModel::new(Scope::root(&store).with_adapters(te), text_config)?;
        }
        networks.check_built()?;
        Ok(networks.report())
    }

    /// Both models' totals.
    pub fn total_parameters(&self) -> usize {
        self.unet.parameters + self.text_encoder.as_ref().map_or(0, |t| t.parameters)
    }
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} modules", self.model, self.modules)?;
        if self.conv_modules > 0 {
            write!(f, " ({} convolutions)", self.conv_modules)?;
        }
        write!(f, ", {} parameters", thousands(self.parameters))
    }
}

impl fmt::Display for LoraReport {
    /// `UNet: 64 modules, 797,184 parameters; text encoder: 24 modules, 294,912 parameters`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.unet)?;
        match &self.text_encoder {
            Some(te) => write!(f, "; {te}"),
            None => write!(f, "; text encoder: not trained"),
        }
    }
}
