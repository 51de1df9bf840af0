//! Broken or foreign model files give errors that name the file and the key at fault: a missing
//! tensor, an extra one, a wrong shape, a LoRA given as base model, SDXL, a yaml that belongs
//! to another model, a missing path.

mod load_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use load_support::*;
use lora_trainer::error::ModelError;
use lora_trainer::models::load::BaseModel;
use lora_trainer::models::source::ModelSource;
use lora_trainer::Error;

/// The tiny SD1 single file's tensors (the i32 EMA counter, which candle cannot hold, left out).
fn sd1_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-sd1.safetensors"), &Device::Cpu)
        .expect("tiny-sd1.safetensors")
}

/// Writes `tensors` as `<dir>/<name>.safetensors` with tiny-sd1's yaml beside it.
fn write_model(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>, yaml: bool) -> String {
    let path = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(tensors, &path).expect("save");
    if yaml {
        std::fs::copy(fixture("tiny-sd1.yaml"), dir.join(format!("{name}.yaml"))).expect("yaml");
    }
    path.display().to_string()
}

fn open_error(path: &str) -> Error {
    let options = offline_options();
    match ModelSource::detect_with(path, &options.hub_cache) {
        Err(e) => e,
        Ok(source) => match BaseModel::open(&source, &options) {
            Err(e) => e,
            Ok(ckpt) => ckpt
                .unet(None)
                .and_then(|_| ckpt.text_encoder(None))
                .and_then(|_| ckpt.vae())
                .expect_err("the broken model loaded"),
        },
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = sd1_tensors();
    tensors
        .remove("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
        .expect("present");
    let path = write_model(dir.path(), "missing", &tensors, true);
    let err = open_error(&path);
    assert!(
        matches!(err, Error::Model(ModelError::MissingWeight { .. })),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
            && message.contains("missing.safetensors"),
        "{message}"
    );
}

#[test]
fn an_extra_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let extra = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    // Where no layer is: refused while mapping, with the file's key.
    let mut tensors = sd1_tensors();
    tensors.insert(
        "model.diffusion_model.input_blocks.1.0.mystery.weight".into(),
        extra.clone(),
    );
    let message = open_error(&write_model(dir.path(), "extra1", &tensors, true)).to_string();
    assert!(
        message.contains("model.diffusion_model.input_blocks.1.0.mystery.weight"),
        "{message}"
    );
    // Inside a module: left over after the build, named in both layouts.
    let mut tensors = sd1_tensors();
    tensors.insert(
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.gate".into(),
        extra.clone(),
    );
    let err = open_error(&write_model(dir.path(), "extra2", &tensors, true));
    assert!(
        matches!(err, Error::Model(ModelError::UnusedWeights { .. })),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn1.gate")
            && message
                .contains("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.gate"),
        "{message}"
    );
    // Belonging to no component.
    let mut tensors = sd1_tensors();
    tensors.insert("control_model.input_hint_block.0.weight".into(), extra);
    let message = open_error(&write_model(dir.path(), "extra3", &tensors, true)).to_string();
    assert!(
        message.contains("control_model.input_hint_block.0.weight")
            && message.contains("belong to no Stable Diffusion"),
        "{message}"
    );
}

#[test]
fn a_wrong_shape_names_both_keys_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = sd1_tensors();
    let key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    tensors.insert(
        key.into(),
        Tensor::zeros((32, 32, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = open_error(&write_model(dir.path(), "shape", &tensors, true));
    assert!(
        matches!(err, Error::Model(ModelError::WeightShape { .. })),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("down_blocks.0.resnets.0.conv1.weight")
            && message.contains(key)
            && message.contains("[32, 32, 1, 1]")
            && message.contains("[32, 32, 3, 3]"),
        "{message}"
    );
}

#[test]
fn a_lora_file_is_not_a_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = HashMap::new();
    let t = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    tensors.insert(
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
        t.clone(),
    );
    tensors.insert(
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight".to_string(),
        t.t().unwrap().contiguous().unwrap(),
    );
    let path = write_model(dir.path(), "style_lora", &tensors, false);
    let message = open_error(&path).to_string();
    assert!(
        message.contains("LoRA file") && message.contains("style_lora.safetensors"),
        "{message}"
    );
}

#[test]
fn sdxl_single_files_without_size_conditioning_or_with_foreign_parts_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = sd1_tensors();
    tensors.insert(
        "conditioner.embedders.1.model.ln_final.weight".into(),
        Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let message = open_error(&write_model(dir.path(), "xl", &tensors, false)).to_string();
    assert!(
        message.contains("SDXL") && message.contains("conditioner.embedders.1"),
        "{message}"
    );
    let mut tensors = sd1_tensors();
    tensors.insert(
        "model.diffusion_model.label_emb.0.0.weight".into(),
        Tensor::ones((128, 256), DType::F32, &Device::Cpu).unwrap(),
    );
    // Detected as SDXL by its size conditioning, but it holds SD 1.x's text encoder.
    let message = open_error(&write_model(dir.path(), "xl2", &tensors, false)).to_string();
    assert!(
        message.contains("belong to no SDXL component")
            && message.contains("cond_stage_model.transformer."),
        "{message}"
    );
}

#[test]
fn a_yaml_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-sd2.safetensors"),
        dir.path().join("m.safetensors"),
    )
    .unwrap();
    std::fs::copy(fixture("tiny-sd1.yaml"), dir.path().join("m.yaml")).unwrap();
    let message = open_error(&dir.path().join("m.safetensors").display().to_string()).to_string();
    assert!(
        message.contains("m.yaml") && message.contains("another model"),
        "{message}"
    );
    // Same family, other sizes.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-sd1.safetensors"),
        dir.path().join("m.safetensors"),
    )
    .unwrap();
    let yaml = std::fs::read_to_string(fixture("tiny-sd1.yaml")).unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        yaml.replace("num_res_blocks: 2", "num_res_blocks: 3"),
    )
    .unwrap();
    let message = open_error(&dir.path().join("m.safetensors").display().to_string()).to_string();
    assert!(
        message.contains("layers_per_block") && message.contains("m.yaml"),
        "{message}"
    );
}

#[test]
fn a_broken_folder_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("tiny-sd1"), dir.path());
    let vae = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&vae, &Device::Cpu).unwrap();
    tensors.remove("decoder.conv_out.bias").expect("present");
    candle_core::safetensors::save(&tensors, &vae).unwrap();
    let message = open_error(&dir.path().display().to_string()).to_string();
    assert!(
        message.contains("decoder.conv_out.bias")
            && message.contains("vae/diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    std::fs::remove_file(dir.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(
        dir.path()
            .join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let message = open_error(&dir.path().display().to_string()).to_string();
    assert!(
        message.contains("unet/") && message.contains("holds no weights"),
        "{message}"
    );
}

#[test]
fn a_folder_without_a_component_config_names_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("tiny-sd1"), dir.path());
    std::fs::remove_file(dir.path().join("text_encoder/config.json")).unwrap();
    let error = open_error(&dir.path().display().to_string());
    let message = error.to_string();
    assert!(
        matches!(error, Error::Model(ModelError::NotFound { .. }))
            && message.contains("text_encoder/config.json")
            && error.exit_code() == 2,
        "{message}"
    );
}

#[test]
fn missing_paths_are_not_found() {
    let err = open_error("./models/does-not-exist.safetensors");
    assert!(
        matches!(err, Error::Model(ModelError::NotFound { .. })),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
}
