//! The diffusers folder layout (`save_pretrained`): `unet/`, `text_encoder/`, `vae/` each with
//! `config.json` and weights, `tokenizer/`, `scheduler/scheduler_config.json`. Also the files a
//! hub id needs, which are looked up in the cache or downloaded through [`crate::models::hub`].
//!
//! Weights: `diffusion_pytorch_model.safetensors` (diffusers) or `model.safetensors`
//! (transformers), their sharded form (`*.safetensors.index.json` + shards), PyTorch `.bin`
//! pickles when no safetensors exist, and weight variants (`*.fp16.safetensors`): the variant
//! asked for when present (else the default files, with a note), the only variant a folder holds
//! when it has no default files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{ComponentWeights, LoadOptions, Opened, OpenedText};
use crate::error::ModelError;
use crate::models::clip_text_config::ClipTextConfig;
use crate::models::hub::{snapshot_with, FileListing, LocalFolder};
use crate::models::noise::SchedulerConfig;
use crate::models::source::{folder_architecture, open_pickle};
use crate::models::unet_config::UNetConfig;
use crate::models::vae_config::VaeConfig;
use crate::nn::weights::TensorSource;
use crate::{Error, Result};

/// The stems of weight files: diffusers models, then transformers models.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];
/// The stems of pickle weight files.
const PICKLE_STEMS: [&str; 2] = ["diffusion_pytorch_model", "pytorch_model"];

/// The weight files chosen for one component folder.
#[derive(Debug, Clone, PartialEq)]
struct WeightChoice {
    /// One weight file, or a sharded checkpoint's index, relative to the repo root.
    file: String,
    /// Why this file and not the default one, when that needs saying.
    note: Option<String>,
}

fn join(folder: &str, name: &str) -> String {
    if folder.is_empty() {
        name.to_string()
    } else {
        format!("{folder}/{name}")
    }
}

/// The candidate file names of `variant` (`None` = the default files), best first.
fn candidates(variant: Option<&str>) -> Vec<String> {
    let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
    let mut names = Vec::new();
    for stem in STEMS {
        names.push(format!("{stem}{v}.safetensors"));
    }
    for stem in STEMS {
        names.push(format!("{stem}.safetensors.index{v}.json"));
    }
    for stem in PICKLE_STEMS {
        names.push(format!("{stem}{v}.bin"));
    }
    for stem in PICKLE_STEMS {
        names.push(format!("{stem}.bin.index{v}.json"));
    }
    names
}

/// The variants (`fp16`, `ema`, ...) whose weight files `names` holds.
fn variants_present(names: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for name in names {
        for stem in STEMS.iter().chain(PICKLE_STEMS.iter()) {
            let Some(rest) = name.strip_prefix(&format!("{stem}.")) else {
                continue;
            };
            let variant = rest
                .strip_suffix(".safetensors")
                .or_else(|| rest.strip_suffix(".bin"))
                .filter(|v| !v.contains('.'))
                .or_else(|| {
                    // `*.safetensors.index.fp16.json`
                    rest.strip_prefix("safetensors.index.")
                        .or_else(|| rest.strip_prefix("bin.index."))
                        .and_then(|r| r.strip_suffix(".json"))
                });
            if let Some(v) =
                variant.filter(|v| !v.is_empty() && !v.contains('.') && !v.contains("-of-"))
            {
                found.insert(v.to_string());
            }
        }
    }
    found
}

/// Which weight file of `folder` to read; `Err` names the file that is missing.
fn choose_weights(
    listing: &dyn FileListing,
    folder: &str,
    variant: Option<&str>,
) -> std::result::Result<WeightChoice, String> {
    let first = |variant: Option<&str>| {
        candidates(variant)
            .into_iter()
            .map(|name| join(folder, &name))
            .find(|path| listing.has(path))
    };
    let shown = if folder.is_empty() { "." } else { folder };
    if let Some(v) = variant {
        if let Some(file) = first(Some(v)) {
            return Ok(WeightChoice { file, note: None });
        }
        if let Some(file) = first(None) {
            let note = Some(format!("{shown}/ has no `{v}` variant: reading {file}"));
            return Ok(WeightChoice { file, note });
        }
    } else if let Some(file) = first(None) {
        return Ok(WeightChoice { file, note: None });
    }
    let present = variants_present(&listing.names_in(folder));
    let only = if present.contains("fp16") {
        Some("fp16".to_string())
    } else if present.len() == 1 {
        present.iter().next().cloned()
    } else {
        None
    };
    if let Some(v) = only.filter(|v| Some(v.as_str()) != variant) {
        if let Some(file) = first(Some(&v)) {
            let note = Some(format!(
                "{shown}/ holds only the `{v}` variant: reading {file}"
            ));
            return Ok(WeightChoice { file, note });
        }
    }
    let wanted = match folder {
        "text_encoder" | "text_encoder_2" => "model",
        _ => "diffusion_pytorch_model",
    };
    let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
    Err(join(folder, &format!("{wanted}{v}.safetensors")))
}

/// The shard files an index names, in order of first appearance.
fn shards_of(index_text: &str, origin: &str) -> Result<Vec<String>> {
    let invalid = |message: String| -> Error {
        ModelError::InvalidConfig {
            origin: origin.to_string(),
            message,
        }
        .into()
    };
    let json: Value =
        serde_json::from_str(index_text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let Some(Value::Object(map)) = json.get("weight_map") else {
        return Err(invalid(
            "has no `weight_map` object (key → shard file)".to_string(),
        ));
    };
    let mut shards: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| invalid(format!("the shard of `{key}` is {file}, not a file name")))?;
        if file.contains('/') || file.contains("..") {
            return Err(invalid(format!(
                "the shard `{file}` is not a file name in the same folder"
            )));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// Every file of a weight choice, the index's shards included; `Err` lists missing files.
fn weight_files(
    listing: &dyn FileListing,
    read: &dyn Fn(&str) -> Option<String>,
    choice: &WeightChoice,
) -> std::result::Result<Vec<String>, Vec<String>> {
    if !choice.file.ends_with(".json") {
        return Ok(vec![choice.file.clone()]);
    }
    let folder = choice
        .file
        .rsplit_once('/')
        .map(|(f, _)| f)
        .unwrap_or_default();
    let Some(text) = read(&choice.file) else {
        return Err(vec![choice.file.clone()]);
    };
    let shards = shards_of(&text, &choice.file).map_err(|_| vec![choice.file.clone()])?;
    let mut files = vec![choice.file.clone()];
    let mut missing = Vec::new();
    for shard in shards {
        let path = join(folder, &shard);
        if listing.has(&path) {
            files.push(path);
        } else {
            missing.push(path);
        }
    }
    if missing.is_empty() {
        Ok(files)
    } else {
        Err(missing)
    }
}

/// Opens the chosen weights of `root` as tensor sources (one per shard).
fn open_sources(root: &Path, choice: &WeightChoice) -> Result<Vec<TensorSource>> {
    let path = root.join(&choice.file);
    if choice.file.ends_with(".json") {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let folder = path.parent().unwrap_or(root);
        shards_of(&text, &path.display().to_string())?
            .into_iter()
            .map(|shard| open_file(&folder.join(shard)))
            .collect()
    } else {
        Ok(vec![open_file(&path)?])
    }
}

fn open_file(path: &Path) -> Result<TensorSource> {
    if !path.is_file() {
        return Err(ModelError::NotFound {
            path: path.to_path_buf(),
            hint: "a weight file the model's folder (or its shard index) names is missing"
                .to_string(),
        }
        .into());
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        TensorSource::safetensors(path)
    } else {
        open_pickle(path)
    }
}

/// The weights of one component folder: its chosen files and the note about the choice.
fn component(
    root: &Path,
    folder: &str,
    options: &LoadOptions,
    rename: &dyn Fn(&str) -> String,
) -> Result<(ComponentWeights, Option<String>)> {
    let listing = LocalFolder(root);
    let choice = choose_weights(&listing, folder, options.variant.as_deref()).map_err(|file| {
        Error::from(ModelError::NotFound {
            path: root.join(&file),
            hint: format!(
                "{folder}/ holds no weights (diffusion_pytorch_model.safetensors, \
                 model.safetensors, a sharded index or a .bin); the model folder is incomplete"
            ),
        })
    })?;
    let sources = open_sources(root, &choice)?;
    Ok((
        ComponentWeights::renamed(sources, rename, options),
        choice.note,
    ))
}

/// diffusers < 0.14 saved the VAE's mid-block attention as `query`/`key`/`value`/`proj_attn`;
/// diffusers renames them on load, and so do we.
fn modern_vae_key(key: &str) -> String {
    for (old, new) in [
        (".attentions.0.query.", ".attentions.0.to_q."),
        (".attentions.0.key.", ".attentions.0.to_k."),
        (".attentions.0.value.", ".attentions.0.to_v."),
        (".attentions.0.proj_attn.", ".attentions.0.to_out.0."),
    ] {
        if key.contains(old) {
            return key.replacen(old, new, 1);
        }
    }
    key.to_string()
}

fn same_key(key: &str) -> String {
    key.to_string()
}

/// The default noise schedule of Stable Diffusion 1.x/2.x (DDPM, scaled_linear 0.00085 →
/// 0.012, 1000 steps, epsilon), for sources that do not say.
pub(crate) fn sd_scheduler() -> SchedulerConfig {
    SchedulerConfig {
        class_name: None,
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: "scaled_linear".to_string(),
        trained_betas: None,
        prediction_type: "epsilon".to_string(),
        rescale_betas_zero_snr: false,
    }
}

/// The folders of text encoder `index` and of its tokenizer: `text_encoder/` and `tokenizer/`,
/// then `text_encoder_2/` and `tokenizer_2/` (SDXL).
fn text_folders(index: usize) -> (&'static str, &'static str) {
    match index {
        0 => ("text_encoder", "tokenizer"),
        _ => ("text_encoder_2", "tokenizer_2"),
    }
}

/// Opens a diffusers folder: configs read, weights mapped.
pub(crate) fn open(root: &Path, options: &LoadOptions) -> Result<Opened> {
    let architecture = folder_architecture(root)?;
    let mut notes = Vec::new();
    let unet_config = UNetConfig::from_file(&root.join("unet").join("config.json"))?;
    let vae_config = VaeConfig::from_file(&root.join("vae").join("config.json"))?;
    let (unet, note) = component(root, "unet", options, &same_key)?;
    notes.extend(note);
    let mut text_encoders = Vec::new();
    for index in 0..architecture.family.text_encoder_count() {
        let (folder, tokenizer) = text_folders(index);
        let config = ClipTextConfig::from_file(&root.join(folder).join("config.json"))?;
        let (weights, note) = component(root, folder, options, &same_key)?;
        notes.extend(note);
        let tokenizer_dir = root.join(tokenizer);
        let tokenizer = if tokenizer_dir.is_dir() {
            Some(tokenizer_dir)
        } else {
            notes.push(format!(
                "no {tokenizer}/ folder: using the bundled CLIP tokenizer"
            ));
            None
        };
        text_encoders.push(OpenedText {
            config,
            weights,
            tokenizer,
        });
    }
    let (vae, note) = component(root, "vae", options, &modern_vae_key)?;
    notes.extend(note);

    let scheduler_path = root.join("scheduler").join("scheduler_config.json");
    let (scheduler, prediction_origin) = if scheduler_path.is_file() {
        let text =
            std::fs::read_to_string(&scheduler_path).map_err(|e| Error::io(&scheduler_path, e))?;
        let config: SchedulerConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
                origin: scheduler_path.display().to_string(),
                message: format!("not a valid scheduler config: {e}"),
            })?;
        (config, Some("scheduler/scheduler_config.json".to_string()))
    } else {
        notes.push(
            "no scheduler/scheduler_config.json: Stable Diffusion's DDPM schedule \
             (scaled_linear 0.00085 → 0.012, 1000 steps)"
                .to_string(),
        );
        (sd_scheduler(), None)
    };

    notes.push("configs: the folder's config.json files".to_string());
    Ok(Opened {
        description: format!("diffusers folder {}", root.display()),
        architecture,
        unet_config,
        unet,
        text_encoders,
        vae: Some((vae_config, vae)),
        scheduler,
        scheduler_origin: scheduler_path.display().to_string(),
        prediction_origin,
        notes,
    })
}

/// A diffusers VAE folder (`config.json` + weights): config, weights, a note on the files.
pub(crate) fn open_vae_folder(
    folder: &Path,
    options: &LoadOptions,
) -> Result<(VaeConfig, ComponentWeights, String)> {
    let config = VaeConfig::from_file(&folder.join("config.json"))?;
    let (weights, note) = component(folder, "", options, &modern_vae_key)?;
    Ok((
        config,
        weights,
        note.unwrap_or_else(|| "diffusers layout".to_string()),
    ))
}

/// The tokenizer files of a folder: `tokenizer.json` or `vocab.json` + `merges.txt`, plus the
/// optional special-token files; `Err` names the missing ones.
fn tokenizer_files(
    listing: &dyn FileListing,
    folder: &str,
) -> std::result::Result<Vec<String>, Vec<String>> {
    let path = |name: &str| join(folder, name);
    let mut files = Vec::new();
    if listing.has(&path("vocab.json")) && listing.has(&path("merges.txt")) {
        files.extend([path("vocab.json"), path("merges.txt")]);
    } else if listing.has(&path("tokenizer.json")) {
        files.push(path("tokenizer.json"));
    } else {
        return Err(vec![path("vocab.json"), path("merges.txt")]);
    }
    for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
        if listing.has(&path(optional)) {
            files.push(path(optional));
        }
    }
    Ok(files)
}

/// Every file a pipeline needs from a hub repo (or what is missing, with the standard names
/// of the optional files once anything is missing, so the advice is a complete download).
fn pipeline_files(
    listing: &dyn FileListing,
    read: &dyn Fn(&str) -> Option<String>,
    variant: Option<&str>,
) -> std::result::Result<Vec<String>, Vec<String>> {
    let mut files = Vec::new();
    let mut missing = Vec::new();
    // SDXL's second text encoder and tokenizer, when the repo has them.
    let sdxl = listing.has("text_encoder_2/config.json");
    let mut folders = vec!["unet", "text_encoder", "vae"];
    let mut tokenizers = vec!["tokenizer"];
    if sdxl {
        folders.push("text_encoder_2");
        tokenizers.push("tokenizer_2");
    }
    for folder in folders {
        let config = join(folder, "config.json");
        if listing.has(&config) {
            files.push(config);
        } else {
            missing.push(config);
        }
        match choose_weights(listing, folder, variant) {
            Ok(choice) => match weight_files(listing, read, &choice) {
                Ok(found) => files.extend(found),
                Err(absent) => missing.extend(absent),
            },
            Err(file) => missing.push(file),
        }
    }
    for folder in tokenizers {
        match tokenizer_files(listing, folder) {
            Ok(found) => files.extend(found),
            Err(absent) => missing.extend(absent),
        }
    }
    let optional = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
    ];
    for file in optional {
        if listing.has(file) {
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        } else if !missing.is_empty() {
            missing.push(file.to_string());
        }
    }
    if missing.is_empty() {
        Ok(files)
    } else {
        Err(missing)
    }
}

/// The snapshot folder of a diffusers pipeline on the hub, from the cache or downloaded.
pub(crate) fn hub_snapshot(id: &str, options: &LoadOptions) -> Result<PathBuf> {
    let variant = options.variant.clone();
    snapshot_with(
        id,
        &options.hub_cache,
        "files of a Stable Diffusion diffusers model",
        &move |listing, read| pipeline_files(listing, read, variant.as_deref()),
    )
}

/// A tokenizer folder from the hub: the repo's `folder` (`tokenizer/` or `tokenizer_2/` of a
/// pipeline) or its root (a CLIP model such as `openai/clip-vit-large-patch14`).
pub(crate) fn hub_tokenizer(id: &str, folder: &str, options: &LoadOptions) -> Result<PathBuf> {
    let choose = |listing: &dyn FileListing, _: &dyn Fn(&str) -> Option<String>| {
        tokenizer_files(listing, folder).or_else(|_| tokenizer_files(listing, ""))
    };
    let snapshot = snapshot_with(id, &options.hub_cache, "tokenizer files", &choose)?;
    let nested = snapshot.join(folder);
    Ok(
        if tokenizer_files(&LocalFolder(&snapshot), folder).is_ok() {
            nested
        } else {
            snapshot
        },
    )
}

/// A VAE from the hub: the repo's root (`stabilityai/sd-vae-ft-mse`) or its `vae/` folder.
pub(crate) fn hub_vae(id: &str, options: &LoadOptions) -> Result<PathBuf> {
    let variant = options.variant.clone();
    let vae_files = move |listing: &dyn FileListing,
                          read: &dyn Fn(&str) -> Option<String>,
                          folder: &str|
          -> std::result::Result<Vec<String>, Vec<String>> {
        let config = join(folder, "config.json");
        let choice = choose_weights(listing, folder, variant.as_deref()).map_err(|f| {
            if listing.has(&config) {
                vec![f]
            } else {
                vec![config.clone(), f]
            }
        })?;
        let mut files = weight_files(listing, read, &choice)?;
        if !listing.has(&config) {
            return Err(vec![config]);
        }
        files.push(config);
        Ok(files)
    };
    let choose = |listing: &dyn FileListing, read: &dyn Fn(&str) -> Option<String>| {
        vae_files(listing, read, "").or_else(|e| vae_files(listing, read, "vae").map_err(|_| e))
    };
    let snapshot = snapshot_with(id, &options.hub_cache, "files of a diffusers VAE", &choose)?;
    Ok(if snapshot.join("config.json").is_file() {
        snapshot
    } else {
        snapshot.join("vae")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::hub::RemoteFiles;

    fn remote(files: &[&str]) -> RemoteFiles {
        RemoteFiles(files.iter().map(|f| f.to_string()).collect())
    }

    #[test]
    fn weight_choice_prefers_the_asked_variant_then_the_defaults() {
        let both = remote(&[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
        ]);
        let chosen = choose_weights(&both, "unet", None).unwrap();
        assert_eq!(chosen.file, "unet/diffusion_pytorch_model.safetensors");
        assert_eq!(chosen.note, None);
        let chosen = choose_weights(&both, "unet", Some("fp16")).unwrap();
        assert_eq!(chosen.file, "unet/diffusion_pytorch_model.fp16.safetensors");

        let default_only = remote(&["text_encoder/model.safetensors"]);
        let chosen = choose_weights(&default_only, "text_encoder", Some("fp16")).unwrap();
        assert_eq!(chosen.file, "text_encoder/model.safetensors");
        assert!(chosen.note.unwrap().contains("no `fp16` variant"));

        let variant_only = remote(&["vae/diffusion_pytorch_model.fp16.safetensors"]);
        let chosen = choose_weights(&variant_only, "vae", None).unwrap();
        assert_eq!(chosen.file, "vae/diffusion_pytorch_model.fp16.safetensors");
        assert!(chosen.note.unwrap().contains("only the `fp16` variant"));

        let pickle_only = remote(&["text_encoder/pytorch_model.bin"]);
        let chosen = choose_weights(&pickle_only, "text_encoder", None).unwrap();
        assert_eq!(chosen.file, "text_encoder/pytorch_model.bin");

        let sharded = remote(&[
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        ]);
        let chosen = choose_weights(&sharded, "unet", None).unwrap();
        assert_eq!(
            chosen.file,
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json"
        );

        let nothing = remote(&["unet/config.json"]);
        assert_eq!(
            choose_weights(&nothing, "unet", None).unwrap_err(),
            "unet/diffusion_pytorch_model.safetensors"
        );
    }

    #[test]
    fn shards_come_from_the_index_and_missing_ones_are_named() {
        let index = r#"{"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-1.safetensors"}}"#;
        let listing = remote(&[
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/m-1.safetensors",
        ]);
        let choice = choose_weights(&listing, "unet", None).unwrap();
        let read = |_: &str| Some(index.to_string());
        assert_eq!(
            weight_files(&listing, &read, &choice).unwrap_err(),
            vec!["unet/m-2.safetensors".to_string()]
        );
        assert!(shards_of(r#"{"weight_map": {"a": "../x"}}"#, "i.json").is_err());
    }

    #[test]
    fn an_empty_repo_lacks_the_standard_files() {
        let missing = pipeline_files(&remote(&[]), &|_| None, None).unwrap_err();
        for file in [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "tokenizer/vocab.json",
            "scheduler/scheduler_config.json",
        ] {
            assert!(missing.iter().any(|m| m == file), "{file}: {missing:?}");
        }
    }

    #[test]
    fn an_sdxl_repo_needs_its_second_text_encoder_and_tokenizer() {
        let repo = remote(&[
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "text_encoder_2/config.json",
            "model_index.json",
        ]);
        let missing = pipeline_files(&repo, &|_| None, None).unwrap_err();
        for file in [
            "text_encoder_2/model.safetensors",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
        ] {
            assert!(missing.iter().any(|m| m == file), "{file}: {missing:?}");
        }
        let mut whole = RemoteFiles(repo.0.clone());
        for file in [
            "text_encoder_2/model.safetensors",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "scheduler/scheduler_config.json",
        ] {
            whole.0.insert(file.to_string());
        }
        let files = pipeline_files(&whole, &|_| None, None).unwrap();
        for file in ["text_encoder_2/model.safetensors", "tokenizer_2/merges.txt"] {
            assert!(files.iter().any(|f| f == file), "{file}: {files:?}");
        }
    }

    #[test]
    fn old_vae_attention_names_are_renamed() {
        assert_eq!(
            modern_vae_key("encoder.mid_block.attentions.0.proj_attn.weight"),
            "encoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            modern_vae_key("decoder.mid_block.attentions.0.query.bias"),
            "decoder.mid_block.attentions.0.to_q.bias"
        );
        assert_eq!(
            modern_vae_key("encoder.conv_in.weight"),
            "encoder.conv_in.weight"
        );
    }
}
