//! Writes LoRA files for `tools/check_lora_clients.py`, which loads them with diffusers and maps
//! them with A1111's rules (not run in CI: it needs Python). Run:
//!
//! ```sh
//! LORA_CLIENT_CHECK_DIR=/tmp/lora-clients cargo test --test lora_clients -- --ignored
//! ```
//!
//! The files are tiny-sd1 adapters (rank 4 / alpha 2, conv rank 2 / alpha 4) with non-zero
//! weights; `manifest.json` lists them with their format and targets.

mod lora_support;

use std::path::PathBuf;

use candle_core::{DType, Device};
use lora_support::*;
use lora_trainer::config::{SaveFormat, SavePrecision, TargetModules, TargetPreset};
use lora_trainer::lora::{save_lora, LoraBase, LoraNetworks, NetworkOptions};
use lora_trainer::models::family::ModelFamily;

#[test]
#[ignore = "writes files for tools/check_lora_clients.py; set LORA_CLIENT_CHECK_DIR"]
fn write_files_for_the_client_check() {
    let dir =
        PathBuf::from(std::env::var("LORA_CLIENT_CHECK_DIR").expect("set LORA_CLIENT_CHECK_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, TargetModules, bool); 3] = [
        ("default", preset(TargetPreset::Default), false),
        ("attn", preset(TargetPreset::Attn), false),
        ("locon", preset(TargetPreset::Kohya), true),
    ];
    let mut manifest = Vec::new();
    for (i, (name, targets, conv)) in cases.into_iter().enumerate() {
        let mut s = settings(targets);
        s.conv_lora = conv;
        let nets = LoraNetworks::new(
            &s,
            LoraBase::sd(ModelFamily::Sd1),
            NetworkOptions::new(1, &Device::Cpu),
        )
        .unwrap();
        let _ = tiny_models(&nets, DType::F32);
        nets.check_built().unwrap();
        fill(&nets.adapters(), 100 * i as u64 + 1);
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("ss_base_model_version".to_string(), "sd_v1".to_string());
        metadata.insert("ss_output_name".to_string(), name.to_string());
        for (format, precision) in [
            (SaveFormat::Kohya, SavePrecision::Fp32),
            (SaveFormat::Kohya, SavePrecision::Fp16),
            (SaveFormat::Diffusers, SavePrecision::Fp32),
        ] {
            let file = format!("{name}.{format}.{precision}.safetensors");
            save_lora(
                &nets.adapters(),
                None,
                &dir.join(&file),
                format,
                precision,
                &metadata,
            )
            .unwrap();
            manifest.push(serde_json::json!({
                "file": file, "format": format.to_string(), "precision": precision.to_string(),
                "targets": name, "modules": nets.adapters().len(),
            }));
        }
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .unwrap();
    eprintln!("wrote {} files to {}", manifest.len(), dir.display());
}
