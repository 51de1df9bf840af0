//! The CLIP tokenizer compiled into the binary, so that single-file models (which carry no
//! tokenizer) train offline wherever the program is installed.
//!
//! These are the `vocab.json` and `merges.txt` of `models/clip-tokenizer/` (OpenAI CLIP's BPE,
//! 49408 tokens, as SD 1.x and 2.x use it; ~1.5 MB). The special tokens are SD 1.x's; SD 2.x pads
//! with `!` instead, which the loader applies.

use crate::models::tokenizer::ClipTokenizer;
use crate::Result;

const VOCAB_JSON: &str = include_str!("../../../models/clip-tokenizer/vocab.json");
const MERGES_TXT: &str = include_str!("../../../models/clip-tokenizer/merges.txt");

/// The bundled tokenizer, SD 1.x's special tokens (pad = `<|endoftext|>`), 77 ids.
pub(crate) fn load() -> Result<ClipTokenizer> {
    ClipTokenizer::from_vocab_and_merges(
        VOCAB_JSON,
        MERGES_TXT,
        "the bundled CLIP tokenizer (models/clip-tokenizer)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The bundled copy gives the ids of transformers' tokenizer on every recorded case, and
    /// the same ids as the folder it was copied from.
    #[test]
    fn matches_the_folder_and_transformers() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bundled = load()?;
        let folder = ClipTokenizer::from_dir(&root.join("models/clip-tokenizer"))?;
        assert_eq!(bundled.vocab_size(), 49408);
        assert_eq!(
            (bundled.bos_id(), bundled.eos_id(), bundled.pad_id()),
            (49406, 49407, 49407)
        );
        let sd2 = load()?.with_pad_token("!")?;
        let text = std::fs::read_to_string(root.join("tests/fixtures/tokenizer_cases.json"))
            .map_err(|e| crate::Error::io("tokenizer_cases.json", e))?;
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).expect("valid cases");
        assert!(cases.len() > 10);
        for case in cases {
            let caption = case["text"].as_str().expect("text");
            let ids = |key: &str| -> Vec<u32> {
                case[key]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|v| v.as_u64().expect("id") as u32)
                    .collect()
            };
            assert_eq!(bundled.encode(caption)?, ids("sd1"), "{caption:?}");
            assert_eq!(folder.encode(caption)?, ids("sd1"), "{caption:?}");
            assert_eq!(sd2.encode(caption)?, ids("sd2"), "{caption:?}");
        }
        Ok(())
    }
}
