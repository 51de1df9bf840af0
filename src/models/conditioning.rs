//! What the UNet is conditioned on, made from captions by the base model's text encoders.
//!
//! Each text encoder runs on its own tokenizer's ids; their hidden states, joined on the feature
//! axis, are the cross-attention context. Which hidden state is the family's rule
//! ([`ConditioningRule`]): SD 1.x and 2.x read one encoder with A1111's clip skip; SDXL reads two
//! at their penultimate layer and adds the last one's projected pooled output. The trainer, its
//! text cache and the sampling pipeline go through [`TextEncoders`] and [`Conditioning`] whatever
//! the family, so a family's conditioning lives here, not in each of them.

use candle_core::{Device, Tensor};

use super::clip_text::ClipTextModel;
use super::clip_text_projection::ClipTextModelWithProjection;
use super::tokenizer::ClipTokenizer;
use super::unet::TextTimeInputs;
use crate::error::ModelError;
use crate::Result;

/// A text tower, with or without the projection of its pooled output.
#[derive(Debug, Clone)]
pub enum TextModel {
    Clip(ClipTextModel),
    /// SDXL's second encoder: its projected pooled output is the UNet's `text_embeds`.
    WithProjection(ClipTextModelWithProjection),
}

impl TextModel {
    /// The CLIP text tower (inside the projection wrapper for [`TextModel::WithProjection`]).
    pub fn clip(&self) -> &ClipTextModel {
        match self {
            TextModel::Clip(model) => model,
            TextModel::WithProjection(model) => model.text_model(),
        }
    }
}

/// One text encoder with the tokenizer its ids come from.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    /// Carries adapters when it is trained or a LoRA applies to it.
    pub model: TextModel,
}

/// How a family turns its encoders' outputs into the conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditioningRule {
    /// SD 1.x/2.x: each encoder's hidden state `clip_skip − 1` layers before the last, with the
    /// final layer norm (kohya's and A1111's clip skip; 1 = the last layer).
    ClipSkip(usize),
    /// SDXL: each encoder's penultimate hidden state without the final layer norm, and the last
    /// encoder's projected pooled output.
    PenultimateAndPooled,
}

/// The text encoders of a base model, in the order their hidden states are joined.
pub struct TextEncoders {
    pub encoders: Vec<TextEncoder>,
    pub rule: ConditioningRule,
}

/// What the UNet reads besides the noisy latents and the timesteps.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, T, cross_attention_dim]`: the encoders' hidden states joined on the last axis.
    pub context: Tensor,
    /// `[B, projection_dim]`: the last encoder's projected pooled output, for a family that
    /// conditions on it (SDXL's `text_embeds`).
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// SDXL's added conditioning for the UNet: the pooled text embedding with each sample's
    /// size ids `[B, 6]`; `None` for a family without a pooled output (or without ids).
    pub fn text_time(&self, size_ids: Option<&Tensor>) -> Option<TextTimeInputs> {
        match (&self.pooled, size_ids) {
            (Some(pooled), Some(ids)) => Some(TextTimeInputs {
                text_embeds: pooled.clone(),
                time_ids: ids.clone(),
            }),
            _ => None,
        }
    }

    /// The same shapes, all zeros (SDXL's conditioning of an empty negative prompt).
    pub fn zeros_like(&self) -> Result<Conditioning> {
        Ok(Conditioning {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }

    /// The conditionings of several batches as one batch, in order (`[Σ B, T, D]`); with a
    /// pooled output when every part has one.
    pub fn cat(parts: &[&Conditioning]) -> Result<Conditioning> {
        let contexts: Vec<&Tensor> = parts.iter().map(|c| &c.context).collect();
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|c| c.pooled.as_ref()).collect();
        Ok(Conditioning {
            context: Tensor::cat(&contexts, 0)?,
            pooled: match pooled {
                Some(p) if !p.is_empty() => Some(Tensor::cat(&p, 0)?),
                _ => None,
            },
        })
    }
}

/// SDXL's six size numbers for one training sample, as kohya's `sdxl_train_network` computes
/// them (after Stability's preprocessing): the image's original height and width; the top and
/// left offsets of the image fitted *inside* the bucket (aspect kept, centred; not the crop this
/// trainer cuts, which kohya does not record either), the left one mirrored for a flipped
/// sample; the bucket's height and width. Sizes are `(width, height)` in pixels.
pub fn size_ids(original: (u32, u32), bucket: (u32, u32), flipped: bool) -> [f32; 6] {
    let (bw, bh) = (f64::from(bucket.0), f64::from(bucket.1));
    let image_ar = f64::from(original.0) / f64::from(original.1.max(1));
    let (fit_w, fit_h) = if bw / bh > image_ar {
        (bh * image_ar, bh)
    } else {
        (bw, bw / image_ar)
    };
    let left = ((bw - fit_w) / 2.0).floor();
    let top = ((bh - fit_h) / 2.0).floor();
    let left = if flipped { bw - (left + fit_w) } else { left };
    [
        original.1 as f32,
        original.0 as f32,
        top.trunc() as f32,
        left.trunc() as f32,
        bucket.1 as f32,
        bucket.0 as f32,
    ]
}

impl TextEncoders {
    /// A base model with one CLIP text encoder read with `clip_skip` (SD 1.x, 2.x).
    pub fn single(tokenizer: ClipTokenizer, model: ClipTextModel, clip_skip: usize) -> Self {
        TextEncoders {
            encoders: vec![TextEncoder {
                tokenizer,
                model: TextModel::Clip(model),
            }],
            rule: ConditioningRule::ClipSkip(clip_skip),
        }
    }

    /// The clip skip the conditioning amounts to, as A1111 records it (SDXL's penultimate
    /// layer is its 2).
    pub fn clip_skip(&self) -> usize {
        match self.rule {
            ConditioningRule::ClipSkip(n) => n,
            ConditioningRule::PenultimateAndPooled => 2,
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
        let captions: Vec<&str> = captions.iter().map(AsRef::as_ref).collect();
        let ids = self
            .encoders
            .iter()
            .map(|e| e.tokenizer.input_ids(&captions, device))
            .collect::<Result<Vec<_>>>()?;
        self.encode_ids(&ids)
    }

    /// [`TextEncoders::encode`] from each encoder's input ids `[B, T]`, in the encoders' order.
    pub fn encode_ids(&self, ids: &[Tensor]) -> Result<Conditioning> {
        let invalid = |message: String| -> crate::Error {
            ModelError::InvalidConfig {
                origin: "the base model's text encoders".to_string(),
                message,
            }
            .into()
        };
        if self.encoders.is_empty() || ids.len() != self.encoders.len() {
            return Err(invalid(format!(
                "{} text encoder(s) and {} lists of token ids; the UNet needs one or more of \
                 each, as many of one as of the other",
                self.encoders.len(),
                ids.len()
            )));
        }
        let mut hidden = Vec::with_capacity(ids.len());
        let mut pooled = None;
        for (e, ids) in self.encoders.iter().zip(ids) {
            match (self.rule, &e.model) {
                (ConditioningRule::ClipSkip(n), model) => {
                    hidden.push(model.clip().forward_with_clip_skip(ids, n)?);
                }
                (ConditioningRule::PenultimateAndPooled, TextModel::Clip(model)) => {
                    hidden.push(model.forward_penultimate(ids)?.0);
                    pooled = None;
                }
                (ConditioningRule::PenultimateAndPooled, TextModel::WithProjection(model)) => {
                    let out = model.forward(ids)?;
                    hidden.push(out.penultimate);
                    pooled = Some(out.text_embeds);
                }
            }
        }
        if self.rule == ConditioningRule::PenultimateAndPooled && pooled.is_none() {
            return Err(invalid(
                "the last text encoder has no projection (`text_projection`), so there is no \
                 pooled text embedding"
                    .to_string(),
            ));
        }
        Ok(Conditioning {
            context: Tensor::cat(&hidden, 2)?,
            pooled,
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
        Ok(TextEncoder {
            tokenizer,
            model: TextModel::Clip(model),
        })
    }

    #[test]
    fn the_encoders_hidden_states_are_joined_on_the_feature_axis_in_order() -> Result<()> {
        let captions = ["a red city", "ink mountains"];
        let (a, b) = (tiny_encoder(None)?, tiny_encoder(Some(1))?);
        let ids = a.tokenizer.input_ids(&captions, &Device::Cpu)?;
        let (want_a, want_b) = (
            a.model.clip().forward_with_clip_skip(&ids, 1)?,
            b.model.clip().forward_with_clip_skip(&ids, 1)?,
        );
        assert!(
            (&want_a - &want_b)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
            "the two encoders must differ for the test to see their order"
        );
        let both = TextEncoders {
            encoders: vec![a, b],
            rule: ConditioningRule::ClipSkip(1),
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
            rule: ConditioningRule::ClipSkip(1),
        };
        assert!(none.encode(&captions, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn truncation_is_the_most_any_encoder_drops() -> Result<()> {
        let e = tiny_encoder(None)?;
        let one = TextEncoders {
            encoders: vec![e],
            rule: ConditioningRule::ClipSkip(1),
        };
        let read = one.encoders[0].tokenizer.max_length() - 2;
        assert_eq!(one.truncation("a red city")?, (0, read));
        let long = vec!["city"; read + 5].join(" ");
        let dropped = one.encoders[0].tokenizer.truncated_tokens(&long)?;
        assert!(dropped >= 5, "{dropped}");
        assert_eq!(one.truncation(&long)?, (dropped, read));
        Ok(())
    }

    #[test]
    fn conditionings_join_with_their_pooled_outputs_or_without() -> Result<()> {
        let dev = Device::Cpu;
        let part = |v: f32, pooled: bool| -> Result<Conditioning> {
            Ok(Conditioning {
                context: Tensor::full(v, (1, 2, 3), &dev)?,
                pooled: pooled.then(|| Tensor::full(v, (1, 4), &dev)).transpose()?,
            })
        };
        let (a, b) = (part(1.0, true)?, part(2.0, true)?);
        let both = Conditioning::cat(&[&a, &b])?;
        assert_eq!(both.context.dims(), &[2, 2, 3]);
        let pooled = both.pooled.expect("pooled").to_vec2::<f32>()?;
        assert_eq!(pooled, vec![vec![1.0; 4], vec![2.0; 4]]);
        let plain = Conditioning::cat(&[&part(1.0, false)?, &part(2.0, false)?])?;
        assert!(plain.pooled.is_none());
        Ok(())
    }

    /// Values from kohya's formula (`BucketManager.get_crop_ltrb` and the flip in
    /// `train_util`), computed in Python for these sizes.
    #[test]
    fn size_ids_follow_kohyas_rule() {
        assert_eq!(
            size_ids((1200, 800), (1024, 768), false),
            [800.0, 1200.0, 42.0, 0.0, 768.0, 1024.0]
        );
        assert_eq!(
            size_ids((1200, 800), (1024, 768), true),
            [800.0, 1200.0, 42.0, 0.0, 768.0, 1024.0]
        );
        assert_eq!(
            size_ids((600, 900), (832, 1216), false),
            [900.0, 600.0, 0.0, 10.0, 1216.0, 832.0]
        );
        assert_eq!(
            size_ids((600, 900), (832, 1216), true),
            [900.0, 600.0, 0.0, 11.0, 1216.0, 832.0]
        );
        assert_eq!(
            size_ids((513, 771), (640, 960), true),
            [771.0, 513.0, 0.0, 1.0, 960.0, 640.0]
        );
    }
}
