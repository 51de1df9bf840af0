//! The CLIP image encoder (`auto_label` scores pictures with it).
//!
//! Our own implementation of transformers' `CLIPVisionTransformer`: the picture is cut into
//! `patch_size` squares (a strided convolution), a learned class token is put first, position
//! embeddings are added, then `pre_layrnorm` (sic, transformers' name), the same pre-LayerNorm
//! encoder layers as the text tower without a mask, and `post_layernorm` on the class token.
//! Module paths follow the checkpoints (`vision_model.embeddings.patch_embedding`,
//! `vision_model.encoder.layers.N.self_attn.q_proj`). Inference only: no adapters.

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::Value;

use super::clip_text::{ClipActivation, ClipEncoderLayer, ClipLayerShape};
use crate::error::ModelError;
use crate::nn::{Conv2d, ConvConfig, LayerNorm, Scope};
use crate::{Error, Result};

/// The hyper-parameters of a CLIP vision transformer (`vision_config` of a `CLIPConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// Side of the square input picture in pixels (224 for ViT-L/14).
    pub image_size: usize,
    /// Side of one patch in pixels (14 for ViT-L/14, 32 for ViT-B/32).
    pub patch_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

/// `vision_config` exactly as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: Value,
    patch_size: Value,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawVisionConfig {
    fn default() -> Self {
        // transformers 5.23 `CLIPVisionConfig` defaults.
        RawVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: Value::from(224),
            patch_size: Value::from(32),
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Parses a CLIP model's `config.json` (a `CLIPConfig`, whose `vision_config` is read; absent
    /// keys take transformers' defaults) or a `CLIPVisionConfig`; `origin` names it in errors.
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
        let Value::Object(object) = value else {
            return Err(invalid("expected a JSON object".to_string()));
        };
        let is_full_model = object.contains_key("text_config")
            || object.get("model_type").and_then(Value::as_str) == Some("clip");
        let object = if is_full_model {
            match object.get("vision_config") {
                Some(Value::Object(vision)) => vision.clone(),
                None | Some(Value::Null) => serde_json::Map::new(),
                Some(other) => {
                    return Err(invalid(format!(
                        "`vision_config` must be an object, found {other}"
                    )))
                }
            }
        } else {
            object
        };
        let raw: RawVisionConfig = serde_json::from_value(Value::Object(object))
            .map_err(|e| invalid(format!("not a CLIP vision config: {e}")))?;
        let hidden_act = match raw.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(invalid(format!(
                "vision_config.hidden_act `{other}` is not supported; use `quick_gelu` or `gelu`"
            )))
            }
        };
        let config = ClipVisionConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_channels: raw.num_channels,
            image_size: square_side(&raw.image_size, "image_size").map_err(invalid)?,
            patch_size: square_side(&raw.patch_size, "patch_size").map_err(invalid)?,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps,
        };
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Checks the sizes fit together; the message names the ones that do not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("vision_config.{name} is 0; it must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        Ok(())
    }

    /// Patches along one side of the picture.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens of the transformer: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }

    fn layer_shape(&self) -> ClipLayerShape {
        ClipLayerShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            layer_norm_eps: self.layer_norm_eps,
            activation: self.hidden_act,
        }
    }
}

/// `224` or `[224, 224]`: CLIP's embeddings only handle square pictures and patches.
fn square_side(value: &Value, key: &str) -> std::result::Result<usize, String> {
    let side = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    match value {
        Value::Array(items) if items.len() == 2 && side(&items[0]).is_some() => {
            if items[0] == items[1] {
                side(&items[0]).ok_or_else(String::new)
            } else {
                Err(format!(
                    "vision_config.{key} {value} is not square; CLIP needs one side length"
                ))
            }
        }
        other => side(other).ok_or_else(|| {
            format!("vision_config.{key} must be a positive integer, found {other}")
        }),
    }
}

/// Class token, patch and position embeddings (`embeddings.*`).
#[derive(Debug, Clone)]
struct ClipVisionEmbeddings {
    /// `[hidden]`
    class_embedding: Tensor,
    /// weight `[hidden, channels, patch, patch]`, stride `patch`, no bias.
    patch_embedding: Conv2d,
    /// `[num_positions, hidden]`
    position_embedding: Tensor,
    image_size: usize,
    num_channels: usize,
}

impl ClipVisionEmbeddings {
    fn new(scope: Scope, config: &ClipVisionConfig) -> Result<Self> {
        let class_embedding = scope.get("class_embedding", config.hidden_size)?;
        let patch_embedding = Conv2d::new(
            scope.pp("patch_embedding"),
            config.num_channels,
            config.hidden_size,
            config.patch_size,
            ConvConfig {
                stride: config.patch_size,
                padding: 0,
            },
            false,
        )?;
        let position_embedding = scope
            .pp("position_embedding")
            .get("weight", (config.num_positions(), config.hidden_size))?;
        // A buffer (`arange(num_positions)`) that older checkpoints carry.
        if scope.contains("position_ids") {
            scope.store().mark_used(&scope.key("position_ids"));
        }
        Ok(ClipVisionEmbeddings {
            class_embedding,
            patch_embedding,
            position_embedding,
            image_size: config.image_size,
            num_channels: config.num_channels,
        })
    }

    /// `pixel_values: [B, channels, image_size, image_size]` → `[B, num_positions, hidden]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if (c, h, w) != (self.num_channels, self.image_size, self.image_size) {
            return Err(candle_core::Error::Msg(format!(
                "CLIP vision encoder: pictures of {c}x{h}x{w} (channels x height x width), but this \
                 model takes {}x{}x{} (preprocess them with the model's image processor)",
                self.num_channels, self.image_size, self.image_size
            ))
            .into());
        }
        let pixel_values = pixel_values.to_dtype(self.class_embedding.dtype())?;
        let patches = self.patch_embedding.forward(&pixel_values)?; // [B, hidden, g, g]
        let hidden = patches.dim(1)?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g*g, hidden]
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let tokens = Tensor::cat(&[&class, &patches], 1)?;
        Ok(tokens.broadcast_add(&self.position_embedding.unsqueeze(0)?)?)
    }
}

/// transformers' `CLIPVisionTransformer` (the `vision_model` of a `CLIPModel`).
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Builds the tower from `scope` (the `vision_model` module of a CLIP checkpoint).
    pub fn new(scope: Scope, config: &ClipVisionConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|message| ModelError::InvalidConfig {
                origin: scope.store().describe(),
                message,
            })?;
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let shape = config.layer_shape();
        let embeddings = ClipVisionEmbeddings::new(scope.pp("embeddings"), config)?;
        let pre_layrnorm = LayerNorm::new(scope.pp("pre_layrnorm"), h, eps)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(scope.pp("encoder").pp("layers").pp(i), &shape))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(scope.pp("post_layernorm"), h, eps)?;
        Ok(ClipVisionModel {
            embeddings,
            pre_layrnorm,
            layers,
            post_layernorm,
            config: config.clone(),
        })
    }

    /// The config the tower was built with.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values: [B, channels, image_size, image_size]` (normalised as the model's image
    /// processor does) → `last_hidden_state [B, num_positions, hidden]` (before `post_layernorm`,
    /// as transformers returns it).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut h = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixel_values)?)?;
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        Ok(h)
    }

    /// transformers' `pooler_output`: `post_layernorm` of the class token →`[B, hidden]`.
    pub fn pooled(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let last = self.forward(pixel_values)?;
        self.post_layernorm
            .forward(&last.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::nn::WeightStore;

    fn config() -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_channels: 3,
            image_size: 8,
            patch_size: 4,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }

    fn random_store(config: &ClipVisionConfig, seed: u64) -> WeightStore {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (h, m, p) = (
            config.hidden_size,
            config.intermediate_size,
            config.patch_size,
        );
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.class_embedding".into(), vec![h]),
            (
                "embeddings.patch_embedding.weight".into(),
                vec![h, config.num_channels, p, p],
            ),
            (
                "embeddings.position_embedding.weight".into(),
                vec![config.num_positions(), h],
            ),
        ];
        for norm in ["pre_layrnorm", "post_layernorm"] {
            shapes.push((format!("{norm}.weight"), vec![h]));
            shapes.push((format!("{norm}.bias"), vec![h]));
        }
        for i in 0..config.num_hidden_layers {
            let l = format!("encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                shapes.push((format!("{l}.self_attn.{proj}.weight"), vec![h, h]));
                shapes.push((format!("{l}.self_attn.{proj}.bias"), vec![h]));
            }
            for norm in ["layer_norm1", "layer_norm2"] {
                shapes.push((format!("{l}.{norm}.weight"), vec![h]));
                shapes.push((format!("{l}.{norm}.bias"), vec![h]));
            }
            shapes.push((format!("{l}.mlp.fc1.weight"), vec![m, h]));
            shapes.push((format!("{l}.mlp.fc1.bias"), vec![m]));
            shapes.push((format!("{l}.mlp.fc2.weight"), vec![h, m]));
            shapes.push((format!("{l}.mlp.fc2.bias"), vec![h]));
        }
        let tensors: HashMap<String, Tensor> = shapes
            .into_iter()
            .map(|(name, dims)| {
                let n: usize = dims.iter().product();
                let values: Vec<f64> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
                let t = Tensor::from_vec(values, dims, &Device::Cpu).expect("tensor");
                (format!("vision_model.{name}"), t)
            })
            .collect();
        WeightStore::from_tensors("tiny vision", tensors, DType::F64, Device::Cpu)
    }

    fn pixels(seed: u64, b: usize) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f64> = (0..b * 3 * 8 * 8)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        Tensor::from_vec(values, (b, 3, 8, 8), &Device::Cpu).expect("pixels")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff")
    }

    #[test]
    fn reads_the_vision_part_of_a_clip_config_with_transformers_defaults() -> Result<()> {
        let c = ClipVisionConfig::from_json(
            r#"{"model_type": "clip", "text_config": {"hidden_size": 768},
                "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                  "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}"#,
            "config.json",
        )?;
        assert_eq!(
            (c.hidden_size, c.patch_size, c.image_size, c.num_positions()),
            (1024, 14, 224, 257)
        );
        assert_eq!(c.hidden_act, ClipActivation::QuickGelu);
        let alone = ClipVisionConfig::from_json(
            r#"{"model_type": "clip_vision_model", "image_size": [64, 64], "patch_size": 16, "hidden_act": "gelu"}"#,
            "v.json",
        )?;
        assert_eq!((alone.image_size, alone.num_positions()), (64, 17));
        assert_eq!(alone.hidden_act, ClipActivation::Gelu);
        Ok(())
    }

    #[test]
    fn bad_vision_configs_are_named() {
        for (json, needle) in [
            (r#"{"image_size": 100, "patch_size": 14}"#, "patch_size 14"),
            (r#"{"image_size": [64, 32]}"#, "not square"),
            (r#"{"hidden_act": "relu"}"#, "`relu`"),
            (r#"{"hidden_size": 10}"#, "num_attention_heads 12"),
            (r#"{"patch_size": "big"}"#, "positive integer"),
        ] {
            let err = ClipVisionConfig::from_json(json, "cfg.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains("cfg.json") && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn the_class_token_sees_every_patch_and_pictures_are_independent() -> Result<()> {
        let config = config();
        let store = random_store(&config, 1);
        let model = ClipVisionModel::new(Scope::root(&store).pp("vision_model"), &config)?;
        store.check_all_used()?;
        let x = pixels(2, 2);
        let pooled = model.pooled(&x)?;
        assert_eq!(pooled.dims(), &[2, 8]);
        // Changing one pixel of the last patch changes the pooled output (no causal mask)...
        let mut values = x.flatten_all()?.to_vec1::<f64>()?;
        values[3 * 64 - 1] += 1.0;
        let changed = Tensor::from_vec(values, (2, 3, 8, 8), &Device::Cpu)?;
        let pooled2 = model.pooled(&changed)?;
        assert!(max_diff(&pooled.get(0)?, &pooled2.get(0)?) > 1e-4);
        // ...of that picture only.
        assert_eq!(max_diff(&pooled.get(1)?, &pooled2.get(1)?), 0.0);
        // A batch gives what each picture gives alone.
        let single = model.pooled(&x.narrow(0, 1, 1)?)?;
        assert!(max_diff(&single.get(0)?, &pooled.get(1)?) < 1e-12);
        Ok(())
    }

    #[test]
    fn wrong_picture_sizes_are_refused_with_the_expected_size() -> Result<()> {
        let config = config();
        let store = random_store(&config, 3);
        let model = ClipVisionModel::new(Scope::root(&store).pp("vision_model"), &config)?;
        let err = model
            .pooled(&Tensor::zeros((1, 3, 16, 8), DType::F64, &Device::Cpu)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3x16x8") && err.contains("3x8x8"), "{err}");
        Ok(())
    }
}
