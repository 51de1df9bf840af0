//! From files to training tensors and epochs: EXIF orientation, alpha, resize/crop geometry,
//! flips, buckets, and the seeded epoch order with its per-sample decisions.

mod dataset_support;

use std::collections::{BTreeMap, BTreeSet};

use dataset_support::{save, spec, write_csv, write_image};
use image::{DynamicImage, Rgb, RgbImage, Rgba, RgbaImage};
use lora_trainer::dataset::{BatchItem, Dataset, DatasetSpec};

/// The pixel (x, y) of a `[3, H, W]` tensor as 0..=255 values.
fn pixel(t: &candle_core::Tensor, x: usize, y: usize) -> [f32; 3] {
    let v: Vec<Vec<Vec<f32>>> = t.to_vec3().unwrap();
    [0, 1, 2].map(|c| (v[c][y][x] + 1.0) * 127.5)
}

fn item(image: usize, crop: (u32, u32), flip: bool) -> BatchItem {
    BatchItem {
        image,
        repeat: 0,
        crop,
        flip,
        caption: String::new(),
    }
}

/// A JPEG with an EXIF APP1 segment holding only an orientation tag.
fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
    let mut plain = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(image.clone())
        .write_to(&mut plain, image::ImageFormat::Jpeg)
        .unwrap();
    let plain = plain.into_inner();
    // TIFF header (little endian), one IFD with one entry: 0x0112 Orientation, SHORT, count 1.
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II\x2A\x00\x08\x00\x00\x00");
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = plain[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    // Stored 192 wide × 64 tall: left half red, right half blue.
    let stored = RgbImage::from_fn(192, 64, |x, _| {
        if x < 96 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    });
    // 6 = "rotate 90° clockwise to display": the picture is 64 wide × 192 tall, red on top.
    std::fs::write(
        dir.path().join("rotated.jpg"),
        jpeg_with_orientation(&stored, 6),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("plain.jpg"),
        jpeg_with_orientation(&stored, 1),
    )
    .unwrap();
    write_csv(dir.path(), "filename,prompt\nrotated.jpg,r\nplain.jpg,p\n");
    let mut s = spec(dir.path());
    s.resolution = 128;
    s.enable_bucket = true;
    s.min_bucket_reso = 64;
    s.max_bucket_reso = 256;
    let dataset = Dataset::open(&s).unwrap();
    assert_eq!(dataset.images()[0].size, (64, 192));
    assert_eq!(dataset.images()[1].size, (192, 64));
    // Tall and wide buckets.
    assert_eq!(dataset.images()[0].bucket, (64, 192));
    assert_eq!(dataset.images()[1].bucket, (192, 64));

    assert_eq!(dataset.images()[0].resized, (64, 192));
    let t = dataset.load_image(&item(0, (0, 0), false)).unwrap();
    assert_eq!(t.dims(), [3, 192, 64]);
    let top = pixel(&t, 32, 10);
    let bottom = pixel(&t, 32, 180);
    assert!(
        top[0] > 180.0 && top[2] < 80.0,
        "top should be red: {top:?}"
    );
    assert!(
        bottom[2] > 180.0 && bottom[0] < 80.0,
        "bottom should be blue: {bottom:?}"
    );
}

#[test]
fn transparent_pixels_become_white() {
    let dir = tempfile::tempdir().unwrap();
    let rgba = RgbaImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([0, 0, 0, 255])
        }
    });
    save(dir.path(), "alpha.png", &DynamicImage::ImageRgba8(rgba));
    write_csv(dir.path(), "filename,prompt\nalpha.png,a\n");
    let dataset = Dataset::open(&spec(dir.path())).unwrap();
    let t = dataset.load_image(&item(0, (0, 0), false)).unwrap();
    let v: Vec<Vec<Vec<f32>>> = t.to_vec3().unwrap();
    for channel in &v {
        assert_eq!(channel[5][5], 1.0, "transparent → white");
        assert_eq!(channel[5][60], -1.0, "opaque black stays black");
    }
}

/// A 256×128 image: x encodes the column (red), y the row (green).
fn gradient_dataset(dir: &std::path::Path, tweak: impl FnOnce(&mut DatasetSpec)) -> Dataset {
    let image = RgbImage::from_fn(256, 128, |x, y| Rgb([x as u8, (y * 2) as u8, 128]));
    save(dir, "wide.png", &DynamicImage::ImageRgb8(image));
    write_csv(dir, "filename,prompt\nwide.png,\"a, b, c, d, e\"\n");
    let mut s = spec(dir);
    tweak(&mut s);
    Dataset::open(&s).unwrap()
}

#[test]
fn wide_image_is_resized_to_cover_and_centre_cropped() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = gradient_dataset(dir.path(), |_| {});
    let entry = &dataset.images()[0];
    assert_eq!((entry.bucket, entry.resized), ((64, 64), (128, 64)));
    let sample = &dataset.epoch_batches(0, 1)[0].items[0];
    assert_eq!(sample.crop, (32, 0));
    let t = dataset.load_image(sample).unwrap();
    assert_eq!(t.dims(), [3, 64, 64]);
    // Scale ½: resized column 32 + x shows source column ≈ 2·(32 + x) + 0.5.
    for x in [4usize, 32, 60] {
        let red = pixel(&t, x, 32)[0];
        let expected = 2.0 * (32.0 + x as f32) + 0.5;
        assert!(
            (red - expected).abs() < 2.0,
            "column {x}: red {red}, expected {expected}"
        );
    }
    // Vertically the whole height is kept: top dark green, bottom bright.
    assert!(pixel(&t, 32, 0)[1] < 10.0 && pixel(&t, 32, 63)[1] > 245.0);
    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn flip_really_mirrors() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = gradient_dataset(dir.path(), |_| {});
    let plain = dataset.load_image(&item(0, (10, 0), false)).unwrap();
    let flipped = dataset.load_image(&item(0, (10, 0), true)).unwrap();
    let mirrored = plain.flip(&[2]).unwrap();
    let diff = (flipped - mirrored)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    assert!(pixel(&plain, 0, 0)[0] < pixel(&plain, 63, 0)[0]);
}

#[test]
fn random_crop_and_flip_aug_vary_per_sample_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = gradient_dataset(dir.path(), |s| {
        s.random_crop = true;
        s.flip_aug = true;
        s.repeats = 200;
    });
    let items: Vec<BatchItem> = dataset
        .epoch_batches(0, 1)
        .into_iter()
        .flat_map(|b| b.items)
        .collect();
    assert_eq!(items.len(), 200);
    let crops: BTreeSet<(u32, u32)> = items.iter().map(|i| i.crop).collect();
    assert!(crops.len() > 30, "only {} distinct crops", crops.len());
    assert!(crops.iter().all(|&(x, y)| x <= 64 && y == 0), "{crops:?}");
    let flips = items.iter().filter(|i| i.flip).count();
    assert!((70..130).contains(&flips), "{flips} of 200 flipped");
}

#[test]
fn buckets_put_tall_wide_and_square_images_where_kohya_would() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        (300, 200),
        (200, 300),
        (200, 200),
        (400, 100),
        (100, 400),
        (130, 97),
        (1000, 10),
    ];
    let mut csv = String::from("filename,prompt\n");
    for (i, (w, h)) in sizes.iter().enumerate() {
        write_image(dir.path(), &format!("{i}.png"), *w, *h);
        csv.push_str(&format!("{i}.png,x\n"));
    }
    write_csv(dir.path(), &csv);
    let mut s = spec(dir.path());
    s.resolution = 256;
    s.enable_bucket = true;
    s.min_bucket_reso = 128;
    s.max_bucket_reso = 512;
    let dataset = Dataset::open(&s).unwrap();
    // Computed with kohya's make_bucket_resolutions((256, 256), 128, 512, 64) and select_bucket.
    let expected = [
        (320, 192),
        (192, 320),
        (256, 256),
        (512, 128),
        (128, 512),
        (320, 192),
        (512, 128),
    ];
    let got: Vec<_> = dataset.images().iter().map(|i| i.bucket).collect();
    assert_eq!(got, expected);
    assert_eq!(
        dataset.buckets(),
        [
            (128, 512, 1),
            (192, 320, 1),
            (256, 256, 1),
            (320, 192, 2),
            (512, 128, 2)
        ]
    );
    // Every batch holds one bucket and loads at that size.
    for batch in dataset.epoch_batches(0, 2) {
        assert!(batch
            .items
            .iter()
            .all(|i| dataset.images()[i.image].bucket == batch.bucket));
        let t = dataset.load_batch(&batch).unwrap();
        let (w, h) = batch.bucket;
        assert_eq!(t.dims(), [batch.items.len(), 3, h as usize, w as usize]);
    }
    // Without bucketing everything is resolution × resolution.
    s.enable_bucket = false;
    let square = Dataset::open(&s).unwrap();
    assert_eq!(square.buckets(), [(256, 256, 7)]);
}

/// A dataset of 10 images in three buckets, with every random option on.
fn busy_dataset(dir: &std::path::Path, seed: u64) -> Dataset {
    let mut csv = String::from("filename,prompt\n");
    for i in 0..10 {
        let (w, h) = [(96, 96), (200, 66), (66, 200)][i % 3];
        write_image(dir, &format!("{i}.png"), w, h);
        csv.push_str(&format!(
            "{i}.png,\"tag{i}, red, green, blue, cyan, magenta, night\"\n"
        ));
    }
    write_csv(dir, &csv);
    let mut s = spec(dir);
    s.resolution = 128;
    s.enable_bucket = true;
    s.min_bucket_reso = 64;
    s.max_bucket_reso = 256;
    s.random_crop = true;
    s.flip_aug = true;
    s.repeats = 3;
    s.caption_prefix = Some("neonstyle".to_string());
    s.shuffle_caption = true;
    s.keep_tokens = 1;
    s.caption_dropout_rate = 0.1;
    s.seed = seed;
    Dataset::open(&s).unwrap()
}

#[test]
fn epoch_order_is_deterministic_per_seed_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let a = busy_dataset(dir.path(), 1);
    let again = busy_dataset(dir.path(), 1);
    let other = busy_dataset(dir.path(), 2);
    assert_eq!(a.epoch_batches(0, 2), again.epoch_batches(0, 2));
    assert_eq!(a.epoch_batches(5, 2), again.epoch_batches(5, 2));
    assert_ne!(a.epoch_batches(0, 2), other.epoch_batches(0, 2));
    assert_ne!(a.epoch_batches(0, 2), a.epoch_batches(1, 2));
}

#[test]
fn epoch_shows_each_image_repeats_times_in_single_bucket_batches() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = busy_dataset(dir.path(), 3);
    assert_eq!(
        dataset.buckets(),
        [(64, 192, 3), (128, 128, 4), (192, 64, 3)]
    );
    let batches = dataset.epoch_batches(0, 4);
    // Per bucket: ⌈12/4⌉ + ⌈9/4⌉ + ⌈9/4⌉ = 3 + 3 + 3, partial batches kept.
    assert_eq!(batches.len(), 9);
    assert_eq!(dataset.batches_per_epoch(4), 9);
    assert_eq!(dataset.batches_per_epoch(1), 30);
    let mut shown: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for batch in &batches {
        assert!(!batch.items.is_empty() && batch.items.len() <= 4);
        for item in &batch.items {
            assert_eq!(dataset.images()[item.image].bucket, batch.bucket);
            assert!(shown.entry(item.image).or_default().insert(item.repeat));
        }
    }
    assert_eq!(shown.len(), 10);
    assert!(shown.values().all(|r| r.len() == 3));
    // The batches are shuffled, not bucket after bucket.
    let orders: BTreeSet<Vec<(u32, u32)>> = (0..6)
        .map(|e| {
            dataset
                .epoch_batches(e, 4)
                .iter()
                .map(|b| b.bucket)
                .collect()
        })
        .collect();
    assert!(orders.len() > 1);
}

#[test]
fn per_sample_decisions_do_not_depend_on_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = busy_dataset(dir.path(), 4);
    let by_sample = |batch_size| -> BTreeMap<(usize, u32), BatchItem> {
        dataset
            .epoch_batches(2, batch_size)
            .into_iter()
            .flat_map(|b| b.items)
            .map(|i| ((i.image, i.repeat), i))
            .collect()
    };
    assert_eq!(by_sample(1), by_sample(3));
    assert_eq!(dataset.sample(2, 7, 1), by_sample(1)[&(7, 1)]);
}

#[test]
fn captions_get_prefix_shuffle_and_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = busy_dataset(dir.path(), 5);
    let items: Vec<BatchItem> = (0..20)
        .flat_map(|e| dataset.epoch_batches(e, 1))
        .flat_map(|b| b.items)
        .collect();
    let dropped = items.iter().filter(|i| i.caption.is_empty()).count();
    assert!(
        (20..100).contains(&dropped),
        "{dropped} of {} dropped",
        items.len()
    );
    let mut tails = BTreeSet::new();
    for item in items.iter().filter(|i| !i.caption.is_empty()) {
        let tags: Vec<&str> = item.caption.split(", ").collect();
        assert_eq!(tags[0], "neonstyle");
        assert_eq!(
            tags[1],
            format!("tag{}", item.image),
            "keep_tokens = 1 keeps the first tag"
        );
        let mut rest = tags[2..].to_vec();
        tails.insert(rest.join(","));
        rest.sort();
        assert_eq!(rest, ["blue", "cyan", "green", "magenta", "night", "red"]);
    }
    assert!(
        tails.len() > 50,
        "tags are not shuffled: {} orders",
        tails.len()
    );
    // The raw captions feed the tag counts.
    assert_eq!(dataset.tag_frequency()["red"], 10);
}
