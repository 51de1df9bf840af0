//! Finding the CLIP (and BLIP) model `auto_label` uses: a local folder, or a hub id in the
//! Hugging Face cache (where Python's `huggingface_hub` puts downloads, so models a user already
//! has are reused), downloaded into that cache when missing (`HF_HUB_OFFLINE=1` forbids it; the
//! error then says what to fetch and where it must land).

use std::path::{Path, PathBuf};

use crate::config::is_hub_id;
use crate::error::ModelError;
use crate::models::hub::{snapshot_with, FileListing, HubCache};
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

/// The folder holding the model `spec` names: `spec` itself when it is a folder, else the
/// snapshot of the hub id `spec` in the Hugging Face cache, downloading the files it lacks unless
/// the cache is offline (then the error says what to download and where it must land).
pub fn resolve_model_folder(spec: &str, cache: &HubCache, role: ModelRole) -> Result<PathBuf> {
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
    let what = match role {
        ModelRole::Clip => {
            "CLIP model files (pass --model with a local folder instead if you have one)"
        }
        ModelRole::Blip => {
            "BLIP model files (pass --blip-model with a local folder instead if you have one)"
        }
    };
    snapshot_with(spec, cache, what, &|listing, _read| {
        choose_files(listing, role)
    })
}

/// The files of a repo `auto_label` needs for `role`, or the ones missing.
fn choose_files(
    listing: &dyn FileListing,
    role: ModelRole,
) -> std::result::Result<Vec<String>, Vec<String>> {
    let mut files = Vec::new();
    let mut missing = Vec::new();
    for required in ["config.json", "preprocessor_config.json"] {
        if listing.has(required) {
            files.push(required.to_string());
        } else {
            missing.push(required.to_string());
        }
    }
    match ["model.safetensors", "pytorch_model.bin"]
        .into_iter()
        .find(|w| listing.has(w))
    {
        Some(weights) => files.push(weights.to_string()),
        None => missing.push("model.safetensors".to_string()),
    }
    if listing.has("tokenizer.json") {
        files.push("tokenizer.json".to_string());
    } else if role == ModelRole::Clip && listing.has("vocab.json") && listing.has("merges.txt") {
        files.extend(["vocab.json".to_string(), "merges.txt".to_string()]);
    } else {
        missing.push("tokenizer.json".to_string());
    }
    for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
        if listing.has(optional) {
            files.push(optional.to_string());
        }
    }
    if missing.is_empty() {
        Ok(files)
    } else {
        Err(missing)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_used_as_they_are() -> Result<()> {
        let dir = tempfile::tempdir().expect("dir");
        let spec = dir.path().to_str().expect("utf-8");
        let cache = HubCache::at(dir.path().join("nothing")).with_offline(true);
        assert_eq!(
            resolve_model_folder(spec, &cache, ModelRole::Clip)?,
            dir.path()
        );
        Ok(())
    }

    #[test]
    fn hub_ids_come_from_the_cache_or_say_how_to_download_them() -> Result<()> {
        let cache_dir = tempfile::tempdir().expect("dir");
        let cache = HubCache::at(cache_dir.path()).with_offline(true);
        let err = resolve_model_folder(DEFAULT_CLIP_MODEL, &cache, ModelRole::Clip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("download openai/clip-vit-large-patch14 config.json preprocessor_config.json model.safetensors")
                && err.contains(&cache_dir.path().display().to_string())
                && err.contains("--model"),
            "{err}"
        );
        let repo = cache_dir
            .path()
            .join("models--openai--clip-vit-large-patch14");
        let snapshot = repo.join("snapshots").join("abc");
        std::fs::create_dir_all(&snapshot).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs").join("main"), "abc").expect("write");
        for file in [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
            "vocab.json",
            "merges.txt",
        ] {
            std::fs::write(snapshot.join(file), "{}").expect("write");
        }
        assert_eq!(
            resolve_model_folder(DEFAULT_CLIP_MODEL, &cache, ModelRole::Clip)?,
            snapshot
        );
        let err = resolve_model_folder(
            "Salesforce/blip-image-captioning-large",
            &cache,
            ModelRole::Blip,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("download Salesforce/blip-image-captioning-large config.json")
                && err.contains("--blip-model"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn paths_that_are_neither_are_named() {
        let cache = HubCache::at("/nonexistent").with_offline(true);
        let err = resolve_model_folder("./models/nope", &cache, ModelRole::Clip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("./models/nope") && err.contains("no such folder"),
            "{err}"
        );
    }
}
