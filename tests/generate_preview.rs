//! Preview pictures during training: kohya's prompt-file syntax, files named by run, step,
//! prompt and seed, fixed seeds across steps, and TensorBoard image events that read back.

mod generate_support;

use generate_support::*;
use lora_trainer::generate::png_info::{parse_infotext, read_parameters};
use lora_trainer::generate::preview::{render_previews, PreviewSettings, SamplePrompt};
use lora_trainer::generate::samplers::SamplerKind;
use lora_trainer::log::event::{EventKind, Value};
use lora_trainer::log::event_reader::{event_files, read_event_file};
use lora_trainer::log::EventWriter;

#[test]
fn previews_are_files_and_tensorboard_images_with_fixed_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let prompts_file = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts_file,
        "# previews\na red cube --n blurry --w 64 --h 64 --d 5 --s 2 --l 6\n\
         a blue sphere --w 70 --h 64 --s 2 --ss ddim\n",
    )
    .unwrap();
    let prompts = SamplePrompt::read_file(&prompts_file).unwrap();
    assert_eq!(prompts.len(), 2);
    let settings = PreviewSettings {
        output_dir: dir.path().join("run"),
        output_name: "demo".to_string(),
        sampler: SamplerKind::EulerAncestral,
        seed: 1000,
        model_name: Some("tiny-sd1".to_string()),
    };
    let logs = dir.path().join("run/logs");
    let ckpt = tiny();
    let ((first, second), _) = with_pipeline(&ckpt, &[], false, |p| {
        let mut writer = EventWriter::create(&logs)?;
        let first = render_previews(p, &prompts, &settings, 10, Some(&mut writer))?;
        let second = render_previews(p, &prompts, &settings, 20, Some(&mut writer))?;
        writer.close()?;
        Ok((first, second))
    })
    .unwrap();

    let samples = dir.path().join("run/samples");
    assert_eq!(
        first,
        vec![
            samples.join("demo_000010_00_5.png"),
            samples.join("demo_000010_01_1001.png"),
        ]
    );
    assert_eq!(second[1], samples.join("demo_000020_01_1001.png"));
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8();
    // Same models, same prompt, same seed: the same picture at every step.
    assert_eq!(pixels(&first[0]), pixels(&second[0]));
    assert_ne!(pixels(&first[0]), pixels(&first[1]));
    // 70 px is rounded down to the model's multiple, as kohya does.
    assert_eq!(pixels(&first[1]).dimensions(), (64, 64));

    let text = read_parameters(&std::fs::read(&first[0]).unwrap())
        .unwrap()
        .unwrap();
    let info = parse_infotext(&text);
    assert_eq!(info.prompt, "a red cube");
    assert_eq!(info.negative_prompt, "blurry");
    assert_eq!(info.get("Seed"), Some("5"));
    assert_eq!(info.get("CFG scale"), Some("6.0"));
    assert_eq!(info.get("Sampler"), Some("Euler a"));
    let info = parse_infotext(
        &read_parameters(&std::fs::read(&first[1]).unwrap())
            .unwrap()
            .unwrap(),
    );
    assert_eq!(info.get("Sampler"), Some("DDIM"));

    // TensorBoard: one image event per prompt and step, whose PNG is the file's picture.
    let files = event_files(&logs).unwrap();
    assert_eq!(files.len(), 1);
    let mut images = Vec::new();
    for event in read_event_file(&files[0]).unwrap() {
        if let EventKind::Summary(values) = event.kind {
            for v in values {
                if let Value::Image {
                    width, height, png, ..
                } = v.value
                {
                    images.push((event.step, v.tag, width, height, png));
                }
            }
        }
    }
    let tags: Vec<(i64, &str)> = images.iter().map(|i| (i.0, i.1.as_str())).collect();
    assert_eq!(
        tags,
        vec![
            (10, "samples/00"),
            (10, "samples/01"),
            (20, "samples/00"),
            (20, "samples/01")
        ]
    );
    let (_, _, w, h, png) = &images[1];
    assert_eq!((*w, *h), (64, 64));
    assert_eq!(
        image::load_from_memory(png).unwrap().to_rgb8(),
        pixels(&first[1])
    );

    // For `tools/read_tb_events.py DIR` (TensorBoard's own readers), as log_tensorboard does.
    if let Some(keep) = std::env::var_os("LORA_TRAINER_PREVIEW_DEMO_DIR") {
        let keep = std::path::PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&files[0], keep.join(files[0].file_name().unwrap())).unwrap();
    }
}
