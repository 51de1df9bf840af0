//! Writing the LoRA file: kohya/A1111 keys (the default) or diffusers/PEFT keys, in the chosen
//! precision, with the header metadata and kohya's `sshs_*` hashes, written atomically.
//!
//! - kohya: `lora_unet_<path . → _>.lora_down.weight` `[r, in(, k, k)]`, `.lora_up.weight`
//!   `[out, r(, 1, 1)]` and a 0-dim `.alpha`; text encoder `lora_te_text_model_encoder_…`. No
//!   other tensors (diffusers refuses a file with a key it cannot place, A1111 warns).
//! - diffusers: `unet.<path>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<path>…`, the
//!   matrices as they are, with alpha carried the way diffusers 0.42 reads it: the header's
//!   `lora_adapter_metadata` (PEFT `LoraConfig`s per model: `r`, `lora_alpha`, and
//!   `rank_pattern`/`alpha_pattern` for modules that differ), so `load_lora_weights` fuses
//!   `W + (alpha / r) · B · A` like our adapters.
//!
//! Every tensor is saved in `save_precision`, the alphas included (as kohya does). The file is
//! written to a temporary name in the same folder, synced, then renamed over the target: a
//! failure leaves an existing file untouched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::adapter::LoraAdapter;
use super::hash::addnet_hashes;
use super::names::{LoraBase, LoraModel};
use crate::config::{SaveFormat, SavePrecision};
use crate::{Error, Result};

/// The tensor dtype of a save precision.
pub fn save_dtype(precision: SavePrecision) -> DType {
    match precision {
        SavePrecision::Fp16 => DType::F16,
        SavePrecision::Bf16 => DType::BF16,
        SavePrecision::Fp32 => DType::F32,
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedLora {
    pub path: PathBuf,
    pub format: SaveFormat,
    pub modules: usize,
    /// `sshs_model_hash`.
    pub model_hash: String,
    /// `sshs_legacy_hash`.
    pub legacy_hash: String,
    pub bytes: u64,
}

/// Saves `adapters` to `path` in `format` and `precision`; `metadata` (from
/// [`super::metadata::TrainingMetadata::to_header`]) is completed with the `sshs_*` hashes (and
/// diffusers' `lora_adapter_metadata`). kohya names are `base`'s (SD-style when unknown).
pub fn save_lora(
    adapters: &[Arc<LoraAdapter>],
    base: Option<&LoraBase>,
    path: &Path,
    format: SaveFormat,
    precision: SavePrecision,
    metadata: &BTreeMap<String, String>,
) -> Result<SavedLora> {
    let dtype = save_dtype(precision);
    let mut header = metadata.clone();
    let tensors = match format {
        SaveFormat::Kohya => kohya_tensors(adapters, base, dtype)?,
        SaveFormat::Diffusers => {
            header.insert(
                "lora_adapter_metadata".to_string(),
                diffusers_adapter_metadata(adapters),
            );
            // Not a kohya network: `ss_network_module` would tell A1111's and kohya's tools it
            // is one, and they cannot load its `unet.` keys. diffusers marks its own files so.
            header.remove("ss_network_module");
            header.insert("format".to_string(), "pt".to_string());
            diffusers_tensors(adapters, dtype)?
        }
    };
    let (model_hash, legacy_hash) = addnet_hashes(&tensors, &header)?;
    header.insert("sshs_model_hash".to_string(), model_hash.clone());
    header.insert("sshs_legacy_hash".to_string(), legacy_hash.clone());
    let bytes = serialize(&tensors, &header)?;
    write_atomically(path, &bytes)?;
    Ok(SavedLora {
        path: path.to_path_buf(),
        format,
        modules: adapters.len(),
        model_hash,
        legacy_hash,
        bytes: bytes.len() as u64,
    })
}

/// kohya's tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`, named
/// for `base` (SD 1.x-style names when it is unknown).
pub fn kohya_tensors(
    adapters: &[Arc<LoraAdapter>],
    base: Option<&LoraBase>,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(3 * adapters.len());
    for a in adapters {
        let spec = a.spec();
        let name = match base {
            Some(base) => base.kohya_name(spec.model, &spec.path),
            None => spec.kohya_name(),
        };
        let alpha = Tensor::new(a.spec().alpha, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.push((format!("{name}.lora_down.weight"), saved(a.down(), dtype)?));
        tensors.push((format!("{name}.lora_up.weight"), saved(a.up(), dtype)?));
        tensors.push((format!("{name}.alpha"), alpha));
    }
    Ok(tensors)
}

/// diffusers' tensors: `<prefix>.<path>.lora_A.weight` (down), `.lora_B.weight` (up). The text
/// encoder's paths keep the `text_model.` prefix (diffusers strips it for transformers versions
/// whose CLIPTextModel lacks it).
pub fn diffusers_tensors(
    adapters: &[Arc<LoraAdapter>],
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(2 * adapters.len());
    for a in adapters {
        let key = format!("{}.{}", a.spec().model.diffusers_prefix(), a.spec().path);
        tensors.push((format!("{key}.lora_A.weight"), saved(a.down(), dtype)?));
        tensors.push((format!("{key}.lora_B.weight"), saved(a.up(), dtype)?));
    }
    Ok(tensors)
}

/// diffusers' `lora_adapter_metadata` JSON: per model, the most common rank and alpha as `r` and
/// `lora_alpha`, the others in `rank_pattern`/`alpha_pattern`, and every adapted module in
/// `target_modules`. Text-encoder paths are written without `text_model.`, which PEFT's suffix
/// matching finds under either CLIPTextModel layout.
pub fn diffusers_adapter_metadata(adapters: &[Arc<LoraAdapter>]) -> String {
    let mut config = serde_json::Map::new();
    for model in LoraModel::ALL {
        let specs: Vec<_> = adapters
            .iter()
            .map(|a| a.spec())
            .filter(|s| s.model == model)
            .collect();
        if specs.is_empty() {
            continue;
        }
        let name =
            |path: &str| -> String { path.strip_prefix("text_model.").unwrap_or(path).to_string() };
        let r = most_common(specs.iter().map(|s| s.rank as f64));
        let alpha = most_common(specs.iter().map(|s| s.alpha));
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for s in &specs {
            if s.rank as f64 != r {
                rank_pattern.insert(name(&s.path), s.rank.into());
            }
            if s.alpha != alpha {
                alpha_pattern.insert(name(&s.path), json_number(s.alpha));
            }
        }
        let targets: Vec<serde_json::Value> = specs.iter().map(|s| name(&s.path).into()).collect();
        let prefix = model.diffusers_prefix();
        let mut put = |key: &str, value: serde_json::Value| {
            config.insert(format!("{prefix}.{key}"), value);
        };
        put("r", json_number(r));
        put("lora_alpha", json_number(alpha));
        put("rank_pattern", rank_pattern.into());
        put("alpha_pattern", alpha_pattern.into());
        put("target_modules", targets.into());
        put("lora_dropout", json_number(0.0));
        put("bias", "none".into());
        put("use_dora", false.into());
        put("use_rslora", false.into());
    }
    serde_json::Value::Object(config).to_string()
}

/// The most frequent value (the smallest among equally frequent ones).
fn most_common(values: impl Iterator<Item = f64>) -> f64 {
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
    counts.first().map_or(0.0, |c| c.0)
}

/// Integers as JSON integers (PEFT's `r` must be an int), other values as floats.
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::Value::from(x as i64)
    } else {
        serde_json::Value::from(x)
    }
}

/// A variable as saved: `dtype`, on the CPU, contiguous.
fn saved(var: &Var, dtype: DType) -> Result<Tensor> {
    Ok(var
        .as_tensor()
        .to_dtype(dtype)?
        .to_device(&Device::Cpu)?
        .contiguous()?)
}

/// The `.safetensors` bytes of `tensors` with `metadata`.
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let header: HashMap<String, String> = metadata.clone().into_iter().collect();
    let pairs = tensors.iter().map(|(k, t)| (k.as_str(), t));
    Ok(safetensors::serialize(pairs, Some(header)).map_err(candle_core::Error::from)?)
}

/// Writes `bytes` to `path` atomically ([`crate::files::write_atomically`]), creating its
/// folder; the error names `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    }
    crate::files::write_atomically(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_common_prefers_frequency_then_the_smaller_value() {
        assert_eq!(most_common([4.0, 8.0, 8.0].into_iter()), 8.0);
        assert_eq!(most_common([8.0, 4.0].into_iter()), 4.0);
    }

    #[test]
    fn a_failed_write_leaves_the_existing_file_and_no_temporary() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("x.safetensors");
        write_atomically(&path, b"first")?;
        write_atomically(&path, b"second")?;
        assert_eq!(std::fs::read(&path).ok(), Some(b"second".to_vec()));
        // A folder where the temporary file would go makes the write fail.
        std::fs::create_dir(crate::files::temporary_path(&path))
            .map_err(|e| Error::io("mkdir", e))?;
        let err = write_atomically(&path, b"third").unwrap_err().to_string();
        assert!(err.contains("x.safetensors"), "{err}");
        assert_eq!(std::fs::read(&path).ok(), Some(b"second".to_vec()));
        Ok(())
    }
}
