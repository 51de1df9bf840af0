//! How the keys of a LoRA file group into modules: which layout the file uses (kohya's
//! `lora_unet_…`/`lora_te_…` or diffusers' `unet.…`/`text_encoder.…`), which keys belong to
//! another adapter algorithm, and which keys make up each module.

use std::collections::BTreeMap;
use std::fmt;

use super::error::LoraProblem;
use super::names::LoraModel;

/// The key layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_unet_…`/`lora_te_…` keys with `lora_down`/`lora_up`/`alpha` (kohya, A1111, ComfyUI).
    Kohya,
    /// `unet.…`/`text_encoder.…` keys with `lora_A`/`lora_B` (diffusers, PEFT).
    Diffusers,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Diffusers => "diffusers",
        })
    }
}

/// The keys of one module, as found.
#[derive(Debug)]
pub(super) struct KeyGroup {
    pub model: LoraModel,
    /// The module path (dots), for diffusers' alpha patterns and kohya names.
    pub path: String,
    pub down: Option<String>,
    pub up: Option<String>,
    pub alpha: Option<String>,
}

/// The algorithm a key belongs to when it is not plain LoRA.
pub(super) fn unsupported_algorithm(key: &str) -> Option<&'static str> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let stem = key.rsplit_once('.').map(|(s, _)| s).unwrap_or(key);
    let part = |s: &str| key.split('.').any(|p| p == s);
    if leaf.starts_with("hada_") {
        Some("LoHa (LyCORIS)")
    } else if leaf.starts_with("lokr_") {
        Some("LoKr (LyCORIS)")
    } else if leaf == "dora_scale" || part("lora_magnitude_vector") {
        Some("DoRA (weight-decomposed LoRA)")
    } else if part("lora_mid") {
        Some("LoCon with Tucker decomposition (LyCORIS `use_tucker`)")
    } else if matches!(leaf, "diff" | "diff_b") {
        Some("a full weight difference (LyCORIS `full`)")
    } else if matches!(leaf, "w_norm" | "b_norm") {
        Some("norm-layer training (LyCORIS)")
    } else if leaf == "on_input" {
        Some("(IA)³")
    } else if leaf.starts_with("oft_") || leaf == "rescale" {
        Some("OFT/BOFT")
    } else if key.starts_with("lora_")
        && matches!(stem.rsplit('.').next(), Some("a1" | "a2" | "b1" | "b2"))
    {
        Some("GLoRA")
    } else if key.ends_with("lora_B.bias") {
        Some("LoRA with biases (PEFT `lora_bias`)")
    } else if key.starts_with("bundle_emb") {
        Some("bundled textual-inversion embeddings")
    } else {
        None
    }
}

pub(super) fn detect_format(keys: &[&String]) -> std::result::Result<LoraFormat, LoraProblem> {
    let kohya = |k: &str| k.starts_with("lora_unet_") || k.starts_with("lora_te");
    let diffusers = |k: &str| k.starts_with("unet.") || k.starts_with("text_encoder");
    let first = keys.first().map(|k| k.as_str()).unwrap_or_default();
    let format = if kohya(first) {
        LoraFormat::Kohya
    } else if diffusers(first) {
        LoraFormat::Diffusers
    } else {
        return Err(unknown_key(first));
    };
    let fits = |k: &str| match format {
        LoraFormat::Kohya => kohya(k),
        LoraFormat::Diffusers => diffusers(k),
    };
    match keys.iter().find(|k| !fits(k)) {
        Some(k) => Err(unknown_key(k)),
        None => Ok(format),
    }
}

fn unknown_key(key: &str) -> LoraProblem {
    let hint = if key.contains("input_blocks")
        || key.contains("output_blocks")
        || key.contains("middle_block")
    {
        ": LDM/CompVis module names (`input_blocks`, `output_blocks`) are not supported; convert \
         the file to kohya's diffusers-based names first"
    } else if key.starts_with("base_model.model.") {
        ": a bare PEFT adapter; save it with diffusers' `save_lora_weights` (keys `unet.…`)"
    } else {
        ": expected `lora_unet_…`/`lora_te_…` (kohya) or `unet.…`/`text_encoder.…` (diffusers) keys"
    };
    LoraProblem::UnknownKey {
        key: key.to_string(),
        hint: hint.to_string(),
    }
}

/// Groups kohya keys `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` by name.
pub(super) fn kohya_parts(
    keys: &[&String],
) -> std::result::Result<Vec<(String, KeyGroup)>, LoraProblem> {
    let mut groups: BTreeMap<String, KeyGroup> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for key in keys {
        let Some((name, part)) = key.split_once('.') else {
            return Err(unknown_key(key));
        };
        let (model, rest) = LoraModel::split_kohya_name(name).ok_or_else(|| unknown_key(key))?;
        let group = groups.entry(name.to_string()).or_insert_with(|| {
            order.push(name.to_string());
            KeyGroup {
                model,
                // Only used to name the module; kohya names cannot be turned back into paths.
                path: rest.to_string(),
                down: None,
                up: None,
                alpha: None,
            }
        });
        let slot = match part {
            "lora_down.weight" => &mut group.down,
            "lora_up.weight" => &mut group.up,
            "alpha" => &mut group.alpha,
            _ => return Err(unknown_key(key)),
        };
        *slot = Some(key.to_string());
    }
    Ok(order
        .into_iter()
        .filter_map(|name| groups.remove(&name).map(|g| (name, g)))
        .collect())
}

/// Groups diffusers keys by module: `<prefix>.<path>.lora_A.weight` / `lora_B.weight` (also
/// the older `lora.down/up.weight`, `lora_linear_layer.down/up.weight` and attention-processor
/// `processor.to_q_lora.down.weight` forms) and `<prefix>.<path>.alpha`.
pub(super) fn diffusers_parts(
    keys: &[&String],
) -> std::result::Result<Vec<(String, KeyGroup)>, LoraProblem> {
    const DOWN: [&str; 4] = [
        ".lora_A.weight",
        ".lora.down.weight",
        ".lora_linear_layer.down.weight",
        "_lora.down.weight",
    ];
    const UP: [&str; 4] = [
        ".lora_B.weight",
        ".lora.up.weight",
        ".lora_linear_layer.up.weight",
        "_lora.up.weight",
    ];
    let mut groups: BTreeMap<String, KeyGroup> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for key in keys {
        let strip = |suffixes: &[&str]| suffixes.iter().find_map(|s| key.strip_suffix(s));
        let (stem, slot) = if let Some(stem) = strip(&DOWN) {
            (stem, 0)
        } else if let Some(stem) = strip(&UP) {
            (stem, 1)
        } else if let Some(stem) = key.strip_suffix(".alpha") {
            (stem, 2)
        } else {
            return Err(unknown_key(key));
        };
        let (prefix, path) = stem.split_once('.').ok_or_else(|| unknown_key(key))?;
        let model = match prefix {
            "unet" => LoraModel::Unet,
            "text_encoder" => LoraModel::TextEncoder,
            "text_encoder_2" => LoraModel::TextEncoder2,
            _ => return Err(unknown_key(key)),
        };
        let path = match model {
            LoraModel::Unet | LoraModel::LanguageModel => processor_path(path),
            LoraModel::TextEncoder | LoraModel::TextEncoder2 => {
                let p = path.strip_prefix("text_model.").unwrap_or(path);
                format!("text_model.{p}")
            }
        };
        let label = format!("{prefix}.{path}");
        let group = groups.entry(label.clone()).or_insert_with(|| {
            order.push(label.clone());
            KeyGroup {
                model,
                path: path.clone(),
                down: None,
                up: None,
                alpha: None,
            }
        });
        let target = match slot {
            0 => &mut group.down,
            1 => &mut group.up,
            _ => &mut group.alpha,
        };
        *target = Some(key.to_string());
    }
    Ok(order
        .into_iter()
        .filter_map(|label| groups.remove(&label).map(|g| (label, g)))
        .collect())
}

/// The old attention-processor naming: `….attn1.processor.to_q_lora` → `….attn1.to_q`,
/// `to_out_lora` → `to_out.0`.
fn processor_path(path: &str) -> String {
    let Some((attn, proc)) = path.split_once(".processor.") else {
        return path.to_string();
    };
    let layer = match proc.strip_suffix("_lora").unwrap_or(proc) {
        "to_out" => "to_out.0",
        other => other,
    };
    format!("{attn}.{layer}")
}
