//! Our CLIP tokenizer against transformers' `CLIPTokenizer` on tricky captions
//! (`tests/fixtures/tokenizer_cases.json`, made from the bundled `models/clip-tokenizer/`):
//! both file layouts (`tokenizer.json`; `vocab.json` + `merges.txt`) and both pad conventions
//! (SD 1.x `<|endoftext|>`, SD 2.x `!`).

use std::path::{Path, PathBuf};

use lora_trainer::models::tokenizer::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    sd1: Vec<u32>,
    sd2: Vec<u32>,
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn cases() -> Vec<Case> {
    let path = repo("tests/fixtures/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with tools/make_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A copy of the bundled tokenizer folder holding only `files`, with the pad token replaced
/// by `pad` in both config files when given.
fn folder(files: &[&str], pad: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = repo("models/clip-tokenizer");
    for name in files
        .iter()
        .chain(&["tokenizer_config.json", "special_tokens_map.json"])
    {
        let from = source.join(name);
        let to = dir.path().join(name);
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        if let (Some(pad), true) = (
            pad,
            name.ends_with("config.json") || name.ends_with("map.json"),
        ) {
            let mut json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&to).expect("read")).expect("json");
            json["pad_token"] = serde_json::Value::from(pad);
            std::fs::write(&to, json.to_string()).expect("write");
        }
    }
    dir
}

const JSON_LAYOUT: &[&str] = &["tokenizer.json"];
const VOCAB_LAYOUT: &[&str] = &["vocab.json", "merges.txt"];

fn check(tokenizer: &ClipTokenizer, expected: impl Fn(&Case) -> &Vec<u32>, what: &str) {
    let cases = cases();
    assert!(
        cases.len() >= 10,
        "the fixture should hold the tricky cases"
    );
    let mut failures = Vec::new();
    for case in &cases {
        let got = tokenizer.encode(&case.text).expect("encode");
        if &got != expected(case) {
            failures.push(format!(
                "{:?}\n  ours:         {got:?}\n  transformers: {:?}",
                case.text,
                expected(case)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    let batch: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let ids = tokenizer.encode_batch(&batch).expect("batch");
    assert!(
        ids.iter()
            .zip(&cases)
            .all(|(ids, case)| ids == expected(case)),
        "{what}: encode_batch differs from encode"
    );
}

#[test]
fn tokenizer_json_layout_sd1_pad() {
    let dir = folder(JSON_LAYOUT, None);
    let tokenizer = ClipTokenizer::from_dir(dir.path()).expect("tokenizer");
    assert_eq!(
        (
            tokenizer.bos_id(),
            tokenizer.eos_id(),
            tokenizer.pad_id(),
            tokenizer.max_length()
        ),
        (49406, 49407, 49407, 77)
    );
    check(&tokenizer, |c| &c.sd1, "tokenizer.json, pad <|endoftext|>");
}

#[test]
fn vocab_and_merges_layout_sd1_pad() {
    let dir = folder(VOCAB_LAYOUT, None);
    let tokenizer = ClipTokenizer::from_dir(dir.path()).expect("tokenizer");
    check(
        &tokenizer,
        |c| &c.sd1,
        "vocab.json + merges.txt, pad <|endoftext|>",
    );
}

#[test]
fn tokenizer_json_layout_sd2_pad() {
    let dir = folder(JSON_LAYOUT, Some("!"));
    let tokenizer = ClipTokenizer::from_dir(dir.path()).expect("tokenizer");
    assert_eq!(tokenizer.pad_id(), 0);
    check(&tokenizer, |c| &c.sd2, "tokenizer.json, pad !");
}

#[test]
fn vocab_and_merges_layout_sd2_pad() {
    let dir = folder(VOCAB_LAYOUT, Some("!"));
    let tokenizer = ClipTokenizer::from_dir(dir.path()).expect("tokenizer");
    check(&tokenizer, |c| &c.sd2, "vocab.json + merges.txt, pad !");
}

#[test]
fn bundled_folder_with_the_sd2_pad_given_in_code() {
    let tokenizer = ClipTokenizer::from_dir(&repo("models/clip-tokenizer")).expect("tokenizer");
    check(&tokenizer, |c| &c.sd1, "models/clip-tokenizer");
    let sd2 = tokenizer.with_pad_token("!").expect("pad !");
    check(&sd2, |c| &c.sd2, "models/clip-tokenizer with pad_token !");
}

#[test]
fn missing_or_broken_files_are_named() {
    let empty = tempfile::tempdir().expect("temp dir");
    let err = ClipTokenizer::from_dir(empty.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("vocab.json + merges.txt"),
        "{err}"
    );

    let dir = folder(VOCAB_LAYOUT, None);
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\ni n\nthis is bad\n",
    )
    .expect("write");
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 3"),
        "{err}"
    );

    let dir = folder(VOCAB_LAYOUT, None);
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": 7}"#,
    )
    .expect("write");
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("special_tokens_map.json") && err.contains("pad_token"),
        "{err}"
    );

    let dir = folder(JSON_LAYOUT, None);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"model_max_length": 1}"#,
    )
    .expect("write");
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("model_max_length"),
        "{err}"
    );
}
