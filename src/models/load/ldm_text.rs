//! The text encoder of an LDM checkpoint, converted to transformers' `CLIPTextModel` keys
//! (`text_model.*`), and its config inferred from the tensor shapes.
//!
//! - SD 1.x (`cond_stage_model.transformer.*`): Hugging Face CLIP names already, with or without
//!   `text_model.` (old files lack it); `position_ids` is a buffer, ignored.
//! - SD 2.x (`cond_stage_model.model.*`, OpenCLIP): `token_embedding`, `positional_embedding`,
//!   `transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked along dim 0),
//!   attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`. SD 2.x conditions on the
//!   penultimate layer, so the last resblock is dropped (as diffusers does), together with
//!   `text_projection` and `logit_scale`, which only CLIP's image-text matching uses.
//!
//! The files do not record the number of heads: every released CLIP/OpenCLIP text tower has
//! 64-wide heads, so `heads = width / 64`. SD 1.x uses `quick_gelu`, OpenCLIP `gelu`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::MappedKey;
use crate::nn::weights::Transform;

/// A converted text encoder: its keys, the keys deliberately left out, its config.
#[derive(Debug)]
pub(crate) struct LdmText {
    pub keys: Vec<MappedKey>,
    pub ignored: Vec<String>,
    /// The config the shapes give; `num_attention_heads` is null when `heads_problem` says why
    /// it cannot be told.
    pub config: Value,
    pub heads_problem: Option<String>,
}

impl LdmText {
    /// The inferred config, or why the number of heads cannot be inferred.
    pub(crate) fn inferred_config(&self) -> Result<&Value, String> {
        match &self.heads_problem {
            Some(problem) => Err(problem.clone()),
            None => Ok(&self.config),
        }
    }
}

/// The number of heads as a config value, or null and the reason.
fn heads_value(width: usize) -> (Value, Option<String>) {
    match heads(width) {
        Ok(h) => (json!(h), None),
        Err(problem) => (Value::Null, Some(problem)),
    }
}

/// The width of every CLIP head Stable Diffusion uses.
const HEAD_WIDTH: usize = 64;

fn index_and_rest(text: &str) -> Option<(usize, &str)> {
    let (index, rest) = text.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

fn heads(width: usize) -> Result<usize, String> {
    if width >= HEAD_WIDTH && width.is_multiple_of(HEAD_WIDTH) {
        Ok(width / HEAD_WIDTH)
    } else {
        Err(format!(
            "the text encoder is {width} wide, not a multiple of the 64-wide heads of every \
             released CLIP text encoder, so its number of heads cannot be inferred; use the \
             model's diffusers folder instead"
        ))
    }
}

/// The shape of `key` among `shapes`, or an error naming it.
fn shape<'a>(
    shapes: &'a BTreeMap<String, Vec<usize>>,
    key: &str,
    shown: &str,
) -> Result<&'a [usize], String> {
    shapes.get(key).map(Vec::as_slice).ok_or_else(|| {
        format!("the text encoder has no `{shown}`, which every CLIP text encoder has")
    })
}

fn width_of(found: &[usize], what: &str) -> Result<(usize, usize), String> {
    match found {
        [rows, width] => Ok((*rows, *width)),
        other => Err(format!("{what} has shape {other:?}; it should be 2-D")),
    }
}

/// SD 1.x: Hugging Face CLIP keys under `prefix` (`cond_stage_model.transformer.`).
pub(crate) fn clip(keys: &[(String, Vec<usize>)], prefix: &str) -> Result<LdmText, String> {
    let mut mapped = Vec::new();
    let mut ignored = Vec::new();
    let mut shapes = BTreeMap::new();
    for (key, dims) in keys {
        let file_key = format!("{prefix}{key}");
        if key.ends_with("embeddings.position_ids") {
            ignored.push(file_key);
            continue;
        }
        let target = if key.starts_with("text_model.") {
            key.clone()
        } else {
            format!("text_model.{key}")
        };
        let known = ["embeddings.", "encoder.layers.", "final_layer_norm."]
            .iter()
            .any(|p| target["text_model.".len()..].starts_with(p));
        if !known {
            return Err(format!(
                "`{file_key}` is not a tensor of a CLIP text encoder"
            ));
        }
        shapes.insert(target.clone(), dims.clone());
        mapped.push(MappedKey::new(target, file_key));
    }
    let token = shape(
        &shapes,
        "text_model.embeddings.token_embedding.weight",
        "token_embedding",
    )?;
    let (vocab, width) = width_of(token, "token_embedding")?;
    let positions = shape(
        &shapes,
        "text_model.embeddings.position_embedding.weight",
        "position_embedding",
    )?;
    let fc1 = shape(
        &shapes,
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "encoder.layers.0.mlp.fc1",
    )?;
    let layers = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("text_model.encoder.layers."))
        .filter_map(|k| index_and_rest(k).map(|(i, _)| i + 1))
        .max()
        .unwrap_or(0);
    let heads = heads_value(width);
    let config = json!({
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": fc1.first().copied().unwrap_or(0),
        "num_hidden_layers": layers,
        "num_attention_heads": heads.0,
        "max_position_embeddings": positions.first().copied().unwrap_or(0),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": null,
        // Pool at the largest id, as the legacy `eos_token_id: 2` of SD 1.x's config does.
        "eos_token_id": null,
    });
    Ok(LdmText {
        keys: mapped,
        ignored,
        config,
        heads_problem: heads.1,
    })
}

/// How an OpenCLIP text tower is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenClipUse {
    /// SD 2.x (`layer: penultimate`): the last resblock and the projection are left out.
    Penultimate,
    /// Every resblock, without the projection.
    Last,
    /// SDXL's second encoder: every resblock (the pooled output needs the last) and
    /// `text_projection`, read as diffusers' `CLIPTextModelWithProjection.text_projection`.
    WithProjection,
}

/// OpenCLIP keys under `prefix` (SD 2.x's `cond_stage_model.model.`, SDXL's
/// `conditioner.embedders.1.model.`), used as `usage` says.
pub(crate) fn open_clip(
    keys: &[(String, Vec<usize>)],
    prefix: &str,
    usage: OpenClipUse,
) -> Result<LdmText, String> {
    let penultimate = usage == OpenClipUse::Penultimate;
    let projected = usage == OpenClipUse::WithProjection;
    let shapes: BTreeMap<String, Vec<usize>> = keys.iter().cloned().collect();
    let resblocks = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("transformer.resblocks."))
        .filter_map(|k| index_and_rest(k).map(|(i, _)| i + 1))
        .max()
        .unwrap_or(0);
    let layers = if penultimate {
        resblocks.saturating_sub(1)
    } else {
        resblocks
    };
    if layers == 0 {
        return Err(format!(
            "the OpenCLIP text encoder has {resblocks} resblock(s); SD 2.x needs at least 2"
        ));
    }
    let mut mapped = Vec::new();
    let mut ignored = Vec::new();
    for (key, dims) in keys {
        let file_key = format!("{prefix}{key}");
        let bad = || format!("`{file_key}` is not a tensor of an OpenCLIP text encoder");
        let simple = match key.as_str() {
            "token_embedding.weight" => {
                Some("text_model.embeddings.token_embedding.weight".to_string())
            }
            "positional_embedding" => {
                Some("text_model.embeddings.position_embedding.weight".to_string())
            }
            "text_projection" if projected => {
                mapped.push(MappedKey {
                    target: "text_projection.weight".to_string(),
                    file_key,
                    transform: Transform::Transpose,
                });
                continue;
            }
            "text_projection" | "logit_scale" => {
                ignored.push(file_key);
                continue;
            }
            other => other
                .strip_prefix("ln_final.")
                .map(|p| format!("text_model.final_layer_norm.{p}")),
        };
        if let Some(target) = simple {
            mapped.push(MappedKey::new(target, file_key));
            continue;
        }
        let rest = key.strip_prefix("transformer.resblocks.").ok_or_else(bad)?;
        let (n, rest) = index_and_rest(rest).ok_or_else(bad)?;
        if n >= layers {
            ignored.push(file_key);
            continue;
        }
        let layer = format!("text_model.encoder.layers.{n}");
        if let Some(param) = rest.strip_prefix("attn.in_proj_") {
            let (what, width) = match (param, dims.as_slice()) {
                ("weight", [rows, width]) if *rows == 3 * width => ("weight", *width),
                ("bias", [rows]) if rows % 3 == 0 => ("bias", rows / 3),
                _ => {
                    return Err(format!(
                        "`{file_key}` has shape {dims:?}; a fused q/k/v projection stacks three \
                         equal parts along its first dimension"
                    ))
                }
            };
            for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                mapped.push(MappedKey {
                    target: format!("{layer}.self_attn.{proj}.{what}"),
                    file_key: file_key.clone(),
                    transform: Transform::Slice {
                        dim: 0,
                        start: i * width,
                        len: width,
                    },
                });
            }
            continue;
        }
        let renames = [
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("attn.out_proj.", "self_attn.out_proj."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
        ];
        let target = renames
            .iter()
            .find_map(|(ldm, ours)| rest.strip_prefix(ldm).map(|p| format!("{layer}.{ours}{p}")))
            .ok_or_else(bad)?;
        mapped.push(MappedKey::new(target, file_key));
    }
    let token = shape(
        &shapes,
        "token_embedding.weight",
        &format!("{prefix}token_embedding.weight"),
    )?;
    let (vocab, width) = width_of(token, "token_embedding")?;
    let positions = shape(
        &shapes,
        "positional_embedding",
        &format!("{prefix}positional_embedding"),
    )?;
    let c_fc = shape(
        &shapes,
        "transformer.resblocks.0.mlp.c_fc.weight",
        &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
    )?;
    let heads = heads_value(width);
    let config = json!({
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": c_fc.first().copied().unwrap_or(0),
        "num_hidden_layers": layers,
        "num_attention_heads": heads.0,
        "max_position_embeddings": positions.first().copied().unwrap_or(0),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": null,
        "eos_token_id": null,
    });
    let mut config = config;
    if projected {
        let projection = shape(
            &shapes,
            "text_projection",
            &format!("{prefix}text_projection"),
        )?;
        let (rows, dim) = width_of(projection, "text_projection")?;
        if rows != width {
            return Err(format!(
                "`{prefix}text_projection` has shape {projection:?}; it projects the \
                 {width}-wide text features, so it needs {width} rows"
            ));
        }
        config["projection_dim"] = json!(dim);
    }
    Ok(LdmText {
        keys: mapped,
        ignored,
        config,
        heads_problem: heads.1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_clip_keys(blocks: usize) -> Vec<(String, Vec<usize>)> {
        let mut keys = vec![
            ("token_embedding.weight".to_string(), vec![1000, 128]),
            ("positional_embedding".to_string(), vec![77, 128]),
            ("ln_final.weight".to_string(), vec![128]),
            ("text_projection".to_string(), vec![128, 64]),
            ("logit_scale".to_string(), vec![]),
        ];
        for n in 0..blocks {
            for (name, shape) in [
                ("ln_1.weight", vec![128]),
                ("attn.in_proj_weight", vec![384, 128]),
                ("attn.in_proj_bias", vec![384]),
                ("attn.out_proj.weight", vec![128, 128]),
                ("mlp.c_fc.weight", vec![256, 128]),
                ("mlp.c_proj.bias", vec![128]),
            ] {
                keys.push((format!("transformer.resblocks.{n}.{name}"), shape));
            }
        }
        keys
    }

    #[test]
    fn open_clip_splits_qkv_and_drops_the_last_block() {
        let text = open_clip(&open_clip_keys(3), "m.", OpenClipUse::Penultimate).unwrap();
        let by_target: BTreeMap<&str, &MappedKey> =
            text.keys.iter().map(|m| (m.target.as_str(), m)).collect();
        let k = by_target["text_model.encoder.layers.1.self_attn.k_proj.weight"];
        assert_eq!(k.file_key, "m.transformer.resblocks.1.attn.in_proj_weight");
        assert_eq!(
            k.transform,
            Transform::Slice {
                dim: 0,
                start: 128,
                len: 128
            }
        );
        let v = by_target["text_model.encoder.layers.0.self_attn.v_proj.bias"];
        assert_eq!(
            v.transform,
            Transform::Slice {
                dim: 0,
                start: 256,
                len: 128
            }
        );
        assert_eq!(
            by_target["text_model.encoder.layers.0.mlp.fc2.bias"].file_key,
            "m.transformer.resblocks.0.mlp.c_proj.bias"
        );
        assert_eq!(
            by_target["text_model.embeddings.position_embedding.weight"].file_key,
            "m.positional_embedding"
        );
        assert!(!by_target.keys().any(|t| t.contains("layers.2.")));
        assert!(text
            .ignored
            .contains(&"m.transformer.resblocks.2.ln_1.weight".to_string()));
        assert!(text.ignored.contains(&"m.logit_scale".to_string()));
        assert_eq!(text.config["num_hidden_layers"], json!(2));
        assert_eq!(text.config["num_attention_heads"], json!(2));
        assert_eq!(text.config["intermediate_size"], json!(256));
        assert_eq!(text.config["hidden_act"], json!("gelu"));
        let all = open_clip(&open_clip_keys(3), "m.", OpenClipUse::Last).unwrap();
        assert_eq!(all.config["num_hidden_layers"], json!(3));
    }

    #[test]
    fn clip_keys_gain_the_text_model_prefix() {
        let keys: Vec<(String, Vec<usize>)> = [
            ("embeddings.token_embedding.weight", vec![1000, 64]),
            ("embeddings.position_embedding.weight", vec![77, 64]),
            ("embeddings.position_ids", vec![1, 77]),
            ("encoder.layers.0.mlp.fc1.weight", vec![128, 64]),
            ("encoder.layers.2.mlp.fc1.weight", vec![128, 64]),
            ("final_layer_norm.weight", vec![64]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), s))
        .collect();
        let text = clip(&keys, "c.").unwrap();
        assert!(text
            .keys
            .iter()
            .any(|m| m.target == "text_model.final_layer_norm.weight"
                && m.file_key == "c.final_layer_norm.weight"));
        assert_eq!(text.ignored, vec!["c.embeddings.position_ids".to_string()]);
        assert_eq!(text.config["num_hidden_layers"], json!(3));
        assert_eq!(text.config["num_attention_heads"], json!(1));
        let mut odd = keys.clone();
        odd.push(("text_projection.weight".into(), vec![64, 64]));
        assert!(clip(&odd, "c.")
            .unwrap_err()
            .contains("c.text_projection.weight"));
        let mut narrow = keys;
        narrow[0].1 = vec![1000, 48];
        // The keys still map; only the number of heads cannot be told.
        let text = clip(&narrow, "c.").unwrap();
        assert!(text.inferred_config().unwrap_err().contains("48 wide"));
        assert_eq!(text.config["num_attention_heads"], Value::Null);
    }
}
