//! The training images and their captions: metadata.csv or .txt files, checked before training.
//!
//! [`Dataset::open`] checks everything up front (rows, files, decoding, captions) and reports all
//! problems at once, then assigns each image its bucket. Training asks for an epoch's
//! [`Batch`]es ([`Dataset::epoch_batches`], deterministic under the seed) and loads the pixels of
//! each sample as a tensor ([`Dataset::load_image`], [`Dataset::load_batch`]).

mod bucket;
mod caption;
mod caption_files;
mod check;
mod decode;
mod epoch;
pub(crate) mod error;
mod listing;
mod metadata;
mod transform;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rayon::prelude::*;

pub use bucket::{BucketSet, BucketSize};
pub use caption::{split_tags, CaptionOptions};
pub use decode::{decode_oriented, to_rgb_on_white};
pub use epoch::{Batch, BatchItem, ImageView};
pub use listing::{normalize_name, ImageFolder, IMAGE_EXTENSIONS};
pub use metadata::{parse_metadata, Metadata, MetadataRow, CAPTION_COLUMNS, FILE_COLUMNS};
pub use transform::RESIZE_FILTER;

pub use crate::config::DatasetSpec;
pub use error::DatasetError;

/// Where the captions come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CaptionSource {
    /// A metadata CSV, with the columns that were used.
    Metadata {
        path: PathBuf,
        file_column: String,
        caption_column: String,
        ignored_columns: Vec<String>,
    },
    /// A text file beside each image, with this extension (`.txt`).
    CaptionFiles { extension: String },
}

/// One image of the dataset, checked and bucketed.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingImage {
    /// Relative to train_data_dir, `/`-separated (`sub/city_01.png`).
    pub name: String,
    /// Where the file is.
    pub path: PathBuf,
    /// Its metadata row (spreadsheet numbering, header = 1); `None` with caption files.
    pub row: Option<usize>,
    /// The caption as written (trimmed), before prefix, shuffling and dropout.
    pub caption: String,
    /// Width and height after EXIF orientation.
    pub size: (u32, u32),
    /// The bucket (training size) it is cropped to.
    pub bucket: BucketSize,
    /// The size it is resized to before cropping: covers the bucket, aspect kept.
    pub resized: (u32, u32),
    /// SHA-256 of the file's bytes when it was checked, hex.
    pub digest: String,
}

/// A checked dataset: images with captions and buckets, ready to be batched.
#[derive(Debug, Clone)]
pub struct Dataset {
    spec: DatasetSpec,
    images: Vec<TrainingImage>,
    bucket_set: BucketSet,
    source: CaptionSource,
    captions: CaptionOptions,
    warnings: Vec<String>,
}

impl Dataset {
    /// Checks every row and file (all problems listed at once → `Err`), decodes every image,
    /// assigns buckets. Writes nothing.
    pub fn open(spec: &DatasetSpec) -> crate::Result<Dataset> {
        let bucket_set = if spec.enable_bucket {
            BucketSet::kohya(
                spec.resolution,
                spec.min_bucket_reso,
                spec.max_bucket_reso,
                spec.bucket_reso_steps,
            )?
        } else {
            BucketSet::square(spec.resolution)?
        };
        if spec.repeats == 0 {
            return Err(DatasetError::Invalid(
                "repeats is 0; every image must be shown at least once per epoch (repeats ≥ 1)"
                    .to_string(),
            )
            .into());
        }
        if !(0.0..=1.0).contains(&spec.caption_dropout_rate) {
            return Err(DatasetError::Invalid(format!(
                "caption_dropout_rate {} is not a probability; use a value from 0 to 1",
                spec.caption_dropout_rate
            ))
            .into());
        }
        let checked = check::check(spec)?;
        let images = checked
            .images
            .into_iter()
            .map(|c| {
                let bucket = bucket_set.assign(c.size.0, c.size.1);
                TrainingImage {
                    name: c.name,
                    path: c.path,
                    row: c.row,
                    caption: c.caption,
                    size: c.size,
                    bucket,
                    resized: transform::cover_size(c.size, bucket),
                    digest: c.digest,
                }
            })
            .collect();
        Ok(Dataset {
            spec: spec.clone(),
            images,
            bucket_set,
            source: checked.source,
            captions: CaptionOptions {
                prefix: spec.caption_prefix.clone(),
                shuffle: spec.shuffle_caption,
                keep_tokens: spec.keep_tokens,
                dropout_rate: spec.caption_dropout_rate,
            },
            warnings: checked.warnings,
        })
    }

    /// Number of distinct images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The spec the dataset was opened with.
    pub fn spec(&self) -> &DatasetSpec {
        &self.spec
    }

    /// The images, in metadata-row order (caption files: sorted by name).
    pub fn images(&self) -> &[TrainingImage] {
        &self.images
    }

    /// Things the user should know that do not stop training: unlisted images, skipped invalid
    /// ones, caption files with several lines.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the captions come from, for the plan: `metadata.csv (data/x/metadata.csv), columns
    /// `filename` + `prompt`` or `caption files (*.txt beside each image)`.
    pub fn caption_source(&self) -> String {
        match &self.source {
            CaptionSource::Metadata {
                path,
                file_column,
                caption_column,
                ignored_columns,
            } => {
                let file = path.file_name().map_or_else(
                    || path.display().to_string(),
                    |f| f.to_string_lossy().into_owned(),
                );
                let mut text = format!(
                    "{file} ({}), columns `{file_column}` + `{caption_column}`",
                    path.display()
                );
                if !ignored_columns.is_empty() {
                    let ignored: Vec<String> =
                        ignored_columns.iter().map(|c| format!("`{c}`")).collect();
                    text.push_str(&format!(" (ignored: {})", ignored.join(", ")));
                }
                text
            }
            CaptionSource::CaptionFiles { extension } => {
                format!("caption files (*{extension} beside each image)")
            }
        }
    }

    /// The structured form of [`Dataset::caption_source`].
    pub fn caption_source_kind(&self) -> &CaptionSource {
        &self.source
    }

    /// Buckets that hold images: (width, height, images), sorted by (width, height).
    pub fn buckets(&self) -> Vec<(u32, u32, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for image in &self.images {
            *counts.entry(image.bucket).or_insert(0usize) += 1;
        }
        counts.into_iter().map(|((w, h), n)| (w, h, n)).collect()
    }

    /// Every bucket size images could be assigned to (one `(resolution, resolution)` without
    /// bucketing).
    pub fn bucket_set(&self) -> &BucketSet {
        &self.bucket_set
    }

    /// A digest of what the run trains on, wherever the folder is: each image's name
    /// (relative to `train_data_dir`), bytes, caption, size and bucket, in order. A resumed run
    /// compares it with the state's, so that a moved project folder is recognised.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for image in &self.images {
            hash.update(image.name.as_bytes());
            hash.update([0]);
            hash.update(image.digest.as_bytes());
            hash.update([0]);
            hash.update(image.caption.as_bytes());
            hash.update([0]);
            for n in [image.size.0, image.size.1, image.bucket.0, image.bucket.1] {
                hash.update(n.to_le_bytes());
            }
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Each image's name (relative to `train_data_dir`) with the SHA-256 of its bytes, for a
    /// resumed run to name the images that changed.
    pub fn image_digests(&self) -> std::collections::BTreeMap<String, String> {
        self.images
            .iter()
            .map(|i| (i.name.clone(), i.digest.clone()))
            .collect()
    }

    /// How often each caption tag occurs in the raw captions (split on commas, trimmed), for the
    /// LoRA file's `ss_tag_frequency`.
    pub fn tag_frequency(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for image in &self.images {
            for tag in split_tags(&image.caption) {
                *counts.entry(tag.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The pixels of one sample: `[3, height, width]` f32 in [-1, 1] on the CPU, where
    /// (width, height) is the sample's bucket.
    pub fn load_image(&self, item: &BatchItem) -> crate::Result<Tensor> {
        self.load_view(item.view())
    }

    /// The pixels of an [`ImageView`]: `[3, height, width]` f32 in [-1, 1] on the CPU.
    pub fn load_view(&self, view: ImageView) -> crate::Result<Tensor> {
        let entry = self
            .images
            .get(view.image)
            .ok_or_else(|| DatasetError::Image {
                path: self.spec.train_data_dir.clone(),
                reason: format!(
                    "no image number {} (the dataset has {})",
                    view.image,
                    self.len()
                ),
            })?;
        let rgb = load_rgb(&entry.path, entry.size)?;
        let pixels = transform::render(&rgb, entry.resized, entry.bucket, view.crop, view.flip);
        Ok(transform::to_tensor(&pixels)?)
    }

    /// The pixels of a whole batch, decoded in parallel: `[batch, 3, height, width]` f32 in
    /// [-1, 1] on the CPU.
    pub fn load_batch(&self, batch: &Batch) -> crate::Result<Tensor> {
        let tensors = batch
            .items
            .par_iter()
            .map(|item| self.load_image(item))
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&tensors, 0)?)
    }
}

/// Decodes an image again at training time and makes sure it is still the one that was checked.
fn load_rgb(path: &Path, checked_size: (u32, u32)) -> Result<image::RgbImage, DatasetError> {
    let image = decode::decode_oriented(path).map_err(|reason| DatasetError::Image {
        path: path.to_path_buf(),
        reason,
    })?;
    let size = (image.width(), image.height());
    if size != checked_size {
        return Err(DatasetError::Image {
            path: path.to_path_buf(),
            reason: format!(
                "changed since the dataset was checked ({}x{} then, {}x{} now); restart the run",
                checked_size.0, checked_size.1, size.0, size.1
            ),
        });
    }
    Ok(decode::to_rgb_on_white(image))
}
