//! Parity with diffusers: our UNet2DConditionModel, loaded from the tiny diffusers folders in
//! `tests/fixtures/`, must reproduce diffusers' output and every top-level module's output for
//! the same inputs (`tests/fixtures/tiny-sd*.reference.safetensors`, made by
//! `tools/make_fixtures.py`; the SDXL-structured one by `tools/make_sdxl_fixtures.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_trainer::models::unet::{TextTimeInputs, UNet2DConditionModel, UNetConfig};
use lora_trainer::nn::weights::TensorSource;
use lora_trainer::nn::{Scope, WeightStore};

fn fixture(path: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    assert!(
        p.exists(),
        "missing fixture {} (made by tools/make_fixtures.py)",
        p.display()
    );
    p
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_dtype(DType::F64))
        .and_then(|m| m.to_scalar::<f64>())
        .unwrap_or(f64::NAN)
}

/// max |got − want| / max |want|.
fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&diff) / max_abs(want)
}

fn check_unet(variant: &str) {
    let dir = fixture(&format!("{variant}/unet"));
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let source =
        TensorSource::safetensors(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let store = WeightStore::from_source(source, DType::F32, Device::Cpu);
    let unet = UNet2DConditionModel::new(Scope::root(&store), &config).unwrap();
    store.check_all_used().unwrap();

    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture(&format!("{variant}.reference.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let get = |k: &str| {
        refs.get(k)
            .unwrap_or_else(|| panic!("{variant}: reference tensor `{k}` missing"))
            .clone()
    };
    let timesteps = get("unet.timesteps");
    let mut hooks: Vec<(String, Tensor)> = Vec::new();
    // SDXL's added conditioning, when the fixture has it.
    let added = refs
        .contains_key("unet.text_embeds")
        .then(|| TextTimeInputs {
            text_embeds: get("unet.text_embeds"),
            time_ids: get("unet.time_ids"),
        });
    let out = unet
        .forward_with(
            &get("unet.sample"),
            &timesteps,
            &get("unet.encoder_hidden_states"),
            added.as_ref(),
            &mut |name, t| {
                hooks.push((name.to_string(), t.clone()));
                Ok(())
            },
        )
        .unwrap();

    let err = relative_error(&out, &get("unet.out"));
    eprintln!("{variant}: unet.out relative error {err:.2e}");
    assert!(
        err <= 1e-3,
        "{variant}: unet.out differs from diffusers by {err:.2e} of its scale"
    );

    let expected_hooks: Vec<&String> = refs
        .keys()
        .filter(|k| k.starts_with("unet.hook."))
        .collect();
    assert!(
        !expected_hooks.is_empty(),
        "{variant}: no unet.hook.* references"
    );
    for key in expected_hooks {
        let name = &key["unet.hook.".len()..];
        let (_, got) = hooks
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{variant}: our UNet has no module `{name}`"));
        let err = relative_error(got, &get(key));
        eprintln!("{variant}: {name} relative error {err:.2e}");
        assert!(
            err <= 1e-4,
            "{variant}: {name} differs from diffusers by {err:.2e} of its scale"
        );
    }
}

#[test]
fn tiny_sd1_unet_matches_diffusers() {
    check_unet("tiny-sd1");
}

#[test]
fn tiny_sd2_unet_matches_diffusers() {
    check_unet("tiny-sd2");
}

/// The same model in f16 (as training on a GPU runs it): the attention upcast and the f32
/// statistics of the norms keep it within half-precision rounding of diffusers' f32 output.
fn check_unet_f16(variant: &str) {
    let dir = fixture(&format!("{variant}/unet"));
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let source =
        TensorSource::safetensors(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let store = WeightStore::from_source(source, DType::F16, Device::Cpu);
    let unet = UNet2DConditionModel::new(Scope::root(&store), &config).unwrap();
    let refs: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture(&format!("{variant}.reference.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let out = unet
        .forward(
            &refs["unet.sample"],
            &refs["unet.timesteps"],
            &refs["unet.encoder_hidden_states"],
        )
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let err = relative_error(&out, &refs["unet.out"]);
    eprintln!("{variant}: f16 unet.out relative error {err:.2e}");
    assert!(
        err <= 1e-2,
        "{variant}: the f16 UNet differs from diffusers by {err:.2e} of its scale"
    );
}

#[test]
fn tiny_unets_in_half_precision_stay_close_to_diffusers() {
    check_unet_f16("tiny-sd1");
    check_unet_f16("tiny-sd2");
}

/// SDXL's structure at toy size: no attention at the first level, two transformer layers at the
/// last, linear projections, and `add_embedding` fed the pooled text and six time ids.
#[test]
fn tiny_sdxl_unet_matches_diffusers() {
    check_unet("tiny-sdxl");
}

/// The SDXL UNet refuses to run without its added conditioning, and an SD UNet refuses it.
#[test]
fn added_conditioning_is_required_exactly_by_the_unet_that_has_it() {
    let load = |variant: &str| {
        let dir = fixture(&format!("{variant}/unet"));
        let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
        let source =
            TensorSource::safetensors(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        let store = WeightStore::from_source(source, DType::F32, Device::Cpu);
        UNet2DConditionModel::new(Scope::root(&store), &config).unwrap()
    };
    let (sdxl, sd1) = (load("tiny-sdxl"), load("tiny-sd1"));
    let dev = Device::Cpu;
    let sample = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[10u32], &dev).unwrap();
    let ehs = |width: usize| Tensor::zeros((1, 3, width), DType::F32, &dev).unwrap();
    let err = sdxl.forward(&sample, &t, &ehs(24)).unwrap_err().to_string();
    assert!(err.contains("add_time_ids"), "{err}");
    let added = TextTimeInputs {
        text_embeds: Tensor::zeros((1, 16), DType::F32, &dev).unwrap(),
        time_ids: Tensor::zeros((1, 6), DType::F32, &dev).unwrap(),
    };
    let width = sd1.config().cross_attention_dim[0];
    let err = sd1
        .forward_with(&sample, &t, &ehs(width), Some(&added), &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("only SDXL"), "{err}");
    let wrong_rows = TextTimeInputs {
        text_embeds: Tensor::zeros((2, 16), DType::F32, &dev).unwrap(),
        ..added
    };
    let err = sdxl
        .forward_with(&sample, &t, &ehs(24), Some(&wrong_rows), &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("one per sample"), "{err}");
}

/// SDXL's conditioning end to end on the tiny fixtures: both text encoders' penultimate states
/// joined, the second one's projected pooled output and the size numbers, into the UNet, against
/// the same composition in diffusers (`step.out`).
#[test]
fn tiny_sdxl_conditioning_from_both_encoders_drives_the_unet_as_in_diffusers() {
    use lora_trainer::models::clip_text::{ClipTextConfig, ClipTextModel};
    use lora_trainer::models::clip_text_projection::ClipTextModelWithProjection;
    use lora_trainer::models::conditioning::{
        ConditioningRule, TextEncoder, TextEncoders, TextModel,
    };
    use lora_trainer::models::tokenizer::ClipTokenizer;

    let refs: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("tiny-sdxl.reference.safetensors"), &Device::Cpu)
            .unwrap();
    let get = |k: &str| {
        refs.get(k)
            .unwrap_or_else(|| panic!("`{k}` missing"))
            .clone()
    };
    let store = |path: &str| {
        let source = TensorSource::safetensors(&fixture(path)).unwrap();
        WeightStore::from_source(source, DType::F32, Device::Cpu)
    };
    let text_config = |folder: &str| {
        ClipTextConfig::from_file(&fixture(&format!("tiny-sdxl/{folder}/config.json"))).unwrap()
    };
    // The ids are given directly; the tokenizers are not used (the tiny models have none).
    let tokenizer = || ClipTokenizer::from_dir(&fixture("tiny-sd1/tokenizer")).unwrap();
    let te1_store = store("tiny-sdxl/text_encoder/model.safetensors");
    let te2_store = store("tiny-sdxl/text_encoder_2/model.safetensors");
    let encoders = TextEncoders {
        encoders: vec![
            TextEncoder {
                tokenizer: tokenizer(),
                model: TextModel::Clip(
                    ClipTextModel::new(Scope::root(&te1_store), &text_config("text_encoder"))
                        .unwrap(),
                ),
            },
            TextEncoder {
                tokenizer: tokenizer(),
                model: TextModel::WithProjection(
                    ClipTextModelWithProjection::new(
                        Scope::root(&te2_store),
                        &text_config("text_encoder_2"),
                    )
                    .unwrap(),
                ),
            },
        ],
        rule: ConditioningRule::PenultimateAndPooled,
    };
    let ids = get("text.input_ids");
    let conditioning = encoders.encode_ids(&[ids.clone(), ids]).unwrap();
    let pooled = conditioning
        .pooled
        .clone()
        .expect("SDXL conditioning has a pooled output");

    let dir = fixture("tiny-sdxl/unet");
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let unet_store = store("tiny-sdxl/unet/diffusion_pytorch_model.safetensors");
    let unet = UNet2DConditionModel::new(Scope::root(&unet_store), &config).unwrap();
    let added = TextTimeInputs {
        text_embeds: pooled,
        time_ids: get("unet.time_ids"),
    };
    let out = unet
        .forward_with(
            &get("unet.sample"),
            &get("unet.timesteps"),
            &conditioning.context,
            Some(&added),
            &mut |_, _| Ok(()),
        )
        .unwrap();
    let err = relative_error(&out, &get("step.out"));
    assert!(err <= 1e-4, "step.out differs from diffusers by {err:.2e}");

    // Read with SD's rule (clip skip, final layer norm, no pooled output), the same encoders
    // give another context and no pooled output: the rule is what decides.
    let sd_rule = TextEncoders {
        rule: ConditioningRule::ClipSkip(2),
        ..encoders
    };
    let ids = get("text.input_ids");
    let other = sd_rule.encode_ids(&[ids.clone(), ids]).unwrap();
    assert!(other.pooled.is_none());
    assert!(relative_error(&other.context, &conditioning.context) > 1e-2);
}
