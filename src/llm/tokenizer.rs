//! A language model's tokenizer as transformers saves it: `tokenizer.json` (the `tokenizers`
//! library's own file, so ids are transformers' ids), the special tokens of
//! `tokenizer_config.json`, and the chat template from `chat_template.jinja` (transformers 5) or
//! from `tokenizer_config.json`'s `chat_template` (transformers 4: a string, or a list of named
//! templates of which `default` is used).

use std::path::Path;

use serde_json::Value;

use super::chat_template::ChatTemplate;
use crate::error::ModelError;
use crate::models::config_json::read_model_file;
use crate::Result;

/// Each token's byte range (start, end) in the text it came from.
pub type Offsets = Vec<(usize, usize)>;

/// The tokenizer, special tokens and chat template of a model folder.
pub struct LmTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// `None` when the model has none (a base model): a plain prompt format is used then.
    pub template: Option<ChatTemplate>,
}

impl std::fmt::Debug for LmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmTokenizer")
            .field("eos_token", &self.eos_token)
            .field("template", &self.template.is_some())
            .finish()
    }
}

impl LmTokenizer {
    /// Reads the tokenizer files of `folder`.
    pub fn open(folder: &Path) -> Result<Self> {
        let path = folder.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::NotFound {
                path,
                hint: "the model folder has no tokenizer.json (the fast tokenizer transformers \
                       saves); copy it from the model's repository, or save the tokenizer with \
                       AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
                    .to_string(),
            }
            .into());
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::InvalidConfig {
                origin: path.display().to_string(),
                message: format!("not a tokenizer file the tokenizers library reads: {e}"),
            })?;
        let config_path = folder.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            serde_json::from_str(&read_model_file(&config_path)?).map_err(|e| {
                ModelError::InvalidConfig {
                    origin: config_path.display().to_string(),
                    message: format!("not valid JSON: {e}"),
                }
            })?
        } else {
            Value::Null
        };
        let token = |key: &str| -> Option<String> {
            match config.get(key)? {
                Value::String(s) => Some(s.clone()),
                // transformers 4 writes AddedToken objects.
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let (bos_token, eos_token, pad_token) =
            (token("bos_token"), token("eos_token"), token("pad_token"));
        let source = template_source(folder, &config)?;
        let template = match source {
            Some((origin, text)) => Some(
                ChatTemplate::new(&text, bos_token.clone(), eos_token.clone()).map_err(|e| {
                    ModelError::InvalidConfig {
                        origin,
                        message: format!("the chat template does not compile: {e}"),
                    }
                })?,
            ),
            None => None,
        };
        Ok(LmTokenizer {
            tokenizer,
            bos_token,
            eos_token,
            pad_token,
            template,
        })
    }

    /// The ids of `text`, special tokens written in it recognised, none added (a chat
    /// template writes its own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| candle_core::Error::Msg(format!("tokenizing failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// [`LmTokenizer::encode`] with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| candle_core::Error::Msg(format!("tokenizing failed: {e}")))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self
            .tokenizer
            .decode(ids, false)
            .map_err(|e| candle_core::Error::Msg(format!("decoding failed: {e}")))?)
    }

    /// The id of a token (`<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// The chat template's text and where it came from.
fn template_source(folder: &Path, config: &Value) -> Result<Option<(String, String)>> {
    let file = folder.join("chat_template.jinja");
    if file.is_file() {
        return Ok(Some((file.display().to_string(), read_model_file(&file)?)));
    }
    let origin = folder.join("tokenizer_config.json").display().to_string();
    Ok(match config.get("chat_template") {
        Some(Value::String(text)) => Some((origin, text.clone())),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(|text| (origin, text.to_string())),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::records::{Message, Role};

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }

    fn qwen2() -> std::path::PathBuf {
        crate::fixtures::root().join("llm/qwen2")
    }

    #[test]
    fn rendered_conversations_tokenize_to_transformers_ids() {
        let tokenizer = LmTokenizer::open(&qwen2()).unwrap();
        assert_eq!(tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(tokenizer.token_id("<|im_start|>"), Some(1));
        let cases: Vec<Case> =
            serde_json::from_str(&std::fs::read_to_string(qwen2().join("tokens.json")).unwrap())
                .unwrap();
        assert_eq!(cases.len(), 5);
        for case in &cases {
            assert_eq!(
                tokenizer.encode(&case.text).unwrap(),
                case.ids,
                "{:?}",
                case.text
            );
        }
        // The folder's chat_template.jinja renders the first conversation.
        let messages = [
            Message {
                role: Role::User,
                content: "What is 2+2?".into(),
            },
            Message {
                role: Role::Assistant,
                content: "4".into(),
            },
        ];
        let template = tokenizer.template.as_ref().unwrap();
        assert_eq!(
            template.render(&messages, false, &[]).unwrap(),
            cases[0].text
        );
    }

    #[test]
    fn a_transformers_4_tokenizer_config_carries_the_template_and_token_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            qwen2().join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let template = std::fs::read_to_string(qwen2().join("chat_template.jinja")).unwrap();
        let config = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}],
            "eos_token": {"content": "<|im_end|>", "lstrip": false},
            "bos_token": null,
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let tokenizer = LmTokenizer::open(dir.path()).unwrap();
        assert_eq!(tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(tokenizer.bos_token, None);
        let user = Message {
            role: Role::User,
            content: "hi".into(),
        };
        let text = tokenizer
            .template
            .as_ref()
            .unwrap()
            .render(&[user], true, &[])
            .unwrap();
        assert!(text.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));

        // No tokenizer.json: named, with the fix.
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        let e = LmTokenizer::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
