//! `--captioner blip`: a BLIP sentence leads the caption (clip-interrogator's classic mode).
//!
//! The network is candle-transformers' BLIP (frozen inference, DESIGN.md §2); this file reads a
//! Hugging Face `BlipForConditionalGeneration` folder into it: `config.json` with transformers'
//! defaults for absent keys, the weights through our [`WeightStore`] (which also supplies the
//! LM head that transformers 5 leaves out of the file because it is tied to the word
//! embeddings), `preprocessor_config.json` (384 × 384 bicubic, CLIP's statistics) and the BERT
//! `tokenizer.json` to turn ids back into words. Captions are generated greedily, as
//! `model.generate(pixel_values)` does by default: start from `[DEC]`, append the most likely
//! token, stop at `[SEP]`.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Shape, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Module, VarBuilder};
use candle_transformers::models::{blip, blip_text};
use image::RgbImage;
use serde::Deserialize;
use serde_json::Value;

use super::preprocess::{ImageProcessor, ResizeTo};
use crate::error::ModelError;
use crate::models::clip_model::clip_weights_file;
use crate::nn::weights::{Entry, TensorSource, Transform};
use crate::nn::WeightStore;
use crate::{Error, Result};

/// The most tokens a sentence may have (clip-interrogator's `caption_max_length`).
pub const MAX_NEW_TOKENS: usize = 32;

/// The LM head weight transformers 5 does not save (tied to the word embeddings).
const LM_HEAD: &str = "text_decoder.cls.predictions.decoder.weight";
const WORD_EMBEDDINGS: &str = "text_decoder.bert.embeddings.word_embeddings.weight";

/// A `BlipConfig` (`config.json`) as candle-transformers needs it, plus the special tokens.
#[derive(Debug, Clone)]
pub struct BlipSettings {
    pub config: blip::Config,
    /// The token generation starts from (`[DEC]`, `text_config.bos_token_id`).
    pub bos_token_id: u32,
    /// The token that ends a sentence (`[SEP]`, `text_config.sep_token_id`).
    pub sep_token_id: u32,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    encoder_hidden_size: usize,
    intermediate_size: usize,
    projection_dim: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: Value,
    layer_norm_eps: f64,
    is_decoder: bool,
    bos_token_id: u32,
    sep_token_id: u32,
}

impl Default for RawText {
    fn default() -> Self {
        // transformers 5.23 `BlipTextConfig` defaults.
        RawText {
            vocab_size: 30524,
            hidden_size: 768,
            encoder_hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 512,
            hidden_act: Value::from("gelu"),
            layer_norm_eps: 1e-12,
            is_decoder: true,
            bos_token_id: 30522,
            sep_token_id: 102,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawVision {
    hidden_size: usize,
    intermediate_size: usize,
    projection_dim: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: Value,
    layer_norm_eps: f64,
}

impl Default for RawVision {
    fn default() -> Self {
        // transformers 5.23 `BlipVisionConfig` defaults.
        RawVision {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 384,
            patch_size: 16,
            hidden_act: Value::from("gelu"),
            layer_norm_eps: 1e-5,
        }
    }
}

impl BlipSettings {
    /// Parses a `BlipConfig`; `origin` names the file in errors.
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
        if value
            .get("model_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "blip")
        {
            return Err(invalid(format!(
                "model_type is {}, not `blip`; --blip-model needs a BlipForConditionalGeneration folder such as Salesforce/blip-image-captioning-large",
                value["model_type"]
            )));
        }
        let part = |key: &str| {
            value
                .get(key)
                .cloned()
                .unwrap_or(Value::Object(Default::default()))
        };
        let text_raw: RawText = serde_json::from_value(part("text_config"))
            .map_err(|e| invalid(format!("text_config: {e}")))?;
        let vision_raw: RawVision = serde_json::from_value(part("vision_config"))
            .map_err(|e| invalid(format!("vision_config: {e}")))?;
        let activation = |v: &Value, key: &str| -> Result<candle_nn::Activation> {
            serde_json::from_value(v.clone()).map_err(|_| {
                invalid(format!(
                    "{key}.hidden_act {v} is not an activation candle knows"
                ))
            })
        };
        let number = |key: &str, default: usize| -> Result<usize> {
            match value.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| invalid(format!("{key} {v} is not a non-negative integer"))),
            }
        };
        if text_raw.encoder_hidden_size != vision_raw.hidden_size {
            return Err(invalid(format!(
                "text_config.encoder_hidden_size {} differs from vision_config.hidden_size {}; the decoder cross-attends to the vision tower",
                text_raw.encoder_hidden_size, vision_raw.hidden_size
            )));
        }
        for (key, heads, hidden) in [
            (
                "text_config",
                text_raw.num_attention_heads,
                text_raw.hidden_size,
            ),
            (
                "vision_config",
                vision_raw.num_attention_heads,
                vision_raw.hidden_size,
            ),
        ] {
            if heads == 0 || hidden % heads != 0 {
                return Err(invalid(format!(
                    "{key}.hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
                )));
            }
        }
        if vision_raw.patch_size == 0
            || !vision_raw.image_size.is_multiple_of(vision_raw.patch_size)
        {
            return Err(invalid(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                vision_raw.image_size, vision_raw.patch_size
            )));
        }
        let vocab = text_raw.vocab_size;
        for (name, id) in [
            ("bos_token_id", text_raw.bos_token_id),
            ("sep_token_id", text_raw.sep_token_id),
        ] {
            if id as usize >= vocab {
                return Err(invalid(format!(
                    "text_config.{name} {id} is outside the vocabulary of {vocab}"
                )));
            }
        }
        if !text_raw.is_decoder {
            return Err(invalid(
                "text_config.is_decoder is false; captioning needs BLIP's text decoder".to_string(),
            ));
        }
        let config = blip::Config {
            text_config: blip_text::Config {
                vocab_size: text_raw.vocab_size,
                hidden_size: text_raw.hidden_size,
                encoder_hidden_size: text_raw.encoder_hidden_size,
                intermediate_size: text_raw.intermediate_size,
                projection_dim: text_raw.projection_dim,
                num_hidden_layers: text_raw.num_hidden_layers,
                num_attention_heads: text_raw.num_attention_heads,
                max_position_embeddings: text_raw.max_position_embeddings,
                hidden_act: activation(&text_raw.hidden_act, "text_config")?,
                layer_norm_eps: text_raw.layer_norm_eps,
                is_decoder: text_raw.is_decoder,
            },
            vision_config: blip::VisionConfig {
                hidden_size: vision_raw.hidden_size,
                intermediate_size: vision_raw.intermediate_size,
                projection_dim: vision_raw.projection_dim,
                num_hidden_layers: vision_raw.num_hidden_layers,
                num_attention_heads: vision_raw.num_attention_heads,
                image_size: vision_raw.image_size,
                patch_size: vision_raw.patch_size,
                hidden_act: activation(&vision_raw.hidden_act, "vision_config")?,
                layer_norm_eps: vision_raw.layer_norm_eps,
            },
            projection_dim: number("projection_dim", 512)?,
            image_text_hidden_size: number("image_text_hidden_size", 256)?,
        };
        Ok(BlipSettings {
            config,
            bos_token_id: text_raw.bos_token_id,
            sep_token_id: text_raw.sep_token_id,
        })
    }
}

/// Our [`WeightStore`] as a candle-nn backend, so candle-transformers' BLIP reads through it.
struct StoreBackend(WeightStore);

impl SimpleBackend for StoreBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .get(name, shape)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "`{name}`: BLIP weights are read with their shapes"
        )))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// A loaded BLIP captioning folder.
pub struct BlipCaptioner {
    model: blip::BlipForConditionalGeneration,
    tokenizer: tokenizers::Tokenizer,
    processor: ImageProcessor,
    settings: BlipSettings,
    device: Device,
    dtype: DType,
    max_new_tokens: usize,
}

impl BlipCaptioner {
    /// Loads `folder` (`config.json`, `model.safetensors` or `pytorch_model.bin`,
    /// `tokenizer.json`, optional `preprocessor_config.json`). f32 on the CPU, f16 on a GPU.
    pub fn from_folder(folder: &Path, device: &Device) -> Result<Self> {
        let config_path = folder.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let settings = BlipSettings::from_json(&text, &config_path.display().to_string())?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        };
        let weights = clip_weights_file(folder)?;
        let source = if weights.extension().is_some_and(|e| e == "safetensors") {
            TensorSource::safetensors(&weights)?
        } else {
            TensorSource::pickle(&weights, None)?
        };
        let mut store = WeightStore::from_source(source, dtype, device.clone());
        if !store.contains(LM_HEAD) && store.contains(WORD_EMBEDDINGS) {
            store.insert(
                LM_HEAD.to_string(),
                Entry {
                    source: 0,
                    key: WORD_EMBEDDINGS.to_string(),
                    transform: Transform::None,
                },
            );
        }
        let vb = VarBuilder::from_backend(Box::new(StoreBackend(store)), dtype, device.clone());
        let model = blip::BlipForConditionalGeneration::new(&settings.config, vb).map_err(|e| {
            ModelError::Unreadable {
                path: weights.clone(),
                reason: format!("not the BLIP checkpoint its config.json describes: {e}"),
            }
        })?;
        let tokenizer_path = folder.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            ModelError::Unreadable {
                path: tokenizer_path.clone(),
                reason: format!(
                    "cannot read BLIP's tokenizer ({e}); the folder needs its tokenizer.json"
                ),
            }
        })?;
        let processor_path = folder.join("preprocessor_config.json");
        let processor = if processor_path.is_file() {
            ImageProcessor::from_file(&processor_path, ImageProcessor::blip_default())?
        } else {
            ImageProcessor::blip_default()
        };
        let side = settings.config.vision_config.image_size as u32;
        let produces = match (processor.crop, processor.resize) {
            (Some(crop), _) => Some(crop),
            (None, Some(ResizeTo::Exact { width, height })) => Some((width, height)),
            _ => None,
        };
        if produces != Some((side, side)) {
            return Err(ModelError::InvalidConfig {
                origin: processor_path.display().to_string(),
                message: format!("the image processor does not make the {side}x{side} pictures BLIP's vision tower takes"),
            }
            .into());
        }
        Ok(BlipCaptioner {
            model,
            tokenizer,
            processor,
            settings,
            device: device.clone(),
            dtype,
            max_new_tokens: MAX_NEW_TOKENS,
        })
    }

    /// The picture as BLIP's vision tower takes it: `[3, S, S]` f32 on the CPU.
    pub fn pixel_values(&self, image: &RgbImage) -> Result<Tensor> {
        self.processor.pixel_values(image, &Device::Cpu)
    }

    /// The vision tower's `last_hidden_state`: `[B, 3, S, S]` → `[B, patches + 1, hidden]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.model.vision_model().forward(&x)?)
    }

    /// Decoder logits for a whole id prefix (`[B, T]`) given `image_embeds` → `[B, T, vocab]`
    /// (f32). Starts a fresh sequence.
    pub fn logits(&mut self, image_embeds: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        self.model.reset_kv_cache();
        let logits = self
            .model
            .text_decoder()
            .forward(&input_ids.to_device(&self.device)?, image_embeds)?;
        self.model.reset_kv_cache();
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Greedy sentences for a batch: `[B, 3, S, S]` → the generated ids of each picture,
    /// without `[DEC]` and `[SEP]`. The vision tower runs on the whole batch; the decoder
    /// one picture at a time (candle-transformers' BLIP text decoder adds its position
    /// embeddings without broadcasting, so it only takes a batch of one).
    pub fn generate_ids(
        &mut self,
        pixel_values: &Tensor,
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let embeds = self.image_embeds(pixel_values)?;
        let device = self.device.clone();
        let (bos, sep) = (self.settings.bos_token_id, self.settings.sep_token_id);
        let mut all = Vec::new();
        for row in 0..embeds.dim(0)? {
            let one = embeds.narrow(0, row, 1)?;
            let model = &mut self.model;
            model.reset_kv_cache();
            let ids = greedy(1, bos, sep, max_new_tokens, |last| {
                let input = Tensor::from_vec(last.to_vec(), (last.len(), 1), &device)?;
                let logits = model.text_decoder().forward(&input, &one)?;
                let steps = logits.dim(1)?;
                let next = logits
                    .i((.., steps - 1, ..))?
                    .to_dtype(DType::F32)?
                    .argmax(D::Minus1)?;
                Ok(next.to_vec1::<u32>()?)
            });
            self.model.reset_kv_cache();
            all.extend(ids?);
        }
        Ok(all)
    }

    /// The longest sentence [`BlipCaptioner::captions`] writes, in tokens (default
    /// [`MAX_NEW_TOKENS`]).
    pub fn set_max_new_tokens(&mut self, n: usize) {
        self.max_new_tokens = n;
    }

    /// Greedy sentences, decoded (special tokens skipped, WordPiece joined).
    pub fn captions(&mut self, pixel_values: &Tensor) -> Result<Vec<String>> {
        let ids = self.generate_ids(pixel_values, self.max_new_tokens)?;
        ids.iter()
            .map(|row| {
                self.tokenizer
                    .decode(row, true)
                    .map(|text| text.trim().to_string())
                    .map_err(|e| {
                        candle_core::Error::Msg(format!("cannot decode BLIP's tokens: {e}")).into()
                    })
            })
            .collect()
    }
}

/// Greedy decoding of `batch` sequences: `step` gets the last token of every row and returns
/// each row's most likely next token. A row ends at `sep` (not included) or after `max_new`
/// tokens; the loop stops when every row has ended.
pub fn greedy(
    batch: usize,
    bos: u32,
    sep: u32,
    max_new: usize,
    mut step: impl FnMut(&[u32]) -> Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>> {
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut last = vec![bos; batch];
    for _ in 0..max_new {
        if batch == 0 || done.iter().all(|d| *d) {
            break;
        }
        let next = step(&last)?;
        if next.len() != batch {
            return Err(candle_core::Error::Msg(format!(
                "greedy decoding: {} next tokens for {batch} sequences",
                next.len()
            ))
            .into());
        }
        for (row, &token) in next.iter().enumerate() {
            if done[row] {
                continue;
            }
            if token == sep {
                done[row] = true;
            } else {
                out[row].push(token);
            }
        }
        last = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_stops_each_row_at_sep_or_the_limit() -> Result<()> {
        // Row 0 ends after two tokens, row 1 never ends.
        let script = [vec![5, 7], vec![6, 8], vec![3, 9], vec![4, 10], vec![4, 11]];
        let mut calls = 0;
        let mut seen = Vec::new();
        let ids = greedy(2, 62, 3, 4, |last| {
            seen.push(last.to_vec());
            calls += 1;
            Ok(script[calls - 1].clone())
        })?;
        assert_eq!(ids, vec![vec![5, 6], vec![7, 8, 9, 10]]);
        assert_eq!(calls, 4);
        assert_eq!(seen[0], vec![62, 62], "starts from BOS");
        assert_eq!(seen[1], vec![5, 7], "feeds back the previous tokens");
        let ids = greedy(1, 62, 3, 10, |_| Ok(vec![3]))?;
        assert_eq!(ids, vec![Vec::<u32>::new()]);
        Ok(())
    }

    #[test]
    fn reads_a_sparse_config_with_transformers_defaults() -> Result<()> {
        let s = BlipSettings::from_json(
            r#"{"model_type": "blip", "text_config": {"encoder_hidden_size": 1024, "num_attention_heads": 12},
                "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                  "intermediate_size": 4096}}"#,
            "config.json",
        )?;
        assert_eq!((s.bos_token_id, s.sep_token_id), (30522, 102));
        let t = &s.config.text_config;
        assert_eq!(
            (t.vocab_size, t.hidden_size, t.num_attention_heads),
            (30524, 768, 12)
        );
        assert_eq!(s.config.vision_config.image_size, 384);
        assert_eq!(t.hidden_act, candle_nn::Activation::Gelu);
        Ok(())
    }

    #[test]
    fn inconsistent_configs_are_named() {
        for (json, needle) in [
            (
                r#"{"vision_config": {"hidden_size": 1024}}"#,
                "encoder_hidden_size 768",
            ),
            (r#"{"model_type": "clip"}"#, "not `blip`"),
            (
                r#"{"text_config": {"bos_token_id": 40000}}"#,
                "bos_token_id 40000",
            ),
            (r#"{"text_config": {"hidden_act": "swoosh"}}"#, "swoosh"),
            (r#"{"text_config": {"is_decoder": false}}"#, "is_decoder"),
        ] {
            let err = BlipSettings::from_json(json, "blip/config.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("blip/config.json") && err.contains(needle),
                "{json}: {err}"
            );
        }
    }
}
