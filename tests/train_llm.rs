//! `train` on a language model (`task: llm`) as a user runs it, on the tiny `qwen2` fixture
//! (byte-level tokenizer, Qwen2.5's chat template): the dry run's facts, a whole run's PEFT
//! folders and falling loss, a resume that ends bit-identical, continuing from a PEFT adapter,
//! and the refusals (a bad record by line, an image key, a target that matches nothing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QA: [(&str, &str); 4] = [
    ("What is the capital of France?", "Paris."),
    ("What do cats say?", "Meow."),
    ("Name a colour of the sky.", "Blue."),
    ("Say hello.", "Hello!"),
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/qwen2")
}

/// A project in `root`: 12 alpaca records and a config training 9 steps with a checkpoint
/// every 3; `extra` lines are appended to the config.
fn project(root: &Path, extra: &str) -> PathBuf {
    let mut lines = String::new();
    for i in 0..12 {
        let (q, a) = QA[i % QA.len()];
        lines.push_str(&format!(
            "{{\"instruction\": \"{q}\", \"input\": \"\", \"output\": \"{a}\"}}\n"
        ));
    }
    std::fs::write(root.join("train.jsonl"), lines).unwrap();
    let config = root.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "base_model: {model}\ntrain_data: {data}\nmax_seq_length: 128\nlora_rank: 4\n\
             lora_alpha: 8\ntarget_modules: all-linear\nbatch_size: 4\nepochs: 3\n\
             learning_rate: 1e-2\noutput_dir: {out}\nsave_steps: 3\ndevice: cpu\n{extra}",
            model = fixture().display(),
            data = root.join("train.jsonl").display(),
            out = root.join("out/run").display()
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
        .arg("--quiet")
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

fn tensors(folder: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(folder.join("adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t: Vec<(String, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    t.sort();
    t
}

#[test]
fn the_dry_run_reports_the_records_their_lengths_and_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    // `task` is not written: `train_data` without `train_data_dir` says it.
    let config = project(dir.path(), "");
    let out = train(&config, &["--dry-run"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("Qwen2ForCausalLM (2 layers"), "{t}");
    assert!(t.contains("prompts: the model's chat template"), "{t}");
    assert!(t.contains("12 records (alpaca)"), "{t}");
    // Every record is longer than 40 tokens (Qwen's default system prompt comes first): all
    // are cut before their answers, and none is left to train on.
    let out = train(&config, &["--dry-run", "--set", "max_seq_length=40"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no record has a token to learn within max_seq_length (40)"));
    let out = train(&config, &["--dry-run", "--set", "max_seq_length=128"]);
    let t = text(&out);
    assert!(
        t.contains("max_seq_length 128: 0 record(s) longer are cut to it"),
        "{t}"
    );
    assert!(
        t.contains("down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: 14 modules"),
        "{t}"
    );
    assert!(t.contains("3 optimizer steps per epoch"), "{t}");
    assert!(t.contains("final adapter folder:"), "{t}");
    // A record whose question fills max_seq_length is left out, and said; one whose answer is
    // long is cut and kept.
    let data = dir.path().join("train.jsonl");
    let mut lines = std::fs::read_to_string(&data).unwrap();
    let long = "very ".repeat(40);
    lines.push_str(&format!(
        "{{\"instruction\": \"Is it {long}long?\", \"output\": \"Yes.\"}}\n\
         {{\"instruction\": \"Say it.\", \"output\": \"It is {long}long.\"}}\n"
    ));
    std::fs::write(&data, lines).unwrap();
    let out = train(&config, &["--dry-run"]);
    let t = text(&out);
    assert!(t.contains("14 records (alpaca), 13 trained on"), "{t}");
    assert!(
        t.contains("max_seq_length 128: 2 record(s) longer are cut to it"),
        "{t}"
    );
    assert!(
        t.contains("left out (no answer token within max_seq_length): line(s) 13"),
        "{t}"
    );
    // Packing: the twelve short samples (~100 tokens) two to a sequence of 256, the two long
    // ones (217) alone.
    let out = train(
        &config,
        &[
            "--dry-run",
            "--set",
            "packing=true",
            "--set",
            "max_seq_length=256",
        ],
    );
    let t = text(&out);
    assert!(
        t.contains("14 records (alpaca), packed into 8 sequences of at most 256 tokens"),
        "{t}"
    );
    assert!(!dir.path().join("out").exists(), "a dry run writes nothing");
}

#[test]
fn a_run_writes_peft_folders_and_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "");
    let out = train(&config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let run = dir.path().join("out/run");
    for name in [
        "run",
        "run-step00000003",
        "run-step00000006",
        "state-step00000006",
    ] {
        assert!(run.join(name).is_dir(), "{name} missing: {}", text(&out));
    }
    let final_tensors = tensors(&run.join("run"));
    // 14 linear layers × (lora_A, lora_B), under PEFT's keys.
    assert_eq!(final_tensors.len(), 28);
    assert!(final_tensors
        .iter()
        .any(|(k, _)| k == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let config_json = std::fs::read_to_string(run.join("run/adapter_config.json")).unwrap();
    let config_json: serde_json::Value = serde_json::from_str(&config_json).unwrap();
    assert_eq!(config_json["peft_type"], "LORA");
    assert_eq!(config_json["task_type"], "CAUSAL_LM");
    assert_eq!(config_json["r"], 4);
    assert_eq!(config_json["target_modules"].as_array().unwrap().len(), 7);
    // The loss fell from ln(320) ≈ 5.77 (a random model knows nothing).
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_summary.json")).unwrap())
            .unwrap();
    let last = summary["final_loss"].as_f64().unwrap();
    assert!(last < 5.0, "final loss {last}");

    // A second folder holding only the state after step 6 finishes to the same bytes.
    let resumed = dir.path().join("out/resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let state = run.join("state-step00000006");
    let copy = resumed.join("state-step00000006");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(&state).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let out = train(
        &config,
        &[
            "--set",
            &format!("output_dir={}", resumed.display()),
            "--set",
            "output_name=run",
            "--resume",
            "latest",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(tensors(&resumed.join("run")), final_tensors);

    // Another learning rate would not continue the same run: refused, naming the key.
    let out = train(
        &config,
        &[
            "--set",
            &format!("output_dir={}", resumed.display()),
            "--set",
            "learning_rate=3e-2",
            "--resume",
            &copy.display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("`learning_rate`"), "{}", text(&out));
}

#[test]
fn network_weights_continue_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "");
    let out = train(&config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let first = dir.path().join("out/run/run");
    // One step at a negligible rate from the adapter: the same matrices come out.
    let out = train(
        &config,
        &[
            "--set",
            &format!("network_weights={}", first.display()),
            "--set",
            &format!("output_dir={}", dir.path().join("out/next").display()),
            "--set",
            "learning_rate=1e-12",
            "--set",
            "max_train_steps=1",
            "--set",
            "lora_rank=2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let read = |folder: &Path| {
        candle_core::safetensors::load(
            folder.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (read(&first), read(&dir.path().join("out/next/next")));
    assert_eq!(a.len(), b.len());
    for (key, x) in &a {
        let y = &b[key];
        // The file's rank (4), not lora_rank (2), decides.
        assert_eq!(x.dims(), y.dims(), "{key}");
        let diff = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{key}: {diff}");
    }
}

#[test]
fn bad_records_image_keys_and_unmatched_targets_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "");
    let data = dir.path().join("train.jsonl");
    let mut lines = std::fs::read_to_string(&data).unwrap();
    lines.push_str("{\"instruction\": \"no answer\"}\nnot json\n");
    std::fs::write(&data, lines).unwrap();
    let out = train(&config, &["--dry-run"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("line 13") && t.contains("line 14"), "{t}");

    let config = project(dir.path(), "resolution: 512\nunet_lr: 1e-4\n");
    let out = train(&config, &["--dry-run"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("`resolution` is a key of image training") && t.contains("`unet_lr`"),
        "{t}"
    );

    let config = project(dir.path(), "");
    let out = train(
        &config,
        &["--dry-run", "--set", "target_modules=[q_proj, to_k]"],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("`to_k`") && t.contains("language model"), "{t}");
}

#[test]
fn the_bundled_demo_runs_as_the_readme_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(root)
        .args(["--config", "configs/demo_llm.yaml", "--quiet", "--set"])
        .arg(format!(
            "output_dir={}",
            dir.path().join("demo_llm").display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("demo_llm/train_summary.json")).unwrap(),
    )
    .unwrap();
    let average = summary["average_loss"].as_f64().unwrap();
    assert!(
        average < 2.0,
        "the demo did not learn: average loss {average}"
    );
    // The adapted model answers like a pirate; the base model does not.
    let chat = |adapter: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat"));
        cmd.current_dir(root).args([
            "--model",
            "models/demo-llm",
            "--prompt",
            "What colour is the sky?",
            "--max-new-tokens",
            "24",
        ]);
        if let Some(adapter) = adapter {
            cmd.arg("--adapter").arg(adapter);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let adapted = chat(Some(&dir.path().join("demo_llm/demo_llm")));
    assert!(
        adapted.starts_with("Arr,") && adapted.contains("matey"),
        "{adapted}"
    );
    assert!(!chat(None).contains("matey"));
}

#[test]
fn validation_loss_and_sample_answers_are_logged_during_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(
        dir.path(),
        "val_split: 0.25\neval_steps: 2\nsample_prompts: [Say hello., What do cats say?]\n\
         sample_every_n_steps: 3\nsample_max_new_tokens: 5\n",
    );
    let out = train(&config, &["--dry-run"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // 12 records: 3 held out, 9 trained on (3 batches of 4, 3 epochs: 9 steps).
    assert!(
        t.contains("validation: 3 records held out of train_data by val_split 0.25"),
        "{t}"
    );
    assert!(
        t.contains("2 prompt(s) answered greedily (at most 5 tokens) every 3 steps"),
        "{t}"
    );
    let out = train(&config, &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for step in [2, 4, 6, 8, 9] {
        assert!(
            t.contains(&format!("validation loss after step {step}: ")),
            "{t}"
        );
    }
    let run = dir.path().join("out/run");
    let samples = std::fs::read_to_string(run.join("samples/run_step00000009.txt")).unwrap();
    assert!(samples.starts_with("### Say hello.\n\n"), "{samples}");
    assert!(samples.contains("### What do cats say?\n\n"), "{samples}");
    let mut tags = std::collections::BTreeSet::new();
    for path in lora_trainer::log::event_reader::event_files(&run.join("logs")).unwrap() {
        for event in lora_trainer::log::event_reader::read_event_file(&path).unwrap() {
            if let lora_trainer::log::event::EventKind::Summary(values) = event.kind {
                tags.extend(values.into_iter().map(|v| v.tag));
            }
        }
    }
    for tag in [
        "loss/validation",
        "lr/lora",
        "perf/tokens_per_sec",
        "samples/0",
        "samples/1",
    ] {
        assert!(tags.contains(tag), "{tag} not logged: {tags:?}");
    }
}

#[test]
fn a_hub_id_in_the_hugging_face_cache_is_a_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "");
    let cache = dir.path().join("hub");
    let repo = cache.join("models--tiny--qwen2");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let dry_run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_train"))
            .arg("--config")
            .arg(&config)
            .args(["--dry-run", "--set", &format!("base_model={id}")])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let out = dry_run("tiny/qwen2");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&snapshot.display().to_string()), "{t}");
    assert!(t.contains("Qwen2ForCausalLM (2 layers"), "{t}");
    let out = dry_run("tiny/absent");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("huggingface-cli download tiny/absent"), "{t}");
}
