//! Reading a LoRA file, ours or anyone's: kohya/A1111 keys (`lora_unet_…lora_down.weight`) or
//! diffusers/PEFT keys (`unet.….lora_A.weight`), with the header metadata.
//!
//! Keys of other adapter algorithms (LyCORIS' LoHa, LoKr, DoRA, ...) are refused with the key and
//! the algorithm named. Every module is keyed by its kohya name, so that a file in either format
//! meets the model's layers the same way (kohya names are ambiguous to turn back into paths —
//! `to_q` vs a path separator — so matching goes path → name, as kohya and A1111 do).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::{LoraError, LoraProblem};
use super::file_keys::{
    detect_format, diffusers_parts, kohya_parts, unsupported_algorithm, LoraFormat,
};
use super::names::LoraModel;
use crate::Result;

/// One module of a LoRA file.
#[derive(Debug, Clone)]
pub struct FileModule {
    pub model: LoraModel,
    /// The kohya name (`lora_unet_…`), whatever the file's format: the key to match layers by.
    pub name: String,
    /// The module as the file names it (the kohya name, or `unet.<path>` for diffusers files).
    pub label: String,
    /// The file's key of each matrix, for messages.
    pub down_key: String,
    pub up_key: String,
    /// `[rank, in]` or `[rank, in, k, k]`, as stored (any float dtype).
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: Tensor,
    /// The alpha the file gives, if any (0 or missing means alpha = rank).
    pub alpha: Option<f64>,
    /// The dtype the matrices are stored in.
    pub dtype: DType,
}

impl FileModule {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// The alpha to use: the file's, or the rank when it has none (or 0).
    pub fn effective_alpha(&self) -> f64 {
        match self.alpha {
            Some(a) if a != 0.0 => a,
            _ => self.rank() as f64,
        }
    }
}

/// A LoRA file read into memory.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    /// The header's `__metadata__` (all strings), sorted.
    pub metadata: BTreeMap<String, String>,
    /// In file key order.
    pub modules: Vec<FileModule>,
    pub file_size: u64,
}

/// The model family a file says or shows it was trained for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileBase {
    Sd1,
    Sd2,
    Sdxl,
}

impl fmt::Display for FileBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileBase::Sd1 => "SD 1.x",
            FileBase::Sd2 => "SD 2.x",
            FileBase::Sdxl => "SDXL",
        })
    }
}

/// Whether every value of a floating-point tensor is finite (other dtypes always are).
fn all_finite(t: &candle_core::Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let values = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    Ok(values.iter().all(|v| v.is_finite()))
}

impl LoraFile {
    /// Reads `path` (a `.safetensors` file).
    pub fn read(path: &Path) -> Result<LoraFile> {
        let bytes = crate::files::read(path).map_err(|e| {
            LoraError::file(
                path,
                LoraProblem::Unreadable {
                    reason: e.to_string(),
                },
            )
        })?;
        LoraFile::from_bytes(path, &bytes)
    }

    /// Parses a file's bytes; `path` names it in messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<LoraFile> {
        let fail = |problem| LoraError::file(path, problem);
        let unreadable = |reason: String| fail(LoraProblem::Unreadable { reason });
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            unreadable(format!(
                "cannot read it as .safetensors ({e}); only .safetensors LoRA files are supported"
            ))
        })?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| unreadable(format!("cannot read its tensors: {e}")))?;
        if tensors.is_empty() {
            return Err(unreadable("the file holds no tensors".to_string()).into());
        }
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        for key in &keys {
            if let Some(algorithm) = unsupported_algorithm(key) {
                return Err(fail(LoraProblem::UnsupportedAlgorithm {
                    key: key.to_string(),
                    algorithm: algorithm.to_string(),
                })
                .into());
            }
        }
        for key in &keys {
            if !all_finite(&tensors[*key])? {
                return Err(fail(LoraProblem::NonFinite {
                    key: key.to_string(),
                })
                .into());
            }
        }
        let format = detect_format(&keys).map_err(fail)?;
        let parts = match format {
            LoraFormat::Kohya => kohya_parts(&keys),
            LoraFormat::Diffusers => diffusers_parts(&keys),
        }
        .map_err(fail)?;
        let adapter_config = diffusers_adapter_config(&metadata).map_err(fail)?;
        let mut modules = Vec::new();
        for (label, group) in parts {
            let model = group.model;
            let (down_key, up_key) = match (group.down, group.up) {
                (Some(d), Some(u)) => (d, u),
                (Some(present), None) | (None, Some(present)) => {
                    let missing = if present.contains("down") || present.contains("lora_A") {
                        "the up matrix"
                    } else {
                        "the down matrix"
                    };
                    return Err(fail(LoraProblem::IncompleteModule {
                        module: label,
                        present,
                        missing: missing.to_string(),
                    })
                    .into());
                }
                (None, None) => {
                    let key = group.alpha.unwrap_or(label);
                    return Err(fail(LoraProblem::UnknownKey {
                        key,
                        hint: ": an alpha without lora_down/lora_up matrices".to_string(),
                    })
                    .into());
                }
            };
            let down = tensors[&down_key].clone();
            let up = tensors[&up_key].clone();
            let alpha = match &group.alpha {
                Some(key) => Some(scalar(&tensors[key]).map_err(|reason| {
                    fail(LoraProblem::UnknownKey {
                        key: key.clone(),
                        hint: format!(": {reason}"),
                    })
                })?),
                None => adapter_config
                    .as_ref()
                    .and_then(|c| c.alpha(model, &group.path)),
            };
            modules.push(FileModule {
                model,
                name: model.kohya_name(&group.path),
                label,
                dtype: down.dtype(),
                down_key,
                up_key,
                down,
                up,
                alpha,
            });
        }
        Ok(LoraFile {
            path: path.to_path_buf(),
            format,
            metadata,
            modules,
            file_size: bytes.len() as u64,
        })
    }

    /// What model family the file was made for, with the evidence: its structure first (two
    /// text encoders; the width of the cross-attention keys or of the text encoder), then its
    /// metadata. `None` when neither tells.
    pub fn base_model(&self) -> Option<(FileBase, String)> {
        if let Some(m) = self
            .modules
            .iter()
            .find(|m| m.model == LoraModel::TextEncoder2)
        {
            return Some((
                FileBase::Sdxl,
                format!("`{}` adapts a second text encoder", m.down_key),
            ));
        }
        if let Some(m) = self
            .modules
            .iter()
            .find(|m| m.down_key.starts_with("lora_te1_"))
        {
            return Some((
                FileBase::Sdxl,
                format!("`{}` names SDXL's first text encoder", m.down_key),
            ));
        }
        for m in &self.modules {
            let width = m.down.dims().get(1).copied().unwrap_or(0);
            let by_width = |w| match w {
                768 => Some(FileBase::Sd1),
                1024 => Some(FileBase::Sd2),
                2048 => Some(FileBase::Sdxl),
                _ => None,
            };
            let cross_attention = m.model == LoraModel::Unet
                && (m.name.ends_with("attn2_to_k") || m.name.ends_with("attn2_to_v"));
            let text_width =
                m.model == LoraModel::TextEncoder && m.name.ends_with("self_attn_q_proj");
            if cross_attention || text_width {
                if let Some(base) = by_width(width) {
                    let what = if cross_attention {
                        "cross-attention input"
                    } else {
                        "text encoder width"
                    };
                    return Some((base, format!("`{}` has a {width}-wide {what}", m.down_key)));
                }
            }
        }
        let meta = |k: &str| self.metadata.get(k).map(String::as_str);
        if let Some(v) = meta("ss_base_model_version") {
            let base = if v.starts_with("sdxl") {
                Some(FileBase::Sdxl)
            } else if v.starts_with("sd_v2") {
                Some(FileBase::Sd2)
            } else if v.starts_with("sd_v1") {
                Some(FileBase::Sd1)
            } else {
                None
            };
            if let Some(base) = base {
                return Some((base, format!("its metadata says ss_base_model_version={v}")));
            }
        }
        if meta("ss_v2") == Some("True") {
            return Some((FileBase::Sd2, "its metadata says ss_v2=True".to_string()));
        }
        if let Some(v) = meta("modelspec.architecture") {
            let base = if v.starts_with("stable-diffusion-xl") {
                Some(FileBase::Sdxl)
            } else if v.starts_with("stable-diffusion-v2") {
                Some(FileBase::Sd2)
            } else if v.starts_with("stable-diffusion-v1") {
                Some(FileBase::Sd1)
            } else {
                None
            };
            if let Some(base) = base {
                return Some((
                    base,
                    format!("its metadata says modelspec.architecture={v}"),
                ));
            }
        }
        // Last: SD 1.x files converted by old tools can carry LDM names too.
        let ldm = ["_input_blocks_", "_middle_block_", "_output_blocks_"];
        if let Some(m) = self.modules.iter().find(|m| {
            m.model == LoraModel::Unet && ldm.iter().any(|part| m.down_key.contains(part))
        }) {
            return Some((
                FileBase::Sdxl,
                format!(
                    "`{}` has the LDM name kohya gives SDXL's UNet modules",
                    m.down_key
                ),
            ));
        }
        None
    }

    /// The modules of one model, in file order.
    pub fn modules_of(&self, model: LoraModel) -> impl Iterator<Item = &FileModule> {
        self.modules.iter().filter(move |m| m.model == model)
    }
}

/// A 0-dim (or one-element) tensor's value.
fn scalar(t: &Tensor) -> std::result::Result<f64, String> {
    if t.elem_count() != 1 {
        return Err(format!(
            "an alpha must be a single number, this one has shape {:?}",
            t.dims()
        ));
    }
    t.flatten_all()
        .and_then(|v| v.to_dtype(DType::F64))
        .and_then(|v| v.to_vec1::<f64>())
        .map(|v| v[0])
        .map_err(|e| e.to_string())
}

/// diffusers' `lora_adapter_metadata`: PEFT `LoraConfig`s per model (`unet.lora_alpha`,
/// `unet.alpha_pattern`, ...).
#[derive(Debug)]
struct AdapterConfig {
    entries: HashMap<String, serde_json::Value>,
}

impl AdapterConfig {
    /// The alpha of the module at `path`: the first `alpha_pattern` entry matching it as PEFT
    /// matches (`(.*\.)?<pattern>$`, here taken literally), else `lora_alpha`.
    fn alpha(&self, model: LoraModel, path: &str) -> Option<f64> {
        let prefix = model.diffusers_prefix();
        let relative = path.strip_prefix("text_model.").unwrap_or(path);
        if let Some(serde_json::Value::Object(patterns)) =
            self.entries.get(&format!("{prefix}.alpha_pattern"))
        {
            for (pattern, value) in patterns {
                let hit = [path, relative]
                    .iter()
                    .any(|p| *p == pattern || p.ends_with(&format!(".{pattern}")));
                if hit {
                    return value.as_f64();
                }
            }
        }
        self.entries
            .get(&format!("{prefix}.lora_alpha"))
            .and_then(|v| v.as_f64())
    }
}

fn diffusers_adapter_config(
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Option<AdapterConfig>, LoraProblem> {
    let Some(text) = metadata.get("lora_adapter_metadata") else {
        return Ok(None);
    };
    let bad = |reason: String| LoraProblem::UnknownKey {
        key: "lora_adapter_metadata".to_string(),
        hint: format!(" (header metadata): {reason}"),
    };
    let entries: HashMap<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    for (key, what) in [("use_rslora", "rsLoRA scaling"), ("use_dora", "DoRA")] {
        let on = entries
            .iter()
            .any(|(k, v)| k.ends_with(&format!(".{key}")) && v.as_bool() == Some(true));
        if on {
            return Err(LoraProblem::UnsupportedAlgorithm {
                key: format!("lora_adapter_metadata: {key}"),
                algorithm: what.to_string(),
            });
        }
    }
    Ok(Some(AdapterConfig { entries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(
        tensors: Vec<(&str, Tensor)>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<LoraFile> {
        let bytes = safetensors::serialize(tensors, metadata).map_err(candle_core::Error::from)?;
        LoraFile::from_bytes(Path::new("x.safetensors"), &bytes)
    }

    fn t(dims: &[usize]) -> Tensor {
        Tensor::ones(dims, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn kohya_modules_with_and_without_alpha() -> Result<()> {
        let f = file(
            vec![
                ("lora_unet_a_to_q.lora_down.weight", t(&[4, 8])),
                ("lora_unet_a_to_q.lora_up.weight", t(&[8, 4])),
                ("lora_unet_a_to_q.alpha", Tensor::new(2f32, &Device::Cpu)?),
                ("lora_te_text_model_x_q_proj.lora_down.weight", t(&[2, 8])),
                ("lora_te_text_model_x_q_proj.lora_up.weight", t(&[8, 2])),
            ],
            None,
        )?;
        assert_eq!(f.format, LoraFormat::Kohya);
        assert_eq!(f.modules.len(), 2);
        let te = f.modules_of(LoraModel::TextEncoder).next().unwrap();
        assert_eq!((te.rank(), te.alpha, te.effective_alpha()), (2, None, 2.0));
        let unet = f.modules_of(LoraModel::Unet).next().unwrap();
        assert_eq!((unet.rank(), unet.effective_alpha()), (4, 2.0));
        assert_eq!(unet.name, "lora_unet_a_to_q");
        Ok(())
    }

    #[test]
    fn other_algorithms_are_named() {
        for (key, algorithm) in [
            ("lora_unet_a.hada_w1_a", "LoHa"),
            ("lora_unet_a.lokr_w1", "LoKr"),
            ("lora_unet_a.dora_scale", "DoRA"),
            ("lora_unet_a.lora_mid.weight", "Tucker"),
            ("unet.a.lora_magnitude_vector", "DoRA"),
        ] {
            let err = file(vec![(key, t(&[2]))], None).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains(algorithm),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_files_say_why() {
        let err = LoraFile::from_bytes(Path::new("x.safetensors"), b"not a file")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.safetensors: not a LoRA file"), "{err}");
        let err = file(
            vec![(
                "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                t(&[2]),
            )],
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("LDM/CompVis"), "{err}");
        let err = file(vec![("lora_unet_a.lora_down.weight", t(&[2, 2]))], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`lora_unet_a` has `lora_unet_a.lora_down.weight` but no"),
            "{err}"
        );
    }

    #[test]
    fn diffusers_keys_paths_and_adapter_metadata() -> Result<()> {
        let meta = serde_json::json!({
            "unet.r": 4, "unet.lora_alpha": 8,
            "unet.alpha_pattern": {"down_blocks.0.resnets.0.conv1": 1},
            "text_encoder.r": 2, "text_encoder.lora_alpha": 2,
        });
        let metadata = HashMap::from([("lora_adapter_metadata".to_string(), meta.to_string())]);
        let f = file(
            vec![
                ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", t(&[4, 8])),
                ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight", t(&[8, 4])),
                ("unet.down_blocks.0.resnets.0.conv1.lora_A.weight", t(&[4, 8, 3, 3])),
                ("unet.down_blocks.0.resnets.0.conv1.lora_B.weight", t(&[8, 4, 1, 1])),
                ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight", t(&[2, 8])),
                ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight", t(&[8, 2])),
                ("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight", t(&[2, 8])),
                ("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight", t(&[8, 2])),
            ],
            Some(metadata),
        )?;
        assert_eq!(f.format, LoraFormat::Diffusers);
        let by_name: HashMap<&str, &FileModule> =
            f.modules.iter().map(|m| (m.name.as_str(), m)).collect();
        assert_eq!(
            by_name["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"].alpha,
            Some(8.0)
        );
        assert_eq!(
            by_name["lora_unet_down_blocks_0_resnets_0_conv1"].alpha,
            Some(1.0)
        );
        assert_eq!(
            by_name["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].alpha,
            Some(2.0)
        );
        assert!(by_name.contains_key(
            "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
        ));
        Ok(())
    }

    #[test]
    fn base_model_from_structure_then_metadata() -> Result<()> {
        let f = file(
            vec![
                ("lora_unet_x_attn2_to_k.lora_down.weight", t(&[4, 1024])),
                ("lora_unet_x_attn2_to_k.lora_up.weight", t(&[320, 4])),
            ],
            Some(HashMap::from([(
                "ss_base_model_version".to_string(),
                "sd_v1".to_string(),
            )])),
        )?;
        assert_eq!(f.base_model().map(|b| b.0), Some(FileBase::Sd2));
        let f = file(
            vec![
                (
                    "lora_te2_text_model_x_q_proj.lora_down.weight",
                    t(&[4, 1280]),
                ),
                ("lora_te2_text_model_x_q_proj.lora_up.weight", t(&[1280, 4])),
            ],
            None,
        )?;
        assert_eq!(f.base_model().map(|b| b.0), Some(FileBase::Sdxl));
        assert_eq!(f.modules.len(), 1);
        assert_eq!(f.modules[0].model, LoraModel::TextEncoder2);
        Ok(())
    }

    #[test]
    fn a_file_for_another_family_is_refused_naming_both() -> Result<()> {
        use crate::lora::import::FileTargets;
        use crate::lora::LoraBase;
        use crate::models::family::ModelFamily;
        use crate::models::unet_config::UNetConfig;
        let xl_unet = UNetConfig::from_file(&crate::fixtures::path("tiny-sdxl/unet/config.json"))?;
        let sdxl = LoraBase::new(ModelFamily::Sdxl, &xl_unet);
        let sd1 = LoraBase::sd(ModelFamily::Sd1);
        let with_version = |version: &str| {
            file(
                vec![
                    ("lora_unet_x_attn1_to_q.lora_down.weight", t(&[4, 8])),
                    ("lora_unet_x_attn1_to_q.lora_up.weight", t(&[8, 4])),
                ],
                Some(HashMap::from([(
                    "ss_base_model_version".to_string(),
                    version.to_string(),
                )])),
            )
        };
        let refused = |f: LoraFile, base: Option<&LoraBase>| match FileTargets::new(f, base) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        let message = refused(with_version("sd_v1")?, Some(&sdxl));
        assert!(
            message.contains("trained on SD 1.x") && message.contains("base model is SDXL"),
            "{message}"
        );
        let message = refused(with_version("sdxl_base_v1-0")?, sd1.as_ref());
        assert!(
            message.contains("trained on SDXL") && message.contains("base model is SD 1.x"),
            "{message}"
        );
        assert_eq!(refused(with_version("sdxl_base_v1-0")?, Some(&sdxl)), "");
        Ok(())
    }
}
