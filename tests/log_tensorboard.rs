//! TensorBoard event files written by `EventWriter`, read back through the public reader: names,
//! framing, scalars, images, resume markers, and errors instead of panics.
//!
//! Set `LORA_TRAINER_TB_DEMO_DIR=DIR` to keep the files of the two runs marked "demo" in
//! `DIR/run` and `DIR/resumed`, then check them with TensorBoard's own readers:
//! `python tools/read_tb_events.py DIR --server`.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lora_trainer::log::event::{EventKind, Value};
use lora_trainer::log::event_reader::{event_files, read_event_file, scalar_series};
use lora_trainer::log::{tags, EventWriter, LossTracker, StepScalars};

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
    });
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// The directory to log in: `run` inside the demo directory if asked for, else inside a fresh
/// temporary one.
fn log_dir(temp: &tempfile::TempDir, run: &str) -> PathBuf {
    match std::env::var_os("LORA_TRAINER_TB_DEMO_DIR") {
        Some(dir) => PathBuf::from(dir).join(run),
        None => temp.path().join(run),
    }
}

/// Ten steps of a pretend run: the step tags, an epoch average every 5 steps, one image.
fn write_run(dir: &Path) -> (PathBuf, Vec<(i64, f32)>, Vec<u8>) {
    let mut writer = EventWriter::create(dir).unwrap();
    let mut tracker = LossTracker::new(5);
    let mut expected = Vec::new();
    for step in 1..=10u64 {
        let loss = 1.0 / step as f32;
        tracker.record(loss);
        expected.push((step as i64, loss));
        let scalars = StepScalars {
            loss,
            average_loss: tracker.average().unwrap(),
            lrs: vec![
                (tags::LR_UNET, 1e-4 * step as f64),
                (tags::LR_TEXT_ENCODER, 5e-5),
            ],
            grad_norm: Some(0.5),
            samples_per_sec: Some(2.0),
            tokens_per_sec: None,
        };
        writer.add_scalars(&scalars.tagged(), step).unwrap();
        if step % 5 == 0 {
            let epoch = step / 5;
            let average = tracker.epoch_average().unwrap();
            writer
                .add_scalar(tags::LOSS_EPOCH_AVERAGE, average, epoch)
                .unwrap();
            tracker.start_epoch();
        }
    }
    let image = png(48, 32);
    writer
        .add_image_png("samples/0_a_red_car", &image, 48, 32, 10)
        .unwrap();
    let path = writer.path().to_path_buf();
    writer.close().unwrap();
    (path, expected, image)
}

/// Demo: `run`.
#[test]
fn a_training_run_reads_back() {
    let temp = tempfile::tempdir().unwrap();
    let dir = log_dir(&temp, "run");
    let (path, expected, image) = write_run(&dir);

    let name = path.file_name().unwrap().to_str().unwrap();
    let parts: Vec<&str> = name.splitn(5, '.').collect();
    assert_eq!(&parts[..3], ["events", "out", "tfevents"], "{name}");
    let secs: u64 = parts[3].parse().expect("unix seconds in the name");
    assert!(secs > 1_600_000_000, "{name}");
    assert!(!parts[4].is_empty(), "host name in {name}");
    assert!(event_files(&dir).unwrap().contains(&path));

    let events = read_event_file(&path).unwrap();
    assert_eq!(
        events[0].kind,
        EventKind::FileVersion("brain.Event:2".into())
    );
    assert_eq!(
        (events[1].step, &events[1].kind),
        (1, &EventKind::SessionStart)
    );
    assert_eq!(scalar_series(&events, tags::LOSS_CURRENT), expected);
    let average = scalar_series(&events, tags::LOSS_AVERAGE);
    // Step 7: mean of the losses of steps 3..=7 (window = 5 steps per epoch).
    let window: f32 = (3..=7).map(|s| 1.0 / s as f32).sum::<f32>() / 5.0;
    assert!((average[6].1 - window).abs() < 1e-6, "{average:?}");
    let epochs = scalar_series(&events, tags::LOSS_EPOCH_AVERAGE);
    let second: f32 = (6..=10).map(|s| 1.0 / s as f32).sum::<f32>() / 5.0;
    assert_eq!(epochs.len(), 2);
    assert_eq!(
        epochs[1].0, 2,
        "kohya logs the epoch average at the epoch number"
    );
    assert!((epochs[1].1 - second).abs() < 1e-6);
    let lr = scalar_series(&events, tags::LR_UNET);
    assert!((lr[2].1 - 3e-4).abs() < 1e-9);
    for tag in [
        tags::LR_TEXT_ENCODER,
        tags::GRAD_NORM,
        tags::SAMPLES_PER_SEC,
    ] {
        assert_eq!(scalar_series(&events, tag).len(), 10, "{tag}");
    }

    let images: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Summary(values) => values
                .iter()
                .find(|v| matches!(v.value, Value::Image { .. }))
                .map(|v| (e.step, v.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(images.len(), 1);
    let (step, value) = &images[0];
    assert_eq!((*step, value.tag.as_str()), (10, "samples/0_a_red_car"));
    assert_eq!(
        value.value,
        Value::Image {
            height: 32,
            width: 48,
            colorspace: 3,
            png: image
        }
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(events.iter().all(|e| (now - e.wall_time).abs() < 600.0));
}

#[test]
fn buffered_events_reach_the_file_on_flush() {
    let temp = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(temp.path())
        .unwrap()
        .with_flush_interval(Duration::from_secs(3600));
    writer.add_scalar("loss/current", 0.5, 1).unwrap();
    let before = read_event_file(writer.path()).unwrap();
    assert_eq!(
        before.len(),
        2,
        "only the file version and session start before a flush"
    );
    writer.flush().unwrap();
    let after = read_event_file(writer.path()).unwrap();
    assert_eq!(scalar_series(&after, "loss/current"), [(1, 0.5)]);
    // Dropping the writer saves what is still buffered.
    writer.add_scalar("loss/current", 0.25, 2).unwrap();
    let path = writer.path().to_path_buf();
    drop(writer);
    let last = read_event_file(&path).unwrap();
    assert_eq!(scalar_series(&last, "loss/current"), [(1, 0.5), (2, 0.25)]);
}

/// Demo: `resumed`. A run logs steps 1..=10 (loss 1.0), is resumed from its step-5 checkpoint
/// and logs steps 6..=8 (loss 2.0): TensorBoard must show 1..=5 at 1.0 and 6..=8 at 2.0 (the
/// second file's session start at step 6 tells it to drop the first file's steps 6..=10).
#[test]
fn a_resumed_run_writes_a_new_file_that_starts_with_a_session_start() {
    let temp = tempfile::tempdir().unwrap();
    let dir = log_dir(&temp, "resumed");
    let mut first = EventWriter::create(&dir).unwrap();
    for step in 1..=10 {
        first.add_scalar(tags::LOSS_CURRENT, 1.0, step).unwrap();
    }
    let first_path = first.path().to_path_buf();
    first.close().unwrap();
    let mut second = EventWriter::create_resumed(&dir, 5).unwrap();
    for step in 6..=8 {
        second.add_scalar(tags::LOSS_CURRENT, 2.0, step).unwrap();
    }
    let second_path = second.path().to_path_buf();
    second.close().unwrap();

    assert_ne!(first_path, second_path, "never the same file");
    assert_eq!(
        event_files(&dir).unwrap(),
        [first_path, second_path.clone()]
    );
    let events = read_event_file(&second_path).unwrap();
    assert_eq!(
        (events[1].step, &events[1].kind),
        (6, &EventKind::SessionStart)
    );
    assert_eq!(
        scalar_series(&events, tags::LOSS_CURRENT),
        [(6, 2.0), (7, 2.0), (8, 2.0)]
    );
}

#[test]
fn bad_images_and_unusable_log_dirs_are_errors_not_panics() {
    let temp = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(temp.path()).unwrap();
    let err = writer
        .add_image_png("samples/x", b"not a png", 8, 8, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("image `samples/x` not logged") && err.contains("not a PNG"),
        "{err}"
    );
    let err = writer
        .add_image_png("samples/x", &png(16, 8), 8, 16, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the PNG is 16×8 pixels, but 8×16 was given"),
        "{err}"
    );
    writer.close().unwrap();

    let file = temp.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let err = EventWriter::create(&file).unwrap_err();
    assert_eq!(err.exit_code(), 1);
    let text = err.to_string();
    assert!(text.contains("plain-file"), "{text}");
    assert!(
        text.contains("cannot create the TensorBoard log directory"),
        "{text}"
    );
}

#[test]
fn a_damaged_file_is_reported_with_the_record() {
    let temp = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(temp.path()).unwrap();
    writer.add_scalar("loss/current", 0.5, 1).unwrap();
    let path = writer.path().to_path_buf();
    writer.close().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let err = read_event_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("record 2") && err.contains("checksum"),
        "{err}"
    );
}
