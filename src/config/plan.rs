//! [`TrainPlan`]: the validated config the rest of the program reads. Every default is filled,
//! every alias resolved, every relative path made absolute; nothing in it needs checking again.

use std::path::PathBuf;

use super::choices::{
    DataFormat, DeviceChoice, LogWith, LrScheduler, MixedPrecision, Optimizer, PredictionType,
    SaveFormat, SavePrecision, TargetModules, Warmup,
};

/// One training run, as the config and its `--set` overrides describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// The config file, as given on the command line.
    pub config_path: PathBuf,
    /// What is trained: an image model's LoRA, or a language model's (with its records).
    pub task: Task,
    /// Images, captions, buckets, augmentation and the seed. A language-model run reads only
    /// the seed from it (its data is in [`Task::Llm`]); the image keys are refused for it.
    pub data: DatasetSpec,
    pub model: ModelSettings,
    pub lora: LoraSettings,
    pub training: TrainingSettings,
    pub output: OutputSettings,
    /// Preview pictures during training.
    pub sampling: SamplingSettings,
    /// Settings that are valid but probably not what the user meant (printed, not fatal).
    pub warnings: Vec<String>,
}

impl TrainPlan {
    /// What the dataset needs from the plan.
    pub fn dataset_spec(&self) -> DatasetSpec {
        self.data.clone()
    }

    /// The language-model data, when the run trains a language model.
    pub fn llm(&self) -> Option<&LlmData> {
        match &self.task {
            Task::Llm(data) => Some(data),
            Task::Image => None,
        }
    }
}

/// What a run trains (`task:`; detected when the config does not say).
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// A Stable Diffusion LoRA from pictures and captions (the kohya-format file).
    Image,
    /// A causal language model's LoRA from instruction records (a PEFT adapter folder).
    Llm(LlmData),
}

/// A language model's training records and how they become token sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmData {
    /// `.jsonl`, `.json` or `.csv` records.
    pub train_data: PathBuf,
    pub data_format: DataFormat,
    /// Longer samples are cut to this many tokens (said in the dry run).
    pub max_seq_length: usize,
    /// Learn the prompt's tokens too, not only the answers.
    pub train_on_prompt: bool,
    /// Put several samples one after another into each sequence of up to `max_seq_length`
    /// tokens (fewer, fuller batches; no sample is split, none learns from another's tokens).
    pub packing: bool,
    /// Validation records in a file of their own (same formats as `train_data`).
    pub eval_data: Option<PathBuf>,
    /// Or this share of `train_data`'s records, chosen by the seed, held out for validation.
    pub val_split: Option<f64>,
    /// The validation loss every this many optimizer steps (default: at each epoch's end).
    pub eval_steps: Option<usize>,
}

impl LlmData {
    /// Whether the run measures a validation loss.
    pub fn validates(&self) -> bool {
        self.eval_data.is_some() || self.val_split.is_some()
    }
}

/// Everything the dataset needs from the validated config: images, captions, buckets,
/// augmentation and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Folder holding the images; file names in the CSV are relative to it.
    pub train_data_dir: PathBuf,
    /// `metadata.csv` (`filename,prompt` or `file_name,text`); `None` reads a caption file
    /// with `caption_extension` beside each image.
    pub metadata_path: Option<PathBuf>,
    /// Extension of the caption files beside the images, with its dot (`.txt`).
    pub caption_extension: String,
    /// Training resolution in pixels (square side; buckets keep area ≤ resolution²).
    pub resolution: u32,
    /// Whether the config set `resolution`; when not, the preflight puts the base model
    /// family's default in its place (512, SDXL 1024) once the model is found.
    pub resolution_given: bool,
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    /// Random instead of centre crop.
    pub random_crop: bool,
    /// Horizontal flip with probability ½.
    pub flip_aug: bool,
    /// How many times each image is seen per epoch.
    pub repeats: u32,
    /// Text put before every caption (a trigger word).
    pub caption_prefix: Option<String>,
    /// Shuffle the comma-separated tags of each caption (after the first `keep_tokens`).
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    /// Probability of training a sample with an empty caption.
    pub caption_dropout_rate: f32,
    /// Drop unreadable images with a warning instead of failing.
    pub skip_invalid_images: bool,
    /// Seed of every random choice (crop, flip, caption order, epoch order).
    pub seed: u64,
}

/// The base model and how to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// A local path made absolute (diffusers folder or single file), or a hub id (`org/name`).
    pub base_model: String,
    /// Tokenizer folder or hub id, for single-file models (which carry none).
    pub tokenizer: Option<String>,
    /// The second text encoder's tokenizer (SDXL), likewise.
    pub tokenizer_2: Option<String>,
    /// A VAE to use instead of the base model's.
    pub vae: Option<String>,
    /// 1 = the text encoder's last layer; N = the hidden state N−1 layers from the end.
    pub clip_skip: usize,
    /// Overrides the prediction type of the model's scheduler config.
    pub prediction_type: Option<PredictionType>,
}

/// The LoRA adapters: size, scale, regularisation, where they go and how they are saved.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: u32,
    /// The output is scaled by `alpha / rank` (alpha 0 in the config means alpha = rank).
    pub alpha: f64,
    /// Dropout on the adapter's input.
    pub dropout: f64,
    /// Probability of dropping each rank of the adapter's hidden state.
    pub rank_dropout: f64,
    /// Probability of skipping a whole adapter for a step.
    pub module_dropout: f64,
    /// Also adapt the 3×3 convolutions of the ResNet blocks.
    pub conv_lora: bool,
    pub conv_rank: u32,
    pub conv_alpha: f64,
    pub target_modules: TargetModules,
    pub train_text_encoder: bool,
    /// A LoRA file to start from instead of a fresh adapter.
    pub network_weights: Option<PathBuf>,
    pub save_precision: SavePrecision,
    pub save_format: SaveFormat,
}

impl LoraSettings {
    /// The factor applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        self.alpha / f64::from(self.rank)
    }
}

/// The optimisation: batches, steps, learning rates, optimizer, schedule, loss options, device.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSettings {
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub epochs: usize,
    /// When set, training stops after this many optimizer steps, whatever `epochs` says.
    pub max_train_steps: Option<usize>,
    pub learning_rate: f64,
    /// The UNet adapters' learning rate (`learning_rate` unless set).
    pub unet_lr: f64,
    /// The text-encoder adapters' learning rate (`learning_rate` unless set).
    pub text_encoder_lr: f64,
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub scheduler: LrScheduler,
    pub warmup: Warmup,
    pub lr_scheduler_num_cycles: usize,
    pub lr_scheduler_power: f64,
    /// Gradient clipping by global norm; 0 disables it.
    pub max_grad_norm: f64,
    pub min_snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub mixed_precision: MixedPrecision,
    pub device: DeviceChoice,
    pub cache_latents: bool,
    pub cache_latents_to_disk: bool,
    pub gradient_checkpointing: bool,
}

/// Where results go.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSettings {
    pub output_dir: PathBuf,
    /// File stem of the exported LoRA (`<output_name>.safetensors`).
    pub output_name: String,
    /// Write a step checkpoint every this many optimizer steps.
    pub save_steps: Option<usize>,
    /// Write a step checkpoint at the end of every this many epochs.
    pub save_every_n_epochs: Option<usize>,
    /// Keep only this many step checkpoints (the newest).
    pub save_last_n: Option<usize>,
    pub log_with: LogWith,
    pub log_dir: PathBuf,
    /// The adapters are folders (PEFT's, for a language model), not `.safetensors` files.
    pub adapter_folders: bool,
}

impl OutputSettings {
    /// The exported LoRA: `<output_dir>/<output_name>.safetensors`, or the adapter folder
    /// `<output_dir>/<output_name>/`.
    pub fn final_file(&self) -> PathBuf {
        self.output_dir
            .join(format!("{}{}", self.output_name, self.step_suffix()))
    }

    /// A step checkpoint's file (or folder) name: `<output_name>-step00000100.safetensors`.
    pub fn step_file_name(&self, step: usize) -> String {
        format!("{}-step{step:08}{}", self.output_name, self.step_suffix())
    }

    /// What follows the step number in a step checkpoint's name.
    pub fn step_suffix(&self) -> &'static str {
        if self.adapter_folders {
            ""
        } else {
            ".safetensors"
        }
    }
}

/// Where the preview prompts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplePrompts {
    /// A text file, one prompt per line (kohya's `sample_prompts` file).
    File(PathBuf),
    /// The lines given in the config.
    Lines(Vec<String>),
}

/// Preview pictures during training (kohya's `sample_*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingSettings {
    /// `None`: no previews.
    pub prompts: Option<SamplePrompts>,
    /// Render after every this many optimizer steps (and after the last step).
    pub every_n_steps: Option<usize>,
    /// Also render before the first step.
    pub at_first: bool,
    /// The sampler of prompts without `--ss`: `ddim`, `euler_a` or `dpmpp_2m`.
    pub sampler: super::sampling::SamplerKind,
    /// A language model's longest answer to a sample prompt, in tokens.
    pub max_new_tokens: usize,
}

impl SamplingSettings {
    /// Whether previews are rendered after optimizer step `step` (1-based) of `total`.
    pub fn is_due(&self, step: usize, total: usize) -> bool {
        self.prompts.is_some()
            && self
                .every_n_steps
                .is_some_and(|n| n > 0 && (step.is_multiple_of(n) || step == total))
    }
}
