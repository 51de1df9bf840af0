//! Reading diffusers' `config.json` files key by key, with errors that name the file and the key.
//!
//! A diffusers config lists every constructor argument of a model. We read the keys we implement
//! (absent ones take diffusers' default), insist that features we do not implement keep their
//! "off" value, and refuse to silently drop anything else: a key this program does not know is
//! accepted only when its value is `null` or `false` (a newer diffusers adding an option that is
//! off), otherwise it is an error naming the key and the value.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;
use crate::{Error, Result};

/// A parsed config file and the keys read from it so far.
pub(crate) struct ConfigJson {
    origin: String,
    map: Map<String, Value>,
    seen: BTreeSet<String>,
}

/// Reads a text file of a model (a config, a tokenizer file): a missing one is the model's
/// fault (exit status 2), named with the fix; other I/O errors are reported as such.
pub(crate) fn read_model_file(path: &Path) -> Result<String> {
    crate::files::read_text(path, crate::files::TEXT_LIMIT, "a model file").map_err(|e| {
        match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::NotFound {
                path: path.to_path_buf(),
                hint: "the model's files are incomplete; copy or download the whole model folder \
                   again (or point `base_model` at a single .safetensors checkpoint)"
                    .to_string(),
            }
            .into(),
            _ => Error::io(path, e),
        }
    })
}

impl ConfigJson {
    /// Reads and parses `path`.
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        let text = read_model_file(path)?;
        Self::from_str(&text, &path.display().to_string())
    }

    /// Parses `text`; `origin` names it in messages (usually the file path).
    pub(crate) fn from_str(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig {
            origin: origin.to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        match value {
            Value::Object(map) => Ok(ConfigJson {
                origin: origin.to_string(),
                map,
                seen: BTreeSet::new(),
            }),
            other => Err(ModelError::InvalidConfig {
                origin: origin.to_string(),
                message: format!("expected a JSON object of settings, found {}", kind(&other)),
            }
            .into()),
        }
    }

    /// An [`ModelError::InvalidConfig`] about `key`.
    pub(crate) fn error(&self, key: &str, message: impl std::fmt::Display) -> Error {
        ModelError::InvalidConfig {
            origin: self.origin.clone(),
            message: format!("`{key}`: {message}"),
        }
        .into()
    }

    /// The value under `key` (`None` when absent), marking the key as read.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.seen.insert(key.to_string());
        self.map.get(key).cloned()
    }

    /// A non-negative integer; `default` when the key is absent.
    pub(crate) fn usize(&mut self, key: &str, default: usize) -> Result<usize> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => self.as_usize(key, &v),
        }
    }

    /// A non-negative integer or `null`; `None` when absent or `null`.
    pub(crate) fn opt_usize(&mut self, key: &str) -> Result<Option<usize>> {
        match self.take(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.as_usize(key, &v).map(Some),
        }
    }

    /// A number; `default` when absent.
    pub(crate) fn f64(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.error(key, format!("expected a number, found {v}"))),
        }
    }

    /// A number or `null`; `None` when absent or `null`.
    pub(crate) fn opt_f64(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("expected a number, found {v}"))),
        }
    }

    /// `true` or `false`; `default` when absent.
    pub(crate) fn bool(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(v) => Err(self.error(key, format!("expected true or false, found {v}"))),
        }
    }

    /// A string; `default` when absent.
    pub(crate) fn string(&mut self, key: &str, default: &str) -> Result<String> {
        match self.take(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.error(key, format!("expected a string, found {v}"))),
        }
    }

    /// A list of strings; `default` when absent.
    pub(crate) fn strings(&mut self, key: &str, default: &[&str]) -> Result<Vec<String>> {
        match self.take(key) {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.error(
                        key,
                        format!("expected a list of strings, found the element {other}"),
                    )),
                })
                .collect(),
            Some(v) => Err(self.error(key, format!("expected a list of strings, found {v}"))),
        }
    }

    /// A list of non-negative integers; `default` when absent.
    pub(crate) fn usizes(&mut self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.take(key) {
            None => Ok(default.to_vec()),
            Some(Value::Array(items)) => {
                items.iter().map(|item| self.as_usize(key, item)).collect()
            }
            Some(v) => Err(self.error(key, format!("expected a list of integers, found {v}"))),
        }
    }

    /// An integer (the same for every one of `len` blocks) or a list of `len` integers; `default`
    /// when absent.
    pub(crate) fn usize_per_block(
        &mut self,
        key: &str,
        default: usize,
        len: usize,
    ) -> Result<Vec<usize>> {
        match self.take(key) {
            None => Ok(vec![default; len]),
            Some(Value::Array(items)) => {
                if items.len() != len {
                    return Err(self.error(
                        key,
                        format!("has {} entries but the model has {len} blocks (`down_block_types`); give one per block or a single integer", items.len()),
                    ));
                }
                items.iter().map(|item| self.as_usize(key, item)).collect()
            }
            Some(v) => Ok(vec![self.as_usize(key, &v)?; len]),
        }
    }

    /// Fails unless `key` is absent or `allowed` accepts its value: the key switches on a feature
    /// this program does not implement. `off` describes the accepted value(s) for the message.
    pub(crate) fn require(
        &mut self,
        key: &str,
        off: &str,
        allowed: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        match self.take(key) {
            None => Ok(()),
            Some(v) if allowed(&v) => Ok(()),
            Some(v) => Err(self.error(
                key,
                format!("the value {v} is not supported (this program implements only {off}); use a model without this feature"),
            )),
        }
    }

    /// Marks `key` as read without interpreting it: informational settings, or settings that
    /// only affect block types this program refuses anyway.
    pub(crate) fn ignore(&mut self, key: &str) {
        self.seen.insert(key.to_string());
    }

    /// The value of `key` as written, if present (it is not marked as read).
    pub(crate) fn peek(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// Checks the keys nobody read: diffusers' private `_…` keys are fine, unknown keys are fine
    /// when `null` or `false`, anything else is an error naming every such key.
    pub(crate) fn finish(self) -> Result<()> {
        let unknown: Vec<String> = self
            .map
            .iter()
            .filter(|(k, v)| {
                !self.seen.contains(*k)
                    && !k.starts_with('_')
                    && !matches!(v, Value::Null | Value::Bool(false))
            })
            .map(|(k, v)| format!("`{k}` = {v}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ModelError::InvalidConfig {
                origin: self.origin,
                message: format!(
                    "setting(s) this program does not know: {}; they may switch on a feature it does not implement, so the model is refused rather than built wrongly",
                    unknown.join(", ")
                ),
            }
            .into())
        }
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.error(key, format!("expected a non-negative integer, found {v}")))
    }
}

/// What a JSON value is, for messages (`a string`, `a list`).
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_defaults_lists_and_names_bad_keys() -> Result<()> {
        let mut c = ConfigJson::from_str(
            r#"{"a": 3, "b": [1, 2], "c": "x", "_class_name": "Y", "d": null, "e": false}"#,
            "cfg.json",
        )?;
        assert_eq!(c.usize("a", 0)?, 3);
        assert_eq!(c.usize("missing", 7)?, 7);
        assert_eq!(c.usize_per_block("b", 1, 2)?, vec![1, 2]);
        assert_eq!(c.usize_per_block("a", 1, 3)?, vec![3, 3, 3]);
        let err = c.usize_per_block("b", 1, 3).unwrap_err().to_string();
        assert!(
            err.contains("cfg.json") && err.contains("`b`") && err.contains("3 blocks"),
            "{err}"
        );
        let err = c.usize("c", 0).unwrap_err().to_string();
        assert!(err.contains("`c`") && err.contains("\"x\""), "{err}");
        c.finish()?;
        Ok(())
    }

    #[test]
    fn unsupported_and_unknown_settings_are_refused() -> Result<()> {
        let mut c = ConfigJson::from_str(
            r#"{"class_embed_type": "timestep", "new_thing": 5}"#,
            "cfg.json",
        )?;
        let err = c
            .require("class_embed_type", "null", Value::is_null)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("class_embed_type") && err.contains("timestep"),
            "{err}"
        );
        let err = c.finish().unwrap_err().to_string();
        assert!(
            err.contains("`new_thing` = 5") && !err.contains("class_embed_type"),
            "{err}"
        );
        Ok(())
    }
}
