//! Which layers get adapters: the exact module names on an SD 1.5-shaped model (built from its
//! configs on a shape-only store, no weights), the presets, PEFT-style lists, conv LoRA, and the
//! report computed from the configs alone.

mod lora_support;

use std::collections::BTreeSet;

use candle_core::{DType, Device};
use lora_support::*;
use lora_trainer::config::TargetPreset;
use lora_trainer::lora::export::kohya_tensors;
use lora_trainer::lora::{LoraBase, LoraNetworks, NetworkOptions};
use lora_trainer::models::clip_text::ClipTextModel;
use lora_trainer::models::family::ModelFamily;
use lora_trainer::models::unet::UNet2DConditionModel;
use lora_trainer::nn::{Scope, WeightStore};

/// SD 1.5 built on a shape-only store with real (tiny) adapters; returns the networks.
fn sd15_networks(
    settings: &lora_trainer::config::LoraSettings,
) -> lora_trainer::Result<LoraNetworks> {
    let networks = LoraNetworks::new(
        settings,
        LoraBase::sd(ModelFamily::Sd1),
        NetworkOptions::new(1, &Device::Cpu),
    )?;
    let store = WeightStore::shape_only(DType::F32, Device::Cpu);
    UNet2DConditionModel::new(
        Scope::root(&store).with_adapters(&networks.unet),
        &sd15_unet_config(),
    )?;
    if let Some(te) = &networks.text_encoder {
        ClipTextModel::new(Scope::root(&store).with_adapters(te), &sd15_text_config())?;
    }
    networks.check_built()?;
    Ok(networks)
}

fn name_set(networks: &LoraNetworks) -> BTreeSet<String> {
    kohya_names(networks).into_iter().collect()
}

/// The default targets' names, written out from SD 1.5's layout (not from our code): attn1/attn2
/// q and v of the 16 transformers; q and v of the 12 CLIP layers.
fn expected_default_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut transformer = |block: String| {
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_v"] {
                names.insert(format!(
                    "lora_unet_{block}_transformer_blocks_0_{attn}_{proj}"
                ));
            }
        }
    };
    for i in 0..3 {
        for j in 0..2 {
            transformer(format!("down_blocks_{i}_attentions_{j}"));
        }
    }
    transformer("mid_block_attentions_0".to_string());
    for i in 1..4 {
        for j in 0..3 {
            transformer(format!("up_blocks_{i}_attentions_{j}"));
        }
    }
    for layer in 0..12 {
        for proj in ["q_proj", "v_proj"] {
            names.insert(format!(
                "lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            ));
        }
    }
    names
}

#[test]
fn sd15_default_targets_are_exactly_64_unet_and_24_text_encoder_modules() {
    let networks = sd15_networks(&settings(preset(TargetPreset::Default))).unwrap();
    let got = name_set(&networks);
    let expected = expected_default_names();
    assert_eq!(got, expected);
    assert_eq!(networks.unet.adapters().len(), 64);
    assert_eq!(
        networks.text_encoder.as_ref().map(|t| t.adapters().len()),
        Some(24)
    );
    assert!(got.contains("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"));
    assert!(got.contains("lora_te_text_model_encoder_layers_11_self_attn_q_proj"));

    // The file's keys: down, up and a 0-dim alpha per module, nothing else.
    let tensors = kohya_tensors(&networks.adapters(), None, DType::F16).unwrap();
    let keys: BTreeSet<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
    let expected_keys: BTreeSet<String> = expected
        .iter()
        .flat_map(|n| ["lora_down.weight", "lora_up.weight", "alpha"].map(|s| format!("{n}.{s}")))
        .collect();
    assert_eq!(keys, expected_keys);
    for (key, t) in &tensors {
        assert_eq!(t.dtype(), DType::F16, "{key}");
        if key.ends_with(".alpha") {
            assert_eq!(t.dims(), &[] as &[usize], "{key}");
        }
    }
    let (_, down) = tensors
        .iter()
        .find(|(k, _)| k == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight")
        .unwrap();
    assert_eq!(
        down.dims(),
        &[4, 768],
        "attn2.to_v reads the 768-wide text embedding"
    );
}

#[test]
fn peft_q_and_v_names_select_the_same_modules_as_the_default() {
    let peft = sd15_networks(&settings(names(&["q_proj", "v_proj"]))).unwrap();
    assert_eq!(name_set(&peft), expected_default_names());
}

#[test]
fn attn_and_kohya_presets() {
    let attn = sd15_networks(&settings(preset(TargetPreset::Attn))).unwrap();
    let report = attn.report();
    assert_eq!(
        (report.unet.modules, report.text_encoder.unwrap().modules),
        (128, 48)
    );
    assert!(name_set(&attn)
        .contains("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"));
    assert!(name_set(&attn).contains("lora_te_text_model_encoder_layers_3_self_attn_out_proj"));

    // kohya's networks.lora: 12 layers per transformer (proj_in/out, 8 attention projections,
    // 2 feed-forward linears), 6 per CLIP layer.
    let kohya = sd15_networks(&settings(preset(TargetPreset::Kohya))).unwrap();
    let report = kohya.report();
    assert_eq!(
        (report.unet.modules, report.text_encoder.unwrap().modules),
        (192, 72)
    );
    let names = name_set(&kohya);
    for n in [
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_te_text_model_encoder_layers_0_mlp_fc2",
    ] {
        assert!(names.contains(n), "{n}");
    }
    assert!(!names
        .iter()
        .any(|n| n.contains("resnets") || n.contains("time_embedding")));
}

#[test]
fn kohya_locon_adds_the_resnet_and_sampler_blocks() {
    let mut s = settings(preset(TargetPreset::Kohya));
    s.conv_lora = true;
    let networks = sd15_networks(&s).unwrap();
    let report = networks.report();
    // 22 resnets × (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 down- + 3 upsamplers.
    assert_eq!(report.unet.modules, 192 + 86);
    assert_eq!(report.unet.conv_modules, 22 * 2 + 6);
    let by_name = |n: &str| {
        networks
            .adapters()
            .into_iter()
            .find(|a| a.spec().kohya_name() == n)
            .unwrap_or_else(|| panic!("no adapter {n}"))
    };
    // A 3×3 adapter: down keeps the kernel, up is 1×1, conv rank and alpha.
    let conv = by_name("lora_unet_down_blocks_1_resnets_0_conv1");
    assert_eq!(conv.down().dims(), &[2, 320, 3, 3]);
    assert_eq!(conv.up().dims(), &[640, 2, 1, 1]);
    assert_eq!((conv.spec().rank, conv.spec().alpha), (2, 4.0));
    let down = by_name("lora_unet_down_blocks_0_downsamplers_0_conv");
    assert_eq!(down.down().dims(), &[2, 320, 3, 3]);
    // 1×1 shortcut and time projection at the linear rank.
    let shortcut = by_name("lora_unet_down_blocks_1_resnets_0_conv_shortcut");
    assert_eq!(
        (shortcut.down().dims(), shortcut.up().dims()),
        (&[4, 320, 1, 1][..], &[640, 4, 1, 1][..])
    );
    assert_eq!(
        by_name("lora_unet_up_blocks_3_resnets_2_time_emb_proj")
            .down()
            .dims(),
        &[4, 1280]
    );
}

#[test]
fn text_encoder_off_and_unmatched_entries() {
    let mut s = settings(names(&["to_k", "fc1"]));
    s.train_text_encoder = false;
    let err = sd15_networks(&s).unwrap_err().to_string();
    assert!(
        err.contains("`fc1` matches no module of the UNet") && err.contains("train_text_encoder"),
        "{err}"
    );

    let mut s = settings(names(&["attn2.to_k"]));
    s.train_text_encoder = false;
    let networks = sd15_networks(&s).unwrap();
    assert!(networks.text_encoder.is_none());
    assert_eq!(networks.report().unet.modules, 16);
    assert_eq!(networks.param_groups().len(), 1);

    let err = sd15_networks(&settings(names(&["to_q", "nonexistent_proj"]))).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string()
            .starts_with("target_modules: `nonexistent_proj` matches no module"),
        "{err}"
    );

    // Globs over whole paths.
    let networks = sd15_networks(&settings(names(&[
        "*attn2.to_k",
        "text_model.encoder.layers.1?.*fc1",
    ])))
    .unwrap();
    let report = networks.report();
    assert_eq!(
        (report.unet.modules, report.text_encoder.unwrap().modules),
        (16, 2)
    );
}

#[test]
fn the_report_from_configs_alone_counts_sd15_modules_and_parameters() {
    let mut s = settings(preset(TargetPreset::Default));
    s.rank = 8;
    let report = LoraNetworks::report_from_configs(
        &s,
        LoraBase::sd(ModelFamily::Sd1),
        &sd15_unet_config(),
        &[&sd15_text_config()],
    )
    .unwrap();
    // Per transformer of width C: attn1 q, v and attn2 q are C→C, attn2 v is 768→C:
    // r·(7C + 768); 5 transformers at 320, 5 at 640, 6 at 1280. CLIP: 24 × r·(768 + 768).
    let unet: usize = [(320, 5), (640, 5), (1280, 6)]
        .iter()
        .map(|(c, n)| n * 8 * (7 * c + 768))
        .sum();
    assert_eq!((report.unet.modules, report.unet.parameters), (64, unet));
    assert_eq!(unet, 797_184);
    let te = report.text_encoder.clone().unwrap();
    assert_eq!((te.modules, te.parameters), (24, 294_912));
    assert_eq!(
        report.to_string(),
        "UNet: 64 modules, 797,184 parameters; text encoder: 24 modules, 294,912 parameters"
    );
    // The live networks say the same.
    assert_eq!(sd15_networks(&s).unwrap().report(), report);
}
