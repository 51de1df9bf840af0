//! transformers' `CLIPTextModelWithProjection`: the CLIP text tower and `text_projection`, a
//! linear map (no bias) of its pooled output. SDXL's second text encoder (OpenCLIP ViT-bigG,
//! `text_encoder_2/`) is one: its projected pooled output is the UNet's `text_embeds`.
//!
//! Weight paths as transformers writes them: `text_model.*` and `text_projection.weight`.

use candle_core::Tensor;

use super::clip_text::ClipTextModel;
use super::clip_text_config::ClipTextConfig;
use crate::error::ModelError;
use crate::nn::{Linear, Scope};
use crate::Result;

/// The text tower with its projection.
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    text_model: ClipTextModel,
    /// `[projection_dim, hidden]`, no bias.
    text_projection: Linear,
}

/// What SDXL reads from its second text encoder.
#[derive(Debug, Clone)]
pub struct ProjectedOutputs {
    /// `hidden_states[-2]`: `[B, T, hidden]`, no final layer norm.
    pub penultimate: Tensor,
    /// The projected pooled output (`text_embeds`): `[B, projection_dim]`.
    pub text_embeds: Tensor,
}

impl ClipTextModelWithProjection {
    /// Builds the model from `scope`, the root of the checkpoint (`text_model.*`,
    /// `text_projection.weight`); the config must name `projection_dim`.
    pub fn new(scope: Scope, config: &ClipTextConfig) -> Result<Self> {
        let projection_dim = config
            .projection_dim
            .ok_or_else(|| ModelError::InvalidConfig {
                origin: scope.store().describe(),
                message: "a CLIPTextModelWithProjection config needs `projection_dim`".to_string(),
            })?;
        let text_model = ClipTextModel::new(scope.pp("text_model"), config)?;
        let text_projection = Linear::new(
            scope.pp("text_projection"),
            config.hidden_size,
            projection_dim,
            false,
        )?;
        Ok(ClipTextModelWithProjection {
            text_model,
            text_projection,
        })
    }

    /// The text tower.
    pub fn text_model(&self) -> &ClipTextModel {
        &self.text_model
    }

    /// `input_ids: [B, T]` → the penultimate hidden states and the projected pooled output.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ProjectedOutputs> {
        let (penultimate, last) = self.text_model.forward_penultimate(input_ids)?;
        let pooled = self.text_model.pooled(&last, input_ids)?;
        Ok(ProjectedOutputs {
            penultimate,
            text_embeds: self.text_projection.forward(&pooled)?,
        })
    }
}
