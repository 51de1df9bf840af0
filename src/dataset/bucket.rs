//! Aspect-ratio buckets: the training sizes an image may be resized and cropped to, so that wide
//! and tall pictures are not squashed into a square.
//!
//! The bucket list follows kohya's `BucketManager` (sd-scripts), so a dataset lands in the same
//! buckets as users see there: the largest square with side a multiple of the step and area ≤
//! resolution², plus, for every width `w` from `min` to `max` in steps, the tallest height `h`
//! (a multiple of the step, ≤ `max`, area `w·h` ≤ resolution²) that is ≥ `min`, together with its
//! transpose. An image goes to the bucket of its exact size if there is one, otherwise to the
//! bucket whose aspect ratio `w/h` is nearest (ties: the smaller bucket in (w, h) order).

use super::DatasetError;

/// A training size in pixels, (width, height).
pub type BucketSize = (u32, u32);

/// The sizes images may be trained at.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketSet {
    /// Sorted by (width, height).
    sizes: Vec<BucketSize>,
}

impl BucketSet {
    /// Every image trains at `resolution × resolution` (no bucketing).
    pub fn square(resolution: u32) -> Result<Self, DatasetError> {
        if resolution == 0 {
            return Err(DatasetError::Invalid(
                "resolution is 0; set `resolution` to the training size in pixels (e.g. 512)"
                    .to_string(),
            ));
        }
        Ok(BucketSet {
            sizes: vec![(resolution, resolution)],
        })
    }

    /// kohya's bucket list for `resolution` (see the module docs).
    pub fn kohya(resolution: u32, min: u32, max: u32, step: u32) -> Result<Self, DatasetError> {
        let invalid = |m: String| Err(DatasetError::Invalid(m));
        if step == 0 {
            return invalid(
                "bucket_reso_steps is 0; use a positive multiple of 8 (64 is usual)".into(),
            );
        }
        if resolution < step {
            return invalid(format!(
                "resolution {resolution} is smaller than bucket_reso_steps {step}: no bucket fits; lower bucket_reso_steps or raise resolution"
            ));
        }
        if min > max {
            return invalid(format!(
                "min_bucket_reso {min} is larger than max_bucket_reso {max}; swap them"
            ));
        }
        let area = u64::from(resolution) * u64::from(resolution);
        let square = ((resolution / step) * step).max(step);
        let mut sizes = vec![(square, square)];
        let mut width = min;
        while width <= max {
            if width > 0 {
                let tallest = (area / u64::from(width)) / u64::from(step) * u64::from(step);
                let height = tallest.min(u64::from(max)) as u32;
                if height >= min && height > 0 {
                    sizes.push((width, height));
                    sizes.push((height, width));
                }
            }
            width = match width.checked_add(step) {
                Some(w) => w,
                None => break,
            };
        }
        sizes.sort_unstable();
        sizes.dedup();
        Ok(BucketSet { sizes })
    }

    /// All sizes, sorted by (width, height).
    pub fn sizes(&self) -> &[BucketSize] {
        &self.sizes
    }

    /// The bucket an image of `width × height` pixels trains at.
    pub fn assign(&self, width: u32, height: u32) -> BucketSize {
        if self.sizes.contains(&(width, height)) {
            return (width, height);
        }
        let aspect = f64::from(width) / f64::from(height.max(1));
        let mut best = self.sizes[0];
        let mut best_error = f64::INFINITY;
        for &(w, h) in &self.sizes {
            let error = (f64::from(w) / f64::from(h) - aspect).abs();
            if error < best_error {
                best = (w, h);
                best_error = error;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_buckets_for_512() {
        let set = BucketSet::kohya(512, 256, 1024, 64).unwrap();
        // The list kohya's make_bucket_resolutions((512, 512), 256, 1024, 64) gives.
        let expected = [
            (256, 832),
            (256, 896),
            (256, 960),
            (256, 1024),
            (320, 704),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (704, 320),
            (768, 320),
            (832, 256),
            (896, 256),
            (960, 256),
            (1024, 256),
        ];
        assert_eq!(set.sizes(), expected);
        for (w, h) in expected {
            assert!(w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0);
        }
    }

    #[test]
    fn kohya_buckets_for_768_respect_max() {
        let set = BucketSet::kohya(768, 256, 1024, 64).unwrap();
        assert!(set.sizes().contains(&(768, 768)));
        // width 512: 589824 / 512 = 1152 -> clamped to max 1024.
        assert!(set.sizes().contains(&(512, 1024)));
        assert!(set.sizes().iter().all(|&(w, h)| w <= 1024 && h <= 1024));
    }

    #[test]
    fn tall_wide_and_square_images_go_where_kohya_puts_them() {
        let set = BucketSet::kohya(512, 256, 1024, 64).unwrap();
        assert_eq!(set.assign(1000, 1000), (512, 512));
        assert_eq!(set.assign(1920, 1080), (640, 384)); // 16:9 (1.78) -> 1.67
        assert_eq!(set.assign(1080, 1920), (384, 640));
        assert_eq!(set.assign(1600, 1200), (576, 448)); // 4:3 (1.33) -> 1.29
        assert_eq!(set.assign(3000, 2000), (640, 384)); // 1.5: 1.67 is nearer than 1.29
        assert_eq!(set.assign(800, 3200), (256, 1024)); // 0.25 exactly
        assert_eq!(set.assign(5000, 100), (1024, 256)); // extreme: widest bucket
        assert_eq!(set.assign(320, 768), (320, 768)); // exact size
    }

    #[test]
    fn small_resolution_keeps_the_square_bucket() {
        // Resolution below min_bucket_reso: only the square survives, as in kohya.
        let set = BucketSet::kohya(64, 256, 1024, 64).unwrap();
        assert_eq!(set.sizes(), [(64, 64)]);
        let set = BucketSet::kohya(128, 64, 256, 64).unwrap();
        assert_eq!(
            set.sizes(),
            [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
        );
        assert_eq!(set.assign(128, 96), (128, 128));
        // 2:1 is as far from 1:1 as from 3:1; kohya's argmin takes the first in sorted order.
        assert_eq!(set.assign(128, 64), (128, 128));
    }

    #[test]
    fn bad_parameters_are_errors_not_panics() {
        assert!(BucketSet::kohya(512, 256, 1024, 0).is_err());
        assert!(BucketSet::kohya(32, 256, 1024, 64).is_err());
        assert!(BucketSet::kohya(512, 1024, 256, 64).is_err());
        assert!(BucketSet::square(0).is_err());
        // min 0 must not divide by zero.
        assert!(BucketSet::kohya(512, 0, 1024, 64).is_ok());
    }
}
