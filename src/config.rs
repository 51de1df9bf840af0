//! The YAML training config: parsed, checked key by key, and turned into one validated plan.

/// An invalid config file or `--set` override.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

/// The validated plan the rest of the program reads.
#[derive(Debug, Clone)]
pub struct TrainPlan {}
