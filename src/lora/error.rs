//! What can go wrong with LoRA targets and LoRA files, said so that the user can fix it: every
//! message names the config key, the file, the tensor key or the module at fault.

use std::path::PathBuf;

/// A LoRA problem: `origin` is where it comes from (`target_modules`, a file path), `problem`
/// what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {problem}")]
pub struct LoraError {
    pub origin: String,
    pub problem: LoraProblem,
}

/// The kinds of LoRA problems.
#[derive(Debug, thiserror::Error)]
pub enum LoraProblem {
    /// `target_modules` entries that select no layer of the models being trained.
    #[error(
        "{} {} no module of the {models}{hint}",
        quoted(entries),
        if entries.len() == 1 { "matches" } else { "match" }
    )]
    UnmatchedTarget {
        entries: Vec<String>,
        models: String,
        hint: String,
    },
    /// A `target_modules` entry selects a 3×3 convolution while `conv_lora` is off.
    #[error(
        "`{entry}` selects the 3×3 convolution `{path}`; convolution adapters need \
         `conv_lora: true` (with `conv_rank`/`conv_alpha`)"
    )]
    ConvNeedsConvLora { entry: String, path: String },
    /// The file cannot be read as a LoRA at all.
    #[error("not a LoRA file: {reason}")]
    Unreadable { reason: String },
    /// The file holds keys of another adapter algorithm.
    #[error(
        "the key `{key}` belongs to {algorithm}, which this trainer cannot load; only plain \
         LoRA files (`lora_down`/`lora_up`, also LoCon convolutions) can be used"
    )]
    UnsupportedAlgorithm { key: String, algorithm: String },
    /// A tensor holding NaN or infinite values: a run that diverged, or a damaged file.
    #[error(
        "the tensor `{key}` holds NaN or infinite values; the training that wrote it diverged or \
         the file is damaged: use an earlier step file"
    )]
    NonFinite { key: String },
    /// A key this reader does not understand.
    #[error("the key `{key}` is not part of a LoRA module{hint}")]
    UnknownKey { key: String, hint: String },
    /// A module lacks one of its two matrices.
    #[error("the module `{module}` has `{present}` but no `{missing}`")]
    IncompleteModule {
        module: String,
        present: String,
        missing: String,
    },
    /// The file was made for another Stable Diffusion family.
    #[error(
        "this LoRA was trained on {found} ({evidence}), but the base model is {expected}; \
         use a LoRA made for {expected}"
    )]
    WrongBaseModel {
        found: String,
        expected: String,
        evidence: String,
    },
    /// A module of the file that no layer of the model has.
    #[error("the key `{key}` matches no module of the {model}{hint}")]
    UnmatchedKey {
        key: String,
        model: String,
        hint: String,
    },
    /// A tensor whose shape does not fit the layer it adapts.
    #[error(
        "the key `{key}` has shape {found:?}, but the layer `{layer}` needs {expected:?} for a \
         rank-{rank} adapter"
    )]
    KeyShape {
        key: String,
        layer: String,
        rank: usize,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

/// `` `a` ``, `` `a` and `b` ``, `` `a`, `b` and `c` ``.
fn quoted(entries: &[String]) -> String {
    let q: Vec<String> = entries.iter().map(|e| format!("`{e}`")).collect();
    match q.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
}

impl LoraError {
    /// A problem with the `target_modules` setting.
    pub fn targets(problem: LoraProblem) -> Self {
        LoraError {
            origin: "target_modules".to_string(),
            problem,
        }
    }

    /// A problem with the LoRA file at `path`.
    pub fn file(path: impl Into<PathBuf>, problem: LoraProblem) -> Self {
        LoraError {
            origin: path.into().display().to_string(),
            problem,
        }
    }
}
