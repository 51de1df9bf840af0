//! The order of one epoch and every random choice about its samples.
//!
//! An epoch shows each image `repeats` times. The (image, repeat) samples are shuffled, grouped
//! into batches within one bucket (a partial last batch per bucket is kept), and the batches are
//! shuffled. Each random decision comes from its own ChaCha8 stream keyed by (seed, epoch, image,
//! repeat, purpose), never from a shared generator: the data of a step depends only on the seed,
//! the epoch and the batch size, so a resumed run sees exactly what the first run saw.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::bucket::BucketSize;
use super::transform::{centre_crop, max_crop};
use super::Dataset;

/// Which decision a random stream is for; part of the stream's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Purpose {
    SampleOrder = 1,
    BatchOrder = 2,
    Flip = 3,
    Crop = 4,
    CaptionShuffle = 5,
    CaptionDropout = 6,
}

/// The random stream of one decision. The 32-byte ChaCha key is the concatenation of seed,
/// epoch, image, repeat and purpose, so distinct decisions get independent streams.
pub fn decision_rng(
    seed: u64,
    epoch: u64,
    image: u64,
    repeat: u32,
    purpose: Purpose,
) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&image.to_le_bytes());
    key[24..28].copy_from_slice(&repeat.to_le_bytes());
    key[28..].copy_from_slice(&(purpose as u32).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Image index used in the key of epoch-wide decisions (sample and batch order).
const WHOLE_EPOCH: u64 = u64::MAX;

/// What pixels a sample trains on: the image, the crop offset inside its resized version, and
/// whether it is mirrored. Latent caches key on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageView {
    /// Index into [`Dataset::images`].
    pub image: usize,
    /// Offset (x, y) of the bucket-sized window in the image resized to
    /// [`TrainingImage::resized`](super::TrainingImage::resized).
    pub crop: (u32, u32),
    /// Mirrored left-right.
    pub flip: bool,
}

/// One sample of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// Index into [`Dataset::images`].
    pub image: usize,
    /// Which of the image's `repeats` showings in this epoch (0-based).
    pub repeat: u32,
    pub crop: (u32, u32),
    pub flip: bool,
    /// The caption after prefix, shuffling and dropout (empty when dropped).
    pub caption: String,
}

impl BatchItem {
    /// The pixels this sample trains on.
    pub fn view(&self) -> ImageView {
        ImageView {
            image: self.image,
            crop: self.crop,
            flip: self.flip,
        }
    }
}

/// Samples of one bucket trained together.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// (width, height) of every image of the batch.
    pub bucket: BucketSize,
    pub items: Vec<BatchItem>,
}

impl Dataset {
    /// The batches of epoch `epoch` (0-based), in training order. A `batch_size` of 0 is taken as 1.
    pub fn epoch_batches(&self, epoch: usize, batch_size: usize) -> Vec<Batch> {
        let batch_size = batch_size.max(1);
        let seed = self.spec.seed;
        let epoch_key = epoch as u64;
        let repeats = self.spec.repeats.max(1);

        let mut samples: Vec<(usize, u32)> = (0..self.images.len())
            .flat_map(|image| (0..repeats).map(move |repeat| (image, repeat)))
            .collect();
        samples.shuffle(&mut decision_rng(
            seed,
            epoch_key,
            WHOLE_EPOCH,
            0,
            Purpose::SampleOrder,
        ));

        let mut by_bucket: BTreeMap<BucketSize, Vec<(usize, u32)>> = BTreeMap::new();
        for sample in samples {
            by_bucket
                .entry(self.images[sample.0].bucket)
                .or_default()
                .push(sample);
        }
        let mut batches: Vec<Batch> = by_bucket
            .into_iter()
            .flat_map(|(bucket, samples)| {
                samples
                    .chunks(batch_size)
                    .map(|chunk| Batch {
                        bucket,
                        items: chunk
                            .iter()
                            .map(|&(i, r)| self.sample(epoch, i, r))
                            .collect(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        batches.shuffle(&mut decision_rng(
            seed,
            epoch_key,
            WHOLE_EPOCH,
            0,
            Purpose::BatchOrder,
        ));
        batches
    }

    /// Number of batches [`Dataset::epoch_batches`] returns: per bucket, ⌈images × repeats /
    /// batch_size⌉.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        let batch_size = batch_size.max(1);
        let repeats = self.spec.repeats.max(1) as usize;
        self.buckets()
            .iter()
            .map(|&(_, _, images)| (images * repeats).div_ceil(batch_size))
            .sum()
    }

    /// The random decisions for showing `image` the `repeat`-th time in `epoch`.
    ///
    /// Panics if `image` is not below [`Dataset::len`] (an index from this dataset's batches).
    pub fn sample(&self, epoch: usize, image: usize, repeat: u32) -> BatchItem {
        let spec = &self.spec;
        let entry = &self.images[image];
        let rng = |purpose| decision_rng(spec.seed, epoch as u64, image as u64, repeat, purpose);
        let crop = if spec.random_crop {
            let (max_x, max_y) = max_crop(entry.resized, entry.bucket);
            let mut r = rng(Purpose::Crop);
            (r.random_range(0..=max_x), r.random_range(0..=max_y))
        } else {
            centre_crop(entry.resized, entry.bucket)
        };
        let flip = spec.flip_aug && rng(Purpose::Flip).random_bool(0.5);
        let caption = self.captions.apply(
            &entry.caption,
            &mut rng(Purpose::CaptionShuffle),
            &mut rng(Purpose::CaptionDropout),
        );
        BatchItem {
            image,
            repeat,
            crop,
            flip,
            caption,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_streams_differ_by_every_key_part() {
        let draw = |s, e, i, r, p| decision_rng(s, e, i, r, p).random::<u64>();
        let base = draw(1, 2, 3, 4, Purpose::Flip);
        assert_eq!(base, draw(1, 2, 3, 4, Purpose::Flip));
        assert_ne!(base, draw(9, 2, 3, 4, Purpose::Flip));
        assert_ne!(base, draw(1, 9, 3, 4, Purpose::Flip));
        assert_ne!(base, draw(1, 2, 9, 4, Purpose::Flip));
        assert_ne!(base, draw(1, 2, 3, 9, Purpose::Flip));
        assert_ne!(base, draw(1, 2, 3, 4, Purpose::Crop));
    }
}
