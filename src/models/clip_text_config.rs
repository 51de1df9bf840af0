//! The CLIP text encoder's `config.json`, as transformers writes it.
//!
//! A diffusers folder stores a `CLIPTextConfig` in `text_encoder/config.json`; a full CLIP model
//! (what `auto_label` scores images with) stores a `CLIPConfig` whose `text_config` holds the
//! same keys. Both are read here. Missing keys take transformers' `CLIPTextConfig` defaults.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::ModelError;
use crate::{Error, Result};

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// OpenAI CLIP's `x · sigmoid(1.702 x)` (SD 1.x).
    QuickGelu,
    /// The exact (erf) GELU (OpenCLIP, SD 2.x).
    Gelu,
}

/// The hyper-parameters of a CLIP text transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Width of `text_projection` in models that have one (CLIPModel, CLIPTextModelWithProjection).
    pub projection_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// The ids that end a prompt; the pooled output is taken at the first of them. Empty when
    /// the config gives none.
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` exactly as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    projection_dim: Option<usize>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: Option<f64>,
    eos_token_id: Value,
}

impl Default for RawTextConfig {
    fn default() -> Self {
        // transformers 5.23 `CLIPTextConfig` defaults.
        RawTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: Some(1e-5),
            eos_token_id: Value::from(49407),
        }
    }
}

impl ClipTextConfig {
    /// Reads `text_encoder/config.json` (a `CLIPTextConfig`) or a CLIP model's `config.json`
    /// (a `CLIPConfig` with `text_config` inside).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::models::config_json::read_model_file(path)?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the JSON text of such a file; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let invalid = |message: String| -> Error {
            ModelError::InvalidConfig {
                origin: origin.to_string(),
                message,
            }
            .into()
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err(invalid("expected a JSON object".to_string()));
        };
        // A CLIPConfig: the text tower's keys are in `text_config`, its projection width at the top.
        let mut top_projection = None;
        if let Some(Value::Object(text_config)) = object.remove("text_config") {
            top_projection = object.get("projection_dim").cloned();
            object = text_config;
        }
        let mut raw: RawTextConfig = serde_json::from_value(Value::Object(object))
            .map_err(|e| invalid(format!("not a CLIP text config: {e}")))?;
        if let Some(projection) = top_projection {
            raw.projection_dim = serde_json::from_value(projection)
                .map_err(|e| invalid(format!("projection_dim: {e}")))?;
        }
        let hidden_act = match raw.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(invalid(format!(
                    "hidden_act `{other}` is not supported by the CLIP text encoder; use `quick_gelu` or `gelu`"
                )))
            }
        };
        let eos_token_ids = match &raw.eos_token_id {
            Value::Null => Vec::new(),
            Value::Number(n) => vec![token_id(n.as_u64(), origin)?],
            Value::Array(items) => items
                .iter()
                .map(|v| token_id(v.as_u64(), origin))
                .collect::<Result<Vec<_>>>()?,
            other => return Err(invalid(format!("eos_token_id {other} is not a token id"))),
        };
        let config = ClipTextConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            projection_dim: raw.projection_dim,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
            eos_token_ids,
        };
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Checks the sizes fit together; the message says which do not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0; it must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// transformers' rule for old configs whose `eos_token_id` is 2 (before its PR #24773): the
    /// pooled output is taken at the largest token id instead of the first EOS.
    pub fn pools_at_largest_id(&self) -> bool {
        self.eos_token_ids.is_empty() || self.eos_token_ids == [2]
    }
}

fn token_id(value: Option<u64>, origin: &str) -> Result<u32> {
    value.and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
        ModelError::InvalidConfig {
            origin: origin.to_string(),
            message: "eos_token_id must be a non-negative integer (or a list of them)".to_string(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_text_encoder_config() -> Result<()> {
        let c = ClipTextConfig::from_json(
            r#"{"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
                "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
                "hidden_act": "quick_gelu", "eos_token_id": 2, "torch_dtype": "float32"}"#,
            "config.json",
        )?;
        assert_eq!(
            (
                c.hidden_size,
                c.head_dim(),
                c.vocab_size,
                c.max_position_embeddings
            ),
            (768, 64, 49408, 77)
        );
        assert_eq!(c.hidden_act, ClipActivation::QuickGelu);
        assert!(c.pools_at_largest_id());
        Ok(())
    }

    #[test]
    fn reads_the_text_part_of_a_full_clip_config() -> Result<()> {
        let c = ClipTextConfig::from_json(
            r#"{"model_type": "clip", "projection_dim": 768,
                "text_config": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                                "hidden_act": "gelu", "eos_token_id": [49407], "projection_dim": 512},
                "vision_config": {"hidden_size": 1024}}"#,
            "config.json",
        )?;
        assert_eq!(c.hidden_size, 768);
        assert_eq!(c.projection_dim, Some(768));
        assert_eq!(c.hidden_act, ClipActivation::Gelu);
        assert_eq!(c.eos_token_ids, vec![49407]);
        assert!(!c.pools_at_largest_id());
        Ok(())
    }

    #[test]
    fn bad_values_are_named() {
        let err = ClipTextConfig::from_json(r#"{"hidden_act": "relu"}"#, "te/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("te/config.json") && err.contains("`relu`"),
            "{err}"
        );
        let err =
            ClipTextConfig::from_json(r#"{"hidden_size": 100, "num_attention_heads": 3}"#, "c")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("hidden_size 100") && err.contains("num_attention_heads 3"),
            "{err}"
        );
        let err = ClipTextConfig::from_json(r#"{"hidden_size": "wide"}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a CLIP text config"), "{err}");
        let err = ClipTextConfig::from_json(r#"{"eos_token_id": -1}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("eos_token_id"), "{err}");
    }
}
