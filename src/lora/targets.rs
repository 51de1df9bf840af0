//! Which layers get a LoRA adapter, decided from the layer's module path and shape.
//!
//! `target_modules` is a preset or a list:
//! - `default`: the attention q and v projections — UNet `attn1`/`attn2` `to_q`, `to_v`; text
//!   encoder `self_attn.q_proj`, `v_proj` (64 + 24 modules on SD 1.5); on SDXL's second text
//!   encoder q, k, v and out, the set A1111 needs to apply any of them;
//! - `attn`: q, k, v and out projections in both models;
//! - `kohya`: what kohya's `networks.lora` adapts: every Linear and 1×1 convolution inside the
//!   UNet's Transformer2DModel blocks (`*.attentions.N.*`) and the text encoder's CLIPAttention
//!   and CLIPMLP linears; with `conv_lora` also, as kohya's LoCon, every layer of the
//!   ResnetBlock2D, Downsample2D and Upsample2D blocks (3×3 convolutions at `conv_rank`, the
//!   time-embedding projection and 1×1 shortcuts at `lora_rank`);
//! - a list of module-name suffixes (`to_k` matches `….to_k`) or globs over the whole path
//!   (`*attn2.to_k`); the PEFT names `q_proj`, `k_proj`, `v_proj`, `out_proj` also select the
//!   UNet's `to_q`, `to_k`, `to_v`, `to_out.0`.
//!
//! With `conv_lora: true` every preset and list also adapts the 3×3 convolutions of the UNet's
//! ResnetBlock2D, Downsample2D and Upsample2D blocks. A list entry that matches no layer of the
//! models being trained is an error naming the entry ([`TargetSelector::check_all_matched`]).

use std::sync::Mutex;

use super::error::{LoraError, LoraProblem};
use super::names::LoraModel;
use crate::config::{LoraSettings, TargetModules, TargetPreset};
use crate::nn::LayerKind;
use crate::Result;

/// One adapted layer: where it is, its shape, and the adapter's rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    pub model: LoraModel,
    /// The layer's diffusers module path inside its model.
    pub path: String,
    pub layer: LayerKind,
    pub rank: usize,
    /// The output is scaled by `alpha / rank`.
    pub alpha: f64,
}

impl ModuleSpec {
    /// The kohya name (`lora_unet_down_blocks_0_…_to_q`).
    pub fn kohya_name(&self) -> String {
        self.model.kohya_name(&self.path)
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Shape of `lora_down`: `[rank, in]` for a linear layer, `[rank, in, k, k]` for a
    /// convolution (its original kernel).
    pub fn down_shape(&self) -> Vec<usize> {
        down_shape(self.layer, self.rank)
    }

    /// Shape of `lora_up`: `[out, rank]` for a linear layer, `[out, rank, 1, 1]` for a
    /// convolution.
    pub fn up_shape(&self) -> Vec<usize> {
        up_shape(self.layer, self.rank)
    }

    /// Trainable parameters: the elements of `lora_down` and `lora_up`.
    pub fn parameters(&self) -> usize {
        self.down_shape().iter().product::<usize>() + self.up_shape().iter().product::<usize>()
    }
}

/// `lora_down`'s shape for a rank-`rank` adapter on `layer`.
pub fn down_shape(layer: LayerKind, rank: usize) -> Vec<usize> {
    match layer {
        LayerKind::Linear { in_features, .. } => vec![rank, in_features],
        LayerKind::Conv2d {
            in_channels,
            kernel,
            ..
        } => vec![rank, in_channels, kernel, kernel],
    }
}

/// `lora_up`'s shape for a rank-`rank` adapter on `layer`.
pub fn up_shape(layer: LayerKind, rank: usize) -> Vec<usize> {
    match layer {
        LayerKind::Linear { out_features, .. } => vec![out_features, rank],
        LayerKind::Conv2d { out_channels, .. } => vec![out_channels, rank, 1, 1],
    }
}

/// Decides from `target_modules`, `conv_lora` and `train_text_encoder` which layers get adapters,
/// and remembers which list entries matched something.
#[derive(Debug)]
pub struct TargetSelector {
    targets: TargetModules,
    rank: usize,
    alpha: f64,
    /// `(conv_rank, conv_alpha)` when `conv_lora` is on.
    conv: Option<(usize, f64)>,
    train_text_encoder: bool,
    /// One flag per list entry: has it selected a layer yet?
    matched: Mutex<Vec<bool>>,
}

impl TargetSelector {
    /// The selection a validated config asks for.
    pub fn new(settings: &LoraSettings) -> Self {
        let entries = match &settings.target_modules {
            TargetModules::Names(names) => names.len(),
            TargetModules::Preset(_) => 0,
        };
        TargetSelector {
            targets: settings.target_modules.clone(),
            rank: settings.rank as usize,
            alpha: settings.alpha,
            conv: settings
                .conv_lora
                .then_some((settings.conv_rank as usize, settings.conv_alpha)),
            train_text_encoder: settings.train_text_encoder,
            matched: Mutex::new(vec![false; entries]),
        }
    }

    /// The adapter for the layer of `model` at `path`, if it is a target.
    pub fn select(
        &self,
        model: LoraModel,
        path: &str,
        layer: LayerKind,
    ) -> Result<Option<ModuleSpec>> {
        if model.is_text_encoder() && !self.train_text_encoder {
            return Ok(None);
        }
        let spec = |(rank, alpha): (usize, f64)| ModuleSpec {
            model,
            path: path.to_string(),
            layer,
            rank,
            alpha,
        };
        let large_kernel = matches!(layer, LayerKind::Conv2d { kernel, .. } if kernel > 1);
        let plain = (self.rank, self.alpha);
        let by_targets = match &self.targets {
            TargetModules::Preset(preset) => preset_selects(*preset, model, path, layer),
            TargetModules::Names(names) => self.list_selects(names, model, path, large_kernel)?,
        };
        let conv_block = model == LoraModel::Unet && in_conv_block(path);
        if let Some(conv) = self.conv {
            if large_kernel && (by_targets || conv_block) {
                return Ok(Some(spec(conv)));
            }
            // kohya's LoCon adapts every layer of the ResNet/sampler blocks.
            let kohya = self.targets == TargetModules::Preset(TargetPreset::Kohya);
            if kohya && conv_block {
                return Ok(Some(spec(plain)));
            }
        }
        Ok(by_targets.then(|| spec(plain)))
    }

    /// The `target_modules` list entries that have selected no layer so far.
    pub fn unmatched_entries(&self) -> Vec<String> {
        let TargetModules::Names(names) = &self.targets else {
            return Vec::new();
        };
        let matched = match self.matched.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        names
            .iter()
            .zip(&matched)
            .filter(|(_, hit)| !**hit)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Fails, naming the entry, if a `target_modules` list entry selected no layer. Call it once
    /// every model that gets adapters has been built; `text_encoder_built` says whether the text
    /// encoder was one of them.
    pub fn check_all_matched(&self, text_encoder_built: bool) -> Result<()> {
        let entries = self.unmatched_entries();
        if entries.is_empty() {
            return Ok(());
        }
        let (models, hint) = if text_encoder_built {
            (
                "UNet or the text encoder",
                "; list module names such as `to_q`, `attn2.to_k`, `q_proj`, `mlp.fc1`, or a glob \
                 such as `*attn1.to_*`",
            )
        } else if !self.train_text_encoder {
            (
                "UNet",
                " (the text encoder is not trained: `train_text_encoder` is false)",
            )
        } else {
            ("UNet", "")
        };
        Err(LoraError::targets(LoraProblem::UnmatchedTarget {
            entries,
            models: models.to_string(),
            hint: hint.to_string(),
        })
        .into())
    }

    fn list_selects(
        &self,
        names: &[String],
        model: LoraModel,
        path: &str,
        large_kernel: bool,
    ) -> Result<bool> {
        let hits: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry_matches(entry, model, path))
            .map(|(i, _)| i)
            .collect();
        if let Some(&first) = hits.first() {
            if large_kernel && self.conv.is_none() {
                return Err(LoraError::targets(LoraProblem::ConvNeedsConvLora {
                    entry: names[first].clone(),
                    path: path.to_string(),
                })
                .into());
            }
        }
        if !hits.is_empty() {
            let mut matched = match self.matched.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            for i in &hits {
                matched[*i] = true;
            }
        }
        Ok(!hits.is_empty())
    }
}

/// Whether a preset selects this layer (3×3 convolutions are never selected by a preset alone).
fn preset_selects(preset: TargetPreset, model: LoraModel, path: &str, layer: LayerKind) -> bool {
    let leaf = path.rsplit('.').next().unwrap_or(path);
    match (preset, model) {
        (TargetPreset::Default, LoraModel::Unet) => {
            in_attention(path) && matches!(leaf, "to_q" | "to_v")
        }
        (TargetPreset::Default, LoraModel::TextEncoder) => {
            path.contains("self_attn.") && matches!(leaf, "q_proj" | "v_proj")
        }
        // SDXL's OpenCLIP encoder: A1111 applies its attention LoRA only with q, k, v and out
        // together (it fuses them into OpenCLIP's `in_proj`), so the default takes all four.
        (TargetPreset::Default, LoraModel::TextEncoder2) => {
            path.contains("self_attn.")
                && matches!(leaf, "q_proj" | "k_proj" | "v_proj" | "out_proj")
        }
        (TargetPreset::Attn, LoraModel::Unet) => {
            in_attention(path)
                && (matches!(leaf, "to_q" | "to_k" | "to_v") || path.ends_with(".to_out.0"))
        }
        (TargetPreset::Attn, LoraModel::TextEncoder | LoraModel::TextEncoder2) => {
            path.contains("self_attn.")
                && matches!(leaf, "q_proj" | "k_proj" | "v_proj" | "out_proj")
        }
        (TargetPreset::Kohya, LoraModel::Unet) => {
            unet_block_child(path).is_some_and(|(kind, _)| kind == "attentions")
                && !matches!(layer, LayerKind::Conv2d { kernel, .. } if kernel > 1)
        }
        (TargetPreset::Kohya, LoraModel::TextEncoder | LoraModel::TextEncoder2) => {
            path.contains(".self_attn.") || path.contains(".mlp.")
        }
        // peft's `all-linear` leaves out the output layer.
        (TargetPreset::AllLinear, LoraModel::LanguageModel) => {
            path != "lm_head" && matches!(layer, LayerKind::Linear { .. })
        }
        (TargetPreset::AllLinear, _) => matches!(layer, LayerKind::Linear { .. }),
        // peft's names for a decoder layer's projections.
        (TargetPreset::Default, LoraModel::LanguageModel) => matches!(leaf, "q_proj" | "v_proj"),
        (TargetPreset::Attn, LoraModel::LanguageModel) => {
            matches!(leaf, "q_proj" | "k_proj" | "v_proj" | "o_proj")
        }
        (TargetPreset::Kohya, LoraModel::LanguageModel) => false,
    }
}

/// A projection of a UNet attention (`….attn1.to_q`, `….attn2.to_out.0`).
fn in_attention(path: &str) -> bool {
    path.contains(".attn1.") || path.contains(".attn2.")
}

/// Inside a ResnetBlock2D, Downsample2D or Upsample2D of the UNet.
fn in_conv_block(path: &str) -> bool {
    unet_block_child(path)
        .is_some_and(|(kind, _)| matches!(kind, "resnets" | "downsamplers" | "upsamplers"))
}

/// For `down_blocks.1.attentions.0.proj_in`: `("attentions", "proj_in")`; the same under
/// `up_blocks.N` and `mid_block`. `None` for layers outside the blocks (`conv_in`, ...).
fn unet_block_child(path: &str) -> Option<(&str, &str)> {
    let rest = if let Some(rest) = path.strip_prefix("mid_block.") {
        rest
    } else {
        let rest = path
            .strip_prefix("down_blocks.")
            .or_else(|| path.strip_prefix("up_blocks."))?;
        let (index, rest) = rest.split_once('.')?;
        index.parse::<usize>().ok()?;
        rest
    };
    let (kind, rest) = rest.split_once('.')?;
    let (index, child) = rest.split_once('.')?;
    index.parse::<usize>().ok()?;
    Some((kind, child))
}

/// A list entry: a glob over the whole path when it has `*` or `?`, else a suffix at a `.`
/// boundary; PEFT's projection names also select the UNet's.
fn entry_matches(entry: &str, model: LoraModel, path: &str) -> bool {
    if entry.contains(['*', '?']) {
        return glob_matches(entry.as_bytes(), path.as_bytes());
    }
    let suffix = |s: &str| path == s || path.ends_with(&format!(".{s}"));
    if suffix(entry) {
        return true;
    }
    let unet_name = match entry {
        "q_proj" => "to_q",
        "k_proj" => "to_k",
        "v_proj" => "to_v",
        "out_proj" => "to_out.0",
        _ => return false,
    };
    model == LoraModel::Unet && suffix(unet_name)
}

/// `*` matches any run of characters (dots included), `?` one character.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear() -> LayerKind {
        LayerKind::Linear {
            in_features: 4,
            out_features: 4,
        }
    }

    fn conv(kernel: usize) -> LayerKind {
        LayerKind::Conv2d {
            in_channels: 4,
            out_channels: 4,
            kernel,
            stride: 1,
            padding: kernel / 2,
        }
    }

    #[test]
    fn globs() {
        assert!(glob_matches(
            b"*attn2.to_k",
            b"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        ));
        assert!(!glob_matches(b"*attn2.to_k", b"x.attn2.to_kk"));
        assert!(glob_matches(b"*.attn?.to_*", b"a.attn1.to_out.0"));
        assert!(glob_matches(b"*", b""));
        assert!(!glob_matches(b"a*b", b"acbc"));
        assert!(glob_matches(b"a*b*c", b"axxbyybc"));
    }

    #[test]
    fn suffixes_stop_at_dots_and_peft_names_reach_the_unet() {
        let attn = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q";
        assert!(entry_matches("to_q", LoraModel::Unet, attn));
        assert!(entry_matches("attn1.to_q", LoraModel::Unet, attn));
        assert!(!entry_matches("1.to_q", LoraModel::Unet, "a.b1.to_q"));
        assert!(entry_matches("q_proj", LoraModel::Unet, attn));
        assert!(!entry_matches(
            "to_q",
            LoraModel::TextEncoder,
            "text_model.encoder.layers.0.self_attn.q_proj"
        ));
        assert!(entry_matches(
            "out_proj",
            LoraModel::Unet,
            "x.attn2.to_out.0"
        ));
        assert!(!entry_matches("out_proj", LoraModel::Unet, "x.proj_out"));
    }

    #[test]
    fn unet_block_children() {
        assert_eq!(
            unet_block_child("down_blocks.1.attentions.0.proj_in"),
            Some(("attentions", "proj_in"))
        );
        assert_eq!(
            unet_block_child("mid_block.resnets.1.conv2"),
            Some(("resnets", "conv2"))
        );
        assert_eq!(
            unet_block_child("up_blocks.0.upsamplers.0.conv"),
            Some(("upsamplers", "conv"))
        );
        assert_eq!(unet_block_child("conv_in"), None);
        assert_eq!(unet_block_child("time_embedding.linear_1"), None);
    }

    fn settings(targets: TargetModules, conv_lora: bool) -> LoraSettings {
        LoraSettings {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            conv_lora,
            conv_rank: 4,
            conv_alpha: 2.0,
            target_modules: targets,
            train_text_encoder: true,
            network_weights: None,
            save_precision: crate::config::SavePrecision::Fp16,
            save_format: crate::config::SaveFormat::Kohya,
        }
    }

    fn ranks(
        s: &TargetSelector,
        model: LoraModel,
        path: &str,
        layer: LayerKind,
    ) -> Option<(usize, f64)> {
        s.select(model, path, layer)
            .unwrap()
            .map(|m| (m.rank, m.alpha))
    }

    #[test]
    fn kohya_conv_lora_adapts_whole_resnet_blocks_at_two_ranks() {
        let s = TargetSelector::new(&settings(TargetModules::Preset(TargetPreset::Kohya), true));
        let u = LoraModel::Unet;
        assert_eq!(
            ranks(&s, u, "down_blocks.0.resnets.0.conv1", conv(3)),
            Some((4, 2.0))
        );
        assert_eq!(
            ranks(&s, u, "down_blocks.0.resnets.0.time_emb_proj", linear()),
            Some((8, 16.0))
        );
        assert_eq!(
            ranks(&s, u, "down_blocks.1.resnets.0.conv_shortcut", conv(1)),
            Some((8, 16.0))
        );
        assert_eq!(
            ranks(&s, u, "down_blocks.0.downsamplers.0.conv", conv(3)),
            Some((4, 2.0))
        );
        assert_eq!(
            ranks(&s, u, "down_blocks.0.attentions.0.proj_in", conv(1)),
            Some((8, 16.0))
        );
        assert_eq!(ranks(&s, u, "conv_in", conv(3)), None);
        assert_eq!(ranks(&s, u, "time_embedding.linear_1", linear()), None);
        // Without conv_lora, kohya's set stays inside the transformers.
        let s = TargetSelector::new(&settings(TargetModules::Preset(TargetPreset::Kohya), false));
        assert_eq!(
            ranks(&s, u, "down_blocks.0.resnets.0.time_emb_proj", linear()),
            None
        );
        assert_eq!(ranks(&s, u, "down_blocks.0.resnets.0.conv1", conv(3)), None);
    }

    #[test]
    fn conv_lora_with_other_targets_adds_only_the_3x3_convolutions() {
        let s = TargetSelector::new(&settings(
            TargetModules::Preset(TargetPreset::Default),
            true,
        ));
        let u = LoraModel::Unet;
        assert_eq!(
            ranks(&s, u, "up_blocks.0.upsamplers.0.conv", conv(3)),
            Some((4, 2.0))
        );
        assert_eq!(
            ranks(&s, u, "mid_block.resnets.1.conv2", conv(3)),
            Some((4, 2.0))
        );
        assert_eq!(
            ranks(&s, u, "mid_block.resnets.1.time_emb_proj", linear()),
            None
        );
        assert_eq!(
            ranks(&s, u, "mid_block.attentions.0.proj_in", conv(1)),
            None
        );
    }

    #[test]
    fn a_listed_3x3_convolution_needs_conv_lora() {
        let names = TargetModules::Names(vec!["conv1".into()]);
        let s = TargetSelector::new(&settings(names.clone(), false));
        let err = s
            .select(LoraModel::Unet, "down_blocks.0.resnets.0.conv1", conv(3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`conv1`") && err.contains("conv_lora: true"),
            "{err}"
        );
        let s = TargetSelector::new(&settings(names, true));
        assert_eq!(
            ranks(
                &s,
                LoraModel::Unet,
                "down_blocks.0.resnets.0.conv1",
                conv(3)
            ),
            Some((4, 2.0))
        );
    }

    #[test]
    fn unmatched_entries_are_named() {
        let names = TargetModules::Names(vec!["to_q".into(), "fc1".into(), "nothing".into()]);
        let mut st = settings(names, false);
        st.train_text_encoder = false;
        let s = TargetSelector::new(&st);
        assert!(ranks(&s, LoraModel::Unet, "a.attn1.to_q", linear()).is_some());
        // The text encoder is not trained: its layers are never selected.
        assert!(ranks(
            &s,
            LoraModel::TextEncoder,
            "text_model.encoder.layers.0.mlp.fc1",
            linear()
        )
        .is_none());
        let err = s.check_all_matched(false).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "target_modules: `fc1` and `nothing` match no module of the UNet (the text encoder is not trained"
            ),
            "{err}"
        );
    }
}
