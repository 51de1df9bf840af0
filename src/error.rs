//! The crate's error type: one enum whose variants each name the file, row, key or value at fault.
//!
//! Errors caused by the user's input (config, dataset, model files, command line) exit with
//! status 2; anything else exits with status 1. [`Error::exit_code`] decides which.

use std::path::PathBuf;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML config or a `--set` override is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::error::ConfigError),
    /// The dataset (metadata.csv, images, captions) is invalid.
    #[error(transparent)]
    Dataset(#[from] crate::dataset::error::DatasetError),
    /// A model file or folder cannot be used.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A LoRA target selection or a LoRA file cannot be used.
    #[error(transparent)]
    Lora(Box<crate::lora::error::LoraError>),
    /// A `generate` option, prompt tag or prompt file is invalid.
    #[error(transparent)]
    Generate(#[from] crate::generate::error::GenerateError),
    /// Optimizer, optimizer state or schedule problems.
    #[error(transparent)]
    Train(#[from] crate::train::error::TrainError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed (a shape mismatch inside the model, an unsupported dtype...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<crate::lora::error::LoraError> for Error {
    fn from(e: crate::lora::error::LoraError) -> Self {
        Error::Lora(Box::new(e))
    }
}

impl Error {
    /// Process exit status for this error: 2 when the user's input is at fault, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_)
            | Error::Dataset(_)
            | Error::Model(_)
            | Error::Lora(_)
            | Error::Generate(_) => 2,
            Error::Train(e) if e.is_user_error() => 2,
            Error::Train(_) => 1,
            Error::Io { .. } | Error::Candle(_) => 1,
        }
    }

    /// The error and its causes, each said once ("a: b: c"), as ripgrep prints them: what the
    /// binaries print after `error: `.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Problems with a base model: its files, its configs, or the tensors inside.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file exists but cannot be read as a checkpoint.
    #[error("{path}: cannot read as a model checkpoint: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// A parameter the model needs is not in the checkpoint.
    #[error("{origin}: the weight `{key}` is missing; the file is not a checkpoint of this model (or it was converted wrongly)")]
    MissingWeight { key: String, origin: String },
    /// A parameter has another shape than the model's config says.
    #[error("{origin}: the weight `{key}` has shape {found:?}, but the model's config needs {expected:?}")]
    WeightShape {
        key: String,
        origin: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Tensors of the checkpoint that the model did not consume.
    #[error("{origin}: {} weight(s) of the checkpoint belong to no parameter of the model: {}", keys.len(), preview(keys))]
    UnusedWeights { origin: String, keys: Vec<String> },
    /// A model config (`config.json`, `scheduler_config.json`, an LDM yaml) is invalid.
    #[error("{origin}: {message}")]
    InvalidConfig { origin: String, message: String },
    /// A base model, VAE or tokenizer path that does not exist.
    #[error("{path}: does not exist; {hint}")]
    NotFound { path: PathBuf, hint: String },
    /// A model or file that is valid but of a kind this program does not train (SDXL, a LoRA
    /// given as base model, an unknown tensor in a checkpoint...).
    #[error("{origin}: {message}")]
    Unsupported { origin: String, message: String },
    /// Hub files that are neither in the local cache nor downloadable now.
    #[error("hub model `{id}`: {reason}\n{advice}")]
    HubUnavailable {
        id: String,
        reason: String,
        advice: String,
    },
}

fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    s
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
