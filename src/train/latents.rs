//! Latents encoded once: every image view (image, crop, flip) a run will train on goes through
//! the VAE a single time, in batches, before the first step.
//!
//! The VAE's output is a distribution; like kohya's `cache_latents`, each view keeps one sample
//! of it for the whole run. The sample's noise comes from a stream keyed by the view, so the
//! cached latents — and with them the whole run — depend only on the seed.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor};

use crate::dataset::{Dataset, ImageView};
use crate::models::vae::AutoencoderKL;
use crate::rng::{normal_f32, stream, Purpose};
use crate::Result;

/// Scaled latents (`[C, h, w]` f32 on the CPU) by image view.
#[derive(Debug, Default)]
pub struct LatentCache {
    latents: BTreeMap<ImageView, Tensor>,
}

impl LatentCache {
    /// Every view that epochs `0..epochs` of `dataset` train on. Without `random_crop` an image
    /// has at most two (mirrored or not).
    pub fn views_for_run(dataset: &Dataset, epochs: usize) -> BTreeSet<ImageView> {
        let repeats = dataset.spec().repeats.max(1);
        let mut views = BTreeSet::new();
        for epoch in 0..epochs {
            for image in 0..dataset.len() {
                for repeat in 0..repeats {
                    views.insert(dataset.sample(epoch, image, repeat).view());
                }
            }
        }
        views
    }

    /// Encodes `views` with `vae` in batches of up to `batch_size` views of one bucket, on the
    /// VAE's device; `progress(done, total)` is called after each batch.
    pub fn build(
        dataset: &Dataset,
        views: &BTreeSet<ImageView>,
        vae: &AutoencoderKL,
        seed: u64,
        batch_size: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let mut by_bucket: BTreeMap<_, Vec<ImageView>> = BTreeMap::new();
        for view in views {
            let bucket = dataset.images()[view.image].bucket;
            by_bucket.entry(bucket).or_default().push(*view);
        }
        let device = vae.device().clone();
        let mut latents = BTreeMap::new();
        let total = views.len();
        for group in by_bucket.values() {
            for chunk in group.chunks(batch_size.max(1)) {
                let encoded = encode_views(dataset, chunk, vae, seed, &device)?;
                for (view, latent) in chunk.iter().zip(encoded) {
                    latents.insert(*view, latent);
                }
                progress(latents.len(), total);
            }
        }
        Ok(LatentCache { latents })
    }

    /// Adds (or replaces) the latents of one view (`[C, h, w]` f32).
    pub fn insert(&mut self, view: ImageView, latent: Tensor) {
        self.latents.insert(view, latent);
    }

    /// The latents of one view, if cached.
    pub fn get(&self, view: &ImageView) -> Option<&Tensor> {
        self.latents.get(view)
    }

    /// Number of cached views.
    pub fn len(&self) -> usize {
        self.latents.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.latents.is_empty()
    }

    /// The latents of `views` stacked into `[B, C, h, w]` on `device`.
    pub fn batch(&self, views: &[ImageView], device: &Device) -> Result<Tensor> {
        let tensors = views
            .iter()
            .map(|view| {
                self.latents.get(view).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "latent cache: image {} (crop {:?}, flip {}) was not encoded",
                        view.image, view.crop, view.flip
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Tensor::stack(&tensors, 0)?.to_device(device)?)
    }
}

/// Encodes `views` (all of one bucket) now, without caching: `[B, C, h, w]` scaled latents on
/// `device`, each view's sample drawn from its own stream.
pub fn encode_batch(
    dataset: &Dataset,
    views: &[ImageView],
    vae: &AutoencoderKL,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let latents = encode_views(dataset, views, vae, seed, &vae.device().clone())?;
    Ok(Tensor::stack(&latents, 0)?.to_device(device)?)
}

fn encode_views(
    dataset: &Dataset,
    views: &[ImageView],
    vae: &AutoencoderKL,
    seed: u64,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let pixels = views
        .iter()
        .map(|view| dataset.load_view(*view))
        .collect::<Result<Vec<_>>>()?;
    let pixels = Tensor::stack(&pixels, 0)?
        .to_device(device)?
        .to_dtype(vae.dtype())?;
    let posterior = vae.encode(&pixels)?;
    let dims = posterior.mean.dims().to_vec();
    let per_view: usize = dims[1..].iter().product();
    let mut noise = Vec::with_capacity(per_view * views.len());
    for view in views {
        noise.extend(normal_f32(&mut view_stream(seed, view), per_view));
    }
    let noise =
        Tensor::from_vec(noise, dims.as_slice(), device)?.to_dtype(posterior.mean.dtype())?;
    let sample = posterior.sample(&noise)?;
    let scaled = vae
        .config()
        .scale_latents(&sample)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    Ok((0..views.len())
        .map(|i| scaled.get(i))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

fn view_stream(seed: u64, view: &ImageView) -> rand_chacha::ChaCha8Rng {
    let crop = ((view.crop.0 as u64) << 32) | view.crop.1 as u64;
    stream(
        seed,
        view.image as u64,
        crop,
        view.flip as u32,
        Purpose::LatentSample,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::DatasetSpec;
    use crate::models::random_weights::random_model;
    use crate::models::vae_config::VaeConfig;
    use crate::nn::Scope;

    fn dataset(dir: &std::path::Path, flip_aug: bool) -> Result<Dataset> {
        let mut csv = String::from("filename,prompt\n");
        for i in 0..3u32 {
            let img = image::RgbImage::from_fn(20 + 4 * i, 16, |x, y| {
                image::Rgb([(x * 12) as u8, (y * 15) as u8, (i * 80) as u8])
            });
            img.save(dir.join(format!("{i}.png")))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            csv.push_str(&format!("{i}.png,picture {i}\n"));
        }
        std::fs::write(dir.join("metadata.csv"), csv).map_err(|e| crate::Error::io(dir, e))?;
        Dataset::open(&DatasetSpec {
            train_data_dir: dir.to_path_buf(),
            metadata_path: Some(dir.join("metadata.csv")),
            caption_extension: ".txt".into(),
            resolution: 16,
            resolution_given: true,
            enable_bucket: false,
            min_bucket_reso: 16,
            max_bucket_reso: 64,
            bucket_reso_steps: 8,
            random_crop: false,
            flip_aug,
            repeats: 2,
            caption_prefix: None,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_dropout_rate: 0.0,
            skip_invalid_images: false,
            seed: 3,
        })
    }

    fn tiny_vae() -> Result<AutoencoderKL> {
        let config = VaeConfig::from_json_str(
            r#"{"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4,
                "latent_channels": 2, "scaling_factor": 0.5,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
            "tiny vae",
        )?;
        Ok(random_model(5, |store| AutoencoderKL::new(Scope::root(store), &config))?.0)
    }

    #[test]
    fn every_view_of_the_run_is_encoded_once_and_reproducibly() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::Error::io("tempdir", e))?;
        let dataset = dataset(dir.path(), true)?;
        let views = LatentCache::views_for_run(&dataset, 4);
        assert!(
            views.len() > 3 && views.len() <= 6,
            "each image mirrored or not: {views:?}"
        );
        let vae = tiny_vae()?;
        let mut calls = Vec::new();
        let cache = LatentCache::build(&dataset, &views, &vae, 9, 2, |done, total| {
            calls.push((done, total))
        })?;
        assert_eq!(cache.len(), views.len());
        assert_eq!(calls.last(), Some(&(views.len(), views.len())));
        let some: Vec<ImageView> = views.iter().copied().take(2).collect();
        let cached = cache.batch(&some, &Device::Cpu)?;
        assert_eq!(cached.dims(), &[2, 2, 8, 8]);
        let fresh = encode_batch(&dataset, &some, &vae, 9, &Device::Cpu)?;
        let diff = (cached - &fresh)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "same view, same seed, same latents ({diff})");
        let other_seed = encode_batch(&dataset, &some, &vae, 10, &Device::Cpu)?;
        let diff = (fresh - other_seed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff > 1e-4, "the sample depends on the seed");
        Ok(())
    }

    #[test]
    fn cached_latents_are_scaled_samples_of_the_posterior() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::Error::io("tempdir", e))?;
        let dataset = dataset(dir.path(), false)?;
        let vae = tiny_vae()?;
        let view = *LatentCache::views_for_run(&dataset, 1)
            .iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("no view".into()))?;
        let latents = encode_batch(&dataset, &[view], &vae, 1, &Device::Cpu)?;
        let pixels = dataset.load_view(view)?.unsqueeze(0)?;
        let posterior = vae.encode(&pixels)?;
        let noise = normal_f32(&mut view_stream(1, &view), 2 * 8 * 8);
        let noise = Tensor::from_vec(noise, (1, 2, 8, 8), &Device::Cpu)?.to_dtype(DType::F64)?;
        let want =
            ((&posterior.mean + (posterior.std()? * noise)?)? * 0.5)?.to_dtype(DType::F32)?;
        let diff = (latents - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
