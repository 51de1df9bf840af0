//! `Dataset::open` on datasets built in temp dirs: what is accepted, and every problem reported
//! at once with its row number.

mod dataset_support;

use dataset_support::{spec, write_csv, write_image};
use lora_trainer::dataset::Dataset;

#[test]
fn simple_csv_dataset_opens() {
    let dir = tempfile::tempdir().unwrap();
    write_image(dir.path(), "a.png", 80, 64);
    write_image(dir.path(), "b.jpg", 64, 64);
    write_csv(
        dir.path(),
        "filename,prompt\na.png,\"neon, city\"\nb.jpg,tower\n",
    );
    let dataset = Dataset::open(&spec(dir.path())).unwrap();
    assert_eq!(dataset.len(), 2);
    assert!(!dataset.is_empty());
    assert!(dataset.warnings().is_empty(), "{:?}", dataset.warnings());
    assert_eq!(dataset.buckets(), [(64, 64, 2)]);
    assert_eq!(dataset.batches_per_epoch(1), 2);
    assert_eq!(dataset.batches_per_epoch(4), 1);
    assert_eq!(dataset.images()[0].caption, "neon, city");
    assert_eq!(dataset.images()[0].row, Some(2));
    assert!(
        dataset.caption_source().starts_with("metadata.csv ("),
        "{}",
        dataset.caption_source()
    );
    let batch = &dataset.epoch_batches(0, 2)[0];
    let pixels = dataset.load_batch(batch).unwrap();
    assert_eq!(pixels.dims(), [2, 3, 64, 64]);
}
