//! How many layers get adapters and how many parameters they train, per model: for the dry-run
//! plan (computed from the model configs alone, on shape-only weight stores) and at the start of
//! training (from the live networks).

use std::fmt;

use super::names::LoraModel;
use super::targets::ModuleSpec;
use crate::log::thousands;
use crate::nn::LayerKind;

/// The adapters of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelReport {
    pub model: LoraModel,
    /// Adapted layers.
    pub modules: usize,
    /// Of which convolutions with a kernel larger than 1×1 (LoCon).
    pub conv_modules: usize,
    /// Trainable parameters (elements of every `lora_down` and `lora_up`).
    pub parameters: usize,
}

/// The adapters of a run, per model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    pub unet: ModelReport,
    /// `None` when the text encoder is not trained.
    pub text_encoder: Option<ModelReport>,
    /// Their ranks, alphas and layers, as built.
    pub layout: Layout,
    /// Attention layers of SDXL's second text encoder with some but not all of q, k, v and out
    /// adapted (`text_model.encoder.layers.N.self_attn`): A1111 applies none of them.
    pub partial_open_clip_attention: Vec<String>,
}

/// The adapters as they are built: what a `network_weights` file decides instead of the
/// config's `lora_rank`, `lora_alpha` and `target_modules`, so the plan, the start-up lines, the
/// LoRA's metadata and the written config can say what is trained.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    /// The distinct (rank, alpha) of linear and 1×1 modules, in order of rank then alpha.
    pub linear: Vec<(usize, f64)>,
    /// The same for convolutions with a larger kernel (LoCon).
    pub conv: Vec<(usize, f64)>,
    /// The adapted layers' names without their block path (`to_q`, `to_out.0`, `q_proj`),
    /// sorted.
    pub layers: Vec<String>,
}

impl Layout {
    /// The one (rank, alpha) of the linear modules, if they share one.
    pub fn uniform(&self) -> Option<(usize, f64)> {
        match self.linear.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The one (rank, alpha) of the large convolutions, if there are some and they share one.
    pub fn uniform_conv(&self) -> Option<(usize, f64)> {
        match self.conv.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// `rank 4, alpha 2`, `ranks 4 to 16 (alphas 1 to 8)` for mixed ones; with the
    /// convolutions' when they differ (`; 3×3 convolutions rank 2, alpha 1`).
    pub fn describe(&self) -> String {
        let mut text = describe_pairs(&self.linear);
        if !self.conv.is_empty() && self.conv != self.linear {
            text.push_str("; larger convolutions ");
            text.push_str(&describe_pairs(&self.conv));
        }
        text
    }
}

fn describe_pairs(pairs: &[(usize, f64)]) -> String {
    let ranks = pairs.iter().map(|p| p.0);
    let alphas = pairs.iter().map(|p| p.1);
    let (r_min, r_max) = (ranks.clone().min(), ranks.max());
    let a_min = alphas.clone().fold(f64::INFINITY, f64::min);
    let a_max = alphas.fold(f64::NEG_INFINITY, f64::max);
    match (pairs, r_min, r_max) {
        ([], ..) => "no modules".to_string(),
        ([(r, a)], ..) => format!("rank {r}, alpha {a}"),
        (_, Some(lo), Some(hi)) => {
            let ranks = if lo == hi {
                format!("rank {lo}")
            } else {
                format!("ranks {lo} to {hi}")
            };
            let alphas = if a_min == a_max {
                format!("alpha {a_min}")
            } else {
                format!("alphas {a_min} to {a_max}")
            };
            format!("{ranks}, {alphas} (they differ between modules)")
        }
        _ => String::new(),
    }
}

/// A layer's name without its block path: the last part of `path`, with the one before when
/// the last is an index (`attn1.to_out.0` → `to_out.0`).
fn layer_name(path: &str) -> String {
    let mut parts = path.rsplit('.');
    let last = parts.next().unwrap_or(path);
    match parts.next() {
        Some(before) if last.bytes().all(|b| b.is_ascii_digit()) => format!("{before}.{last}"),
        _ => last.to_string(),
    }
}

impl LoraReport {
    /// Counts `modules`; `text_encoder_trained` decides whether the text encoder is reported.
    pub fn from_modules(
        text_encoder_trained: bool,
        modules: impl IntoIterator<Item = ModuleSpec>,
    ) -> Self {
        let empty = |model| ModelReport {
            model,
            modules: 0,
            conv_modules: 0,
            parameters: 0,
        };
        let mut unet = empty(LoraModel::Unet);
        let mut text_encoder = empty(LoraModel::TextEncoder);
        let mut layout = Layout::default();
        let mut open_clip_attention: std::collections::BTreeMap<String, usize> =
            std::collections::BTreeMap::new();
        for m in modules {
            if m.model == LoraModel::TextEncoder2 {
                if let Some((layer, leaf)) = m.path.rsplit_once('.') {
                    let projection = matches!(leaf, "q_proj" | "k_proj" | "v_proj" | "out_proj");
                    if projection && layer.ends_with(".self_attn") {
                        *open_clip_attention.entry(layer.to_string()).or_default() += 1;
                    }
                }
            }
            let large = matches!(m.layer, LayerKind::Conv2d { kernel, .. } if kernel > 1);
            let pairs = if large {
                &mut layout.conv
            } else {
                &mut layout.linear
            };
            if !pairs.contains(&(m.rank, m.alpha)) {
                pairs.push((m.rank, m.alpha));
            }
            let name = layer_name(&m.path);
            if !layout.layers.contains(&name) {
                layout.layers.push(name);
            }
            let r = match m.model {
                LoraModel::Unet | LoraModel::LanguageModel => &mut unet,
                // SDXL's two encoders are reported together, as they train at one rate.
                LoraModel::TextEncoder | LoraModel::TextEncoder2 => &mut text_encoder,
            };
            r.modules += 1;
            r.parameters += m.parameters();
            if matches!(m.layer, LayerKind::Conv2d { kernel, .. } if kernel > 1) {
                r.conv_modules += 1;
            }
        }
        for pairs in [&mut layout.linear, &mut layout.conv] {
            pairs.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        }
        layout.layers.sort();
        LoraReport {
            unet,
            text_encoder: text_encoder_trained.then_some(text_encoder),
            layout,
            partial_open_clip_attention: open_clip_attention
                .into_iter()
                .filter(|(_, n)| *n < 4)
                .map(|(layer, _)| layer)
                .collect(),
        }
    }

    /// Both models' totals.
    pub fn total_parameters(&self) -> usize {
        self.unet.parameters + self.text_encoder.as_ref().map_or(0, |t| t.parameters)
    }
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} modules", self.model, self.modules)?;
        if self.conv_modules > 0 {
            write!(f, " ({} convolutions)", self.conv_modules)?;
        }
        write!(f, ", {} parameters", thousands(self.parameters))
    }
}

impl fmt::Display for LoraReport {
    /// `UNet: 64 modules, 797,184 parameters; text encoder: 24 modules, 294,912 parameters`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.unet)?;
        match &self.text_encoder {
            Some(te) => write!(f, "; {te}"),
            None => write!(f, "; text encoder: not trained"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str, kernel: usize, rank: usize, alpha: f64) -> ModuleSpec {
        let layer = if kernel == 0 {
            LayerKind::Linear {
                in_features: 8,
                out_features: 8,
            }
        } else {
            LayerKind::Conv2d {
                in_channels: 8,
                out_channels: 8,
                kernel,
                stride: 1,
                padding: kernel / 2,
            }
        };
        ModuleSpec {
            model: LoraModel::Unet,
            path: path.to_string(),
            layer,
            rank,
            alpha,
        }
    }

    #[test]
    fn the_layout_says_what_was_built() {
        let report = LoraReport::from_modules(
            false,
            [
                spec("a.attn1.to_q", 0, 2, 2.0),
                spec("a.attn1.to_out.0", 0, 2, 2.0),
                spec("b.proj_in", 1, 2, 2.0),
                spec("b.conv1", 3, 4, 1.0),
            ],
        );
        let layout = &report.layout;
        assert_eq!(layout.uniform(), Some((2, 2.0)));
        assert_eq!(layout.uniform_conv(), Some((4, 1.0)));
        assert_eq!(layout.layers, ["conv1", "proj_in", "to_out.0", "to_q"]);
        assert_eq!(
            layout.describe(),
            "rank 2, alpha 2; larger convolutions rank 4, alpha 1"
        );
        let mixed = LoraReport::from_modules(
            false,
            [spec("x.to_q", 0, 4, 4.0), spec("x.to_v", 0, 16, 8.0)],
        );
        assert_eq!(mixed.layout.uniform(), None);
        assert_eq!(
            mixed.layout.describe(),
            "ranks 4 to 16, alphas 4 to 8 (they differ between modules)"
        );
    }
}
