//! The vocabulary's text embeddings, kept on disk between runs.
//!
//! Embedding a few hundred phrases with ViT-L's text tower takes seconds to a minute on a CPU,
//! and the result only depends on the model and the phrases. A cache file holds the unit-length
//! embeddings `[phrases, projection_dim]` (f32) and, in its metadata, the model's fingerprint and
//! the phrases themselves; it is used only when both match exactly, so a changed list, another
//! model or an edited checkpoint recomputes. The file name is a hash of the same key. A cache
//! that cannot be read or written is a warning, never an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// The format written in each file's metadata; bump it when the contents change meaning.
const FORMAT: &str = "lora-trainer vocabulary embeddings v1";
const TENSOR: &str = "embeddings";

/// What happened when the embeddings were asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from this file.
    Hit(PathBuf),
    /// Computed and saved to this file.
    Stored(PathBuf),
    /// Computed; the cache could not be used (the message says why).
    Unavailable(String),
}

/// A folder of cached embeddings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingCache {
    dir: Option<PathBuf>,
}

impl EmbeddingCache {
    /// `$XDG_CACHE_HOME/lora-trainer/vocabulary-embeddings`, else
    /// `~/.cache/lora-trainer/vocabulary-embeddings`; no cache when neither can be found.
    pub fn from_env() -> Self {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let base = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")));
        EmbeddingCache {
            dir: base.map(|b| b.join("lora-trainer").join("vocabulary-embeddings")),
        }
    }

    /// A cache in `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        EmbeddingCache {
            dir: Some(dir.into()),
        }
    }

    /// No cache at all: every run computes.
    pub fn disabled() -> Self {
        EmbeddingCache { dir: None }
    }

    /// The embeddings of `phrases` for the model `model_key` (any text that changes when the
    /// model does), from the cache or from `compute` (`[phrases.len(), D]`), on `device`.
    pub fn get_or_compute(
        &self,
        model_key: &str,
        phrases: &[String],
        device: &Device,
        compute: impl FnOnce() -> Result<Tensor>,
    ) -> Result<(Tensor, CacheOutcome)> {
        let Some(dir) = &self.dir else {
            let computed = compute()?;
            return Ok((computed, CacheOutcome::Unavailable("disabled".to_string())));
        };
        let phrases_json = serde_json::to_string(phrases).unwrap_or_default();
        let path = dir.join(format!(
            "{:016x}.safetensors",
            fnv1a(&[FORMAT, model_key, &phrases_json])
        ));
        if let Some(found) = read(&path, model_key, &phrases_json, phrases.len()) {
            return Ok((found.to_device(device)?, CacheOutcome::Hit(path)));
        }
        let computed = compute()?;
        let outcome = match write(&path, model_key, &phrases_json, &computed) {
            Ok(()) => CacheOutcome::Stored(path),
            Err(reason) => CacheOutcome::Unavailable(format!(
                "cannot write the vocabulary embedding cache {}: {reason}",
                path.display()
            )),
        };
        Ok((computed, outcome))
    }
}

/// 64-bit FNV-1a over the parts, each followed by a 0 byte.
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in part.as_bytes().iter().chain(&[0u8]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The cached tensor when the file exists and its key matches exactly; `None` otherwise.
fn read(path: &Path, model_key: &str, phrases_json: &str, rows: usize) -> Option<Tensor> {
    let bytes = std::fs::read(path).ok()?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let meta = metadata.metadata().as_ref()?;
    let matches = meta.get("format").map(String::as_str) == Some(FORMAT)
        && meta.get("model").map(String::as_str) == Some(model_key)
        && meta.get("phrases").map(String::as_str) == Some(phrases_json);
    if !matches {
        return None;
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
    let tensor = tensors.get(TENSOR)?.clone();
    (tensor.dims().first() == Some(&rows) && tensor.rank() == 2).then_some(tensor)
}

/// Writes the file under a temporary name, then renames it into place.
fn write(
    path: &Path,
    model_key: &str,
    phrases_json: &str,
    embeddings: &Tensor,
) -> std::result::Result<(), String> {
    let dir = path.parent().ok_or("no parent folder")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let tensor = embeddings
        .to_dtype(DType::F32)
        .and_then(|t| t.to_device(&Device::Cpu))
        .map_err(|e| e.to_string())?;
    let metadata: HashMap<String, String> = [
        ("format", FORMAT),
        ("model", model_key),
        ("phrases", phrases_json),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let data =
        safetensors::serialize([(TENSOR, &tensor)], Some(metadata)).map_err(|e| e.to_string())?;
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&temporary, data).map_err(|e| e.to_string())?;
    std::fs::rename(&temporary, path).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        e.to_string()
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn phrases(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn embeddings(rows: usize, value: f32) -> Result<Tensor> {
        Ok(Tensor::full(value, (rows, 4), &Device::Cpu)?)
    }

    #[test]
    fn a_second_run_reads_what_the_first_stored() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        let cache = EmbeddingCache::at(dir.path());
        let list = phrases(&["a cat", "a dog"]);
        let calls = Cell::new(0);
        let compute = || {
            calls.set(calls.get() + 1);
            embeddings(2, 0.5)
        };
        let (first, outcome) = cache.get_or_compute("model-a", &list, &Device::Cpu, compute)?;
        assert!(matches!(outcome, CacheOutcome::Stored(_)), "{outcome:?}");
        let (second, outcome) = cache.get_or_compute("model-a", &list, &Device::Cpu, || {
            calls.set(calls.get() + 1);
            embeddings(2, 9.0)
        })?;
        assert!(matches!(outcome, CacheOutcome::Hit(_)), "{outcome:?}");
        assert_eq!(calls.get(), 1);
        assert_eq!(first.to_vec2::<f32>()?, second.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn another_model_or_other_phrases_recompute() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        let cache = EmbeddingCache::at(dir.path());
        let list = phrases(&["a cat", "a dog"]);
        cache.get_or_compute("model-a", &list, &Device::Cpu, || embeddings(2, 0.5))?;
        let (t, outcome) =
            cache.get_or_compute("model-b", &list, &Device::Cpu, || embeddings(2, 1.0))?;
        assert!(matches!(outcome, CacheOutcome::Stored(_)));
        assert_eq!(t.to_vec2::<f32>()?[0][0], 1.0);
        let edited = phrases(&["a cat", "a wolf"]);
        let (t, outcome) =
            cache.get_or_compute("model-a", &edited, &Device::Cpu, || embeddings(2, 2.0))?;
        assert!(matches!(outcome, CacheOutcome::Stored(_)));
        assert_eq!(t.to_vec2::<f32>()?[0][0], 2.0);
        Ok(())
    }

    #[test]
    fn a_corrupt_or_colliding_file_is_not_trusted() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        let cache = EmbeddingCache::at(dir.path());
        let list = phrases(&["x"]);
        let (_, outcome) = cache.get_or_compute("m", &list, &Device::Cpu, || embeddings(1, 0.5))?;
        let CacheOutcome::Stored(path) = outcome else {
            panic!("not stored: {outcome:?}");
        };
        std::fs::write(&path, b"garbage").expect("write");
        let (t, outcome) = cache.get_or_compute("m", &list, &Device::Cpu, || embeddings(1, 3.0))?;
        assert!(matches!(outcome, CacheOutcome::Stored(_)));
        assert_eq!(t.to_vec2::<f32>()?[0][0], 3.0);
        // A file under the right name but with another key inside (a hash collision).
        write(&path, "other", "[\"x\"]", &embeddings(1, 7.0)?).expect("write");
        assert!(read(&path, "m", "[\"x\"]", 1).is_none());
        Ok(())
    }

    #[test]
    fn an_unwritable_cache_is_only_a_warning() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"not a folder").expect("write");
        let cache = EmbeddingCache::at(blocker.join("sub"));
        let (t, outcome) =
            cache.get_or_compute("m", &phrases(&["x"]), &Device::Cpu, || embeddings(1, 1.0))?;
        assert!(
            matches!(outcome, CacheOutcome::Unavailable(_)),
            "{outcome:?}"
        );
        assert_eq!(t.dims(), &[1, 4]);
        Ok(())
    }

    #[test]
    fn fnv1a_separates_parts() {
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
        assert_eq!(fnv1a(&["x"]), fnv1a(&["x"]));
    }
}
