//! `train --config`: how a broken config or a bad `--set` reaches the user (exit status 2, every
//! problem with its file and line or its argument, no panic), and that the bundled example
//! configs are valid.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_trainer::config::{LrScheduler, Optimizer, TargetModules, TrainPlan};

/// Runs `train` in `dir` with the given arguments.
fn train(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_CACHE", dir.join("hf-cache"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the train binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A user mistake: status 2, a message on stderr, no panic or backtrace, nothing on stdout.
fn assert_user_error(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn write_config(dir: &Path, text: &str) {
    std::fs::write(dir.join("train.yaml"), text).unwrap();
}

const VALID: &str = "train_data_dir: ./data\nbase_model: ./model\noutput_dir: ./out/run\n";

#[test]
fn a_broken_config_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "train_data_dir: ./data\nbase_model: ./model\nlora_rnak: 4\nlearning_rate: -1\n\
         resolution: 500\nnetwork_dim: 8\nlora_rank: 4\noptimizer: adam\n",
    );
    let err = assert_user_error(&train(dir.path(), &["--config", "train.yaml"]));
    for expected in [
        "error: the config has 6 problems:",
        "train.yaml: missing required key `output_dir`",
        "train.yaml:3: unknown key `lora_rnak`; did you mean `lora_rank`?",
        "train.yaml:4: `learning_rate`: must be greater than 0, found -1",
        "train.yaml:5: `resolution`: must be a multiple of 8 and at least 64 (pixels), found 500",
        "train.yaml:7: `lora_rank` and `network_dim` are the same key (also at line 6); keep one",
        "train.yaml:8: `optimizer`: unknown optimizer `adam`; valid: AdamW, AdamW8bit, Lion, SGD",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
}

#[test]
fn a_wrong_type_names_the_expected_type() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &format!("{VALID}batch_size: four\n"));
    let err = assert_user_error(&train(dir.path(), &["--config", "train.yaml"]));
    assert_eq!(
        err,
        "error: train.yaml:4: `batch_size`: expected an integer, found the text `four`\n"
    );
}

#[test]
fn set_errors_name_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), VALID);
    let out = train(
        dir.path(),
        &[
            "--config",
            "train.yaml",
            "--set",
            "lora_rank=0",
            "--set",
            "target_modules=[q_proj",
            "--set",
            "epocs=3",
            "--set",
            "seed",
        ],
    );
    let err = assert_user_error(&out);
    for expected in [
        "--set lora_rank=0: `lora_rank`: must be at least 1, found 0",
        "--set target_modules=[q_proj: the value is not valid YAML",
        "--set epocs=3: unknown key `epocs`; did you mean `epochs`?",
        "--set seed: expected KEY=VALUE",
    ] {
        assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
    }
}

#[test]
fn yaml_syntax_errors_give_the_position() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "train_data_dir: ./data\nbase_model: [./model\noutput_dir: o\n",
    );
    let err = assert_user_error(&train(dir.path(), &["--config", "train.yaml"]));
    assert!(
        err.starts_with("error: train.yaml:") && err.contains("invalid YAML"),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_user_error(&train(dir.path(), &["--config", "nowhere.yaml"]));
    assert!(
        err.starts_with("error: nowhere.yaml: cannot read the config file:"),
        "{err}"
    );
}

#[test]
fn command_line_mistakes_exit_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--config <FILE>"));
    let out = train(dir.path(), &["--config", "x.yaml", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn example(name: &str) -> TrainPlan {
    let path = repo_path(&format!("configs/{name}"));
    let text = std::fs::read_to_string(&path).unwrap();
    match TrainPlan::from_yaml(&text, &path, &[], Path::new(env!("CARGO_MANIFEST_DIR"))) {
        Ok(plan) => plan,
        Err(e) => panic!("configs/{name} is invalid:\n{e}"),
    }
}

#[test]
fn the_example_configs_are_valid_and_say_what_they_promise() {
    let root = repo_path("");
    let p = example("cyberpunk_lora.yaml");
    assert_eq!(p.data.train_data_dir, root.join("data/cyberpunk_train"));
    assert_eq!(
        p.data.metadata_path,
        Some(root.join("data/cyberpunk_train/metadata.csv"))
    );
    assert_eq!(
        Path::new(&p.model.base_model),
        root.join("models/Stable-diffusion/v1-5-pruned.safetensors")
    );
    assert_eq!(
        (p.lora.rank, p.lora.alpha, p.lora.conv_lora),
        (8, 16.0, false)
    );
    assert_eq!(
        (
            p.training.batch_size,
            p.training.gradient_accumulation_steps
        ),
        (4, 2)
    );
    assert_eq!(
        (
            p.data.resolution,
            p.training.epochs,
            p.training.learning_rate
        ),
        (512, 12, 2e-4)
    );
    assert_eq!(
        (p.training.optimizer, p.training.scheduler),
        (Optimizer::AdamW8bit, LrScheduler::Cosine)
    );
    assert_eq!(p.output.output_dir, root.join("output/cyberpunk_v1"));
    assert_eq!(
        (p.output.output_name.as_str(), p.output.save_steps),
        ("cyberpunk_v1", Some(100))
    );

    let p = example("guofeng_lora.yaml");
    assert_eq!(p.data.train_data_dir, root.join("data/guofeng_shuimo"));
    assert_eq!(
        p.data.metadata_path,
        Some(root.join("data/guofeng_shuimo/metadata.csv"))
    );
    assert_eq!((p.lora.rank, p.lora.alpha, p.lora.dropout), (16, 32.0, 0.1));
    assert_eq!(
        p.lora.target_modules,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(
        (
            p.training.batch_size,
            p.training.epochs,
            p.training.learning_rate
        ),
        (4, 15, 2e-4)
    );
    assert_eq!(
        (p.training.scheduler, p.data.resolution),
        (LrScheduler::Cosine, 512)
    );
    assert_eq!(p.output.output_dir, root.join("output/guofeng_ink_lora"));
    assert_eq!(p.output.save_steps, Some(100));

    let p = example("sdxl_lora.yaml");
    assert_eq!(
        Path::new(&p.model.base_model),
        root.join("models/Stable-diffusion/sd_xl_base_1.0.safetensors")
    );
    assert_eq!((p.data.resolution, p.data.enable_bucket), (1024, true));
    assert_eq!((p.lora.rank, p.lora.alpha), (32, 16.0));
    assert!(!p.lora.train_text_encoder);
    assert!(p.training.gradient_checkpointing);
    assert_eq!(p.output.output_name.as_str(), "cyberpunk_xl_v1");

    let p = example("demo.yaml");
    assert_eq!(p.data.train_data_dir, root.join("data/demo"));
    assert_eq!(Path::new(&p.model.base_model), root.join("models/demo-sd"));
    assert_eq!(p.data.resolution, 64);
    assert_eq!(p.output.output_dir, root.join("output/demo"));
    assert!(p.output.save_steps.is_some());
    let p = example("demo_sdxl.yaml");
    assert_eq!(
        Path::new(&p.model.base_model),
        root.join("tests/fixtures/tiny-sdxl")
    );
    assert_eq!(p.data.resolution, 64);
    assert!(p.lora.train_text_encoder);
    for plan in [
        example("cyberpunk_lora.yaml"),
        example("guofeng_lora.yaml"),
        example("sdxl_lora.yaml"),
        example("demo.yaml"),
        example("demo_sdxl.yaml"),
    ] {
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }
}

#[test]
fn every_example_key_has_a_comment() {
    for name in [
        "cyberpunk_lora.yaml",
        "guofeng_lora.yaml",
        "sdxl_lora.yaml",
        "demo.yaml",
        "demo_sdxl.yaml",
    ] {
        let text = std::fs::read_to_string(repo_path(&format!("configs/{name}"))).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let is_key = !line.starts_with('#') && !line.starts_with(' ') && line.contains(':');
            if is_key {
                assert!(
                    i > 0 && lines[i - 1].starts_with('#'),
                    "{name}:{}: `{line}` has no comment above it",
                    i + 1
                );
            }
        }
    }
}
