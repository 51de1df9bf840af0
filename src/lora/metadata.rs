//! The header metadata of an exported LoRA: kohya's `ss_*` training keys (what A1111's and
//! ComfyUI's LoRA browsers show) and the Stability AI ModelSpec `modelspec.*` keys. Every value is
//! a string, written the way kohya writes it (Python's `str()`: `0.0002`, `1e-05`, `True`,
//! `None`, `(512, 512)`), so tools that parse kohya's files parse ours.

use std::collections::BTreeMap;

use super::report::Layout;
use crate::config::{LoraSettings, TargetModules};
use crate::models::family::{BaseModelVersion, ModelFamily};

/// Everything the header says about a training run. [`TrainingMetadata::from_plan`] fills what
/// the config decides; the trainer sets the rest (base model, images, progress, times, tags).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingMetadata {
    pub base_model_version: BaseModelVersion,
    /// The base model's file or folder name (`v1-5-pruned.safetensors`).
    pub sd_model_name: String,
    pub output_name: String,
    pub learning_rate: f64,
    pub unet_lr: f64,
    pub text_encoder_lr: f64,
    pub train_text_encoder: bool,
    pub optimizer: String,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub gradient_accumulation_steps: usize,
    pub batch_size_per_device: usize,
    pub max_grad_norm: f64,
    /// Images × repeats, as kohya counts them.
    pub num_train_images: usize,
    pub num_batches_per_epoch: usize,
    pub num_epochs: usize,
    /// The epoch the file was saved in (1-based).
    pub epoch: usize,
    /// Optimizer steps done when the file was saved.
    pub steps: usize,
    pub max_train_steps: usize,
    /// `(width, height)`.
    pub resolution: (u32, u32),
    pub seed: u64,
    pub clip_skip: usize,
    pub mixed_precision: String,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub caption_dropout_rate: f64,
    pub flip_aug: bool,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub enable_bucket: bool,
    /// Unix time in seconds.
    pub training_started_at: f64,
    pub training_finished_at: Option<f64>,
    /// Tag counts per dataset folder (kohya keys them by the folder name), from
    /// `Dataset::tag_frequency()`.
    pub tag_frequency: BTreeMap<String, BTreeMap<String, usize>>,
    pub network: NetworkMetadata,
}

/// The adapter settings recorded in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkMetadata {
    /// The rank; `None` when the modules' ranks differ (written `Dynamic`, as kohya's
    /// `resize_lora.py` does).
    pub dim: Option<u32>,
    /// The alpha; `None` when the modules' alphas differ (`Dynamic`).
    pub alpha: Option<f64>,
    pub dropout: f64,
    pub rank_dropout: f64,
    pub module_dropout: f64,
    /// `(conv_dim, conv_alpha)` with `conv_lora`.
    pub conv: Option<(u32, f64)>,
    /// `default`, `attn`, `kohya` or the list.
    pub target_modules: String,
}

impl NetworkMetadata {
    pub fn from_settings(lora: &LoraSettings) -> Self {
        NetworkMetadata {
            dim: Some(lora.rank),
            alpha: Some(lora.alpha),
            dropout: lora.dropout,
            rank_dropout: lora.rank_dropout,
            module_dropout: lora.module_dropout,
            conv: lora.conv_lora.then_some((lora.conv_rank, lora.conv_alpha)),
            target_modules: match &lora.target_modules {
                TargetModules::Preset(p) => p.to_string(),
                TargetModules::Names(names) => names.join(","),
            },
        }
    }
}

impl NetworkMetadata {
    /// The adapters a `network_weights` file decided (instead of the config's rank, alpha and
    /// targets): its ranks and alphas (`Dynamic` where they differ), its convolutions and its
    /// layers.
    pub fn from_file_layout(lora: &LoraSettings, layout: &Layout) -> Self {
        let (dim, alpha) = match layout.uniform() {
            Some((rank, alpha)) => (Some(rank as u32), Some(alpha)),
            None => (None, None),
        };
        NetworkMetadata {
            dim,
            alpha,
            dropout: lora.dropout,
            rank_dropout: lora.rank_dropout,
            module_dropout: lora.module_dropout,
            conv: layout
                .uniform_conv()
                .map(|(rank, alpha)| (rank as u32, alpha)),
            target_modules: layout.layers.join(","),
        }
    }
}

impl TrainingMetadata {
    /// Records a dataset folder's tag counts (`Dataset::tag_frequency()`) under `folder`, as
    /// kohya keys `ss_tag_frequency` (`"10_cyberpunk": {"neon": 12, ...}`).
    pub fn add_tag_frequency(
        &mut self,
        folder: impl Into<String>,
        counts: BTreeMap<String, usize>,
    ) {
        self.tag_frequency.insert(folder.into(), counts);
    }

    /// The header: `ss_*` and `modelspec.*` keys, values as kohya writes them.
    pub fn to_header(&self) -> BTreeMap<String, String> {
        let n = &self.network;
        let mut network_args = BTreeMap::new();
        if let Some((dim, alpha)) = n.conv {
            network_args.insert("conv_dim", dim.to_string());
            network_args.insert("conv_alpha", py_float(alpha));
        }
        if n.rank_dropout > 0.0 {
            network_args.insert("rank_dropout", py_float(n.rank_dropout));
        }
        if n.module_dropout > 0.0 {
            network_args.insert("module_dropout", py_float(n.module_dropout));
        }
        network_args.insert("target_modules", n.target_modules.clone());
        let v2 = self.base_model_version.family() == ModelFamily::Sd2;
        let (w, h) = self.resolution;
        let entries: Vec<(&str, String)> = vec![
            ("ss_network_module", "networks.lora".into()),
            (
                "ss_network_dim",
                n.dim.map_or(DYNAMIC.into(), |d| d.to_string()),
            ),
            ("ss_network_alpha", n.alpha.map_or(DYNAMIC.into(), py_float)),
            (
                "ss_network_dropout",
                py_optional(Some(n.dropout).filter(|d| *d > 0.0)),
            ),
            (
                "ss_network_args",
                serde_json::to_string(&network_args).unwrap_or_default(),
            ),
            (
                "ss_network_train_unet_only",
                py_bool(!self.train_text_encoder),
            ),
            ("ss_base_model_version", self.base_model_version.to_string()),
            ("ss_v2", py_bool(v2)),
            ("ss_sd_model_name", self.sd_model_name.clone()),
            ("ss_output_name", self.output_name.clone()),
            ("ss_learning_rate", py_float(self.learning_rate)),
            ("ss_unet_lr", py_float(self.unet_lr)),
            ("ss_text_encoder_lr", py_float(self.text_encoder_lr)),
            ("ss_optimizer", self.optimizer.clone()),
            ("ss_lr_scheduler", self.lr_scheduler.clone()),
            ("ss_lr_warmup_steps", self.lr_warmup_steps.to_string()),
            (
                "ss_gradient_accumulation_steps",
                self.gradient_accumulation_steps.to_string(),
            ),
            (
                "ss_batch_size_per_device",
                self.batch_size_per_device.to_string(),
            ),
            (
                "ss_total_batch_size",
                (self.batch_size_per_device * self.gradient_accumulation_steps).to_string(),
            ),
            ("ss_max_grad_norm", py_float(self.max_grad_norm)),
            ("ss_num_train_images", self.num_train_images.to_string()),
            (
                "ss_num_batches_per_epoch",
                self.num_batches_per_epoch.to_string(),
            ),
            ("ss_num_epochs", self.num_epochs.to_string()),
            ("ss_epoch", self.epoch.to_string()),
            ("ss_steps", self.steps.to_string()),
            ("ss_max_train_steps", self.max_train_steps.to_string()),
            ("ss_resolution", format!("({w}, {h})")),
            ("ss_seed", self.seed.to_string()),
            ("ss_clip_skip", self.clip_skip.to_string()),
            ("ss_mixed_precision", self.mixed_precision.clone()),
            ("ss_noise_offset", py_float(self.noise_offset)),
            ("ss_min_snr_gamma", py_optional(self.min_snr_gamma)),
            (
                "ss_caption_dropout_rate",
                py_float(self.caption_dropout_rate),
            ),
            ("ss_flip_aug", py_bool(self.flip_aug)),
            ("ss_shuffle_caption", py_bool(self.shuffle_caption)),
            ("ss_keep_tokens", self.keep_tokens.to_string()),
            ("ss_enable_bucket", py_bool(self.enable_bucket)),
            ("ss_training_started_at", py_float(self.training_started_at)),
            (
                "ss_training_finished_at",
                py_optional(self.training_finished_at),
            ),
            (
                "ss_tag_frequency",
                serde_json::to_string(&self.tag_frequency).unwrap_or_default(),
            ),
            ("modelspec.sai_model_spec", "1.0.0".into()),
            (
                "modelspec.architecture",
                self.base_model_version.modelspec_architecture().into(),
            ),
            ("modelspec.implementation", "diffusers".into()),
            (
                "modelspec.implementation_version",
                concat!("lora-trainer/", env!("CARGO_PKG_VERSION")).into(),
            ),
            ("modelspec.title", self.output_name.clone()),
            ("modelspec.resolution", format!("{w}x{h}")),
            (
                "modelspec.date",
                iso_date(
                    self.training_finished_at
                        .unwrap_or(self.training_started_at),
                ),
            ),
            (
                "modelspec.prediction_type",
                match self.base_model_version {
                    BaseModelVersion::SdV2V => "v",
                    _ => "epsilon",
                }
                .into(),
            ),
        ];
        let mut header: BTreeMap<String, String> = entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if self.clip_skip > 1 {
            header.insert("modelspec.encoder_layer".into(), self.clip_skip.to_string());
        }
        header
    }
}

/// What kohya writes for the rank and alpha of a file whose modules differ.
const DYNAMIC: &str = "Dynamic";

/// Python's `str(float)`: shortest round-trip digits, `.0` on whole numbers, exponent form below
/// 1e-4 and from 1e16 (`1e-05`, `2.5e+16`).
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

fn py_optional(x: Option<f64>) -> String {
    x.map_or("None".into(), py_float)
}

/// ISO-8601 UTC date and time of a Unix time (whole seconds), `2024-05-01T12:30:00`.
pub fn iso_date(unix: f64) -> String {
    let secs = unix.max(0.0).floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = crate::log::summary::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_like_python() {
        assert_eq!(py_float(0.0002), "0.0002");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(16.0), "16.0");
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(1.5e-7), "1.5e-07");
        assert_eq!(py_float(1700000000.5), "1700000000.5");
        assert_eq!(py_float(-0.25), "-0.25");
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(951_782_400.0), "2000-02-29T00:00:00");
        assert_eq!(iso_date(1_700_000_000.9), "2023-11-14T22:13:20");
    }
}
