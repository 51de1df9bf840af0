//! Where a base model comes from: a diffusers folder, a single checkpoint file or a hub id.
//!
//! [`ModelSource::detect`] decides which one a config's `base_model` names, checks what can be
//! checked without loading weights (a safetensors header is read, never the tensors) and tells
//! SD 1.x from SD 2.x where that is cheap: the width of the UNet's cross-attention keys (768 for
//! CLIP ViT-L, 1024 for OpenCLIP ViT-H).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::{Error, Result};

/// The Stable Diffusion family of a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdVersion {
    /// SD 1.x: CLIP ViT-L text encoder, cross-attention width 768.
    V1,
    /// SD 2.x: OpenCLIP ViT-H text encoder, cross-attention width 1024.
    V2,
}

impl SdVersion {
    /// The version whose UNet cross-attends to a text embedding this wide.
    pub fn from_cross_attention_dim(width: usize) -> Option<SdVersion> {
        match width {
            768 => Some(SdVersion::V1),
            1024 => Some(SdVersion::V2),
            _ => None,
        }
    }
}

impl fmt::Display for SdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SdVersion::V1 => "SD 1.x",
            SdVersion::V2 => "SD 2.x",
        })
    }
}

/// How a single-file checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    Safetensors,
    /// A PyTorch pickle (`.ckpt`, `.pt`, `.pth`, `.bin`).
    Pickle,
}

/// A base model that exists (or, for a hub id, can be fetched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, ...).
    Diffusers {
        root: PathBuf,
        version: Option<SdVersion>,
    },
    /// An original-layout (LDM) checkpoint in one file.
    SingleFile {
        path: PathBuf,
        format: CheckpointFormat,
        version: Option<SdVersion>,
    },
    /// A Hugging Face hub id; `snapshot` is its folder in the local cache when downloaded.
    Hub {
        id: String,
        snapshot: Option<PathBuf>,
        version: Option<SdVersion>,
    },
}

const EXPECTED: &str = "expected a diffusers folder (with model_index.json or unet/config.json), \
                        a .safetensors/.ckpt checkpoint, or a hub id such as `org/name`";

/// Prefix of the UNet's tensors in an original-layout checkpoint.
const LDM_UNET_PREFIX: &str = "model.diffusion_model.";

impl ModelSource {
    /// Finds out what `base_model` names, looking up hub ids in the standard Hugging Face cache.
    pub fn detect(base_model: &str) -> Result<ModelSource> {
        ModelSource::detect_with(base_model, &HubCache::from_env())
    }

    /// [`ModelSource::detect`] with an explicit hub cache.
    pub fn detect_with(base_model: &str, cache: &HubCache) -> Result<ModelSource> {
        let path = Path::new(base_model);
        if path.is_dir() {
            return diffusers_folder(path);
        }
        if path.is_file() {
            return single_file(path);
        }
        if is_hub_id(base_model) {
            let snapshot = cache.snapshot(base_model);
            let version = match &snapshot {
                Some(folder) => unet_config_version(folder)?,
                None => None,
            };
            return Ok(ModelSource::Hub {
                id: base_model.to_string(),
                snapshot,
                version,
            });
        }
        Err(unreadable(
            path,
            format!("it does not exist (check `base_model` in the config); {EXPECTED}"),
        ))
    }

    /// SD 1.x or 2.x, when it could be told without loading weights.
    pub fn version(&self) -> Option<SdVersion> {
        match self {
            ModelSource::Diffusers { version, .. }
            | ModelSource::SingleFile { version, .. }
            | ModelSource::Hub { version, .. } => *version,
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Diffusers { root, .. } => write!(f, "diffusers folder {}", root.display()),
            ModelSource::SingleFile { path, format, .. } => {
                let kind = match format {
                    CheckpointFormat::Safetensors => "safetensors",
                    CheckpointFormat::Pickle => "PyTorch pickle",
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

/// `org/name`: two parts of letters, digits, `-`, `_`, `.`, and not a checkpoint file name.
pub fn is_hub_id(text: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match text.split_once('/') {
        Some((org, name)) => {
            part_ok(org) && part_ok(name) && checkpoint_format(Path::new(name)).is_none()
        }
        None => false,
    }
}

fn checkpoint_format(path: &Path) -> Option<CheckpointFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => Some(CheckpointFormat::Safetensors),
        "ckpt" | "pt" | "pth" | "bin" => Some(CheckpointFormat::Pickle),
        _ => None,
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
            format!("this folder holds neither model_index.json nor unet/config.json; {EXPECTED}"),
        ));
    }
    let version = unet_config_version(root)?;
    Ok(ModelSource::Diffusers {
        root: root.to_path_buf(),
        version,
    })
}

/// The version from `unet/config.json`'s `cross_attention_dim`, if that file exists.
fn unet_config_version(root: &Path) -> Result<Option<SdVersion>> {
    let path = root.join("unet").join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            origin: origin.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
    let Some(width) = json.get("cross_attention_dim").and_then(|v| v.as_u64()) else {
        return Ok(None);
    };
    version_from_width(width as usize)
        .map(Some)
        .map_err(|message| ModelError::InvalidConfig { origin, message }.into())
}

fn version_from_width(width: usize) -> Result<SdVersion, String> {
    SdVersion::from_cross_attention_dim(width).ok_or_else(|| {
        let hint = if width == 2048 {
            " (this looks like SDXL)"
        } else {
            ""
        };
        format!(
            "the UNet's cross-attention width is {width}{hint}; this trainer supports SD 1.x \
             (768) and SD 2.x (1024)"
        )
    })
}

fn single_file(path: &Path) -> Result<ModelSource> {
    match checkpoint_format(path) {
        Some(CheckpointFormat::Safetensors) => {
            let version = safetensors_version(path)?;
            Ok(ModelSource::SingleFile {
                path: path.to_path_buf(),
                format: CheckpointFormat::Safetensors,
                version,
            })
        }
        // Pickles cannot be inspected without unpickling them; the loader checks them.
        Some(CheckpointFormat::Pickle) => Ok(ModelSource::SingleFile {
            path: path.to_path_buf(),
            format: CheckpointFormat::Pickle,
            version: None,
        }),
        None => Err(unreadable(path, format!("unknown file type; {EXPECTED}"))),
    }
}

/// Reads the header of a single-file checkpoint: is it an SD checkpoint, and which one.
fn safetensors_version(path: &Path) -> Result<Option<SdVersion>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(unreadable(
            path,
            format!("the file is {len} bytes long: not a safetensors file"),
        ));
    }
    // SAFETY: mapped read-only; only the header's pages are touched.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        unreadable(
            path,
            format!("not a valid safetensors file ({e}); the download may be incomplete"),
        )
    })?;
    let tensors = metadata.tensors();
    if !tensors.keys().any(|k| k.starts_with(LDM_UNET_PREFIX)) {
        return Err(unreadable(
            path,
            not_an_sd_checkpoint(tensors.keys().map(String::as_str)),
        ));
    }
    let to_k = tensors
        .iter()
        .find(|(k, _)| k.starts_with(LDM_UNET_PREFIX) && k.ends_with("attn2.to_k.weight"));
    match to_k {
        Some((_, info)) if info.shape.len() == 2 => version_from_width(info.shape[1])
            .map(Some)
            .map_err(|reason| unreadable(path, reason)),
        _ => Ok(None),
    }
}

/// Why a safetensors file without `model.diffusion_model.` tensors is not a base model.
fn not_an_sd_checkpoint<'a>(mut keys: impl Iterator<Item = &'a str> + Clone) -> String {
    if keys
        .clone()
        .any(|k| k.starts_with("lora_") || k.contains(".lora_down."))
    {
        "this is a LoRA file, not a base model".to_string()
    } else if keys.any(|k| k.starts_with("down_blocks.") || k.starts_with("conv_in.")) {
        "this is one component of a diffusers model; set base_model to the whole diffusers folder"
            .to_string()
    } else {
        format!(
            "it holds no `{LDM_UNET_PREFIX}` tensors, so it is not a Stable Diffusion checkpoint; \
             {EXPECTED}"
        )
    }
}

/// The local Hugging Face hub cache, where `huggingface_hub` (and `hf-hub`) keep downloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    root: Option<PathBuf>,
}

impl HubCache {
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub fn from_env() -> HubCache {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
            .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")));
        HubCache { root }
    }

    /// A cache rooted at `root` (the folder holding `models--org--name`).
    pub fn at(root: impl Into<PathBuf>) -> HubCache {
        HubCache {
            root: Some(root.into()),
        }
    }

    /// The snapshot folder of `org/name` that `refs/main` points to, if downloaded.
    pub fn snapshot(&self, id: &str) -> Option<PathBuf> {
        let repo = self
            .root
            .as_ref()?
            .join(format!("models--{}", id.replace('/', "--")));
        let revision = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
        let folder = repo.join("snapshots").join(revision.trim());
        folder.is_dir().then_some(folder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn unet_key(width: usize) -> (&'static str, Vec<usize>) {
        (
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            vec![320, width],
        )
    }

    fn error_text(r: Result<ModelSource>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn single_file_version_comes_from_the_cross_attention_width() {
        let dir = tempfile::tempdir().unwrap();
        for (width, version) in [(768, SdVersion::V1), (1024, SdVersion::V2)] {
            let path = dir.path().join(format!("m{width}.safetensors"));
            write_safetensors(&path, &[unet_key(width), ("first_stage_model.x", vec![2])]);
            let source = ModelSource::detect(path.to_str().unwrap()).unwrap();
            assert_eq!(source.version(), Some(version));
            assert!(matches!(
                source,
                ModelSource::SingleFile {
                    format: CheckpointFormat::Safetensors,
                    ..
                }
            ));
        }
        let path = dir.path().join("xl.safetensors");
        write_safetensors(&path, &[unet_key(2048)]);
        assert!(error_text(ModelSource::detect(path.to_str().unwrap())).contains("SDXL"));
    }

    #[test]
    fn safetensors_that_are_not_sd_checkpoints_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let lora = dir.path().join("lora.safetensors");
        write_safetensors(&lora, &[("lora_unet_x.lora_down.weight", vec![4, 8])]);
        assert!(error_text(ModelSource::detect(lora.to_str().unwrap())).contains("LoRA file"));
        let other = dir.path().join("other.safetensors");
        write_safetensors(&other, &[("weight", vec![4])]);
        assert!(error_text(ModelSource::detect(other.to_str().unwrap()))
            .contains("model.diffusion_model."));
        let broken = dir.path().join("broken.safetensors");
        std::fs::write(&broken, b"\x10\0\0\0\0\0\0\0{not json at all").unwrap();
        let message = error_text(ModelSource::detect(broken.to_str().unwrap()));
        assert!(
            message.contains("not a valid safetensors file"),
            "{message}"
        );
        assert!(message.contains("broken.safetensors"), "{message}");
    }

    #[test]
    fn pickles_are_accepted_by_extension_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("m.ckpt");
        std::fs::write(&ckpt, b"pickle").unwrap();
        let source = ModelSource::detect(ckpt.to_str().unwrap()).unwrap();
        assert!(matches!(
            source,
            ModelSource::SingleFile {
                format: CheckpointFormat::Pickle,
                version: None,
                ..
            }
        ));
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, b"hello").unwrap();
        assert!(
            error_text(ModelSource::detect(txt.to_str().unwrap())).contains("unknown file type")
        );
    }

    #[test]
    fn diffusers_folders_need_their_index_or_unet_config() {
        let dir = tempfile::tempdir().unwrap();
        let message = error_text(ModelSource::detect(dir.path().to_str().unwrap()));
        assert!(
            message.contains("neither model_index.json nor unet/config.json"),
            "{message}"
        );
        std::fs::create_dir(dir.path().join("unet")).unwrap();
        std::fs::write(
            dir.path().join("unet/config.json"),
            r#"{"cross_attention_dim": 1024}"#,
        )
        .unwrap();
        let source = ModelSource::detect(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(
            source,
            ModelSource::Diffusers {
                root: dir.path().to_path_buf(),
                version: Some(SdVersion::V2)
            }
        );
        std::fs::write(dir.path().join("unet/config.json"), "{oops").unwrap();
        assert!(
            error_text(ModelSource::detect(dir.path().to_str().unwrap()))
                .contains("not valid JSON")
        );
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
                version: Some(SdVersion::V1)
            }
        );
        let missing = ModelSource::detect_with("org/other", &cache).unwrap();
        assert!(missing
            .to_string()
            .contains("not in the Hugging Face cache"));
    }

    #[test]
    fn missing_paths_are_errors_that_name_them() {
        let message = error_text(ModelSource::detect("./models/nope.safetensors"));
        assert!(
            message.contains("./models/nope.safetensors") && message.contains("does not exist"),
            "{message}"
        );
    }

    #[test]
    fn hub_id_shape() {
        assert!(is_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5"));
        assert!(is_hub_id("openai/clip-vit-large-patch14"));
        assert!(!is_hub_id("./models/demo-sd"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("models/v1-5.safetensors"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("name"));
    }
}
