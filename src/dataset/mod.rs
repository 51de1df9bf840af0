//! The training images and their captions: metadata.csv or .txt files, checked before training.

use std::path::PathBuf;

/// Everything the dataset needs from the validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Folder holding the images; file names in the CSV are relative to it.
    pub train_data_dir: PathBuf,
    /// `metadata.csv` (`filename,prompt` or `file_name,text`); `None` reads a caption file
    /// with `caption_extension` beside each image.
    pub metadata_path: Option<PathBuf>,
    /// Extension of the caption files beside the images, with its dot (`.txt`).
    pub caption_extension: String,
    /// Training resolution in pixels (square side; buckets keep area ≤ resolution²).
    pub resolution: u32,
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    /// Random instead of centre crop.
    pub random_crop: bool,
    /// Horizontal flip with probability ½.
    pub flip_aug: bool,
    /// How many times each image is seen per epoch.
    pub repeats: u32,
    /// Text put before every caption (a trigger word).
    pub caption_prefix: Option<String>,
    /// Shuffle the comma-separated tags of each caption (after the first `keep_tokens`).
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    /// Probability of training a sample with an empty caption.
    pub caption_dropout_rate: f32,
    /// Drop unreadable images with a warning instead of failing.
    pub skip_invalid_images: bool,
    /// Seed of every random choice (crop, flip, caption order, epoch order).
    pub seed: u64,
}

/// An invalid dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{0}")]
    Invalid(String),
}
