//! The CLIP text encoder and tokenizer against transformers on the tiny fixture models
//! (`tests/fixtures/tiny-sd{1,2}`, references in `tiny-sd{1,2}.reference.safetensors`; SDXL's two
//! encoders in `tiny-sdxl/`):
//! `last_hidden_state`, the clip_skip 2 state, `pooler_output`, and the prompts' input ids.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_trainer::models::clip_text::{ClipTextConfig, ClipTextModel};
use lora_trainer::models::tokenizer::ClipTokenizer;
use lora_trainer::nn::weights::{Entry, TensorSource, Transform};
use lora_trainer::nn::{Scope, WeightStore};

fn fixture(path: &str) -> PathBuf {
    let path = lora_trainer::fixtures::path(path);
    assert!(
        path.exists(),
        "{} is missing (regenerate with tools/make_fixtures.py)",
        path.display()
    );
    path
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    prompts: Vec<String>,
}

fn reference(variant: &str) -> Reference {
    let path = fixture(&format!("{variant}.reference.safetensors"));
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("reference tensors");
    let bytes = std::fs::read(&path).expect("reference file");
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).expect("reference header");
    let prompts = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("prompts"))
        .expect("`prompts` in the metadata");
    Reference {
        tensors,
        prompts: serde_json::from_str(prompts).expect("prompts JSON"),
    }
}

impl Reference {
    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference tensor `{key}` is missing"))
    }
}

/// max |ours − reference| ≤ 1e-4 · max |reference| (f32 parity for one module).
fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let ours = ours.to_dtype(DType::F32).expect("f32");
    let diff = (&ours - reference)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0));
    let scale = reference
        .abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0));
    let (diff, scale) = (
        diff.and_then(|d| d.to_scalar::<f32>()),
        scale.and_then(|d| d.to_scalar::<f32>()),
    );
    let (diff, scale) = (diff.expect("diff"), scale.expect("scale"));
    assert!(scale > 0.0, "{what}: the reference is all zeros");
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max |diff| {diff:e} > 1e-4 × max |ref| {scale:e}"
    );
}

fn text_encoder(store: &WeightStore, variant: &str) -> ClipTextModel {
    let config =
        ClipTextConfig::from_file(&fixture(&format!("{variant}/text_encoder/config.json")))
            .expect("config");
    let model = ClipTextModel::new(Scope::root(store), &config).expect("text encoder");
    store
        .check_all_used()
        .expect("every checkpoint tensor used");
    model
}

fn diffusers_store(variant: &str) -> WeightStore {
    let source = TensorSource::safetensors(&fixture(&format!(
        "{variant}/text_encoder/model.safetensors"
    )))
    .expect("weights");
    WeightStore::from_source(source, DType::F32, Device::Cpu)
}

fn check_outputs(model: &ClipTextModel, reference: &Reference, what: &str) {
    let ids = reference.get("text.input_ids");
    let last = model.forward(ids).expect("forward");
    assert_close(
        &last,
        reference.get("text.last_hidden_state"),
        &format!("{what}: last_hidden_state"),
    );
    let skip2 = model.forward_with_clip_skip(ids, 2).expect("clip skip 2");
    assert_close(
        &skip2,
        reference.get("text.clip_skip_2"),
        &format!("{what}: clip_skip_2"),
    );
    let pooled = model.pooled(&last, ids).expect("pooled");
    assert_close(
        &pooled,
        reference.get("text.pooler_output"),
        &format!("{what}: pooler_output"),
    );
}

fn check_tokenizer(variant: &str, reference: &Reference) {
    let tokenizer =
        ClipTokenizer::from_dir(&fixture(&format!("{variant}/tokenizer"))).expect("tokenizer");
    let ids = tokenizer
        .input_ids(&reference.prompts, &Device::Cpu)
        .expect("ids");
    let ours = ids
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec2::<i64>())
        .expect("ids");
    let theirs = reference
        .get("text.input_ids")
        .to_vec2::<i64>()
        .expect("reference ids");
    assert_eq!(
        ours, theirs,
        "{variant}: input ids of {:?}",
        reference.prompts
    );
}

#[test]
fn tiny_sd1_text_encoder_matches_transformers() {
    let reference = reference("tiny-sd1");
    let store = diffusers_store("tiny-sd1");
    check_outputs(&text_encoder(&store, "tiny-sd1"), &reference, "tiny-sd1");
}

#[test]
fn tiny_sd2_text_encoder_matches_transformers() {
    let reference = reference("tiny-sd2");
    let store = diffusers_store("tiny-sd2");
    check_outputs(&text_encoder(&store, "tiny-sd2"), &reference, "tiny-sd2");
}

#[test]
fn tiny_sd1_single_file_keys_with_the_text_model_prefix() {
    // The single file stores the same weights as `cond_stage_model.transformer.text_model.*`.
    let source = TensorSource::safetensors(&fixture("tiny-sd1.safetensors")).expect("single file");
    let keys = source.keys_and_shapes();
    let mut store = WeightStore::new(DType::F32, Device::Cpu);
    let index = store.add_source(source);
    for (key, _) in keys {
        if let Some(name) = key.strip_prefix("cond_stage_model.transformer.") {
            store.insert(
                name.to_string(),
                Entry {
                    source: index,
                    key: key.clone(),
                    transform: Transform::None,
                },
            );
        }
    }
    assert!(store.contains("text_model.embeddings.token_embedding.weight"));
    check_outputs(
        &text_encoder(&store, "tiny-sd1"),
        &reference("tiny-sd1"),
        "tiny-sd1 single file",
    );
}

#[test]
fn tiny_sd1_tokenizer_matches_transformers() {
    check_tokenizer("tiny-sd1", &reference("tiny-sd1"));
}

#[test]
fn tiny_sd2_tokenizer_matches_transformers() {
    let reference = reference("tiny-sd2");
    check_tokenizer("tiny-sd2", &reference);
    let ids = reference
        .get("text.input_ids")
        .to_vec2::<i64>()
        .expect("ids");
    assert_eq!(ids[0][76], 0, "SD2 pads with `!` (id 0)");
}

/// SDXL's two text encoders at toy size (`tools/make_sdxl_fixtures.py`): the penultimate hidden
/// states of both (no final layer norm, as SDXL conditions), and the second one's
/// `last_hidden_state` and projected pooled output (`text_embeds`).
#[test]
fn tiny_sdxl_text_encoders_match_transformers() {
    use lora_trainer::models::clip_text_projection::ClipTextModelWithProjection;
    let refs =
        candle_core::safetensors::load(fixture("tiny-sdxl.reference.safetensors"), &Device::Cpu)
            .unwrap();
    let get = |k: &str| {
        refs.get(k)
            .unwrap_or_else(|| panic!("`{k}` missing"))
            .clone()
    };
    let store = |folder: &str| {
        let dir = fixture(&format!("tiny-sdxl/{folder}"));
        let config = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let source = TensorSource::safetensors(&dir.join("model.safetensors")).unwrap();
        (
            config,
            WeightStore::from_source(source, DType::F32, Device::Cpu),
        )
    };
    let ids = get("text.input_ids");

    let (config, te1_store) = store("text_encoder");
    let te1 = ClipTextModel::new(Scope::root(&te1_store), &config).unwrap();
    te1_store.check_all_used().unwrap();
    let (penultimate, _) = te1.forward_penultimate(&ids).unwrap();
    assert_close(
        &penultimate,
        &get("text1.penultimate"),
        "text_encoder hidden_states[-2]",
    );

    let (config, te2_store) = store("text_encoder_2");
    let te2 = ClipTextModelWithProjection::new(Scope::root(&te2_store), &config).unwrap();
    te2_store.check_all_used().unwrap();
    let out = te2.forward(&ids).unwrap();
    assert_close(
        &out.penultimate,
        &get("text2.penultimate"),
        "text_encoder_2 hidden_states[-2]",
    );
    assert_close(
        &out.text_embeds,
        &get("text2.text_embeds"),
        "text_encoder_2 text_embeds",
    );
    let (_, last) = te2.text_model().forward_penultimate(&ids).unwrap();
    assert_close(
        &last,
        &get("text2.last_hidden_state"),
        "text_encoder_2 last_hidden_state",
    );
}
