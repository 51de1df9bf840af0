//! The bundled demo dataset (`data/demo/`, made by `tools/make_demo_data.py`) passes the check.

use std::path::Path;

use lora_trainer::dataset::{Dataset, DatasetSpec};

#[test]
fn bundled_demo_dataset_opens_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo");
    let spec = DatasetSpec {
        train_data_dir: dir.clone(),
        metadata_path: Some(dir.join("metadata.csv")),
        caption_extension: ".txt".to_string(),
        resolution: 128,
        resolution_given: true,
        enable_bucket: true,
        min_bucket_reso: 64,
        max_bucket_reso: 256,
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
    };
    let dataset = Dataset::open(&spec).unwrap();
    assert_eq!(dataset.len(), 24);
    assert!(dataset.warnings().is_empty(), "{:?}", dataset.warnings());
    let sizes: Vec<(u32, u32)> = dataset.images().iter().map(|i| i.size).collect();
    assert_eq!(sizes.iter().filter(|s| **s == (128, 128)).count(), 18);
    assert!(sizes.contains(&(128, 96)) && sizes.contains(&(96, 128)));
    let jpegs = dataset
        .images()
        .iter()
        .filter(|i| i.name.ends_with(".jpg"))
        .count();
    assert!(jpegs > 0 && jpegs < 24);
    assert!(dataset.images().iter().any(|i| i.caption.contains(", ")));
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total < 500 * 1024, "data/demo is {total} bytes");
}
