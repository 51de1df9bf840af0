//! `cache_latents_to_disk`: cached latents kept in `<output_dir>/latent_cache/`, so a second
//! run (or a resumed one) skips the VAE.
//!
//! One file per image view, named by the SHA-256 of everything its latents depend on: the
//! image file's bytes, the view (crop, flip, bucket), the image's index (the latent sample's
//! noise is keyed by it), the seed, the resolution, the base model and VAE, and the VAE's dtype.
//! A changed image, setting or model gives other names, so a stale file is never read; files
//! that no run needs any more can be deleted with the folder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::latents::LatentCache;
use crate::config::TrainPlan;
use crate::dataset::{Dataset, ImageView};
use crate::files::write_atomically;
use crate::models::vae::AutoencoderKL;
use crate::{Error, Result};

/// The folder name inside `output_dir`.
pub const FOLDER: &str = "latent_cache";
const TENSOR: &str = "latent";

/// The on-disk latent cache of one run.
#[derive(Debug, Clone)]
pub struct DiskLatents {
    dir: PathBuf,
    /// What every file of this run depends on besides its view.
    run_key: String,
}

impl DiskLatents {
    pub fn new(output_dir: &Path, plan: &TrainPlan, _dataset: &Dataset) -> Self {
        let run_key = format!(
            "v2|seed={}|resolution={}|model={}|vae={:?}|precision={}|device={}",
            plan.data.seed,
            plan.data.resolution,
            plan.model.base_model,
            plan.model.vae,
            plan.training.mixed_precision,
            plan.training.device,
        );
        DiskLatents {
            dir: output_dir.join(FOLDER),
            run_key,
        }
    }

    /// The file of `view`.
    fn path(&self, dataset: &Dataset, view: &ImageView) -> Result<PathBuf> {
        let image = &dataset.images()[view.image];
        let mut h = Sha256::new();
        h.update(self.run_key.as_bytes());
        h.update(image.digest.as_bytes());
        h.update(
            format!(
                "|image={}|bucket={:?}|crop={:?}|flip={}",
                view.image, image.bucket, view.crop, view.flip
            )
            .as_bytes(),
        );
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(self.dir.join(format!("{hex}.safetensors")))
    }

    fn load(&self, path: &Path) -> Option<Tensor> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).ok()?;
        tensors.remove(TENSOR)
    }

    fn store(&self, path: &Path, latent: &Tensor) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let bytes = safetensors::serialize([(TENSOR, latent)], None)
            .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
        write_atomically(path, &bytes)
    }
}

/// The latents of `views`: read from `disk` where present, the rest encoded with `vae` (and
/// written to `disk`). `progress(n)` counts views as they are done.
pub fn build(
    dataset: &Dataset,
    views: &BTreeSet<ImageView>,
    vae: &AutoencoderKL,
    seed: u64,
    batch_size: usize,
    disk: Option<&DiskLatents>,
    mut progress: impl FnMut(u64),
) -> Result<LatentCache> {
    let Some(disk) = disk else {
        let mut done = 0;
        return LatentCache::build(dataset, views, vae, seed, batch_size, |n, _| {
            progress((n - done) as u64);
            done = n;
        });
    };
    let mut cache = LatentCache::default();
    let mut missing = BTreeSet::new();
    let mut paths = Vec::new();
    for view in views {
        let path = disk.path(dataset, view)?;
        match disk.load(&path) {
            Some(latent) => {
                cache.insert(*view, latent);
                progress(1);
            }
            None => {
                missing.insert(*view);
                paths.push((*view, path));
            }
        }
    }
    let mut done = 0;
    let fresh = LatentCache::build(dataset, &missing, vae, seed, batch_size, |n, _| {
        progress((n - done) as u64);
        done = n;
    })?;
    for (view, path) in paths {
        if let Some(latent) = fresh.get(&view) {
            disk.store(&path, latent)?;
            cache.insert(view, latent.clone());
        }
    }
    Ok(cache)
}
