//! Shared by the `lora_*` integration tests: configs (SD 1.5 written out, the tiny fixture
//! model), LoRA settings, building the tiny models with networks, filling adapters with
//! deterministic values.

#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_trainer::config::{LoraSettings, SaveFormat, SavePrecision, TargetModules, TargetPreset};
use lora_trainer::lora::{LoraAdapter, LoraNetworks};
use lora_trainer::models::clip_text::ClipTextModel;
use lora_trainer::models::clip_text_config::ClipTextConfig;
use lora_trainer::models::unet::{UNet2DConditionModel, UNetConfig};
use lora_trainer::nn::weights::TensorSource;
use lora_trainer::nn::{Scope, WeightStore};

pub fn fixture(path: &str) -> PathBuf {
    let p = lora_trainer::fixtures::path(path);
    assert!(p.exists(), "missing fixture {}", p.display());
    p
}

/// LoRA settings with rank 4, alpha 2 (scale ½), conv rank 2, conv alpha 4 (scale 2).
pub fn settings(targets: TargetModules) -> LoraSettings {
    LoraSettings {
        rank: 4,
        alpha: 2.0,
        dropout: 0.0,
        rank_dropout: 0.0,
        module_dropout: 0.0,
        conv_lora: false,
        conv_rank: 2,
        conv_alpha: 4.0,
        target_modules: targets,
        train_text_encoder: true,
        network_weights: None,
        save_precision: SavePrecision::Fp32,
        save_format: SaveFormat::Kohya,
    }
}

pub fn preset(p: TargetPreset) -> TargetModules {
    TargetModules::Preset(p)
}

pub fn names(list: &[&str]) -> TargetModules {
    TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
}

/// Stable Diffusion 1.5's `unet/config.json` (the keys that differ from diffusers' defaults).
pub fn sd15_unet_config() -> UNetConfig {
    let text = r#"{
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;
    UNetConfig::from_json_str(text, "SD 1.5 unet/config.json").unwrap()
}

/// Stable Diffusion 1.5's `text_encoder/config.json` (CLIP ViT-L/14's text tower).
pub fn sd15_text_config() -> ClipTextConfig {
    let text = r#"{
        "architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2,
        "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "vocab_size": 49408
    }"#;
    ClipTextConfig::from_json(text, "SD 1.5 text_encoder/config.json").unwrap()
}

pub fn tiny_unet_config() -> UNetConfig {
    UNetConfig::from_file(&fixture("tiny-sd1/unet/config.json")).unwrap()
}

pub fn tiny_text_config() -> ClipTextConfig {
    ClipTextConfig::from_file(&fixture("tiny-sd1/text_encoder/config.json")).unwrap()
}

pub fn store(path: &str, dtype: DType) -> WeightStore {
    let source = TensorSource::safetensors(&fixture(path)).unwrap();
    WeightStore::from_source(source, dtype, Device::Cpu)
}

/// The tiny SD1 UNet and text encoder in `dtype`, built with `networks`' adapters.
pub fn tiny_models(networks: &LoraNetworks, dtype: DType) -> (UNet2DConditionModel, ClipTextModel) {
    try_tiny_models(networks, dtype).unwrap()
}

/// [`tiny_models`], failing like a run would (a `network_weights` file that does not fit).
pub fn try_tiny_models(
    networks: &LoraNetworks,
    dtype: DType,
) -> lora_trainer::Result<(UNet2DConditionModel, ClipTextModel)> {
    let unet_store = store("tiny-sd1/unet/diffusion_pytorch_model.safetensors", dtype);
    let unet = UNet2DConditionModel::new(
        Scope::root(&unet_store).with_adapters(&networks.unet),
        &tiny_unet_config(),
    )?;
    let te_store = store("tiny-sd1/text_encoder/model.safetensors", dtype);
    let te_scope = match &networks.text_encoder {
        Some(te) => Scope::root(&te_store).with_adapters(te),
        None => Scope::root(&te_store),
    };
    let text = ClipTextModel::new(te_scope, &tiny_text_config())?;
    Ok((unet, text))
}

/// Deterministic values in [-scale, scale) (a 64-bit LCG), of `dims`, in `dtype`.
pub fn pseudo_random(dims: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Gives every adapter non-zero `down` and `up` (so that it changes the layer's output).
pub fn fill(adapters: &[std::sync::Arc<LoraAdapter>], seed: u64) {
    for (i, a) in adapters.iter().enumerate() {
        let dtype = a.down().dtype();
        let down = pseudo_random(a.down().dims(), seed + 2 * i as u64, 0.5, dtype);
        let up = pseudo_random(a.up().dims(), seed + 2 * i as u64 + 1, 0.5, dtype);
        a.set_weights(&down, &up).unwrap();
    }
}

/// Kohya names of every adapter, UNet first.
pub fn kohya_names(networks: &LoraNetworks) -> Vec<String> {
    networks
        .adapters()
        .iter()
        .map(|a| a.spec().kohya_name())
        .collect()
}

/// Bit patterns of a tensor's values (f32 or f64), for exact comparisons.
pub fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        _ => t
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| u64::from(x.to_bits()))
            .collect(),
    }
}

/// max |a − b|.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
