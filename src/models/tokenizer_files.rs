//! Reading a CLIP tokenizer folder the way transformers 5's `CLIPTokenizer.from_pretrained` does.
//!
//! The vocabulary and merges come from `tokenizer.json` when it exists (only its `model.vocab`
//! and `model.merges`: transformers rebuilds the rest of the pipeline from code), else from
//! `vocab.json` + `merges.txt`. The special tokens come from `tokenizer_config.json` and, when
//! that file has no `added_tokens_decoder`, from `special_tokens_map.json` (which then wins) and
//! the `added_tokens` of `tokenizer.json`; each may be a string or an `AddedToken` object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Merges, Vocab};
use tokenizers::AddedToken;

use crate::error::ModelError;
use crate::{Error, Result};

/// CLIP's defaults (transformers' `CLIPTokenizer.__init__`).
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// The context length of every CLIP text encoder Stable Diffusion uses.
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// Everything a CLIP tokenizer folder says, before the tokenizer is built.
pub struct TokenizerFiles {
    pub vocab: Vocab,
    pub merges: Merges,
    /// The file the vocabulary came from, for messages.
    pub vocab_origin: PathBuf,
    /// Added tokens declared by the files (`added_tokens_decoder` or `tokenizer.json`).
    pub added: Vec<AddedToken>,
    pub bos: AddedToken,
    pub eos: AddedToken,
    pub unk: AddedToken,
    pub pad: AddedToken,
    /// `model_max_length`: every encoding has exactly this many ids.
    pub max_length: usize,
}

impl TokenizerFiles {
    /// Reads the folder; errors name the file and what is wrong with it.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(invalid(dir, "is not a folder; a CLIP tokenizer folder holds tokenizer.json or vocab.json + merges.txt"));
        }
        let tokenizer_json = dir.join("tokenizer.json");
        let (vocab_merges, json_added, vocab_origin) = if tokenizer_json.is_file() {
            let (vocab, merges, added) = read_tokenizer_json(&tokenizer_json)?;
            ((vocab, merges), Some(added), tokenizer_json)
        } else {
            let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
            if !vocab_path.is_file() || !merges_path.is_file() {
                return Err(invalid(
                    dir,
                    "has neither tokenizer.json nor vocab.json + merges.txt; point `tokenizer:` at a CLIP tokenizer folder \
                     (the bundled one is models/clip-tokenizer)",
                ));
            }
            (
                (
                    read_vocab_json(&vocab_path)?,
                    read_merges_txt(&merges_path)?,
                ),
                None,
                vocab_path,
            )
        };
        let (vocab, merges) = vocab_merges;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_object(&config_path)?;
        let has_decoder = config
            .as_ref()
            .is_some_and(|c| c.contains_key("added_tokens_decoder"));
        let special_map_path = dir.join("special_tokens_map.json");
        let special_map = if has_decoder {
            None
        } else {
            read_optional_object(&special_map_path)?
        };

        let mut added = Vec::new();
        if let Some(decoder) = config.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
            let Value::Object(decoder) = decoder else {
                return Err(invalid(
                    &config_path,
                    "added_tokens_decoder must be an object of id → token",
                ));
            };
            let mut by_id = BTreeMap::new();
            for (id, token) in decoder {
                let id: u64 = id.parse().map_err(|_| {
                    invalid(
                        &config_path,
                        &format!("added_tokens_decoder key `{id}` is not a token id"),
                    )
                })?;
                by_id.insert(
                    id,
                    added_token(token, false, &config_path, "added_tokens_decoder")?,
                );
            }
            added.extend(by_id.into_values());
        } else if let Some(json_added) = json_added {
            added = json_added;
        }

        let special = |key: &str, default: &str| -> Result<AddedToken> {
            let from_map = special_map
                .as_ref()
                .and_then(|m| m.get(key))
                .filter(|v| !v.is_null());
            let from_config = config
                .as_ref()
                .and_then(|c| c.get(key))
                .filter(|v| !v.is_null());
            let token = match (from_map, from_config) {
                (Some(v), _) => added_token(v, true, &special_map_path, key)?,
                (None, Some(v)) => added_token(v, false, &config_path, key)?,
                (None, None) => AddedToken::from(default, true),
            };
            // A token the files already declare keeps that declaration's flags.
            Ok(added
                .iter()
                .find(|t| t.content == token.content)
                .cloned()
                .unwrap_or(token))
        };
        let bos = special("bos_token", DEFAULT_BOS)?;
        let eos = special("eos_token", DEFAULT_EOS)?;
        let unk = special("unk_token", DEFAULT_EOS)?;
        let pad = special("pad_token", DEFAULT_EOS)?;

        let max_length = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_f64() {
                // transformers writes 1e30 ("no limit") when it does not know; CLIP's is 77.
                Some(n) if n >= 1e9 => DEFAULT_MAX_LENGTH,
                Some(n) if n >= 3.0 && n.fract() == 0.0 => n as usize,
                _ => {
                    return Err(invalid(
                        &config_path,
                        &format!("model_max_length {v} is not a usable length (it must be an integer of at least 3)"),
                    ))
                }
            },
        };
        Ok(TokenizerFiles {
            vocab,
            merges,
            vocab_origin,
            added,
            bos,
            eos,
            unk,
            pad,
            max_length,
        })
    }
}

fn invalid(path: &Path, message: &str) -> Error {
    ModelError::InvalidConfig {
        origin: path.display().to_string(),
        message: message.to_string(),
    }
    .into()
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::models::config_json::read_model_file(path)?;
    serde_json::from_str(&text).map_err(|e| invalid(path, &format!("not valid JSON: {e}")))
}

fn read_optional_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    match read_json(path)? {
        Value::Object(map) => Ok(Some(map)),
        _ => Err(invalid(path, "expected a JSON object")),
    }
}

/// A token given as `"<|endoftext|>"` or as `{"content": ..., "lstrip": ..., ...}`. Strings are
/// special and matched on the raw text, as transformers does with them.
fn added_token(value: &Value, special_default: bool, path: &Path, key: &str) -> Result<AddedToken> {
    match value {
        Value::String(content) => Ok(AddedToken::from(content.as_str(), true)),
        Value::Object(fields) => {
            let content = fields
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(
                        path,
                        &format!("`{key}` is an object without a string `content`"),
                    )
                })?;
            let flag = |name: &str| fields.get(name).and_then(Value::as_bool);
            let special = flag("special").unwrap_or(special_default);
            Ok(AddedToken::from(content, special)
                .single_word(flag("single_word").unwrap_or(false))
                .lstrip(flag("lstrip").unwrap_or(false))
                .rstrip(flag("rstrip").unwrap_or(false))
                .normalized(flag("normalized").unwrap_or(!special)))
        }
        other => Err(invalid(
            path,
            &format!("`{key}` is {other}, expected a token string or object"),
        )),
    }
}

fn vocab_from_object(value: &Value, path: &Path, what: &str) -> Result<Vocab> {
    let Value::Object(map) = value else {
        return Err(invalid(
            path,
            &format!("{what} must be an object of token → id"),
        ));
    };
    map.iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    invalid(
                        path,
                        &format!("{what}: the id of token `{token}` is {id}, not a token id"),
                    )
                })?;
            Ok((token.clone(), id))
        })
        .collect()
}

fn read_vocab_json(path: &Path) -> Result<Vocab> {
    vocab_from_object(&read_json(path)?, path, "the vocabulary")
}

/// `merges.txt`: one `left right` pair per line, best first; `#version` lines are skipped (as
/// the tokenizers library does).
fn read_merges_txt(path: &Path) -> Result<Merges> {
    let text = crate::models::config_json::read_model_file(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version"))
        .map(
            |(number, line)| match line.split(' ').collect::<Vec<_>>().as_slice() {
                [left, right] => Ok((left.to_string(), right.to_string())),
                _ => Err(invalid(
                    path,
                    &format!(
                        "line {}: `{line}` is not a merge (two tokens separated by one space)",
                        number + 1
                    ),
                )),
            },
        )
        .collect()
}

/// `model.vocab`, `model.merges` (strings `"a b"` or pairs) and `added_tokens` of tokenizer.json.
fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges, Vec<AddedToken>)> {
    let json = read_json(path)?;
    let model = json
        .get("model")
        .ok_or_else(|| invalid(path, "has no `model` section"))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        if kind != "BPE" {
            return Err(invalid(
                path,
                &format!("model type is `{kind}`; a CLIP tokenizer is `BPE`"),
            ));
        }
    }
    let vocab = vocab_from_object(
        model.get("vocab").unwrap_or(&Value::Null),
        path,
        "model.vocab",
    )?;
    let merges = match model.get("merges") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let pair = match item {
                    Value::String(s) => s
                        .split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string())),
                    Value::Array(parts) => match parts.as_slice() {
                        [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                        _ => None,
                    },
                    _ => None,
                };
                pair.ok_or_else(|| {
                    invalid(path, &format!("model.merges[{i}] is {item}, not a merge"))
                })
            })
            .collect::<Result<Merges>>()?,
        _ => return Err(invalid(path, "model.merges must be a list")),
    };
    let added = match json.get("added_tokens") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| added_token(t, false, path, "added_tokens"))
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(invalid(path, "added_tokens must be a list")),
    };
    Ok((vocab, merges, added))
}
