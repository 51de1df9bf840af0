//! Helpers shared by the dataset integration tests: a default spec and test images in temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use lora_trainer::dataset::DatasetSpec;

/// The config's defaults, with captions from `metadata.csv` in `dir`.
pub fn spec(dir: &Path) -> DatasetSpec {
    DatasetSpec {
        train_data_dir: dir.to_path_buf(),
        metadata_path: Some(dir.join("metadata.csv")),
        caption_extension: ".txt".to_string(),
        resolution: 64,
        resolution_given: true,
        enable_bucket: false,
        min_bucket_reso: 256,
        max_bucket_reso: 1024,
        bucket_reso_steps: 64,
        random_crop: false,
        flip_aug: false,
        repeats: 1,
        caption_prefix: None,
        shuffle_caption: false,
        keep_tokens: 0,
        caption_dropout_rate: 0.0,
        skip_invalid_images: false,
        seed: 42,
    }
}

/// Writes a `width × height` image whose pixels encode their position (format from the
/// extension), creating parent folders.
pub fn write_image(dir: &Path, name: &str, width: u32, height: u32) -> PathBuf {
    let image = RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            (x * 255 / width.max(2)) as u8,
            (y * 255 / height.max(2)) as u8,
            90,
        ])
    });
    save(dir, name, &DynamicImage::ImageRgb8(image))
}

/// Saves `image` under `dir/name`, the format chosen by the extension.
pub fn save(dir: &Path, name: &str, image: &DynamicImage) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let format = ImageFormat::from_path(&path).unwrap();
    let image = if format == ImageFormat::Jpeg {
        DynamicImage::ImageRgb8(image.to_rgb8())
    } else {
        image.clone()
    };
    image.save_with_format(&path, format).unwrap();
    path
}

/// Writes `metadata.csv` in `dir`.
pub fn write_csv(dir: &Path, text: &str) {
    std::fs::write(dir.join("metadata.csv"), text).unwrap();
}
