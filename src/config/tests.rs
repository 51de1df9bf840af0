//! The config's behaviour as a user meets it: defaults, aliases, overrides and every error class.

use std::path::{Path, PathBuf};

use super::*;

const REQUIRED: &str = "train_data_dir: data/x\nbase_model: ./models/sd\noutput_dir: out/run1\n";

fn cwd() -> PathBuf {
    PathBuf::from("/work/project")
}

fn plan_with(text: &str, sets: &[&str]) -> Result<TrainPlan, ConfigError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainPlan::from_yaml(text, Path::new("cfg.yaml"), &sets, &cwd())
}

fn plan(extra: &str) -> TrainPlan {
    match plan_with(&format!("{REQUIRED}{extra}"), &[]) {
        Ok(plan) => plan,
        Err(e) => panic!("config should be valid:\n{e}"),
    }
}

/// The problems of an invalid config, one string each.
fn problems(text: &str, sets: &[&str]) -> Vec<String> {
    match plan_with(text, sets) {
        Ok(_) => panic!("config should be invalid:\n{text}"),
        Err(e) => e.problems(),
    }
}

/// The single problem caused by `extra` (lines 4+ of a valid config).
fn problem(extra: &str) -> String {
    let found = problems(&format!("{REQUIRED}{extra}"), &[]);
    assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
    found.into_iter().next().unwrap()
}

#[test]
fn defaults_fill_every_optional_key() {
    let p = plan("");
    assert_eq!(p.data.caption_extension, ".txt");
    assert_eq!(p.data.resolution, 512);
    assert_eq!(
        (
            p.data.min_bucket_reso,
            p.data.max_bucket_reso,
            p.data.bucket_reso_steps
        ),
        (256, 1024, 64)
    );
    assert_eq!(
        (p.data.repeats, p.data.keep_tokens, p.data.seed),
        (1, 0, 42)
    );
    assert_eq!(p.data.metadata_path, None);
    assert!(
        !p.data.enable_bucket && !p.data.flip_aug && !p.data.random_crop && !p.data.shuffle_caption
    );
    assert_eq!(p.model.clip_skip, 1);
    assert_eq!(p.model.prediction_type, None);
    assert_eq!(
        (
            p.lora.rank,
            p.lora.alpha,
            p.lora.conv_rank,
            p.lora.conv_alpha
        ),
        (8, 8.0, 8, 8.0)
    );
    assert_eq!(
        p.lora.target_modules,
        TargetModules::Preset(TargetPreset::Default)
    );
    assert!(p.lora.train_text_encoder && !p.lora.conv_lora);
    assert_eq!(
        (p.lora.save_precision, p.lora.save_format),
        (SavePrecision::Fp16, SaveFormat::Kohya)
    );
    let t = &p.training;
    assert_eq!(
        (
            t.batch_size,
            t.gradient_accumulation_steps,
            t.epochs,
            t.max_train_steps
        ),
        (1, 1, 10, None)
    );
    assert_eq!(
        (t.learning_rate, t.unet_lr, t.text_encoder_lr),
        (1e-4, 1e-4, 1e-4)
    );
    assert_eq!(
        (t.optimizer, t.scheduler),
        (Optimizer::AdamW, LrScheduler::Constant)
    );
    assert_eq!(
        (t.weight_decay, t.adam_beta1, t.adam_beta2, t.adam_epsilon),
        (0.01, 0.9, 0.999, 1e-8)
    );
    assert_eq!(
        (t.warmup, t.lr_scheduler_num_cycles, t.lr_scheduler_power),
        (Warmup::Steps(0), 1, 1.0)
    );
    assert_eq!(
        (t.max_grad_norm, t.min_snr_gamma, t.noise_offset),
        (1.0, None, 0.0)
    );
    assert_eq!(
        (t.mixed_precision, t.device),
        (MixedPrecision::No, DeviceChoice::Auto)
    );
    assert!(t.cache_latents && !t.cache_latents_to_disk && !t.gradient_checkpointing);
    assert_eq!(p.output.log_with, LogWith::Tensorboard);
    assert_eq!(
        (
            p.output.save_steps,
            p.output.save_every_n_epochs,
            p.output.save_last_n
        ),
        (None, None, None)
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn relative_paths_start_at_the_current_directory_and_derived_values_follow() {
    let p = plan("metadata_path: ./data/x/metadata.csv\nnetwork_weights: ../w.safetensors\n");
    assert_eq!(p.data.train_data_dir, PathBuf::from("/work/project/data/x"));
    assert_eq!(
        p.data.metadata_path,
        Some(PathBuf::from("/work/project/data/x/metadata.csv"))
    );
    assert_eq!(p.model.base_model, "/work/project/models/sd");
    assert_eq!(
        p.lora.network_weights,
        Some(PathBuf::from("/work/project/../w.safetensors"))
    );
    assert_eq!(p.output.output_dir, PathBuf::from("/work/project/out/run1"));
    assert_eq!(p.output.output_name, "run1");
    assert_eq!(
        p.output.log_dir,
        PathBuf::from("/work/project/out/run1/logs")
    );
    assert_eq!(
        p.output.final_file(),
        PathBuf::from("/work/project/out/run1/run1.safetensors")
    );
    assert_eq!(
        p.output.step_file_name(100),
        "run1-step00000100.safetensors"
    );
    let abs = plan("output_name: style\nlog_dir: /tmp/logs\n");
    assert_eq!(
        (
            abs.output.output_name.as_str(),
            abs.output.log_dir.as_path()
        ),
        ("style", Path::new("/tmp/logs"))
    );
}

#[test]
fn hub_ids_stay_hub_ids() {
    let p = plan_with(
        "train_data_dir: d\nbase_model: stable-diffusion-v1-5/stable-diffusion-v1-5\noutput_dir: o\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        p.model.base_model,
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    );
}

#[test]
fn kohya_aliases_are_accepted() {
    let p = plan(
        "network_dim: 16\nnetwork_alpha: 32\nnetwork_dropout: 0.1\nconv_dim: 4\ntrain_batch_size: 2\n\
         max_train_epochs: 3\noptimizer_type: adamw8bit\nlr_scheduler: cosine\nnum_repeats: 5\n\
         caption_extention: caption\nsave_every_n_steps: 50\nlogging_dir: logs\n\
         v_parameterization: true\nnetwork_train_unet_only: true\n",
    );
    assert_eq!(
        (p.lora.rank, p.lora.alpha, p.lora.dropout, p.lora.conv_rank),
        (16, 32.0, 0.1, 4)
    );
    assert_eq!((p.training.batch_size, p.training.epochs), (2, 3));
    assert_eq!(p.training.optimizer.as_str(), "AdamW8bit");
    assert_eq!(p.training.scheduler, LrScheduler::Cosine);
    assert_eq!(p.data.repeats, 5);
    assert_eq!(p.data.caption_extension, ".caption");
    assert_eq!(p.output.save_steps, Some(50));
    assert_eq!(p.output.log_dir, PathBuf::from("/work/project/logs"));
    assert_eq!(p.model.prediction_type, Some(PredictionType::VPrediction));
    assert!(!p.lora.train_text_encoder);
    let text = "train_data_dir: d\npretrained_model_name_or_path: x/y\noutput_dir: o\nv_parameterization: false\n";
    let p = plan_with(text, &[]).unwrap();
    assert_eq!(
        (p.model.base_model.as_str(), p.model.prediction_type),
        ("x/y", None)
    );
    let p = plan("network_train_unet_only: false\ndataset_repeats: 2\nnum_train_epochs: 4\n");
    assert!(p.lora.train_text_encoder);
    assert_eq!((p.data.repeats, p.training.epochs), (2, 4));
}

#[test]
fn alias_and_canonical_name_together_are_a_duplicate() {
    let found = problem("lora_rank: 8\nnetwork_dim: 16\n");
    assert_eq!(
        found,
        "cfg.yaml:5: `network_dim` and `lora_rank` are the same key (also at line 4); keep one"
    );
    let found = problem("epochs: 2\nepochs: 3\n");
    assert_eq!(
        found,
        "cfg.yaml:5: `epochs` is given twice (also at line 4); keep one"
    );
}

#[test]
fn unknown_keys_suggest_the_closest_valid_key() {
    assert_eq!(
        problem("lora_rnak: 4\n"),
        "cfg.yaml:4: unknown key `lora_rnak`; did you mean `lora_rank`?"
    );
    assert_eq!(
        problem("learnig_rate: 1e-4\n"),
        "cfg.yaml:4: unknown key `learnig_rate`; did you mean `learning_rate`?"
    );
    assert!(problem("xformers: true\n")
        .starts_with("cfg.yaml:4: unknown key `xformers`; the valid keys"));
}

#[test]
fn wrong_types_name_the_expected_type() {
    assert_eq!(
        problem("lora_rank: eight\n"),
        "cfg.yaml:4: `lora_rank`: expected an integer, found the text `eight`"
    );
    assert_eq!(
        problem("flip_aug: yes\n"),
        "cfg.yaml:4: `flip_aug`: expected true or false, found the text `yes`"
    );
    assert_eq!(
        problem("learning_rate: fast\n"),
        "cfg.yaml:4: `learning_rate`: expected a number, found the text `fast`"
    );
    assert_eq!(
        problem("caption_prefix: [a, b]\n"),
        "cfg.yaml:4: `caption_prefix`: expected text, found a list"
    );
    assert!(problem("batch_size: 2.5\n").contains("expected an integer, found the number `2.5`"));
}

#[test]
fn values_out_of_range_are_refused() {
    let cases = [
        ("lora_rank: 0", "`lora_rank`: must be at least 1, found 0"),
        ("learning_rate: 0", "`learning_rate`: must be greater than 0, found 0"),
        ("learning_rate: -1e-4", "`learning_rate`: must be greater than 0, found -0.0001"),
        ("unet_lr: 0", "`unet_lr`: must be greater than 0"),
        ("resolution: 500", "`resolution`: must be a multiple of 8 and at least 64 (pixels), found 500"),
        ("resolution: 56", "found 56"),
        ("batch_size: 0", "`batch_size`: must be at least 1, found 0"),
        ("gradient_accumulation_steps: 0", "`gradient_accumulation_steps`: must be at least 1, found 0"),
        ("epochs: 0", "`epochs`: must be at least 1"),
        ("lora_dropout: 1.0", "`lora_dropout`: must be in [0, 1)"),
        ("rank_dropout: -0.1", "`rank_dropout`: must be in [0, 1)"),
        ("module_dropout: 1", "`module_dropout`: must be in [0, 1)"),
        ("caption_dropout_rate: 1.5", "`caption_dropout_rate`: must be in [0, 1)"),
        ("clip_skip: 0", "`clip_skip`: must be at least 1"),
        ("repeats: 0", "`repeats`: must be at least 1"),
        ("seed: -1", "`seed`: must be at least 0"),
        ("lora_alpha: -4", "`lora_alpha`: must be at least 0"),
        ("adam_beta1: 1", "`adam_beta1`: must be in [0, 1)"),
        ("min_snr_gamma: 0", "`min_snr_gamma`: must be greater than 0"),
        ("save_steps: 0", "`save_steps`: must be at least 1"),
        ("lr_warmup_steps: 1.5", "a ratio between 0 and 1 of the total steps, found 1.5"),
        ("lr_warmup_steps: -2", "`lr_warmup_steps`: must be at least 0, found -2"),
        ("optimizer: Adam", "unknown optimizer `Adam`; valid: AdamW, AdamW8bit, Lion, SGD"),
        ("scheduler: step", "unknown scheduler `step`; valid: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"),
        ("mixed_precision: fp8", "unknown mixed precision `fp8`; valid: no, fp16, bf16"),
        ("save_precision: float", "unknown save precision `float`; valid: fp16, bf16, fp32"),
        ("device: mps", "unknown device `mps`; valid: auto, cpu, cuda, cuda:N"),
        ("log_with: wandb", "unknown logger `wandb`; valid: tensorboard, none"),
        ("prediction_type: sample", "unknown prediction type `sample`; valid: epsilon, v_prediction"),
        ("target_modules: everything", "unknown target preset `everything`; valid: default, attn, kohya, all-linear; or a list"),
        ("target_modules: []", "the list is empty"),
        ("output_name: a/b", "`a/b` is not a file name"),
    ];
    for (line, expected) in cases {
        let found = problem(&format!("{line}\n"));
        assert!(found.starts_with("cfg.yaml:4: "), "{line}: {found}");
        assert!(
            found.contains(expected),
            "{line}:\n  found    {found}\n  expected {expected}"
        );
    }
}

#[test]
fn resolution_accepts_equal_width_and_height_only() {
    assert_eq!(plan("resolution: \"512,512\"\n").data.resolution, 512);
    assert_eq!(plan("resolution: 768,768\n").data.resolution, 768);
    assert_eq!(plan("resolution: [640, 640]\n").data.resolution, 640);
    let found = problem("resolution: \"512,768\"\n");
    assert!(
        found.contains("width and height differ (512,768)")
            && found.contains("enable_bucket: true"),
        "{found}"
    );
}

#[test]
fn bucket_settings_are_checked_together_when_bucketing() {
    let bucketing = |extra: &str| problems(&format!("{REQUIRED}enable_bucket: true\n{extra}"), &[]);
    let found = bucketing("min_bucket_reso: 1024\nmax_bucket_reso: 320\n");
    assert_eq!(
        found,
        ["cfg.yaml:5: `min_bucket_reso` (1024) is larger than `max_bucket_reso` (320)"]
    );
    let found = bucketing("resolution: 128\n");
    assert_eq!(
        found,
        ["cfg.yaml:5: with `enable_bucket`, `resolution` (128) must lie between `min_bucket_reso` (256) and `max_bucket_reso` (1024)"]
    );
    let found = bucketing("bucket_reso_steps: 12\n");
    assert_eq!(
        found,
        ["cfg.yaml:5: `bucket_reso_steps`: must be a multiple of 8 (64 is usual), found 12"]
    );
    // The same numbers are harmless without bucketing; small bucket steps are fine.
    plan("min_bucket_reso: 1024\nmax_bucket_reso: 320\nresolution: 128\n");
    assert_eq!(
        plan("enable_bucket: true\nbucket_reso_steps: 32\n")
            .data
            .bucket_reso_steps,
        32
    );
}

#[test]
fn missing_required_keys_are_all_named() {
    let found = problems("lora_rank: 4\n", &[]);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].starts_with("cfg.yaml: missing required key `base_model`"));
    assert!(found[1].starts_with("cfg.yaml: missing required key `train_data_dir`"));
    assert!(found[2].starts_with("cfg.yaml: missing required key `output_dir`"));
    let found = problems("train_data_dir:\nbase_model: m\noutput_dir: o\n", &[]);
    assert_eq!(
        found,
        ["cfg.yaml:1: `train_data_dir` needs a value (the folder of training images)"]
    );
    assert_eq!(problems("", &[]).len(), 3);
}

#[test]
fn all_problems_are_reported_at_once_in_line_order() {
    let text = format!("{REQUIRED}lora_rank: 0\nlerning_rate: 1\nbatch_size: many\nflip_aug: true\nflip_aug: false\n");
    let err = plan_with(&text, &["optimizer=Adam", "seed"]).unwrap_err();
    let lines: Vec<_> = err.problems();
    assert_eq!(lines.len(), 6, "{lines:#?}");
    assert!(lines[0].starts_with("cfg.yaml:4:") && lines[1].starts_with("cfg.yaml:5:"));
    assert!(lines[2].starts_with("cfg.yaml:6:") && lines[3].starts_with("cfg.yaml:8:"));
    assert!(lines[4].starts_with("--set optimizer=Adam: "));
    assert!(lines[5].starts_with("--set seed: "));
    assert!(err
        .to_string()
        .starts_with("the config has 6 problems:\n  cfg.yaml:4:"));
}

#[test]
fn set_overrides_parse_as_yaml_and_replace_file_values() {
    let text = format!("{REQUIRED}lora_rank: 0\n");
    let sets = [
        "lora_rank=16",
        "target_modules=[q_proj,v_proj]",
        "learning_rate=1e-4",
        "caption_prefix=sks style",
    ];
    let p = plan_with(&text, &sets).unwrap();
    assert_eq!(p.lora.rank, 16);
    assert_eq!(
        p.lora.target_modules,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(p.training.learning_rate, 1e-4);
    assert_eq!(p.data.caption_prefix.as_deref(), Some("sks style"));
    // An alias on the command line replaces the canonical key in the file.
    assert_eq!(plan_with(&text, &["network_dim=4"]).unwrap().lora.rank, 4);
    // Overrides may supply required keys.
    let p = plan_with("", &["train_data_dir=d", "base_model=./m", "output_dir=o"]).unwrap();
    assert_eq!(p.output.output_name, "o");
}

#[test]
fn set_errors_name_the_argument() {
    let bad = |arg: &str| {
        let found = problems(REQUIRED, &[arg]);
        assert_eq!(found.len(), 1, "{found:?}");
        found.into_iter().next().unwrap()
    };
    assert_eq!(
        bad("lora_rank"),
        "--set lora_rank: expected KEY=VALUE, e.g. `--set learning_rate=1e-4`"
    );
    assert_eq!(bad("=4"), "--set =4: the key before `=` is empty");
    assert_eq!(
        bad("lora_rank=0"),
        "--set lora_rank=0: `lora_rank`: must be at least 1, found 0"
    );
    assert_eq!(
        bad("lora_rnak=4"),
        "--set lora_rnak=4: unknown key `lora_rnak`; did you mean `lora_rank`?"
    );
    assert!(bad("target_modules=[q_proj")
        .starts_with("--set target_modules=[q_proj: the value is not valid YAML"));
    let twice = problems(REQUIRED, &["lora_rank=4", "network_dim=8"]);
    assert_eq!(twice, ["--set network_dim=8: `network_dim` and `lora_rank` are the same key (also at --set lora_rank=4); keep one"]);
}

#[test]
fn lora_alpha_zero_means_rank_and_conv_values_follow_their_defaults() {
    let p = plan("lora_rank: 16\nlora_alpha: 0\nconv_lora: true\nconv_rank: 4\n");
    assert_eq!(
        (p.lora.alpha, p.lora.conv_rank, p.lora.conv_alpha),
        (16.0, 4, 4.0)
    );
    assert_eq!(p.lora.scale(), 1.0);
    let p = plan("lora_rank: 4\nlora_alpha: 8\n");
    assert_eq!(
        (p.lora.alpha, p.lora.conv_rank, p.lora.scale()),
        (8.0, 4, 2.0)
    );
}

#[test]
fn warmup_is_a_count_or_a_ratio() {
    assert_eq!(
        plan("lr_warmup_steps: 100\nscheduler: cosine\n")
            .training
            .warmup,
        Warmup::Steps(100)
    );
    assert_eq!(
        plan("lr_warmup_steps: 0.1\nscheduler: cosine\n")
            .training
            .warmup,
        Warmup::Ratio(0.1)
    );
}

#[test]
fn settings_without_effect_are_warnings() {
    let p = plan("lr_warmup_steps: 10\nconv_rank: 4\n");
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(p.warnings[0].starts_with("cfg.yaml:4: the `constant` scheduler has no warm-up"));
    assert!(p.warnings[1].contains("without `conv_lora: true`"));
}

#[test]
fn component_learning_rates_default_to_learning_rate() {
    let p = plan("learning_rate: 2e-4\ntext_encoder_lr: 5e-5\n");
    assert_eq!(
        (p.training.unet_lr, p.training.text_encoder_lr),
        (2e-4, 5e-5)
    );
}

#[test]
fn yaml_syntax_errors_keep_their_position() {
    let err = plan_with("train_data_dir: d\nbase_model: [a\noutput_dir: o\n", &[]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(text.starts_with("cfg.yaml:"), "{text}");
    assert!(text.contains("invalid YAML"), "{text}");
    let err = plan_with("a: 1\n  b: 2\n", &[]).unwrap_err();
    assert!(
        err.to_string().starts_with("cfg.yaml:2: invalid YAML"),
        "{err}"
    );
}

#[test]
fn a_config_must_be_a_mapping() {
    let found = problems("- a\n- b\n", &[]);
    assert_eq!(
        found,
        ["cfg.yaml: a config is a list of `key: value` lines, but this file holds a list"]
    );
}

#[test]
fn dataset_spec_carries_the_data_settings() {
    let p = plan(
        "repeats: 3\ncaption_prefix: sks\nseed: 7\nflip_aug: true\ncaption_dropout_rate: 0.25\n",
    );
    let spec = p.dataset_spec();
    assert_eq!((spec.repeats, spec.seed, spec.flip_aug), (3, 7, true));
    assert_eq!(spec.caption_prefix.as_deref(), Some("sks"));
    assert_eq!(spec.caption_dropout_rate, 0.25);
    assert_eq!(spec.train_data_dir, PathBuf::from("/work/project/data/x"));
}

#[test]
fn preview_keys_take_a_file_or_a_list_and_check_each_prompt() {
    let p = plan("sample_prompts: prompts.txt\nsample_every_n_steps: 50\n");
    assert_eq!(
        p.sampling.prompts,
        Some(SamplePrompts::File(PathBuf::from(
            "/work/project/prompts.txt"
        )))
    );
    assert_eq!(p.sampling.every_n_steps, Some(50));
    assert_eq!(p.sampling.sampler.as_str(), "ddim");
    assert!(p.sampling.is_due(50, 120) && p.sampling.is_due(120, 120));
    assert!(!p.sampling.is_due(60, 120));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let p = plan("sample_prompts: [\"a cat --w 64\", dog]\nsample_sampler: k_euler_a\n");
    assert_eq!(
        p.sampling.prompts,
        Some(SamplePrompts::Lines(vec![
            "a cat --w 64".into(),
            "dog".into()
        ]))
    );
    assert_eq!(p.sampling.sampler.as_str(), "euler_a");
    assert!(
        p.warnings[0].contains("no preview will be drawn"),
        "{:?}",
        p.warnings
    );
    assert!(problem("sample_prompts: [\"a cat --w wide\"]\n").contains("prompt 1 of the list"));
    assert!(problem("sample_sampler: plms\n").contains("ddim"));
    assert!(!plan("").sampling.is_due(1, 1), "no prompts, no previews");
}

const LLM: &str = "base_model: ./models/qwen\ntrain_data: data/train.jsonl\noutput_dir: out/lm\n";

#[test]
fn a_language_model_config_is_told_by_task_or_by_train_data() {
    let by_data = plan_with(LLM, &[]).unwrap();
    let Task::Llm(data) = &by_data.task else {
        panic!("train_data without train_data_dir is a language-model run");
    };
    assert_eq!(
        data.train_data,
        PathBuf::from("/work/project/data/train.jsonl")
    );
    assert_eq!(
        (data.data_format, data.max_seq_length, data.train_on_prompt),
        (DataFormat::Auto, 1024, false)
    );
    assert!(by_data.output.adapter_folders);
    assert!(!by_data.lora.train_text_encoder);
    assert_eq!(
        by_data.output.final_file(),
        PathBuf::from("/work/project/out/lm/lm")
    );
    let told = plan_with(&format!("task: llm\n{LLM}cutoff_len: 512\n"), &[]).unwrap();
    assert_eq!(told.llm().map(|d| d.max_seq_length), Some(512));
    assert_eq!(plan("").task, Task::Image);
    assert!(!plan("").output.adapter_folders);
    // A folder holding config.json and no model_index.json is a transformers model.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let text = format!(
        "base_model: {}\ntrain_data: t.jsonl\ntrain_data_dir: x\noutput_dir: o\n",
        dir.path().display()
    );
    let found = problems(&text, &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("`train_data_dir` is a key of image training"),
        "{found:?}"
    );
}

#[test]
fn keys_of_the_other_task_are_refused_by_name() {
    let found = problems(
        &format!("{LLM}resolution: 512\nnetwork_train_unet_only: true\nsample_sampler: ddim\n"),
        &[],
    );
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].starts_with("cfg.yaml:4: `resolution` is a key of image training"));
    assert!(found[1].contains("`network_train_unet_only` is a key of image training"));
    let found = problems(&format!("{REQUIRED}max_seq_length: 512\n"), &[]);
    assert_eq!(
        found,
        [
            "cfg.yaml:4: `max_seq_length` is a key of language-model training (`task: llm`); this \
          config trains an image LoRA: remove it, or set `task: llm`"
        ]
    );
    let found = problems(&format!("task: llm\n{LLM}target_modules: kohya\n"), &[]);
    assert!(
        found[0].contains("`target_modules: kohya` names image-model layers"),
        "{found:?}"
    );
    let found = problems(&format!("{LLM}eval_data: v.jsonl\nval_split: 0.1\n"), &[]);
    assert_eq!(
        found,
        ["cfg.yaml:5: `val_split` and `eval_data` both name validation records: keep one"]
    );
    let found = problems(&format!("{LLM}val_split: 0.9\n"), &[]);
    assert!(found[0].contains("between 0 and 0.5"), "{found:?}");
    let found = problems(&format!("{REQUIRED}val_split: 0.1\n"), &[]);
    assert!(
        found[0].contains("`val_split` is a key of language-model training"),
        "{found:?}"
    );
    // A language model's sample prompts are plain text: `--n` is not an option there.
    let plan = plan_with(&format!("{LLM}sample_prompts: [\"Explain --n\"]\n"), &[]).unwrap();
    assert_eq!(plan.sampling.max_new_tokens, 64);
    let found = problems(&format!("task: text\n{LLM}"), &[]);
    assert!(
        found[0].contains("unknown task `text`; valid: image, llm"),
        "{found:?}"
    );
}

#[test]
fn a_language_model_plan_reads_back_from_its_resolved_yaml() {
    let plan = plan_with(
        &format!(
            "{LLM}data_format: sharegpt\nmax_seq_length: 300\ntrain_on_prompt: true\n\
             target_modules: all-linear\nlora_dropout: 0.05\nseed: 3\n"
        ),
        &[],
    )
    .unwrap();
    let text = plan.to_resolved_yaml();
    assert!(text.contains("task: \"llm\""), "{text}");
    assert!(!text.contains("resolution"), "{text}");
    let back = TrainPlan::from_yaml(&text, &plan.config_path, &[], Path::new("/elsewhere"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        back,
        TrainPlan {
            warnings: back.warnings.clone(),
            ..plan.clone()
        }
    );
    let other = plan_with(&format!("{LLM}max_seq_length: 301\n"), &[]).unwrap();
    assert!(plan
        .differences_that_matter(&other)
        .iter()
        .any(|d| d.starts_with("`max_seq_length`")));
}
