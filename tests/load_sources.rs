//! Every kind of base model loads, on the tiny fixtures and the demo model: diffusers folders
//! (f32, fp16 variant), single files with and without their LDM yaml, the `.ckpt`, SD 1.x and
//! SD 2.x. A single file and the folder holding the same weights give bit-identical outputs for
//! every component (the conversion is exact), and the outputs equal diffusers' references.

mod load_support;

use load_support::*;
use lora_trainer::models::family::ModelFamily;
use lora_trainer::models::load::LoadOptions;
use lora_trainer::models::noise::PredictionType;

fn with_tokenizer(folder: &str) -> LoadOptions {
    LoadOptions {
        tokenizer: Some(fixture(folder).display().to_string()),
        ..offline_options()
    }
}

#[test]
fn tiny_sd1_folder_matches_the_references() {
    let refs = references("tiny-sd1");
    let ckpt = open(&fixture("tiny-sd1"), &offline_options());
    assert_eq!(ckpt.family(), ModelFamily::Sd1);
    assert_eq!(
        ckpt.architecture().to_string(),
        "SD 1.x-style, cross-attention width 64"
    );
    let ours = outputs(&ckpt, &refs);
    assert_matches_references(&ours, &refs);
    assert_close("pooled", &ours.pooled, &refs["text.pooler_output"], 1e-5);
    // The folder's own tokenizer gives the references' ids.
    let tokenizer = ckpt.tokenizer().unwrap();
    let ids = tokenizer
        .input_ids(
            &[
                "a photo of an astronaut riding a horse",
                "a cyberpunk city at night, neon lights, (rain:1.2), it's wet",
            ],
            &candle_core::Device::Cpu,
        )
        .unwrap();
    assert_identical(
        "input ids",
        &ids.to_dtype(candle_core::DType::F32).unwrap(),
        &refs["text.input_ids"]
            .to_dtype(candle_core::DType::F32)
            .unwrap(),
    );
    assert_close(
        "alphas_cumprod",
        &candle_core::Tensor::new(
            ckpt.noise_schedule().alphas_cumprod(),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        &refs["noise.alphas_cumprod"],
        0.0,
    );
    assert_eq!(
        ckpt.noise_schedule().prediction_type(),
        PredictionType::Epsilon
    );
    let notes = ckpt.notes().join("\n");
    assert!(notes.contains("OpenAI CLIP text encoder"), "{notes}");
    assert!(
        notes.contains("epsilon (from scheduler/scheduler_config.json)"),
        "{notes}"
    );
    assert!(notes.contains("tiny-sd1/tokenizer"), "{notes}");
}

#[test]
fn tiny_sd1_single_files_equal_the_folder_bit_for_bit() {
    let refs = references("tiny-sd1");
    let folder = outputs(&open(&fixture("tiny-sd1"), &offline_options()), &refs);
    let options = with_tokenizer("tiny-sd1/tokenizer");

    // .safetensors with its yaml.
    let single = open(&fixture("tiny-sd1.safetensors"), &options);
    assert!(
        single
            .notes()
            .iter()
            .any(|n| n == "configs: from tiny-sd1.yaml"),
        "{:?}",
        single.notes()
    );
    assert!(
        single.notes().iter().any(|n| n.contains(
            "skipped 12 DDPM schedule buffer(s), 2 EMA tensor(s) (`model_ema.*`), `position_ids`"
        )),
        "{:?}",
        single.notes()
    );
    assert_all_identical(&outputs(&single, &refs), &folder);
    let folder_ckpt = open(&fixture("tiny-sd1"), &offline_options());
    let mut from_yaml = single.unet_config().clone();
    from_yaml.sample_size = folder_ckpt.unet_config().sample_size;
    assert_eq!(&from_yaml, folder_ckpt.unet_config());

    // The .ckpt (pickle) beside the same yaml.
    let ckpt = open(&fixture("tiny-sd1.ckpt"), &options);
    assert_all_identical(&outputs(&ckpt, &refs), &folder);

    // Without the yaml: every config inferred from the shapes.
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("alone.safetensors");
    std::fs::copy(fixture("tiny-sd1.safetensors"), &alone).unwrap();
    let inferred = open(&alone, &options);
    assert!(inferred
        .notes()
        .iter()
        .any(|n| n.contains("inferred from the tensor shapes, with SD 1.x's conventions")));
    assert_all_identical(&outputs(&inferred, &refs), &folder);
    let mut unet = inferred.unet_config().clone();
    unet.sample_size = folder_ckpt.unet_config().sample_size;
    assert_eq!(&unet, folder_ckpt.unet_config(), "inferred UNet config");
    let mut vae = inferred.vae_config().clone();
    vae.sample_size = folder_ckpt.vae_config().sample_size;
    assert_eq!(&vae, folder_ckpt.vae_config(), "inferred VAE config");
    let (a, b) = (
        inferred.text_encoder_config(),
        folder_ckpt.text_encoder_config(),
    );
    assert_eq!(
        (
            a.vocab_size,
            a.hidden_size,
            a.intermediate_size,
            a.num_hidden_layers
        ),
        (
            b.vocab_size,
            b.hidden_size,
            b.intermediate_size,
            b.num_hidden_layers
        )
    );
    assert_eq!(
        (
            a.num_attention_heads,
            a.max_position_embeddings,
            a.hidden_act
        ),
        (
            b.num_attention_heads,
            b.max_position_embeddings,
            b.hidden_act
        )
    );
    // Pooling at the largest id finds the same EOS as pooling at id 999.
    assert_close(
        "pooled",
        &outputs(&inferred, &refs).pooled,
        &refs["text.pooler_output"],
        1e-5,
    );
    assert!(inferred
        .notes()
        .iter()
        .any(|n| n.contains("prediction type: epsilon (the default)")));
}

#[test]
fn the_fp16_variant_is_read_when_asked() {
    let refs = references("tiny-sd1");
    let options = LoadOptions {
        variant: Some("fp16".to_string()),
        ..offline_options()
    };
    let ckpt = open(&fixture("tiny-sd1"), &options);
    assert!(ckpt
        .unet_weights()
        .describe()
        .ends_with("diffusion_pytorch_model.fp16.safetensors"));
    assert!(ckpt
        .text_encoder_weights()
        .describe()
        .ends_with("model.fp16.safetensors"));
    assert!(ckpt
        .vae_weights()
        .describe()
        .ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let ours = outputs(&ckpt, &refs);
    // f16-rounded weights computed in f32: close to the references, not equal.
    assert_close(
        "text fp16",
        &ours.text,
        &refs["text.last_hidden_state"],
        1e-2,
    );
    assert_close("unet fp16", &ours.unet, &refs["unet.out"], 2e-2);
    assert_close("vae fp16", &ours.decoded, &refs["vae.decoded"], 2e-2);
    let f32_unet = outputs(&open(&fixture("tiny-sd1"), &offline_options()), &refs).unet;
    let differs = (&ours.unet - f32_unet)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        differs.to_scalar::<f32>().unwrap() > 0.0,
        "the fp16 files were not read"
    );

    // A folder holding only the variant uses it without being asked, and says so.
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("tiny-sd1"), dir.path());
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }
    let only = open(dir.path(), &offline_options());
    assert!(only
        .notes()
        .iter()
        .any(|n| n.contains("holds only the `fp16` variant")));
    assert_all_identical(&outputs(&only, &refs), &ours);
}

#[test]
fn tiny_sd2_folder_and_single_file_agree_and_match_the_references() {
    let refs = references("tiny-sd2");
    let folder_ckpt = open(&fixture("tiny-sd2"), &offline_options());
    assert_eq!(folder_ckpt.family(), ModelFamily::Sd2);
    assert_eq!(
        folder_ckpt.noise_schedule().prediction_type(),
        PredictionType::VPrediction
    );
    let folder = outputs(&folder_ckpt, &refs);
    assert_matches_references(&folder, &refs);

    let single = open(
        &fixture("tiny-sd2.safetensors"),
        &with_tokenizer("tiny-sd2/tokenizer"),
    );
    assert_eq!(single.family(), ModelFamily::Sd2);
    assert_eq!(
        single.text_encoder_config().num_hidden_layers,
        3,
        "the last of 4 resblocks is dropped"
    );
    assert_eq!(
        single.noise_schedule().prediction_type(),
        PredictionType::VPrediction,
        "from the yaml's parameterization"
    );
    assert!(single
        .notes()
        .iter()
        .any(|n| n.contains("prediction type: v_prediction (from tiny-sd2.yaml)")));
    assert!(single
        .notes()
        .iter()
        .any(|n| n.contains("OpenCLIP's last block") && n.contains("`text_projection`")));
    assert_all_identical(&outputs(&single, &refs), &folder);
    assert_eq!(single.unet_config().num_attention_heads(), &[2, 2, 2, 4]);
}

#[test]
fn tiny_sd2_without_its_yaml_says_what_cannot_be_inferred() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("sd2.safetensors");
    std::fs::copy(fixture("tiny-sd2.safetensors"), &alone).unwrap();
    let source =
        lora_trainer::models::source::ModelSource::detect(alone.to_str().unwrap()).unwrap();
    let err = lora_trainer::models::load::BaseModel::open(&source, &offline_options())
        .err()
        .expect("heads cannot be inferred")
        .to_string();
    assert!(
        err.contains("64-wide attention heads") && err.contains("sd2.yaml"),
        "{err}"
    );
}

#[test]
fn sd2_single_files_pad_the_bundled_tokenizer_with_an_exclamation_mark() {
    // The tiny SD2's vocabulary is smaller than the bundled tokenizer's: that mismatch is
    // refused, while the pad token shows that SD 2.x's convention was applied.
    let ckpt = open(&fixture("tiny-sd2.safetensors"), &offline_options());
    let notes = ckpt.notes().join("\n");
    assert!(
        notes.contains("bundled CLIP tokenizer, padding with `!`"),
        "{notes}"
    );
    let err = ckpt.tokenizer().unwrap_err().to_string();
    assert!(
        err.contains("49408 tokens") && err.contains("only 1000"),
        "{err}"
    );
}

#[test]
fn the_demo_model_loads_from_its_fp16_files_into_f32() {
    let ckpt = open(&root().join("models/demo-sd"), &offline_options());
    assert_eq!(
        ckpt.architecture().to_string(),
        "SD 1.x-style, cross-attention width 32"
    );
    let tokenizer = ckpt.tokenizer().unwrap();
    let ids = tokenizer
        .input_ids(&["a red apple on a table"], &candle_core::Device::Cpu)
        .unwrap();
    let text = ckpt.text_encoder(None).unwrap().forward(&ids).unwrap();
    assert_eq!(text.dims(), &[1, 77, 32]);
    assert_eq!(text.dtype(), candle_core::DType::F32);
    let latents = candle_core::Tensor::zeros(
        (1, 4, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = candle_core::Tensor::new(&[500i64], &candle_core::Device::Cpu).unwrap();
    let out = ckpt
        .unet(None)
        .unwrap()
        .forward(&latents, &t, &text)
        .unwrap();
    assert_eq!(out.dims(), &[1, 4, 8, 8]);
    let image = ckpt.vae().unwrap().decode(&latents).unwrap();
    assert_eq!(image.dims(), &[1, 3, 64, 64]);
    let finite = out
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(finite.is_finite());
}

#[test]
fn a_vae_override_replaces_the_models_vae() {
    let refs = references("tiny-sd1");
    // The folder's VAE given as a folder, and as the single file (LDM layout, config inferred).
    for vae in [
        fixture("tiny-sd1/vae"),
        fixture("tiny-sd1"),
        fixture("tiny-sd1.safetensors"),
    ] {
        let options = LoadOptions {
            vae: Some(vae.display().to_string()),
            ..offline_options()
        };
        let ckpt = open(&fixture("tiny-sd1"), &options);
        assert!(
            ckpt.notes().iter().any(|n| n.starts_with("VAE: ")),
            "{:?}",
            ckpt.notes()
        );
        let vae_model = ckpt.vae().unwrap();
        let decoded = vae_model.decode(&refs["vae.latent_mean"]).unwrap();
        assert_close("decoded", &decoded, &refs["vae.decoded"], 1e-4);
    }
    // The SD2 VAE is another shape: building the SD1 pipeline with it still works (a VAE is
    // independent), and its weights are the SD2 ones.
    let options = LoadOptions {
        vae: Some(fixture("tiny-sd2/vae").display().to_string()),
        ..offline_options()
    };
    let ckpt = open(&fixture("tiny-sd1"), &options);
    assert_eq!(ckpt.vae_config().block_out_channels, vec![32, 64]);
}

#[test]
fn sharded_weights_and_old_vae_names_load_identically() {
    let refs = references("tiny-sd1");
    let reference = outputs(&open(&fixture("tiny-sd1"), &offline_options()), &refs);
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("tiny-sd1"), dir.path());

    // The UNet in two shards with an index, as `save_pretrained(max_shard_size=...)` writes it.
    let unet = dir.path().join("unet");
    let tensors = candle_core::safetensors::load(
        unet.join("diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut shards = [
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, (key, tensor)) in tensors.into_iter().enumerate() {
        let file = format!(
            "diffusion_pytorch_model-0000{}-of-00002.safetensors",
            i % 2 + 1
        );
        weight_map.insert(key.clone(), serde_json::Value::String(file));
        shards[i % 2].insert(key, tensor);
    }
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        candle_core::safetensors::save(shard, unet.join(file)).unwrap();
    }
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    for file in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ] {
        std::fs::remove_file(unet.join(file)).unwrap();
    }

    // The VAE's mid-block attention under diffusers < 0.14's names.
    let vae = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let renamed: std::collections::HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(&vae, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let k = k
                    .replace(".attentions.0.to_q.", ".attentions.0.query.")
                    .replace(".attentions.0.to_out.0.", ".attentions.0.proj_attn.");
                (k, t)
            })
            .collect();
    assert!(renamed.keys().any(|k| k.contains(".proj_attn.")));
    candle_core::safetensors::save(&renamed, &vae).unwrap();

    let ckpt = open(dir.path(), &offline_options());
    assert_eq!(ckpt.unet_weights().sources().len(), 2);
    assert_all_identical(&outputs(&ckpt, &refs), &reference);
}

#[test]
fn the_prediction_type_can_be_overridden() {
    let options = LoadOptions {
        prediction_type: Some(PredictionType::Epsilon),
        ..offline_options()
    };
    let ckpt = open(&fixture("tiny-sd2"), &options);
    assert_eq!(
        ckpt.noise_schedule().prediction_type(),
        PredictionType::Epsilon
    );
    assert!(ckpt
        .notes()
        .iter()
        .any(|n| n == "prediction type: epsilon (set in the config)"));
    // A yaml without `parameterization` means LDM's default, epsilon.
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("sd2.safetensors");
    std::fs::copy(fixture("tiny-sd2.safetensors"), &alone).unwrap();
    std::fs::copy(fixture("tiny-sd2.yaml"), dir.path().join("sd2.yaml")).unwrap();
    let yaml = std::fs::read_to_string(dir.path().join("sd2.yaml")).unwrap();
    std::fs::write(
        dir.path().join("sd2.yaml"),
        yaml.replace("    parameterization: v\n", ""),
    )
    .unwrap();
    let ckpt = open(&alone, &offline_options());
    assert_eq!(
        ckpt.noise_schedule().prediction_type(),
        PredictionType::Epsilon,
        "LDM's default parameterization"
    );
}

#[test]
fn a_model_counts_its_weights_and_keeps_them_in_half_precision_when_told() {
    // The tiny folder's values, counted from its files.
    let folder = fixture("tiny-sd1");
    let mut files: u64 = 0;
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let tensors =
            candle_core::safetensors::load(folder.join(file), &candle_core::Device::Cpu).unwrap();
        files += tensors.values().map(|t| t.elem_count() as u64).sum::<u64>();
    }
    let mut ckpt = open(&folder, &offline_options());
    assert_eq!(ckpt.weight_elements(), files);
    // Kept in f16 (this folder is f32: they are rounded), the outputs move off the f32 ones
    // by f16 rounding only.
    let refs = references("tiny-sd1");
    let full = outputs(&ckpt, &refs);
    ckpt.set_matrix_dtype(Some(candle_core::DType::F16));
    let ours = outputs(&ckpt, &refs);
    let moved = (&ours.unet - &full.unet).unwrap().abs().unwrap();
    assert!(moved.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    assert_close("unet, f16 weights", &ours.unet, &refs["unet.out"], 2e-2);
    assert_close(
        "vae, f16 weights",
        &ours.decoded,
        &refs["vae.decoded"],
        2e-2,
    );
}
