//! `generate` end to end: base models from a diffusers folder, a single checkpoint file and a
//! hub id in the Hugging Face cache; LoRAs from `--lora FILE:WEIGHT` and `<lora:name:w>` tags;
//! PNGs named `NNNNN-<seed>.png` whose `parameters` chunk reads back as A1111 writes it; exit
//! status 2 with the reason for bad input.

mod generate_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use generate_support::*;
use lora_trainer::config::SaveFormat;
use lora_trainer::generate::png_info::{parse_infotext, read_parameters};
use lora_trainer::lora::LoraFile;

fn generate(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_generate"));
    // Small and quick unless the test says otherwise.
    for (option, value) in [
        ("--device", "cpu"),
        ("--width", "64"),
        ("--height", "64"),
        ("--steps", "2"),
    ] {
        if !args.contains(&option) {
            cmd.args([option, value]);
        }
    }
    cmd.args(args).env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn written(o: &Output) -> Vec<PathBuf> {
    assert!(o.status.success(), "generate failed: {}", stderr(o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Two LoRA files in `dir/loras` (one in a subfolder), made with the crate's export.
fn loras(dir: &Path) -> (PathBuf, PathBuf) {
    let ckpt = tiny();
    let layers = mixed_layers(&ckpt);
    let a: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| adapter(l, 4, 2.0, 30 + i as u64))
        .collect();
    let b: Vec<_> = layers[..2]
        .iter()
        .enumerate()
        .map(|(i, l)| adapter(l, 2, 2.0, 60 + i as u64))
        .collect();
    let root = dir.join("loras");
    std::fs::create_dir_all(root.join("styles")).unwrap();
    (
        save(&a, &root.join("styles"), "neon", SaveFormat::Kohya),
        save(&b, &root, "extra", SaveFormat::Kohya),
    )
}

#[test]
fn folder_model_with_stacked_loras_writes_pngs_with_a1111_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (neon, extra) = loras(dir.path());
    let out = dir.path().join("images");
    let lora_dir = dir.path().join("loras");
    let extra_arg = format!("{}:0.5", extra.display());
    let out_s = out.to_str().unwrap();
    let o = generate(
        &[
            "--model",
            fixture("tiny-sd1").to_str().unwrap(),
            "--prompt",
            "a neon city, <lora:neon:0.8>",
            "--negative-prompt",
            "blurry",
            "--lora",
            &extra_arg,
            "--lora-dir",
            lora_dir.to_str().unwrap(),
            "--seed",
            "42",
            "--n",
            "2",
            "--sampler",
            "dpmpp_2m",
            "--out",
            out_s,
        ],
        &[],
    );
    let files = written(&o);
    assert_eq!(
        files,
        vec![out.join("00000-42.png"), out.join("00001-43.png")]
    );

    let bytes = std::fs::read(&files[1]).unwrap();
    let text = read_parameters(&bytes)
        .unwrap()
        .expect("a parameters chunk");
    let info = parse_infotext(&text);
    assert_eq!(info.prompt, "a neon city, <lora:neon:0.8> <lora:extra:0.5>");
    assert_eq!(info.negative_prompt, "blurry");
    let hash = |p: &Path| LoraFile::read(p).unwrap().metadata["sshs_model_hash"][..12].to_string();
    let expected = [
        ("Steps", "2".to_string()),
        ("Sampler", "DPM++ 2M".to_string()),
        ("Schedule type", "DDIM".to_string()),
        ("CFG scale", "7.5".to_string()),
        ("Seed", "43".to_string()),
        ("Size", "64x64".to_string()),
        ("Model", "tiny-sd1".to_string()),
        (
            "Lora hashes",
            format!("extra: {}, neon: {}", hash(&extra), hash(&neon)),
        ),
        (
            "Version",
            format!("lora-trainer {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    let got: Vec<(String, String)> = info.fields.clone();
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    assert_eq!(got, want, "{text}");
    let image = image::load_from_memory(&bytes).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));

    // A second run continues the numbering and reproduces seed 42's picture.
    let o = generate(
        &[
            "--model",
            fixture("tiny-sd1").to_str().unwrap(),
            "--prompt",
            "a neon city, <lora:neon:0.8>",
            "--negative-prompt",
            "blurry",
            "--lora",
            &extra_arg,
            "--lora-dir",
            lora_dir.to_str().unwrap(),
            "--seed",
            "42",
            "--sampler",
            "dpmpp_2m",
            "--out",
            out_s,
        ],
        &[],
    );
    assert_eq!(written(&o), vec![out.join("00002-42.png")]);
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8();
    assert_eq!(pixels(&out.join("00002-42.png")), pixels(&files[0]));
}

#[test]
fn single_file_and_hub_models_work() {
    let dir = tempfile::tempdir().unwrap();
    let run = |model: &str, extra: &[&str], env: &[(&str, &Path)], out: &str| -> PathBuf {
        let out = dir.path().join(out);
        let mut args = vec![
            "--model",
            model,
            "--prompt",
            "a red cube",
            "--seed",
            "7",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        written(&generate(&args, env)).remove(0)
    };
    let folder = run(fixture("tiny-sd1").to_str().unwrap(), &[], &[], "folder");

    let single = fixture("tiny-sd1.safetensors");
    let tokenizer = fixture("tiny-sd1/tokenizer");
    let file = run(
        single.to_str().unwrap(),
        &["--tokenizer", tokenizer.to_str().unwrap()],
        &[],
        "file",
    );
    let text = read_parameters(&std::fs::read(&file).unwrap())
        .unwrap()
        .unwrap();
    let info = parse_infotext(&text);
    let sha = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(std::fs::read(&single).unwrap());
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(info.get("Model hash"), Some(&sha[..10]));
    assert_eq!(info.get("Model"), Some("tiny-sd1"));

    // A hub id already in the Hugging Face cache, offline.
    let cache = dir.path().join("hf");
    let repo = cache.join("models--org--tiny-sd1");
    copy_tree(&fixture("tiny-sd1"), &repo.join("snapshots/abc123"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    let hub = run("org/tiny-sd1", &[], &[("HF_HUB_CACHE", &cache)], "hub");
    let text = read_parameters(&std::fs::read(&hub).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(parse_infotext(&text).get("Model"), Some("org/tiny-sd1"));

    // The same files through the cache draw the same picture. (A single file samples with
    // Stable Diffusion's default scheduler config, not the folder's, so its picture differs;
    // generate_pipeline.rs compares its models with the folder's.)
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8();
    assert_eq!(pixels(&hub), pixels(&folder), "hub id = the same folder");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn bad_input_exits_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (neon, _) = loras(dir.path());
    // A LoRA whose training diverged: one value NaN.
    let mut tensors = candle_core::safetensors::load(&neon, &candle_core::Device::Cpu).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.ends_with("lora_up.weight"))
        .unwrap()
        .clone();
    let t = &tensors[&key];
    let mut values = t
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[0] = f32::NAN;
    let nan = candle_core::Tensor::from_vec(values, t.dims(), &candle_core::Device::Cpu).unwrap();
    tensors.insert(key.clone(), nan);
    let nan_file = dir.path().join("diverged.safetensors");
    candle_core::safetensors::save(&tensors, &nan_file).unwrap();
    let nan_file = nan_file.to_str().unwrap().to_string();
    let nan_weight = format!("{}:nan", neon.display());
    let nan_key = format!("`{key}` holds NaN");
    let model = fixture("tiny-sd1");
    let model = model.to_str().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let lora_dir = dir.path().join("loras");
    let lora_dir = lora_dir.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--model",
                model,
                "--prompt",
                "x <lora:neom:1>",
                "--lora-dir",
                lora_dir,
            ],
            "<lora:neom:1>: no LoRA named `neom`",
        ),
        (
            vec!["--model", model, "--prompt", "x <lora:neon:1>"],
            "no --lora-dir was given",
        ),
        (
            vec!["--model", model, "--prompt", "x", "--width", "100"],
            "--width: 100 is not a multiple of 8",
        ),
        (
            vec!["--model", "no/such/folder/model", "--prompt", "x"],
            "does not exist",
        ),
        (
            vec![
                "--model",
                model,
                "--prompt",
                "x",
                "--lora",
                "missing.safetensors",
            ],
            "missing.safetensors does not exist",
        ),
        (
            vec!["--model", model, "--prompt", "x", "--sampler", "lms"],
            "unknown sampler `lms`",
        ),
        (
            vec!["--model", model, "--prompt", "x", "--cfg", "NaN"],
            "--cfg: `NaN` is not a finite number",
        ),
        (
            vec!["--model", model, "--prompt", "x", "--lora", &nan_weight],
            "the weight `nan` is not a finite number",
        ),
        (
            vec![
                "--model",
                model,
                "--prompt",
                "x <lora:neon:inf>",
                "--lora-dir",
                lora_dir,
            ],
            "the weight `inf` is not a number",
        ),
        (
            vec!["--model", model, "--prompt", "x", "--lora", &nan_file],
            &nan_key,
        ),
    ];
    for (mut args, expected) in cases {
        args.extend(["--out", out]);
        let o = generate(&args, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
    assert!(!Path::new(out).exists(), "nothing is written on error");
}

#[test]
fn unmatched_lora_keys_fail_unless_lenient() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tiny();
    let layers = mixed_layers(&ckpt);
    let good = adapter(&layers[0], 4, 4.0, 3);
    let name = lora_trainer::lora::LoraModel::Unet.kohya_name(&layers[0].1);
    let stray = "lora_unet_mid_block_attentions_5_proj_out";
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = [
        (
            format!("{name}.lora_down.weight"),
            good.down().as_tensor().clone(),
        ),
        (
            format!("{name}.lora_up.weight"),
            good.up().as_tensor().clone(),
        ),
        (
            format!("{stray}.lora_down.weight"),
            pseudo_random(&[4, 32], 1, 0.1),
        ),
        (
            format!("{stray}.lora_up.weight"),
            pseudo_random(&[32, 4], 2, 0.1),
        ),
    ]
    .into_iter()
    .collect();
    let path = dir.path().join("foreign.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let out = dir.path().join("out");
    let args = |lenient: bool| {
        let mut a = vec![
            "--model".to_string(),
            fixture("tiny-sd1").display().to_string(),
            "--prompt".into(),
            "x".into(),
            "--lora".into(),
            path.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if lenient {
            a.push("--lenient".into());
        }
        a
    };
    let strict = args(false);
    let o = generate(&strict.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("`{stray}.lora_down.weight`")),
        "{}",
        stderr(&o)
    );
    let lenient = args(true);
    let o = generate(&lenient.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(written(&o).len(), 1);
    assert!(stderr(&o).contains("warning:") && stderr(&o).contains(stray));
}
