//! CLIP as `auto_label` uses it: a model folder (weights, tokenizer, image processor) that turns
//! pictures and phrases into unit-length embeddings whose dot product ranks the phrases.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::embed_cache::fnv1a;
use super::preprocess::{ImageProcessor, ResizeTo};
use crate::models::clip_model::{clip_weights_file, unit_length, ClipModel};
use crate::models::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// Phrases embedded per forward pass of the text tower.
const TEXT_BATCH: usize = 64;

/// A loaded CLIP model folder.
pub struct ClipScorer {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    processor: ImageProcessor,
    device: Device,
    fingerprint: String,
    folder: PathBuf,
}

impl ClipScorer {
    /// Loads `folder`: `config.json`, `model.safetensors` (or `pytorch_model.bin`), the
    /// tokenizer files, and `preprocessor_config.json` (transformers' `CLIPImageProcessor`
    /// defaults when absent). f32 on the CPU, f16 on a GPU.
    pub fn from_folder(folder: &Path, device: &Device) -> Result<Self> {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        };
        let model = ClipModel::from_folder(folder, dtype, device)?;
        let tokenizer = ClipTokenizer::from_dir(folder)?;
        let processor_path = folder.join("preprocessor_config.json");
        let processor = if processor_path.is_file() {
            ImageProcessor::from_file(&processor_path, ImageProcessor::clip_default())?
        } else {
            ImageProcessor::clip_default()
        };
        let side = model.config().vision.image_size as u32;
        let produces = match (processor.crop, processor.resize) {
            (Some(crop), _) => Some(crop),
            (None, Some(ResizeTo::Exact { width, height })) => Some((width, height)),
            _ => None,
        };
        if produces != Some((side, side)) {
            return Err(crate::error::ModelError::InvalidConfig {
                origin: processor_path.display().to_string(),
                message: format!(
                    "the image processor does not make {side}x{side} pictures (it makes {}), but this model's vision tower takes them",
                    produces.map_or("pictures of varying size".to_string(), |(w, h)| format!("{w}x{h}"))
                ),
            }
            .into());
        }
        let fingerprint = fingerprint(folder, dtype)?;
        Ok(ClipScorer {
            model,
            tokenizer,
            processor,
            device: device.clone(),
            fingerprint,
            folder: folder.to_path_buf(),
        })
    }

    /// The model folder.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Text that changes whenever the embeddings could: the weight file (path, size, time),
    /// the config and tokenizer files' contents, and the dtype.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The picture as the vision tower takes it: `[3, S, S]` f32 on the CPU.
    pub fn pixel_values(&self, image: &RgbImage) -> Result<Tensor> {
        self.processor.pixel_values(image, &Device::Cpu)
    }

    /// Unit-length image embeddings of a batch: `[B, 3, S, S]` → `[B, D]` f32.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = pixel_values.to_device(&self.device)?;
        Ok(unit_length(&self.model.image_features(&x)?.to_dtype(DType::F32)?)?.contiguous()?)
    }

    /// Unit-length text embeddings: `phrases` → `[phrases.len(), D]` f32.
    pub fn text_embeds(&self, phrases: &[String]) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in phrases.chunks(TEXT_BATCH) {
            let ids = self.tokenizer.input_ids(chunk, &self.device)?;
            let features = self.model.text_features(&ids)?.to_dtype(DType::F32)?;
            parts.push(unit_length(&features)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.model.config().projection_dim),
                DType::F32,
                &self.device,
            )?);
        }
        Ok(Tensor::cat(&parts, 0)?.contiguous()?)
    }

    /// Whether `caption` fits the text encoder without truncation.
    pub fn fits(&self, caption: &str) -> Result<bool> {
        Ok(self.tokenizer.truncated_tokens(caption)? == 0)
    }

    /// The tokenizer (for the caption budget).
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The image processor read from the folder.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }
}

fn fingerprint(folder: &Path, dtype: DType) -> Result<String> {
    let weights = clip_weights_file(folder)?;
    let meta = std::fs::metadata(&weights).map_err(|e| Error::io(&weights, e))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = weights.canonicalize().unwrap_or(weights);
    let mut contents = Vec::new();
    for name in [
        "config.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let text = std::fs::read(folder.join(name)).unwrap_or_default();
        contents.push(format!(
            "{name}:{:016x}",
            fnv1a(&[&String::from_utf8_lossy(&text)])
        ));
    }
    Ok(format!(
        "{}|{}|{}|{:?}|{}",
        canonical.display(),
        meta.len(),
        modified,
        dtype,
        contents.join("|")
    ))
}
