//! Finding the CLIP (and BLIP) model `auto_label` uses: a local folder, or a hub id already in
//! the Hugging Face cache (where Python's `huggingface_hub` puts downloads, so models a user
//! already has are reused). This build does not download; the error says what to fetch and
//! where it must land.

use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::models::source::{is_hub_id, HubCache};
use crate::Result;

/// The default CLIP model: ViT-L/14, the text encoder family of SD 1.x.
pub const DEFAULT_CLIP_MODEL: &str = "openai/clip-vit-large-patch14";
/// The default BLIP captioner.
pub const DEFAULT_BLIP_MODEL: &str = "Salesforce/blip-image-captioning-large";

/// Which model a folder is for: it decides the files named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    Clip,
    Blip,
}

impl ModelRole {
    /// The files `auto_label` reads from such a folder (weights: the first that exists).
    pub fn files(self) -> &'static [&'static str] {
        match self {
            ModelRole::Clip => &[
                "config.json",
                "model.safetensors",
                "preprocessor_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.json",
                "merges.txt",
            ],
            ModelRole::Blip => &[
                "config.json",
                "model.safetensors",
                "preprocessor_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ],
        }
    }

    fn option(self) -> &'static str {
        match self {
            ModelRole::Clip => "--model",
            ModelRole::Blip => "--blip-model",
        }
    }
}

/// The Hugging Face hub cache folder, by the rules of [`HubCache::from_env`]: `$HF_HUB_CACHE`,
/// else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_root() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The folder holding the model `spec` names: `spec` itself when it is a folder, else the
/// snapshot of the hub id `spec` in the hub cache at `cache_root`.
pub fn resolve_model_folder(
    spec: &str,
    cache_root: Option<&Path>,
    role: ModelRole,
) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(unusable(
            spec,
            format!(
                "this is a file; {} takes a model folder (config.json + weights) or a hub id such as `{}`",
                role.option(),
                default_for(role)
            ),
        ));
    }
    if !is_hub_id(spec) {
        return Err(unusable(
            spec,
            format!(
                "no such folder, and not a hub id (`org/name`); {} takes a model folder or a hub id such as `{}`",
                role.option(),
                default_for(role)
            ),
        ));
    }
    if let Some(snapshot) = cache_root.and_then(|root| HubCache::at(root).snapshot(spec)) {
        return Ok(snapshot);
    }
    // MERGE(hub): the one place to download. When `src/models/hub.rs` lands, fetch
    // `role.files()` of `spec` into `cache` here and return the snapshot folder instead of
    // failing; keep this error for when the download itself fails (offline).
    Err(not_downloaded(spec, cache_root, role))
}

fn default_for(role: ModelRole) -> &'static str {
    match role {
        ModelRole::Clip => DEFAULT_CLIP_MODEL,
        ModelRole::Blip => DEFAULT_BLIP_MODEL,
    }
}

fn unusable(spec: &str, message: String) -> crate::Error {
    ModelError::InvalidConfig {
        origin: spec.to_string(),
        message,
    }
    .into()
}

/// The offline message: what to download, with which command, and where it must land.
fn not_downloaded(spec: &str, cache_root: Option<&Path>, role: ModelRole) -> crate::Error {
    let cache_dir = cache_root.map_or_else(
        || "the Hugging Face cache (set HF_HOME or HF_HUB_CACHE)".to_string(),
        |root| root.display().to_string(),
    );
    let files = role.files().join(" ");
    unusable(
        spec,
        format!(
            "not in the Hugging Face cache ({cache_dir}), and this build does not download models. \
             Download it once on a machine with internet access: `hf download {spec} {files}` \
             (or `huggingface-cli download ...` with older huggingface_hub; take pytorch_model.bin where a repository has no \
             model.safetensors), which stores it in that cache; \
             copy the cache folder here if this machine is offline, or pass {} with a local folder holding those files",
            role.option()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_used_as_they_are() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        let spec = dir.path().to_str().expect("utf-8");
        let cache = dir.path().join("nothing");
        assert_eq!(
            resolve_model_folder(spec, Some(&cache), ModelRole::Clip)?,
            dir.path()
        );
        Ok(())
    }

    #[test]
    fn hub_ids_come_from_the_cache_or_say_how_to_download_them() -> Result<()> {
        let cache_dir = tempfile::tempdir().expect("dir");
        let cache = Some(cache_dir.path());
        let err = resolve_model_folder(DEFAULT_CLIP_MODEL, cache, ModelRole::Clip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hf download openai/clip-vit-large-patch14 config.json model.safetensors")
                && err.contains(&cache_dir.path().display().to_string())
                && err.contains("--model"),
            "{err}"
        );
        let repo = cache_dir
            .path()
            .join("models--openai--clip-vit-large-patch14");
        std::fs::create_dir_all(repo.join("snapshots").join("abc")).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs").join("main"), "abc").expect("write");
        assert_eq!(
            resolve_model_folder(DEFAULT_CLIP_MODEL, cache, ModelRole::Clip)?,
            repo.join("snapshots").join("abc")
        );
        let err = resolve_model_folder(
            "Salesforce/blip-image-captioning-large",
            cache,
            ModelRole::Blip,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("hf download Salesforce/blip-image-captioning-large config.json")
                && err.contains("--blip-model"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn paths_that_are_neither_are_named() {
        let err = resolve_model_folder("./models/nope", None, ModelRole::Clip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("./models/nope") && err.contains("no such folder"),
            "{err}"
        );
    }
}
