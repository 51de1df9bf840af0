//! Bicubic resizing of 8-bit pictures, exactly as transformers 5's image processors do it.
//!
//! transformers 5's default `CLIPImageProcessor` (and `BlipImageProcessor`) is the torchvision
//! backend: the uint8 picture goes through `torchvision.transforms.v2.functional.resize(...,
//! BICUBIC, antialias=True)`, which on the CPU runs torch's native uint8 kernel (a port of
//! Pillow-SIMD): a separable filter, horizontal pass first, the cubic kernel with a = −0.5
//! widened by the scale factor when shrinking, weights normalised per output pixel and rounded
//! to 16-bit fixed point with the most precision that fits, each pass rounded back to 8 bits.
//! A dimension whose size does not change is not filtered. (PIL's own resize differs in the
//! fixed-point precision, so its pixels can be off by one.)

use image::RgbImage;

/// The bicubic convolution kernel with a = −0.5 (Keys; PIL's and torch's antialiased choice).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The weights of one output pixel: the first input index and the fixed-point weights of the
/// input pixels from there on.
#[derive(Debug, Clone, PartialEq)]
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Fixed-point weights of every output pixel of a `from` → `to` resize along one axis, and the
/// number of fraction bits they carry.
fn taps(from: usize, to: usize) -> (Vec<Taps>, u32) {
    let scale = from as f64 / to as f64;
    let (support, inv_scale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let max_taps = support.ceil() as usize * 2 + 1;
    let mut float_taps = Vec::with_capacity(to);
    let mut max_weight = 0.0f64;
    for i in 0..to {
        let center = scale * (i as f64 + 0.5);
        // Truncation toward zero, as the C++ casts do.
        let first = ((center - support + 0.5) as i64).max(0) as usize;
        let end = ((center + support + 0.5) as i64).min(from as i64) as usize;
        let count = end.saturating_sub(first).min(max_taps);
        let mut weights: Vec<f64> = (0..count)
            .map(|j| cubic(((j + first) as f64 - center + 0.5) * inv_scale))
            .collect();
        let total: f64 = weights.iter().sum();
        if total != 0.0 {
            for w in &mut weights {
                *w /= total;
                max_weight = max_weight.max(*w);
            }
        }
        float_taps.push((first, weights));
    }
    // The most fraction bits (< 22) for which the largest weight still fits in an i16.
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = f64::from(1u32 << precision);
    let taps = float_taps
        .into_iter()
        .map(|(first, weights)| Taps {
            first,
            weights: weights
                .into_iter()
                .map(|w| {
                    let v = w * one;
                    // Round half away from zero, then the i16 storage of torch's kernel.
                    let rounded = if v < 0.0 {
                        (-0.5 + v) as i32
                    } else {
                        (0.5 + v) as i32
                    };
                    i32::from(rounded as i16)
                })
                .collect(),
        })
        .collect();
    (taps, precision)
}

/// One weighted sum in fixed point, rounded and clamped to 0..=255.
fn apply(samples: impl Iterator<Item = u8>, weights: &[i32], precision: u32) -> u8 {
    let mut sum: i32 = if precision == 0 {
        0
    } else {
        1 << (precision - 1)
    };
    for (sample, w) in samples.zip(weights) {
        sum += i32::from(sample) * w;
    }
    (sum >> precision).clamp(0, 255) as u8
}

/// Resizes `image` to `width` × `height` with transformers 5's bicubic (see the module docs).
/// A zero target size gives an empty picture.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = image.dimensions();
    if width == 0 || height == 0 || w0 == 0 || h0 == 0 {
        return RgbImage::new(width, height);
    }
    let horizontal = if width != w0 {
        let (taps, precision) = taps(w0 as usize, width as usize);
        let src = image.as_raw();
        let row_len = w0 as usize * 3;
        let mut out = vec![0u8; width as usize * h0 as usize * 3];
        for y in 0..h0 as usize {
            let row = &src[y * row_len..(y + 1) * row_len];
            for (x, tap) in taps.iter().enumerate() {
                for c in 0..3 {
                    let samples =
                        (tap.first..tap.first + tap.weights.len()).map(|i| row[i * 3 + c]);
                    out[(y * width as usize + x) * 3 + c] = apply(samples, &tap.weights, precision);
                }
            }
        }
        RgbImage::from_raw(width, h0, out).unwrap_or_else(|| RgbImage::new(width, h0))
    } else {
        image.clone()
    };
    if height == h0 {
        return horizontal;
    }
    let (taps, precision) = taps(h0 as usize, height as usize);
    let src = horizontal.as_raw();
    let row_len = width as usize * 3;
    let mut out = vec![0u8; row_len * height as usize];
    for (y, tap) in taps.iter().enumerate() {
        for i in 0..row_len {
            let samples = (tap.first..tap.first + tap.weights.len()).map(|r| src[r * row_len + i]);
            out[y * row_len + i] = apply(samples, &tap.weights, precision);
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_keys_cubic_with_a_minus_one_half() {
        assert_eq!(cubic(0.0), 1.0);
        assert_eq!(cubic(1.0), 0.0);
        assert_eq!(cubic(2.0), 0.0);
        assert!((cubic(0.5) - 0.5625).abs() < 1e-12);
        assert!((cubic(-1.5) + 0.0625).abs() < 1e-12);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point_and_widen_when_shrinking() {
        for (from, to) in [(300, 224), (150, 224), (1000, 32), (7, 3)] {
            let (taps, precision) = taps(from, to);
            assert_eq!(taps.len(), to);
            for tap in &taps {
                let sum: i32 = tap.weights.iter().sum();
                let one = 1 << precision;
                assert!(
                    (sum - one).abs() <= tap.weights.len() as i32,
                    "{from}->{to}"
                );
                assert!(tap.first + tap.weights.len() <= from);
            }
            let widest = taps.iter().map(|t| t.weights.len()).max().unwrap_or(0);
            if from > to {
                // support 2·scale on each side
                let support = (4.0 * from as f64 / to as f64) as usize;
                assert!(widest >= support.min(from), "{from}->{to}");
            } else {
                assert!(widest <= 5, "{from}->{to}");
            }
        }
    }

    #[test]
    fn flat_pictures_stay_flat_and_sizes_are_exact() {
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 250]));
        for (w, h) in [(224, 224), (16, 9), (37, 50), (5, 23)] {
            let out = resize_bicubic(&flat, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
        }
        assert_eq!(resize_bicubic(&flat, 37, 23), flat);
        assert_eq!(resize_bicubic(&flat, 0, 5).dimensions(), (0, 5));
    }

    #[test]
    fn an_unchanged_axis_is_not_filtered() {
        // A sharp vertical edge survives a purely vertical resize untouched.
        let mut edge = RgbImage::new(4, 6);
        for (x, _, p) in edge.enumerate_pixels_mut() {
            *p = image::Rgb(if x < 2 { [0; 3] } else { [255; 3] });
        }
        let out = resize_bicubic(&edge, 4, 11);
        for (x, _, p) in out.enumerate_pixels() {
            assert_eq!(p.0[0], if x < 2 { 0 } else { 255 });
        }
    }

    #[test]
    fn overshoot_is_clamped() {
        // Bicubic rings around a hard edge; the values must clamp, not wrap.
        let mut edge = RgbImage::new(8, 1);
        for (x, _, p) in edge.enumerate_pixels_mut() {
            *p = image::Rgb(if x < 4 { [0; 3] } else { [255; 3] });
        }
        let out = resize_bicubic(&edge, 21, 1);
        let row: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(row.first(), Some(&0));
        assert_eq!(row.last(), Some(&255));
        let monotone_outside_ring = row.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(monotone_outside_ring <= 2, "{row:?}");
    }
}
