//! auto_label's models and preprocessing against transformers (tests/fixtures/clip, made by
//! tools/make_clip_fixtures.py): CLIP embeddings, the tokenizer, `CLIPImageProcessor` pixels
//! (the tiny model's 32 px and the default 224 px geometry), and BLIP logits and captions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use lora_trainer::dataset::{decode_oriented, to_rgb_on_white};
use lora_trainer::label::blip::BlipCaptioner;
use lora_trainer::label::preprocess::ImageProcessor;
use lora_trainer::label::scorer::ClipScorer;
use lora_trainer::models::clip_model::{unit_length, ClipModel};
use lora_trainer::models::tokenizer::ClipTokenizer;

const IMAGES: [&str; 3] = ["landscape", "portrait", "large"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors")
}

fn reference_metadata(key: &str) -> String {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).expect("read");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    meta.metadata()
        .as_ref()
        .and_then(|m| m.get(key).cloned())
        .unwrap_or_else(|| panic!("no metadata {key}"))
}

fn picture(name: &str) -> RgbImage {
    let path = fixtures().join("images").join(format!("{name}.png"));
    to_rgb_on_white(decode_oriented(&path).expect("decodes"))
}

fn get(reference: &HashMap<String, Tensor>, key: &str) -> Tensor {
    reference
        .get(key)
        .unwrap_or_else(|| panic!("reference has no {key}"))
        .clone()
}

/// Largest |a − b|, and the largest |b| (the scale the tolerance is relative to).
fn diff_and_scale(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let scale = b.abs().unwrap().max(0).unwrap();
    (
        diff.to_scalar::<f32>().unwrap(),
        scale.to_scalar::<f32>().unwrap(),
    )
}

fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor, tolerance: f32) {
    let (diff, scale) = diff_and_scale(ours, theirs);
    assert!(
        diff <= tolerance * scale.max(1.0),
        "{what}: max |diff| {diff} (scale {scale})"
    );
}

#[test]
fn clip_embeddings_match_transformers() {
    let r = reference();
    let folder = fixtures().join("tiny-clip");
    let model = ClipModel::from_folder(&folder, DType::F32, &Device::Cpu).expect("loads");
    let ids = get(&r, "clip.input_ids");
    let pixels = get(&r, "clip.pixel_values");

    let text_features = model.text_features(&ids).unwrap();
    assert_close(
        "text features",
        &text_features,
        &get(&r, "clip.text_features"),
        1e-4,
    );
    let text_embeds = model.text_embeds(&ids).unwrap();
    assert_close(
        "text embeds",
        &text_embeds,
        &get(&r, "clip.text_embeds"),
        1e-4,
    );

    let image_features = model.image_features(&pixels).unwrap();
    assert_close(
        "image features",
        &image_features,
        &get(&r, "clip.image_features"),
        1e-4,
    );
    let image_embeds = model.image_embeds(&pixels).unwrap();
    assert_close(
        "image embeds",
        &image_embeds,
        &get(&r, "clip.image_embeds"),
        1e-4,
    );

    let logits =
        (image_embeds.matmul(&text_embeds.t().unwrap()).unwrap() * model.logit_scale()).unwrap();
    assert_close(
        "logits per image",
        &logits,
        &get(&r, "clip.logits_per_image"),
        1e-4,
    );
    // The embeddings have unit length and the test could tell a wrong one apart.
    let norms = unit_length(&image_features)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap();
    assert!(norms
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|n| (n - 1.0).abs() < 1e-5));
    let (diff, _) = diff_and_scale(&text_embeds.i(0).unwrap(), &text_embeds.i(1).unwrap());
    assert!(diff > 1e-2, "different phrases give different embeddings");
}

#[test]
fn our_tokenizer_gives_transformers_ids_including_truncation() {
    let r = reference();
    let phrases: Vec<String> = serde_json::from_str(&reference_metadata("phrases")).expect("json");
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-clip")).expect("tokenizer");
    let ours = tokenizer.input_ids(&phrases, &Device::Cpu).unwrap();
    let theirs = get(&r, "clip.input_ids").to_dtype(DType::U32).unwrap();
    assert_eq!(
        ours.to_vec2::<u32>().unwrap(),
        theirs.to_vec2::<u32>().unwrap()
    );
}

#[test]
fn tiny_model_pixels_match_clip_image_processor() {
    let r = reference();
    let scorer =
        ClipScorer::from_folder(&fixtures().join("tiny-clip"), &Device::Cpu).expect("loads");
    let theirs = get(&r, "clip.pixel_values");
    for (i, name) in IMAGES.iter().enumerate() {
        let ours = scorer.pixel_values(&picture(name)).unwrap();
        let (diff, _) = diff_and_scale(&ours, &theirs.i(i).unwrap());
        assert!(diff < 1e-5, "{name}: max |diff| {diff}");
    }
}

#[test]
fn default_224_geometry_and_pixels_match_clip_image_processor() {
    let r = reference();
    let processor = ImageProcessor::clip_default();
    for name in IMAGES {
        let image = picture(name);
        let resized = get(&r, &format!("default224.{name}.resized"))
            .to_vec1::<i64>()
            .unwrap();
        let (w, h) = processor.resized_size(image.width(), image.height());
        assert_eq!(
            [h as i64, w as i64],
            resized[..],
            "{name}: size after the resize"
        );

        let crop = processor.resize_and_crop(&image);
        assert_eq!(crop.dimensions(), (224, 224));
        let hwc = Tensor::from_vec(crop.as_raw().clone(), (224, 224, 3), &Device::Cpu).unwrap();
        let every_4th = hwc
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((56, 4, 56, 4, 3))
            .unwrap()
            .i((.., 0, .., 0, ..))
            .unwrap();
        let theirs = get(&r, &format!("default224.{name}.crop"))
            .to_dtype(DType::F32)
            .unwrap();
        let (diff, _) = diff_and_scale(&every_4th, &theirs);
        assert_eq!(diff, 0.0, "{name}: uint8 pixels after resize + crop");
        for (key, ours) in [
            ("row", hwc.i(112).unwrap()),
            ("column", hwc.i((.., 112)).unwrap()),
        ] {
            let theirs = get(&r, &format!("default224.{name}.{key}"))
                .to_dtype(DType::F32)
                .unwrap();
            let (diff, _) = diff_and_scale(&ours.to_dtype(DType::F32).unwrap(), &theirs);
            assert_eq!(diff, 0.0, "{name}: middle {key}");
        }

        let pixels = processor.pixel_values(&image, &Device::Cpu).unwrap();
        let every_8th = pixels
            .reshape((3, 28, 8, 28, 8))
            .unwrap()
            .i((.., .., 0, .., 0))
            .unwrap();
        let theirs = get(&r, &format!("default224.{name}.pixel_values"));
        let (diff, _) = diff_and_scale(&every_8th, &theirs);
        assert!(diff < 1e-5, "{name}: normalised pixels, max |diff| {diff}");
    }
}

#[test]
fn blip_logits_and_greedy_captions_match_transformers() {
    let r = reference();
    let mut blip =
        BlipCaptioner::from_folder(&fixtures().join("tiny-blip"), &Device::Cpu).expect("loads");
    let theirs = get(&r, "blip.pixel_values");
    for (i, name) in IMAGES.iter().enumerate() {
        let ours = blip.pixel_values(&picture(name)).unwrap();
        let (diff, _) = diff_and_scale(&ours, &theirs.i(i).unwrap());
        assert!(diff < 1e-5, "{name}: BLIP pixels, max |diff| {diff}");
    }

    let embeds = blip.image_embeds(&theirs.narrow(0, 0, 1).unwrap()).unwrap();
    let prefix = get(&r, "blip.prefix").to_dtype(DType::U32).unwrap();
    let logits = blip.logits(&embeds, &prefix).unwrap();
    assert_close(
        "BLIP decoder logits",
        &logits,
        &get(&r, "blip.logits"),
        1e-4,
    );

    let generated = blip.generate_ids(&theirs, 12).unwrap();
    let expected: Vec<Vec<u32>> = get(&r, "blip.generated")
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| {
            // transformers' rows: [DEC], tokens..., [SEP], then -1 padding from the script.
            row.into_iter()
                .skip(1)
                .take_while(|&t| t >= 0 && t != 3)
                .map(|t| t as u32)
                .collect()
        })
        .collect();
    assert_eq!(generated, expected);

    let captions: Vec<String> =
        serde_json::from_str(&reference_metadata("blip.captions")).expect("json");
    blip.set_max_new_tokens(12);
    assert_eq!(blip.captions(&theirs).unwrap(), captions);
}
