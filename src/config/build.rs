//! The key table: reads every config key (with its aliases, default and checks) from [`Fields`]
//! and assembles the [`TrainPlan`]. This file is the one place that says what a key means.

use std::path::{Component, Path, PathBuf};

use super::choices::{
    DataFormat, DeviceChoice, LogWith, LrScheduler, MixedPrecision, Optimizer, PredictionType,
    SaveFormat, SavePrecision, TargetModules, TargetPreset, TaskKind, Warmup,
};
use super::fields::{
    choice, count, count_up_to, flag, non_negative, number, positive, rate, small_count, text,
    Fields,
};
use super::model_ref::is_hub_id;
use super::plan::{
    DatasetSpec, LlmData, LoraSettings, ModelSettings, OutputSettings, SamplePrompts,
    SamplingSettings, Task, TrainPlan, TrainingSettings,
};
use super::sampling::{SamplePrompt, SamplerKind};
use super::yaml::Value;

/// The most optimizer steps a run may make: step numbers are written with eight digits in the
/// names of step checkpoints and states (`state-step00000100`), and no LoRA needs more.
pub const MAX_STEPS: usize = 99_999_999;
/// Why [`MAX_STEPS`] is the limit, for messages.
pub const STEPS_WHY: &str =
    "a run makes at most 99,999,999 optimizer steps (LoRAs train for hundreds to a few thousand)";

/// Keys of image training only (with their aliases): refused in a language-model config.
pub(super) const IMAGE_ONLY: &[(&str, &[&str])] = &[
    ("train_data_dir", &[]),
    ("metadata_path", &[]),
    ("caption_extension", &["caption_extention"]),
    ("resolution", &[]),
    ("enable_bucket", &[]),
    ("min_bucket_reso", &[]),
    ("max_bucket_reso", &[]),
    ("bucket_reso_steps", &[]),
    ("random_crop", &[]),
    ("flip_aug", &[]),
    ("repeats", &["num_repeats", "dataset_repeats"]),
    ("caption_prefix", &[]),
    ("shuffle_caption", &[]),
    ("keep_tokens", &[]),
    ("caption_dropout_rate", &[]),
    ("skip_invalid_images", &[]),
    ("tokenizer", &[]),
    ("tokenizer_2", &[]),
    ("vae", &[]),
    ("clip_skip", &[]),
    ("prediction_type", &["v_parameterization"]),
    ("rank_dropout", &[]),
    ("module_dropout", &[]),
    ("conv_lora", &[]),
    ("conv_rank", &["conv_dim"]),
    ("conv_alpha", &[]),
    ("train_text_encoder", &["network_train_unet_only"]),
    ("save_precision", &[]),
    ("save_format", &[]),
    ("unet_lr", &[]),
    ("text_encoder_lr", &[]),
    ("min_snr_gamma", &[]),
    ("noise_offset", &[]),
    ("cache_latents", &[]),
    ("cache_latents_to_disk", &[]),
    ("sample_sampler", &[]),
];

/// Keys of language-model training only: refused in an image config.
const LLM_ONLY: &[(&str, &[&str])] = &[
    ("train_data", &[]),
    ("data_format", &[]),
    ("max_seq_length", &["cutoff_len"]),
    ("train_on_prompt", &[]),
    ("packing", &[]),
    ("eval_data", &[]),
    ("val_split", &["val_size"]),
    ("eval_steps", &[]),
    ("sample_max_new_tokens", &["max_new_tokens"]),
];

/// Reads every key; the plan, or every problem found.
pub fn build(f: &mut Fields, config_path: &Path, cwd: &Path) -> Option<TrainPlan> {
    let base_model = base_model(f, cwd);
    let kind = task_kind(f, base_model.as_deref());
    let (refused, why) = match kind {
        TaskKind::Image => (
            LLM_ONLY,
            "is a key of language-model training (`task: llm`); this config trains an image \
             LoRA: remove it, or set `task: llm`",
        ),
        TaskKind::Llm => (
            IMAGE_ONLY,
            "is a key of image training; this config trains a language model (`task: llm`): \
             remove it",
        ),
    };
    for (name, aliases) in refused {
        f.refuse(name, aliases, why);
    }
    let (task, data) = match kind {
        TaskKind::Image => (Some(Task::Image), data(f, cwd, true)),
        TaskKind::Llm => (llm_data(f, cwd).map(Task::Llm), data(f, cwd, false)),
    };
    let model = image_model(f, cwd, base_model);
    let mut lora = lora(f, cwd);
    if kind == TaskKind::Llm {
        lora.train_text_encoder = false;
        if lora.target_modules == TargetModules::Preset(TargetPreset::Kohya) {
            let at = f.location_of("target_modules", &[]);
            f.problem(
                at,
                "`target_modules: kohya` names image-model layers; for a language model use \
                 `default` (q_proj, v_proj), `attn`, `all-linear` or a list such as \
                 [q_proj, k_proj, v_proj, o_proj]",
            );
        }
    }
    let training = training(f);
    let output = output(f, cwd, kind == TaskKind::Llm);
    let sampling = sampling(f, cwd, kind == TaskKind::Llm);
    let (task, data, model, output) = (task?, data?, model?, output?);
    let mut warnings = warnings(f, &data, &lora, &training);
    if sampling.prompts.is_some() && sampling.every_n_steps.is_none() && !sampling.at_first {
        warnings.push(format!(
            "{}: no preview will be drawn: set `sample_every_n_steps` (or `sample_at_first: true`)",
            f.location_of("sample_prompts", &[])
        ));
    }
    Some(TrainPlan {
        config_path: config_path.to_path_buf(),
        task,
        data,
        model,
        lora,
        training,
        output,
        sampling,
        warnings,
    })
}

/// `task:`, or what the config tells: `train_data` without `train_data_dir`, or a base model
/// folder with a `config.json` and no `model_index.json` (a transformers causal-LM folder), is
/// a language model; the rest is image training.
fn task_kind(f: &mut Fields, base_model: Option<&str>) -> TaskKind {
    if let Some(kind) = f.get("task", &[], choice(TaskKind::parse)) {
        return kind;
    }
    if f.was_given("train_data", &[]) && !f.was_given("train_data_dir", &[]) {
        return TaskKind::Llm;
    }
    let folder = base_model.map(Path::new);
    let lm_folder = folder.is_some_and(|d| {
        d.is_absolute() && d.join("config.json").is_file() && !d.join("model_index.json").exists()
    });
    if lm_folder {
        TaskKind::Llm
    } else {
        TaskKind::Image
    }
}

/// The language-model data keys.
fn llm_data(f: &mut Fields, cwd: &Path) -> Option<LlmData> {
    let train_data = required(
        f,
        "train_data",
        &[],
        "the training records: a .jsonl, .json or .csv file",
    );
    let data_format = f
        .get("data_format", &[], choice(DataFormat::parse))
        .unwrap_or(DataFormat::Auto);
    let max_seq_length = f
        .get(
            "max_seq_length",
            &["cutoff_len"],
            count_up_to(8, 1 << 20, "a sample is at most 1,048,576 tokens"),
        )
        .unwrap_or(1024);
    let train_on_prompt = f.get("train_on_prompt", &[], flag).unwrap_or(false);
    let packing = f.get("packing", &[], flag).unwrap_or(false);
    let eval_data = f.get("eval_data", &[], text).map(|p| resolve(cwd, &p));
    let split = number("between 0 and 0.5 (a share of the records)", |x| {
        x > 0.0 && x <= 0.5
    });
    let val_split = f.get("val_split", &["val_size"], &split);
    if eval_data.is_some() && val_split.is_some() {
        let at = f.location_of("val_split", &["val_size"]);
        f.problem(
            at,
            "`val_split` and `eval_data` both name validation records: keep one",
        );
    }
    let eval_steps = f.get("eval_steps", &[], count(1));
    Some(LlmData {
        train_data: resolve(cwd, &train_data?),
        data_format,
        max_seq_length,
        train_on_prompt,
        packing,
        eval_data,
        val_split,
        eval_steps,
    })
}

/// kohya's preview keys: `sample_prompts` (a file, or a list of prompt lines),
/// `sample_every_n_steps`, `sample_at_first`, `sample_sampler`.
/// A language model's prompts are plain text (no `--n`-style options).
fn sampling(f: &mut Fields, cwd: &Path, llm: bool) -> SamplingSettings {
    let prompts = f.get("sample_prompts", &[], |v: &Value| match v {
        Value::Seq(items) => {
            let mut lines = Vec::new();
            for item in items {
                let line = item.as_text().map(str::trim).unwrap_or("");
                if llm {
                    if line.is_empty() {
                        return Err(format!("prompt {} of the list is empty", lines.len() + 1));
                    }
                } else {
                    SamplePrompt::parse_line(line)
                        .map_err(|e| format!("prompt {} of the list: {e}", lines.len() + 1))?;
                }
                lines.push(line.to_string());
            }
            if lines.is_empty() {
                return Err("the list is empty: give at least one prompt".into());
            }
            Ok(SamplePrompts::Lines(lines))
        }
        _ => Ok(SamplePrompts::File(resolve(cwd, &text(v)?))),
    });
    let every_n_steps = f.get("sample_every_n_steps", &[], count(1));
    let at_first = f.get("sample_at_first", &[], flag).unwrap_or(false);
    let sampler = f
        .get("sample_sampler", &[], |v: &Value| {
            text(v)?.parse::<SamplerKind>()
        })
        .unwrap_or(SamplerKind::Ddim);
    let max_new_tokens = f
        .get(
            "sample_max_new_tokens",
            &["max_new_tokens"],
            count_up_to(
                1,
                4096,
                "an answer of more than 4096 tokens is not a sample",
            ),
        )
        .unwrap_or(64);
    SamplingSettings {
        prompts,
        every_n_steps,
        at_first,
        sampler,
        max_new_tokens,
    }
}

/// The image data keys and the seed. A language-model run (`images: false`) has had the image
/// keys refused, so only its seed is read; the rest keep their defaults and no folder is asked
/// for.
fn data(f: &mut Fields, cwd: &Path, images: bool) -> Option<DatasetSpec> {
    let train_data_dir = if images {
        required(f, "train_data_dir", &[], "the folder of training images")
    } else {
        Some(String::new())
    };
    let metadata_path = f.get("metadata_path", &[], text).map(|p| resolve(cwd, &p));
    let caption_extension = f
        .get(
            "caption_extension",
            &["caption_extention"],
            caption_extension,
        )
        .unwrap_or_else(|| ".txt".into());
    let resolution_given = f.get("resolution", &[], resolution);
    let resolution = resolution_given.unwrap_or(512);
    let enable_bucket = f.get("enable_bucket", &[], flag).unwrap_or(false);
    let min_bucket_reso = f.get("min_bucket_reso", &[], pixels).unwrap_or(256);
    let max_bucket_reso = f.get("max_bucket_reso", &[], pixels).unwrap_or(1024);
    let bucket_reso_steps = f.get("bucket_reso_steps", &[], bucket_step).unwrap_or(64);
    if enable_bucket {
        bucket_checks(f, resolution, min_bucket_reso, max_bucket_reso);
    }
    let random_crop = f.get("random_crop", &[], flag).unwrap_or(false);
    let flip_aug = f.get("flip_aug", &[], flag).unwrap_or(false);
    let repeats = f.get(
        "repeats",
        &["num_repeats", "dataset_repeats"],
        small_count(1),
    );
    let caption_prefix = f.get("caption_prefix", &[], text);
    let shuffle_caption = f.get("shuffle_caption", &[], flag).unwrap_or(false);
    let keep_tokens = f.get("keep_tokens", &[], count(0)).unwrap_or(0);
    let caption_dropout_rate = f.get("caption_dropout_rate", &[], rate).unwrap_or(0.0);
    let skip_invalid_images = f.get("skip_invalid_images", &[], flag).unwrap_or(false);
    let seed = f.get("seed", &[], count(0)).unwrap_or(42);
    let train_data_dir = train_data_dir?;
    Some(DatasetSpec {
        train_data_dir: if images {
            resolve(cwd, &train_data_dir)
        } else {
            PathBuf::new()
        },
        metadata_path,
        caption_extension,
        resolution,
        resolution_given: resolution_given.is_some(),
        enable_bucket,
        min_bucket_reso,
        max_bucket_reso,
        bucket_reso_steps,
        random_crop,
        flip_aug,
        repeats: repeats.unwrap_or(1),
        caption_prefix,
        shuffle_caption,
        keep_tokens,
        caption_dropout_rate: caption_dropout_rate as f32,
        skip_invalid_images,
        seed: seed as u64,
    })
}

/// kohya's rules: the square training size must lie within the bucket range.
fn bucket_checks(f: &mut Fields, resolution: u32, min: u32, max: u32) {
    if min > max {
        let at = f.location_of("min_bucket_reso", &[]);
        f.problem(
            at,
            format!("`min_bucket_reso` ({min}) is larger than `max_bucket_reso` ({max})"),
        );
    } else if resolution < min || resolution > max {
        let at = f.location_of("resolution", &[]);
        f.problem(
            at,
            format!(
                "with `enable_bucket`, `resolution` ({resolution}) must lie between \
                 `min_bucket_reso` ({min}) and `max_bucket_reso` ({max})"
            ),
        );
    }
}

/// `base_model`, as a path made absolute or a hub id.
fn base_model(f: &mut Fields, cwd: &Path) -> Option<String> {
    required(
        f,
        "base_model",
        &["pretrained_model_name_or_path"],
        "a diffusers folder, a .safetensors/.ckpt file, a language model's folder or a hub id \
         such as `org/name`",
    )
    .map(|b| model_reference(cwd, &b))
}

/// The model keys besides `base_model` (image training's; unset for a language model, whose
/// config had them refused).
fn image_model(f: &mut Fields, cwd: &Path, base_model: Option<String>) -> Option<ModelSettings> {
    let tokenizer = f
        .get("tokenizer", &[], text)
        .map(|t| model_reference(cwd, &t));
    let tokenizer_2 = f
        .get("tokenizer_2", &[], text)
        .map(|t| model_reference(cwd, &t));
    let vae = f.get("vae", &[], text).map(|t| model_reference(cwd, &t));
    let clip_skip = f.get("clip_skip", &[], count(1)).unwrap_or(1);
    // kohya's `v_parameterization: true` is `prediction_type: v_prediction`.
    let prediction_type = f
        .entry("prediction_type", &["v_parameterization"])
        .and_then(|e| {
            if e.key == "v_parameterization" {
                let v = f.read_entry(&e, flag)?;
                v.then_some(PredictionType::VPrediction)
            } else {
                f.read_entry(&e, choice(PredictionType::parse))
            }
        });
    Some(ModelSettings {
        base_model: base_model?,
        tokenizer,
        tokenizer_2,
        vae,
        clip_skip,
        prediction_type,
    })
}

fn lora(f: &mut Fields, cwd: &Path) -> LoraSettings {
    let rank = f
        .get("lora_rank", &["network_dim"], small_count(1))
        .unwrap_or(8);
    let alpha = f.get("lora_alpha", &["network_alpha"], non_negative);
    let dropout = f
        .get("lora_dropout", &["network_dropout"], rate)
        .unwrap_or(0.0);
    let rank_dropout = f.get("rank_dropout", &[], rate).unwrap_or(0.0);
    let module_dropout = f.get("module_dropout", &[], rate).unwrap_or(0.0);
    let conv_lora = f.get("conv_lora", &[], flag).unwrap_or(false);
    let conv_rank = f
        .get("conv_rank", &["conv_dim"], small_count(1))
        .unwrap_or(rank);
    let conv_alpha = f.get("conv_alpha", &[], non_negative);
    let target_modules = f
        .get("target_modules", &[], target_modules)
        .unwrap_or(TargetModules::Preset(TargetPreset::Default));
    // kohya's `network_train_unet_only: true` is `train_text_encoder: false`.
    let train_text_encoder = f
        .entry("train_text_encoder", &["network_train_unet_only"])
        .and_then(|e| {
            f.read_entry(&e, flag)
                .map(|v| v != (e.key == "network_train_unet_only"))
        })
        .unwrap_or(true);
    let network_weights = f
        .get("network_weights", &[], text)
        .map(|p| resolve(cwd, &p));
    let save_precision = f
        .get("save_precision", &[], choice(SavePrecision::parse))
        .unwrap_or(SavePrecision::Fp16);
    let save_format = f
        .get("save_format", &[], choice(SaveFormat::parse))
        .unwrap_or(SaveFormat::Kohya);
    // alpha 0 means "alpha = rank", as in kohya and the LoRA file format.
    let alpha_or = |alpha: Option<f64>, rank: u32| match alpha {
        Some(a) if a > 0.0 => a,
        _ => f64::from(rank),
    };
    LoraSettings {
        rank,
        alpha: alpha_or(alpha, rank),
        dropout,
        rank_dropout,
        module_dropout,
        conv_lora,
        conv_rank,
        conv_alpha: alpha_or(conv_alpha, conv_rank),
        target_modules,
        train_text_encoder,
        network_weights,
        save_precision,
        save_format,
    }
}

fn training(f: &mut Fields) -> TrainingSettings {
    let batch_size = f
        .get("batch_size", &["train_batch_size"], count(1))
        .unwrap_or(1);
    let gradient_accumulation_steps = f
        .get("gradient_accumulation_steps", &[], count(1))
        .unwrap_or(1);
    let steps = count_up_to(1, MAX_STEPS, STEPS_WHY);
    let epochs = f
        .get("epochs", &["max_train_epochs", "num_train_epochs"], &steps)
        .unwrap_or(10);
    let max_train_steps = f.get("max_train_steps", &[], &steps);
    let learning_rate = f.get("learning_rate", &[], positive).unwrap_or(1e-4);
    let unet_lr = f.get("unet_lr", &[], positive).unwrap_or(learning_rate);
    let text_encoder_lr = f
        .get("text_encoder_lr", &[], positive)
        .unwrap_or(learning_rate);
    let optimizer = f
        .get("optimizer", &["optimizer_type"], choice(Optimizer::parse))
        .unwrap_or(Optimizer::AdamW);
    let weight_decay = f.get("weight_decay", &[], non_negative).unwrap_or(0.01);
    let beta = number("in [0, 1)", |x| (0.0..1.0).contains(&x));
    let adam_beta1 = f.get("adam_beta1", &[], &beta).unwrap_or(0.9);
    let adam_beta2 = f.get("adam_beta2", &[], &beta).unwrap_or(0.999);
    let adam_epsilon = f.get("adam_epsilon", &[], positive).unwrap_or(1e-8);
    let scheduler = f
        .get("scheduler", &["lr_scheduler"], choice(LrScheduler::parse))
        .unwrap_or(LrScheduler::Constant);
    let warmup = f
        .get("lr_warmup_steps", &[], warmup)
        .unwrap_or(Warmup::Steps(0));
    let lr_scheduler_num_cycles = f.get("lr_scheduler_num_cycles", &[], count(1)).unwrap_or(1);
    let lr_scheduler_power = f.get("lr_scheduler_power", &[], positive).unwrap_or(1.0);
    let max_grad_norm = f.get("max_grad_norm", &[], non_negative).unwrap_or(1.0);
    let min_snr_gamma = f.get("min_snr_gamma", &[], positive);
    let noise_offset = f.get("noise_offset", &[], non_negative).unwrap_or(0.0);
    let mixed_precision = f
        .get("mixed_precision", &[], choice(MixedPrecision::parse))
        .unwrap_or(MixedPrecision::No);
    let device = f
        .get("device", &[], choice(DeviceChoice::parse))
        .unwrap_or(DeviceChoice::Auto);
    let cache_latents = f.get("cache_latents", &[], flag).unwrap_or(true);
    let cache_latents_to_disk = f.get("cache_latents_to_disk", &[], flag).unwrap_or(false);
    let gradient_checkpointing = f.get("gradient_checkpointing", &[], flag).unwrap_or(false);
    TrainingSettings {
        batch_size,
        gradient_accumulation_steps,
        epochs,
        max_train_steps,
        learning_rate,
        unet_lr,
        text_encoder_lr,
        optimizer,
        weight_decay,
        adam_beta1,
        adam_beta2,
        adam_epsilon,
        scheduler,
        warmup,
        lr_scheduler_num_cycles,
        lr_scheduler_power,
        max_grad_norm,
        min_snr_gamma,
        noise_offset,
        mixed_precision,
        device,
        cache_latents,
        cache_latents_to_disk,
        gradient_checkpointing,
    }
}

fn output(f: &mut Fields, cwd: &Path, adapter_folders: bool) -> Option<OutputSettings> {
    let output_dir = required(
        f,
        "output_dir",
        &[],
        "the folder the LoRA files are written to",
    )
    .map(|d| resolve(cwd, &d));
    let output_name = f.get("output_name", &[], output_name);
    let save_steps = f.get("save_steps", &["save_every_n_steps"], count(1));
    let save_every_n_epochs = f.get("save_every_n_epochs", &[], count(1));
    let save_last_n = f.get("save_last_n", &[], count(1));
    let log_with = f
        .get("log_with", &[], choice(LogWith::parse))
        .unwrap_or(LogWith::Tensorboard);
    let log_dir = f
        .get("log_dir", &["logging_dir"], text)
        .map(|d| resolve(cwd, &d));
    let output_dir = output_dir?;
    let output_name = match output_name {
        Some(name) => name,
        None => match output_dir.file_name().and_then(|n| n.to_str()) {
            Some(name) => name.to_string(),
            None => {
                let at = f.location_of("output_dir", &[]);
                f.problem(at, "`output_dir` has no last folder name to name the LoRA file after; set `output_name`");
                return None;
            }
        },
    };
    Some(OutputSettings {
        log_dir: log_dir.unwrap_or_else(|| output_dir.join("logs")),
        output_dir,
        output_name,
        save_steps,
        save_every_n_epochs,
        save_last_n,
        log_with,
        adapter_folders,
    })
}

/// Valid settings that are probably not what the user meant.
fn warnings(
    f: &Fields,
    data: &DatasetSpec,
    lora: &LoraSettings,
    training: &TrainingSettings,
) -> Vec<String> {
    let mut notes = Vec::new();
    let mut note = |name: &str, aliases: &[&str], message: &str| {
        notes.push(format!("{}: {message}", f.location_of(name, aliases)));
    };
    if training.scheduler == LrScheduler::Constant && training.warmup != Warmup::Steps(0) {
        note(
            "lr_warmup_steps",
            &[],
            "the `constant` scheduler has no warm-up; use `constant_with_warmup`",
        );
    }
    if !lora.conv_lora
        && (f.was_given("conv_rank", &["conv_dim"]) || f.was_given("conv_alpha", &[]))
    {
        note(
            "conv_rank",
            &["conv_dim"],
            "`conv_rank`/`conv_alpha` have no effect without `conv_lora: true`",
        );
    }
    if training.cache_latents_to_disk && !training.cache_latents {
        note(
            "cache_latents_to_disk",
            &[],
            "`cache_latents_to_disk` needs `cache_latents: true`",
        );
    }
    if data.keep_tokens > 0 && !data.shuffle_caption {
        note(
            "keep_tokens",
            &[],
            "`keep_tokens` only matters with `shuffle_caption: true`",
        );
    }
    notes
}

/// A key that has no default: its text, or a problem.
fn required(
    f: &mut Fields,
    name: &'static str,
    aliases: &'static [&'static str],
    what: &str,
) -> Option<String> {
    match f.entry(name, aliases) {
        None => {
            let at = f.file_level();
            f.problem(at, format!("missing required key `{name}` ({what})"));
            None
        }
        Some(e) if e.value.is_null() => {
            f.problem(e.at.clone(), format!("`{}` needs a value ({what})", e.key));
            None
        }
        Some(e) => f.read_entry(&e, text),
    }
}

/// `.txt` or `txt`: the extension of caption files, stored with its dot.
fn caption_extension(v: &Value) -> Result<String, String> {
    let ext = text(v)?;
    let ext = ext.trim();
    if ext.is_empty() || ext == "." || ext.contains(['/', '\\']) {
        return Err(format!(
            "expected a file extension such as `.txt`, found `{ext}`"
        ));
    }
    Ok(if ext.starts_with('.') {
        ext.to_string()
    } else {
        format!(".{ext}")
    })
}

/// A side in pixels: a multiple of 8 (the VAE's scale) and at least 64.
fn pixels(v: &Value) -> Result<u32, String> {
    let n = small_count(1)(v)?;
    check_pixels(n)
}

fn check_pixels(n: u32) -> Result<u32, String> {
    if n < 64 || !n.is_multiple_of(8) {
        return Err(format!(
            "must be a multiple of 8 and at least 64 (pixels), found {n}"
        ));
    }
    Ok(n)
}

/// The bucket grid: a multiple of 8 (8, 16, 32, 64...).
fn bucket_step(v: &Value) -> Result<u32, String> {
    let n = small_count(1)(v)?;
    if n % 8 != 0 {
        return Err(format!("must be a multiple of 8 (64 is usual), found {n}"));
    }
    Ok(n)
}

/// `512`, `"512,512"` or `[512, 512]`: training is square.
fn resolution(v: &Value) -> Result<u32, String> {
    let sides: Vec<Value> = match v {
        Value::Seq(items) => items.clone(),
        Value::Scalar { text, .. } if text.contains(',') => text
            .split(',')
            .map(|s| Value::Scalar {
                text: s.trim().to_string(),
                quoted: false,
            })
            .collect(),
        _ => return pixels(v),
    };
    let [w, h] = sides.as_slice() else {
        return Err(format!(
            "expected one size or `width,height`, found {}",
            v.describe()
        ));
    };
    let (w, h) = (pixels(w)?, pixels(h)?);
    if w != h {
        return Err(format!(
            "width and height differ ({w},{h}); training images are square at `resolution`: \
             give one size, and set `enable_bucket: true` to train images of other shapes"
        ));
    }
    Ok(w)
}

/// An integer count of steps, or a ratio 0 < x < 1 of the total steps.
fn warmup(v: &Value) -> Result<Warmup, String> {
    if let Some(n) = v.as_i64() {
        return usize::try_from(n)
            .map(Warmup::Steps)
            .map_err(|_| format!("must be at least 0, found {n}"));
    }
    match v.as_f64() {
        Some(x) if x > 0.0 && x < 1.0 => Ok(Warmup::Ratio(x)),
        Some(x) => Err(format!(
            "expected a whole number of steps, or a ratio between 0 and 1 of the total steps, found {x}"
        )),
        None => Err(format!("expected a number of steps or a ratio, found {}", v.describe())),
    }
}

/// `default`, `attn`, `kohya`, or a list of module names / globs.
fn target_modules(v: &Value) -> Result<TargetModules, String> {
    match v {
        Value::Seq(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.as_text().map(str::trim).filter(|s| !s.is_empty());
                let name = name.ok_or_else(|| {
                    format!(
                        "expected module names in the list, found {}",
                        item.describe()
                    )
                })?;
                names.push(name.to_string());
            }
            if names.is_empty() {
                return Err(
                    "the list is empty: name at least one module (e.g. `[to_q, to_v]`)".into(),
                );
            }
            Ok(TargetModules::Names(names))
        }
        _ => {
            let preset = text(v)?;
            TargetPreset::parse(&preset)
                .map(TargetModules::Preset)
                .map_err(|e| format!("{e}; or a list of module names such as `[q_proj, v_proj]`"))
        }
    }
}

/// A file stem: no folders, no characters that some file system refuses.
fn output_name(v: &Value) -> Result<String, String> {
    let name = text(v)?;
    let name = name.trim().trim_end_matches(".safetensors");
    if name.is_empty() || name.contains(['/', '\\', ':', '*', '?', '"', '<', '>', '|']) {
        return Err(format!(
            "`{name}` is not a file name; use letters, digits, `-` and `_` (folders go in `output_dir`)"
        ));
    }
    Ok(name.to_string())
}

/// A base model, VAE or tokenizer: a hub id stays as written unless a local path of that name
/// exists; anything else is a path, made absolute.
fn model_reference(cwd: &Path, text: &str) -> String {
    if is_hub_id(text) && !cwd.join(text).exists() {
        text.to_string()
    } else {
        resolve(cwd, text).to_string_lossy().into_owned()
    }
}

/// A path from the config: `~/` is the home folder, relative paths start at `cwd`.
fn resolve(cwd: &Path, text: &str) -> PathBuf {
    let path = match (text.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(text),
    };
    let joined = if path.is_absolute() {
        path
    } else {
        cwd.join(path)
    };
    // Drop `.` components only: removing `..` lexically would be wrong across symlinks.
    joined
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}
