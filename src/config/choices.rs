//! The named choices a config can make (optimizer, scheduler, precision, device, targets...),
//! each with its canonical spelling and the message listing the valid ones.

use std::fmt;

/// Defines an enum of named choices with its canonical spellings.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident, $what:literal, case_insensitive = $ci:literal,
     { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every choice with its canonical spelling.
            pub const ALL: &'static [($name, &'static str)] = &[$(($name::$variant, $text)),+];

            /// The canonical spelling (as kohya and the config reference write it).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Reads a spelling; the error lists the valid ones.
            pub fn parse(text: &str) -> Result<Self, String> {
                let text = text.trim();
                Self::ALL
                    .iter()
                    .find(|(_, name)| if $ci { name.eq_ignore_ascii_case(text) } else { *name == text })
                    .map(|(choice, _)| *choice)
                    .ok_or_else(|| unknown($what, text, Self::ALL.iter().map(|(_, n)| *n)))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

fn unknown<'a>(what: &str, text: &str, valid: impl Iterator<Item = &'a str>) -> String {
    let valid: Vec<_> = valid.collect();
    format!("unknown {what} `{text}`; valid: {}", valid.join(", "))
}

choice!(
    /// The optimizer of the LoRA weights.
    Optimizer, "optimizer", case_insensitive = true, {
        AdamW = "AdamW",
        /// AdamW with 8-bit moments (bitsandbytes' AdamW8bit).
        AdamW8bit = "AdamW8bit",
        Lion = "Lion",
        Sgd = "SGD",
    }
);

choice!(
    /// How the learning rate changes over the optimizer steps.
    LrScheduler, "scheduler", case_insensitive = true, {
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Linear = "linear",
        Cosine = "cosine",
        CosineWithRestarts = "cosine_with_restarts",
        Polynomial = "polynomial",
    }
);

choice!(
    /// The dtype of the forward and backward passes (`no` = f32).
    MixedPrecision, "mixed precision", case_insensitive = false, {
        No = "no",
        Fp16 = "fp16",
        Bf16 = "bf16",
    }
);

choice!(
    /// How the records of a language model's training data are laid out (LLaMA-Factory's
    /// names).
    DataFormat, "data format", case_insensitive = true, {
        /// Told apart from the first record's keys (or the CSV header).
        Auto = "auto",
        /// `{instruction, input?, output, system?, history?}`; CSV `instruction,input,output`
        /// or `prompt,response`.
        Alpaca = "alpaca",
        /// `{conversations: [{from: system|human|gpt, value}], system?}`.
        ShareGpt = "sharegpt",
        /// `{messages: [{role: system|user|assistant, content}]}` (OpenAI's).
        Messages = "messages",
        /// `{text}`: plain text, every token learned.
        Text = "text",
    }
);

choice!(
    /// The dtype of the saved LoRA tensors.
    SavePrecision, "save precision", case_insensitive = false, {
        Fp16 = "fp16",
        Bf16 = "bf16",
        Fp32 = "fp32",
    }
);

choice!(
    /// The key layout of the saved LoRA file.
    SaveFormat, "save format", case_insensitive = false, {
        /// `lora_unet_…lora_down.weight` keys, read by A1111, ComfyUI and kohya.
        Kohya = "kohya",
        /// diffusers' `pytorch_lora_weights.safetensors` (peft keys).
        Diffusers = "diffusers",
    }
);

impl SaveFormat {
    /// The tools that load a file of this format, for the plan and the README.
    pub fn clients(self) -> &'static str {
        match self {
            SaveFormat::Kohya => {
                "for A1111/Forge, ComfyUI, kohya sd-scripts and diffusers (whose automatic \
                 loading needs more than q/v on the text encoder)"
            }
            SaveFormat::Diffusers => {
                "for diffusers and PEFT only: A1111, ComfyUI and kohya do not load this format \
                 (use `save_format: kohya` for them)"
            }
        }
    }
}

choice!(
    /// Where training curves go.
    LogWith, "logger", case_insensitive = false, {
        Tensorboard = "tensorboard",
        None = "none",
    }
);

choice!(
    /// What the UNet predicts; overrides the model's scheduler config.
    PredictionType, "prediction type", case_insensitive = false, {
        Epsilon = "epsilon",
        VPrediction = "v_prediction",
    }
);

choice!(
    /// A named set of modules that receive LoRA adapters.
    TargetPreset, "target preset", case_insensitive = false, {
        /// The attention q and v projections: UNet `attn1`/`attn2` `to_q`, `to_v`; text
        /// encoder `self_attn.q_proj`, `v_proj` (64 + 24 modules on SD 1.5). Not kohya's set.
        Default = "default",
        /// The attention q, k, v and out projections of both models.
        Attn = "attn",
        /// What kohya's `networks.lora` adapts: every Linear and 1×1 convolution inside the
        /// UNet's transformer blocks, the text encoder's attention and MLP linears (192 + 72 on
        /// SD 1.5); with `conv_lora`, also the ResNet and sampler blocks, as kohya's LoCon.
        Kohya = "kohya",
        /// Every linear layer: for a language model, every projection of its attention and
        /// MLP blocks (peft's `all-linear`; not `lm_head`); for the image models, every linear
        /// layer of the UNet and the text encoders.
        AllLinear = "all-linear",
    }
);

choice!(
    /// What a run trains: a Stable Diffusion LoRA from pictures, or a language model's LoRA
    /// from instruction records.
    TaskKind, "task", case_insensitive = true, {
        Image = "image",
        Llm = "llm",
    }
);

/// Which modules receive LoRA adapters: a named preset or a list of module-name suffixes/globs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    Preset(TargetPreset),
    /// PEFT style: `q_proj` matches every module whose path ends in `.q_proj`; globs (`*`, `?`)
    /// match whole module paths.
    Names(Vec<String>),
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetModules::Preset(p) => write!(f, "{p}"),
            TargetModules::Names(names) => write!(f, "[{}]", names.join(", ")),
        }
    }
}

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has CUDA and one is present, else the CPU.
    Auto,
    Cpu,
    /// A CUDA device by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            lower => lower
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device `{text}`; valid: auto, cpu, cuda, cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Learning-rate warm-up: a number of optimizer steps, or a share of all steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Steps(usize),
    /// 0 < ratio < 1 of the total optimizer steps.
    Ratio(f64),
}

impl Warmup {
    /// The warm-up in optimizer steps for a run of `total_steps` (a ratio rounds down, as kohya).
    pub fn steps(self, total_steps: usize) -> usize {
        match self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (r * total_steps as f64).floor() as usize,
        }
    }
}

impl fmt::Display for Warmup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warmup::Steps(n) => write!(f, "{n} steps"),
            Warmup::Ratio(r) => write!(f, "{r} of the total steps"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_names_match_case_insensitively_and_keep_the_canonical_spelling() {
        assert_eq!(Optimizer::parse("adamw8bit"), Ok(Optimizer::AdamW8bit));
        assert_eq!(Optimizer::parse("sgd").map(Optimizer::as_str), Ok("SGD"));
        let err = Optimizer::parse("Adam").unwrap_err();
        assert_eq!(
            err,
            "unknown optimizer `Adam`; valid: AdamW, AdamW8bit, Lion, SGD"
        );
    }

    #[test]
    fn scheduler_and_precision_names() {
        assert_eq!(LrScheduler::parse("Cosine"), Ok(LrScheduler::Cosine));
        assert!(LrScheduler::parse("cosine_annealing")
            .unwrap_err()
            .contains("cosine_with_restarts"));
        assert_eq!(MixedPrecision::parse("bf16"), Ok(MixedPrecision::Bf16));
        assert!(MixedPrecision::parse("fp8")
            .unwrap_err()
            .contains("valid: no, fp16, bf16"));
        assert!(SavePrecision::parse("float").is_err());
    }

    #[test]
    fn devices() {
        assert_eq!(DeviceChoice::parse("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert_eq!(DeviceChoice::parse("cuda:1"), Ok(DeviceChoice::Cuda(1)));
        assert_eq!(DeviceChoice::parse("CPU"), Ok(DeviceChoice::Cpu));
        assert!(DeviceChoice::parse("cuda:x")
            .unwrap_err()
            .contains("cuda:N"));
        assert!(DeviceChoice::parse("mps").is_err());
    }

    #[test]
    fn warmup_ratio_rounds_down() {
        assert_eq!(Warmup::Ratio(0.1).steps(95), 9);
        assert_eq!(Warmup::Steps(30).steps(95), 30);
    }
}
