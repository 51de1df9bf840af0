//! Shared by the `load_*` tests: fixture paths, reference tensors, the outputs of every
//! component of an opened model on the references' inputs, and comparisons.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora_trainer::models::load::{BaseModel, LoadOptions};
use lora_trainer::models::source::ModelSource;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    let path = lora_trainer::fixtures::path(name);
    assert!(
        path.exists(),
        "{} is missing (regenerate with tools/make_fixtures.py)",
        path.display()
    );
    path
}

/// `tiny-sd1.reference.safetensors` or `tiny-sd2...`.
pub fn references(variant: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("{variant}.reference.safetensors")),
        &Device::Cpu,
    )
    .expect("reference tensors")
}

/// Options that never touch the network: an empty offline hub cache.
pub fn offline_options() -> LoadOptions {
    LoadOptions {
        hub_cache: lora_trainer::models::hub::HubCache::at(root().join("target/no-hub-cache"))
            .with_offline(true),
        ..LoadOptions::default()
    }
}

pub fn open(path: &Path, options: &LoadOptions) -> BaseModel {
    let source = ModelSource::detect_with(path.to_str().expect("utf-8 path"), &options.hub_cache)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    BaseModel::open(&source, options).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every output the references record, computed by our models from the references' inputs.
pub struct Outputs {
    pub text: Tensor,
    pub text_clip_skip_2: Tensor,
    pub pooled: Tensor,
    pub unet: Tensor,
    pub latent_mean: Tensor,
    pub latent_logvar: Tensor,
    pub decoded: Tensor,
}

pub fn outputs(ckpt: &BaseModel, refs: &HashMap<String, Tensor>) -> Outputs {
    let text_encoder = ckpt.text_encoder(None).expect("text encoder");
    let ids = &refs["text.input_ids"];
    let text = text_encoder.forward(ids).expect("text forward");
    let text_clip_skip_2 = text_encoder
        .forward_with_clip_skip(ids, 2)
        .expect("clip skip 2");
    let pooled = text_encoder.pooled(&text, ids).expect("pooled");
    let unet = ckpt
        .unet(None)
        .expect("unet")
        .forward(
            &refs["unet.sample"],
            &refs["unet.timesteps"],
            &refs["unet.encoder_hidden_states"],
        )
        .expect("unet forward");
    let vae = ckpt.vae().expect("vae");
    let latent = vae.encode(&refs["vae.image"]).expect("encode");
    let decoded = vae.decode(&refs["vae.latent_mean"]).expect("decode");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
    Outputs {
        text: f32(&text),
        text_clip_skip_2: f32(&text_clip_skip_2),
        pooled: f32(&pooled),
        unet: f32(&unet),
        latent_mean: f32(&latent.mean),
        latent_logvar: f32(&latent.logvar),
        decoded: f32(&decoded),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
}

/// max |a − b| ≤ tol × max |reference|.
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let (a, b) = (values(ours), values(reference));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= tol * scale,
        "{name}: max |diff| {diff} > {tol} × {scale}"
    );
}

/// Bit-identical f32 values.
pub fn assert_identical(name: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{name}: shape");
    let (x, y) = (values(a), values(b));
    let differing = x
        .iter()
        .zip(&y)
        .filter(|(p, q)| p.to_bits() != q.to_bits())
        .count();
    assert_eq!(differing, 0, "{name}: {differing} values differ");
}

pub fn assert_all_identical(a: &Outputs, b: &Outputs) {
    assert_identical("text", &a.text, &b.text);
    assert_identical("text clip skip 2", &a.text_clip_skip_2, &b.text_clip_skip_2);
    assert_identical("unet", &a.unet, &b.unet);
    assert_identical("vae latent mean", &a.latent_mean, &b.latent_mean);
    assert_identical("vae latent logvar", &a.latent_logvar, &b.latent_logvar);
    assert_identical("vae decoded", &a.decoded, &b.decoded);
}

/// Our outputs against the fixture's references (DESIGN.md §6 tolerances).
pub fn assert_matches_references(ours: &Outputs, refs: &HashMap<String, Tensor>) {
    assert_close("text", &ours.text, &refs["text.last_hidden_state"], 1e-5);
    assert_close(
        "text clip skip 2",
        &ours.text_clip_skip_2,
        &refs["text.clip_skip_2"],
        1e-5,
    );
    assert_close("unet", &ours.unet, &refs["unet.out"], 1e-3);
    assert_close(
        "vae mean",
        &ours.latent_mean,
        &refs["vae.latent_mean"],
        1e-4,
    );
    assert_close(
        "vae logvar",
        &ours.latent_logvar,
        &refs["vae.latent_logvar"],
        1e-4,
    );
    assert_close("vae decoded", &ours.decoded, &refs["vae.decoded"], 1e-4);
}

/// Copies a folder tree (files only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
