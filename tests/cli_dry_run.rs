//! `train --config X --dry-run`: the base model and the dataset are checked, the plan is printed,
//! nothing is written; user mistakes exit with status 2.

use std::path::Path;
use std::process::{Command, Output};

fn train(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_CACHE", dir.join("hf-cache"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the train binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A tiny project: 3 images with metadata.csv, the tiny SD 1.x fixture model, a config.
fn project(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = root.join("data/shapes");
    std::fs::create_dir_all(&data).unwrap();
    let mut csv = String::from("filename,prompt\n");
    for i in 0..3u8 {
        let name = format!("img{i}.png");
        image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([x as u8 * 4, y as u8 * 4, i * 80])
        })
        .save(data.join(&name))
        .unwrap();
        csv.push_str(&format!("{name},\"a shape, number {i}\"\n"));
    }
    std::fs::write(data.join("metadata.csv"), csv).unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1"),
        &root.join("models/tiny-sd"),
    );
    let config = format!(
        "train_data_dir: ./data/shapes\nmetadata_path: ./data/shapes/metadata.csv\n\
         base_model: ./models/tiny-sd\nresolution: 64\nbatch_size: 2\nepochs: 3\n\
         output_dir: ./output/shapes_v1\nsave_steps: 2\n{extra}"
    );
    std::fs::write(root.join("train.yaml"), config).unwrap();
    dir
}

/// Copies the folder `from` to `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            found.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
    found.sort();
    found
}

#[test]
fn a_missing_base_model_is_named() {
    let dir = project("");
    std::fs::remove_dir_all(dir.path().join("models/tiny-sd")).unwrap();
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("models/tiny-sd"),
        "{err}"
    );
    assert!(
        err.contains("does not exist") && err.contains("base_model"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_file_that_is_not_a_base_model_is_refused() {
    let dir = project("");
    std::fs::write(dir.path().join("models/notes.txt"), "hello").unwrap();
    let out = train(
        dir.path(),
        &[
            "--config",
            "train.yaml",
            "--set",
            "base_model=./models/notes.txt",
            "--dry-run",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("models/notes.txt") && err.contains("unknown file type"),
        "{err}"
    );
}

#[test]
fn a_folder_that_is_not_a_diffusers_model_is_refused() {
    let dir = project("");
    let out = train(
        dir.path(),
        &[
            "--config",
            "train.yaml",
            "--set",
            "base_model=./data",
            "--dry-run",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("neither model_index.json nor unet/config.json"),
        "{err}"
    );
}

#[test]
fn a_dry_run_prints_the_plan_and_writes_nothing() {
    let dir = project("gradient_accumulation_steps: 1\n");
    let before = files(dir.path());
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    // 3 images, batch 2 → 2 batches per epoch → 2 steps per epoch; 3 epochs → 6 steps.
    for expected in [
        "Dry run of train.yaml",
        "diffusers folder",
        "(SD 1.x-style",
        "3 images × 1 repeats = 3 samples per epoch, at 64 px",
        "batch size 2 × gradient accumulation 1 = effective batch 2",
        "2 batches per epoch → 2 optimizer steps per epoch",
        "3 epochs × 2 = 6 optimizer steps in all",
        "learning-rate warm-up: none",
        "step checkpoints: 2 of them, after steps 2, 4",
        "shapes_v1-step00000002.safetensors",
        "shapes_v1.safetensors",
        "modules: UNet: ",
    ] {
        assert!(
            stdout.contains(expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert_eq!(files(dir.path()), before, "a dry run wrote files");
}

#[test]
fn a_broken_dataset_exits_with_status_2() {
    let dir = project("");
    std::fs::remove_file(dir.path().join("data/shapes/img1.png")).unwrap();
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("img1.png"), "{err}");
}

#[test]
fn an_incomplete_model_is_refused_before_training_naming_the_missing_file() {
    let dir = project("");
    std::fs::remove_file(dir.path().join("models/tiny-sd/text_encoder/config.json")).unwrap();
    for args in [
        &["--config", "train.yaml", "--dry-run"][..],
        &["--config", "train.yaml"][..],
    ] {
        let out = train(dir.path(), args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("text_encoder/config.json"), "{err}");
    }
    assert!(!dir.path().join("output").exists());
}

#[test]
fn a_missing_prompt_file_fails_the_dry_run_as_it_would_the_run() {
    let dir = project("sample_prompts: ./prompts.txt\nsample_every_n_steps: 2\n");
    for args in [
        &["--config", "train.yaml", "--dry-run"][..],
        &["--config", "train.yaml"][..],
    ] {
        let out = train(dir.path(), args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("sample_prompts") && err.contains("prompts.txt"),
            "{err}"
        );
    }
    assert!(!dir.path().join("output").exists());
    // A malformed line is named by its line, in the dry run too.
    std::fs::write(dir.path().join("prompts.txt"), "a cat\na dog --w wide\n").unwrap();
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("prompts.txt line 2"), "{err}");
    std::fs::write(dir.path().join("prompts.txt"), "a cat --s 5\n").unwrap();
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn absurd_step_counts_are_refused_at_once_and_huge_plans_are_described_quickly() {
    let dir = project("");
    let start = std::time::Instant::now();
    for (set, needle) in [
        ("max_train_steps=4294967295", "max_train_steps"),
        ("epochs=9223372036854775807", "epochs"),
    ] {
        let out = train(
            dir.path(),
            &["--config", "train.yaml", "--dry-run", "--set", set],
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(needle) && err.contains("99999999"), "{err}");
    }
    // Each key within bounds, their product not: 2 steps per epoch × 60,000,000 epochs.
    let out = train(
        dir.path(),
        &[
            "--config",
            "train.yaml",
            "--dry-run",
            "--set",
            "epochs=60000000",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("epochs 60000000 × 2 optimizer steps"), "{err}");
    // The largest run allowed, with a checkpoint after every step, is planned without listing
    // its 99,999,998 checkpoints.
    let out = train(
        dir.path(),
        &[
            "--config",
            "train.yaml",
            "--dry-run",
            "--set",
            "max_train_steps=99999999",
            "--set",
            "save_steps=1",
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout
            .contains("step checkpoints: 99999998 of them, after steps 1, 2, 3, 4, 5, … 99999998"),
        "{stdout}"
    );
    assert!(start.elapsed().as_secs() < 60, "{:?}", start.elapsed());
}

#[test]
fn a_yaml_alias_bomb_is_refused_by_its_line() {
    let dir = project("");
    let mut text_ = std::fs::read_to_string(dir.path().join("train.yaml")).unwrap();
    text_.push_str("x0: &a0 [a, a, a, a, a, a, a, a, a, a]\n");
    for i in 1..9 {
        let p = i - 1;
        text_.push_str(&format!(
            "x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    std::fs::write(dir.path().join("train.yaml"), text_).unwrap();
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("train.yaml:") && err.contains("alias"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn a_named_pipe_or_a_folder_is_refused_instead_of_read() {
    let dir = project("");
    let fifo = dir.path().join("pipe.yaml");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    // Before, a FIFO given as the config (or as network_weights) blocked forever.
    let out = train(dir.path(), &["--config", "pipe.yaml", "--dry-run"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pipe.yaml") && err.contains("named pipe"),
        "{err}"
    );
    let out = train(dir.path(), &["--config", "/dev/zero", "--dry-run"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("character device"), "{err}");
    let out = train(
        dir.path(),
        &[
            "--config",
            "train.yaml",
            "--dry-run",
            "--set",
            "network_weights=./pipe.yaml",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pipe.yaml") && err.contains("named pipe"),
        "{err}"
    );
}

#[test]
fn unquoted_commas_in_captions_are_read_and_counted_in_the_dry_run() {
    let dir = project("");
    let csv = dir.path().join("data/shapes/metadata.csv");
    std::fs::write(
        &csv,
        "filename,prompt\nimg0.png,neon city, rain, night\nimg1.png,\"quoted, tags\"\nimg2.png,a, b\n",
    )
    .unwrap();
    let out = train(dir.path(), &["--config", "train.yaml", "--dry-run"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("2 row(s) of") && stdout.contains("(rows 2, 4)"),
        "{stdout}"
    );
}

#[test]
fn an_unset_resolution_of_a_model_not_downloaded_yet_is_said() {
    let dir = project("");
    let root = dir.path();
    let config = std::fs::read_to_string(root.join("train.yaml"))
        .unwrap()
        .replace(
            "base_model: ./models/tiny-sd\nresolution: 64\n",
            "base_model: org/some-model\n",
        );
    std::fs::write(root.join("train.yaml"), config).unwrap();
    let out = train(root, &["--config", "train.yaml", "--dry-run"]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("`resolution` is not set") && said.contains("512 px is used"),
        "{said}"
    );
    // A local model says its family: no warning, its default.
    let out = train(
        root,
        &[
            "--config",
            "train.yaml",
            "--dry-run",
            "--set",
            "base_model=./models/tiny-sd",
        ],
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!said.contains("`resolution` is not set"), "{said}");
    assert!(said.contains("at 512 px"), "{said}");
}
