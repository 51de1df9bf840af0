//! The joint CLIP model: both towers and the projections into their shared embedding space.
//!
//! transformers' `CLIPModel` (`openai/clip-vit-large-patch14` and friends) projects the text
//! tower's pooled output with `text_projection` and the vision tower's with `visual_projection`
//! (both linear, no bias) into `projection_dim`; the cosine of the two is how well a phrase
//! describes a picture. `auto_label` ranks its vocabularies with it. Inference only.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::error::ModelError;
use crate::nn::weights::TensorSource;
use crate::nn::{Linear, Scope, WeightStore};
use crate::{Error, Result};

/// The weight files a CLIP folder may hold, in order of preference.
pub const CLIP_WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// A `CLIPConfig`: both towers and the shared embedding width.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipModelConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    /// Width of the shared embedding space (`projection_dim`).
    pub projection_dim: usize,
}

impl ClipModelConfig {
    /// Reads a CLIP model's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::models::config_json::read_model_file(path)?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the JSON text of a `CLIPConfig`; `origin` names it in errors. Absent keys take
    /// transformers' defaults, as `CLIPConfig.from_pretrained` does.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let invalid = |message: String| -> Error {
            ModelError::InvalidConfig {
                origin: origin.to_string(),
                message,
            }
            .into()
        };
        let mut value: Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        // Configs written by transformers 4.1x (openai/clip-vit-large-patch14's) also carry
        // `text_config_dict` / `vision_config_dict`, whose values win, as in `CLIPConfig`.
        if let Value::Object(map) = &mut value {
            for tower in ["text_config", "vision_config"] {
                if let Some(Value::Object(overrides)) = map.remove(&format!("{tower}_dict")) {
                    let entry = map
                        .entry(tower.to_string())
                        .or_insert_with(|| Value::Object(Default::default()));
                    if let Value::Object(config) = entry {
                        config.extend(overrides);
                    }
                }
            }
        }
        if value.get("text_config").is_none() && value.get("vision_config").is_none() {
            return Err(invalid(
                "this is not a full CLIP model config (no `text_config` / `vision_config`); \
                 auto_label needs a `CLIPModel` folder such as openai/clip-vit-large-patch14"
                    .to_string(),
            ));
        }
        let projection_dim = match value.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid(format!("projection_dim {v} is not a positive integer")))?,
        };
        let merged = value.to_string();
        let mut text_config = ClipTextConfig::from_json(&merged, origin)?;
        text_config.projection_dim = Some(projection_dim);
        Ok(ClipModelConfig {
            text: text_config,
            vision: ClipVisionConfig::from_json(&merged, origin)?,
            projection_dim,
        })
    }
}

/// transformers' `CLIPModel`: text and vision towers plus their projections.
#[derive(Debug, Clone)]
pub struct ClipModel {
    text_model: ClipTextModel,
    vision_model: ClipVisionModel,
    /// `[projection_dim, text hidden]`, no bias.
    text_projection: Linear,
    /// `[projection_dim, vision hidden]`, no bias.
    visual_projection: Linear,
    /// `exp(logit_scale)`: the temperature of CLIP's softmax over cosines (100 when trained).
    logit_scale: f64,
    config: ClipModelConfig,
}

impl ClipModel {
    /// Builds the model from `scope`, the root of a `CLIPModel` checkpoint (`text_model.*`,
    /// `vision_model.*`, `text_projection.weight`, `visual_projection.weight`, `logit_scale`).
    pub fn new(scope: Scope, config: &ClipModelConfig) -> Result<Self> {
        let text_model = ClipTextModel::new(scope.pp("text_model"), &config.text)?;
        let vision_model = ClipVisionModel::new(scope.pp("vision_model"), &config.vision)?;
        let text_projection = Linear::new(
            scope.pp("text_projection"),
            config.text.hidden_size,
            config.projection_dim,
            false,
        )?;
        let visual_projection = Linear::new(
            scope.pp("visual_projection"),
            config.vision.hidden_size,
            config.projection_dim,
            false,
        )?;
        let logit_scale = scope
            .get("logit_scale", ())?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .exp();
        Ok(ClipModel {
            text_model,
            vision_model,
            text_projection,
            visual_projection,
            logit_scale,
            config: config.clone(),
        })
    }

    /// Loads a CLIP folder: `config.json` and `model.safetensors` (or `pytorch_model.bin`).
    /// Every tensor of the checkpoint must be used.
    pub fn from_folder(folder: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipModelConfig::from_file(&folder.join("config.json"))?;
        let weights = clip_weights_file(folder)?;
        let source = if weights.extension().is_some_and(|e| e == "safetensors") {
            TensorSource::safetensors(&weights)?
        } else {
            TensorSource::pickle(&weights, None)?
        };
        let store = WeightStore::from_source(source, dtype, device.clone());
        let model = ClipModel::new(Scope::root(&store), &config)?;
        store.check_all_used()?;
        Ok(model)
    }

    /// The config the model was built with.
    pub fn config(&self) -> &ClipModelConfig {
        &self.config
    }

    /// The text tower.
    pub fn text_model(&self) -> &ClipTextModel {
        &self.text_model
    }

    /// The vision tower.
    pub fn vision_model(&self) -> &ClipVisionModel {
        &self.vision_model
    }

    /// `exp(logit_scale)`, the factor transformers multiplies cosines by for `logits_per_image`.
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }

    /// transformers' `get_text_features`: `input_ids [B, T]` → `[B, projection_dim]`, not
    /// normalised.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text_model.forward(input_ids)?;
        let pooled = self.text_model.pooled(&hidden, input_ids)?;
        self.text_projection.forward(&pooled)
    }

    /// transformers' `get_image_features`: `pixel_values [B, 3, S, S]` → `[B, projection_dim]`,
    /// not normalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pooled = self.vision_model.pooled(pixel_values)?;
        self.visual_projection.forward(&pooled)
    }

    /// `CLIPModel(...).text_embeds`: [`ClipModel::text_features`] scaled to unit length.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        unit_length(&self.text_features(input_ids)?)
    }

    /// `CLIPModel(...).image_embeds`: [`ClipModel::image_features`] scaled to unit length.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        unit_length(&self.image_features(pixel_values)?)
    }
}

/// Each row of `x: [B, D]` divided by its Euclidean norm.
pub fn unit_length(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The weight file of a CLIP folder, or an error listing what was looked for.
pub fn clip_weights_file(folder: &Path) -> Result<PathBuf> {
    CLIP_WEIGHT_FILES
        .iter()
        .map(|name| folder.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            ModelError::Unreadable {
                path: folder.to_path_buf(),
                reason: format!(
                    "holds neither {}; a CLIP model folder needs config.json and its weights",
                    CLIP_WEIGHT_FILES.join(" nor ")
                ),
            }
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_towers_and_the_projection_width() -> Result<()> {
        let c = ClipModelConfig::from_json(
            r#"{"model_type": "clip", "projection_dim": 768,
                "text_config": {"hidden_size": 768, "num_attention_heads": 12, "projection_dim": 512},
                "vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14}}"#,
            "config.json",
        )?;
        assert_eq!(c.projection_dim, 768);
        assert_eq!(c.text.projection_dim, Some(768));
        assert_eq!((c.text.hidden_size, c.vision.hidden_size), (768, 1024));
        // transformers 4.1x configs: `*_config_dict` values win.
        let old = ClipModelConfig::from_json(
            r#"{"projection_dim": 768, "text_config": {"hidden_size": 512, "num_attention_heads": 8},
                "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12},
                "vision_config_dict": {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14}}"#,
            "config.json",
        )?;
        assert_eq!(
            (old.text.hidden_size, old.text.num_attention_heads),
            (768, 12)
        );
        assert_eq!((old.vision.hidden_size, old.vision.patch_size), (1024, 14));
        let defaults = ClipModelConfig::from_json(r#"{"text_config": {}}"#, "c")?;
        assert_eq!(defaults.projection_dim, 512);
        assert_eq!(defaults.vision.patch_size, 32);
        Ok(())
    }

    #[test]
    fn a_text_encoder_config_is_not_a_clip_model() {
        let err = ClipModelConfig::from_json(r#"{"hidden_size": 768}"#, "te/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("te/config.json") && err.contains("not a full CLIP model"),
            "{err}"
        );
        let err = ClipModelConfig::from_json(r#"{"text_config": {}, "projection_dim": 0}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("projection_dim 0"), "{err}");
    }

    #[test]
    fn a_folder_without_weights_names_the_files_it_needs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = clip_weights_file(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("pytorch_model.bin"),
            "{err}"
        );
    }
}
