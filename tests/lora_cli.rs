//! `lora inspect FILE`: what it prints for our own exports (both formats), and exit status 2 with
//! the reason for a file that is not a usable LoRA.

mod lora_support;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use lora_support::*;
use lora_trainer::config::{SaveFormat, SavePrecision, TargetPreset};
use lora_trainer::lora::{save_lora, LoraBase, LoraNetworks, NetworkOptions};
use lora_trainer::models::family::ModelFamily;

fn inspect(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora"))
        .arg("inspect")
        .arg(path)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the lora binary runs")
}

fn export(dir: &Path, format: SaveFormat) -> std::path::PathBuf {
    let s = settings(preset(TargetPreset::Default));
    let nets = LoraNetworks::new(
        &s,
        LoraBase::sd(ModelFamily::Sd1),
        NetworkOptions::new(1, &Device::Cpu),
    )
    .unwrap();
    let _ = tiny_models(&nets, DType::F32);
    fill(&nets.adapters(), 3);
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("ss_base_model_version".to_string(), "sd_v1".to_string());
    metadata.insert("ss_sd_model_name".to_string(), "tiny-sd1".to_string());
    metadata.insert(
        "ss_tag_frequency".to_string(),
        format!(
            "{{\"1_x\": {{{}}}}}",
            (0..40)
                .map(|i| format!("\"tag{i}\": {i}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let path = dir.join(format!("{format}.safetensors"));
    save_lora(
        &nets.adapters(),
        None,
        &path,
        format,
        SavePrecision::Fp16,
        &metadata,
    )
    .unwrap();
    path
}

#[test]
fn inspect_prints_format_base_model_metadata_and_modules() {
    let dir = tempfile::tempdir().unwrap();
    let out = inspect(&export(dir.path(), SaveFormat::Kohya));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "format: kohya",
        "  ss_base_model_version: sd_v1",
        "  ss_sd_model_name: tiny-sd1",
        "  sshs_model_hash: ",
        "  trained for: SD 1.x (its metadata says ss_base_model_version=sd_v1)",
        "UNet: 44 modules",
        "text encoder: 6 modules",
        "  lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v  rank 4  alpha 2  f16  layer [32, 64]",
        "  lora_te_text_model_encoder_layers_2_self_attn_q_proj  rank 4  alpha 2  f16",
        "characters)",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}` in:\n{stdout}");
    }
    // Metadata sorted.
    let keys: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("metadata"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim_start().split(':').next().unwrap_or_default())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert!(keys.len() >= 5, "{keys:?}");

    let out = inspect(&export(dir.path(), SaveFormat::Diffusers));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("format: diffusers"), "{stdout}");
    assert!(stdout.contains("  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q  rank 4  alpha 2  f16"), "{stdout}");
}

#[test]
fn a_bad_file_exits_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("notes.safetensors");
    std::fs::write(&bad, "just text").unwrap();
    // A named pipe blocked `lora inspect` forever before; now it is named for what it is.
    let fifo = dir.path().join("pipe.safetensors");
    #[cfg(unix)]
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    #[cfg(unix)]
    {
        let stderr = String::from_utf8_lossy(&inspect(&fifo).stderr).into_owned();
        assert!(stderr.contains("named pipe"), "{stderr}");
    }
    for path in [bad, dir.path().join("missing.safetensors"), fifo] {
        let out = inspect(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("not a LoRA file"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}
