//! The training images and their captions: metadata.csv or .txt files, checked before training.

/// An invalid dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{0}")]
    Invalid(String),
}
