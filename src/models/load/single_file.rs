//! A single LDM checkpoint (`v1-5-pruned.safetensors`, `.ckpt`): its tensors split by
//! component (`model.diffusion_model.` UNet, `first_stage_model.` VAE, `cond_stage_model.`
//! text encoder), each converted to diffusers keys, with configs from the LDM yaml beside the
//! file (`<stem>.yaml`) or inferred from the shapes.
//!
//! Real files also carry tensors no component uses; these are skipped by an explicit list (the
//! DDPM schedule buffers LDM saves, the EMA copy and its counters, buffers such as
//! `position_ids`, OpenCLIP's unused last block and projection). Any other tensor is an error
//! that names it: a file we do not understand is not trained on.

use std::path::Path;

use serde_json::Value;

use super::diffusers::sd_scheduler;
use super::ldm_text::{self, LdmText, OpenClipUse};
use super::ldm_unet::LdmUnet;
use super::ldm_vae::LdmVae;
use super::ldm_yaml::{LdmYaml, SD_SCALE_FACTOR};
use super::{ComponentWeights, LoadOptions, Opened, OpenedText};
use crate::config::WeightsFormat;
use crate::error::ModelError;
use crate::models::clip_text_config::ClipTextConfig;
use crate::models::family::{
    ldm_architecture, not_an_sd_checkpoint, ModelFamily, LDM_CLIP_PREFIX, LDM_OPENCLIP_PREFIX,
    LDM_UNET_PREFIX,
};
use crate::models::source::open_pickle;
use crate::models::unet_config::UNetConfig;
use crate::models::vae_config::VaeConfig;
use crate::nn::weights::TensorSource;
use crate::{Error, Result};

/// The VAE's prefix in a full checkpoint.
const LDM_VAE_PREFIX: &str = "first_stage_model.";
/// SDXL's first text encoder (CLIP ViT-L, Hugging Face layout) in Stability's single file.
const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG) in Stability's single file.
const SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// SDXL's VAE scaling factor (its file records none).
const SDXL_SCALE_FACTOR: f64 = 0.13025;

/// The buffers of LDM's `DDPM` class that checkpoints carry; the schedule is recomputed.
const DDPM_BUFFERS: [&str; 12] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

/// The EMA copy of the weights (`model_ema.decay`, `model_ema.num_updates`, and in full
/// checkpoints every UNet weight again); training starts from the regular weights.
const EMA_PREFIX: &str = "model_ema.";

fn open_source(path: &Path, format: WeightsFormat) -> Result<TensorSource> {
    match format {
        WeightsFormat::Safetensors => TensorSource::safetensors(path),
        WeightsFormat::Pickle => open_pickle(path),
    }
}

fn unsupported(path: &Path, message: String) -> Error {
    ModelError::Unsupported {
        origin: path.display().to_string(),
        message,
    }
    .into()
}

/// The tensors of one component, prefix removed.
type Keys = Vec<(String, Vec<usize>)>;

/// The tensors of a checkpoint, by component.
#[derive(Default)]
struct Split {
    unet: Keys,
    vae: Keys,
    clip: Keys,
    open_clip: Keys,
    /// SDXL's CLIP ViT-L (`conditioner.embedders.0.transformer.`).
    sdxl_clip: Keys,
    /// SDXL's OpenCLIP ViT-bigG (`conditioner.embedders.1.model.`).
    sdxl_open_clip: Keys,
    /// Tensors skipped on purpose: (kind, count) for the note.
    ddpm: usize,
    ema: usize,
    unknown: Vec<String>,
}

fn split(keys: Keys) -> Split {
    let mut s = Split::default();
    for (key, shape) in keys {
        let strip = |prefix: &str| key.strip_prefix(prefix).map(str::to_string);
        if let Some(k) = strip(LDM_UNET_PREFIX) {
            s.unet.push((k, shape));
        } else if let Some(k) = strip(LDM_VAE_PREFIX) {
            s.vae.push((k, shape));
        } else if let Some(k) = strip(LDM_CLIP_PREFIX) {
            s.clip.push((k, shape));
        } else if let Some(k) = strip(LDM_OPENCLIP_PREFIX) {
            s.open_clip.push((k, shape));
        } else if let Some(k) = strip(SDXL_CLIP_PREFIX) {
            s.sdxl_clip.push((k, shape));
        } else if let Some(k) = strip(SDXL_OPENCLIP_PREFIX) {
            s.sdxl_open_clip.push((k, shape));
        } else if DDPM_BUFFERS.contains(&key.as_str()) {
            s.ddpm += 1;
        } else if key.starts_with(EMA_PREFIX) {
            s.ema += 1;
        } else {
            s.unknown.push(key);
        }
    }
    s.unknown.sort();
    s
}

fn list(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    text
}

/// Opens a single-file checkpoint: configs resolved, every tensor mapped or skipped by name.
pub(crate) fn open(path: &Path, format: WeightsFormat, options: &LoadOptions) -> Result<Opened> {
    // The first source serves the UNet: a pickle's index is read once per source.
    let unet_source = open_source(path, format)?;
    let keys = unet_source.keys_and_shapes();
    let architecture = ldm_architecture(&keys).map_err(|e| e.at(path))?;
    let version = architecture.family;
    if version == ModelFamily::Sdxl {
        return open_sdxl(path, format, options, unet_source, keys, architecture, None);
    }
    let parts = split(keys);
    if !parts.unknown.is_empty() {
        return Err(unsupported(
            path,
            format!(
                "{} tensor(s) belong to no Stable Diffusion 1.x/2.x component (UNet \
                 `{LDM_UNET_PREFIX}`, VAE `{LDM_VAE_PREFIX}`, text encoder `cond_stage_model.`): \
                 {}; this is not a plain SD checkpoint",
                parts.unknown.len(),
                list(&parts.unknown)
            ),
        ));
    }
    let origin = path.display().to_string();
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| origin.clone());

    let yaml_path = path.with_extension("yaml");
    let yaml = if yaml_path.is_file() {
        Some(LdmYaml::read(&yaml_path)?)
    } else {
        None
    };
    if let Some(y) = &yaml {
        if y.text.family != version {
            return Err(ModelError::InvalidConfig {
                origin: yaml_path.display().to_string(),
                message: format!(
                    "names the text encoder of {} but {file_name} holds the {} of {version}; the \
                     yaml belongs to another model",
                    y.text.family,
                    version.text_encoder_name()
                ),
            }
            .into());
        }
    }
    let mut notes = Vec::new();

    // UNet.
    let unet = LdmUnet::parse(&parts.unet).map_err(|m| unsupported(path, m))?;
    let unet_keys = unet
        .map_keys(LDM_UNET_PREFIX)
        .map_err(|m| unsupported(path, m))?;
    let unet_json = match &yaml {
        Some(y) => {
            check_agreement(
                &y.unet,
                &unet.shape_facts().map_err(|m| unsupported(path, m))?,
                &yaml_path,
                &file_name,
                "UNet",
            )?;
            y.unet.clone()
        }
        None => unet
            .infer_config(version)
            .map_err(|m| ModelError::InvalidConfig {
                origin: origin.clone(),
                message: format!(
                    "{m}; put the model's LDM yaml beside it as {}",
                    yaml_path.display()
                ),
            })?,
    };
    let config_origin = |component: &str| match &yaml {
        Some(_) => format!("the {component} config from {}", yaml_path.display()),
        None => format!("the {component} config inferred from {origin}"),
    };
    let unet_config = UNetConfig::from_json_str(&unet_json.to_string(), &config_origin("UNet"))?;

    // Text encoder.
    let text: LdmText = match (parts.clip.is_empty(), parts.open_clip.is_empty()) {
        (false, true) => ldm_text::clip(&parts.clip, LDM_CLIP_PREFIX),
        (true, false) => {
            let usage = match yaml.as_ref().is_none_or(|y| y.text.penultimate) {
                true => OpenClipUse::Penultimate,
                false => OpenClipUse::Last,
            };
            ldm_text::open_clip(&parts.open_clip, LDM_OPENCLIP_PREFIX, usage)
        }
        (true, true) => Err(format!(
            "the file holds no text encoder (`{LDM_CLIP_PREFIX}` or `{LDM_OPENCLIP_PREFIX}` \
             tensors); use a full checkpoint or the model's diffusers folder"
        )),
        (false, false) => Err("the file holds two text encoders (CLIP and OpenCLIP)".to_string()),
    }
    .map_err(|m| unsupported(path, m))?;
    let text_config = ClipTextConfig::from_json(
        &text
            .inferred_config()
            .map_err(|m| unsupported(path, m))?
            .to_string(),
        &format!("the text encoder config inferred from {origin}"),
    )?;

    // VAE (it may come from `vae:` instead).
    let vae = if parts.vae.is_empty() {
        if options.vae.is_none() {
            return Err(unsupported(
                path,
                format!("the file holds no VAE (`{LDM_VAE_PREFIX}` tensors); set `vae:` to one"),
            ));
        }
        None
    } else {
        let ldm = LdmVae::new(&parts.vae);
        let keys = ldm
            .map_keys(LDM_VAE_PREFIX)
            .map_err(|m| unsupported(path, m))?;
        let json = match &yaml {
            Some(y) => {
                let facts = ldm
                    .infer_config(SD_SCALE_FACTOR)
                    .map_err(|m| unsupported(path, m))?;
                check_agreement(&y.vae, &facts, &yaml_path, &file_name, "VAE")?;
                y.vae.clone()
            }
            None => ldm
                .infer_config(SD_SCALE_FACTOR)
                .map_err(|m| unsupported(path, m))?,
        };
        let config = VaeConfig::from_json_str(&json.to_string(), &config_origin("VAE"))?;
        Some((
            config,
            ComponentWeights::mapped(open_source(path, format)?, keys, options),
        ))
    };

    notes.push(match &yaml {
        Some(y) => format!("configs: from {}", y.name),
        None => match version {
            ModelFamily::Sd1 => {
                "configs: inferred from the tensor shapes, with SD 1.x's conventions \
                              (8 attention heads per block, quick_gelu text encoder)"
                    .to_string()
            }
            ModelFamily::Sd2 | ModelFamily::Sdxl => {
                "configs: inferred from the tensor shapes, with SD 2.x's conventions \
                              (64-wide attention heads, gelu text encoder, penultimate layer)"
                    .to_string()
            }
        },
    });
    let mut skipped = Vec::new();
    if parts.ddpm > 0 {
        skipped.push(format!("{} DDPM schedule buffer(s)", parts.ddpm));
    }
    if parts.ema > 0 {
        skipped.push(format!("{} EMA tensor(s) (`{EMA_PREFIX}*`)", parts.ema));
    }
    let ignored = |needle: &str| text.ignored.iter().any(|k| k.contains(needle));
    if ignored(".resblocks.") {
        skipped.push("OpenCLIP's last block (SD 2.x conditions on the penultimate layer)".into());
    }
    for buffer in ["position_ids", "text_projection", "logit_scale"] {
        if ignored(buffer) {
            skipped.push(format!("`{buffer}`"));
        }
    }
    if !skipped.is_empty() {
        notes.push(format!("skipped {}", skipped.join(", ")));
    }

    let (scheduler, prediction_origin) = match &yaml {
        Some(y) => (y.scheduler.clone(), Some(y.name.clone())),
        None => (sd_scheduler(), None),
    };
    let scheduler_origin = match &yaml {
        Some(_) => yaml_path.display().to_string(),
        None => format!("Stable Diffusion's DDPM schedule (for {origin})"),
    };
    Ok(Opened {
        description: format!("single-file checkpoint {origin}"),
        architecture,
        unet_config,
        vae,
        unet: ComponentWeights::mapped(unet_source, unet_keys, options),
        text_encoders: vec![OpenedText {
            config: text_config,
            weights: ComponentWeights::mapped(open_source(path, format)?, text.keys, options),
            tokenizer: None,
        }],
        scheduler,
        scheduler_origin,
        prediction_origin,
        notes,
    })
}

/// The diffusers configs of an SDXL single file's components.
#[derive(Debug, Clone)]
pub(crate) struct SdxlConfigs {
    pub unet: Value,
    pub text: [Value; 2],
    pub vae: Value,
}

/// SDXL's configs from its components' tensor shapes, with SDXL's conventions where the shapes
/// are silent (64-wide attention heads in the UNet and both encoders, quick_gelu then gelu, the
/// VAE's 0.13025 scaling); the width of each size number's features is the `label_emb` input
/// left after the pooled text, over six.
fn configs_of(unet: &LdmUnet, text: [&LdmText; 2], vae: &LdmVae) -> Result<SdxlConfigs, String> {
    let mut unet_json = unet.infer_config(ModelFamily::Sdxl)?;
    let te1_config = text[0].inferred_config()?.clone();
    let te2_config = text[1].inferred_config()?.clone();
    let pooled = te2_config["projection_dim"].as_u64().unwrap_or(0) as usize;
    let label = unet_json["projection_class_embeddings_input_dim"]
        .as_u64()
        .unwrap_or(0) as usize;
    if label <= pooled || !(label - pooled).is_multiple_of(6) {
        return Err(format!(
            "`{LDM_UNET_PREFIX}label_emb.0.0.weight` takes {label} inputs, which is not the \
             {pooled}-wide pooled text plus six equal size-number features"
        ));
    }
    unet_json["addition_time_embed_dim"] = serde_json::json!((label - pooled) / 6);
    Ok(SdxlConfigs {
        unet: unet_json,
        text: [te1_config, te2_config],
        vae: vae.infer_config(SDXL_SCALE_FACTOR)?,
    })
}

/// Stability's SDXL single file (`sd_xl_base_1.0.safetensors`): the UNet
/// (`model.diffusion_model.`, with `label_emb`), CLIP ViT-L
/// (`conditioner.embedders.0.transformer.`), OpenCLIP ViT-bigG with its projection
/// (`conditioner.embedders.1.model.`) and the VAE (`first_stage_model.`). `configs` replaces the
/// configs the shapes give (tests of models whose heads are not 64 wide).
pub(crate) fn open_sdxl(
    path: &Path,
    format: WeightsFormat,
    options: &LoadOptions,
    unet_source: TensorSource,
    keys: Keys,
    architecture: crate::models::family::Architecture,
    configs: Option<SdxlConfigs>,
) -> Result<Opened> {
    let origin = path.display().to_string();
    let parts = split(keys);
    let stray: Vec<String> = (parts.unknown.iter().cloned())
        .chain(
            parts
                .clip
                .iter()
                .map(|(k, _)| format!("{LDM_CLIP_PREFIX}{k}")),
        )
        .chain(
            parts
                .open_clip
                .iter()
                .map(|(k, _)| format!("{LDM_OPENCLIP_PREFIX}{k}")),
        )
        .collect();
    if !stray.is_empty() {
        return Err(unsupported(
            path,
            format!(
                "{} tensor(s) belong to no SDXL component (UNet `{LDM_UNET_PREFIX}`, VAE \
                 `{LDM_VAE_PREFIX}`, text encoders `{SDXL_CLIP_PREFIX}`, \
                 `{SDXL_OPENCLIP_PREFIX}`): {}",
                stray.len(),
                list(&stray)
            ),
        ));
    }
    if parts.sdxl_clip.is_empty() || parts.sdxl_open_clip.is_empty() {
        return Err(unsupported(
            path,
            format!(
                "the file lacks SDXL's text encoders (`{SDXL_CLIP_PREFIX}` and \
                 `{SDXL_OPENCLIP_PREFIX}` tensors); use a full checkpoint or the model's \
                 diffusers folder"
            ),
        ));
    }
    let unet = LdmUnet::parse(&parts.unet).map_err(|m| unsupported(path, m))?;
    let unet_keys = unet
        .map_keys(LDM_UNET_PREFIX)
        .map_err(|m| unsupported(path, m))?;
    let te1 =
        ldm_text::clip(&parts.sdxl_clip, SDXL_CLIP_PREFIX).map_err(|m| unsupported(path, m))?;
    let te2 = ldm_text::open_clip(
        &parts.sdxl_open_clip,
        SDXL_OPENCLIP_PREFIX,
        OpenClipUse::WithProjection,
    )
    .map_err(|m| unsupported(path, m))?;
    let ldm_vae = LdmVae::new(&parts.vae);
    let inferred = configs.is_none();
    let configs = match configs {
        Some(c) => c,
        None => {
            configs_of(&unet, [&te1, &te2], &ldm_vae).map_err(|m| ModelError::InvalidConfig {
                origin: origin.clone(),
                message: m,
            })?
        }
    };
    let config_origin = |component: &str| match inferred {
        true => format!("the {component} config inferred from {origin}"),
        false => format!("the {component} config given for {origin}"),
    };
    let unet_config = UNetConfig::from_json_str(&configs.unet.to_string(), &config_origin("UNet"))?;
    let mut text_encoders = Vec::new();
    for (text, config) in [te1, te2].into_iter().zip(&configs.text) {
        text_encoders.push(OpenedText {
            config: ClipTextConfig::from_json(&config.to_string(), &config_origin("text encoder"))?,
            weights: ComponentWeights::mapped(open_source(path, format)?, text.keys, options),
            tokenizer: None,
        });
    }
    let vae = if parts.vae.is_empty() {
        if options.vae.is_none() {
            return Err(unsupported(
                path,
                format!("the file holds no VAE (`{LDM_VAE_PREFIX}` tensors); set `vae:` to one"),
            ));
        }
        None
    } else {
        let keys = ldm_vae
            .map_keys(LDM_VAE_PREFIX)
            .map_err(|m| unsupported(path, m))?;
        let config = VaeConfig::from_json_str(&configs.vae.to_string(), &config_origin("VAE"))?;
        Some((
            config,
            ComponentWeights::mapped(open_source(path, format)?, keys, options),
        ))
    };
    let mut notes = vec![match inferred {
        true => "configs: inferred from the tensor shapes, with SDXL's conventions (64-wide \
                 attention heads, quick_gelu and gelu text encoders, VAE scaling 0.13025)"
            .to_string(),
        false => "configs: given".to_string(),
    }];
    let mut skipped = vec!["`position_ids`".to_string(), "`logit_scale`".to_string()];
    if parts.ddpm > 0 {
        skipped.push(format!("{} DDPM schedule buffer(s)", parts.ddpm));
    }
    if parts.ema > 0 {
        skipped.push(format!("{} EMA tensor(s) (`{EMA_PREFIX}*`)", parts.ema));
    }
    notes.push(format!("skipped {}", skipped.join(", ")));
    Ok(Opened {
        description: format!("single-file checkpoint {origin}"),
        architecture,
        unet_config,
        vae,
        unet: ComponentWeights::mapped(unet_source, unet_keys, options),
        text_encoders,
        scheduler: sd_scheduler(),
        scheduler_origin: format!("Stable Diffusion's DDPM schedule (for {origin})"),
        prediction_origin: None,
        notes,
    })
}

/// Fails when the yaml's config and the file's shapes disagree on a key both determine.
fn check_agreement(
    yaml: &Value,
    facts: &Value,
    yaml_path: &Path,
    file_name: &str,
    component: &str,
) -> Result<()> {
    const KEYS: [&str; 8] = [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "use_linear_projection",
    ];
    let normalise = |v: &Value, len: usize| match v {
        // A single number stands for the same value at every level.
        Value::Number(_) if len > 0 => Value::Array(vec![v.clone(); len]),
        other => other.clone(),
    };
    let levels = facts["block_out_channels"].as_array().map_or(0, Vec::len);
    for key in KEYS.iter().chain(["latent_channels"].iter()) {
        let (Some(a), Some(b)) = (yaml.get(*key), facts.get(*key)) else {
            continue;
        };
        let per_level = *key == "layers_per_block" && component == "UNet";
        let (a, b) = if per_level {
            (normalise(a, levels), normalise(b, levels))
        } else {
            (a.clone(), b.clone())
        };
        if a != b {
            return Err(ModelError::InvalidConfig {
                origin: yaml_path.display().to_string(),
                message: format!(
                    "says the {component}'s `{key}` is {a}, but the tensors of {file_name} give {b}; \
                     the yaml belongs to another model (remove it to infer the config from the file)"
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// A standalone VAE checkpoint (LDM layout, optionally under `first_stage_model.`, as A1111's
/// `vae-ft-mse-840000-ema-pruned.safetensors`); the config comes from the shapes, with the
/// scaling factor of the base model's VAE (the file records none).
pub(crate) fn open_vae_file(
    path: &Path,
    base: &VaeConfig,
    options: &LoadOptions,
) -> Result<(VaeConfig, ComponentWeights)> {
    let format = crate::config::weights_format(path).ok_or_else(|| {
        Error::from(ModelError::Unreadable {
            path: path.to_path_buf(),
            reason: "a VAE file is a .safetensors or .ckpt/.pt checkpoint".to_string(),
        })
    })?;
    let keys = open_source(path, format)?.keys_and_shapes();
    let full = keys.iter().any(|(k, _)| k.starts_with(LDM_VAE_PREFIX));
    let prefix = if full { LDM_VAE_PREFIX } else { "" };
    let vae_keys: Keys = keys
        .iter()
        .filter(|(k, _)| !k.starts_with(EMA_PREFIX))
        .filter_map(|(k, s)| k.strip_prefix(prefix).map(|k| (k.to_string(), s.clone())))
        .collect();
    if vae_keys
        .iter()
        .any(|(k, _)| k.starts_with("encoder.down_blocks.") || k.starts_with("decoder.up_blocks."))
    {
        return Err(unsupported(
            path,
            "this VAE is in diffusers' layout, whose config is not in the file: set `vae:` to \
             its folder (config.json + weights)"
                .to_string(),
        ));
    }
    if !vae_keys.iter().any(|(k, _)| k.starts_with("encoder.")) {
        return Err(ModelError::Unreadable {
            path: path.to_path_buf(),
            reason: format!(
                "it holds no VAE encoder (`encoder.*` tensors); {}",
                not_an_sd_checkpoint(keys.iter().map(|(k, _)| k.as_str()))
            ),
        }
        .into());
    }
    let ldm = LdmVae::new(&vae_keys);
    let mapped = ldm.map_keys(prefix).map_err(|m| unsupported(path, m))?;
    let json = ldm
        .infer_config(base.scaling_factor)
        .map_err(|m| unsupported(path, m))?;
    let config = VaeConfig::from_json_str(
        &json.to_string(),
        &format!("the VAE config inferred from {}", path.display()),
    )?;
    Ok((
        config,
        ComponentWeights::mapped(open_source(path, format)?, mapped, options),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::models::load::BaseModel;
    use crate::models::source::ModelSource;

    /// SDXL's configs from a single file's tensor names and shapes.
    fn sdxl_configs(keys: Keys) -> Result<SdxlConfigs, String> {
        let parts = split(keys);
        let unet = LdmUnet::parse(&parts.unet)?;
        let te1 = ldm_text::clip(&parts.sdxl_clip, SDXL_CLIP_PREFIX)?;
        let te2 = ldm_text::open_clip(
            &parts.sdxl_open_clip,
            SDXL_OPENCLIP_PREFIX,
            OpenClipUse::WithProjection,
        )?;
        configs_of(&unet, [&te1, &te2], &LdmVae::new(&parts.vae))
    }

    fn json(path: &Path) -> Value {
        let text = std::fs::read_to_string(path).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// SDXL base 1.0's configs follow from its tensor shapes alone (the list is made by
    /// `tools/make_sdxl_fixtures.py` from diffusers' SDXL configs on the meta device).
    #[test]
    fn sdxl_base_configs_are_inferred_from_its_shapes() {
        let shapes: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(json(&crate::fixtures::path("sdxl-base.shapes.json"))).unwrap();
        let keys: Keys = shapes.into_iter().collect();
        let c = sdxl_configs(keys).unwrap();
        let u = &c.unet;
        assert_eq!(u["block_out_channels"], serde_json::json!([320, 640, 1280]));
        assert_eq!(u["attention_head_dim"], serde_json::json!([5, 10, 20]));
        assert_eq!(
            u["transformer_layers_per_block"],
            serde_json::json!([1, 2, 10])
        );
        assert_eq!(u["cross_attention_dim"], 2048);
        assert_eq!(u["use_linear_projection"], true);
        assert_eq!(u["addition_embed_type"], "text_time");
        assert_eq!(u["projection_class_embeddings_input_dim"], 2816);
        assert_eq!(u["addition_time_embed_dim"], 256);
        assert_eq!(u["upcast_attention"], false);
        let (t1, t2) = (&c.text[0], &c.text[1]);
        assert_eq!(
            (
                &t1["hidden_size"],
                &t1["num_hidden_layers"],
                &t1["num_attention_heads"]
            ),
            (
                &serde_json::json!(768),
                &serde_json::json!(12),
                &serde_json::json!(12)
            )
        );
        assert_eq!(t1["hidden_act"], "quick_gelu");
        assert_eq!(
            (
                &t2["hidden_size"],
                &t2["num_hidden_layers"],
                &t2["num_attention_heads"]
            ),
            (
                &serde_json::json!(1280),
                &serde_json::json!(32),
                &serde_json::json!(20)
            )
        );
        assert_eq!(
            (&t2["hidden_act"], &t2["projection_dim"]),
            (&serde_json::json!("gelu"), &serde_json::json!(1280))
        );
        assert_eq!(c.vae["scaling_factor"], 0.13025);
        assert_eq!(
            c.vae["block_out_channels"],
            serde_json::json!([128, 256, 512, 512])
        );
    }

    /// The tiny SDXL in Stability's layout (assembled from the folder's tensors by a layout
    /// made with an independent mapping, which diffusers' `from_single_file` reads back to the
    /// same weights) holds, under diffusers names, exactly the folder's tensors: the fused
    /// OpenCLIP q/k/v split, `text_projection` transposed, `label_emb` as `add_embedding`.
    #[test]
    fn the_tiny_sdxl_single_file_maps_every_tensor_to_the_folders() {
        let folder = crate::fixtures::path("tiny-sdxl");
        let file = crate::fixtures::path("tiny-sdxl.safetensors");
        // Its 4- to 16-channel layers have no 64-wide heads: the shapes cannot tell the heads,
        // which is said; the folder's configs are handed in instead.
        let message = BaseModel::open_path(file.to_str().unwrap(), &LoadOptions::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("64-wide"), "{message}");
        let configs = SdxlConfigs {
            unet: json(&folder.join("unet/config.json")),
            text: [
                json(&folder.join("text_encoder/config.json")),
                json(&folder.join("text_encoder_2/config.json")),
            ],
            vae: json(&folder.join("vae/config.json")),
        };
        let source = ModelSource::detect(file.to_str().unwrap()).unwrap();
        let architecture = source.architecture().unwrap();
        // A single file carries no tokenizer: `tokenizer:` and `tokenizer_2:` name them.
        let options = LoadOptions {
            tokenizer: Some(folder.join("tokenizer").display().to_string()),
            tokenizer_2: Some(folder.join("tokenizer_2").display().to_string()),
            ..LoadOptions::default()
        };
        let unet_source = TensorSource::safetensors(&file).unwrap();
        let keys = unet_source.keys_and_shapes();
        let opened = open_sdxl(
            &file,
            WeightsFormat::Safetensors,
            &options,
            unet_source,
            keys,
            architecture,
            Some(configs),
        )
        .unwrap();
        let model = BaseModel::finish(opened, &options).unwrap();
        let components = [
            (
                "unet/diffusion_pytorch_model.safetensors",
                model.unet_weights(),
            ),
            (
                "vae/diffusion_pytorch_model.safetensors",
                model.vae_weights(),
            ),
            (
                "text_encoder/model.safetensors",
                model.text_encoder_weights_at(0).unwrap(),
            ),
            (
                "text_encoder_2/model.safetensors",
                model.text_encoder_weights_at(1).unwrap(),
            ),
        ];
        for (file, store) in components {
            let tensors =
                candle_core::safetensors::load(folder.join(file), &candle_core::Device::Cpu)
                    .unwrap();
            assert_eq!(tensors.len(), store.keys().count(), "{file}");
            for (key, want) in tensors {
                let key = match store.contains(&key) {
                    true => key,
                    false => format!("text_model.{key}"),
                };
                let got = store.get(&key, want.shape()).unwrap();
                let same = got
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    == want
                        .to_dtype(candle_core::DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                assert!(same, "{file}: `{key}` differs");
            }
        }
        // Every mapped tensor is used once the models are built, and the single file
        // conditions exactly as the folder does (the pooled output through the transposed
        // projection included).
        model.unet(None).unwrap();
        model.vae().unwrap();
        let from_file = model.text_encoders(&[], 1).unwrap();
        let from_folder = BaseModel::open_path(folder.to_str().unwrap(), &LoadOptions::default())
            .unwrap()
            .text_encoders(&[], 1)
            .unwrap();
        let caption = ["a cyberpunk city at night"];
        let (a, b) = (
            from_file
                .encode(&caption, &candle_core::Device::Cpu)
                .unwrap(),
            from_folder
                .encode(&caption, &candle_core::Device::Cpu)
                .unwrap(),
        );
        let diff = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a.context, &b.context), 0.0);
        assert_eq!(
            diff(a.pooled.as_ref().unwrap(), b.pooled.as_ref().unwrap()),
            0.0
        );
    }
}
