//! The names a LoRA module goes by: its diffusers module path inside its model, the kohya name
//! written in A1111-style files (`lora_unet_` + path with `.` → `_`), and the diffusers/PEFT key
//! prefix (`unet.`, `text_encoder.`). For SDXL kohya names the UNet's modules by their LDM paths
//! (`lora_unet_input_blocks_4_1_…`) and the text encoders `lora_te1_`, `lora_te2_`: the base
//! model's family decides ([`LoraBase`]).

use std::fmt;

use crate::models::family::ModelFamily;
use crate::models::load::ldm_path;
use crate::models::unet_config::UNetConfig;

/// The model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraModel {
    Unet,
    /// The (first) text encoder: SD's only one, SDXL's CLIP ViT-L.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
    /// A causal language model (the LLM task). Its adapters are saved as PEFT folders
    /// ([`crate::llm::peft`]), never under kohya names: its "kohya name" (`lora_lm_…`) only
    /// seeds the adapter's random stream.
    LanguageModel,
}

impl LoraModel {
    /// Every image model, UNet first (the order of reports and files).
    pub const ALL: [LoraModel; 3] = [
        LoraModel::Unet,
        LoraModel::TextEncoder,
        LoraModel::TextEncoder2,
    ];

    /// The kohya key prefix: `lora_unet` / `lora_te` / `lora_te2` (an SDXL file's first text
    /// encoder is `lora_te1`: [`LoraBase::kohya_name`]).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            LoraModel::Unet => "lora_unet",
            LoraModel::TextEncoder => "lora_te",
            LoraModel::TextEncoder2 => "lora_te2",
            LoraModel::LanguageModel => "lora_lm",
        }
    }

    /// The diffusers key prefix: `unet` / `text_encoder` / `text_encoder_2`.
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            LoraModel::Unet => "unet",
            LoraModel::TextEncoder => "text_encoder",
            LoraModel::TextEncoder2 => "text_encoder_2",
            LoraModel::LanguageModel => "base_model.model",
        }
    }

    /// A text encoder (either).
    pub fn is_text_encoder(self) -> bool {
        matches!(self, LoraModel::TextEncoder | LoraModel::TextEncoder2)
    }

    /// The kohya name of the module at `path`:
    /// `down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub fn kohya_name(self, path: &str) -> String {
        format!("{}_{}", self.kohya_prefix(), path.replace('.', "_"))
    }

    /// Which model a kohya name belongs to (`lora_unet_…`, `lora_te_…`, SDXL's `lora_te1_…`
    /// and `lora_te2_…`).
    pub fn of_kohya_name(name: &str) -> Option<LoraModel> {
        LoraModel::split_kohya_name(name).map(|(model, _)| model)
    }

    /// A kohya name's model and the rest of the name after its prefix and `_`.
    pub fn split_kohya_name(name: &str) -> Option<(LoraModel, &str)> {
        [
            ("lora_unet_", LoraModel::Unet),
            ("lora_te_", LoraModel::TextEncoder),
            ("lora_te1_", LoraModel::TextEncoder),
            ("lora_te2_", LoraModel::TextEncoder2),
        ]
        .into_iter()
        .find_map(|(prefix, model)| name.strip_prefix(prefix).map(|rest| (model, rest)))
    }
}

/// The base model as LoRA files see it: its family (a file made for another one is refused) and
/// the names kohya gives its modules.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraBase {
    pub family: ModelFamily,
    /// SDXL's UNet, whose modules kohya names by their LDM paths (which depend on its layout).
    ldm_unet: Option<UNetConfig>,
}

impl LoraBase {
    /// The base of `family` whose UNet has `unet`'s structure.
    pub fn new(family: ModelFamily, unet: &UNetConfig) -> Self {
        LoraBase {
            family,
            ldm_unet: (family == ModelFamily::Sdxl).then(|| unet.clone()),
        }
    }

    /// An SD 1.x or 2.x base (their names do not depend on the UNet's layout); `None` for SDXL,
    /// which needs [`LoraBase::new`].
    pub fn sd(family: ModelFamily) -> Option<Self> {
        (family != ModelFamily::Sdxl).then_some(LoraBase {
            family,
            ldm_unet: None,
        })
    }

    /// The kohya name of `model`'s module at `path` in files for this base:
    /// [`LoraModel::kohya_name`] for SD 1.x/2.x; for SDXL the UNet's LDM path
    /// (`down_blocks.1.attentions.0.proj_in` → `lora_unet_input_blocks_4_1_proj_in`) and
    /// `lora_te1_` for the first text encoder (`lora_te2_` for the second, as always).
    pub fn kohya_name(&self, model: LoraModel, path: &str) -> String {
        match (model, &self.ldm_unet) {
            (LoraModel::Unet, Some(config)) => match ldm_path(config, path) {
                Some(ldm) => model.kohya_name(&ldm),
                None => model.kohya_name(path),
            },
            (LoraModel::TextEncoder, _) if self.family.text_encoder_count() > 1 => {
                format!("lora_te1_{}", path.replace('.', "_"))
            }
            _ => model.kohya_name(path),
        }
    }
}

impl fmt::Display for LoraModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraModel::Unet => "UNet",
            LoraModel::TextEncoder => "text encoder",
            LoraModel::TextEncoder2 => "second text encoder",
            LoraModel::LanguageModel => "language model",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names_replace_every_dot() {
        assert_eq!(
            LoraModel::Unet.kohya_name("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"),
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"
        );
        assert_eq!(
            LoraModel::TextEncoder.kohya_name("text_model.encoder.layers.11.self_attn.q_proj"),
            "lora_te_text_model_encoder_layers_11_self_attn_q_proj"
        );
        assert_eq!(
            LoraModel::of_kohya_name("lora_te_text_model_encoder_layers_0_mlp_fc1"),
            Some(LoraModel::TextEncoder)
        );
        assert_eq!(
            LoraModel::split_kohya_name("lora_te1_text_model_x"),
            Some((LoraModel::TextEncoder, "text_model_x"))
        );
        assert_eq!(
            LoraModel::of_kohya_name("lora_te2_text_model"),
            Some(LoraModel::TextEncoder2)
        );
        assert_eq!(LoraModel::of_kohya_name("lora_text_model"), None);
    }

    #[test]
    fn sdxl_bases_name_the_unet_by_ldm_paths_and_the_text_encoder_te1() {
        let config =
            UNetConfig::from_file(&crate::fixtures::path("tiny-sdxl/unet/config.json")).unwrap();
        assert_eq!(LoraBase::sd(ModelFamily::Sdxl), None);
        let xl = LoraBase::new(ModelFamily::Sdxl, &config);
        assert_eq!(
            xl.kohya_name(
                LoraModel::Unet,
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
            ),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            xl.kohya_name(LoraModel::Unet, "mid_block.attentions.0.proj_in"),
            "lora_unet_middle_block_1_proj_in"
        );
        assert_eq!(
            xl.kohya_name(
                LoraModel::TextEncoder,
                "text_model.encoder.layers.0.mlp.fc1"
            ),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1"
        );
        // SD names do not depend on the UNet's layout.
        let sd = LoraBase::new(ModelFamily::Sd1, &config);
        assert_eq!(Some(sd.clone()), LoraBase::sd(ModelFamily::Sd1));
        assert_eq!(
            sd.kohya_name(LoraModel::Unet, "mid_block.attentions.0.proj_in"),
            "lora_unet_mid_block_attentions_0_proj_in"
        );
    }
}
