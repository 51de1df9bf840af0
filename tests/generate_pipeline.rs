//! The whole text-to-image loop against diffusers' `StableDiffusionPipeline` on the tiny model
//! (same prompt, negative prompt, guidance, starting latents and ancestral noise), and a seed
//! reproducing its picture. Fixture: `tools/make_sampler_fixtures.py`.

mod generate_support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use generate_support::*;
use lora_trainer::generate::pipeline::ImageRequest;
use lora_trainer::generate::samplers::{SamplerKind, StepNoise};
use lora_trainer::Result;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    prompt: String,
    negative_prompt: String,
    steps: usize,
    cfg: f64,
    width: usize,
    height: usize,
}

struct Recorded(Option<Tensor>);

impl StepNoise for Recorded {
    fn noise(&mut self, step: usize, like: &Tensor) -> Result<Tensor> {
        let all = self.0.as_ref().expect("only Euler ancestral draws noise");
        Ok(all.get(step)?.reshape(like.shape())?)
    }
}

fn reference() -> (HashMap<String, Tensor>, Reference) {
    let path = fixture("samplers/pipeline_tiny_sd1.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: Reference =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["pipeline"]).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    (tensors, meta)
}

#[test]
fn every_sampler_matches_the_diffusers_pipeline() {
    let (tensors, meta) = reference();
    let ckpt = tiny();
    let ((), _) = with_pipeline(&ckpt, &[], false, |pipeline| {
        for sampler in SamplerKind::ALL {
            let request = ImageRequest {
                prompt: meta.prompt.clone(),
                negative_prompt: meta.negative_prompt.clone(),
                width: meta.width,
                height: meta.height,
                steps: meta.steps,
                cfg_scale: meta.cfg,
                seed: 0,
                sampler,
            };
            let mut noise = Recorded(tensors.get("euler_a.noise").cloned());
            let latents =
                pipeline.denoise_from(&tensors["latents"], &request, &mut noise, &mut |_, _| {})?;
            let expected = &tensors[&format!("{sampler}.latents")];
            let diff = relative_difference(&latents, expected);
            assert!(diff < 1e-4, "{sampler}: latents differ by {diff:e}");
            let image = pipeline.decode_latents(&latents)?;
            let expected = &tensors[&format!("{sampler}.image")];
            let diff = relative_difference(&image, expected);
            assert!(diff < 1e-4, "{sampler}: decoded image differs by {diff:e}");
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_seed_reproduces_its_picture_and_another_seed_does_not() {
    let ckpt = tiny();
    let ((a, b, c), _) = with_pipeline(&ckpt, &[], false, |p| {
        let r = request(1234, SamplerKind::EulerAncestral);
        let a = p.generate(&r, &mut |_, _| {})?;
        let b = p.generate(&r, &mut |_, _| {})?;
        let c = p.generate(&ImageRequest { seed: 1235, ..r }, &mut |_, _| {})?;
        Ok((a, b, c))
    })
    .unwrap();
    assert_eq!((a.width(), a.height()), (64, 64));
    assert_eq!(a, b, "same seed, same picture");
    assert_ne!(a, c, "another seed, another picture");
}

#[test]
fn without_guidance_the_negative_prompt_is_not_used() {
    let ckpt = tiny();
    let ((a, b, guided), _) = with_pipeline(&ckpt, &[], false, |p| {
        let r = ImageRequest {
            cfg_scale: 1.0,
            ..request(9, SamplerKind::Ddim)
        };
        let a = p.denoise(&r, &mut |_, _| {})?;
        let b = p.denoise(
            &ImageRequest {
                negative_prompt: "something else entirely".into(),
                ..r.clone()
            },
            &mut |_, _| {},
        )?;
        let guided = p.denoise(
            &ImageRequest {
                cfg_scale: 7.5,
                ..r
            },
            &mut |_, _| {},
        )?;
        Ok((a, b, guided))
    })
    .unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(relative_difference(&guided, &a) > 1e-3);
}

#[test]
fn sizes_that_the_model_cannot_draw_are_refused_with_a_fix() {
    let ckpt = tiny();
    let (err, _) = with_pipeline(&ckpt, &[], false, |p| {
        Ok(p.check_size(100, 64).unwrap_err())
    })
    .unwrap();
    assert_eq!(err.exit_code(), 2);
    assert_eq!(
        err.to_string(),
        "--width: 100 is not a multiple of 8; use for example 96"
    );
}

#[test]
fn a_single_file_checkpoint_draws_the_folder_picture() {
    // Same weights in the LDM layout, same sampling schedule: the same latents.
    let folder = tiny();
    let options = lora_trainer::models::load::LoadOptions {
        tokenizer: Some(fixture("tiny-sd1/tokenizer").display().to_string()),
        ..Default::default()
    };
    let file = lora_trainer::models::load::BaseModel::open_path(
        fixture("tiny-sd1.safetensors").to_str().unwrap(),
        &options,
    )
    .unwrap();
    let r = request(21, SamplerKind::DpmPp2m);
    let render = |ckpt: &lora_trainer::models::load::BaseModel| {
        with_pipeline(ckpt, &[], false, |p| {
            let schedule = schedule(&folder);
            let p = lora_trainer::generate::pipeline::Pipeline {
                schedule: &schedule,
                device: p.device.clone(),
                ..*p
            };
            p.denoise(&r, &mut |_, _| {})
        })
        .unwrap()
        .0
    };
    let diff = relative_difference(&render(&file), &render(&folder));
    assert!(diff < 1e-5, "single file vs folder: {diff:e}");
}

/// The tiny SDXL folder against one `StableDiffusionXLPipeline` run (DDIM from the folder's
/// scheduler config, prompt and negative prompt through both tokenizers and encoders, the pooled
/// output and the size numbers of a 32×32 picture): the same picture.
#[test]
fn the_sdxl_pipeline_matches_diffusers() {
    sdxl_pipeline_matches("blurry", "pipeline.image");
}

/// Without a negative prompt SDXL guides away from zero text conditioning (diffusers'
/// `force_zeros_for_empty_prompt`, A1111's `force_zero_negative_prompt`), not from the encoded
/// empty string: the same picture as diffusers'.
#[test]
fn without_a_negative_prompt_sdxl_guides_away_from_zeros_as_diffusers_does() {
    sdxl_pipeline_matches("", "pipeline.image_no_negative");
}

fn sdxl_pipeline_matches(negative: &str, image_key: &str) {
    use lora_trainer::generate::pipeline::Pipeline;
    use lora_trainer::generate::schedule::{SamplerConfig, SamplingSchedule};
    use lora_trainer::models::load::{BaseModel, LoadOptions};

    let reference =
        candle_core::safetensors::load(fixture("tiny-sdxl.reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ckpt = BaseModel::open_path(
        fixture("tiny-sdxl").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let text_encoders = ckpt.text_encoders(&[], 1).unwrap();
    // Both tokenizers give the ids diffusers' gave.
    for (i, key) in ["pipeline.ids1", "pipeline.ids2"].into_iter().enumerate() {
        let ids = text_encoders.encoders[i]
            .tokenizer
            .encode("a cyberpunk city at night, neon lights")
            .unwrap();
        let expected: Vec<i64> = reference[key].flatten_all().unwrap().to_vec1().unwrap();
        let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        assert_eq!(ids, expected, "{key}");
    }
    let unet = ckpt.unet(None).unwrap();
    let vae = ckpt.vae().unwrap();
    let keys =
        SamplerConfig::from_file(&fixture("tiny-sdxl/scheduler/scheduler_config.json")).unwrap();
    let schedule = SamplingSchedule::new(ckpt.noise_schedule(), keys);
    let pipeline = Pipeline {
        unet: &unet,
        text_encoders: &text_encoders,
        vae: &vae,
        schedule: &schedule,
        device: Device::Cpu,
    };
    let request = ImageRequest {
        prompt: "a cyberpunk city at night, neon lights".to_string(),
        negative_prompt: negative.to_string(),
        width: 32,
        height: 32,
        steps: 2,
        cfg_scale: 5.0,
        seed: 0,
        sampler: SamplerKind::Ddim,
    };
    let latents = pipeline
        .denoise_from(
            &reference["pipeline.latents"],
            &request,
            &mut Recorded(None),
            &mut |_, _| {},
        )
        .unwrap();
    let image = pipeline.decode_latents(&latents).unwrap();
    // diffusers' "pt" output: (x / 2 + 0.5) clamped to [0, 1].
    let image = ((image / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let diff = relative_difference(&image, &reference[image_key]);
    assert!(
        diff < 1e-4,
        "the SDXL picture differs by {diff:e} ({image_key})"
    );
}
