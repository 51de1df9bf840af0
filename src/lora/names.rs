//! The names a LoRA module goes by: its diffusers module path inside its model, the kohya name
//! written in A1111-style files (`lora_unet_` + path with `.` → `_`), and the diffusers/PEFT key
//! prefix (`unet.`, `text_encoder.`).

use std::fmt;

/// The model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraModel {
    Unet,
    TextEncoder,
}

impl LoraModel {
    /// Both models, UNet first (the order of reports and files).
    pub const ALL: [LoraModel; 2] = [LoraModel::Unet, LoraModel::TextEncoder];

    /// The kohya key prefix: `lora_unet` / `lora_te`.
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            LoraModel::Unet => "lora_unet",
            LoraModel::TextEncoder => "lora_te",
        }
    }

    /// The diffusers key prefix: `unet` / `text_encoder`.
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            LoraModel::Unet => "unet",
            LoraModel::TextEncoder => "text_encoder",
        }
    }

    /// The kohya name of the module at `path`:
    /// `down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub fn kohya_name(self, path: &str) -> String {
        format!("{}_{}", self.kohya_prefix(), path.replace('.', "_"))
    }

    /// Which model a kohya name belongs to (`lora_unet_…`, `lora_te_…`).
    pub fn of_kohya_name(name: &str) -> Option<LoraModel> {
        LoraModel::ALL
            .into_iter()
            .find(|m| name.starts_with(&format!("{}_", m.kohya_prefix())))
    }
}

impl fmt::Display for LoraModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraModel::Unet => "UNet",
            LoraModel::TextEncoder => "text encoder",
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
        assert_eq!(LoraModel::of_kohya_name("lora_te1_text_model"), None);
    }
}
