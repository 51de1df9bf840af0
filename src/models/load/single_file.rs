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
use super::ldm_text::{self, LdmText};
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
        return Err(unsupported(
            path,
            "this is an SDXL checkpoint; SDXL single files are not read yet: use the model's \
             diffusers folder (e.g. stabilityai/stable-diffusion-xl-base-1.0)"
                .to_string(),
        ));
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
            let penultimate = yaml.as_ref().is_none_or(|y| y.text.penultimate);
            ldm_text::open_clip(&parts.open_clip, LDM_OPENCLIP_PREFIX, penultimate)
        }
        (true, true) => Err(format!(
            "the file holds no text encoder (`{LDM_CLIP_PREFIX}` or `{LDM_OPENCLIP_PREFIX}` \
             tensors); use a full checkpoint or the model's diffusers folder"
        )),
        (false, false) => Err("the file holds two text encoders (CLIP and OpenCLIP)".to_string()),
    }
    .map_err(|m| unsupported(path, m))?;
    let text_config = ClipTextConfig::from_json(
        &text.config.to_string(),
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
