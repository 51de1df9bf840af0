//! What the UNet is conditioned on, made from captions by the base model's text encoders.
//!
//! Each text encoder runs on its own tokenizer's ids (with `clip_skip`); their hidden states,
//! joined on the feature axis, are the cross-attention context. SD 1.x and 2.x have one text
//! encoder. The trainer, its text cache and the sampling pipeline go through [`TextEncoders`] and
//! [`Conditioning`] whatever the number, so a family with more encoders and extra conditioning
//! adds it here, not in each of them.

use candle_core::{Device, Tensor};

use super::clip_text::ClipTextModel;
use super::tokenizer::ClipTokenizer;
use crate::error::ModelError;
use crate::Result;

/// One text encoder with the tokenizer its ids come from.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    /// Carries adapters when it is trained or a LoRA applies to it.
    pub model: ClipTextModel,
}

/// The text encoders of a base model, in the order their hidden states are joined.
pub struct TextEncoders {
    pub encoders: Vec<TextEncoder>,
    /// 1 = each encoder's last layer (A1111's "Clip skip"); 2 = the penultimate.
    pub clip_skip: usize,
}

/// What the UNet reads besides the noisy latents and the timesteps.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, T, cross_attention_dim]`: the encoders' hidden states joined on the last axis.
    pub context: Tensor,
}

impl Conditioning {
    /// The conditionings of several batches as one batch, in order (`[Σ B, T, D]`).
    pub fn cat(parts: &[&Conditioning]) -> Result<Conditioning> {
        let contexts: Vec<&Tensor> = parts.iter().map(|c| &c.context).collect();
        Ok(Conditioning {
            context: Tensor::cat(&contexts, 0)?,
        })
    }
}

impl TextEncoders {
    /// A base model with one text encoder (SD 1.x, 2.x).
    pub fn single(tokenizer: ClipTokenizer, model: ClipTextModel, clip_skip: usize) -> Self {
        TextEncoders {
            encoders: vec![TextEncoder { tokenizer, model }],
            clip_skip,
        }
    }

    /// How many tokens of `text` are cut off (the most any encoder drops) and how many the
    /// encoders read, without the start and end tokens.
    pub fn truncation(&self, text: &str) -> Result<(usize, usize)> {
        let mut dropped = 0;
        let mut read = usize::MAX;
        for e in &self.encoders {
            dropped = dropped.max(e.tokenizer.truncated_tokens(text)?);
            read = read.min(e.tokenizer.max_length().saturating_sub(2));
        }
        Ok((dropped, if read == usize::MAX { 0 } else { read }))
    }

    /// The conditioning of `captions`, on `device`: context `[B, T, Σ hidden]` in the encoders'
    /// dtype.
    pub fn encode<S: AsRef<str>>(&self, captions: &[S], device: &Device) -> Result<Conditioning> {
        if self.encoders.is_empty() {
            return Err(ModelError::InvalidConfig {
                origin: "the base model".to_string(),
                message: "it has no text encoder to condition on".to_string(),
            }
            .into());
        }
        let captions: Vec<&str> = captions.iter().map(AsRef::as_ref).collect();
        let hidden = self
            .encoders
            .iter()
            .map(|e| {
                let ids = e.tokenizer.input_ids(&captions, device)?;
                e.model.forward_with_clip_skip(&ids, self.clip_skip)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Conditioning {
            context: Tensor::cat(&hidden, 2)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip_text_config::ClipTextConfig;
    use crate::nn::weights::TensorSource;
    use crate::nn::{Scope, WeightStore};
    use candle_core::DType;
    use std::path::Path;

    fn tiny_encoder(clip_skip_layers: Option<usize>) -> Result<TextEncoder> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let mut config = ClipTextConfig::from_file(&root.join("text_encoder/config.json"))?;
        if let Some(layers) = clip_skip_layers {
            config.num_hidden_layers = layers;
        }
        let source = TensorSource::safetensors(&root.join("text_encoder/model.safetensors"))?;
        let store = WeightStore::from_source(source, DType::F32, Device::Cpu);
        let model = ClipTextModel::new(Scope::root(&store), &config)?;
        Ok(TextEncoder { tokenizer, model })
    }

    #[test]
    fn the_encoders_hidden_states_are_joined_on_the_feature_axis_in_order() -> Result<()> {
        let captions = ["a red city", "ink mountains"];
        let (a, b) = (tiny_encoder(None)?, tiny_encoder(Some(1))?);
        let ids = a.tokenizer.input_ids(&captions, &Device::Cpu)?;
        let (want_a, want_b) = (
            a.model.forward_with_clip_skip(&ids, 1)?,
            b.model.forward_with_clip_skip(&ids, 1)?,
        );
        assert!(
            (&want_a - &want_b)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
            "the two encoders must differ for the test to see their order"
        );
        let both = TextEncoders {
            encoders: vec![a, b],
            clip_skip: 1,
        };
        let context = both.encode(&captions, &Device::Cpu)?.context;
        let hidden = want_a.dim(2)?;
        assert_eq!(context.dims(), &[2, want_a.dim(1)?, 2 * hidden]);
        let diff = |x: Tensor, y: &Tensor| -> Result<f32> {
            Ok((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert_eq!(diff(context.narrow(2, 0, hidden)?, &want_a)?, 0.0);
        assert_eq!(diff(context.narrow(2, hidden, hidden)?, &want_b)?, 0.0);
        let none = TextEncoders {
            encoders: Vec::new(),
            clip_skip: 1,
        };
        assert!(none.encode(&captions, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn truncation_is_the_most_any_encoder_drops() -> Result<()> {
        let one = TextEncoders::single(tiny_encoder(None)?.tokenizer, tiny_encoder(None)?.model, 1);
        let read = one.encoders[0].tokenizer.max_length() - 2;
        assert_eq!(one.truncation("a red city")?, (0, read));
        let long = vec!["city"; read + 5].join(" ");
        let dropped = one.encoders[0].tokenizer.truncated_tokens(&long)?;
        assert!(dropped >= 5, "{dropped}");
        assert_eq!(one.truncation(&long)?, (dropped, read));
        Ok(())
    }
}
