//! Shared by the `generate_*` integration tests: the tiny SD1 fixture model, building it with a
//! LoRA stack, rendering latents, and LoRA files made with the crate's own export.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use lora_trainer::config::{SaveFormat, SavePrecision};
use lora_trainer::generate::lora_files::{LoadedLora, LoraUse};
use lora_trainer::generate::lora_stack::LoraStack;
use lora_trainer::generate::pipeline::{ImageRequest, Pipeline};
use lora_trainer::generate::samplers::SamplerKind;
use lora_trainer::generate::schedule::{SamplerConfig, SamplingSchedule};
use lora_trainer::lora::{
    save_lora, Dropout, LoraAdapter, LoraBase, LoraModel, ModuleSpec, TrainingState,
};
use lora_trainer::models::conditioning::TextEncoders;
use lora_trainer::models::load::{BaseModel, LoadOptions};
use lora_trainer::nn::{Adapter, AdapterProvider, LayerKind};
use lora_trainer::Result;

pub fn fixture(path: &str) -> PathBuf {
    let p = lora_trainer::fixtures::path(path);
    assert!(p.exists(), "missing fixture {}", p.display());
    p
}

pub fn tiny() -> BaseModel {
    BaseModel::open_path(
        fixture("tiny-sd1").to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap()
}

/// A 64×64 request with guidance and a negative prompt, 3 steps.
pub fn request(seed: u64, sampler: SamplerKind) -> ImageRequest {
    ImageRequest {
        prompt: "a red cube on a table".to_string(),
        negative_prompt: "blurry".to_string(),
        width: 64,
        height: 64,
        steps: 3,
        cfg_scale: 7.5,
        seed,
        sampler,
    }
}

/// The tiny model's sampling schedule (its own scheduler config).
pub fn schedule(ckpt: &BaseModel) -> SamplingSchedule {
    let keys =
        SamplerConfig::from_file(&fixture("tiny-sd1/scheduler/scheduler_config.json")).unwrap();
    SamplingSchedule::new(ckpt.noise_schedule(), keys)
}

/// Builds the tiny model with `loras` stacked and hands the pipeline to `f`; also returns the
/// stack's warnings (lenient mode).
pub fn with_pipeline<T>(
    ckpt: &BaseModel,
    loras: &[LoraUse],
    lenient: bool,
    f: impl FnOnce(&Pipeline) -> Result<T>,
) -> Result<(T, Vec<String>)> {
    let loaded = loras
        .iter()
        .map(LoadedLora::read)
        .collect::<Result<Vec<_>>>()?;
    let base = LoraBase::new(ckpt.family(), ckpt.unet_config());
    let stack = LoraStack::new(loaded, &base, &Device::Cpu)?;
    let unet_p = stack.provider(LoraModel::Unet);
    let te_p = stack.provider(LoraModel::TextEncoder);
    let unet = ckpt.unet(Some(&unet_p))?;
    let text_encoder = ckpt.text_encoder(Some(&te_p))?;
    let warnings = stack.check_all_matched(lenient)?;
    let vae = ckpt.vae()?;
    let text_encoders = TextEncoders::single(ckpt.tokenizer()?, text_encoder, 1);
    let schedule = schedule(ckpt);
    let pipeline = Pipeline {
        unet: &unet,
        text_encoders: &text_encoders,
        vae: &vae,
        schedule: &schedule,
        device: Device::Cpu,
    };
    Ok((f(&pipeline)?, warnings))
}

/// The sampled latents of `request` with `loras`.
pub fn latents(ckpt: &BaseModel, loras: &[LoraUse], request: &ImageRequest) -> Tensor {
    with_pipeline(ckpt, loras, false, |p| p.denoise(request, &mut |_, _| {}))
        .unwrap()
        .0
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn relative_difference(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

/// Records every adaptable layer a model asks about.
#[derive(Default)]
pub struct LayerRecorder(pub Mutex<Vec<(String, LayerKind)>>);

impl AdapterProvider for LayerRecorder {
    fn adapter_for(&self, path: &str, kind: LayerKind) -> Result<Option<Arc<dyn Adapter>>> {
        self.0.lock().unwrap().push((path.to_string(), kind));
        Ok(None)
    }
}

/// The adaptable layers of the tiny UNet and text encoder.
pub fn layers(ckpt: &BaseModel) -> Vec<(LoraModel, String, LayerKind)> {
    let unet = LayerRecorder::default();
    ckpt.unet(Some(&unet)).unwrap();
    let te = LayerRecorder::default();
    ckpt.text_encoder(Some(&te)).unwrap();
    let tag = |model, r: LayerRecorder| {
        r.0.into_inner()
            .unwrap()
            .into_iter()
            .map(move |(p, k)| (model, p, k))
            .collect::<Vec<_>>()
    };
    let mut all = tag(LoraModel::Unet, unet);
    all.extend(tag(LoraModel::TextEncoder, te));
    all
}

/// The first layer whose path ends with `suffix` (and, when given, has kernel size `kernel`).
pub fn layer(
    all: &[(LoraModel, String, LayerKind)],
    model: LoraModel,
    suffix: &str,
    kernel: Option<usize>,
) -> (LoraModel, String, LayerKind) {
    all.iter()
        .find(|(m, p, k)| {
            *m == model
                && p.ends_with(suffix)
                && match (kernel, k) {
                    (None, _) => true,
                    (Some(n), LayerKind::Conv2d { kernel, .. }) => *kernel == n,
                    (Some(_), LayerKind::Linear { .. }) => false,
                }
        })
        .cloned()
        .unwrap_or_else(|| panic!("no {model} layer ending in {suffix}"))
}

/// Deterministic values in [-scale, scale) (a 64-bit LCG).
pub fn pseudo_random(dims: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale) as f32
        })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// An adapter on `layer` of rank `rank` and alpha `alpha` with non-zero pseudo-random matrices.
pub fn adapter(
    layer: &(LoraModel, String, LayerKind),
    rank: usize,
    alpha: f64,
    seed: u64,
) -> Arc<LoraAdapter> {
    let spec = ModuleSpec {
        model: layer.0,
        path: layer.1.clone(),
        layer: layer.2,
        rank,
        alpha,
    };
    let a = LoraAdapter::new(
        spec,
        seed,
        Dropout::default(),
        Arc::new(TrainingState::default()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let down = pseudo_random(a.down().dims(), seed * 2 + 1, 0.4);
    let up = pseudo_random(a.up().dims(), seed * 2 + 2, 0.4);
    a.set_weights(&down, &up).unwrap();
    Arc::new(a)
}

/// Saves `adapters` to `dir/name.safetensors` with the crate's export (f32).
pub fn save(adapters: &[Arc<LoraAdapter>], dir: &Path, name: &str, format: SaveFormat) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    save_lora(
        adapters,
        None,
        &path,
        format,
        SavePrecision::Fp32,
        &Default::default(),
    )
    .unwrap();
    path
}

pub fn uses(path: &Path, weight: f64) -> LoraUse {
    LoraUse {
        path: path.to_path_buf(),
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
        text_encoder_weight: weight,
        unet_weight: weight,
    }
}

/// The layers a typical kohya file touches: a linear attention projection, a 1×1 conv
/// (`proj_in`), a 3×3 resnet conv (LoCon) and a text-encoder projection.
pub fn mixed_layers(ckpt: &BaseModel) -> Vec<(LoraModel, String, LayerKind)> {
    let all = layers(ckpt);
    vec![
        layer(&all, LoraModel::Unet, "attn1.to_q", None),
        layer(&all, LoraModel::Unet, "attn2.to_v", None),
        layer(&all, LoraModel::Unet, "proj_in", Some(1)),
        layer(&all, LoraModel::Unet, "resnets.0.conv1", Some(3)),
        layer(&all, LoraModel::TextEncoder, "self_attn.q_proj", None),
    ]
}
