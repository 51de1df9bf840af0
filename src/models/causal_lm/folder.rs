//! A causal language model's folder as transformers saves it (and as the Hugging Face cache holds
//! a snapshot): `config.json` and the weights in `model.safetensors`, or in shards listed by
//! `model.safetensors.index.json`; f32, f16 or bf16, converted to the run's dtype as each tensor
//! is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::CausalLmConfig;
use crate::error::ModelError;
use crate::models::config_json::read_model_file;
use crate::nn::weights::{Entry, TensorSource, Transform};
use crate::nn::WeightStore;
use crate::Result;

/// A model folder, opened: its config and a store over every weight (headers read, no tensor).
pub struct LmFolder {
    pub folder: PathBuf,
    pub config: CausalLmConfig,
    pub weights: WeightStore,
}

impl LmFolder {
    /// Opens `folder`; weights are converted to `dtype` on `device` when read.
    pub fn open(folder: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = folder.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::NotFound {
                path: config_path,
                hint:
                    "a language model folder holds config.json beside its weights, as \
                       transformers' save_pretrained writes it; point `base_model` at such a folder"
                        .to_string(),
            }
            .into());
        }
        let config = CausalLmConfig::from_file(&config_path)?;
        let mut weights = WeightStore::new(dtype, device.clone());
        let single = folder.join("model.safetensors");
        let index = folder.join("model.safetensors.index.json");
        if single.is_file() {
            let source = TensorSource::safetensors(&single)?;
            let keys = source.keys_and_shapes();
            let at = weights.add_source(source);
            for (key, _) in keys {
                weights.insert(key.clone(), entry(at, key));
            }
        } else if index.is_file() {
            for (shard, keys) in shards(&index)? {
                let path = folder.join(&shard);
                if !path.is_file() {
                    return Err(ModelError::NotFound {
                        path,
                        hint: format!(
                            "{} lists this shard; the download is incomplete: fetch the \
                             whole model folder again",
                            index.display()
                        ),
                    }
                    .into());
                }
                let source = TensorSource::safetensors(&path)?;
                let present: Vec<String> = source
                    .keys_and_shapes()
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                if let Some(missing) = keys.iter().find(|k| !present.contains(k)) {
                    return Err(ModelError::InvalidConfig {
                        origin: index.display().to_string(),
                        message: format!(
                            "the index places `{missing}` in {shard}, which does not hold it"
                        ),
                    }
                    .into());
                }
                let at = weights.add_source(source);
                for key in keys {
                    weights.insert(key.clone(), entry(at, key));
                }
            }
        } else {
            let hint = if folder.join("pytorch_model.bin").is_file() {
                "it holds pytorch_model.bin only: this program reads safetensors weights; save the \
                 model again with save_pretrained(..., safe_serialization=True)"
            } else {
                "a language model folder holds model.safetensors or model.safetensors.index.json \
                 with its shards; copy or download the whole folder"
            };
            return Err(ModelError::NotFound {
                path: single,
                hint: hint.to_string(),
            }
            .into());
        }
        Ok(LmFolder {
            folder: folder.to_path_buf(),
            config,
            weights,
        })
    }
}

fn entry(source: usize, key: String) -> Entry {
    Entry {
        source,
        key,
        transform: Transform::None,
    }
}

/// Shard file → the keys it holds, from `model.safetensors.index.json`'s `weight_map`.
fn shards(index: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let text = read_model_file(index)?;
    let bad = |message: String| -> crate::Error {
        ModelError::InvalidConfig {
            origin: index.display().to_string(),
            message,
        }
        .into()
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".to_string()))?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains("..") && !f.starts_with('/'))
            .ok_or_else(|| {
                bad(format!(
                    "`{key}` is mapped to {file}, not a file in the folder"
                ))
            })?;
        shards
            .entry(file.to_string())
            .or_default()
            .push(key.clone());
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::causal_lm::CausalLm;
    use crate::nn::Scope;
    use candle_core::Tensor;
    use std::collections::HashMap;

    fn logits(folder: &LmFolder, ids: &Tensor) -> Tensor {
        let model = CausalLm::new(Scope::root(&folder.weights), &folder.config).unwrap();
        folder.weights.check_all_used().unwrap();
        model.forward(ids).unwrap()
    }

    /// The llama fixture split into two shards with an index, and stored in bf16: the same
    /// model (bit for bit from shards; within bf16 rounding from bf16).
    #[test]
    fn shards_and_half_precision_files_load_as_the_single_file() {
        let fixture = crate::fixtures::root().join("llm/llama");
        let ids = Tensor::new(&[[5u32, 9, 200, 3, 17]], &Device::Cpu).unwrap();
        let whole = LmFolder::open(&fixture, DType::F32, &Device::Cpu).unwrap();
        let want = logits(&whole, &ids);

        let tensors =
            candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sharded = dir.path().join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        std::fs::copy(fixture.join("config.json"), sharded.join("config.json")).unwrap();
        let mut parts: [HashMap<String, Tensor>; 2] = Default::default();
        let mut map = serde_json::Map::new();
        for (i, (key, t)) in tensors.iter().enumerate() {
            let shard = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
            parts[i % 2].insert(key.clone(), t.clone());
            map.insert(key.clone(), shard.into());
        }
        for (i, part) in parts.iter().enumerate() {
            let name = format!("model-0000{}-of-00002.safetensors", i + 1);
            candle_core::safetensors::save(part, sharded.join(name)).unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            sharded.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let got = logits(
            &LmFolder::open(&sharded, DType::F32, &Device::Cpu).unwrap(),
            &ids,
        );
        let same = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);

        let half = dir.path().join("bf16");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::copy(fixture.join("config.json"), half.join("config.json")).unwrap();
        let bf16: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&bf16, half.join("model.safetensors")).unwrap();
        let got = logits(
            &LmFolder::open(&half, DType::F32, &Device::Cpu).unwrap(),
            &ids,
        );
        let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap();
        let relative = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
        assert!(relative > 0.0 && relative < 0.05, "{relative}");

        // A shard the index lists but the folder lacks is named.
        std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
        let e = LmFolder::open(&sharded, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
        assert!(e.contains("incomplete"), "{e}");
    }

    #[test]
    fn a_folder_without_weights_or_config_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = LmFolder::open(dir.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::copy(
            crate::fixtures::root().join("llm/qwen2/config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"").unwrap();
        let e = LmFolder::open(dir.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("safe_serialization=True"), "{e}");
    }
}
