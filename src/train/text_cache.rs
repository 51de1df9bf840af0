//! Text-encoder outputs computed once, when the text encoders are frozen and captions are fixed.
//!
//! Without text-encoder adapters and with captions that never change between epochs (no tag
//! shuffling, no caption dropout), every caption's conditioning is the same at every step: it is
//! computed once, in batches, and looked up afterwards.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::models::conditioning::{Conditioning, TextEncoders};
use crate::Result;

/// The conditioning by caption: its context `[T, hidden]` and pooled output `[P]` (for a family
/// that has one), f32 on the CPU.
#[derive(Debug, Default)]
pub struct TextCache {
    embeddings: BTreeMap<String, (Tensor, Option<Tensor>)>,
}

impl TextCache {
    /// Encodes every distinct caption of `captions`, `batch_size` at a time.
    pub fn build<'a>(
        captions: impl IntoIterator<Item = &'a str>,
        text_encoders: &TextEncoders,
        device: &Device,
        batch_size: usize,
    ) -> Result<Self> {
        let mut distinct: Vec<&str> = captions.into_iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut embeddings = BTreeMap::new();
        for chunk in distinct.chunks(batch_size.max(1)) {
            let conditioning = text_encoders.encode(chunk, device)?;
            let on_cpu = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            };
            let hidden = on_cpu(&conditioning.context)?;
            let pooled = conditioning.pooled.as_ref().map(on_cpu).transpose()?;
            for (i, caption) in chunk.iter().enumerate() {
                let row = pooled.as_ref().map(|p| p.get(i)).transpose()?;
                embeddings.insert(caption.to_string(), (hidden.get(i)?, row));
            }
        }
        Ok(TextCache { embeddings })
    }

    /// Number of distinct captions.
    pub fn len(&self) -> usize {
        self.embeddings.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.embeddings.is_empty()
    }

    /// The conditioning of `captions` (context `[B, T, hidden]`) on `device`.
    pub fn batch<S: AsRef<str>>(&self, captions: &[S], device: &Device) -> Result<Conditioning> {
        let tensors = captions
            .iter()
            .map(|c| {
                self.embeddings.get(c.as_ref()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "text cache: the caption {:?} was not encoded",
                        c.as_ref()
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let contexts: Vec<&Tensor> = tensors.iter().map(|(c, _)| c).collect();
        let pooled: Option<Vec<&Tensor>> = tensors.iter().map(|(_, p)| p.as_ref()).collect();
        Ok(Conditioning {
            context: Tensor::stack(&contexts, 0)?.to_device(device)?,
            pooled: match pooled {
                Some(p) if !p.is_empty() => Some(Tensor::stack(&p, 0)?.to_device(device)?),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip_text::ClipTextModel;
    use crate::models::clip_text_config::ClipTextConfig;
    use crate::models::tokenizer::ClipTokenizer;
    use crate::nn::weights::TensorSource;
    use crate::nn::{Scope, WeightStore};
    use std::path::Path;

    #[test]
    fn each_distinct_caption_is_encoded_once_and_looked_up() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
        let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
        let config = ClipTextConfig::from_file(&root.join("text_encoder/config.json"))?;
        let source = TensorSource::safetensors(&root.join("text_encoder/model.safetensors"))?;
        let store = WeightStore::from_source(source, DType::F32, Device::Cpu);
        let encoder = ClipTextModel::new(Scope::root(&store), &config)?;
        let captions = ["a red city", "ink mountains", "a red city"];
        let ids = tokenizer.input_ids(&["ink mountains", "a red city"], &Device::Cpu)?;
        let want = encoder.forward_with_clip_skip(&ids, 2)?;
        let encoders = TextEncoders::single(tokenizer, encoder, 2);
        let cache = TextCache::build(captions, &encoders, &Device::Cpu, 2)?;
        assert_eq!(cache.len(), 2);
        let got = cache
            .batch(&["ink mountains", "a red city"], &Device::Cpu)?
            .context;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert!(cache.batch(&["never seen"], &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn sdxl_captions_are_cached_with_their_pooled_output() -> Result<()> {
        use crate::models::load::{BaseModel, LoadOptions};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
        let model =
            BaseModel::open_path(root.to_str().unwrap_or_default(), &LoadOptions::default())?;
        let encoders = model.text_encoders(&[], 1)?;
        let captions = ["ink mountains", "a red city", "ink mountains"];
        // Cached in batches of one, read back as a batch of two in another order.
        let cache = TextCache::build(captions, &encoders, &Device::Cpu, 1)?;
        assert_eq!(cache.len(), 2);
        let order = ["a red city", "ink mountains"];
        let want = encoders.encode(&order, &Device::Cpu)?;
        let got = cache.batch(&order, &Device::Cpu)?;
        let largest = |t: Tensor| -> Result<f32> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()?) };
        assert_eq!(got.context.dims(), want.context.dims());
        assert!(largest((got.context - want.context)?)? < 1e-6);
        let (got, want) = (got.pooled.expect("pooled"), want.pooled.expect("pooled"));
        assert_eq!(got.dims(), &[2, 16]);
        assert!(largest((got - want)?)? < 1e-6);
        Ok(())
    }
}
