//! SDXL through the same `train` command (issue 15): the tiny SDXL diffusers folder is detected
//! as SDXL, trains at the family's 1024 px unless `resolution` says otherwise, and its LoRA has
//! kohya's SDXL names (`lora_unet_input_blocks_…`, LDM paths; `lora_te1_`/`lora_te2_`) and
//! metadata, loads back as `network_weights` and draws in `generate` (and in previews).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn project(root: &Path, extra: &str) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut csv = String::from("filename,prompt\n");
    for i in 0..2u32 {
        let name = format!("img{i}.png");
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, (i * 90) as u8])
        })
        .save(data.join(&name))
        .unwrap();
        csv.push_str(&format!("{name},neon city {i}\n"));
    }
    std::fs::write(data.join("metadata.csv"), csv).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let config = root.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "train_data_dir: {data}\nmetadata_path: {data}/metadata.csv\nbase_model: {model}\n\
             output_dir: {out}\noutput_name: xl\nbatch_size: 2\nmax_train_steps: 2\n\
             learning_rate: 1e-2\ntrain_text_encoder: false\ndevice: cpu\n{extra}",
            data = data.display(),
            model = model.display(),
            out = root.join("out").display()
        ),
    )
    .unwrap();
    config
}

fn train(config: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--config")
        .arg(config)
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_dry_run_says_sdxl_and_trains_at_1024_px_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "");
    let out = train(&config, &["--dry-run"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("SDXL-style, cross-attention width 24"),
        "{said}"
    );
    assert!(said.contains("at 1024 px"), "{said}");
    // A resolution the config sets wins.
    let out = train(&config, &["--dry-run", "--set", "resolution=64"]);
    assert!(text(&out).contains("at 64 px"), "{}", text(&out));
}

#[test]
fn both_text_encoders_train_as_lora_te1_and_lora_te2_and_the_file_draws_in_generate() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(
        dir.path(),
        "resolution: 64\ntarget_modules: attn\nsample_prompts: [\"neon --w 64 --h 64 --s 2 --d 1\"]\n\
         sample_every_n_steps: 2\n",
    );
    let out = train(&config, &["--set", "train_text_encoder=true"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    // 3 layers × q/k/v/out in each encoder, reported together.
    assert!(said.contains("LoRA      160 modules"), "{said}");
    let path = dir.path().join("out/xl.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let count = |prefix: &str| {
        file.names()
            .iter()
            .filter(|n| n.starts_with(prefix) && n.ends_with(".lora_down.weight"))
            .count()
    };
    assert_eq!(count("lora_unet_"), 136);
    assert_eq!(count("lora_te1_text_model_encoder_layers_"), 12);
    assert_eq!(count("lora_te2_text_model_encoder_layers_"), 12);
    assert_eq!(count("lora_te_"), 0);
    // The second text encoder's adapters learned (its pooled output conditions the UNet).
    let up = file
        .tensor("lora_te2_text_model_encoder_layers_2_self_attn_v_proj.lora_up.weight")
        .unwrap();
    assert!(up.data().iter().any(|&b| b != 0));

    // Previews were drawn with the SDXL pipeline during training.
    let samples = std::fs::read_dir(dir.path().join("out/samples"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(samples, 1, "{said}");

    // generate draws with it on the same base, every module applied.
    let images = dir.path().join("images");
    let out = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["--model"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl"))
        .args(["--prompt", "neon city", "--lora"])
        .arg(format!("{}:0.8", path.display()))
        .args([
            "--steps", "2", "--width", "64", "--height", "64", "--seed", "1", "--device", "cpu",
            "--out",
        ])
        .arg(&images)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("(160 modules, kohya format)"), "{said}");
    assert!(images.join("00000-1.png").is_file(), "{said}");
}

#[test]
fn an_sdxl_lora_has_kohya_sdxl_names_and_metadata_and_continues_as_network_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "resolution: 64\n");
    let out = train(&config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let path = dir.path().join("out/xl.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = file.names();
    // 17 transformer blocks × q/v of attn1/attn2, three tensors each.
    assert_eq!(names.len(), 17 * 4 * 3);
    for name in &names {
        assert!(
            [
                "lora_unet_input_blocks_",
                "lora_unet_middle_block_1_",
                "lora_unet_output_blocks_"
            ]
            .iter()
            .any(|p| name.starts_with(p)),
            "{name}"
        );
    }
    for (name, ldm) in [
        // down_blocks.1.attentions.0 = input_blocks.4.1 (two resnets per level, level 0 plain)
        (
            "down_blocks.1.attentions.0",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        (
            "down_blocks.2.attentions.1",
            "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_v",
        ),
        (
            "up_blocks.1.attentions.2",
            "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_q",
        ),
    ] {
        assert!(
            names
                .iter()
                .any(|n| **n == format!("{ldm}.lora_down.weight")),
            "{name} → {ldm}"
        );
    }
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(
        meta["modelspec.architecture"],
        "stable-diffusion-xl-v1-base/lora"
    );

    // The file starts a second run: every module finds its layer by its SDXL name.
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    let config = project(
        &again,
        &format!("resolution: 64\nnetwork_weights: {}\n", path.display()),
    );
    let out = train(&config, &["--dry-run"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("68 modules"), "{said}");
}

#[test]
fn generate_draws_sdxl_at_its_family_size_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["--model"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl"))
        // The height is given (a small picture keeps the test fast); the width is SDXL's.
        .args([
            "--prompt", "x", "--steps", "1", "--seed", "3", "--height", "64",
        ])
        .args(["--device", "cpu", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let picture = image::open(dir.path().join("00000-3.png")).unwrap();
    assert_eq!((picture.width(), picture.height()), (1024, 64));
}

#[test]
fn the_default_targets_take_q_k_v_and_out_of_the_second_text_encoder() {
    // A1111 applies an OpenCLIP attention LoRA only when q, k, v and out are all there.
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "resolution: 64\n");
    let out = train(&config, &["--dry-run", "--set", "train_text_encoder=true"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    // UNet 68; first encoder 3 layers × q/v; second 3 layers × q/k/v/out.
    assert!(said.contains("text encoder: 18 modules"), "{said}");
    assert!(!said.contains("some but not all"), "{said}");
    // A list that takes only q and v there is said before training.
    let out = train(
        &config,
        &[
            "--dry-run",
            "--set",
            "train_text_encoder=true",
            "--set",
            "target_modules=[q_proj, v_proj]",
        ],
    );
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("some but not all of q_proj, k_proj, v_proj and out_proj in 3 attention")
            && said.contains("text_model.encoder.layers.0.self_attn"),
        "{said}"
    );
}

#[test]
fn the_second_tokenizer_a_config_names_is_checked_before_training() {
    // `tokenizer_2` is checked before training like every other path (it was once ignored).
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-tokenizer");
    let config = project(
        dir.path(),
        &format!("resolution: 64\ntokenizer_2: {}\n", missing.display()),
    );
    let out = train(&config, &["--dry-run"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("no-such-tokenizer"), "{said}");
}

#[test]
fn the_sdxl_demo_config_trains_offline_in_seconds() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--config", "configs/demo_sdxl.yaml", "--quiet", "--set"])
        .arg(format!(
            "output_dir={}",
            out.path().join("demo_sdxl").display()
        ))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let dir = out.path().join("demo_sdxl");
    let bytes = std::fs::read(dir.join("demo_sdxl.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for prefix in ["lora_unet_input_blocks_", "lora_te1_", "lora_te2_"] {
        assert!(
            file.names().iter().any(|n| n.starts_with(prefix)),
            "{prefix}"
        );
    }
    assert!(dir.join("samples/demo_sdxl_000030_00_1.png").is_file());
}
