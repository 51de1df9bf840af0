//! The CLIP tokenizer.
//!
//! Captions become exactly `model_max_length` (77) token ids the way transformers'
//! `CLIPTokenizer(text, padding="max_length", max_length=77, truncation=True)` makes them:
//! NFC, whitespace runs collapsed to one space, lower case; CLIP's split pattern; byte-level
//! BPE with the `</w>` end-of-word suffix; then `<|startoftext|>`, at most 75 tokens,
//! `<|endoftext|>`, and the pad token up to 77. SD 1.x pads with `<|endoftext|>`, SD 2.x with
//! `!` (id 0). Special tokens written in a caption (`<|endoftext|>`, and `!` when it is the pad
//! token) are matched as transformers matches them: as that one token.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BpeBuilder;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::tokenizer_files::TokenizerFiles;
use crate::error::ModelError;
use crate::{Error, Result};

/// CLIP's pre-tokenization pattern (the specials, English contractions, letter runs, single
/// digits, runs of other non-space characters).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer producing fixed-length id sequences. See the module docs.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    /// The folder it was read from, for messages.
    origin: String,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("origin", &self.origin)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads a tokenizer folder: `tokenizer.json`, or `vocab.json` + `merges.txt`, with the
    /// optional `tokenizer_config.json` / `special_tokens_map.json` (pad token, `model_max_length`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_files(TokenizerFiles::read(dir)?)
    }

    /// Builds the tokenizer from the text of a `vocab.json` and a `merges.txt` held in memory
    /// (the copy of `models/clip-tokenizer` compiled into the binary), with CLIP's special
    /// tokens as SD 1.x's tokenizer declares them: `<|startoftext|>`, and `<|endoftext|>` as end,
    /// unknown and pad token; 77 ids. `origin` names the files in messages.
    pub fn from_vocab_and_merges(vocab_json: &str, merges_txt: &str, origin: &str) -> Result<Self> {
        let invalid = |message: String| -> Error {
            ModelError::InvalidConfig {
                origin: origin.to_string(),
                message,
            }
            .into()
        };
        let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| {
                invalid(format!(
                    "the vocabulary is not a JSON object of token → id: {e}"
                ))
            })?;
        let merges = merges_txt
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.is_empty())
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        invalid(format!(
                            "`{line}` is not a merge (two tokens separated by one space)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let special = |content: &str| AddedToken::from(content, true);
        Self::from_files(TokenizerFiles {
            vocab: vocab.into_iter().collect(),
            merges,
            vocab_origin: origin.into(),
            added: Vec::new(),
            bos: special("<|startoftext|>"),
            eos: special("<|endoftext|>"),
            unk: special("<|endoftext|>"),
            pad: special("<|endoftext|>"),
            max_length: super::tokenizer_files::DEFAULT_MAX_LENGTH,
        })
    }

    fn from_files(files: TokenizerFiles) -> Result<Self> {
        let origin = files.vocab_origin.display().to_string();
        let build_error = |e: tokenizers::Error| -> Error {
            ModelError::InvalidConfig {
                origin: origin.clone(),
                message: format!("cannot build the BPE tokenizer: {e}"),
            }
            .into()
        };
        let bpe = BpeBuilder::new()
            .vocab_and_merges(files.vocab, files.merges)
            .unk_token(files.unk.content.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .build()
            .map_err(build_error)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(build_error)?;
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(build_error)?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(build_error)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::default().add_prefix_space(false).into(),
        ])));
        let mut specials: Vec<AddedToken> = files.added.clone();
        for token in [&files.bos, &files.eos, &files.unk, &files.pad] {
            if !specials.iter().any(|t| t.content == token.content) {
                specials.push(token.clone());
            }
        }
        tokenizer
            .add_special_tokens(specials)
            .map_err(build_error)?;

        let mut clip = ClipTokenizer {
            tokenizer,
            origin,
            bos_id: 0,
            eos_id: 0,
            pad_id: 0,
            max_length: files.max_length,
        };
        clip.bos_id = clip.token_id(&files.bos.content, "bos_token")?;
        clip.eos_id = clip.token_id(&files.eos.content, "eos_token")?;
        clip.pad_id = clip.token_id(&files.pad.content, "pad_token")?;
        Ok(clip)
    }

    /// The same tokenizer padding with `token` instead (`"!"` for SD 2.x when the folder is SD
    /// 1.x's), as `CLIPTokenizer.from_pretrained(dir, pad_token=token)`: the token also becomes
    /// special, so where a caption contains it, it stays one token.
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        self.tokenizer
            .add_special_tokens([AddedToken::from(token, true)])
            .map_err(|e| ModelError::InvalidConfig {
                origin: self.origin.clone(),
                message: format!("cannot add the pad token `{token}`: {e}"),
            })?;
        self.pad_id = self.token_id(token, "pad_token")?;
        Ok(self)
    }

    fn token_id(&self, token: &str, role: &str) -> Result<u32> {
        self.tokenizer.token_to_id(token).ok_or_else(|| {
            ModelError::InvalidConfig {
                origin: self.origin.clone(),
                message: format!("the {role} `{token}` is not in the vocabulary"),
            }
            .into()
        })
    }

    /// Exactly [`ClipTokenizer::max_length`] ids: BOS, the caption's tokens (truncated to
    /// `max_length − 2`), EOS, then padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|e| ModelError::InvalidConfig {
                    origin: self.origin.clone(),
                    message: format!("cannot tokenize {text:?}: {e}"),
                })?;
        let content = encoding.get_ids();
        let kept = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..kept]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// [`ClipTokenizer::encode`] for each caption.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// The ids of `texts` as a `[B, max_length]` u32 tensor, ready for the text encoder.
    pub fn input_ids<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = self.encode_batch(texts)?.into_iter().flatten().collect();
        Ok(Tensor::from_vec(
            ids,
            (texts.len(), self.max_length),
            device,
        )?)
    }

    /// How many tokens of `text` are dropped by truncation (0 when it fits), to warn users.
    pub fn truncated_tokens(&self, text: &str) -> Result<usize> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|e| ModelError::InvalidConfig {
                    origin: self.origin.clone(),
                    message: format!("cannot tokenize {text:?}: {e}"),
                })?;
        Ok(encoding.get_ids().len().saturating_sub(self.max_length - 2))
    }

    /// Length of every encoding (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with a six-word vocabulary: `a`, `b`, `!` (inside and at the end of a word),
    /// the merges `a b</w>` and `! !</w>`, and CLIP's two specials.
    fn folder(config: Option<&str>, special_map: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let vocab = r#"{"!": 0, "a": 1, "b": 2, "a</w>": 3, "b</w>": 4, "!</w>": 5, "ab</w>": 6, "!!</w>": 7,
                        "<|startoftext|>": 8, "<|endoftext|>": 9}"#;
        std::fs::write(dir.path().join("vocab.json"), vocab).expect("vocab");
        std::fs::write(
            dir.path().join("merges.txt"),
            "#version: 0.2\na b</w>\n! !</w>\n",
        )
        .expect("merges");
        if let Some(config) = config {
            std::fs::write(dir.path().join("tokenizer_config.json"), config).expect("config");
        }
        if let Some(map) = special_map {
            std::fs::write(dir.path().join("special_tokens_map.json"), map).expect("map");
        }
        dir
    }

    #[test]
    fn encodes_to_bos_tokens_eos_and_padding() -> Result<()> {
        let dir = folder(Some(r#"{"model_max_length": 8}"#), None);
        let t = ClipTokenizer::from_dir(dir.path())?;
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.pad_id(), t.max_length()),
            (8, 9, 9, 8)
        );
        assert_eq!(t.encode("ab a")?, vec![8, 6, 3, 9, 9, 9, 9, 9]);
        assert_eq!(t.encode("")?, vec![8, 9, 9, 9, 9, 9, 9, 9]);
        // Case, Unicode composition and whitespace runs do not matter.
        assert_eq!(t.encode("  AB \n\t a ")?, t.encode("ab a")?);
        // Truncated to max_length − 2 tokens, EOS kept last.
        assert_eq!(t.encode("a b ab a b ab a b")?, vec![8, 3, 4, 6, 3, 4, 6, 9]);
        assert_eq!(t.truncated_tokens("a b ab a b ab a b")?, 2);
        assert_eq!(t.truncated_tokens("a b")?, 0);
        // A special token written in the caption is that token.
        assert_eq!(t.encode("a<|endoftext|>b")?, vec![8, 3, 9, 4, 9, 9, 9, 9]);
        let batch = t.input_ids(&["ab", "a"], &Device::Cpu)?;
        assert_eq!(
            batch.to_vec2::<u32>()?,
            vec![t.encode("ab")?, t.encode("a")?]
        );
        Ok(())
    }

    #[test]
    fn an_exclamation_mark_pad_is_special_as_in_sd2() -> Result<()> {
        let sd1 = ClipTokenizer::from_dir(folder(None, None).path())?;
        assert_eq!(
            sd1.max_length(),
            77,
            "CLIP's length when the config does not say"
        );
        assert_eq!(&sd1.encode("ab!!")?[..4], &[8, 6, 7, 9]);
        let sd2 = sd1.with_pad_token("!")?;
        assert_eq!(sd2.pad_id(), 0);
        assert_eq!(&sd2.encode("ab!!")?[..6], &[8, 6, 0, 0, 9, 0]);
        let from_files =
            ClipTokenizer::from_dir(folder(Some(r#"{"pad_token": "!"}"#), None).path())?;
        assert_eq!(from_files.encode("ab!!")?, sd2.encode("ab!!")?);
        Ok(())
    }

    #[test]
    fn special_tokens_map_wins_unless_the_config_declares_its_added_tokens() -> Result<()> {
        let map = Some(r#"{"pad_token": {"content": "!", "lstrip": false, "rstrip": false}}"#);
        let t =
            ClipTokenizer::from_dir(folder(Some(r#"{"pad_token": "<|endoftext|>"}"#), map).path())?;
        assert_eq!(t.pad_id(), 0);
        let config = r#"{"pad_token": "<|endoftext|>", "added_tokens_decoder": {
            "9": {"content": "<|endoftext|>", "special": true, "normalized": false}}}"#;
        let t = ClipTokenizer::from_dir(folder(Some(config), map).path())?;
        assert_eq!(t.pad_id(), 9);
        Ok(())
    }

    #[test]
    fn broken_files_are_named() {
        let dir = folder(Some(r#"{"model_max_length": "long"}"#), None);
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("model_max_length"),
            "{err}"
        );
        let dir = folder(None, Some("[1, 2]"));
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("special_tokens_map.json") && err.contains("JSON object"),
            "{err}"
        );
        let dir = folder(None, None);
        std::fs::write(dir.path().join("vocab.json"), r#"{"a": "one"}"#).expect("vocab");
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vocab.json") && err.contains("`a`"), "{err}");
        std::fs::write(
            dir.path().join("tokenizer.json"),
            r#"{"model": {"type": "WordPiece"}}"#,
        )
        .expect("json");
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("WordPiece"),
            "{err}"
        );
        let err = ClipTokenizer::from_dir(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("not a folder"),
            "{err}"
        );
    }
}
