//! Where a base model comes from: a diffusers folder, a single checkpoint file or a hub id.
//!
//! [`ModelSource::detect`] decides which one a config's `base_model` names and checks what can
//! be checked without reading weights (configs, a safetensors header, a pickle's index), and
//! finds the model's family by structure with the rules of [`super::family`], once: the source
//! carries its [`Architecture`] to whoever loads it.

use std::fmt;

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::family::{folder_family, ldm_architecture, Architecture, BASE_MODEL_FORMS};
use crate::config::{is_hub_id, weights_format, WeightsFormat};
use crate::error::ModelError;
use crate::nn::weights::TensorSource;
use crate::{Error, Result};

/// A base model that exists (or, for a hub id, can be fetched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, ...).
    Diffusers {
        root: PathBuf,
        architecture: Option<Architecture>,
    },
    /// An original-layout (LDM) checkpoint in one file.
    SingleFile {
        path: PathBuf,
        format: WeightsFormat,
        architecture: Option<Architecture>,
    },
    /// A Hugging Face hub id; `snapshot` is its folder in the local cache when downloaded.
    Hub {
        id: String,
        snapshot: Option<PathBuf>,
        architecture: Option<Architecture>,
    },
}

impl ModelSource {
    /// Finds out what `base_model` names, looking up hub ids in the standard Hugging Face cache.
    pub fn detect(base_model: &str) -> Result<ModelSource> {
        ModelSource::detect_with(base_model, &super::hub::HubCache::from_env())
    }

    /// [`ModelSource::detect`] with an explicit hub cache.
    pub fn detect_with(base_model: &str, cache: &super::hub::HubCache) -> Result<ModelSource> {
        let path = Path::new(base_model);
        if path.is_dir() {
            return diffusers_folder(path);
        }
        if path.is_file() {
            return single_file(path);
        }
        if is_hub_id(base_model) {
            let snapshot = cache.snapshot(base_model);
            let architecture = match &snapshot {
                Some(folder) if folder.join("unet").join("config.json").is_file() => {
                    Some(folder_architecture(folder)?)
                }
                _ => None,
            };
            return Ok(ModelSource::Hub {
                id: base_model.to_string(),
                snapshot,
                architecture,
            });
        }
        Err(ModelError::NotFound {
            path: path.to_path_buf(),
            hint: format!("check `base_model` in the config; {BASE_MODEL_FORMS}"),
        }
        .into())
    }

    /// SD 1.x or 2.x and the cross-attention width, when they could be told without loading
    /// weights.
    pub fn architecture(&self) -> Option<Architecture> {
        match self {
            ModelSource::Diffusers { architecture, .. }
            | ModelSource::SingleFile { architecture, .. }
            | ModelSource::Hub { architecture, .. } => *architecture,
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Diffusers { root, .. } => write!(f, "diffusers folder {}", root.display()),
            ModelSource::SingleFile { path, format, .. } => {
                let kind = match format {
                    WeightsFormat::Safetensors => "safetensors",
                    WeightsFormat::Pickle => "PyTorch pickle",
                };
                write!(f, "single-file checkpoint ({kind}) {}", path.display())
            }
            ModelSource::Hub {
                id,
                snapshot: Some(folder),
                ..
            } => {
                write!(
                    f,
                    "hub id {id}, in the Hugging Face cache at {}",
                    folder.display()
                )
            }
            ModelSource::Hub {
                id, snapshot: None, ..
            } => write!(
                f,
                "hub id {id}, not in the Hugging Face cache: it will be downloaded \
                 (if you meant a local folder, it does not exist)"
            ),
        }
    }
}

fn unreadable(path: &Path, reason: String) -> Error {
    ModelError::Unreadable {
        path: path.to_path_buf(),
        reason,
    }
    .into()
}

fn diffusers_folder(root: &Path) -> Result<ModelSource> {
    let has_index = root.join("model_index.json").is_file();
    let has_unet = root.join("unet").join("config.json").is_file();
    if !has_index && !has_unet {
        return Err(unreadable(
            root,
            format!("this folder holds neither model_index.json nor unet/config.json; {BASE_MODEL_FORMS}"),
        ));
    }
    let architecture = if has_unet {
        Some(folder_architecture(root)?)
    } else {
        None
    };
    Ok(ModelSource::Diffusers {
        root: root.to_path_buf(),
        architecture,
    })
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ModelError::InvalidConfig {
            origin: path.display().to_string(),
            message: "expected a JSON object of settings".to_string(),
        }
        .into()),
        Err(e) => Err(ModelError::InvalidConfig {
            origin: path.display().to_string(),
            message: format!("not valid JSON: {e}"),
        }
        .into()),
    }
}

/// The architecture of a diffusers folder, from its `model_index.json`, `unet/config.json` and,
/// when present, `text_encoder/config.json` ([`folder_family`] decides).
pub(crate) fn folder_architecture(root: &Path) -> Result<Architecture> {
    let index_path = root.join("model_index.json");
    let index = match index_path.is_file() {
        true => Some(read_json_object(&index_path)?),
        false => None,
    };
    let unet_path = root.join("unet").join("config.json");
    let unet = read_json_object(&unet_path)?;
    let text_path = root.join("text_encoder").join("config.json");
    let text = match text_path.is_file() {
        true => Some(read_json_object(&text_path)?),
        false => None,
    };
    folder_family(index.as_ref(), &unet, text.as_ref()).map_err(|problem| problem.at(&unet_path))
}

fn single_file(path: &Path) -> Result<ModelSource> {
    let format = weights_format(path)
        .ok_or_else(|| unreadable(path, format!("unknown file type; {BASE_MODEL_FORMS}")))?;
    let keys = match format {
        WeightsFormat::Safetensors => safetensors_header(path)?,
        WeightsFormat::Pickle => open_pickle(path)?.keys_and_shapes(),
    };
    let architecture = ldm_architecture(&keys).map_err(|e| e.at(path))?;
    Ok(ModelSource::SingleFile {
        path: path.to_path_buf(),
        format,
        architecture: Some(architecture),
    })
}

/// Opens a pickle checkpoint: the tensors under its `state_dict` entry, or the top-level dict
/// when there is no such entry.
pub(crate) fn open_pickle(path: &Path) -> Result<TensorSource> {
    match TensorSource::pickle(path, Some("state_dict")) {
        Ok(source) if !source.keys_and_shapes().is_empty() => Ok(source),
        _ => TensorSource::pickle(path, None),
    }
}

/// Every tensor name and shape of a safetensors file, from its header alone.
fn safetensors_header(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let file = crate::nn::tensor_file::TensorFile::open(path).map_err(|reason| {
        unreadable(
            path,
            format!("{reason}; the download may be incomplete or the file is not a checkpoint"),
        )
    })?;
    Ok(file.keys_and_shapes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::family::ModelFamily;
    use crate::models::hub::HubCache;
    use std::collections::BTreeMap;

    /// Writes a safetensors file whose tensors are all zeros, with the given names and shapes.
    fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>)]) {
        let mut header = BTreeMap::new();
        let mut offset = 0;
        for (name, shape) in tensors {
            let bytes = shape.iter().product::<usize>() * 2;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(vec![0u8; offset]);
        std::fs::write(path, out).unwrap();
    }

    const TO_K: &str =
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    const PROJ_IN: &str = "model.diffusion_model.input_blocks.1.1.proj_in.weight";

    fn error_text(r: Result<ModelSource>) -> String {
        r.unwrap_err().to_string()
    }

    fn detect(path: &Path) -> Result<ModelSource> {
        ModelSource::detect(path.to_str().unwrap())
    }

    #[test]
    fn single_file_version_comes_from_structure_not_width() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            // (text encoder key, proj_in shape, width, expected version, display)
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                vec![320, 320, 1, 1],
                768,
                ModelFamily::Sd1,
                "SD 1.x",
            ),
            (
                "cond_stage_model.model.ln_final.weight",
                vec![320, 320],
                1024,
                ModelFamily::Sd2,
                "SD 2.x",
            ),
            // A tiny SD2: OpenCLIP keys decide, not the 128 width.
            (
                "cond_stage_model.model.ln_final.weight",
                vec![32, 32],
                128,
                ModelFamily::Sd2,
                "SD 2.x-style, cross-attention width 128",
            ),
            // No text encoder in the file: the projection's shape decides.
            (
                "first_stage_model.encoder.conv_in.weight",
                vec![32, 32],
                1024,
                ModelFamily::Sd2,
                "SD 2.x",
            ),
            (
                "first_stage_model.encoder.conv_in.weight",
                vec![32, 32, 1, 1],
                64,
                ModelFamily::Sd1,
                "SD 1.x-style, cross-attention width 64",
            ),
        ];
        for (i, (text_key, proj_in, width, version, shown)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("m{i}.safetensors"));
            write_safetensors(
                &path,
                &[
                    (TO_K, vec![320, width]),
                    (PROJ_IN, proj_in),
                    (text_key, vec![2]),
                ],
            );
            let source = detect(&path).unwrap();
            let architecture = source.architecture().unwrap();
            assert_eq!(architecture.family, version, "case {i}");
            assert_eq!(architecture.cross_attention_dim, width);
            assert_eq!(architecture.to_string(), shown);
            assert!(matches!(
                source,
                ModelSource::SingleFile {
                    format: WeightsFormat::Safetensors,
                    ..
                }
            ));
        }
    }

    #[test]
    fn sdxl_single_files_are_told_by_their_size_conditioning() {
        let dir = tempfile::tempdir().unwrap();
        let wide = dir.path().join("xl.safetensors");
        write_safetensors(&wide, &[(TO_K, vec![640, 2048])]);
        let message = error_text(detect(&wide));
        assert!(
            message.contains("SDXL") && message.contains("xl.safetensors"),
            "{message}"
        );
        let sdxl = dir.path().join("sdxl.safetensors");
        write_safetensors(
            &sdxl,
            &[
                (TO_K, vec![640, 2048]),
                (
                    "model.diffusion_model.label_emb.0.0.weight",
                    vec![1280, 2816],
                ),
                ("conditioner.embedders.1.model.ln_final.weight", vec![1280]),
            ],
        );
        assert_eq!(
            detect(&sdxl).unwrap().architecture(),
            Some(Architecture {
                family: ModelFamily::Sdxl,
                cross_attention_dim: 2048
            })
        );
        let embedders = dir.path().join("xl2.safetensors");
        write_safetensors(
            &embedders,
            &[
                (TO_K, vec![640, 64]),
                ("conditioner.embedders.0.transformer.text_model.x", vec![2]),
            ],
        );
        let message = error_text(detect(&embedders));
        assert!(
            message.contains("SDXL") && message.contains("conditioner.embedders.0"),
            "{message}"
        );
    }

    #[test]
    fn safetensors_that_are_not_sd_checkpoints_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let lora = dir.path().join("lora.safetensors");
        write_safetensors(&lora, &[("lora_unet_x.lora_down.weight", vec![4, 8])]);
        assert!(error_text(detect(&lora)).contains("LoRA file"));
        let other = dir.path().join("other.safetensors");
        write_safetensors(&other, &[("weight", vec![4])]);
        assert!(error_text(detect(&other)).contains("model.diffusion_model."));
        let broken = dir.path().join("broken.safetensors");
        std::fs::write(&broken, b"\x10\0\0\0\0\0\0\0{not json at all").unwrap();
        let message = error_text(detect(&broken));
        assert!(
            message.contains("not a valid safetensors file"),
            "{message}"
        );
        assert!(message.contains("broken.safetensors"), "{message}");
    }

    #[test]
    fn pickles_are_read_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("m.ckpt");
        std::fs::write(&ckpt, b"pickle").unwrap();
        let message = error_text(detect(&ckpt));
        assert!(
            message.contains("m.ckpt") && message.contains("cannot read"),
            "{message}"
        );
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, b"hello").unwrap();
        assert!(error_text(detect(&txt)).contains("unknown file type"));
    }

    #[test]
    fn diffusers_folders_need_their_index_or_unet_config() {
        let dir = tempfile::tempdir().unwrap();
        let message = error_text(detect(dir.path()));
        assert!(
            message.contains("neither model_index.json nor unet/config.json"),
            "{message}"
        );
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        std::fs::write(
            dir.path().join("unet/config.json"),
            r#"{"cross_attention_dim": 1024, "use_linear_projection": true}"#,
        )
        .unwrap();
        let source = detect(dir.path()).unwrap();
        let v2 = Architecture {
            family: ModelFamily::Sd2,
            cross_attention_dim: 1024,
        };
        assert_eq!(
            source,
            ModelSource::Diffusers {
                root: dir.path().to_path_buf(),
                architecture: Some(v2)
            }
        );
        // The text encoder's activation outranks the projection kind.
        std::fs::create_dir(dir.path().join("text_encoder")).unwrap();
        std::fs::write(
            dir.path().join("text_encoder/config.json"),
            r#"{"hidden_act": "quick_gelu"}"#,
        )
        .unwrap();
        let architecture = detect(dir.path()).unwrap().architecture().unwrap();
        assert_eq!(architecture.family, ModelFamily::Sd1);
        std::fs::write(dir.path().join("unet/config.json"), "{oops").unwrap();
        assert!(error_text(detect(dir.path())).contains("not valid JSON"));
        std::fs::write(
            dir.path().join("unet/config.json"),
            r#"{"cross_attention_dim": 2048, "addition_embed_type": "text_time"}"#,
        )
        .unwrap();
        let architecture = detect(dir.path()).unwrap().architecture().unwrap();
        assert_eq!(architecture.family, ModelFamily::Sdxl);
        assert_eq!(architecture.to_string(), "SDXL");
        // SDXL's width without its size conditioning is no model we know.
        std::fs::write(
            dir.path().join("unet/config.json"),
            r#"{"cross_attention_dim": 2048}"#,
        )
        .unwrap();
        let message = error_text(detect(dir.path()));
        assert!(
            message.contains("SDXL") && message.contains("text_time"),
            "{message}"
        );
    }

    #[test]
    fn the_demo_and_tiny_models_are_accepted_with_their_width() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let demo = detect(&root.join("models/demo-sd")).unwrap();
        assert_eq!(
            demo.architecture().unwrap().to_string(),
            "SD 1.x-style, cross-attention width 32"
        );
        for (name, version, width) in [
            ("tiny-sd1", ModelFamily::Sd1, 64),
            ("tiny-sd2", ModelFamily::Sd2, 128),
            ("tiny-sd1.safetensors", ModelFamily::Sd1, 64),
            ("tiny-sd2.safetensors", ModelFamily::Sd2, 128),
            ("tiny-sd1.ckpt", ModelFamily::Sd1, 64),
            ("tiny-sdxl", ModelFamily::Sdxl, 24),
        ] {
            let architecture = detect(&crate::fixtures::path(name)).unwrap().architecture();
            assert_eq!(
                architecture,
                Some(Architecture {
                    family: version,
                    cross_attention_dim: width
                }),
                "{name}"
            );
        }
    }

    #[test]
    fn hub_ids_are_looked_up_in_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--sd-model");
        let snapshot = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(snapshot.join("unet")).unwrap();
        std::fs::write(
            snapshot.join("unet/config.json"),
            r#"{"cross_attention_dim": 768}"#,
        )
        .unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let cache = HubCache::at(cache.path());
        let found = ModelSource::detect_with("org/sd-model", &cache).unwrap();
        assert_eq!(
            found,
            ModelSource::Hub {
                id: "org/sd-model".into(),
                snapshot: Some(snapshot),
                architecture: Some(Architecture {
                    family: ModelFamily::Sd1,
                    cross_attention_dim: 768
                })
            }
        );
        let missing = ModelSource::detect_with("org/other", &cache).unwrap();
        assert!(missing
            .to_string()
            .contains("not in the Hugging Face cache"));
    }

    #[test]
    fn missing_paths_are_not_found_errors_that_name_them() {
        let err = ModelSource::detect("./models/nope.safetensors").unwrap_err();
        assert!(matches!(err, Error::Model(ModelError::NotFound { .. })));
        let message = err.to_string();
        assert!(
            message.contains("./models/nope.safetensors") && message.contains("does not exist"),
            "{message}"
        );
    }
}
