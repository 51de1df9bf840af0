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

/// The error message of a dataset that must not open; also checks its exit status.
fn open_error(spec: &lora_trainer::dataset::DatasetSpec) -> String {
    match Dataset::open(spec) {
        Ok(d) => panic!("opened a bad dataset with {} images", d.len()),
        Err(e) => {
            assert_eq!(e.exit_code(), 2, "{e}");
            e.to_string()
        }
    }
}

#[test]
fn bom_crlf_subfolders_and_hugging_face_header() {
    let dir = tempfile::tempdir().unwrap();
    write_image(dir.path(), "a.png", 64, 64);
    write_image(dir.path(), "sub/deeper/b.webp", 64, 64);
    write_image(dir.path(), "sub/c.bmp", 64, 64);
    write_csv(
        dir.path(),
        "\u{feff}id,file_name,text\r\n1,a.png,\"say \"\"hi\"\", twice\"\r\n2,sub/deeper/b.webp,b\r\n3,sub\\c.bmp,c\r\n",
    );
    let dataset = Dataset::open(&spec(dir.path())).unwrap();
    let names: Vec<_> = dataset.images().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["a.png", "sub/deeper/b.webp", "sub/c.bmp"]);
    assert_eq!(dataset.images()[0].caption, "say \"hi\", twice");
    let source = dataset.caption_source();
    assert!(
        source.contains("`file_name` + `text`") && source.contains("ignored: `id`"),
        "{source}"
    );
}

#[test]
fn all_row_problems_are_reported_at_once_with_row_numbers() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "ok.png",
        "city_01.png",
        "night.jpg",
        "dup.png",
        "empty.png",
        "sub/deep.png",
    ] {
        write_image(dir.path(), name, 64, 64);
    }
    std::fs::write(
        dir.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("folder.png")).unwrap();
    write_csv(
        dir.path(),
        "filename,prompt\n\
         ok.png,fine\n\
         City_01.PNG,wrong case\n\
         night.png,wrong extension\n\
         dup.png,first\n\
         dup.png,second\n\
         empty.png,\"  \"\n\
         broken.png,undecodable\n\
         missing.png,nothing like it\n\
         deep.png,in a subfolder but named without it\n\
         sub/deep.png,right\n\
         x.png,unquoted, commas\n\
         folder.png,a folder named like an image\n",
    );
    let message = open_error(&spec(dir.path()));
    eprintln!("{message}");
    let expected = [
        "row 3: `City_01.PNG` not found; did you mean `city_01.png`?",
        "row 4: `night.png` not found; did you mean `night.jpg`?",
        "row 6: `dup.png` is listed again (first in row 5)",
        "row 7: the caption of `empty.png` is empty",
        "row 8: `broken.png` cannot be decoded",
        "row 9: `missing.png` not found in train_data_dir",
        "row 10: `deep.png` not found; did you mean `sub/deep.png`?",
        // Unquoted commas in the last column are the caption's own: the row is read, and
        // only its file is missing.
        "row 12: `x.png` not found in train_data_dir",
        "row 13: `folder.png` is a folder, not an image file",
    ];
    for line in expected {
        assert!(message.contains(line), "missing {line:?} in:\n{message}");
    }
    assert!(message.contains("9 problem(s)"), "{message}");
    assert!(
        !message.contains("row 2:") && !message.contains("row 11:"),
        "{message}"
    );
    // In row order.
    let positions: Vec<usize> = expected.iter().map(|l| message.find(l).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{message}");
}

#[test]
fn header_only_missing_column_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_image(dir.path(), "a.png", 64, 64);
    write_csv(dir.path(), "filename,prompt\r\n");
    assert!(open_error(&spec(dir.path())).contains("only a header"));
    write_csv(dir.path(), "filename,description\na.png,x\n");
    let message = open_error(&spec(dir.path()));
    assert!(
        message.contains("no caption column") && message.contains("metadata.csv"),
        "{message}"
    );

    std::fs::remove_file(dir.path().join("metadata.csv")).unwrap();
    let message = open_error(&spec(dir.path()));
    assert!(
        message.contains("metadata_path") && message.contains("cannot be read"),
        "{message}"
    );

    let mut missing_dir = spec(dir.path());
    missing_dir.train_data_dir = dir.path().join("nope");
    assert!(open_error(&missing_dir).contains("does not exist"));
}

#[test]
fn a_folder_without_images_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.txt"), "no images here").unwrap();
    write_csv(dir.path(), "filename,prompt\na.png,x\n");
    let message = open_error(&spec(dir.path()));
    assert!(message.contains("contains no images"), "{message}");
    let mut caption_files = spec(dir.path());
    caption_files.metadata_path = None;
    assert!(open_error(&caption_files).contains("contains no images"));
}

#[test]
fn unlisted_images_are_a_warning_with_count_and_names() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..8 {
        write_image(dir.path(), &format!("img_{i}.png"), 64, 64);
    }
    write_csv(dir.path(), "filename,prompt\nimg_0.png,x\n");
    let dataset = Dataset::open(&spec(dir.path())).unwrap();
    assert_eq!(dataset.len(), 1);
    let warning = dataset.warnings().join("\n");
    assert!(
        warning.contains("7 image(s)") && warning.contains("not listed in metadata.csv"),
        "{warning}"
    );
    assert!(
        warning.contains("`img_1.png`") && warning.contains("and 2 more"),
        "{warning}"
    );
}

#[test]
fn skip_invalid_images_drops_them_loudly() {
    let dir = tempfile::tempdir().unwrap();
    write_image(dir.path(), "good.png", 64, 64);
    std::fs::write(dir.path().join("bad.png"), b"garbage").unwrap();
    std::fs::write(dir.path().join("worse.jpg"), b"\xFF\xD8\xFF\xE0 truncated").unwrap();
    write_csv(
        dir.path(),
        "filename,prompt\ngood.png,g\nbad.png,b\nworse.jpg,w\n",
    );
    let mut s = spec(dir.path());
    let message = open_error(&s);
    assert!(
        message.contains("row 3: `bad.png`") && message.contains("row 4: `worse.jpg`"),
        "{message}"
    );

    s.skip_invalid_images = true;
    let dataset = Dataset::open(&s).unwrap();
    assert_eq!(dataset.len(), 1);
    let warning = dataset.warnings().join("\n");
    assert!(warning.contains("SKIPPED 2 of 3 images"), "{warning}");
    assert!(warning.contains("row 3: `bad.png`"), "{warning}");

    // Still an error when nothing is left.
    write_csv(dir.path(), "filename,prompt\nbad.png,b\n");
    let message = open_error(&s);
    assert!(message.contains("nothing is left to train on"), "{message}");

    // Skipping does not hide other mistakes.
    write_csv(dir.path(), "filename,prompt\ngood.png,\nbad.png,b\n");
    assert!(open_error(&s).contains("row 2: the caption of `good.png` is empty"));
}

#[test]
fn caption_files_mode() {
    let dir = tempfile::tempdir().unwrap();
    write_image(dir.path(), "a.png", 64, 64);
    write_image(dir.path(), "sub/b.jpg", 64, 64);
    std::fs::write(dir.path().join("a.txt"), "\u{feff}neon, city\r\n").unwrap();
    std::fs::write(dir.path().join("sub/b.txt"), "tower\nsecond line\n").unwrap();
    let mut s = spec(dir.path());
    s.metadata_path = None;
    let dataset = Dataset::open(&s).unwrap();
    assert_eq!(
        dataset.caption_source(),
        "caption files (*.txt beside each image)"
    );
    let captions: Vec<_> = dataset
        .images()
        .iter()
        .map(|i| (i.name.as_str(), i.caption.as_str()))
        .collect();
    assert_eq!(captions, [("a.png", "neon, city"), ("sub/b.jpg", "tower")]);
    assert!(dataset
        .warnings()
        .join("\n")
        .contains("only the first line is used: `sub/b.txt`"));

    // Other extension: every caption file missing, all listed; a metadata.csv nearby is hinted at.
    s.caption_extension = ".caption".to_string();
    write_csv(dir.path(), "filename,prompt\na.png,x\n");
    let message = open_error(&s);
    assert!(
        message.contains("`a.png`: no caption file `a.caption`"),
        "{message}"
    );
    assert!(
        message.contains("`sub/b.jpg`: no caption file `sub/b.caption`"),
        "{message}"
    );
    assert!(
        message.contains("hint:") && message.contains("metadata_path"),
        "{message}"
    );
}

#[test]
fn two_hundred_images_check_in_a_few_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("filename,prompt\n");
    for i in 0..200 {
        let name = if i % 2 == 0 {
            format!("img_{i:03}.png")
        } else {
            format!("img_{i:03}.jpg")
        };
        write_image(dir.path(), &name, 256, 192);
        csv.push_str(&format!("{name},\"image {i}, neon\"\n"));
    }
    write_csv(dir.path(), &csv);
    let start = std::time::Instant::now();
    let dataset = Dataset::open(&spec(dir.path())).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(dataset.len(), 200);
    eprintln!("checked 200 images in {elapsed:?}");
    assert!(
        elapsed.as_secs_f64() < 5.0,
        "checking 200 images took {elapsed:?}"
    );
}
